//! One routing decision as a worker makes it: [`rank_loads`] plus two rules that keep a busy fleet
//! from thrashing its caches (both found with the routing benchmark's simulator, see
//! `docs/bench-routing.md`):
//!
//! * **Loads are not busy.** A request sent to a runner that does not list its hint waits for
//!   a model load, which on `runner-example` holds no inference slot. Counting it as busy made
//!   every miss hide its runner for the length of a load, so holders were skipped, the model
//!   was loaded again elsewhere, evicting others: a collapse past ~60 % load. The caller keeps
//!   a second counter of such requests (`loading`) and the busy test uses
//!   `in_flight - loading`. Where a miss goes is still decided on all of `in_flight`: loads
//!   hold cache slots, and a runner whose slots are all pinned makes a new load wait.
//! * **A miss lists its hint at once.** The runner a miss is sent to is treated as holding the
//!   model from that moment (most recently used first, the least recently used dropped if the
//!   cache is full, as `runner-example` evicts), so the next requests for it follow and join
//!   the load instead of starting another one elsewhere. The runner's response header or next
//!   poll replaces the guess with the truth.

use crate::hint::HintList;
use crate::rank::{rank_loads, Outcome};
use crate::table::View;

/// What [`Router::route`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// How the first candidate was chosen.
    pub outcome: Outcome,
    /// The request will wait for a model load on the first candidate (it does not hold the
    /// model yet, or only as a guess of ours). Count it in the `loading` counter until it
    /// ends.
    pub load: bool,
    /// This decision listed the hint on the first candidate (a guess): other workers should
    /// hear of it (the filter forwards the runner's new list to the poller).
    pub listed: bool,
}

/// A worker's routing state: its [`View`] of the fleet, plus the hints it listed on runners
/// itself when it sent them a miss (not yet confirmed by the runner).
#[derive(Debug, Default, Clone)]
pub struct Router {
    view: View,
    /// Per runner: hints listed by [`Router::route`] and not yet confirmed.
    guessed: Vec<Vec<String>>,
    busy: Vec<u32>,
}

impl Router {
    /// A router over `view`.
    pub fn new(view: View) -> Router {
        Router { view, ..Router::default() }
    }

    /// The current view.
    pub fn view(&self) -> &View {
        &self.view
    }

    /// Replaces the view (a newly published table); drops all guesses.
    pub fn replace_view(&mut self, view: View) {
        self.view = view;
        self.guessed.clear();
    }

    /// Refreshes the view in place (from a newly published table) with `f`. Guesses the new
    /// view still lists stay guesses until the runner answers the request that made them
    /// ([`Router::confirm`], [`Router::learn`]); guesses it no longer lists are dropped.
    pub fn refresh(&mut self, f: impl FnOnce(&mut View)) {
        f(&mut self.view);
        let view = &self.view;
        for (i, g) in (0u32..).zip(self.guessed.iter_mut()) {
            match view.runner(i) {
                Some(r) => g.retain(|h| r.hints.iter().any(|x| x == h)),
                None => g.clear(),
            }
        }
    }

    /// Runner `idx` itself confirmed its hint list is what the view has: our guesses for it
    /// are now facts. Returns whether there were guesses (the view then knew more than the
    /// published table, which should hear of it).
    pub fn confirm(&mut self, idx: u32) -> bool {
        match self.guessed.get_mut(idx as usize) {
            Some(g) if !g.is_empty() => {
                g.clear();
                true
            }
            _ => false,
        }
    }

    /// Records what runner `idx` itself said it holds (a response header); drops our guesses
    /// for it. Returns whether its hints changed.
    pub fn learn(&mut self, idx: u32, hints: &HintList) -> bool {
        if let Some(g) = self.guessed.get_mut(idx as usize) {
            g.clear();
        }
        self.view.set_runner_hints(idx, hints)
    }

