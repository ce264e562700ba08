//! The cross-worker in-flight value: one shared-data value that every worker of an Envoy reads
//! on each request and updates with compare-and-swap. It holds, for `n` runners in table
//! order:
//!
//! * `2n` little-endian `u32` counters: the requests in flight to each runner, then those of
//!   them routed to wait for a model load;
//! * the **pins**: one 16-byte entry (runner `u32`, count `u32`, model hash `u64`) per model a
//!   request is using on a runner, in (runner, hash) order. Without them a worker only knew the models its own
//!   requests use, and made room for a miss by evicting a model another worker's request was
//!   using (runner-example never evicts a model in use: the load then waits for a slot);
//! * the **guesses** ([`guesses`]): the last few misses' listings (a model listed on the runner
//!   a miss went to), so that the other workers send that model's next requests to the same
//!   load at once instead of waiting for the poller's next publication;
//! * a trailer: the counter count, the guesses' length in bytes and the newest guess's number
//!   (`u32` each), and [`MAGIC`].
//!
//! Pins and guesses are advisory: a value whose layout does not check out (torn, or written
//! for another number of runners) keeps its whole counters and only loses the pins and guesses
//! that no longer fit, and the poller clears a runner's pins when it finds nothing of this
//! Envoy's in flight there.

pub mod guesses;

use std::ops::Range;

/// Last four bytes of a value laid out as above ("PIN3", little-endian).
pub const MAGIC: u32 = u32::from_le_bytes(*b"PIN3");
/// Bytes of one pin entry.
pub(crate) const PIN_BYTES: usize = 16;
/// Bytes of the trailer (counter count, guess bytes, newest guess, [`MAGIC`]).
const TRAILER_BYTES: usize = 16;
/// Most pin entries a value holds (64 KiB of them): past it a request's pin stays with its
/// own worker only.
pub const MAX_SHARED_PINS: usize = 4096;

/// One pin: requests using the model with `hash` on runner `runner`, `count` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin {
    pub runner: u32,
    pub hash: u64,
    pub count: u32,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4).and_then(|s| <[u8; 4]>::try_from(s).ok()).map(u32::from_le_bytes)
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8).and_then(|s| <[u8; 8]>::try_from(s).ok()).map(u64::from_le_bytes)
}

/// Where each part of a value lies.
struct Sections {
    counters: Range<usize>,
    pins: Range<usize>,
    guesses: Range<usize>,
    /// The newest guess's number (0 without a trailer).
    newest_guess: u32,
    /// The trailer checked out: this is the layout above.
    laid_out: bool,
}

/// The parts of `bytes`: the whole layout when its trailer checks out, else every whole
/// `u32` as a counter and no pins or guesses.
fn sections(bytes: &[u8]) -> Sections {
    let len = bytes.len();
    let layout = len.checked_sub(TRAILER_BYTES).and_then(|body| {
        (u32_at(bytes, len - 4)? == MAGIC).then_some(())?;
        let counters = usize::try_from(u32_at(bytes, body)?).ok()?.checked_mul(4)?;
        let guesses = usize::try_from(u32_at(bytes, body + 4)?).ok()?;
        let pins_end = body.checked_sub(guesses)?;
        let pins = pins_end.checked_sub(counters)?;
        (pins % PIN_BYTES == 0).then_some(Sections {
            counters: 0..counters,
            pins: counters..pins_end,
            guesses: pins_end..body,
            newest_guess: u32_at(bytes, body + 8)?,
            laid_out: true,
        })
    });
    layout.unwrap_or(Sections {
        counters: 0..len / 4 * 4,
        pins: 0..0,
        guesses: 0..0,
        newest_guess: 0,
        laid_out: false,
    })
}

/// `bytes[range]`, or nothing.
fn part(bytes: &[u8], range: Range<usize>) -> &[u8] {
    bytes.get(range).unwrap_or(&[])
}

/// The pin entry at byte offset `at` of `pins`.
pub(crate) fn pin_at(pins: &[u8], at: usize) -> Option<Pin> {
    Some(Pin { runner: u32_at(pins, at)?, count: u32_at(pins, at + 4)?, hash: u64_at(pins, at + 8)? })
}

