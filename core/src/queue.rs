//! fal's queue, routed by hint (docs/queue.md): runner tokens, request ids, and the reading of
//! a queue listener's request path.
//!
//! A queue-capable runner reports a random `queue_token` (16 lowercase hex digits) in `/hints`
//! and issues request ids `<token>-<32 lowercase hex digits>`. The filter never trusts an id:
//! it accepts exactly that shape, and maps the token to a runner only through the table the
//! poller built from the runners' own reports.

/// Length of a runner's queue token in hex digits.
pub const TOKEN_HEX: usize = 16;
/// Length of the random part of a request id in hex digits (128 bits).
pub const SECRET_HEX: usize = 32;
/// Length of a whole request id: token, `-`, secret.
pub const REQUEST_ID_LEN: usize = TOKEN_HEX + 1 + SECRET_HEX;

fn lower_hex_value(b: u8) -> Option<u64> {
    match b {
        b'0'..=b'9' => Some(u64::from(b - b'0')),
        b'a'..=b'f' => Some(u64::from(b - b'a' + 10)),
        _ => None,
    }
}

/// Parses a queue token: exactly [`TOKEN_HEX`] lowercase hex digits, not all zero (0 means
/// "no token" in the table).
pub fn parse_token(s: &[u8]) -> Option<u64> {
    if s.len() != TOKEN_HEX {
        return None;
    }
    let mut v = 0u64;
    for &b in s {
        v = (v << 4) | lower_hex_value(b)?;
    }
    (v != 0).then_some(v)
}

/// Formats a queue token as [`parse_token`] reads it.
pub fn format_token(token: u64) -> String {
    format!("{token:016x}")
}

/// Formats a request id from a runner's token and 128 random bits.
pub fn format_request_id(token: u64, secret: u128) -> String {
    format!("{token:016x}-{secret:032x}")
}

/// The token of a well-formed request id; `None` for anything else.
pub fn request_id_token(id: &[u8]) -> Option<u64> {
    if id.len() != REQUEST_ID_LEN || id.get(TOKEN_HEX) != Some(&b'-') {
        return None;
    }
    let secret = id.get(TOKEN_HEX + 1..)?;
    if !secret.iter().all(|&b| lower_hex_value(b).is_some()) {
        return None;
    }
    parse_token(id.get(..TOKEN_HEX)?)
}

/// What a job call asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOp {
    /// `GET .../requests/<id>`: the result.
    Result,
    /// `GET .../requests/<id>/status`.
    Status,
    /// `PUT .../requests/<id>/cancel`.
    Cancel,
}

/// A request on the queue listener, by its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueuePath {
    /// Anything that is not a job call: a submission, routed by its hint.
    Submit,
    /// `/<owner>/<alias>/requests/<id>[/status|/cancel]` with a well-formed id.
    Job {
        /// The token of the runner that issued the id.
        token: u64,
        /// What is asked.
        op: JobOp,
    },
    /// A job call whose id is not one a runner issues.
    MalformedId,
}

