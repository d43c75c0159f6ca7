//! The io_uring backend: one ring per worker thread, each batch's file
//! creates and data writes in flight at once on it, the rest of a job
//! with the same plain syscalls as [`super::syscalls`].
//!
//! For a batch, every `openat` of its files goes on the ring first, with
//! the writes of jobs that already have an fd ([`Op::Write`]) and the
//! hard links and symlinks; the jobs the ring has no use for (metadata of
//! directories, device nodes, [`Op::Finish`]) then run inline while the
//! kernel works through the ring. As each file's open completes, its
//! writes are queued; as its last write completes, its owner, mode,
//! xattrs and times are set through its fd (io_uring has no operation for
//! any of these on an fd) in the order [`super::syscalls`] keeps, and the
//! fd is closed. A name that exists already (`EEXIST`) is replaced the
//! way the syscalls backend does it, inline; errors name the same steps
//! ("create file", "write file", …), so which backend ran does not show
//! in what an apply reports.
//!
//! The kernel runs an `openat` with `O_CREAT`, and on most file systems a
//! buffered write, on an io-wq worker thread, never inline: the ring bounds
//! those threads per worker (`RingOptions::iowq_max`) instead of letting
//! the kernel start one per file of a batch.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use rustix::fs::AtFlags;
use rustix::io::Errno;

use super::syscalls;
use super::{Done, Exec, Job, Meta, Op, OpError};
use crate::layer::stream::Chunk;
use crate::sys::uring::{self as ring, Completion, Ring, RingOptions, Value};

/// Flags of every file create: a new file only (an existing name is
/// replaced explicitly), never through a symlink.
const CREATE: i32 =
    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;

/// What can be tuned without a rebuild, for measuring
/// (`UNLADE_URING=iowq=B:U,links=0|1,close=0|1`). The defaults are what
/// measured best (perf/README.md, "Backends").
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// io-wq workers per thread: bounded (regular files), unbounded.
    pub iowq_max: [u32; 2],
    /// Symlinks and hard links through the ring (else plain syscalls).
    pub links: bool,
    /// Files closed through the ring (else `close(2)`).
    pub close: bool,
    /// Submission queue entries.
    pub entries: u32,
    /// Most bytes per write SQE (tests make it small to exercise the
    /// continuation of short writes).
    pub max_write: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            iowq_max: [2, 2],
            links: false,
            close: false,
            entries: 64,
            max_write: ring::MAX_WRITE,
        }
    }
}

impl Tuning {
    /// The defaults, changed by `UNLADE_URING` where it is set; a value
    /// that does not parse keeps the default.
    pub fn from_env() -> Self {
        let mut t = Tuning::default();
        let Ok(s) = std::env::var("UNLADE_URING") else {
            return t;
        };
        for kv in s.split(',') {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let flag = v != "0";
            match k.trim() {
                "iowq" => {
                    let mut it = v.split(':').map(|n| n.trim().parse::<u32>());
                    if let (Some(Ok(b)), Some(Ok(u))) = (it.next(), it.next()) {
                        t.iowq_max = [b, u];
                    }
                }
                "links" => t.links = flag,
                "close" => t.close = flag,
                "entries" => {
                    if let Ok(n) = v.trim().parse::<u32>() {
                        t.entries = n;
                    }
                }
                _ => {}
            }
        }
        t
    }
}

/// Runs each batch's creates and writes concurrently on an io_uring ring
/// owned by the worker thread; see the module docs.
#[derive(Debug)]
pub struct Uring {
    ring: Ring<Chunk>,
    tuning: Tuning,
    /// Set once `io_uring_enter` failed: the ring's state is unknown, so
    /// every later job runs with plain syscalls.
    broken: bool,
    cqes: Vec<Completion<Chunk>>,
}

/// A job of the batch being run, between its pushes and its [`Done`]:
/// what its completions need (its id, its file's state), since the ring
/// gives back only a tag, the task's index in [`Batch::tasks`].
enum Task {
    /// An [`Op::File`]: opening, then writing.
    File {
        id: u64,
        /// The extents, until the file is open.
        data: Vec<(u64, Chunk)>,
        size: u64,
        meta: Meta,
        /// Its fd once open: the file is finished only then.
        fd: Option<Arc<OwnedFd>>,
        /// End of the last extent.
        end: u64,
        /// Ring writes of this job in flight.
        ops: usize,
        /// The first error seen, reported once nothing is in flight.
        err: Option<OpError>,
    },
    /// An [`Op::Open`].
    Open { id: u64 },
    /// An [`Op::Write`].
    Write {
        id: u64,
        /// Ring writes of this job in flight.
        ops: usize,
        /// The first error seen, reported once nothing is in flight.
        err: Option<OpError>,
    },
    /// An [`Op::Symlink`] on the ring.
    Symlink { id: u64, meta: Meta },
    /// An [`Op::Hardlink`] on the ring.
    Hardlink { id: u64 },
    /// A file closing on the ring after everything else succeeded.
    Closing { id: u64 },
    /// Its [`Done`] is out.
    Over,
}

impl Task {
    /// An [`Op::File`] before its open: its extents wait for the fd.
    fn file(id: u64, data: Vec<(u64, Chunk)>, size: u64, meta: Meta) -> Self {
        Task::File {
            id,
            data,
            size,
            meta,
            fd: None,
            end: 0,
            ops: 0,
            err: None,
        }
    }

