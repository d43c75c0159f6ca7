//! File locks: an exclusive `flock` per flight key in the root's
//! `locks/` directory ([`FileLock`]), and the shared/exclusive wait on
//! `gc.lock` (`flock_wait`). The kernel drops a lock when its holder
//! dies, which is what lets another process take over from a leader
//! killed with SIGKILL.

use std::fmt;
use std::os::fd::OwnedFd;

use rustix::fs::{self as rfs, AtFlags, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use crate::cancel::Cancel;

/// Why a file lock could not be taken.
#[derive(Debug)]
#[non_exhaustive]
pub enum LockError {
    /// The caller's token was cancelled while it waited.
    Cancelled,
    /// Opening or locking the file failed.
    Io(std::io::Error),
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockError::Cancelled => f.write_str("cancelled"),
            LockError::Io(e) => e.fmt(f),
        }
    }
}

/// Takes `flock` on `fd` (exclusive or shared), waiting while another
/// open file holds it the other way. A blocked wait runs on a helper
/// thread so that `cancel` frees the caller at once; if the caller has
/// gone when the lock comes, the thread drops `fd`, which unlocks.
pub(crate) fn flock_wait(
    fd: OwnedFd,
    exclusive: bool,
    cancel: &Cancel,
) -> Result<OwnedFd, LockError> {
    let (try_op, op) = if exclusive {
        (
            FlockOperation::NonBlockingLockExclusive,
            FlockOperation::LockExclusive,
        )
    } else {
        (
            FlockOperation::NonBlockingLockShared,
            FlockOperation::LockShared,
        )
    };
    match rfs::flock(&fd, try_op) {
        Ok(()) => return Ok(fd),
        Err(Errno::WOULDBLOCK) => {}
        Err(e) => return Err(LockError::Io(e.into())),
    }
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("unlade-flock".into())
        .spawn(move || {
            let r = rfs::flock(&fd, op).map(|()| fd);
            let _ = tx.send(r);
        })
        .map_err(LockError::Io)?;
    crossbeam_channel::select! {
        recv(rx) -> r => match r {
            Ok(Ok(fd)) => Ok(fd),
            Ok(Err(e)) => Err(LockError::Io(e.into())),
            Err(_) => Err(LockError::Io(Errno::IO.into())),
        },
        recv(cancel.signal()) -> _ => Err(LockError::Cancelled),
    }
}

/// An exclusive `flock` on a file in a lock directory, held until drop.
/// The kernel releases it when the process dies, which is what lets a
/// waiting process take over from a leader killed with SIGKILL.
#[derive(Debug)]
pub struct FileLock {
    _fd: OwnedFd,
}

impl FileLock {
    /// Takes the lock `name` in `dir`, waiting (cancellably, see
    /// `flock_wait`) while another open file holds it.
    pub fn acquire(dir: &OwnedFd, name: &str, cancel: &Cancel) -> Result<FileLock, LockError> {
        loop {
            if cancel.is_cancelled() {
                return Err(LockError::Cancelled);
            }
            let fd = rfs::openat(
                dir,
                name,
                OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|e| LockError::Io(e.into()))?;
            let fd = flock_wait(fd, true, cancel)?;
            // The holder before us may have removed the file (gc does,
            // holding it): then our lock is on an orphan and means nothing.
            let held = rfs::fstat(&fd).map_err(|e| LockError::Io(e.into()))?;
            match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if st.st_ino == held.st_ino && st.st_dev == held.st_dev => {
                    return Ok(FileLock { _fd: fd })
                }
                Ok(_) | Err(Errno::NOENT) => continue,
                Err(e) => return Err(LockError::Io(e.into())),
            }
        }
    }

    /// Takes the lock only if nobody holds it.
    pub fn try_acquire(dir: &OwnedFd, name: &str) -> Result<Option<FileLock>, LockError> {
        let fd = rfs::openat(
            dir,
            name,
            OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| LockError::Io(e.into()))?;
        match rfs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(FileLock { _fd: fd })),
            Err(Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(LockError::Io(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn file_lock_waits_and_cancels() {
        let dir = std::env::temp_dir().join(format!("unlade-flock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fd = crate::store::statedir::open_dir(&dir).unwrap();
        let held = FileLock::acquire(&fd, "k", &Cancel::new()).unwrap();
        assert!(FileLock::try_acquire(&fd, "k").unwrap().is_none());
        let c = Cancel::new();
        let c2 = c.clone();
        std::thread::scope(|s| {
            let fdr = &fd;
            let w = s.spawn(move || FileLock::acquire(fdr, "k", &c2));
            std::thread::sleep(Duration::from_millis(30));
            c.cancel();
            assert!(matches!(w.join().unwrap(), Err(LockError::Cancelled)));
            let w2 = s.spawn(|| FileLock::acquire(&fd, "k", &Cancel::new()).is_ok());
            std::thread::sleep(Duration::from_millis(30));
            drop(held);
            assert!(w2.join().unwrap());
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
