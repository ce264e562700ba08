//! Reading a model file into memory, checked, at close to the speed of the page cache.
//!
//! One pass over the file, with no copy the hardware does not need:
//!
//! 1. the safetensors header (8-byte length, JSON) is read and checked against the manifest
//!    entry: the tensors listed, all F32, of the listed shapes, laid end to end, covering the
//!    file exactly, of the manifest's size;
//! 2. the data section (the weights, the bulk of the file) is read with `read(2)` straight
//!    into the buffer the weights will live in (a [`HostBuf`] for the cpu backend, pinned
//!    memory for cuda), [`CHUNK`] bytes at a time; each chunk is hashed (BLAKE3, or SHA-256
//!    for manifests without a BLAKE3 digest) and checked for non-finite values, then handed to
//!    the caller (`on_chunk`: cuda starts its copy to the device while the next chunk is read).
//!    With one load thread (`--load-threads 1`) the load thread does it all, each chunk while
//!    it is still in the CPU's cache; with more, a [`CheckPool`] hashes and checks
//!    [`SUPER_CHUNK`] k while the load thread reads k+1 (see `check.rs`);
//! 3. the digest is compared with the manifest's.
//!
//! A [`VerifiedRecords`] remembers, per model, the identity of the file that last passed all
//! of this (device, inode, size, modification and change times, see [`FileIdentity`]); a
//! load of the same, unchanged file skips the digest and the value checks of step 2 (the
//! header checks of step 1 always run). What that does and does not protect against is in
//! `docs/backends.md` ("Integrity").

mod buffer;
mod check;
mod records;

use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::Path;
use std::time::SystemTime;

use safetensors::tensor::{Dtype, Metadata};

pub use self::buffer::{BufferPool, HostBuf};
#[cfg(test)]
use self::check::first_non_finite;
use self::check::Hasher;
pub use self::check::{default_load_threads, CheckPool, SUPER_CHUNK};
pub use self::records::{FileIdentity, VerifiedRecords, SETTLE};
use crate::backend::BackendError;
use crate::mlp::{MlpView, MlpWeights};
use crate::models::ModelEntry;

/// Bytes read (and hashed, and checked) at a time: small enough to be hashed while it is in
/// the CPU's cache, large enough that a `read` call costs nothing next to its copy.
pub const CHUNK: usize = 4 << 20;

/// The largest safetensors header accepted (the library's own limit is 100 MB; ours are a
/// few KiB).
const MAX_HEADER: u64 = 16 << 20;

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
    checks: &CheckPool,
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
    let result = read_checked(&mut file, len, entry, !trusted, checks, dst, on_chunk);
    let after = FileIdentity::of(&file).map_err(cannot_read)?;
    match result {
        Ok(_) if trusted && after != before => {
            // Changed while being read: what was read was never checked. Check it all.
            log::warn!("model {}: {} changed while loading; checking it again", entry.name, path.display());
            if let Some(records) = records {
                records.set(&entry.name, None);
            }
            read_into(dir, entry, None, checks, dst, on_chunk).inspect(|_| {
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
    checks: &CheckPool,
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
    let read = read_into(dir, entry, records, checks, buf.bytes_mut(), &mut |_, _, _| Ok(()))?;
    Ok((HostWeights { width: entry.width, buf, ranges: read.ranges }, read.checked))
}

/// Parses and checks the bytes of a whole weights file, as [`read_into`] does a file.
pub fn parse_weights(data: &[u8], entry: &ModelEntry) -> Result<MlpWeights, String> {
    let bytes = usize::try_from(entry.weight_bytes).map_err(|e| e.to_string())?;
    let mut buf = HostBuf::zeroed(bytes).map_err(|e| e.to_string())?;
    let mut src = data;
    let one = CheckPool::new(1);
    let ranges =
        read_checked(&mut src, data.len() as u64, entry, true, &one, buf.bytes_mut(), &mut |_, _, _| Ok(()))
            .map_err(|f| match f {
                Failure::Corrupt(why) => why,
                Failure::Io(e) => e.to_string(),
            })?;
    Ok(HostWeights { width: entry.width, buf, ranges }.to_mlp())
}

/// The file read from `src` (`len` bytes), checked against `entry`, its data section into
/// `dst`. `full`: also hash it and check every value (else only the header is checked).
fn read_checked(
    src: &mut dyn io::Read,
    len: u64,
    entry: &ModelEntry,
    full: bool,
    checks: &CheckPool,
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
    // 2. The data, straight into its buffer, chunk by chunk (see `check`).
    check::read_data(src, dst, &ranges, entry, hasher.as_mut(), checks, on_chunk)?;
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