    /// The job's id, while its [`Done`] is not out: a task gets one
    /// [`Done`], and never a second.
    fn id(&self) -> Option<u64> {
        match self {
            Task::File { id, .. }
            | Task::Open { id }
            | Task::Write { id, .. }
            | Task::Symlink { id, .. }
            | Task::Hardlink { id }
            | Task::Closing { id } => Some(*id),
            Task::Over => None,
        }
    }

    /// Whether a completion of `op` is one this task waits for: the one
    /// place that says which operations each kind of task has on the
    /// ring, so that a stray completion (none is expected) is dropped
    /// rather than handled as something it is not.
    fn expects(&self, op: Option<&ring::Op<Chunk>>) -> bool {
        match op {
            Some(ring::Op::OpenAt { .. }) => matches!(self, Task::File { .. } | Task::Open { .. }),
            Some(ring::Op::Write { .. }) => matches!(self, Task::File { .. } | Task::Write { .. }),
            Some(ring::Op::SymlinkAt { .. }) => matches!(self, Task::Symlink { .. }),
            Some(ring::Op::LinkAt { .. }) => matches!(self, Task::Hardlink { .. }),
            // A close's completion gives no operation back.
            Some(ring::Op::Close(_)) => false,
            None => matches!(self, Task::Closing { .. }),
        }
    }

    /// The writes in flight and the first error of a task that writes (a
    /// file, or a write to an opened one): the two things its writes, on
    /// the ring or inline, update.
    fn writes(&mut self) -> Option<(&mut usize, &mut Option<OpError>)> {
        match self {
            Task::File { ops, err, .. } | Task::Write { ops, err, .. } => Some((ops, err)),
            _ => None,
        }
    }
}

impl Uring {
    /// A ring for the calling worker thread, tuned from `UNLADE_URING`.
    /// Fails where io_uring is unavailable: disabled
    /// (`kernel.io_uring_disabled`), filtered by seccomp, short of locked
    /// memory, or a kernel without an opcode this backend uses.
    pub fn new() -> io::Result<Self> {
        Uring::with_tuning(Tuning::from_env())
    }

    /// A ring tuned as `tuning` says.
    pub fn with_tuning(tuning: Tuning) -> io::Result<Self> {
        let ring = Ring::new(RingOptions {
            entries: tuning.entries,
            iowq_max: tuning.iowq_max,
            max_write: tuning.max_write,
        })?;
        Ok(Uring {
            ring,
            tuning,
            broken: false,
            cqes: Vec::new(),
        })
    }

    /// The ring setup flags the kernel accepted, for a log line.
    pub fn ring_flags(&self) -> &'static str {
        self.ring.flags()
    }

    /// Pushes `op` for task `tag`; where the ring refuses it, marks the
    /// ring broken and returns the op for the caller to run with syscalls.
    fn push(&mut self, tag: usize, op: ring::Op<Chunk>) -> Result<(), ring::Op<Chunk>> {
        if self.broken {
            return Err(op);
        }
        self.ring.push(tag as u64, op).map_err(|(_, op)| {
            self.broken = true;
            op
        })
    }
}

/// One [`Exec::run`] on the ring: the batch's jobs as [`Task`]s and where
/// their [`Done`]s go. A struct so that one method ([`Batch::queue`])
/// decides between the ring and the syscall fallback for every operation,
/// and each kind of completion has a short handler of its own. It lends
/// the kernel nothing itself: each operation, with the fds, names and
/// buffers the kernel reads, moves into the [`Ring`], which keeps it until
/// its completion gives it back (see `sys::uring`).
struct Batch<'a> {
    /// The ring, its tuning, and whether it broke (which outlives the
    /// batch: a broken ring is never used again).
    uring: &'a mut Uring,
    /// The jobs that went to the ring, by tag.
    tasks: Vec<Task>,
    /// Jobs for plain syscalls, run once the ring has been started
    /// ([`Batch::run_inline`]).
    inline: Vec<Job>,
    /// Where each job's [`Done`] goes.
    done: &'a mut Vec<Done>,
}

impl<'a> Batch<'a> {
    /// A batch of `jobs` jobs on `uring`, reporting to `done`.
    fn new(uring: &'a mut Uring, jobs: usize, done: &'a mut Vec<Done>) -> Self {
        Batch {
            uring,
            tasks: Vec::with_capacity(jobs),
            inline: Vec::new(),
            done,
        }
    }

    /// Takes `job` in: a create, a write to an opened file or, where
    /// tuned so, a link goes on the ring as a task; anything the ring has
    /// no use for, and every job once the ring broke, waits for
    /// [`Batch::run_inline`].
    fn add(&mut self, job: Job) {
        if self.uring.broken {
            self.inline.push(job);
            return;
        }
        let t = self.tasks.len();
        let links = self.uring.tuning.links;
        let Job { id, dir, name, op } = job;
        match op {
            Op::File { data, size, meta } => {
                self.tasks.push(Task::file(id, data, size, meta));
                self.queue(t, open_op(dir, name));
            }
            Op::Open => {
                self.tasks.push(Task::Open { id });
                self.queue(t, open_op(dir, name));
            }
            Op::Write { file, offset, data } => {
                self.tasks.push(Task::Write {
                    id,
                    ops: 0,
                    err: None,
                });
                self.write(t, file, offset, data);
                self.maybe_finish(t);
            }
            Op::Symlink { target, meta } if links => {
                self.tasks.push(Task::Symlink { id, meta });
                self.queue(t, ring::Op::SymlinkAt { target, dir, name });
            }
            Op::Hardlink {
                target_dir: old_dir,
                target_name: old_name,
            } if links => {
                self.tasks.push(Task::Hardlink { id });
                let op = ring::Op::LinkAt {
                    old_dir,
                    old_name,
                    dir,
                    name,
                };
                self.queue(t, op);
            }
            op => self.inline.push(Job { id, dir, name, op }),
        }
    }

