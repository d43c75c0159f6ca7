//! The file-system operations an applier asks for, and the backends that
//! carry them out.
//!
//! The applier turns tar entries into [`Job`]s and hands them to a
//! [`pool::Lane`]: its apply's way into a [`pool::Pool`] of worker threads
//! (one per CPU by default, pinned, shared by every layer a root applies
//! at once). A job goes to the worker chosen by its parent directory, so
//! one directory's creates stay on one worker (the kernel serializes them
//! anyway) while other directories proceed on other workers. Completions
//! ([`Done`]) come back later, each naming its job.
//!
//! What runs in what order is the applier's to decide: it tracks the
//! paths with jobs in flight and waits only where an entry depends on one
//! (a parent that must exist, a hard link's target, a name replaced from
//! another worker). A worker runs the batches it gets in order, and the
//! jobs of one batch are independent of each other (different names, no
//! link to a file of the same batch), so an executor ([`Exec`]) may run a
//! batch's jobs concurrently: the io_uring executor ([`uring::Uring`])
//! keeps a batch's creates and writes in flight at once, which lets one
//! worker's batch (one directory's files) use more than one CPU. The
//! portable [`syscalls::Syscalls`] executor runs them one after another.
//!
//! Every job names its parent directory by an open fd and the object by a
//! single component: nothing here ever resolves a path, so nothing here can
//! be steered outside the target by a symlink.

pub mod pool;
pub mod syscalls;
pub mod uring;

use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::layer::stream::Chunk;
use crate::layer::tar::Time;

/// Ownership, mode, times and xattrs to give an object.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    /// Owner; `None` keeps the creating process's (non-root extraction).
    pub owner: Option<(u32, u32)>,
    /// Permission bits incl. setuid/setgid/sticky.
    pub mode: u32,
    /// Modification time.
    pub mtime: Time,
    /// Access time (defaults to the modification time).
    pub atime: Option<Time>,
    /// Extended attributes to set, in order.
    pub xattrs: Vec<(CString, Vec<u8>)>,
}

/// What kind of special file to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// A named pipe.
    Fifo,
    /// A character device (major, minor).
    Char(u32, u32),
    /// A block device (major, minor).
    Block(u32, u32),
    /// An overlayfs whiteout: a 0:0 character device with mode 0 and only
    /// the owner set, as containerd writes them.
    Whiteout,
}

/// One file-system operation relative to a directory fd. Every creating
/// operation replaces whatever is at the name already (a directory with
/// everything in it), except [`Op::Mkdir`], which keeps an existing
/// directory.
#[derive(Debug)]
pub enum Op {
    /// Create a regular file with its whole contents and metadata.
    File {
        /// Data extents: (offset, bytes). Holes stay holes.
        data: Vec<(u64, Chunk)>,
        /// Final size (past the last extent for sparse files).
        size: u64,
        /// Metadata.
        meta: Meta,
    },
    /// Create an empty regular file and return its fd in [`Done`], for a
    /// file written piecewise with [`Op::Write`] and [`Op::Finish`].
    Open,
    /// Write bytes at an offset of a file from [`Op::Open`].
    Write {
        /// The open file.
        file: Arc<OwnedFd>,
        /// Byte offset in the file of the first byte of `data`.
        offset: u64,
        /// The bytes to write there.
        data: Chunk,
    },
    /// Set the size and metadata of a file from [`Op::Open`].
    Finish {
        /// The open file.
        file: Arc<OwnedFd>,
        /// Final size.
        size: u64,
        /// Metadata.
        meta: Meta,
    },
    /// Make a directory (mode 0700 until [`Op::DirMeta`] restores its
    /// own); an existing directory is kept, anything else is replaced.
    Mkdir,
    /// Make a directory for a missing parent: mode 0755, owned by root
    /// where `owner` is set.
    MkdirParent {
        /// Whether to chown to 0:0.
        chown: bool,
    },
    /// Create a symlink, stored verbatim.
    Symlink {
        /// Link target.
        target: CString,
        /// Metadata (the mode is ignored: symlinks have none).
        meta: Meta,
    },
    /// Create a hard link to an existing object (a symlink is linked
    /// itself, never followed).
    Hardlink {
        /// Directory of the target.
        target_dir: Arc<OwnedFd>,
        /// Name of the target in it.
        target_name: CString,
    },
    /// Create a FIFO, device node or whiteout.
    Node {
        /// FIFO, character or block device (with its numbers), or
        /// whiteout.
        kind: NodeKind,
        /// Metadata.
        meta: Meta,
    },
    /// Set metadata of the directory `dir` itself (the job's `name` is
    /// unused): the delayed directory restore, after all children exist.
    DirMeta {
        /// Metadata (`None`: only the opaque marker).
        meta: Option<Meta>,
        /// Also mark it opaque for overlayfs (`trusted.overlay.opaque=y`).
        opaque: bool,
    },
}