/// Decodes the counters of `bytes` into `out` (cleared first), `n` of them: missing ones are 0.
pub fn decode(bytes: &[u8], n: usize, out: &mut Vec<u32>) {
    let counters = part(bytes, sections(bytes).counters);
    out.clear();
    out.extend((0..n.min(counters.len() / 4)).map(|i| u32_at(counters, i * 4).unwrap_or(0)));
    out.resize(n, 0);
}

/// The pins of `bytes` on runners below `runners`.
pub fn pins(bytes: &[u8], runners: usize) -> impl Iterator<Item = Pin> + '_ {
    let pins = part(bytes, sections(bytes).pins);
    (0..pins.len() / PIN_BYTES)
        .filter_map(move |i| pin_at(pins, i * PIN_BYTES))
        .filter(move |p| (p.runner as usize) < runners && p.count > 0)
}

/// The pin bytes of `bytes` (to tell whether they changed since last read).
pub fn pin_bytes(bytes: &[u8]) -> &[u8] {
    part(bytes, sections(bytes).pins)
}

/// A value of `counts`, `pins` (entry bytes) and `guesses` (entry bytes, the newest numbered
/// `newest_guess`).
fn assemble(counts: &[u32], pins: &[u8], guesses: &[u8], newest_guess: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(counts.len() * 4 + pins.len() + guesses.len() + TRAILER_BYTES);
    out.extend(counts.iter().flat_map(|c| c.to_le_bytes()));
    out.extend_from_slice(pins);
    out.extend_from_slice(guesses);
    out.extend_from_slice(&(counts.len() as u32).to_le_bytes());
    out.extend_from_slice(&(guesses.len() as u32).to_le_bytes());
    out.extend_from_slice(&newest_guess.to_le_bytes());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out
}

/// Encodes counters with no pins or guesses.
pub fn encode(counts: &[u32]) -> Vec<u8> {
    assemble(counts, &[], &[], 0)
}

/// Encodes `counts` (`2 * runners` of them) and keeps the guesses of `old` and its pins on
/// runners below `runners` that still count requests in flight: a runner with none in
/// flight has nothing in use (this is how the poller's corrections clear pins a lost request
/// left behind).
pub fn encode_keeping(counts: &[u32], old: &[u8], runners: usize) -> Vec<u8> {
    let busy = |p: &Pin| counts.get(p.runner as usize).is_some_and(|&c| c > 0);
    let kept: Vec<u8> = pins(old, runners).filter(busy).flat_map(entry_bytes).collect();
    assemble(counts, &kept, &guesses::kept(old, runners), sections(old).newest_guess)
}

fn entry_bytes(p: Pin) -> [u8; PIN_BYTES] {
    let mut e = [0u8; PIN_BYTES];
    e[..4].copy_from_slice(&p.runner.to_le_bytes());
    e[4..8].copy_from_slice(&p.count.to_le_bytes());
    e[8..].copy_from_slice(&p.hash.to_le_bytes());
    e
}

/// Puts `bytes` in the layout for `runners` runners (`2 * runners` counters), in place: a
/// value already in it is untouched; otherwise counters are cut or padded with zeros and only
/// the pins and guesses on runners below `runners` are kept.
fn normalize(bytes: &mut Vec<u8>, runners: usize) {
    let n = 2 * runners;
    let s = sections(bytes);
    if s.laid_out && s.counters.len() == n * 4 {
        return;
    }
    let mut counts = Vec::with_capacity(n);
    decode(bytes, n, &mut counts);
    let kept: Vec<u8> = pins(bytes, runners).flat_map(entry_bytes).collect();
    *bytes = assemble(&counts, &kept, &guesses::kept(bytes, runners), s.newest_guess);
}

/// Moves counter `idx` (of `2 * runners`) of `bytes` by `delta`, saturating at 0 and
/// `u32::MAX`, in place and keeping the pins; `bytes` is first put in the layout for
/// `runners` runners. An index past the counters changes nothing else.
pub fn adjust_in_place(bytes: &mut Vec<u8>, runners: usize, idx: u32, delta: i32) {
    normalize(bytes, runners);
    let i = idx as usize * 4;
    if idx as usize >= 2 * runners {
        return;
    }
    if let Some(slot) = bytes.get_mut(i..i + 4) {
        let c = <[u8; 4]>::try_from(&*slot).map(u32::from_le_bytes).unwrap_or(0);
        let c = if delta >= 0 {
            c.saturating_add(delta.unsigned_abs())
        } else {
            c.saturating_sub(delta.unsigned_abs())
        };
        slot.copy_from_slice(&c.to_le_bytes());
    }
}