    /// Pushes `op` of task `t` on the ring, counting a write among the
    /// task's operations in flight; where the ring refuses it (or broke
    /// before), runs it through [`Batch::fallback`] instead. The one place
    /// that chooses between the two, so no operation can be lost between
    /// them.
    fn queue(&mut self, t: usize, op: ring::Op<Chunk>) {
        let write = matches!(op, ring::Op::Write { .. });
        match self.uring.push(t, op) {
            Ok(()) if write => {
                if let Some((ops, _)) = self.tasks[t].writes() {
                    *ops += 1;
                }
            }
            Ok(()) => {}
            Err(op) => self.fallback(t, op),
        }
    }

    /// Does what the ring refused with plain syscalls, as
    /// [`super::syscalls`] would: a create or a write here and now (what
    /// follows it needs its result), a link with the inline jobs (as if it
    /// had never been meant for the ring), a close by dropping the fd.
    fn fallback(&mut self, t: usize, op: ring::Op<Chunk>) {
        match op {
            ring::Op::OpenAt { dir, name, .. } => {
                let r = syscalls::create_file(dir.as_fd(), &name);
                self.open_done(t, r);
            }
            ring::Op::Write {
                file,
                buf,
                start,
                offset,
            } => {
                let rest = buf.get(start..).unwrap_or(&[]);
                if let Err(e) = syscalls::write_all_at(&file, rest, offset) {
                    self.note(t, e);
                }
            }
            ring::Op::SymlinkAt { target, dir, name } => {
                if let Task::Symlink { id, meta } = self.take(t) {
                    let op = Op::Symlink { target, meta };
                    self.inline.push(Job { id, dir, name, op });
                }
            }
            ring::Op::LinkAt {
                old_dir,
                old_name,
                dir,
                name,
            } => {
                if let Some(id) = self.take(t).id() {
                    let op = Op::Hardlink {
                        target_dir: old_dir,
                        target_name: old_name,
                    };
                    self.inline.push(Job { id, dir, name, op });
                }
            }
            ring::Op::Close(fd) => {
                drop(fd);
                self.closed(t);
            }
        }
    }

    /// Queues a write of `buf` at `offset` for task `t`. An empty one is
    /// skipped: a write of nothing would read as "no room".
    fn write(&mut self, t: usize, file: Arc<OwnedFd>, offset: u64, buf: Chunk) {
        if !buf.is_empty() {
            let op = ring::Op::Write {
                file,
                buf,
                start: 0,
                offset,
            };
            self.queue(t, op);
        }
    }

    /// The create of task `t` is done, on the ring or inline: a file's
    /// writes follow, an [`Op::Open`] hands its fd over.
    fn open_done(&mut self, t: usize, r: Result<OwnedFd, OpError>) {
        match self.tasks[t] {
            Task::File { .. } => match r {
                Ok(fd) => self.opened(t, fd),
                Err(e) => self.end(t, Err(e)),
            },
            Task::Open { .. } => self.end(t, r.map(Some)),
            _ => {}
        }
    }

    /// The file of task `t` is open: queue its writes, or finish it if it
    /// has none.
    fn opened(&mut self, t: usize, fd: OwnedFd) {
        let fd = Arc::new(fd);
        let Task::File {
            data,
            fd: slot,
            end,
            ..
        } = &mut self.tasks[t]
        else {
            return;
        };
        *slot = Some(fd.clone());
        *end = data.last().map_or(0, |(o, c)| o + c.len() as u64);
        for (offset, chunk) in std::mem::take(data) {
            self.write(t, fd.clone(), offset, chunk);
        }
        // Dropped before finishing: once the writes are done the task
        // holds the only reference, and a close on the ring can take it.
        drop(fd);
        self.maybe_finish(t);
    }

    /// A ring write of task `t` completed: a short one goes on from where
    /// it stopped, one interrupted or refused for now is finished inline,
    /// an error is kept for the task's [`Done`]; the task finishes after
    /// its last write.
    fn written(&mut self, t: usize, mut op: ring::Op<Chunk>, result: io::Result<Value>) {
        if let Some((ops, _)) = self.tasks[t].writes() {
            *ops -= 1;
        }
        let ring::Op::Write {
            buf, start, offset, ..
        } = &mut op
        else {
            return;
        };
        match result {
            Ok(Value::Written(0)) => self.note(t, OpError::new("write file", Errno::NOSPC)),
            Ok(Value::Written(n)) if *start + n < buf.len() => {
                // A short write: go on from where it stopped.
                *start += n;
                *offset += n as u64;
                self.queue(t, op);
            }
            Ok(_) => {}
            // Interrupted or refused for now: the rest is written inline,
            // with a blocking pwrite, rather than queued again (a ring
            // that kept answering EAGAIN would otherwise loop forever).
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {
                self.fallback(t, op);
            }
            Err(e) => self.note(t, OpError::new("write file", e)),
        }
        self.maybe_finish(t);
    }