/// An operation with its place: the parent directory and the name in it.
#[derive(Debug)]
pub struct Job {
    /// Caller's tag, returned in [`Done`].
    pub id: u64,
    /// Parent directory (or, for [`Op::DirMeta`], the directory itself).
    pub dir: Arc<OwnedFd>,
    /// A single path component.
    pub name: CString,
    /// What to do.
    pub op: Op,
}

/// Why an operation failed: the step and the OS error.
#[derive(Debug)]
pub struct OpError {
    /// The step, e.g. "create file", "set xattr user.x".
    pub op: String,
    /// What the system said (`ENOSPC`, `EACCES`, …).
    pub err: io::Error,
}

impl OpError {
    pub(crate) fn new(op: impl Into<String>, err: impl Into<io::Error>) -> Self {
        OpError {
            op: op.into(),
            err: err.into(),
        }
    }
}

/// Completion of one job.
#[derive(Debug)]
pub struct Done {
    /// The job's `id`.
    pub id: u64,
    /// The fd of an [`Op::Open`], or nothing.
    pub result: Result<Option<OwnedFd>, OpError>,
}

impl Job {
    /// Bytes of file data the job writes (what sizes a batch).
    pub fn data_bytes(&self) -> usize {
        match &self.op {
            Op::File { data, .. } => data.iter().map(|(_, c)| c.len()).sum(),
            Op::Write { data, .. } => data.len(),
            _ => 0,
        }
    }

    /// Bytes the job keeps alive that nothing else does (copies out of a
    /// streaming source): what bounds memory in flight.
    pub fn owned_bytes(&self) -> usize {
        match &self.op {
            Op::File { data, .. } => data.iter().map(|(_, c)| c.owned_bytes()).sum(),
            Op::Write { data, .. } => data.owned_bytes(),
            _ => 0,
        }
    }
}

/// What carries out batches of jobs on one worker thread: one per worker,
/// made on that thread (an io_uring ring is then owned by the thread that
/// submits to it).
pub trait Exec {
    /// Runs every job of `jobs` and pushes one completion per job to
    /// `done`, in any order. Jobs of one batch are independent (see the
    /// module docs); batches given to one executor must complete in the
    /// order given.
    fn run(&mut self, jobs: Vec<Job>, done: &mut Vec<Done>);
}

/// Which executor the workers use.
///
/// With the `cli` feature it is also the `--backend` value of the commands
/// that write (`auto`, `uring`, `syscalls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum BackendKind {
    /// The one measured faster on the target's file system
    /// (perf/README.md, "Backends": io_uring on ext4, plain syscalls
    /// elsewhere), falling back to plain syscalls, with one log line,
    /// where io_uring is unavailable.
    #[default]
    #[cfg_attr(
        feature = "cli",
        value(
            help = "io_uring on ext4 (measured faster there), plain syscalls elsewhere \
                    and where io_uring is unavailable"
        )
    )]
    Auto,
    /// io_uring rings, one per worker; an error where the kernel refuses
    /// them.
    #[cfg_attr(feature = "cli", value(help = "io_uring, one ring per worker"))]
    Uring,
    /// Plain blocking syscalls on each worker: works wherever Linux does.
    #[cfg_attr(feature = "cli", value(help = "Plain syscalls on each worker"))]
    Syscalls,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Auto => "auto",
            BackendKind::Uring => "uring",
            BackendKind::Syscalls => "syscalls",
        })
    }
}

