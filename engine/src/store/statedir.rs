//! Helpers for the on-disk state under an unlade root, shared by the
//! content store, the snapshotter and the image records: their
//! directories, opened once as fds, private names that no other thread or
//! process picks, and the error of a failed file-system operation.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{self as rfs, Mode, OFlags};

/// Creates `p` (and its parents) if missing and opens it as a directory.
pub fn open_dir(p: &Path) -> io::Result<OwnedFd> {
    std::fs::create_dir_all(p)?;
    Ok(rfs::open(
        p,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// A name unique among this root's users: the process ID (unique among
/// live processes) and a per-process counter.
pub fn private_name() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A file-system operation of a store that failed: the `Io` error of the
/// content store, the snapshotter and the image records. Displays as the
/// store, the path and the operation (`snapshots /r/snapshots/active/x:
/// commit`); what the system said is its `source()`.
#[derive(Debug, thiserror::Error)]
#[error("{store} {path}: {op}")]
pub struct StoreIoError {
    /// The store, as its errors name it: "content store", "snapshots",
    /// "images".
    pub store: &'static str,
    /// The operation, e.g. "open directory", "publish blob", "commit".
    pub op: &'static str,
    /// The file or directory it was done on.
    pub path: PathBuf,
    /// What the system said (`ENOSPC`, `EACCES`, …).
    #[source]
    pub source: io::Error,
}

/// A [`StoreIoError`] of `store` doing `op` on `path`.
pub(crate) fn io_err(
    store: &'static str,
    op: &'static str,
    path: &Path,
    source: io::Error,
) -> StoreIoError {
    StoreIoError {
        store,
        op,
        path: path.to_path_buf(),
        source,
    }
}
