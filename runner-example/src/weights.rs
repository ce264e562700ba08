//! Reading a model file into memory, checked, at close to the speed of the page cache.
//!
//! One pass over the file, with no copy the hardware does not need:
//!
//! 1. the safetensors header (8-byte length, JSON) is read and checked against the manifest
//!    entry: the tensors listed, all F32, of the listed shapes, laid end to end, covering the
//!    file exactly, of the manifest's size;
//! 2. the data section (the weights, the bulk of the file) is read with `read(2)` straight
//!    into the buffer the weights will live in (a [`HostBuf`] for the cpu backend, pinned
//!    memory for cuda), [`CHUNK`] bytes at a time; each chunk, while it is still in the CPU's
//!    cache, is hashed (BLAKE3, or SHA-256 for manifests without a BLAKE3 digest) and checked
//!    for non-finite values, then handed to the caller (`on_chunk`: cuda starts its copy to the
//!    device while the next chunk is read);
//! 3. the digest is compared with the manifest's.
//!
//! A [`VerifiedRecords`] remembers, per model, the identity of the file that last passed all
//! of this (device, inode, size, modification and change times, see [`FileIdentity`]); a
//! load of the same, unchanged file skips the digest and the value checks of step 2 (the
//! header checks of step 1 always run). What that does and does not protect against is in
//! `docs/backends.md` ("Integrity").

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use safetensors::tensor::{Dtype, Metadata};
use sha2::{Digest as _, Sha256};

use crate::backend::BackendError;
use crate::mlp::{MlpView, MlpWeights};
use crate::models::ModelEntry;

/// Bytes read (and hashed, and checked) at a time: small enough to be hashed while it is in
/// the CPU's cache, large enough that a `read` call costs nothing next to its copy.
pub const CHUNK: usize = 4 << 20;

/// The largest safetensors header accepted (the library's own limit is 100 MB; ours are a
/// few KiB).
const MAX_HEADER: u64 = 16 << 20;

/// A file's verification record is only trusted when the file had not been modified for at
/// least this long when its verification started: timestamps are coarse (a clock tick), so
/// a write in the same tick as the one before it could leave them unchanged (git's "racy
/// git" problem, solved the same way).
pub const SETTLE: Duration = Duration::from_secs(2);

/// Memory for a model's weights on the host: an anonymous memory map, with transparent huge
/// pages asked for (Linux), so that filling 1 GiB takes 512 page faults instead of 262 144.
#[derive(Debug)]
pub struct HostBuf {
    map: memmap2::MmapMut,
    len: usize,
}

impl HostBuf {
    /// `len` zero bytes. `len` must be a multiple of 4 (a whole number of f32).
    pub fn zeroed(len: usize) -> io::Result<Self> {
        if !len.is_multiple_of(4) {
            return Err(io::Error::other(format!("a buffer of {len} bytes does not hold whole f32s")));
        }
        let map = memmap2::MmapOptions::new().len(len.max(4)).map_anon()?;
        #[cfg(target_os = "linux")]
        {
            // Only a hint: without huge pages the buffer works the same, slower to fill.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        Ok(Self { map, len })
    }

    /// A copy of `bytes` (a multiple of 4 long), in a buffer from `pool` when it has one.
    pub fn copy_of(bytes: &[u8], pool: Option<&BufferPool>) -> io::Result<Self> {
        let mut buf = BufferPool::take_or_alloc(pool, bytes.len())?;
        buf.bytes_mut().copy_from_slice(bytes);
        Ok(buf)
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its bytes.
    pub fn bytes(&self) -> &[u8] {
        self.map.get(..self.len).unwrap_or_default()
    }

    /// Its bytes, to write.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        self.map.get_mut(..len).unwrap_or_default()
    }

    /// Its bytes as f32 (in the host's byte order; the loader swaps on big-endian hosts).
    pub fn floats(&self) -> &[f32] {
        // A page-aligned map of a multiple of 4 bytes always casts.
        bytemuck::try_cast_slice(self.bytes()).unwrap_or_default()
    }
}

/// The buffer of the model evicted last, kept for the next load to fill: fresh memory costs
/// the kernel zeroing and mapping every page before the read can fill it (here about as long
/// as the read itself), memory already mapped does not. Holds at most one buffer; a load
/// takes it when it is big enough (and at most twice the size needed), else it is freed then.
#[derive(Debug, Default)]
pub struct BufferPool {
    spare: Mutex<Option<HostBuf>>,
}

impl BufferPool {
    /// Keeps `buf` for the next load (freeing the one kept before, if any).
    pub fn give(&self, buf: HostBuf) {
        let old = self.spare.lock().unwrap_or_else(PoisonError::into_inner).replace(buf);
        drop(old); // outside the lock
    }

