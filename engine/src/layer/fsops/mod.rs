//! The file-system operations an applier asks for, and the backends that
//! carry them out.
//!
//! The applier turns tar entries into [`Job`]s and hands them over in
//! batches; a backend executes a batch and reports one [`Done`] per job, in
//! any order, naming the job so the applier can say which entry failed.
//! The applier only puts jobs in one batch that are independent of each
//! other (different names, existing parent directories, no hardlink to a
//! pending file), so a backend is free to run a batch's jobs concurrently:
//! that is the contract the io_uring backend relies on. The portable
//! [`syscalls::Syscalls`] backend runs them one after another.
//!
//! Every job names its parent directory by an open fd and the object by a
//! single component: nothing here ever resolves a path, so nothing here can
//! be steered outside the target by a symlink.

pub mod syscalls;

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
pub enum Op<'a> {
    /// Create a regular file with its whole contents and metadata.
    File {
        /// Data extents: (offset, bytes). Holes stay holes.
        data: Vec<(u64, Chunk<'a>)>,
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
        data: Chunk<'a>,
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
pub struct Job<'a> {
    /// Caller's tag, returned in [`Done`].
    pub id: usize,
    /// Parent directory (or, for [`Op::DirMeta`], the directory itself).
    pub dir: Arc<OwnedFd>,
    /// A single path component.
    pub name: CString,
    /// What to do.
    pub op: Op<'a>,
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
    pub id: usize,
    /// The fd of an [`Op::Open`], or nothing.
    pub result: Result<Option<OwnedFd>, OpError>,
}

/// Something that carries out batches of jobs.
pub trait Backend {
    /// Runs every job of `jobs` (draining it) and pushes one completion per
    /// job to `done`. Jobs of one batch are independent; see the module
    /// docs.
    fn run(&mut self, jobs: &mut Vec<Job<'_>>, done: &mut Vec<Done>);
}
