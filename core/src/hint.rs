//! Client hint classification and runner hint-list parsing.
//!
//! Header values arrive as raw bytes (Envoy passes non-UTF-8 through); nothing here assumes
//! UTF-8 or a bounded length.

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
pub fn parse_hint_list(value: &[u8], max_hint_bytes: usize, cap: usize) -> HintList {
    let mut out = HintList::default();
    for item in value.split(|&b| b == b',') {
        push_hint(&mut out, item, max_hint_bytes, cap);
    }
    out
}

/// Sanitises a list of hints from a `/hints` body with the same rules as the header.
pub fn sanitize_hints<S: AsRef<str>>(items: &[S], max_hint_bytes: usize, cap: usize) -> HintList {
    let mut out = HintList::default();
    for item in items {
        push_hint(&mut out, item.as_ref().as_bytes(), max_hint_bytes, cap);
    }
    out
}

fn push_hint(out: &mut HintList, item: &[u8], max_hint_bytes: usize, cap: usize) {
    match classify(Some(item), max_hint_bytes) {
        HintClass::Absent => {}
        HintClass::Invalid(_) => out.invalid += 1,
        HintClass::Valid(h) => {
            if out.hints.iter().any(|x| x == h) {
                return;
            }
            if out.hints.len() >= cap {
                out.truncated += 1;
            } else {
                out.hints.push(h.to_string());
            }
        }
    }
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
    fn sanitize_uses_same_rules() {
        let l = sanitize_hints(&["ok", "not ok", "x".repeat(300).as_str(), "ok"], 256, 10);
        assert_eq!(l.hints, vec!["ok"]);
        assert_eq!(l.invalid, 2);
    }
}
