//! The data section of a load, and the content checks of a full one: the digest
//! ([`Hasher`]) and the values ([`first_non_finite`]), on the load thread alone or, with a
//! [`CheckPool`] of two threads or more, pipelined with the read.
//!
//! Pipelined ([`CheckPool::threads`] >= 2), the data is taken [`SUPER_CHUNK`] bytes at a
//! time: while the load thread reads super-chunk k+1 into the buffer (and hands super-chunk
//! k-1, checked, to `on_chunk`), the pool hashes super-chunk k (BLAKE3's
//! `Hasher::update_rayon`: the pieces are fed to one hasher in file order, so the digest is
//! the same) and checks its values (in parallel pieces, the first non-finite one reported).
//! Each super-chunk is handed on in [`CHUNK`] pieces, in order, only once it was checked,
//! exactly as the single-threaded path does. SHA-256 (manifests without a BLAKE3 digest) is
//! sequential, but overlaps with the read all the same.

use std::io;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::sync::OnceLock;

use rayon::prelude::*;
use sha2::{Digest as _, Sha256};

use super::{read_exact, Failure, OnChunk, CHUNK};
use crate::models::ModelEntry;

/// Bytes a pipelined full check reads, then checks, at a time (a multiple of [`CHUNK`]). Chosen
/// by measurement (2-core machine, 64 MiB and 1 GiB first loads, two threads): one chunk,
/// 4 MiB, was the fastest, 10-20% ahead of 8, 16, 32 and 64 MiB. The piece being hashed and
/// the one being read then both fit in the CPU's last-level cache, and the first read and the
/// last check, which nothing overlaps, stay short; it is still wide enough for BLAKE3 to
/// spread over the pool.
pub const SUPER_CHUNK: usize = CHUNK;

/// Bytes of values one task of the pool checks at a time.
const VALUE_PIECE: usize = 256 << 10;

/// The threads that hash and check the values of full loads (`--load-threads`), shared by a
/// backend's loads. Made when the first full check needs them; they run at the load
/// thread's lowered priority (see [`crate::backend::loading`]), so that inferences go first.
/// With one thread there is no pool: the load thread checks each chunk itself.
#[derive(Debug)]
pub struct CheckPool {
    threads: usize,
    /// Bytes checked at a time, pipelined: [`SUPER_CHUNK`] (less in tests).
    super_chunk: usize,
    pool: OnceLock<Option<rayon::ThreadPool>>,
}

impl Default for CheckPool {
    /// [`default_load_threads`] threads.
    fn default() -> Self {
        Self::new(default_load_threads())
    }
}

/// The default `--load-threads`: as many as the CPUs this process may use.
pub fn default_load_threads() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
}

impl CheckPool {
    /// A pool of `threads` threads (at least 1; 1: none, the load thread checks).
    pub fn new(threads: usize) -> Self {
        Self { threads: threads.max(1), super_chunk: SUPER_CHUNK, pool: OnceLock::new() }
    }

    /// A pool of `threads` that checks `chunks` [`CHUNK`]s at a time (tests: many
    /// super-chunks in a small file).
    #[cfg(test)]
    pub(super) fn with_super_chunk(threads: usize, chunks: usize) -> Self {
        Self { super_chunk: CHUNK * chunks.max(1), ..Self::new(threads) }
    }