    /// Ranks candidates for a request with `hint` into `out` (best first, at most `max`),
    /// where `in_flight[i]` counts the requests in flight to runner `i` and `loading[i]` those
    /// of them that were routed with [`Decision::load`]. `max_hints` caps a runner's list
    /// when its capacity is unknown.
    #[allow(clippy::too_many_arguments)]
    pub fn route(
        &mut self,
        hint: Option<&str>,
        in_flight: &[u32],
        loading: &[u32],
        spin: u32,
        max: usize,
        max_hints: usize,
        out: &mut Vec<u32>,
    ) -> Decision {
        self.busy.clear();
        self.busy.extend(
            in_flight.iter().enumerate().map(|(i, f)| f.saturating_sub(loading.get(i).copied().unwrap_or(0))),
        );
        let outcome = rank_loads(&self.view, hint, &self.busy, in_flight, spin, max, out);
        let (Some(h), Some(&first)) = (hint, out.first()) else {
            return Decision { outcome, load: false, listed: false };
        };
        let Some(r) = self.view.runner(first) else {
            return Decision { outcome, load: false, listed: false };
        };
        if r.hints.iter().any(|x| x == h) {
            // A hit, unless the hint is only our own guess: then it joins a load.
            let guessed = self.guessed.get(first as usize).is_some_and(|g| g.iter().any(|x| x == h));
            return Decision { outcome, load: guessed, listed: false };
        }
        let keep = if r.capacity > 0 { r.capacity as usize } else { max_hints.max(1) };
        let mut hints = Vec::with_capacity(keep);
        hints.push(h.to_string());
        hints.extend(r.hints.iter().take(keep.saturating_sub(1)).cloned());
        self.view.set_runner_hints(first, &HintList { hints, invalid: 0, truncated: 0 });
        let n = self.view.runners().len();
        if self.guessed.len() < n {
            self.guessed.resize_with(n, Vec::new);
        }
        if let Some(g) = self.guessed.get_mut(first as usize) {
            g.retain(|x| x != h);
            g.insert(0, h.to_string());
            g.truncate(keep);
        }
        Decision { outcome, load: true, listed: true }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::tests::table;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn go(r: &mut Router, hint: Option<&str>, inf: &[u32], loading: &[u32]) -> (Decision, Vec<u32>) {
        let mut out = Vec::new();
        let d = r.route(hint, inf, loading, 0, 2, 64, &mut out);
        (d, out)
    }

    #[test]
    fn requests_waiting_for_loads_do_not_make_a_holder_busy() {
        // Runner 0 holds a; it has 2 in flight (= max_concurrency), both waiting for loads.
        let mut v = Router::new(View::from_table(&table(&[&["a"], &[]])));
        let (d, out) = go(&mut v, Some("a"), &[2, 0], &[2, 0]);
        assert_eq!((d.outcome, d.load, out[0]), (Outcome::Hit, false, 0));
        // Without that knowledge it is busy and the request goes elsewhere.
        let (d, out) = go(&mut v, Some("a"), &[2, 0], &[0, 0]);
        assert_eq!((d.outcome, d.load, out[0]), (Outcome::BusyFallback, true, 1));
    }

    #[test]
    fn a_miss_lists_its_hint_on_the_chosen_runner_at_once() {
        let mut v = Router::new(View::from_table(&table(&[&["x", "y", "z"], &["q"]])));
        let (d, out) = go(&mut v, Some("new"), &[0, 0], &[]);
        assert_eq!((d.outcome, d.load, d.listed, out[0]), (Outcome::Miss, true, true, 1));
        assert_eq!(v.view().runner(1).unwrap().hints, vec!["new", "q"]);
        assert_eq!(v.view().holders("new"), &[1]);
        // The next request for it follows, as a hit, but joins the load: counted as one.
        let (d, out) = go(&mut v, Some("new"), &[0, 1], &[0, 1]);
        assert_eq!((d.outcome, d.load, d.listed, out[0]), (Outcome::Hit, true, false, 1));
        // Once the runner confirms it (same list, or a new one), requests are plain hits.
        let mut w = v.clone();
        assert!(w.confirm(1));
        assert!(!w.confirm(1));
        assert_eq!(
            go(&mut w, Some("new"), &[0, 1], &[0, 0]).0,
            Decision { outcome: Outcome::Hit, load: false, listed: false }
        );
        assert!(!v.learn(1, &HintList { hints: vec!["new".into(), "q".into()], invalid: 0, truncated: 0 }));
        let (d, _) = go(&mut v, Some("new"), &[0, 1], &[0, 0]);
        assert_eq!((d.outcome, d.load), (Outcome::Hit, false));
    }

    #[test]
    fn guesses_survive_a_refresh_that_still_lists_them() {
        let mut v = Router::new(View::from_table(&table(&[&["x"], &["q"]])));
        go(&mut v, Some("new"), &[0, 0], &[]);
        let (d, _) = go(&mut v, Some("new"), &[0, 0], &[0, 0]);
        assert!(d.load, "joining a guessed load");
        // A table that lists it (another worker forwarded the guess) keeps it a guess.
        let listed = table(&[&["new", "x"], &["q"]]);
        v.refresh(|view| *view = View::from_table(&listed));
        assert!(go(&mut v, Some("new"), &[0, 0], &[0, 0]).0.load);
        // A table that does not list it drops the guess.
        v.refresh(|view| *view = View::from_table(&table(&[&["x"], &["q"]])));
        assert!(!v.confirm(0) && !v.confirm(1));
    }

    #[test]
    fn a_full_runner_drops_its_least_recently_used_hint() {
        // Runner 0 is the only one: full (capacity 3), the new model evicts the last-listed.
        let mut v = Router::new(View::from_table(&table(&[&["x", "y", "z"]])));
        let (d, _) = go(&mut v, Some("new"), &[0], &[]);
        assert!(d.load);
        assert_eq!(v.view().runner(0).unwrap().hints, vec!["new", "x", "y"]);
        assert!(v.view().holders("z").is_empty());
    }

    #[test]
    fn no_hint_and_no_candidates_change_nothing() {
        let mut v = Router::new(View::from_table(&table(&[&["x"]])));
        let (d, out) = go(&mut v, None, &[0], &[]);
        assert_eq!((d.outcome, d.load, out), (Outcome::NoHint, false, vec![0]));
        let mut empty = Router::default();
        let (d, out) = go(&mut empty, Some("a"), &[], &[]);
        assert_eq!((d.outcome, d.load, out), (Outcome::NoCandidates, false, vec![]));
        assert_eq!(v.view().runner(0).unwrap().hints, vec!["x"]);
    }
}