    /// The spare buffer, resized to `len` bytes, when it fits; its contents are stale.
    pub fn take(&self, len: usize) -> Option<HostBuf> {
        let spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner).take()?;
        let room = spare.map.len();
        if len.is_multiple_of(4) && room >= len && room / 2 <= len.max(4) {
            Some(HostBuf { map: spare.map, len })
        } else {
            drop(spare); // does not fit: free it, a fresh buffer is allocated instead
            None
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.spare.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map_or(0, |b| b.map.len())
    }

    /// A buffer of `len` bytes: `pool`'s spare when it fits, else a new one.
    pub fn take_or_alloc(pool: Option<&BufferPool>, len: usize) -> io::Result<HostBuf> {
        match pool.and_then(|p| p.take(len)) {
            Some(buf) => Ok(buf),
            None => HostBuf::zeroed(len),
        }
    }
}

/// A model's weights in one host buffer, as read from its file.
#[derive(Debug)]
pub struct HostWeights {
    /// The model's width.
    pub width: usize,
    /// The tensors, end to end in file order.
    pub buf: HostBuf,
    /// Where each tensor is in `buf`, in f32 indices, in the manifest's tensor order.
    pub ranges: Vec<Range<usize>>,
}

impl HostWeights {
    /// Bytes the weights take.
    pub fn bytes(&self) -> u64 {
        self.buf.len() as u64
    }

    /// The weights, for the forward pass.
    pub fn view(&self) -> MlpView<'_> {
        MlpView::from_flat(self.width, self.buf.floats(), &self.ranges)
    }

    /// A copy in another buffer (the cpu backend's stand-in for a copy to a device).
    pub fn duplicate(&self, pool: Option<&BufferPool>) -> io::Result<Self> {
        Ok(Self {
            width: self.width,
            buf: HostBuf::copy_of(self.buf.bytes(), pool)?,
            ranges: self.ranges.clone(),
        })
    }

    /// The weights as one `Vec` per tensor.
    pub fn to_mlp(&self) -> MlpWeights {
        let view = self.view();
        let layers = view
            .layers
            .iter()
            .map(|(w, b)| crate::mlp::Linear { weight: w.to_vec(), bias: b.to_vec() })
            .collect();
        MlpWeights {
            width: self.width,
            embed: view.embed.to_vec(),
            layers,
            head: crate::mlp::Linear { weight: view.head.0.to_vec(), bias: view.head.1.to_vec() },
        }
    }
}

/// What identifies a file's contents without reading them: if any of this changed, the file
/// may have. `ctime` is the inode change time, which the kernel sets to "now" on every write,
/// rename and `utimensat`: an unprivileged process cannot set it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileIdentity {
    /// The identity of an open file (`None` where the platform has no inodes).
    pub fn of(file: &File) -> io::Result<Option<Self>> {
        let meta = file.metadata()?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            Ok(Some(Self {
                dev: meta.dev(),
                ino: meta.ino(),
                size: meta.size(),
                mtime: (meta.mtime(), meta.mtime_nsec()),
                ctime: (meta.ctime(), meta.ctime_nsec()),
            }))
        }
        #[cfg(not(unix))]
        {
            let _ = meta;
            Ok(None)
        }
    }

    /// Whether the file had been left alone for `settle` at `now`.
    fn settled(&self, now: SystemTime, settle: Duration) -> bool {
        let secs = |t: (i64, i64)| {
            Duration::new(u64::try_from(t.0).unwrap_or(u64::MAX), t.1.clamp(0, 999_999_999) as u32)
        };
        let Ok(now) = now.duration_since(SystemTime::UNIX_EPOCH) else { return false };
        let last = secs(self.mtime).max(secs(self.ctime));
        now.checked_sub(last).is_some_and(|age| age >= settle)
    }
}