impl BackendKind {
    /// The executor `auto` picks for writing below `target` (or its
    /// nearest existing ancestor), before asking the kernel for io_uring:
    /// what a runtime (or a test) checks to know which backend an apply
    /// there means to use. Never `Auto`.
    pub fn auto_for(target: &std::path::Path) -> BackendKind {
        auto_choice(fs_type(target))
    }
}

/// How to build the worker pool of an apply or a root.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendOptions {
    /// Which executor.
    pub kind: BackendKind,
    /// Worker threads; `None`: the CPUs this process may run on (its
    /// affinity mask).
    pub threads: Option<usize>,
}

/// `statfs` magic numbers (`f_type`) of the file systems where the
/// io_uring backend measured as fast as plain syscalls with the CPUs free,
/// and much faster with them shared (perf/README.md, "Backends"): ext4 (whose
/// driver also mounts ext2/ext3, same magic). Not tmpfs: there, with the
/// CPUs free, plain syscalls were as fast or up to 15% faster (the ring
/// costs a few percent of CPU, which shows where the file system's own
/// work is cheap).
const URING_FASTER_ON: [i64; 1] = [0xEF53];

/// The `f_type` of the file system holding `path` (or the nearest
/// existing ancestor of it: a target is often created by the apply).
pub(crate) fn fs_type(path: &std::path::Path) -> Option<i64> {
    let mut p = Some(path);
    while let Some(q) = p {
        match rustix::fs::statfs(q) {
            // `__fsword_t`: i64 on 64-bit Linux, i32 elsewhere.
            #[allow(clippy::unnecessary_cast)]
            Ok(st) => return Some(st.f_type as i64),
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => p = q.parent(),
            Err(_) => return None,
        }
    }
    None
}

/// What `auto` runs for a target on the file system `fs_type` (`None`:
/// unknown): io_uring where it measured faster (ext4), plain syscalls on
/// tmpfs and on file systems it was not measured on.
pub(crate) fn auto_choice(fs_type: Option<i64>) -> BackendKind {
    match fs_type {
        Some(t) if URING_FASTER_ON.contains(&t) => BackendKind::Uring,
        _ => BackendKind::Syscalls,
    }
}

/// Makes a worker's executor, on that worker's thread.
pub(crate) fn make_exec(kind: BackendKind) -> io::Result<Box<dyn Exec>> {
    match kind {
        BackendKind::Uring => Ok(Box::new(uring::Uring::new()?)),
        BackendKind::Auto | BackendKind::Syscalls => Ok(Box::new(syscalls::Syscalls)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_uring_only_where_it_measured_faster() {
        assert_eq!(auto_choice(Some(0xEF53)), BackendKind::Uring);
        // tmpfs (measured no faster), XFS, btrfs, overlayfs (not
        // measured).
        for t in [0x0102_1994, 0x5846_5342, 0x9123_683E, 0x794C_7630] {
            assert_eq!(auto_choice(Some(t)), BackendKind::Syscalls);
        }
        assert_eq!(auto_choice(None), BackendKind::Syscalls);
    }

    #[test]
    fn fs_type_of_a_missing_target_is_its_ancestors() {
        let tmp = std::env::temp_dir();
        let want = fs_type(&tmp);
        assert!(want.is_some());
        assert_eq!(fs_type(&tmp.join("unlade-no-such/dir/below")), want);
    }
}
