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
    let mut out = bytes.to_vec();
    adjust_in_place(&mut out, n, idx, delta);
    out
}

/// [`adjust`] on the value itself, without decoding the other counters: sizes `bytes` for `n`
/// runners (a torn trailing partial counter is dropped, missing ones are 0) and moves runner
/// `idx`'s counter by `delta`.
pub fn adjust_in_place(bytes: &mut Vec<u8>, n: usize, idx: u32, delta: i32) {
    let whole = (bytes.len() / 4).min(n) * 4;
    bytes.truncate(whole);
    bytes.resize(n * 4, 0);
    let i = idx as usize * 4;
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

    #[test]
    fn adjust_in_place_matches_decode_adjust_encode() {
        // The reference: decode, move one counter, encode.
        let reference = |bytes: &[u8], n: usize, idx: u32, delta: i32| {
            let mut c = Vec::new();
            decode(bytes, n, &mut c);
            if let Some(x) = c.get_mut(idx as usize) {
                *x = if delta >= 0 {
                    x.saturating_add(delta as u32)
                } else {
                    x.saturating_sub(delta.unsigned_abs())
                };
            }
            encode(&c)
        };
        let full = encode(&[1, u32::MAX, 0, 7]);
        for len in 0..=full.len() {
            for n in 0..6 {
                for idx in 0..6 {
                    for delta in [1, -1, 5] {
                        let mut v = full[..len].to_vec();
                        adjust_in_place(&mut v, n, idx, delta);
                        assert_eq!(
                            v,
                            reference(&full[..len], n, idx, delta),
                            "len {len} n {n} idx {idx} {delta}"
                        );
                    }
                }
            }
        }
    }
}
