//! The content checks of a full load: the digest ([`Hasher`]) and the values
//! ([`first_non_finite`]).

use sha2::{Digest as _, Sha256};

use super::Failure;
use crate::models::ModelEntry;

/// The digest a manifest entry is checked against.
pub(super) enum Hasher {
    Blake3(Box<blake3::Hasher>, String),
    Sha256(Box<Sha256>, String),
}

impl Hasher {
    pub(super) fn for_entry(entry: &ModelEntry) -> Self {
        match &entry.blake3 {
            Some(want) => Hasher::Blake3(Box::default(), want.clone()),
            None => Hasher::Sha256(Box::default(), entry.sha256.clone()),
        }
    }

    pub(super) fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Blake3(h, _) => {
                h.update(data);
            }
            Hasher::Sha256(h, _) => h.update(data),
        }
    }

    pub(super) fn check(self) -> Result<(), Failure> {
        let (name, got, want) = match self {
            Hasher::Blake3(h, want) => ("BLAKE3", h.finalize().to_hex().to_string(), want),
            Hasher::Sha256(h, want) => ("SHA-256", crate::models::hex(&h.finalize()), want),
        };
        if got == want {
            Ok(())
        } else {
            Err(Failure::Corrupt(format!("{name} {got} does not match the manifest's {want}")))
        }
    }
}

/// The index of the first non-finite f32 in `chunk` (little-endian bytes), if any.
pub(super) fn first_non_finite(chunk: &[u8]) -> Option<usize> {
    const EXPONENT: u32 = 0x7f80_0000;
    let bad = |bits: u32| bits & EXPONENT == EXPONENT;
    // Fast path: one branch-free pass (vectorised), then find the culprit only if needed.
    let any = match bytemuck::try_cast_slice::<u8, u32>(chunk) {
        Ok(words) => words.iter().fold(false, |acc, &w| acc | bad(u32::from_le(w))),
        Err(_) => true,
    };
    if !any {
        return None;
    }
    chunk.chunks_exact(4).position(|b| bad(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
}
