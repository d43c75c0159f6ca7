//! The portable backend: one blocking syscall after another, all relative
//! to directory fds, every final component opened with `O_NOFOLLOW` or
//! operated on with `AT_SYMLINK_NOFOLLOW`.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::Timespec;
use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Timestamps, XattrFlags};
use rustix::io::Errno;

use super::{Done, Exec, Job, Meta, NodeKind, Op, OpError};
use crate::layer::tar::Time;

/// Runs jobs in order with plain syscalls. Works wherever Linux does.
#[derive(Debug, Default)]
pub struct Syscalls;

impl Exec for Syscalls {
    fn run(&mut self, jobs: Vec<Job>, done: &mut Vec<Done>) {
        for job in jobs {
            let id = job.id;
            done.push(Done {
                id,
                result: exec(job),
            });
        }
    }
}

/// Carries out one job: [`Syscalls::run`] calls it for each in turn, and
/// [`super::pool::Lane::run_here`] for the jobs an applier needs done
/// before it can go on (a directory it is about to look into).
pub(crate) fn exec(job: Job) -> Result<Option<OwnedFd>, OpError> {
    let dir = job.dir.as_fd();
    let name = job.name.as_c_str();
    match job.op {
        Op::File { data, size, meta } => {
            let fd = create_file(dir, name)?;
            let mut end = 0u64;
            for (off, chunk) in &data {
                write_all_at(&fd, chunk, *off)?;
                end = off + chunk.len() as u64;
            }
            if size != end {
                rfs::ftruncate(&fd, size).map_err(|e| OpError::new("truncate file", e))?;
            }
            set_meta_fd(fd.as_fd(), &meta, true)?;
            Ok(None)
        }
        Op::Open => Ok(Some(create_file(dir, name)?)),
        Op::Write { file, offset, data } => {
            write_all_at(&file, &data, offset)?;
            Ok(None)
        }
        Op::Finish { file, size, meta } => {
            let st = rfs::fstat(&*file).map_err(|e| OpError::new("stat file", e))?;
            if st.st_size as u64 != size {
                rfs::ftruncate(&*file, size).map_err(|e| OpError::new("truncate file", e))?;
            }
            set_meta_fd(file.as_fd(), &meta, true)?;
            Ok(None)
        }
        Op::Mkdir => {
            mkdir_keep(dir, name, Mode::from_raw_mode(0o700))?;
            Ok(None)
        }
        Op::MkdirParent { chown } => {
            mkdir_keep(dir, name, Mode::from_raw_mode(0o755))?;
            let fd = open_dir(dir, name).map_err(|e| OpError::new("open directory", e))?;
            if chown {
                rfs::fchown(&fd, Some(rfs::Uid::ROOT), Some(rfs::Gid::ROOT))
                    .map_err(|e| OpError::new("chown directory", e))?;
            }
            rfs::fchmod(&fd, Mode::from_raw_mode(0o755))
                .map_err(|e| OpError::new("chmod directory", e))?;
            Ok(None)
        }
        Op::Symlink { target, meta } => {
            replacing(dir, name, "create symlink", || {
                rfs::symlinkat(target.as_c_str(), dir, name)
            })?;
            set_meta_at(dir, name, &meta, false)?;
            Ok(None)
        }
        Op::Hardlink {
            target_dir,
            target_name,
        } => {
            replacing(dir, name, "create hard link", || {
                rfs::linkat(
                    &*target_dir,
                    target_name.as_c_str(),
                    dir,
                    name,
                    AtFlags::empty(),
                )
            })?;
            Ok(None)
        }
        Op::Node { kind, meta } => {
            let (ft, dev, mode) = match kind {
                NodeKind::Fifo => (FileType::Fifo, 0, meta.mode),
                NodeKind::Char(ma, mi) => {
                    (FileType::CharacterDevice, rfs::makedev(ma, mi), meta.mode)
                }
                NodeKind::Block(ma, mi) => (FileType::BlockDevice, rfs::makedev(ma, mi), meta.mode),
                NodeKind::Whiteout => (FileType::CharacterDevice, 0, 0),
            };
            replacing(dir, name, "create node", || {
                rfs::mknodat(dir, name, ft, Mode::from_raw_mode(mode & 0o7777), dev)
            })?;
            if kind == NodeKind::Whiteout {
                if let Some((u, g)) = meta.owner {
                    chown_at(dir, name, u, g)?;
                }
            } else {
                set_meta_at(dir, name, &meta, true)?;
            }
            Ok(None)
        }
        Op::DirMeta { meta, opaque } => {
            if opaque {
                rfs::fsetxattr(dir, c"trusted.overlay.opaque", b"y", XattrFlags::empty())
                    .map_err(|e| OpError::new("set xattr trusted.overlay.opaque", e))?;
            }
            if let Some(meta) = meta {
                set_meta_fd(dir, &meta, true)?;
            }
            Ok(None)
        }
    }
}