    /// Keeps `e` for the [`Done`] of task `t` unless an error was kept
    /// before: a job reports one error, the first seen.
    fn note(&mut self, t: usize, e: OpError) {
        if let Some((_, err)) = self.tasks[t].writes() {
            err.get_or_insert(e);
        }
    }

    /// Finishes task `t` once none of its operations is in flight: a
    /// file's size and metadata are set through its fd (io_uring has no
    /// operation for them) and it is closed; a write reports its first
    /// error.
    fn maybe_finish(&mut self, t: usize) {
        match self.tasks[t] {
            Task::File {
                ops: 0,
                fd: Some(_),
                ..
            }
            | Task::Write { ops: 0, .. } => {}
            _ => return,
        }
        match self.take(t) {
            Task::File {
                id,
                size,
                meta,
                fd: Some(fd),
                end,
                err,
                ..
            } => {
                let r = match err {
                    Some(e) => Err(e),
                    None => finish_file(&fd, size, end, &meta),
                };
                self.close(t, id, fd, r);
            }
            Task::Write { id, err, .. } => self.done.push(Done {
                id,
                result: err.map_or(Ok(None), Err),
            }),
            _ => {}
        }
    }

    /// Closes the file of task `t`, finished with `r`: on the ring where
    /// tuned so, if it succeeded and nothing else holds the fd (its
    /// [`Done`] then waits for the close); else by dropping the fd, its
    /// [`Done`] out now.
    fn close(&mut self, t: usize, id: u64, fd: Arc<OwnedFd>, r: Result<(), OpError>) {
        if r.is_ok() && self.uring.tuning.close {
            if let Ok(fd) = Arc::try_unwrap(fd) {
                self.tasks[t] = Task::Closing { id };
                self.queue(t, ring::Op::Close(fd));
                return;
            }
        }
        self.done.push(Done {
            id,
            result: r.map(|()| None),
        });
    }

    /// The file of task `t` is closed, on the ring or by dropping its fd:
    /// the fd is released whatever close says, and its data and metadata
    /// were set before.
    fn closed(&mut self, t: usize) {
        self.end(t, Ok(None));
    }

    /// The `symlinkat` of task `t` completed: an existing name is
    /// replaced inline, then the link's metadata are set by name (a
    /// symlink has no fd to set them through).
    fn symlinked(
        &mut self,
        t: usize,
        target: &CStr,
        (dir, name): (&OwnedFd, &CStr),
        result: io::Result<Value>,
    ) {
        let Task::Symlink { meta, .. } = &self.tasks[t] else {
            return;
        };
        let r = created(result, (dir, name), "create symlink", || {
            rustix::fs::symlinkat(target, dir, name)
        });
        let r = r.and_then(|()| syscalls::set_meta_at(dir.as_fd(), name, meta, false));
        self.end(t, r.map(|()| None));
    }

    /// The `linkat` of task `t` completed: an existing name is replaced
    /// inline.
    fn linked(
        &mut self,
        t: usize,
        (old_dir, old_name): (&OwnedFd, &CStr),
        (dir, name): (&OwnedFd, &CStr),
        result: io::Result<Value>,
    ) {
        let r = created(result, (dir, name), "create hard link", || {
            rustix::fs::linkat(old_dir, old_name, dir, name, AtFlags::empty())
        });
        self.end(t, r.map(|()| None));
    }

    /// Hands a completion to the handler of its operation, if it is one
    /// its task waits for ([`Task::expects`]).
    fn complete(&mut self, c: Completion<Chunk>) {
        let t = c.tag as usize;
        let expected = self.tasks.get(t).map(|task| task.expects(c.op.as_ref()));
        if expected != Some(true) {
            return;
        }
        match c.op {
            Some(ring::Op::OpenAt { dir, name, .. }) => {
                let r = open_result(c.result, &dir, &name);
                self.open_done(t, r);
            }
            Some(op @ ring::Op::Write { .. }) => self.written(t, op, c.result),
            Some(ring::Op::SymlinkAt { target, dir, name }) => {
                self.symlinked(t, &target, (&dir, &name), c.result);
            }
            Some(ring::Op::LinkAt {
                old_dir,
                old_name,
                dir,
                name,
            }) => self.linked(t, (&old_dir, &old_name), (&dir, &name), c.result),
            Some(ring::Op::Close(_)) | None => self.closed(t),
        }
    }

    /// Starts the kernel on what is queued, then runs the inline jobs
    /// while it works through the ring.
    fn run_inline(&mut self) {
        if !self.uring.broken && self.uring.ring.submit().is_err() {
            self.uring.broken = true;
        }
        for job in std::mem::take(&mut self.inline) {
            let id = job.id;
            self.done.push(Done {
                id,
                result: syscalls::exec(job),
            });
        }
    }

