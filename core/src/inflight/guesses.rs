//! The guesses in the in-flight value: the last [`MAX_GUESSES`] hints a miss listed on the
//! runner it went to, each with the runner's hint list as the routing worker then had it.
//!
//! A worker that sends a miss treats the runner as holding the model at once (the router's
//! guess), so that the model's next requests join that load. Its other workers used to hear of
//! it only from the poller's next publication (up to a publication gap later), and in the
//! meantime sent the same model elsewhere, loading it twice, or sent a request for the model
//! the guess evicted to a runner that no longer held it. Every worker reads this value on
//! every request anyway; the guess rides in the compare-and-swap that counts the miss.
//!
//! An entry is `seq u32, runner u32, at_us u64, hint_len u16, list_len u16`, then the hint and
//! the list (comma-separated, as in `x-fal-runner-hints`), oldest entry first; `seq` counts up
//! from the newest guess's number, kept in the trailer (so that a rewrite that drops entries
//! never numbers a new guess below one a worker has seen). A truncated or inconsistent entry ends the section: it and the
//! entries after it are ignored.

use super::{assemble, decode, normalize, part, pin_bytes, sections, u32_at, u64_at};

/// Most guesses the value holds: the oldest goes when a new one comes.
pub const MAX_GUESSES: usize = 16;
/// Most bytes of guesses the value holds (a long list on a runner of many hints may push out
/// more of the oldest; one larger than this is not shared).
pub const MAX_GUESS_BYTES: usize = 16 * 1024;
/// Bytes before an entry's hint.
const HEADER_BYTES: usize = 20;

/// One guess: `hint` was listed on `runner`, whose list then read `list`, at `at_us` (the host
/// clock, microseconds) by a worker that numbered it `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guess<'a> {
    pub seq: u32,
    pub runner: u32,
    pub at_us: u64,
    pub hint: &'a [u8],
    pub list: &'a [u8],
}

/// The entry at `at` of `section` and the offset after it.
fn entry_at(section: &[u8], at: usize) -> Option<(Guess<'_>, usize)> {
    let len16 =
        |o: usize| section.get(o..o + 2).and_then(|s| <[u8; 2]>::try_from(s).ok()).map(u16::from_le_bytes);
    let hint_len = usize::from(len16(at + 16)?);
    let list_len = usize::from(len16(at + 18)?);
    let hint_at = at.checked_add(HEADER_BYTES)?;
    let end = hint_at.checked_add(hint_len)?.checked_add(list_len)?;
    let g = Guess {
        seq: u32_at(section, at)?,
        runner: u32_at(section, at + 4)?,
        at_us: u64_at(section, at + 8)?,
        hint: section.get(hint_at..hint_at + hint_len)?,
        list: section.get(hint_at + hint_len..end)?,
    };
    Some((g, end))
}

/// Every well-formed entry of `bytes`' guesses, oldest first (runners of any index).
fn all(bytes: &[u8]) -> impl Iterator<Item = Guess<'_>> + '_ {
    let section = part(bytes, sections(bytes).guesses);
    let mut at = 0;
    std::iter::from_fn(move || {
        let (g, next) = entry_at(section, at)?;
        at = next;
        Some(g)
    })
}

/// The guesses of `bytes` on runners below `runners`, oldest first.
pub fn iter(bytes: &[u8], runners: usize) -> impl Iterator<Item = Guess<'_>> + '_ {
    all(bytes).filter(move |g| (g.runner as usize) < runners)
}

/// The newest guess's number (0 with none): read on every request, so it is kept in the
/// trailer rather than found by walking the entries.
pub fn newest_seq(bytes: &[u8]) -> u32 {
    sections(bytes).newest_guess
}

fn push_entry(out: &mut Vec<u8>, g: &Guess<'_>) {
    out.extend_from_slice(&g.seq.to_le_bytes());
    out.extend_from_slice(&g.runner.to_le_bytes());
    out.extend_from_slice(&g.at_us.to_le_bytes());
    out.extend_from_slice(&(g.hint.len() as u16).to_le_bytes());
    out.extend_from_slice(&(g.list.len() as u16).to_le_bytes());
    out.extend_from_slice(g.hint);
    out.extend_from_slice(g.list);
}

fn entry_len(g: &Guess<'_>) -> usize {
    HEADER_BYTES + g.hint.len() + g.list.len()
}

/// The entry bytes of the guesses of `bytes` on runners below `runners` (for a rewrite).
pub(super) fn kept(bytes: &[u8], runners: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for g in iter(bytes, runners) {
        push_entry(&mut out, &g);
    }
    out
}

