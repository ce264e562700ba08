//! Cross-worker in-flight counters: one shared-data value holding a little-endian `u32` per
//! runner, in table order. Workers update it with compare-and-swap.

/// Decodes `bytes` into `out` (cleared first), padded with zeros to `n` runners.
pub fn decode(bytes: &[u8], n: usize, out: &mut Vec<u32>) {
    out.clear();
    out.extend(
        bytes.chunks_exact(4).take(n).map(|c| <[u8; 4]>::try_from(c).map(u32::from_le_bytes).unwrap_or(0)),
    );
    out.resize(n, 0);
}

/// Encodes counters.
pub fn encode(counts: &[u32]) -> Vec<u8> {
    counts.iter().flat_map(|c| c.to_le_bytes()).collect()
}

/// Returns `bytes` with runner `idx`'s counter moved by `delta` (saturating at 0 and
/// `u32::MAX`), sized for `n` runners.
pub fn adjust(bytes: &[u8], n: usize, idx: u32, delta: i32) -> Vec<u8> {
    let mut counts = Vec::with_capacity(n);
    decode(bytes, n, &mut counts);
    if let Some(c) = counts.get_mut(idx as usize) {
        *c = if delta >= 0 {
            c.saturating_add(delta.unsigned_abs())
        } else {
            c.saturating_sub(delta.unsigned_abs())
        };
    }
    encode(&counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn adjust_and_decode() {
        let b = adjust(&[], 3, 1, 1);
        let b = adjust(&b, 3, 1, 1);
        let b = adjust(&b, 3, 2, -1); // saturates at 0
        let mut out = Vec::new();
        decode(&b, 3, &mut out);
        assert_eq!(out, vec![0, 2, 0]);
        decode(&b, 5, &mut out);
        assert_eq!(out, vec![0, 2, 0, 0, 0]);
        decode(&b[..5], 2, &mut out); // torn value: the partial counter reads as 0
        assert_eq!(out, vec![0, 0]);
        assert_eq!(adjust(&b, 3, 99, 1), b); // unknown index: unchanged
    }
}