/// Opens a directory below `dir` without following a symlink at `name`.
pub(crate) fn open_dir(dir: BorrowedFd<'_>, name: &CStr) -> rustix::io::Result<OwnedFd> {
    rfs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Creates `name` in `dir` (0600, never following a symlink there),
/// replacing whatever is there.
pub(crate) fn create_file(dir: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd, OpError> {
    replacing(dir, name, "create file", || {
        rfs::openat(
            dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
    })
}

/// Runs `f`; if the name exists, removes it (a directory with its
/// contents) and runs `f` once more. Later entries replace earlier ones.
pub(crate) fn replacing<T>(
    dir: BorrowedFd<'_>,
    name: &CStr,
    what: &str,
    mut f: impl FnMut() -> rustix::io::Result<T>,
) -> Result<T, OpError> {
    match f() {
        Err(Errno::EXIST) => {
            remove_any(dir, name)?;
            f().map_err(|e| OpError::new(what, e))
        }
        r => r.map_err(|e| OpError::new(what, e)),
    }
}

/// `mkdirat`, keeping an existing directory and replacing anything else.
fn mkdir_keep(dir: BorrowedFd<'_>, name: &CStr, mode: Mode) -> Result<(), OpError> {
    match rfs::mkdirat(dir, name, mode) {
        Ok(()) => Ok(()),
        Err(Errno::EXIST) => {
            let st = rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| OpError::new("stat existing", e))?;
            if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                return Ok(());
            }
            remove_any(dir, name)?;
            rfs::mkdirat(dir, name, mode).map_err(|e| OpError::new("create directory", e))
        }
        Err(e) => Err(OpError::new("create directory", e)),
    }
}

/// Removes `name` from `dir`, recursively if it is a directory. A missing
/// name is not an error.
pub(crate) fn remove_any(dir: BorrowedFd<'_>, name: &CStr) -> Result<(), OpError> {
    match rfs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) => remove_tree(dir, name, 0),
        Err(e) => Err(OpError::new("remove existing", e)),
    }
}

/// Deepest directory tree removed; a path can be at most 4096 bytes, so no
/// legitimate tree is deeper than 2048 levels.
const MAX_REMOVE_DEPTH: usize = 2048;

fn remove_tree(dir: BorrowedFd<'_>, name: &CStr, depth: usize) -> Result<(), OpError> {
    if depth > MAX_REMOVE_DEPTH {
        return Err(OpError::new("remove existing directory", Errno::LOOP));
    }
    let fd = match open_dir(dir, name) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(OpError::new("open existing directory", e)),
    };
    let mut names: Vec<CString> = Vec::new();
    {
        let iter =
            rfs::Dir::read_from(&fd).map_err(|e| OpError::new("read existing directory", e))?;
        for ent in iter {
            let ent = ent.map_err(|e| OpError::new("read existing directory", e))?;
            let n = ent.file_name();
            if n != c"." && n != c".." {
                names.push(n.to_owned());
            }
        }
    }
    for n in &names {
        match rfs::unlinkat(&fd, n.as_c_str(), AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(Errno::ISDIR) | Err(Errno::PERM) => remove_tree(fd.as_fd(), n, depth + 1)?,
            Err(e) => return Err(OpError::new("remove existing", e)),
        }
    }
    rfs::unlinkat(dir, name, AtFlags::REMOVEDIR)
        .map_err(|e| OpError::new("remove existing directory", e))
}

