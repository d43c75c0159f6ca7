//! The mounts unlade makes itself for containerd's active snapshots with
//! parents and its views of many layers (see `CtrStore::mounts`): overlay
//! by the new mount API, one
//! `lowerdir+` per layer (Linux 6.8 and later), so that no count of layers
//! meets mount(2)'s one page of options; older kernels get mount(2) with
//! the joined list.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::io::Errno;
use rustix::mount::{
    self as rmount, FsMountFlags, FsOpenFlags, MountAttrFlags, MountFlags, MoveMountFlags,
    UnmountFlags,
};

/// The `lowerdir=` value for `lowers`, top first.
pub fn join_lowers(lowers: &[PathBuf]) -> String {
    lowers
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

/// Whether `dir` is the root of a mount: its device differs from its
/// parent's (an overlay has a device of its own).
pub fn is_mount_point(dir: &Path) -> io::Result<bool> {
    let md = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let parent = dir.parent().unwrap_or(Path::new("/"));
    Ok(std::fs::symlink_metadata(parent)?.dev() != md.dev())
}

/// The mount points, other than `dir`, of the file system mounted at
/// `dir` (bind mounts of it, say), from `/proc/self/mountinfo`.
pub fn other_mounts(dir: &Path) -> io::Result<Vec<String>> {
    let dev = std::fs::symlink_metadata(dir)?.dev();
    let id = format!("{}:{}", rustix::fs::major(dev), rustix::fs::minor(dev));
    let me = dir.to_string_lossy();
    Ok(std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split(' ').collect();
            (w.get(2) == Some(&id.as_str()) && w.get(4) != Some(&me.as_ref()))
                .then(|| w.get(4).unwrap_or(&"?").to_string())
        })
        .collect())
}

/// Mounts an overlay of `upper` (with `work`) over `lowers` (top first) at
/// `target`.
pub fn overlay(target: &Path, lowers: &[PathBuf], upper: &Path, work: &Path) -> io::Result<()> {
    match overlay_fsconfig(target, lowers, Some((upper, work))) {
        Ok(()) => Ok(()),
        // No new mount API, or no `lowerdir+` (before 6.8).
        Err(Errno::NOSYS | Errno::INVAL) => {
            let data = format!(
                "index=off,lowerdir={},upperdir={},workdir={}",
                join_lowers(lowers),
                upper.display(),
                work.display()
            );
            let data = std::ffi::CString::new(data)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
            rmount::mount(
                "overlay",
                target,
                "overlay",
                MountFlags::empty(),
                data.as_c_str(),
            )
            .map_err(io::Error::from)
        }
        Err(e) => Err(e.into()),
    }
}

/// Mounts a read-only overlay of `lowers` (top first, at least two) at
/// `target`: a view of many layers, which as mount options for
/// containerd's mount helper would meet its one page (about 113 layers).
pub fn overlay_ro(target: &Path, lowers: &[PathBuf]) -> io::Result<()> {
    match overlay_fsconfig(target, lowers, None) {
        Ok(()) => Ok(()),
        Err(Errno::NOSYS | Errno::INVAL) => {
            let data = std::ffi::CString::new(format!("lowerdir={}", join_lowers(lowers)))
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
            rmount::mount(
                "overlay",
                target,
                "overlay",
                MountFlags::RDONLY,
                data.as_c_str(),
            )
            .map_err(io::Error::from)
        }
        Err(e) => Err(e.into()),
    }
}

fn overlay_fsconfig(
    target: &Path,
    lowers: &[PathBuf],
    upper_work: Option<(&Path, &Path)>,
) -> Result<(), Errno> {
    let fs = rmount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)?;
    rmount::fsconfig_set_string(&fs, "source", "overlay")?;
    rmount::fsconfig_set_string(&fs, "index", "off")?;
    for l in lowers {
        rmount::fsconfig_set_string(&fs, "lowerdir+", l.as_path())?;
    }
    if let Some((upper, work)) = upper_work {
        rmount::fsconfig_set_string(&fs, "upperdir", upper)?;
        rmount::fsconfig_set_string(&fs, "workdir", work)?;
    }
    rmount::fsconfig_create(&fs)?;
    let mnt = rmount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty())?;
    rmount::move_mount(
        &mnt,
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
}

/// Unmounts `target`; `detach` lazily (`MNT_DETACH`) when it is busy.
pub fn unmount(target: &Path, detach: bool) -> io::Result<()> {
    match rmount::unmount(target, UnmountFlags::NOFOLLOW) {
        Ok(()) => Ok(()),
        Err(Errno::BUSY) if detach => {
            rmount::unmount(target, UnmountFlags::NOFOLLOW | UnmountFlags::DETACH)
                .map_err(io::Error::from)
        }
        Err(e) => Err(e.into()),
    }
}