    /// How many threads check a full load.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The pool, started on first use; `None` with one thread, or when it cannot be started
    /// (then loads check on the load thread, as with one).
    pub(super) fn pool(&self) -> Option<&rayon::ThreadPool> {
        if self.threads < 2 {
            return None;
        }
        self.pool
            .get_or_init(|| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(self.threads)
                    .thread_name(|i| format!("model-check-{i}"))
                    .start_handler(|_| crate::backend::lower_priority())
                    .build()
                    .inspect_err(|e| {
                        log::warn!("cannot start {} load-check threads, checking on one: {e}", self.threads)
                    })
                    .ok()
            })
            .as_ref()
    }
}

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

    /// [`Hasher::update`] on the threads of the current rayon pool (BLAKE3; SHA-256 is
    /// sequential).
    fn update_parallel(&mut self, data: &[u8]) {
        match self {
            Hasher::Blake3(h, _) => {
                h.update_rayon(data);
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

/// [`first_non_finite`] on the threads of the current rayon pool, [`VALUE_PIECE`] bytes a
/// task: still the first one.
fn first_non_finite_parallel(chunk: &[u8]) -> Option<usize> {
    chunk
        .par_chunks(VALUE_PIECE)
        .enumerate()
        .find_map_first(|(i, piece)| first_non_finite(piece).map(|j| i * (VALUE_PIECE / 4) + j))
}

/// Where the tensors are in the data: their f32 ranges, and the manifest entry naming them.
#[derive(Clone, Copy)]
struct Tensors<'a> {
    ranges: &'a [Range<usize>],
    entry: &'a ModelEntry,
}

/// The failure for a non-finite value at f32 index `at` of the data: which tensor, where.
fn non_finite(at: usize, tensors: Tensors<'_>) -> Failure {
    let (name, index) = tensors
        .ranges
        .iter()
        .zip(&tensors.entry.tensors)
        .find(|(r, _)| r.contains(&at))
        .map_or(("?", at), |(r, t)| (t.name.as_str(), at - r.start));
    Failure::Corrupt(format!("tensor {name} holds a non-finite value at index {index}"))
}

/// Reads the data section from `src` into `dst` (all of it), handing each [`CHUNK`] of it to
/// `on_chunk` in order. With `hasher`, every byte is hashed and every value checked before it
/// is handed on (the digest itself is the caller's to compare), on `checks`' threads when it
/// has two or more.
pub(super) fn read_data(
    src: &mut dyn io::Read,
    dst: &mut [u8],
    ranges: &[Range<usize>],
    entry: &ModelEntry,
    hasher: Option<&mut Hasher>,
    checks: &CheckPool,
    on_chunk: &mut OnChunk<'_>,
) -> Result<(), Failure> {
    let tensors = Tensors { ranges, entry };
    match (hasher, checks.pool()) {
        (Some(hasher), Some(pool)) => {
            read_pipelined(pool, checks.super_chunk, src, dst, tensors, hasher, on_chunk)
        }
        (hasher, _) => read_sequential(src, dst, tensors, hasher, on_chunk),
    }
}

/// The single-threaded data read: each chunk read, hashed and checked while it is still in
/// the CPU's cache, then handed on.
fn read_sequential(
    src: &mut dyn io::Read,
    dst: &mut [u8],
    tensors: Tensors<'_>,
    mut hasher: Option<&mut Hasher>,
    on_chunk: &mut OnChunk<'_>,
) -> Result<(), Failure> {
    let mut offset = 0;
    for chunk in dst.chunks_mut(CHUNK) {
        read_exact(src, chunk)?;
        if let Some(h) = hasher.as_mut() {
            h.update(chunk);
            if let Some(i) = first_non_finite(chunk) {
                return Err(non_finite(offset / 4 + i, tensors));
            }
        }
        to_host_order(chunk);
        on_chunk(tensors.ranges, offset..offset + chunk.len(), chunk).map_err(Failure::Corrupt)?;
        offset += chunk.len();
    }
    Ok(())
}

/// The pipelined data read of a full check: see the module docs.
fn read_pipelined(
    pool: &rayon::ThreadPool,
    super_chunk: usize,
    src: &mut dyn io::Read,
    dst: &mut [u8],
    tensors: Tensors<'_>,
    hasher: &mut Hasher,
    on_chunk: &mut OnChunk<'_>,
) -> Result<(), Failure> {
    let mut pieces = dst.chunks_mut(super_chunk);
    // (offset in `dst`, bytes): read and not yet checked; checked and not yet handed on.
    let mut read: Option<(usize, &mut [u8])> = None;
    let mut checked: Option<(usize, &mut [u8])> = None;
    let mut offset = 0;
    loop {
        let mut next = pieces.next();
        if read.is_none() && checked.is_none() && next.is_none() {
            return Ok(());
        }
        let mut check_result = Ok(());
        let mut hand_result = Ok(());
        let mut read_result = Ok(());
        pool.in_place_scope(|scope| {
            if let Some((at, bytes)) = &read {
                let (at, bytes): (usize, &[u8]) = (*at, bytes);
                let (result, hasher) = (&mut check_result, &mut *hasher);
                scope.spawn(move |_| *result = check_parallel(hasher, at, bytes, tensors));
            }
            if let Some((at, bytes)) = &checked {
                hand_result = hand_on(on_chunk, tensors.ranges, *at, bytes);
            }
            if let (Ok(()), Some(bytes)) = (&hand_result, next.as_deref_mut()) {
                read_result = read_exact(src, bytes);
            }
        });
        // In file order: what was handed on, then what was checked, then what was read.
        hand_result?;
        check_result?;
        read_result?;
        checked = read.take();
        if let Some((_, bytes)) = checked.as_mut() {
            to_host_order(bytes);
        }
        if let Some(bytes) = next {
            let len = bytes.len();
            read = Some((offset, bytes));
            offset += len;
        }
    }
}

/// Hashes `bytes` (at byte `at` of the data) and checks its values, on the current pool.
fn check_parallel(hasher: &mut Hasher, at: usize, bytes: &[u8], tensors: Tensors<'_>) -> Result<(), Failure> {
    let ((), bad) = rayon::join(|| hasher.update_parallel(bytes), || first_non_finite_parallel(bytes));
    match bad {
        Some(i) => Err(non_finite(at / 4 + i, tensors)),
        None => Ok(()),
    }
}

/// Hands `bytes` (at byte `at` of the data) to `on_chunk`, [`CHUNK`] bytes at a time.
fn hand_on(
    on_chunk: &mut OnChunk<'_>,
    ranges: &[Range<usize>],
    at: usize,
    bytes: &[u8],
) -> Result<(), Failure> {
    let mut offset = at;
    for chunk in bytes.chunks(CHUNK) {
        on_chunk(ranges, offset..offset + chunk.len(), chunk).map_err(Failure::Corrupt)?;
        offset += chunk.len();
    }
    Ok(())
}

/// The file's little-endian f32s in the host's byte order (nothing to do on little-endian
/// hosts), once they are checked.
fn to_host_order(bytes: &mut [u8]) {
    #[cfg(target_endian = "big")]
    for word in bytes.chunks_exact_mut(4) {
        word.reverse();
    }
    let _ = bytes;
}