/// Byte range of `bytes`' pin entries (after [`normalize`]).
fn pin_range(bytes: &[u8]) -> Range<usize> {
    sections(bytes).pins
}

/// The number of leading entries of `pins` (pin entry bytes) for which `pred` holds, when it
/// holds for a prefix of them and not after (a binary search, as `slice::partition_point`).
pub(crate) fn partition_pins(pins: &[u8], pred: impl Fn(Pin) -> bool) -> usize {
    let (mut lo, mut hi) = (0, pins.len() / PIN_BYTES);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pin_at(pins, mid * PIN_BYTES).is_some_and(&pred) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Where the entry for (`runner`, `hash`) is in `bytes` (after [`normalize`]): `Ok` with its
/// offset, or `Err` with the offset it would be inserted at to keep the (runner, hash) order.
fn find_pin(bytes: &[u8], runner: u32, hash: u64) -> Result<usize, usize> {
    let range = pin_range(bytes);
    let pins = part(bytes, range.clone());
    let i = partition_pins(pins, |p| (p.runner, p.hash) < (runner, hash));
    let at = range.start + i * PIN_BYTES;
    match pin_at(pins, i * PIN_BYTES) {
        Some(p) if (p.runner, p.hash) == (runner, hash) => Ok(at),
        _ => Err(at),
    }
}

/// Counts one more request using model `hash` on `runner` in `bytes` (laid out for `runners`
/// runners first). False, with the value unchanged, when `runner` is not below `runners` or
/// the value holds [`MAX_SHARED_PINS`] entries already and none for this pair.
pub fn add_pin(bytes: &mut Vec<u8>, runners: usize, runner: u32, hash: u64) -> bool {
    if runner as usize >= runners {
        return false;
    }
    normalize(bytes, runners);
    let insert_at = match find_pin(bytes, runner, hash) {
        Ok(at) => {
            let Some(c) = bytes.get_mut(at + 4..at + 8) else { return false };
            let n = <[u8; 4]>::try_from(&*c).map(u32::from_le_bytes).unwrap_or(0).saturating_add(1);
            c.copy_from_slice(&n.to_le_bytes());
            return true;
        }
        Err(at) => at,
    };
    if pin_range(bytes).len() / PIN_BYTES >= MAX_SHARED_PINS {
        return false;
    }
    let entry = entry_bytes(Pin { runner, hash, count: 1 });
    bytes.splice(insert_at..insert_at, entry);
    true
}

/// Releases one request's pin of model `hash` on `runner` (one that [`add_pin`] counted): the
/// entry goes when its count reaches 0. A pin not in the value (cleared by the poller, or
/// dropped with a change of runners) changes nothing.
pub fn remove_pin(bytes: &mut Vec<u8>, runners: usize, runner: u32, hash: u64) {
    normalize(bytes, runners);
    let Ok(at) = find_pin(bytes, runner, hash) else { return };
    let count = u32_at(bytes, at + 4).unwrap_or(0);
    if count > 1 {
        if let Some(c) = bytes.get_mut(at + 4..at + 8) {
            c.copy_from_slice(&(count - 1).to_le_bytes());
        }
    } else {
        bytes.drain(at..at + PIN_BYTES);
    }
}

/// Drops every pin on `runner` (the poller found nothing of this Envoy in flight there, or
/// the slot went to a new runner). Returns whether any went.
pub fn clear_pins(bytes: &mut Vec<u8>, runners: usize, runner: u32) -> bool {
    normalize(bytes, runners);
    let range = pin_range(bytes);
    let kept: Vec<u8> = range
        .clone()
        .step_by(PIN_BYTES)
        .filter_map(|at| pin_at(bytes, at))
        .filter(|p| p.runner != runner)
        .flat_map(entry_bytes)
        .collect();
    let dropped = kept.len() != range.len();
    bytes.splice(range, kept);
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn counters(b: &[u8], n: usize) -> Vec<u32> {
        let mut out = Vec::new();
        decode(b, n, &mut out);
        out
    }

    fn all_pins(b: &[u8], runners: usize) -> Vec<(u32, u64, u32)> {
        pins(b, runners).map(|p| (p.runner, p.hash, p.count)).collect()
    }

    #[test]
    fn counters_adjust_and_decode() {
        let mut b = Vec::new();
        adjust_in_place(&mut b, 2, 1, 1);
        adjust_in_place(&mut b, 2, 1, 1);
        adjust_in_place(&mut b, 2, 2, -1); // saturates at 0
        assert_eq!(counters(&b, 4), vec![0, 2, 0, 0]);
        assert_eq!(counters(&b, 6), vec![0, 2, 0, 0, 0, 0]);
        let before = b.clone();
        adjust_in_place(&mut b, 2, 99, 1); // unknown index: unchanged
        assert_eq!(b, before);
        adjust_in_place(&mut b, 2, 0, i32::MIN);
        adjust_in_place(&mut b, 2, 3, i32::MAX);
        adjust_in_place(&mut b, 2, 3, i32::MAX);
        adjust_in_place(&mut b, 2, 3, i32::MAX);
        assert_eq!(counters(&b, 4), vec![0, 2, 0, u32::MAX]);
    }

    #[test]
    fn a_value_without_trailer_reads_as_counters() {
        // A torn or foreign value: whole u32s are counters, a partial one reads as 0, no pins.
        let raw: Vec<u8> = [1u32, 2, 3].iter().flat_map(|c| c.to_le_bytes()).chain([9, 9]).collect();
        assert_eq!(counters(&raw, 4), vec![1, 2, 3, 0]);
        assert!(all_pins(&raw, 2).is_empty());
        let mut v = raw.clone();
        adjust_in_place(&mut v, 2, 3, 1);
        assert_eq!(counters(&v, 4), vec![1, 2, 3, 1]);
        assert_eq!(sections(&v).counters.len(), 16, "rewritten in the layout for 2 runners");
    }

    #[test]
    fn pins_count_and_release() {
        let mut b = encode(&[0; 6]);
        assert!(add_pin(&mut b, 3, 1, 0xAA));
        assert!(add_pin(&mut b, 3, 1, 0xAA));
        assert!(add_pin(&mut b, 3, 2, 0xBB));
        assert!(!add_pin(&mut b, 3, 3, 0xCC), "no such runner");
        adjust_in_place(&mut b, 3, 1, 2);
        assert_eq!(all_pins(&b, 3), vec![(1, 0xAA, 2), (2, 0xBB, 1)]);
        assert_eq!(counters(&b, 6), vec![0, 2, 0, 0, 0, 0], "counters kept beside pins");
        remove_pin(&mut b, 3, 1, 0xAA);
        assert_eq!(all_pins(&b, 3), vec![(1, 0xAA, 1), (2, 0xBB, 1)]);
        remove_pin(&mut b, 3, 1, 0xAA);
        remove_pin(&mut b, 3, 1, 0xAA); // already gone: nothing
        remove_pin(&mut b, 3, 0, 0xBB); // never there: nothing
        assert_eq!(all_pins(&b, 3), vec![(2, 0xBB, 1)]);
        assert!(clear_pins(&mut b, 3, 2));
        assert!(all_pins(&b, 3).is_empty());
        assert!(!clear_pins(&mut b, 3, 2));
        assert_eq!(b, encode(&[0, 2, 0, 0, 0, 0]), "back to counters and trailer");
    }

    #[test]
    fn a_change_of_runners_keeps_the_pins_that_still_fit() {
        let mut b = encode(&[5, 6, 7, 8, 1, 2, 3, 4]);
        add_pin(&mut b, 4, 0, 1);
        add_pin(&mut b, 4, 3, 2);
        // Read for 2 runners: runner 3's pin is out of range.
        assert_eq!(all_pins(&b, 2), vec![(0, 1, 1)]);
        adjust_in_place(&mut b, 2, 0, 1);
        assert_eq!(counters(&b, 4), vec![6, 6, 7, 8]);
        assert_eq!(all_pins(&b, 8), vec![(0, 1, 1)], "the dropped pin is gone for good");
        // And back up to 3 runners: zeros appended.
        add_pin(&mut b, 3, 2, 9);
        assert_eq!(counters(&b, 6), vec![6, 6, 7, 8, 0, 0]);
        assert_eq!(all_pins(&b, 3), vec![(0, 1, 1), (2, 9, 1)]);
    }

    #[test]
    fn pins_match_a_model_and_stay_in_order() {
        // Random adds and removes against a map of (runner, hash) -> count.
        let mut model = std::collections::BTreeMap::new();
        let mut b = encode(&[0; 8]);
        let mut x = 7u64;
        for _ in 0..2000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let (runner, hash) = ((x >> 33) as u32 % 4, (x >> 40) % 6);
            if x >> 63 == 0 {
                assert!(add_pin(&mut b, 4, runner, hash));
                *model.entry((runner, hash)).or_insert(0u32) += 1;
            } else {
                remove_pin(&mut b, 4, runner, hash);
                if let Some(c) = model.get_mut(&(runner, hash)) {
                    *c -= 1;
                    if *c == 0 {
                        model.remove(&(runner, hash));
                    }
                }
            }
            let want: Vec<_> = model.iter().map(|(&(r, h), &c)| (r, h, c)).collect();
            assert_eq!(all_pins(&b, 4), want);
        }
    }

    #[test]
    fn pins_are_capped() {
        let mut b = encode(&[0; 2]);
        for h in 0..MAX_SHARED_PINS as u64 {
            assert!(add_pin(&mut b, 1, 0, h));
        }
        assert!(!add_pin(&mut b, 1, 0, u64::MAX), "a new pair past the cap");
        assert!(add_pin(&mut b, 1, 0, 7), "an existing pair still counts");
        assert_eq!(b.len(), 8 + MAX_SHARED_PINS * PIN_BYTES + TRAILER_BYTES);
    }

    #[test]
    fn hostile_values_never_panic_and_keep_a_layout() {
        // Every prefix of a valid value, and values with lying trailers.
        let mut full = encode(&[1, 2, 3, 4]);
        add_pin(&mut full, 2, 1, 42);
        guesses::add(&mut full, 2, 1, 5, b"m", b"m,n");
        let mut lies = Vec::new();
        for field in [16, 12, 8] {
            for c in [0u32, 1, 3, 4, 5, 16, 20, 1000, u32::MAX] {
                let mut v = full.clone();
                let at = v.len() - field;
                v[at..at + 4].copy_from_slice(&c.to_le_bytes());
                lies.push(v);
            }
        }
        for v in (0..=full.len()).map(|l| full[..l].to_vec()).chain(lies) {
            for runners in 0..4 {
                let mut w = v.clone();
                adjust_in_place(&mut w, runners, 0, 1);
                add_pin(&mut w, runners, 0, 5);
                remove_pin(&mut w, runners, 1, 42);
                clear_pins(&mut w, runners, 1);
                guesses::add(&mut w, runners, 0, 9, b"h", b"h");
                let s = sections(&w);
                assert!(s.laid_out);
                assert_eq!(s.counters.len(), runners * 8, "len {} runners {runners}", v.len());
                assert_eq!(w.len(), s.counters.len() + s.pins.len() + s.guesses.len() + TRAILER_BYTES);
                assert!(pins(&w, runners).all(|p| (p.runner as usize) < runners));
                assert!(guesses::iter(&w, runners).all(|g| (g.runner as usize) < runners));
            }
        }
    }

    #[test]
    fn encode_keeping_rewrites_counters_only() {
        let mut b = encode(&[1, 1, 0, 0]);
        add_pin(&mut b, 2, 1, 3);
        add_pin(&mut b, 2, 0, 4);
        guesses::add(&mut b, 2, 0, 1, b"g", b"g");
        let c = encode_keeping(&[9, 9, 9, 9], &b, 2);
        assert_eq!(guesses::iter(&c, 2).count(), 1);
        assert_eq!(counters(&c, 4), vec![9, 9, 9, 9]);
        assert_eq!(all_pins(&c, 2), vec![(0, 4, 1), (1, 3, 1)], "in (runner, hash) order");
        assert_eq!(pin_bytes(&c), pin_bytes(&b));
        // Runner 0 has nothing in flight any more: nothing is in use there either.
        let d = encode_keeping(&[0, 1, 0, 0], &b, 2);
        assert_eq!(all_pins(&d, 2), vec![(1, 3, 1)]);
    }
}