/// The files that passed every check, by model: see the module docs.
#[derive(Debug)]
pub struct VerifiedRecords {
    records: Mutex<HashMap<String, FileIdentity>>,
    settle: Duration,
}

impl Default for VerifiedRecords {
    fn default() -> Self {
        Self::with_settle(SETTLE)
    }
}

impl VerifiedRecords {
    /// Records that trust a file left alone for `settle` ([`SETTLE`] by default; less only
    /// in tests).
    pub fn with_settle(settle: Duration) -> Self {
        Self { records: Mutex::default(), settle }
    }

    fn matches(&self, model: &str, id: &FileIdentity) -> bool {
        self.records.lock().unwrap_or_else(PoisonError::into_inner).get(model) == Some(id)
    }

    fn set(&self, model: &str, id: Option<FileIdentity>) {
        let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        match id {
            Some(id) => records.insert(model.to_string(), id),
            None => records.remove(model),
        };
    }

    /// Forgets every record: the next load of every model is checked in full.
    pub fn clear(&self) {
        self.records.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    /// How many files are recorded.
    pub fn len(&self) -> usize {
        self.records.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether no file is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a load's contents were checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// Digest and values checked while reading.
    Full,
    /// The same file as one fully checked before (its [`FileIdentity`] unchanged): only the
    /// header was checked.
    Recorded,
}

/// A checked read: where each tensor landed, and how it was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// Each tensor's f32 range in the buffer, in manifest order.
    pub ranges: Vec<Range<usize>>,
    /// How the contents were checked.
    pub checked: Checked,
}

/// What a load does with each chunk once it is read and checked: gets the tensors' f32
/// ranges (manifest order), the chunk's byte range in the buffer, and its bytes.
pub type OnChunk<'a> = dyn FnMut(&[Range<usize>], Range<usize>, &[u8]) -> Result<(), String> + 'a;

/// Why a read failed.
#[derive(Debug)]
enum Failure {
    /// The file does not hold what the manifest says.
    Corrupt(String),
    /// Reading failed.
    Io(io::Error),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Io(e)
    }
}

fn invalid(why: impl std::fmt::Display) -> Failure {
    Failure::Corrupt(format!("not a valid safetensors file: {why}"))
}

/// Reads `entry`'s file from `dir` into `dst` (exactly `entry.weight_bytes` long), checked;
/// see the module docs. `records`, when given, is consulted and updated. `on_chunk` gets
/// each byte range of `dst` once it is filled and checked, in order, with its bytes and the
/// tensors' f32 ranges (manifest order). If the file changes while it is read, it is read
/// again from the start: `on_chunk` then sees the ranges again.
///
/// A missing file is [`BackendError::NotFound`]; anything else wrong (unreadable, bad
/// header, truncated, wrong dtype or shape, non-finite values, checksum mismatch) is
/// [`BackendError::Failed`] naming the file and the problem. Blocking.
pub fn read_into(
    dir: &Path,
    entry: &ModelEntry,
    records: Option<&VerifiedRecords>,
    dst: &mut [u8],
    on_chunk: &mut OnChunk<'_>,
) -> Result<Loaded, BackendError> {
    let path = dir.join(&entry.file);
    let cannot_read = |e: io::Error| {
        BackendError::Failed(format!("model {}: cannot read {}: {e}", entry.name, path.display()))
    };
    let mut file = File::open(&path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => BackendError::NotFound(format!(
            "model {}: weights file {} does not exist",
            entry.name,
            path.display()
        )),
        _ => cannot_read(e),
    })?;
    let started = SystemTime::now();
    let before = FileIdentity::of(&file).map_err(cannot_read)?;
    let len = file.metadata().map_err(cannot_read)?.len();
    let trusted = match (records, &before) {
        (Some(records), Some(id)) => records.matches(&entry.name, id),
        _ => false,
    };
    let result = read_checked(&mut file, len, entry, !trusted, dst, on_chunk);
    let after = FileIdentity::of(&file).map_err(cannot_read)?;
    match result {
        Ok(_) if trusted && after != before => {
            // Changed while being read: what was read was never checked. Check it all.
            log::warn!("model {}: {} changed while loading; checking it again", entry.name, path.display());
            if let Some(records) = records {
                records.set(&entry.name, None);
            }
            read_into(dir, entry, None, dst, on_chunk).inspect(|_| {
                if let Some(records) = records {
                    // Not recorded: it is still being written, the next load checks again.
                    records.set(&entry.name, None);
                }
            })
        }
        Ok(ranges) => {
            if let (Some(records), false) = (records, trusted) {
                let settled = before.filter(|id| after == Some(*id) && id.settled(started, records.settle));
                records.set(&entry.name, settled);
            }
            Ok(Loaded { ranges, checked: if trusted { Checked::Recorded } else { Checked::Full } })
        }
        Err(failure) => {
            if let Some(records) = records {
                records.set(&entry.name, None);
            }
            Err(match failure {
                Failure::Corrupt(why) => BackendError::Failed(format!(
                    "model {}: corrupt weights file {}: {why}",
                    entry.name,
                    path.display()
                )),
                Failure::Io(e) => cannot_read(e),
            })
        }
    }
}