/// Classifies a queue listener's `:path` (query string allowed). A job call is exactly
/// `/<owner>/<alias>/requests/<id>` with an optional `/status` or `/cancel` and an optional
/// trailing `/`, as fal_client builds them; every other path is a submission.
pub fn classify_path(path: &[u8]) -> QueuePath {
    let path = match path.iter().position(|&b| b == b'?' || b == b'#') {
        Some(end) => path.get(..end).unwrap_or(path),
        None => path,
    };
    let Some(rest) = path.strip_prefix(b"/") else { return QueuePath::Submit };
    let rest = rest.strip_suffix(b"/").unwrap_or(rest);
    let mut segments = rest.split(|&b| b == b'/');
    let (Some(owner), Some(alias), Some(requests)) = (segments.next(), segments.next(), segments.next())
    else {
        return QueuePath::Submit;
    };
    if owner.is_empty() || alias.is_empty() || requests != b"requests" {
        return QueuePath::Submit;
    }
    let Some(id) = segments.next() else { return QueuePath::Submit };
    let op = match (segments.next(), segments.next()) {
        (None, _) => JobOp::Result,
        (Some(b"status"), None) => JobOp::Status,
        (Some(b"cancel"), None) => JobOp::Cancel,
        // `/requests/<id>/<other>`: no such call; an id cannot be trusted either way.
        _ => return QueuePath::MalformedId,
    };
    match request_id_token(id) {
        Some(token) => QueuePath::Job { token, op },
        None => QueuePath::MalformedId,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const ID: &str = "00000000000000ab-0123456789abcdef0123456789abcdef";

    #[test]
    fn tokens_round_trip_and_reject_other_shapes() {
        assert_eq!(parse_token(format_token(0xab).as_bytes()), Some(0xab));
        assert_eq!(parse_token(format_token(u64::MAX).as_bytes()), Some(u64::MAX));
        assert_eq!(parse_token(b"0000000000000000"), None, "zero means no token");
        assert_eq!(parse_token(b"00000000000000AB"), None, "uppercase");
        assert_eq!(parse_token(b"00000000000000a"), None, "short");
        assert_eq!(parse_token(b"00000000000000abc"), None, "long");
        assert_eq!(parse_token(b"00000000000000ag"), None);
        assert_eq!(parse_token(b""), None);
    }

    #[test]
    fn request_ids() {
        let id = format_request_id(0xab, 0x0123456789abcdef0123456789abcdef);
        assert_eq!(id, ID);
        assert_eq!(request_id_token(id.as_bytes()), Some(0xab));
        assert_eq!(request_id_token(&id.as_bytes()[1..]), None);
        assert_eq!(request_id_token(format!("{id}0").as_bytes()), None);
        assert_eq!(request_id_token(ID.replace('-', "_").as_bytes()), None);
        assert_eq!(request_id_token(ID.replace('c', "C").as_bytes()), None);
        assert_eq!(request_id_token(ID.replace('f', "%").as_bytes()), None);
        assert_eq!(request_id_token(b"0000000000000000-0123456789abcdef0123456789abcdef"), None);
        assert_eq!(request_id_token(b""), None);
    }

    #[test]
    fn job_paths() {
        let job = |op| QueuePath::Job { token: 0xab, op };
        assert_eq!(classify_path(format!("/o/a/requests/{ID}").as_bytes()), job(JobOp::Result));
        assert_eq!(classify_path(format!("/o/a/requests/{ID}/").as_bytes()), job(JobOp::Result));
        assert_eq!(classify_path(format!("/o/a/requests/{ID}/status").as_bytes()), job(JobOp::Status));
        assert_eq!(
            classify_path(format!("/o/a/requests/{ID}/status?logs=true").as_bytes()),
            job(JobOp::Status)
        );
        assert_eq!(classify_path(format!("/o/a/requests/{ID}/cancel").as_bytes()), job(JobOp::Cancel));
        for bad in [
            "/o/a/requests/123".to_string(),
            "/o/a/requests/".to_string() + &ID[..48],
            format!("/o/a/requests/{ID}/results"),
            format!("/o/a/requests/{ID}/status/x"),
            format!("/o/a/requests/{}", ID.to_uppercase()),
            "/o/a/requests/..%2f..%2fhints".to_string(),
        ] {
            assert_eq!(classify_path(bad.as_bytes()), QueuePath::MalformedId, "{bad}");
        }
    }

    #[test]
    fn everything_else_is_a_submission() {
        for p in [
            "/o/a",
            "/o/a/",
            "/o/a/generate",
            "/o/a/requests",
            "/o/a/requests/",
            "/o",
            "/",
            "",
            "o/a/requests/x",
            "//a/requests/x",
            "/o/a/x/requests/y",
        ] {
            assert_eq!(classify_path(p.as_bytes()), QueuePath::Submit, "{p}");
        }
    }
}