    /// Waits until nothing is in flight, handing each completion to
    /// [`Batch::complete`] (whose handlers may queue more: the rest of a
    /// short write, a close).
    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.uring.cqes);
        while self.uring.ring.in_flight() > 0 {
            if let Err(e) = self.uring.ring.wait(&mut cqes) {
                self.broke(e);
                break;
            }
            for c in cqes.drain(..) {
                self.complete(c);
            }
        }
        self.uring.cqes = cqes;
    }

    /// `io_uring_enter` failed with `e`: what is in flight cannot be
    /// reaped, so every task not ended fails, and the ring is not used
    /// again (its drop waits or leaks).
    fn broke(&mut self, e: io::Error) {
        self.uring.broken = true;
        let e = OpError::new("io_uring_enter", e);
        for t in 0..self.tasks.len() {
            let e = OpError::new(
                e.op.clone(),
                io::Error::new(e.err.kind(), e.err.to_string()),
            );
            self.end(t, Err(e));
        }
    }

    /// Ends the batch. Every task has its [`Done`] by now (each ends with
    /// its last completion, or in [`Batch::broke`]); one that has not
    /// still gets one, so that no job goes unanswered.
    fn finish(self) {
        for task in self.tasks {
            if let Some(id) = task.id() {
                self.done.push(Done {
                    id,
                    result: Err(OpError::new(
                        "backend",
                        io::Error::other("io_uring job lost"),
                    )),
                });
            }
        }
    }

    /// Task `t`, leaving [`Task::Over`] in its place, so that nothing of
    /// it is handled twice.
    fn take(&mut self, t: usize) -> Task {
        std::mem::replace(&mut self.tasks[t], Task::Over)
    }

    /// Ends task `t` with `result` (nothing of it is in flight), unless
    /// it has ended already.
    fn end(&mut self, t: usize, result: Result<Option<OwnedFd>, OpError>) {
        if let Some(id) = self.take(t).id() {
            self.done.push(Done { id, result });
        }
    }
}

/// The fd of a create that completed, replacing an existing name the way
/// the syscalls backend does.
fn open_result(
    r: io::Result<Value>,
    dir: &Arc<OwnedFd>,
    name: &CString,
) -> Result<OwnedFd, OpError> {
    match r {
        Ok(Value::Fd(fd)) => Ok(fd),
        Ok(_) => Err(OpError::new("create file", Errno::IO)),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            syscalls::create_file(dir.as_fd(), name)
        }
        Err(e) => Err(OpError::new("create file", e)),
    }
}

/// What a `symlinkat` or `linkat` on the ring returned, as the syscalls
/// backend reports it: a name that exists already (`EEXIST`) is replaced
/// by running `again` (the same call, inline) through
/// [`syscalls::replacing`]; any other error names `step`.
fn created(
    result: io::Result<Value>,
    (dir, name): (&OwnedFd, &CStr),
    step: &str,
    again: impl FnMut() -> rustix::io::Result<()>,
) -> Result<(), OpError> {
    match result {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            syscalls::replacing(dir.as_fd(), name, step, again)
        }
        r => r.map(|_| ()).map_err(|e| OpError::new(step, e)),
    }
}

/// A file's last steps once its data are written: its size (past the
/// last extent for a sparse file), then its metadata.
fn finish_file(fd: &OwnedFd, size: u64, end: u64, meta: &Meta) -> Result<(), OpError> {
    if size != end {
        rustix::fs::ftruncate(fd, size).map_err(|e| OpError::new("truncate file", e))?;
    }
    syscalls::set_meta_fd(fd.as_fd(), meta, true)
}

impl Exec for Uring {
    /// Runs `jobs` as one `Batch`: each pushed on the ring or left for
    /// syscalls, the ring started, the syscall jobs run meanwhile, then
    /// every completion reaped.
    fn run(&mut self, jobs: Vec<Job>, done: &mut Vec<Done>) {
        let mut batch = Batch::new(self, jobs.len(), done);
        for job in jobs {
            batch.add(job);
        }
        batch.run_inline();
        batch.reap();
        batch.finish();
    }
}

