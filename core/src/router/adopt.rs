//! Guesses of the other workers ([`crate::inflight::guesses`]): a miss another worker sent is
//! listed in this worker's view at once too.

use super::Router;
use crate::hint::HintList;

impl Router {
    /// Another worker listed `hint` on runner `idx` at `at_us` (a miss it sent there), and its
    /// list for the runner then read `list`: this view takes that list, keeping this worker's
    /// own guesses there that `list` lacks (right after `hint`, within the runner's
    /// capacity), and counts
    /// `hint` as a guess of its own, so that the model's next requests join that load and a
    /// request for the model the other worker evicted goes elsewhere. False, with nothing
    /// changed, when the view already lists `hint` there, the runner is unknown, or `list`
    /// does not hold `hint`.
    pub fn adopt_guess(&mut self, idx: u32, hint: &str, list: &HintList, at_us: u64) -> bool {
        let Some(r) = self.view.runner(idx) else { return false };
        if r.hints.iter().any(|x| x == hint) || !list.hints.iter().any(|x| x == hint) {
            return false;
        }
        // The newest guess first, then ours the other worker had not heard of, then its list.
        let mut hints = vec![hint.to_string()];
        if let Some(g) = self.guessed.get(idx as usize) {
            let ours = g.iter().map(|(h, _)| h).filter(|h| !list.hints.contains(h) && r.hints.contains(h));
            hints.extend(ours.cloned());
        }
        hints.extend(list.hints.iter().filter(|h| *h != hint).cloned());
        let keep = if r.capacity > 0 { r.capacity as usize } else { hints.len() };
        hints.truncate(keep.max(1));
        // Runners sharing a model that came or went here have a new victim price.
        let mut touched: Vec<String> = r.hints.iter().filter(|h| !hints.contains(h)).cloned().collect();
        touched.extend(hints.iter().filter(|h| !r.hints.contains(h)).cloned());
        self.view.set_runner_hints(idx, &HintList { hints, invalid: 0, truncated: 0 });
        self.reindex(idx);
        self.reindex_sharers(idx, &touched);
        let n = self.view.runners().len();
        if self.guessed.len() < n {
            self.guessed.resize_with(n, Vec::new);
        }
        let listed = self.view.runner(idx).map(|r| r.hints.clone()).unwrap_or_default();
        if let Some(g) = self.guessed.get_mut(idx as usize) {
            g.retain(|(x, _)| x != hint && listed.contains(x));
            g.insert(0, (hint.to_string(), at_us));
            g.truncate(keep.max(1));
        }
        true
    }
}
