//! Hard links whose target lives in a lower layer.
//!
//! Layers of one image are applied in parallel, each into its own empty
//! upper directory. A layer's hard link to a file that an earlier layer
//! wrote finds no target there. A sequential unpacker on a mounted overlay
//! (containerd) never notices: overlayfs copies the target up into the
//! upper directory — its parent directories too, with their metadata —
//! and links there. [`copy_up`] does the same by hand: it finds the target
//! in the merged view of the lower layers (whiteouts and opaque
//! directories honoured), recreates the parents missing in the upper
//! directory with the lower ones' owner, mode, xattrs and times, and
//! copies the object with its metadata, so the link can then be made in
//! the upper directory. The lower layers are read-only here: every open
//! is `O_NOFOLLOW` relative to a layer directory fd.
//!
//! The caller decides when the lower layers are complete: a
//! [`LowerLayers`] blocks until the layers below are committed.

use std::ffi::{CStr, CString};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;

use crate::layer::error::{ApplyError, ErrorKind};
use crate::layer::fsops::syscalls::{open_dir, set_meta_at, set_meta_fd};
use crate::layer::fsops::Meta;
use crate::layer::tar::Time;

/// The layers below the one being applied, for hard links into them.
pub trait LowerLayers: Send + Sync + fmt::Debug {
    /// Waits until every layer below is complete and returns their
    /// directories, top first.
    fn dirs(&self) -> Result<Vec<PathBuf>, ApplyError>;
}

const OPAQUE_XATTR: &CStr = c"trusted.overlay.opaque";

fn fs_err(op: &str, path: &[u8], e: impl Into<io::Error>) -> ApplyError {
    ApplyError::fs(
        format!("copy up {:?}: {op}", String::from_utf8_lossy(path)),
        e.into(),
    )
}

fn not_found(path: &[u8], why: &str) -> ApplyError {
    ApplyError::fs(
        format!("hard link target {:?} {why}", String::from_utf8_lossy(path)),
        Errno::NOENT.into(),
    )
}

fn is_whiteout(st: &rfs::Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0
}

fn is_opaque(fd: BorrowedFd<'_>) -> bool {
    let mut v = [0u8; 4];
    matches!(rfs::fgetxattr(fd, OPAQUE_XATTR, &mut v), Ok(1) if v[0] == b'y')
}

/// Finds normalized `target` in the merged view of `lowers` (top first)
/// and copies it (and any missing parent directory) into `upper`.
pub fn copy_up(
    upper: &OwnedFd,
    lowers: &[PathBuf],
    target: &[u8],
    same_owner: bool,
) -> Result<(), ApplyError> {
    let comps: Vec<&[u8]> = target.split(|&b| b == b'/').collect();
    let (last, parents) = comps
        .split_last()
        .ok_or_else(|| not_found(target, "is empty"))?;
    let mut layers = Vec::with_capacity(lowers.len());
    for l in lowers {
        let fd = rfs::open(
            l,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ApplyError::fs(format!("open lower layer {}", l.display()), e.into()))?;
        layers.push(fd);
    }
    let mut up = rustix::io::dup(upper).map_err(|e| fs_err("dup", target, e))?;
    // Directories copied up, to give their times back once the object is
    // in (creating it touched the deepest one), as overlayfs does.
    let mut made: Vec<(OwnedFd, rfs::Stat)> = Vec::new();
    for (k, comp) in parents.iter().enumerate() {
        let so_far = &target[..comps[..=k].iter().map(|c| c.len() + 1).sum::<usize>() - 1];
        let name = CString::new(*comp).map_err(|_| not_found(target, "has a NUL byte"))?;
        let mut next = Vec::new();
        for fd in &layers {
            match rfs::statat(fd, &name, AtFlags::SYMLINK_NOFOLLOW) {
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(fs_err("stat lower", so_far, e)),
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                    let d = open_dir(fd.as_fd(), &name)
                        .map_err(|e| fs_err("open lower directory", so_far, e))?;
                    let opaque = is_opaque(d.as_fd());
                    next.push(d);
                    if opaque {
                        break;
                    }
                }
                Ok(st)
                    if FileType::from_raw_mode(st.st_mode) == FileType::Symlink
                        && next.is_empty() =>
                {
                    return Err(ApplyError::new(ErrorKind::Invalid(format!(
                        "hard link target {:?}: its parent {:?} is a symlink in a lower \
                         layer (not supported with parallel apply)",
                        String::from_utf8_lossy(target),
                        String::from_utf8_lossy(so_far)
                    ))));
                }
                // A whiteout or a non-directory hides everything below.
                Ok(_) => break,
            }
        }
        if next.is_empty() {
            return Err(not_found(target, "is in no lower layer"));
        }
        up = match rfs::statat(&up, &name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                let d = open_dir(up.as_fd(), &name).map_err(|e| fs_err("open upper", so_far, e))?;
                if is_opaque(d.as_fd()) {
                    return Err(not_found(target, "is hidden by an opaque directory"));
                }
                d
            }
            Ok(_) => return Err(not_found(target, "is hidden by this layer")),
            Err(Errno::NOENT) => {
                let st = copy_dir(next[0].as_fd(), up.as_fd(), &name, same_owner)
                    .map_err(|e| fs_err("copy directory", so_far, e))?;
                let d = open_dir(up.as_fd(), &name).map_err(|e| fs_err("open upper", so_far, e))?;
                made.push((
                    rustix::io::dup(&d).map_err(|e| fs_err("dup", so_far, e))?,
                    st,
                ));
                d
            }
            Err(e) => return Err(fs_err("stat upper", so_far, e)),
        };
        layers = next;
    }
    let name = CString::new(*last).map_err(|_| not_found(target, "has a NUL byte"))?;
    for fd in &layers {
        match rfs::statat(fd, &name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(fs_err("stat lower", target, e)),
            Ok(st) if is_whiteout(&st) => break,
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                return Err(ApplyError::new(ErrorKind::Invalid(format!(
                    "hard link target {:?} is a directory",
                    String::from_utf8_lossy(target)
                ))));
            }
            Ok(st) => {
                // Copying up does not change the directory's times (the
                // merged view shows this upper directory's), as overlayfs.
                let pst = rfs::fstat(&up).map_err(|e| fs_err("stat upper", target, e))?;
                copy_object(fd.as_fd(), &st, up.as_fd(), &name, same_owner)
                    .map_err(|e| fs_err("copy", target, e))?;
                rfs::futimens(&up, &times(&pst)).map_err(|e| fs_err("set times", target, e))?;
                for (d, st) in made.iter().rev() {
                    rfs::futimens(d, &times(st)).map_err(|e| fs_err("set times", target, e))?;
                }
                return Ok(());
            }
        }
    }
    Err(not_found(target, "is in no lower layer"))
}