/// Reads `entry`'s file from `dir` into a [`HostBuf`] (`pool`'s spare one when it fits, else
/// a new one); see [`read_into`].
pub fn read_host(
    dir: &Path,
    entry: &ModelEntry,
    records: Option<&VerifiedRecords>,
    pool: Option<&BufferPool>,
) -> Result<(HostWeights, Checked), BackendError> {
    let bytes = usize::try_from(entry.weight_bytes)
        .map_err(|_| BackendError::Failed(format!("model {}: too large for this host", entry.name)))?;
    let mut buf = BufferPool::take_or_alloc(pool, bytes).map_err(|e| {
        BackendError::Failed(format!(
            "model {}: cannot allocate {bytes} bytes of host memory: {e}",
            entry.name
        ))
    })?;
    let read = read_into(dir, entry, records, buf.bytes_mut(), &mut |_, _, _| Ok(()))?;
    Ok((HostWeights { width: entry.width, buf, ranges: read.ranges }, read.checked))
}

/// Parses and checks the bytes of a whole weights file, as [`read_into`] does a file.
pub fn parse_weights(data: &[u8], entry: &ModelEntry) -> Result<MlpWeights, String> {
    let bytes = usize::try_from(entry.weight_bytes).map_err(|e| e.to_string())?;
    let mut buf = HostBuf::zeroed(bytes).map_err(|e| e.to_string())?;
    let mut src = data;
    let ranges =
        read_checked(&mut src, data.len() as u64, entry, true, buf.bytes_mut(), &mut |_, _, _| Ok(()))
            .map_err(|f| match f {
                Failure::Corrupt(why) => why,
                Failure::Io(e) => e.to_string(),
            })?;
    Ok(HostWeights { width: entry.width, buf, ranges }.to_mlp())
}

/// The digest a manifest entry is checked against.
enum Hasher {
    Blake3(Box<blake3::Hasher>, String),
    Sha256(Box<Sha256>, String),
}

impl Hasher {
    fn for_entry(entry: &ModelEntry) -> Self {
        match &entry.blake3 {
            Some(want) => Hasher::Blake3(Box::default(), want.clone()),
            None => Hasher::Sha256(Box::default(), entry.sha256.clone()),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Blake3(h, _) => {
                h.update(data);
            }
            Hasher::Sha256(h, _) => h.update(data),
        }
    }

