//! Client hint classification and runner hint-list parsing.
//!
//! Header values arrive as raw bytes (Envoy passes non-UTF-8 through); nothing here assumes
//! UTF-8 or a bounded length.

use rustc_hash::FxBuildHasher;
use std::collections::HashSet;

/// What a request's hint header amounts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HintClass<'a> {
    /// No header, or an empty value: route without a hint.
    Absent,
    /// A usable hint.
    Valid(&'a str),
    /// A value that is too long or has bytes outside the allowed set; routed as if absent
    /// and counted.
    Invalid(InvalidHint),
}

/// Why a hint was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidHint {
    /// Longer than the configured `max_hint_bytes`.
    TooLong,
    /// A byte outside visible ASCII (0x21..=0x7E), or a comma.
    BadByte,
}

/// True for bytes a hint may contain: visible ASCII except the list separator `,`.
pub fn is_hint_byte(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && b != b','
}

/// Classifies a hint value. Leading and trailing spaces/tabs are ignored.
pub fn classify(value: Option<&[u8]>, max_bytes: usize) -> HintClass<'_> {
    let Some(raw) = value else {
        return HintClass::Absent;
    };
    let v = trim_ows(raw);
    if v.is_empty() {
        return HintClass::Absent;
    }
    if v.len() > max_bytes {
        return HintClass::Invalid(InvalidHint::TooLong);
    }
    if !v.iter().all(|&b| is_hint_byte(b)) {
        return HintClass::Invalid(InvalidHint::BadByte);
    }
    // All bytes are ASCII, so this cannot fail; map the impossible error to Invalid anyway.
    match std::str::from_utf8(v) {
        Ok(s) => HintClass::Valid(s),
        Err(_) => HintClass::Invalid(InvalidHint::BadByte),
    }
}

/// Result of parsing a runner's hint list (header value or `/hints` entries).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HintList {
    /// Valid, de-duplicated hints in the order given, at most the cap.
    pub hints: Vec<String>,
    /// Entries dropped for bad bytes or length.
    pub invalid: usize,
    /// Valid entries dropped because the cap was reached.
    pub truncated: usize,
}

/// Parses a comma-separated `x-fal-runner-hints` value (`a, b,c`). Empty input means an empty
/// list (the runner holds nothing), which differs from an absent header (nothing known).
///
/// Linear in the input: duplicates are found with a hash set of the entries seen (borrowed
/// from the input), so a hostile list of 100,000 entries costs 100,000 lookups, not
/// 100,000 x `cap` comparisons.
///
/// Each entry is classified, invalid ones are dropped (counted), repeats are dropped, the
/// first `cap` distinct ones are kept and distinct valid entries past the cap are counted
/// as truncated. (A `/hints` body's list follows the same rules, streamed:
/// [`crate::report`].)
pub fn parse_hint_list(value: &[u8], max_hint_bytes: usize, cap: usize) -> HintList {
    let mut out = HintList::default();
    let mut seen: HashSet<&[u8], FxBuildHasher> = HashSet::default();
    for item in value.split(|&b| b == b',') {
        let h = match classify(Some(item), max_hint_bytes) {
            HintClass::Absent => continue,
            HintClass::Invalid(_) => {
                out.invalid += 1;
                continue;
            }
            HintClass::Valid(h) => h,
        };
        let distinct = seen.insert(h.as_bytes());
        if !distinct {
            continue;
        }
        if out.hints.len() >= cap {
            out.truncated += 1;
        } else {
            out.hints.push(h.to_string());
        }
    }
    out
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = v {
        if *first == b' ' || *first == b'\t' {
            v = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = v {
        if *last == b' ' || *last == b'\t' {
            v = rest;
        } else {
            break;
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn classify_covers_every_outcome() {
        assert_eq!(classify(None, 8), HintClass::Absent);
        assert_eq!(classify(Some(b""), 8), HintClass::Absent);
        assert_eq!(classify(Some(b"  \t "), 8), HintClass::Absent);
        assert_eq!(classify(Some(b" model-a "), 16), HintClass::Valid("model-a"));
        assert_eq!(classify(Some(b"org/model:v1@x"), 16), HintClass::Valid("org/model:v1@x"));
        assert_eq!(classify(Some(b"123456789"), 8), HintClass::Invalid(InvalidHint::TooLong));
        assert_eq!(classify(Some(b"a,b"), 8), HintClass::Invalid(InvalidHint::BadByte));
        assert_eq!(classify(Some(b"a b"), 8), HintClass::Invalid(InvalidHint::BadByte));
        assert_eq!(classify(Some(b"a\x00b"), 8), HintClass::Invalid(InvalidHint::BadByte));
        assert_eq!(classify(Some(b"a\r\nb"), 8), HintClass::Invalid(InvalidHint::BadByte));
        assert_eq!(classify(Some(b"\xff\xfe"), 8), HintClass::Invalid(InvalidHint::BadByte));
        assert_eq!(classify(Some("caf\u{e9}".as_bytes()), 8), HintClass::Invalid(InvalidHint::BadByte));
    }

    #[test]
    fn huge_value_is_rejected_without_scanning_content() {
        let big = vec![b'a'; 60 * 1024];
        assert_eq!(classify(Some(&big), 256), HintClass::Invalid(InvalidHint::TooLong));
    }

    #[test]
    fn parse_list_trims_dedups_drops_and_caps() {
        let l = parse_hint_list(b" a, b,,a,\xff, c ,d", 8, 3);
        assert_eq!(l.hints, vec!["a", "b", "c"]);
        assert_eq!(l.invalid, 1);
        assert_eq!(l.truncated, 1);
        assert_eq!(parse_hint_list(b"", 8, 3), HintList::default());
    }

    #[test]
    fn large_lists_dedup_exactly() {
        // 60,000 distinct hints, each listed twice, under a cap of 100,000 (the most a config
        // allows): every distinct one kept once, in first-seen order. The old nested scan took
        // 3.1 s per poll on this input; the hash set makes it linear.
        let items: Vec<String> = (0..120_000).map(|i| format!("m{}", i % 60_000)).collect();
        let l = parse_hint_list(items.join(",").as_bytes(), 256, 100_000);
        assert_eq!(l.hints.len(), 60_000);
        assert_eq!((l.hints[0].as_str(), l.hints[59_999].as_str()), ("m0", "m59999"));
        assert_eq!((l.invalid, l.truncated), (0, 0));
        // Past the cap, distinct entries count as truncated and repeats count as nothing.
        let l = parse_hint_list(items.join(",").as_bytes(), 256, 10);
        assert_eq!((l.hints.len(), l.truncated), (10, 59_990));
    }
}
