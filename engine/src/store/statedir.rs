//! Helpers for the on-disk state under an unlade root, shared by the
//! content store, the snapshotter and the image records: their
//! directories, opened once as fds, private names that no other thread or
//! process picks, and the error of a failed file-system operation.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{self as rfs, Mode, OFlags};

/// The mode of every directory of a root's state: the root itself, each
/// store and each snapshot's own directory. A committed tree holds what
/// an image carries (setuid binaries, files owned by any uid): were a host
/// user able to reach it, they could run those or read what their uid
/// owns in it (CVE-2021-41103, why containerd keeps its snapshotter roots
/// 0700). Set explicitly, after `mkdir`, so that the umask neither widens
/// it (umask 000 made every directory 0777: anyone could rename a store
/// away and plant their own) nor narrows it.
pub const PRIVATE: u32 = 0o700;

/// Creates directory `p` (one component, `EEXIST` if it is there) with
/// exactly `mode`, whatever the umask.
pub fn make_dir(p: &Path, mode: u32) -> io::Result<()> {
    rfs::mkdir(p, Mode::from_raw_mode(0o700))?;
    rfs::chmod(p, Mode::from_raw_mode(mode))?;
    Ok(())
}

/// Creates `p` and its missing parents, each made with exactly `mode`
/// (parents that exist are left as they are).
pub fn make_dirs(p: &Path, mode: u32) -> io::Result<()> {
    match rfs::stat(p) {
        Ok(st) if rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Directory => {
            return Ok(())
        }
        Ok(_) => return Err(io::Error::from(io::ErrorKind::AlreadyExists)),
        Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(e.into()),
    }
    if let Some(parent) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
        make_dirs(parent, mode)?;
    }
    match make_dir(p, mode) {
        // Made by someone else meanwhile.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && p.is_dir() => Ok(()),
        r => r,
    }
}

/// Makes directory `fd` [`PRIVATE`] if it is not: a root made before
/// modes were explicit, or under a loose umask. Best effort: a directory
/// this process may not change keeps its mode (it then belongs to someone
/// who chose it).
pub fn make_private(fd: &OwnedFd) {
    if let Ok(st) = rfs::fstat(fd) {
        if st.st_mode & 0o7777 != PRIVATE {
            let _ = rfs::fchmod(fd, Mode::from_raw_mode(PRIVATE));
        }
    }
}

/// Makes a root's directory `dir`: [`PRIVATE`] when it is made here, and
/// made private when it is already a root (it holds a store) or empty. A
/// directory with other things in it (`--root ~`, `--root /srv`) keeps
/// its mode: unlade does not take over a directory it shares; the stores
/// under it are private all the same.
pub fn open_root(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        return make_dirs(dir, PRIVATE);
    }
    const OURS: [&str; 6] = [
        "content",
        "snapshots",
        "images",
        "locks",
        "containerd",
        "gc.lock",
    ];
    let mut ours = true;
    for ent in std::fs::read_dir(dir)? {
        let name = ent?.file_name();
        if !OURS.iter().any(|o| name == *o) {
            ours = false;
            break;
        }
    }
    if ours {
        let fd = rfs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        make_private(&fd);
    }
    Ok(())
}

/// Creates `p` (and its parents) if missing, [`PRIVATE`], and opens it as
/// a directory, made private if it was not.
pub fn open_dir(p: &Path) -> io::Result<OwnedFd> {
    make_dirs(p, PRIVATE)?;
    let fd = rfs::open(
        p,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    make_private(&fd);
    Ok(fd)
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