/// `pwrite` until all of `data` is at `off`; a write of nothing is
/// `ENOSPC`.
pub(crate) fn write_all_at(fd: &OwnedFd, mut data: &[u8], mut off: u64) -> Result<(), OpError> {
    while !data.is_empty() {
        match rustix::io::pwrite(fd, data, off) {
            Ok(0) => return Err(OpError::new("write file", Errno::NOSPC)),
            Ok(n) => {
                data = &data[n..];
                off += n as u64;
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(OpError::new("write file", e)),
        }
    }
    Ok(())
}

fn timestamps(meta: &Meta) -> Timestamps {
    let ts = |t: Time| Timespec {
        tv_sec: t.secs,
        tv_nsec: i64::from(t.nanos),
    };
    Timestamps {
        last_access: ts(meta.atime.unwrap_or(meta.mtime)),
        last_modification: ts(meta.mtime),
    }
}

/// Sets metadata through an fd, in the order that keeps it: owner first
/// (chown clears setuid/setgid and file capabilities), then mode, then
/// xattrs (security.capability included), then times.
pub(crate) fn set_meta_fd(fd: BorrowedFd<'_>, meta: &Meta, chmod: bool) -> Result<(), OpError> {
    if let Some((u, g)) = meta.owner {
        rfs::fchown(fd, Some(uid(u)), Some(gid(g))).map_err(|e| OpError::new("chown", e))?;
    }
    if chmod {
        rfs::fchmod(fd, Mode::from_raw_mode(meta.mode & 0o7777))
            .map_err(|e| OpError::new("chmod", e))?;
    }
    for (k, v) in &meta.xattrs {
        rfs::fsetxattr(fd, k.as_c_str(), v, XattrFlags::empty())
            .map_err(|e| OpError::new(format!("set xattr {}", k.to_string_lossy()), e))?;
    }
    rfs::futimens(fd, &timestamps(meta)).map_err(|e| OpError::new("set times", e))
}

fn uid(u: u32) -> rfs::Uid {
    rfs::Uid::from_raw(u)
}

fn gid(g: u32) -> rfs::Gid {
    rfs::Gid::from_raw(g)
}

fn chown_at(dir: BorrowedFd<'_>, name: &CStr, u: u32, g: u32) -> Result<(), OpError> {
    rfs::chownat(
        dir,
        name,
        Some(uid(u)),
        Some(gid(g)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| OpError::new("chown", e))
}

/// Sets an xattr of `name` in `dir` without following a symlink there:
/// `setxattrat(AT_SYMLINK_NOFOLLOW)` on Linux 6.13 and later; before it,
/// `lsetxattr` on the directory fd's /proc entry plus the name (the last
/// component is not followed, and no path outside the fd is involved).
fn set_xattr_at(dir: BorrowedFd<'_>, name: &CStr, key: &CStr, value: &[u8]) -> std::io::Result<()> {
    match crate::sys::setxattr_nofollow(dir, name, key, value) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            let mut p =
                format!("/proc/self/fd/{}/", std::os::fd::AsRawFd::as_raw_fd(&dir)).into_bytes();
            p.extend_from_slice(name.to_bytes());
            let p = CString::new(p).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
            Ok(rfs::lsetxattr(
                p.as_c_str(),
                key,
                value,
                XattrFlags::empty(),
            )?)
        }
        r => r,
    }
}

/// Sets metadata of a non-openable object (symlink, FIFO, device) by name
/// in `dir`, never following a symlink at `name`.
pub(crate) fn set_meta_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    meta: &Meta,
    chmod: bool,
) -> Result<(), OpError> {
    if let Some((u, g)) = meta.owner {
        chown_at(dir, name, u, g)?;
    }
    if chmod {
        let mode = Mode::from_raw_mode(meta.mode & 0o7777);
        match crate::sys::chmod_nofollow(dir, name, mode) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                // Kernels before 6.6: plain fchmodat, after making sure the
                // name is not a symlink (nothing else writes in the target
                // while we do, so it cannot become one in between).
                let st = rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| OpError::new("stat", e))?;
                if FileType::from_raw_mode(st.st_mode) != FileType::Symlink {
                    rfs::chmodat(dir, name, mode, AtFlags::empty())
                        .map_err(|e| OpError::new("chmod", e))?;
                }
            }
            Err(e) => return Err(OpError::new("chmod", e)),
        }
    }
    for (k, v) in &meta.xattrs {
        set_xattr_at(dir, name, k, v)
            .map_err(|e| OpError::new(format!("set xattr {}", k.to_string_lossy()), e))?;
    }
    rfs::utimensat(dir, name, &timestamps(meta), AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| OpError::new("set times", e))
}