/// The xattrs of an open object worth copying (overlay's own excluded).
fn xattrs_of(fd: BorrowedFd<'_>) -> rustix::io::Result<Vec<(CString, Vec<u8>)>> {
    let mut names = vec![0u8; 64 << 10];
    let n = match rfs::flistxattr(fd, &mut names) {
        Ok(n) => n,
        Err(Errno::NOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for k in names[..n].split(|&b| b == 0).filter(|k| !k.is_empty()) {
        if k.starts_with(b"trusted.overlay.") {
            continue;
        }
        let key = CString::new(k).map_err(|_| Errno::INVAL)?;
        let mut v = vec![0u8; 64 << 10];
        let len = rfs::fgetxattr(fd, &key, &mut v)?;
        v.truncate(len);
        out.push((key, v));
    }
    Ok(out)
}

/// The metadata of lower object `st` for its copy, as an entry's is
/// given ([`set_meta_fd`], [`set_meta_at`]): its mode, times and
/// `xattrs`, and its owner when owners are kept.
fn meta_of(st: &rfs::Stat, xattrs: Vec<(CString, Vec<u8>)>, same_owner: bool) -> Meta {
    Meta {
        owner: same_owner.then_some((st.st_uid, st.st_gid)),
        mode: st.st_mode & 0o7777,
        mtime: Time {
            secs: st.st_mtime,
            nanos: st.st_mtime_nsec as u32,
        },
        atime: Some(Time {
            secs: st.st_atime,
            nanos: st.st_atime_nsec as u32,
        }),
        xattrs,
    }
}

/// Gives `to` the owner, mode, xattrs and times of `st`/`from`.
fn copy_meta(
    from: BorrowedFd<'_>,
    st: &rfs::Stat,
    to: BorrowedFd<'_>,
    same_owner: bool,
) -> io::Result<()> {
    let meta = meta_of(st, xattrs_of(from)?, same_owner);
    set_meta_fd(to, &meta, true).map_err(|e| e.err)
}

fn times(st: &rfs::Stat) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: Timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec as _,
        },
    }
}

fn copy_dir(
    lower: BorrowedFd<'_>,
    up: BorrowedFd<'_>,
    name: &CStr,
    same_owner: bool,
) -> io::Result<rfs::Stat> {
    let st = rfs::fstat(lower)?;
    rfs::mkdirat(up, name, Mode::from_raw_mode(0o700))?;
    let d = open_dir(up, name)?;
    copy_meta(lower, &st, d.as_fd(), same_owner)?;
    Ok(st)
}

fn copy_object(
    ldir: BorrowedFd<'_>,
    st: &rfs::Stat,
    up: BorrowedFd<'_>,
    name: &CStr,
    same_owner: bool,
) -> io::Result<()> {
    // Symlinks and special files are not opened: their owner, mode and
    // times are set by name, never following a symlink; their xattrs are
    // not copied.
    let by_name = |chmod| set_meta_at(up, name, &meta_of(st, Vec::new(), same_owner), chmod);
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => {
            let src = rfs::openat(
                ldir,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let dst = rfs::openat(
                up,
                name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )?;
            let mut left = st.st_size as u64;
            while left > 0 {
                let n = rfs::copy_file_range(&src, None, &dst, None, left as usize)?;
                if n == 0 {
                    return Err(Errno::IO.into());
                }
                left -= n as u64;
            }
            copy_meta(src.as_fd(), st, dst.as_fd(), same_owner)
        }
        FileType::Symlink => {
            let target = rfs::readlinkat(ldir, name, Vec::new())?;
            rfs::symlinkat(&target, up, name)?;
            by_name(false).map_err(|e| e.err)
        }
        ft @ (FileType::Fifo | FileType::CharacterDevice | FileType::BlockDevice) => {
            rfs::mknodat(up, name, ft, Mode::from_raw_mode(0o600), st.st_rdev)?;
            by_name(true).map_err(|e| e.err)
        }
        _ => Err(Errno::OPNOTSUPP.into()),
    }
}