/// Adds the guess that `hint` is listed on `runner`, whose list is now `list`, at `at_us`, to
/// `bytes` (laid out for `runners` runners first), dropping the oldest entries past
/// [`MAX_GUESSES`] or [`MAX_GUESS_BYTES`]. Returns its number, or `None` (value unchanged)
/// when `runner` is not below `runners` or the entry alone would not fit.
pub fn add(
    bytes: &mut Vec<u8>,
    runners: usize,
    runner: u32,
    at_us: u64,
    hint: &[u8],
    list: &[u8],
) -> Option<u32> {
    if runner as usize >= runners || hint.len() > usize::from(u16::MAX) || list.len() > usize::from(u16::MAX)
    {
        return None;
    }
    let mut g = Guess { seq: 0, runner, at_us, hint, list };
    if entry_len(&g) > MAX_GUESS_BYTES {
        return None;
    }
    normalize(bytes, runners);
    g.seq = newest_seq(bytes).wrapping_add(1).max(1);
    let old: Vec<Guess<'_>> = all(bytes).collect();
    let mut total = entry_len(&g);
    let mut keep_from = old.len();
    while keep_from > 0 && old.len() - keep_from < MAX_GUESSES - 1 {
        let Some(e) = old.get(keep_from - 1) else { break };
        if total + entry_len(e) > MAX_GUESS_BYTES {
            break;
        }
        total += entry_len(e);
        keep_from -= 1;
    }
    let mut section = Vec::with_capacity(total);
    for e in old.get(keep_from..).unwrap_or(&[]) {
        push_entry(&mut section, e);
    }
    push_entry(&mut section, &g);
    let mut counts = Vec::with_capacity(2 * runners);
    decode(bytes, 2 * runners, &mut counts);
    let rebuilt = assemble(&counts, pin_bytes(bytes), &section, g.seq);
    *bytes = rebuilt;
    Some(g.seq)
}

#[cfg(test)]
mod tests {
    use super::super::{add_pin, adjust_in_place, encode, pins};
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn hints(b: &[u8], runners: usize) -> Vec<(u32, u32, String, String)> {
        iter(b, runners)
            .map(|g| {
                let s = |x: &[u8]| String::from_utf8_lossy(x).into_owned();
                (g.seq, g.runner, s(g.hint), s(g.list))
            })
            .collect()
    }

    #[test]
    fn guesses_are_numbered_and_kept_beside_counters_and_pins() {
        let mut b = encode(&[0; 4]);
        assert_eq!(add(&mut b, 2, 1, 100, b"m", b"m,a"), Some(1));
        add_pin(&mut b, 2, 1, 7);
        adjust_in_place(&mut b, 2, 1, 1);
        assert_eq!(add(&mut b, 2, 0, 200, b"n", b"n"), Some(2));
        assert_eq!(add(&mut b, 2, 2, 300, b"x", b"x"), None, "no such runner");
        assert_eq!(hints(&b, 2), vec![(1, 1, "m".into(), "m,a".into()), (2, 0, "n".into(), "n".into())]);
        assert_eq!(hints(&b, 1), vec![(2, 0, "n".into(), "n".into())]);
        assert_eq!(newest_seq(&b), 2);
        assert_eq!(pins(&b, 2).count(), 1);
        let mut c = Vec::new();
        decode(&b, 4, &mut c);
        assert_eq!(c, vec![0, 1, 0, 0]);
        assert!(iter(&b, 2).all(|g| g.at_us == 100 || g.at_us == 200));
    }

    #[test]
    fn the_oldest_guesses_go_first() {
        let mut b = encode(&[0; 2]);
        for k in 0..40u64 {
            add(&mut b, 1, 0, k, format!("h{k}").as_bytes(), b"l");
        }
        let seen = hints(&b, 1);
        assert_eq!(seen.len(), MAX_GUESSES);
        assert_eq!(seen.first().map(|g| g.0), Some(40 - MAX_GUESSES as u32 + 1));
        assert_eq!(seen.last().map(|g| (g.0, g.2.clone())), Some((40, "h39".into())));
        // Long lists: the byte budget holds fewer.
        let long = vec![b'x'; MAX_GUESS_BYTES / 3];
        for _ in 0..4 {
            assert!(add(&mut b, 1, 0, 1, b"h", &long).is_some());
        }
        assert_eq!(iter(&b, 1).count(), 2);
        assert!(sections(&b).guesses.len() <= MAX_GUESS_BYTES);
        assert_eq!(add(&mut b, 1, 0, 1, b"h", &vec![b'x'; MAX_GUESS_BYTES]), None, "too big alone");
        assert_eq!(iter(&b, 1).count(), 2, "unchanged");
    }

    #[test]
    fn a_torn_entry_ends_the_section() {
        let mut b = encode(&[0; 2]);
        add(&mut b, 1, 0, 1, b"a", b"a");
        add(&mut b, 1, 0, 2, b"b", b"b");
        // Claim a longer list in the second entry than the section holds.
        let s = sections(&b);
        let second = s.guesses.start + HEADER_BYTES + 2;
        b[second + 18] = 200;
        assert_eq!(hints(&b, 1).len(), 1);
        assert_eq!(add(&mut b, 1, 0, 3, b"c", b"c"), Some(3), "numbered after the newest");
        assert_eq!(hints(&b, 1).iter().map(|g| g.2.as_str()).collect::<Vec<_>>(), vec!["a", "c"]);
    }

    #[test]
    fn numbers_wrap_and_skip_zero() {
        let g = Guess { seq: u32::MAX, runner: 0, at_us: 0, hint: b"a", list: b"a" };
        let mut section = Vec::new();
        push_entry(&mut section, &g);
        let mut b = assemble(&[0, 0], &[], &section, u32::MAX);
        assert_eq!(add(&mut b, 1, 0, 1, b"b", b"b"), Some(1));
    }
}
