//! Host memory for weights: [`HostBuf`], and the [`BufferPool`] that recycles it.

use std::io;
use std::sync::{Mutex, PoisonError};

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
