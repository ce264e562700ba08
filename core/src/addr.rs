//! Runner addresses in one spelling.
//!
//! The same runner can be written many ways (`[::1]:8000`, `[0:0:0:0:0:0:0:1]:8000`,
//! `10.0.0.1:08000`), and Envoy names an upstream in its own canonical form. Every address
//! is normalised once where it enters (config, `/hints` identity, response learning), so
//! comparisons are plain string equality on [`canonical`] forms.

use std::net::SocketAddr;

/// The canonical `ip:port` form of `s` (Rust's `SocketAddr` display: RFC 5952 for IPv6,
/// the port without leading zeros), or `None` when `s` is not a socket address.
pub fn canonical(s: &str) -> Option<String> {
    s.parse::<SocketAddr>().ok().map(|a| a.to_string())
}

/// [`canonical`] for raw bytes (a header or property value); `None` for non-UTF-8.
pub fn canonical_bytes(b: &[u8]) -> Option<String> {
    std::str::from_utf8(b).ok().and_then(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn spellings_of_one_address_agree() {
        for (a, b) in [
            ("[::1]:8000", "[0:0:0:0:0:0:0:1]:8000"),
            ("[::1]:8000", "[0000:0000::0001]:8000"),
            ("[2001:db8::1]:80", "[2001:DB8:0:0:0:0:0:1]:80"),
            ("10.0.0.1:8000", "10.0.0.1:08000"),
        ] {
            assert_eq!(canonical(a), canonical(b), "{a} vs {b}");
            assert!(canonical(a).is_some());
        }
        assert_eq!(canonical("[0:0:0:0:0:0:0:1]:08000").as_deref(), Some("[::1]:8000"));
        assert_eq!(canonical("127.0.0.1:18081").as_deref(), Some("127.0.0.1:18081"));
        assert_ne!(canonical("10.0.0.1:8000"), canonical("10.0.0.1:8001"));
    }

    #[test]
    fn non_addresses_are_none() {
        for bad in [
            "",
            "10.0.0.1",
            "10.0.0.1:",
            "10.0.0.1:65536",
            "::1:80",
            "host:80",
            " 10.0.0.1:80",
            "010.0.0.1:80",
        ] {
            assert_eq!(canonical(bad), None, "{bad:?}");
        }
        assert_eq!(canonical_bytes(b"\xff:80"), None);
        assert_eq!(canonical_bytes(b"127.0.0.1:80").as_deref(), Some("127.0.0.1:80"));
    }
}
