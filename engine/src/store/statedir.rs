//! Helpers for the on-disk state under an unlade root, shared by the
//! content store and the snapshotter: their directories, opened once as
//! fds, and private names that no other thread or process picks.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
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
