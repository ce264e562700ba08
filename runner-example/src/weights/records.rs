//! What a file's contents were checked as: [`FileIdentity`] and [`VerifiedRecords`].

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

/// A file's verification record is only trusted when the file had not been modified for at
/// least this long when its verification started: timestamps are coarse (a clock tick), so
/// a write in the same tick as the one before it could leave them unchanged (git's "racy
/// git" problem, solved the same way).
pub const SETTLE: Duration = Duration::from_secs(2);

/// What identifies a file's contents without reading them: if any of this changed, the file
/// may have. `ctime` is the inode change time, which the kernel sets to "now" on every write,
/// rename and `utimensat`: an unprivileged process cannot set it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    pub(super) dev: u64,
    pub(super) ino: u64,
    pub(super) size: u64,
    pub(super) mtime: (i64, i64),
    pub(super) ctime: (i64, i64),
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
    pub(super) fn settled(&self, now: SystemTime, settle: Duration) -> bool {
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
    pub(super) settle: Duration,
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

    pub(super) fn matches(&self, model: &str, id: &FileIdentity) -> bool {
        self.records.lock().unwrap_or_else(PoisonError::into_inner).get(model) == Some(id)
    }

    pub(super) fn set(&self, model: &str, id: Option<FileIdentity>) {
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