/// The create of a file's name: a new file only, never through a symlink
/// ([`CREATE`]), readable by none but its owner until its mode is set.
fn open_op(dir: Arc<OwnedFd>, name: CString) -> ring::Op<Chunk> {
    ring::Op::OpenAt {
        dir,
        name,
        flags: CREATE,
        mode: 0o600,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::fsops::syscalls::Syscalls;
    use crate::layer::fsops::NodeKind;
    use crate::layer::tar::Time;
    use std::collections::BTreeMap;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::path::{Path, PathBuf};

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tmp(tag: &str) -> Tmp {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("unlade-uring-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }

    fn dirfd(p: &Path) -> Arc<OwnedFd> {
        Arc::new(std::fs::File::open(p).unwrap().into())
    }

    fn uring(t: Tuning) -> Option<Uring> {
        match Uring::with_tuning(t) {
            Ok(u) => Some(u),
            Err(e) => {
                eprintln!("io_uring unavailable ({e}); skipped");
                None
            }
        }
    }

    fn root() -> bool {
        rustix::process::geteuid().is_root()
    }

    fn meta(mode: u32, secs: i64) -> Meta {
        Meta {
            owner: root().then_some((1234, 5678)),
            mode,
            mtime: Time { secs, nanos: 5 },
            atime: Some(Time {
                secs: secs - 7,
                nanos: 0,
            }),
            xattrs: vec![(c"user.k".into(), b"v".to_vec())],
        }
    }

    /// Metadata for what takes no user.* xattrs (symlinks, nodes).
    fn bare(mode: u32, secs: i64) -> Meta {
        Meta {
            xattrs: if root() {
                vec![(c"trusted.k".into(), b"t".to_vec())]
            } else {
                Vec::new()
            },
            ..meta(mode, secs)
        }
    }

    fn owned(b: &[u8]) -> Chunk {
        Chunk::Owned(b.to_vec())
    }

    fn job(id: u64, dir: &Arc<OwnedFd>, name: &str, op: Op) -> Job {
        Job {
            id,
            dir: dir.clone(),
            name: CString::new(name).unwrap(),
            op,
        }
    }

    /// Runs `jobs` and returns the results by id.
    fn run(x: &mut dyn Exec, jobs: Vec<Job>) -> BTreeMap<u64, Result<Option<OwnedFd>, OpError>> {
        let ids: Vec<u64> = jobs.iter().map(|j| j.id).collect();
        let mut done = Vec::new();
        x.run(jobs, &mut done);
        assert_eq!(done.len(), ids.len(), "one Done per job");
        let m: BTreeMap<_, _> = done.into_iter().map(|d| (d.id, d.result)).collect();
        assert_eq!(m.keys().copied().collect::<Vec<_>>(), {
            let mut i = ids;
            i.sort();
            i
        });
        m
    }

    /// What a tree holds, one line per object, for comparing two.
    fn tree(root: &Path) -> BTreeMap<String, String> {
        fn walk(base: &Path, p: &Path, out: &mut BTreeMap<String, String>) {
            let md = std::fs::symlink_metadata(p).unwrap();
            let ft = md.file_type();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            let mut xs = Vec::new();
            let mut buf = vec![0u8; 4096];
            if let Ok(n) = rustix::fs::llistxattr(p, &mut buf) {
                for k in buf[..n].split(|&b| b == 0).filter(|k| !k.is_empty()) {
                    let mut v = vec![0u8; 4096];
                    let key = CString::new(k).unwrap();
                    let vn = rustix::fs::lgetxattr(p, key.as_c_str(), &mut v).unwrap_or(0);
                    xs.push(format!("{}={:?}", String::from_utf8_lossy(k), &v[..vn]));
                }
            }
            xs.sort();
            let what = if ft.is_symlink() {
                format!("link {:?}", std::fs::read_link(p).unwrap())
            } else if ft.is_file() {
                use std::hash::{Hash, Hasher};
                use std::io::Read;
                use std::os::unix::fs::OpenOptionsExt;
                // O_NOATIME: reading must not change what is compared.
                let mut f = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOATIME)
                    .open(p)
                    .unwrap();
                let mut v = Vec::new();
                f.read_to_end(&mut v).unwrap();
                let mut h = std::collections::hash_map::DefaultHasher::new();
                v.hash(&mut h);
                format!("file {:x} {:?}", h.finish(), &v[..v.len().min(16)])
            } else if ft.is_dir() {
                "dir".into()
            } else if ft.is_fifo() {
                "fifo".into()
            } else {
                format!("dev {}", md.rdev())
            };
            // A whiteout gets no times (they are "now"), and reading a
            // symlink touches its atime.
            let times = if ft.is_dir() || (md.rdev() == 0 && ft.is_char_device()) {
                String::new()
            } else if ft.is_symlink() {
                format!("{}.{}", md.mtime(), md.mtime_nsec())
            } else {
                format!("{}.{} {}", md.mtime(), md.mtime_nsec(), md.atime())
            };
            out.insert(
                rel,
                format!(
                    "{what} mode {:o} {}:{} nlink {} size {} {times} {xs:?}",
                    md.mode(),
                    md.uid(),
                    md.gid(),
                    if ft.is_dir() { 0 } else { md.nlink() },
                    md.size()
                ),
            );
            if ft.is_dir() {
                for e in std::fs::read_dir(p).unwrap() {
                    walk(base, &e.unwrap().path(), out);
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(root, root, &mut out);
        out.remove("");
        out
    }

    /// Asserts two trees are the same, showing only what differs.
    fn same(want: &BTreeMap<String, String>, got: &BTreeMap<String, String>) {
        let mut diff = Vec::new();
        for k in want.keys().chain(got.keys()) {
            if want.get(k) != got.get(k) && !diff.iter().any(|(d, _, _)| d == k) {
                diff.push((k.clone(), want.get(k), got.get(k)));
            }
        }
        assert!(diff.is_empty(), "syscalls vs uring: {diff:#?}");
    }

    /// Every kind of job, in the batches an applier would send: files
    /// (plain, empty, sparse, one with two extents), a symlink, a FIFO, a
    /// whiteout, an opened file written piecewise and finished, a hard
    /// link, a directory's delayed metadata. Returns the error strings.
    fn scenario(x: &mut dyn Exec, at: &Path) -> Vec<String> {
        let d = dirfd(at);
        std::fs::create_dir(at.join("sub")).unwrap();
        let sub = dirfd(&at.join("sub"));
        let mut errs = Vec::new();
        let mut keep =
            |m: BTreeMap<u64, Result<Option<OwnedFd>, OpError>>| -> BTreeMap<u64, Option<OwnedFd>> {
                m.into_iter()
                    .map(|(id, r)| match r {
                        Ok(fd) => (id, fd),
                        Err(e) => {
                            errs.push(format!("{id}: {} {}", e.op, e.err));
                            (id, None)
                        }
                    })
                    .collect()
            };
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut b1 = vec![
            job(
                1,
                &d,
                "a",
                Op::File {
                    data: vec![(0, owned(b"hello"))],
                    size: 5,
                    meta: meta(0o640, 1000),
                },
            ),
            job(
                2,
                &d,
                "empty",
                Op::File {
                    data: vec![],
                    size: 0,
                    meta: meta(0o4755, 1001),
                },
            ),
            job(
                3,
                &d,
                "sparse",
                Op::File {
                    data: vec![(0, owned(b"ab")), (8192, owned(b"cd"))],
                    size: 20000,
                    meta: meta(0o600, 1002),
                },
            ),
            job(
                4,
                &d,
                "big",
                Op::File {
                    data: vec![(0, owned(&big))],
                    size: big.len() as u64,
                    meta: meta(0o644, 1003),
                },
            ),
            job(
                5,
                &d,
                "l",
                Op::Symlink {
                    target: c"a".into(),
                    meta: bare(0o777, 1004),
                },
            ),
            job(
                6,
                &d,
                "p",
                Op::Node {
                    kind: NodeKind::Fifo,
                    meta: bare(0o620, 1005),
                },
            ),
            job(
                7,
                &d,
                "w",
                Op::Node {
                    kind: NodeKind::Whiteout,
                    meta: meta(0, 1006),
                },
            ),
            job(8, &d, "o", Op::Open),
            job(
                9,
                &sub,
                "s1",
                Op::File {
                    data: vec![(0, owned(b"in sub"))],
                    size: 6,
                    meta: meta(0o400, 1007),
                },
            ),
        ];
        if root() {
            b1.push(job(
                10,
                &d,
                "c",
                Op::Node {
                    kind: NodeKind::Char(1, 3),
                    meta: bare(0o666, 1008),
                },
            ));
        }
        let mut r = keep(run(x, b1));
        let o = Arc::new(r.remove(&8).flatten().expect("Open returns its fd"));
        let b2 = vec![
            job(
                11,
                &d,
                "h",
                Op::Hardlink {
                    target_dir: d.clone(),
                    target_name: c"a".into(),
                },
            ),
            job(
                12,
                &sub,
                "hl",
                Op::Hardlink {
                    target_dir: d.clone(),
                    target_name: c"l".into(),
                },
            ),
            job(
                13,
                &d,
                "",
                Op::Write {
                    file: o.clone(),
                    offset: 0,
                    data: owned(b"xyz"),
                },
            ),
            job(
                14,
                &d,
                "",
                Op::Write {
                    file: o.clone(),
                    offset: 70_000,
                    data: owned(&big[..1000]),
                },
            ),
        ];
        keep(run(x, b2));
        let b3 = vec![
            job(
                15,
                &d,
                "",
                Op::Finish {
                    file: o.clone(),
                    size: 100_000,
                    meta: meta(0o604, 1009),
                },
            ),
            job(
                16,
                &sub,
                "",
                Op::DirMeta {
                    meta: Some(meta(0o750, 1010)),
                    opaque: root(),
                },
            ),
        ];
        keep(run(x, b3));
        errs
    }

    fn compare(t: Tuning) {
        let Some(mut u) = uring(t) else { return };
        let (a, b) = (tmp("sys"), tmp("ring"));
        let ea = scenario(&mut Syscalls, &a.0);
        let eb = scenario(&mut u, &b.0);
        assert_eq!(ea, Vec::<String>::new());
        assert_eq!(eb, ea);
        let (ta, tb) = (tree(&a.0), tree(&b.0));
        assert!(ta.len() >= 12, "{ta:#?}");
        same(&ta, &tb);
    }

    #[test]
    fn every_op_matches_syscalls() {
        compare(Tuning::default());
    }

    #[test]
    fn every_op_matches_syscalls_with_links_and_closes_on_the_ring() {
        compare(Tuning {
            links: true,
            close: true,
            ..Tuning::default()
        });
    }

    #[test]
    fn short_writes_go_on() {
        // Every write SQE asks for at most 7 bytes: each completion is a
        // short write of the rest.
        compare(Tuning {
            max_write: 7,
            entries: 8,
            ..Tuning::default()
        });
    }

    /// Names that exist already are replaced, never followed.
    fn replacing(x: &mut dyn Exec, at: &Path) {
        let outside = at.join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("victim"), b"keep").unwrap();
        let t = at.join("t");
        std::fs::create_dir(&t).unwrap();
        std::fs::write(t.join("a"), b"old contents").unwrap();
        std::fs::create_dir_all(t.join("d/e/f")).unwrap();
        std::fs::write(t.join("d/e/f/g"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.join("victim"), t.join("s")).unwrap();
        std::os::unix::fs::symlink(&outside, t.join("sd")).unwrap();
        std::fs::write(t.join("o"), b"old").unwrap();
        std::fs::write(t.join("l"), b"old").unwrap();
        std::fs::write(t.join("h"), b"old").unwrap();
        let d = dirfd(&t);
        let f = |id, name, data: &[u8]| {
            job(
                id,
                &d,
                name,
                Op::File {
                    data: vec![(0, owned(data))],
                    size: data.len() as u64,
                    meta: meta(0o644, 5),
                },
            )
        };
        let mut r = run(
            x,
            vec![
                f(1, "a", b"new"),
                f(2, "d", b"was a dir"),
                f(3, "s", b"was a symlink"),
                f(4, "sd", b"was a symlink to a dir"),
                job(5, &d, "o", Op::Open),
                job(
                    6,
                    &d,
                    "l",
                    Op::Symlink {
                        target: c"a".into(),
                        meta: bare(0o777, 6),
                    },
                ),
            ],
        );
        for (id, res) in &r {
            assert!(res.is_ok(), "{id}: {:?}", res.as_ref().err());
        }
        let o = r.remove(&5).unwrap().unwrap().unwrap();
        assert_eq!(rustix::fs::fstat(&o).unwrap().st_size, 0);
        let r = run(
            x,
            vec![job(
                7,
                &d,
                "h",
                Op::Hardlink {
                    target_dir: d.clone(),
                    target_name: c"a".into(),
                },
            )],
        );
        assert!(r[&7].is_ok());
        assert_eq!(std::fs::read(t.join("a")).unwrap(), b"new");
        assert_eq!(std::fs::read(t.join("h")).unwrap(), b"new");
        assert_eq!(std::fs::read(t.join("d")).unwrap(), b"was a dir");
        assert_eq!(std::fs::read(t.join("s")).unwrap(), b"was a symlink");
        assert!(std::fs::symlink_metadata(t.join("sd")).unwrap().is_file());
        assert_eq!(std::fs::read_link(t.join("l")).unwrap(), Path::new("a"));
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
    }

    #[test]
    fn existing_names_are_replaced() {
        for t in [
            Tuning::default(),
            Tuning {
                links: true,
                close: true,
                ..Tuning::default()
            },
        ] {
            let Some(mut u) = uring(t) else { return };
            let (a, b) = (tmp("rsys"), tmp("rring"));
            replacing(&mut Syscalls, &a.0);
            replacing(&mut u, &b.0);
            // What the test made itself has times of its own.
            let strip = |mut t: BTreeMap<String, String>| {
                t.retain(|k, _| !k.starts_with("outside") && k != "t/o");
                t
            };
            same(&strip(tree(&a.0)), &strip(tree(&b.0)));
        }
    }

    /// Jobs that fail, with the step and error each backend reports.
    fn failing(x: &mut dyn Exec, at: &Path) -> Vec<String> {
        let gone = at.join("gone");
        std::fs::create_dir(&gone).unwrap();
        let g = dirfd(&gone);
        std::fs::remove_dir(&gone).unwrap();
        let d = dirfd(at);
        let full = Arc::new(OwnedFd::from(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap(),
        ));
        let long = "n".repeat(300);
        let mut bad = meta(0o644, 1);
        bad.xattrs = vec![(c"bogus.k".into(), b"v".to_vec())];
        let r = run(
            x,
            vec![
                job(
                    1,
                    &g,
                    "f",
                    Op::File {
                        data: vec![(0, owned(b"x"))],
                        size: 1,
                        meta: meta(0o644, 1),
                    },
                ),
                job(
                    2,
                    &d,
                    "",
                    Op::Write {
                        file: full.clone(),
                        offset: 0,
                        data: owned(b"x"),
                    },
                ),
                job(
                    3,
                    &d,
                    &long,
                    Op::Symlink {
                        target: c"a".into(),
                        meta: bare(0o777, 1),
                    },
                ),
                job(
                    4,
                    &d,
                    "h",
                    Op::Hardlink {
                        target_dir: d.clone(),
                        target_name: c"missing".into(),
                    },
                ),
                job(
                    5,
                    &d,
                    "x",
                    Op::File {
                        data: vec![(0, owned(b"x"))],
                        size: 1,
                        meta: bad,
                    },
                ),
                job(6, &g, "o", Op::Open),
                job(
                    7,
                    &d,
                    "ok",
                    Op::File {
                        data: vec![(0, owned(b"fine"))],
                        size: 4,
                        meta: meta(0o644, 1),
                    },
                ),
            ],
        );
        r.into_iter()
            .map(|(id, r)| match r {
                Ok(_) => format!("{id}: ok"),
                Err(e) => format!("{id}: {}: {:?}", e.op, e.err.raw_os_error()),
            })
            .collect()
    }

    #[test]
    fn errors_name_the_same_steps() {
        for t in [
            Tuning::default(),
            Tuning {
                links: true,
                ..Tuning::default()
            },
        ] {
            let Some(mut u) = uring(t) else { return };
            let (a, b) = (tmp("esys"), tmp("ering"));
            let ea = failing(&mut Syscalls, &a.0);
            let eb = failing(&mut u, &b.0);
            assert_eq!(eb, ea);
            assert_eq!(ea[0], format!("1: create file: Some({})", libc::ENOENT));
            assert_eq!(ea[1], format!("2: write file: Some({})", libc::ENOSPC));
            assert!(ea[4].starts_with("5: set xattr bogus.k"), "{}", ea[4]);
            assert_eq!(ea[6], "7: ok");
        }
    }

    #[test]
    fn many_batches_through_a_small_ring() {
        let Some(mut u) = uring(Tuning {
            entries: 8,
            max_write: 1000,
            ..Tuning::default()
        }) else {
            return;
        };
        let (a, b) = (tmp("msys"), tmp("mring"));
        for (x, at) in [(&mut Syscalls as &mut dyn Exec, &a.0), (&mut u, &b.0)] {
            let d = dirfd(at);
            for batch in 0..8u64 {
                let jobs = (0..32u64)
                    .map(|i| {
                        let data: Vec<u8> = (0..(i * 397 % 5000)).map(|k| (k ^ i) as u8).collect();
                        job(
                            batch * 32 + i,
                            &d,
                            &format!("f{batch}-{i}"),
                            Op::File {
                                size: data.len() as u64,
                                data: vec![(0, owned(&data))],
                                meta: meta(0o644, 7),
                            },
                        )
                    })
                    .collect();
                for (id, r) in run(x, jobs) {
                    assert!(r.is_ok(), "{id}: {:?}", r.err());
                }
            }
        }
        same(&tree(&a.0), &tree(&b.0));
    }
}
