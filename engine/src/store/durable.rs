//! Durability of what a layer wrote, before its commit becomes visible.
//!
//! containerd's answer is `syncfs` of the whole file system, which also
//! waits for every other writer's dirty data. [`sync_tree`] syncs only the
//! snapshot's own tree: one walk (fd-relative, never following a symlink)
//! starts writeback of every regular file as it is found
//! (`sync_file_range(WRITE)`, non-blocking), then the files are `fsync`ed
//! by a few threads at once — concurrent fsyncs share journal commits — and
//! finally every directory, so the names are durable too. The unpack
//! pipeline runs it after a layer's apply, outside the apply permit, so it
//! overlaps the next layers' applies; the commit rename follows, then an
//! fsync of `committed/` makes the rename itself durable.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{self as rfs, Dir, FileType, Mode, OFlags};

/// How snapshots are made durable before their commit.
///
/// With the `cli` feature it is also the `--sync-mode` value of `unlade
/// unpack` (`written`, `syncfs`; `--sync` itself asks for durability, so
/// `None` is no value there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Durability {
    /// Not at all (the page cache holds them until writeback): fastest,
    /// and what containerd does by default.
    #[default]
    #[cfg_attr(feature = "cli", value(skip))]
    None,
    /// `syncfs` of the file system holding the snapshot (containerd's
    /// opt-in).
    #[cfg_attr(
        feature = "cli",
        value(help = "syncfs of the file system holding the snapshot, per layer")
    )]
    Syncfs,
    /// [`sync_tree`]: exactly the files and directories the layer wrote.
    #[cfg_attr(
        feature = "cli",
        value(help = "fsync what each layer wrote, overlapped with the next layers")
    )]
    Written,
}

/// Files fsynced per round: bounds the fds held open.
const CHUNK: usize = 2048;
/// Threads issuing fsyncs at once.
const SYNC_THREADS: usize = 8;

/// What [`sync_tree`] synced.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncCounts {
    /// Regular files fsynced.
    pub files: u64,
    /// Directories fsynced (after their entries).
    pub dirs: u64,
}

fn fsync_all(fds: &mut Vec<OwnedFd>) -> io::Result<()> {
    let per = fds.len().div_ceil(SYNC_THREADS).max(1);
    let r: io::Result<()> = std::thread::scope(|s| {
        let hs: Vec<_> = fds
            .chunks(per)
            .map(|c| {
                let sync = move || {
                    for fd in c {
                        rfs::fsync(fd)?;
                    }
                    Ok::<(), io::Error>(())
                };
                // A thread the system refuses: the same fsyncs, here.
                std::thread::Builder::new()
                    .name("unlade-fsync".into())
                    .spawn_scoped(s, sync)
                    .map_err(|_| sync)
            })
            .collect();
        for h in hs {
            match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("fsync thread panicked")))?,
                Err(sync) => sync()?,
            }
        }
        Ok(())
    });
    fds.clear();
    r
}

/// Makes every file and directory below (and including) `dir` durable.
pub fn sync_tree(dir: &Path) -> io::Result<SyncCounts> {
    let top = rfs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut counts = SyncCounts::default();
    let mut files = Vec::with_capacity(CHUNK);
    let mut dirs: Vec<OwnedFd> = Vec::new();
    let mut stack = vec![top];
    while let Some(d) = stack.pop() {
        let mut names = Vec::new();
        for ent in Dir::read_from(&d)? {
            let ent = ent?;
            let name = ent.file_name();
            if name.to_bytes() == b"." || name.to_bytes() == b".." {
                continue;
            }
            let mut ft = ent.file_type();
            if ft == FileType::Unknown {
                let st = rfs::statat(&d, name, rfs::AtFlags::SYMLINK_NOFOLLOW)?;
                ft = FileType::from_raw_mode(st.st_mode);
            }
            // Never open anything else: a device node of a layer could be
            // a real device of this machine. Symlinks, devices and FIFOs
            // are metadata, made durable with their directory.
            if ft == FileType::Directory || ft == FileType::RegularFile {
                names.push((CString::from(name), ft));
            }
        }
        for (name, ft) in names {
            let mut flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            if ft == FileType::Directory {
                flags |= OFlags::DIRECTORY;
            }
            let fd = rfs::openat(&d, &name, flags, Mode::empty())?;
            let st = rfs::fstat(&fd)?;
            match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory if ft == FileType::Directory => stack.push(fd),
                FileType::RegularFile if ft == FileType::RegularFile => {
                    crate::sys::start_writeback(fd.as_fd())?;
                    files.push(fd);
                    counts.files += 1;
                    if files.len() >= CHUNK {
                        fsync_all(&mut files)?;
                    }
                }
                _ => {}
            }
        }
        dirs.push(d);
        counts.dirs += 1;
        if dirs.len() >= CHUNK {
            fsync_all(&mut files)?;
            fsync_all(&mut dirs)?;
        }
    }
    fsync_all(&mut files)?;
    fsync_all(&mut dirs)?;
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syncs_files_and_dirs_without_following_links() {
        let t = std::env::temp_dir().join(format!("unlade-durable-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        std::fs::create_dir_all(t.join("a/b")).unwrap();
        std::fs::write(t.join("a/b/f"), b"x").unwrap();
        std::fs::write(t.join("g"), b"y").unwrap();
        std::os::unix::fs::symlink("/etc", t.join("a/link")).unwrap();
        let c = sync_tree(&t).unwrap();
        assert_eq!(c, SyncCounts { files: 2, dirs: 3 });
        std::fs::remove_dir_all(&t).unwrap();
    }
}