    fn check(self) -> Result<(), Failure> {
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
fn first_non_finite(chunk: &[u8]) -> Option<usize> {
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

/// The file read from `src` (`len` bytes), checked against `entry`, its data section into
/// `dst`. `full`: also hash it and check every value (else only the header is checked).
fn read_checked(
    src: &mut dyn io::Read,
    len: u64,
    entry: &ModelEntry,
    full: bool,
    dst: &mut [u8],
    on_chunk: &mut OnChunk<'_>,
) -> Result<Vec<Range<usize>>, Failure> {
    let mut hasher = full.then(|| Hasher::for_entry(entry));
    // 1. The header.
    let mut n_bytes = [0u8; 8];
    if len < 8 {
        return Err(invalid("header too small"));
    }
    read_exact(src, &mut n_bytes)?;
    let n = u64::from_le_bytes(n_bytes);
    if n > MAX_HEADER || n > len - 8 {
        return Err(invalid(format!("header length {n} does not fit in a file of {len} bytes")));
    }
    let mut header = vec![0u8; n as usize];
    read_exact(src, &mut header)?;
    let text = std::str::from_utf8(&header).map_err(|e| invalid(format!("header is not UTF-8: {e}")))?;
    let metadata: Metadata =
        serde_json::from_str(text).map_err(|e| invalid(format!("invalid header: {e}")))?;
    let data_len = metadata.data_len() as u64;
    if 8 + n + data_len != len {
        return Err(invalid(format!(
            "incomplete metadata, file not fully covered: the header describes {} bytes, the file has {len}",
            8 + n + data_len
        )));
    }
    let ranges = check_tensors(&metadata, entry)?;
    if len != entry.file_bytes {
        return Err(Failure::Corrupt(format!("is {len} bytes long, the manifest says {}", entry.file_bytes)));
    }
    if data_len != dst.len() as u64 {
        return Err(Failure::Corrupt(format!(
            "holds {data_len} bytes of weights, the manifest says {}",
            dst.len()
        )));
    }
    if let Some(h) = hasher.as_mut() {
        h.update(&n_bytes);
        h.update(&header);
    }
    // 2. The data, straight into its buffer, chunk by chunk.
    let mut offset = 0;
    for chunk in dst.chunks_mut(CHUNK) {
        let range = offset..offset + chunk.len();
        read_exact(src, chunk)?;
        if let Some(h) = hasher.as_mut() {
            h.update(chunk);
            if let Some(i) = first_non_finite(chunk) {
                let at = (offset / 4) + i;
                let (name, index) = ranges
                    .iter()
                    .zip(&entry.tensors)
                    .find(|(r, _)| r.contains(&at))
                    .map_or(("?", at), |(r, t)| (t.name.as_str(), at - r.start));
                return Err(Failure::Corrupt(format!(
                    "tensor {name} holds a non-finite value at index {index}"
                )));
            }
        }
        #[cfg(target_endian = "big")]
        for word in chunk.chunks_exact_mut(4) {
            word.reverse();
        }
        on_chunk(&ranges, range, chunk).map_err(Failure::Corrupt)?;
        offset += chunk.len();
    }
    // 3. The digest.
    if let Some(h) = hasher {
        h.check()?;
    }
    Ok(ranges)
}

/// `read_exact`, with running out of file reported as corruption (the file shrank).
fn read_exact(src: &mut dyn io::Read, buf: &mut [u8]) -> Result<(), Failure> {
    src.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => invalid("the file ended early"),
        _ => Failure::Io(e),
    })
}

/// The tensors of `metadata` checked against `entry`'s; their f32 ranges in manifest order.
fn check_tensors(metadata: &Metadata, entry: &ModelEntry) -> Result<Vec<Range<usize>>, Failure> {
    let count = metadata.tensors().len();
    if count != entry.tensors.len() {
        return Err(Failure::Corrupt(format!(
            "holds {count} tensors, the manifest lists {}",
            entry.tensors.len()
        )));
    }
    let mut ranges = Vec::with_capacity(count);
    for expected in &entry.tensors {
        let info = metadata
            .info(&expected.name)
            .ok_or_else(|| Failure::Corrupt(format!("tensor {} is missing", expected.name)))?;
        if info.dtype != Dtype::F32 {
            return Err(Failure::Corrupt(format!(
                "tensor {} is {:?}, expected F32",
                expected.name, info.dtype
            )));
        }
        if info.shape != expected.shape {
            return Err(Failure::Corrupt(format!(
                "tensor {} has shape {:?}, expected {:?}",
                expected.name, info.shape, expected.shape
            )));
        }
        // Every tensor before it is F32 too, so its offsets are multiples of 4.
        let (start, end) = info.data_offsets;
        ranges.push(start / 4..end / 4);
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests;
