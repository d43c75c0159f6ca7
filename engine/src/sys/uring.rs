//! A small, safe io_uring ring for the file-writing workers: the only
//! place that pushes submission queue entries (SQEs), which is `unsafe`
//! because the kernel reads the paths, buffers and file descriptors an SQE
//! points at whenever it gets to the operation, long after the push.
//!
//! [`Ring`] makes that safe by owning everything an operation points at
//! from its push until its completion is reaped: an [`Op`] is moved into
//! the ring, boxed (so nothing it holds moves while the kernel may read
//! it), and handed back with its [`Completion`]. A ring dropped with
//! operations in flight waits for them first; if it cannot, it leaks what
//! they hold instead of freeing memory the kernel may still read.
//!
//! Only what the workers need is offered: `openat`, `write`, `symlinkat`,
//! `linkat`, `close`. Everything else about a job (owner, mode, xattrs,
//! times) has no io_uring operation that takes an fd and is done with
//! plain syscalls by the caller.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::ops::Deref;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring, Probe};

/// Most bytes one write SQE asks for: a longer buffer is written in
/// pieces (a short write continues from where it stopped), and the
/// length fits the SQE's 32-bit field with room to spare.
pub const MAX_WRITE: usize = 1 << 30;

/// The opcodes a [`Ring`] issues: all must be supported, or the ring is
/// refused (kernels before 5.15 lack `symlinkat`/`linkat`).
const OPCODES: [(u8, &str); 5] = [
    (opcode::OpenAt::CODE, "openat"),
    (opcode::Write::CODE, "write"),
    (opcode::Close::CODE, "close"),
    (opcode::SymlinkAt::CODE, "symlinkat"),
    (opcode::LinkAt::CODE, "linkat"),
];

/// Why a ring could not be made, by step: what `--backend auto` prints in
/// its one line before falling back to plain syscalls, and what
/// `--backend uring` fails with.
#[derive(Debug)]
pub struct SetupError {
    /// The step: "io_uring_setup", "probe opcodes", ….
    pub step: &'static str,
    /// What the kernel said, or which opcode is missing.
    pub source: io::Error,
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.step, self.source)?;
        let hint = match self.source.raw_os_error() {
            Some(libc::EPERM | libc::EACCES) if self.step == "io_uring_setup" => {
                " (kernel.io_uring_disabled, or a seccomp filter)"
            }
            Some(libc::ENOSYS) => " (kernel without io_uring, or a seccomp filter)",
            Some(libc::ENOMEM) if self.step == "io_uring_setup" => " (RLIMIT_MEMLOCK too low?)",
            _ => "",
        };
        f.write_str(hint)
    }
}

/// The message already says what `source` says (it is one line on
/// stderr), so it is not also given as the error's source.
impl std::error::Error for SetupError {}

impl From<SetupError> for io::Error {
    fn from(e: SetupError) -> io::Error {
        io::Error::new(e.source.kind(), e)
    }
}

/// How to make a ring.
#[derive(Debug, Clone, Copy)]
pub struct RingOptions {
    /// Submission queue entries (a power of two; the completion queue is
    /// twice as large). Bounds the operations in flight.
    pub entries: u32,
    /// Most io-wq worker threads per submitting thread for bounded work
    /// (regular files: every create and, on most file systems, every
    /// buffered write is handed to one) and for unbounded work. `0`
    /// keeps the kernel's default (up to 4 per CPU for bounded work,
    /// which is one thread per file of a batch on a large machine).
    pub iowq_max: [u32; 2],
    /// Most bytes one write SQE asks for (at most [`MAX_WRITE`]): a
    /// longer buffer is written in pieces, the way a short write goes on.
    pub max_write: usize,
}

impl Default for RingOptions {
    fn default() -> Self {
        RingOptions {
            entries: 64,
            iowq_max: [2, 2],
            max_write: MAX_WRITE,
        }
    }
}

/// A buffer of a [`Op::Write`]: bytes the ring reads through `Deref`
/// once, right after the op is boxed, and keeps (unmoved, untouched) until
/// the write completes.
pub trait WriteBuf: Deref<Target = [u8]> + 'static {}
impl<T: Deref<Target = [u8]> + 'static> WriteBuf for T {}

/// One operation for the ring, owning what the kernel reads for it.
#[derive(Debug)]
pub enum Op<B> {
    /// `openat(dir, name, flags, mode)`; the completion carries the new
    /// fd ([`Value::Fd`]).
    OpenAt {
        /// Directory the name is resolved in.
        dir: Arc<OwnedFd>,
        /// A path (the workers pass one component).
        name: CString,
        /// `O_*` flags.
        flags: i32,
        /// Mode of a created file.
        mode: u32,
    },
    /// `pwrite(file, buf[start..], offset)`, at most
    /// [`RingOptions::max_write`] bytes:
    /// the completion says how many were written ([`Value::Written`]).
    Write {
        /// File written.
        file: Arc<OwnedFd>,
        /// The bytes.
        buf: B,
        /// First byte of `buf` to write.
        start: usize,
        /// File offset of that byte.
        offset: u64,
    },
    /// `symlinkat(target, dir, name)`.
    SymlinkAt {
        /// Link target, stored verbatim.
        target: CString,
        /// Directory the link goes in.
        dir: Arc<OwnedFd>,
        /// Its name.
        name: CString,
    },
    /// `linkat(old_dir, old_name, dir, name, 0)` (a symlink is linked
    /// itself, never followed).
    LinkAt {
        /// Directory of the existing object.
        old_dir: Arc<OwnedFd>,
        /// Its name.
        old_name: CString,
        /// Directory of the new name.
        dir: Arc<OwnedFd>,
        /// The new name.
        name: CString,
    },
    /// `close(fd)`: the fd is gone once this is pushed, whatever the
    /// completion says (its completion gives no operation back).
    Close(OwnedFd),
}

/// What a pending slot holds: the operation, or for a close only the fd
/// number (the kernel closes it; dropping an `OwnedFd` would close the
/// number twice).
enum Held<B> {
    Op(Op<B>),
    Closing(RawFd),
}

impl<B> Held<B> {
    /// The operation back, for one that never reached the kernel.
    fn into_op(self) -> Op<B> {
        match self {
            Held::Op(op) => op,
            // SAFETY: the number came from `into_raw_fd` in `push` and no
            // close of it was queued: it is still owned, by this alone.
            Held::Closing(fd) => Op::Close(unsafe { OwnedFd::from_raw_fd(fd) }),
        }
    }
}

/// What a successful operation returned.
#[derive(Debug)]
pub enum Value {
    /// The fd an [`Op::OpenAt`] opened.
    Fd(OwnedFd),
    /// Bytes an [`Op::Write`] wrote (fewer than asked is a short write;
    /// 0 means no room).
    Written(usize),
    /// Any other operation succeeded.
    Done,
}

/// A reaped operation: the caller's tag, the operation given back (its
/// buffers and names free to reuse, e.g. to retry), and its result.
#[derive(Debug)]
pub struct Completion<B> {
    /// The tag given to [`Ring::push`].
    pub tag: u64,
    /// The operation, with everything it owned (`None` for a close).
    pub op: Option<Op<B>>,
    /// What the kernel returned.
    pub result: io::Result<Value>,
}

/// A pushed operation whose completion has not been reaped. Boxed: the
/// SQE points into it (the path, the buffer), so it must not move.
struct Pending<B> {
    tag: u64,
    op: Held<B>,
}

/// One io_uring instance and the operations in flight on it. Not `Send`
/// on purpose: it is made with `IORING_SETUP_SINGLE_ISSUER` where the
/// kernel has it, so only the thread that made it may submit.
pub struct Ring<B: WriteBuf> {
    ring: IoUring,
    /// In-flight operations by slot (the SQE's user_data).
    slots: Vec<Option<Box<Pending<B>>>>,
    free: Vec<usize>,
    in_flight: usize,
    /// Completions reaped while making room, not yet taken.
    ready: Vec<Completion<B>>,
    flags: &'static str,
    max_write: usize,
    /// Keeps the ring on its thread (`!Send`, `!Sync`).
    _thread: std::marker::PhantomData<*const ()>,
}

impl<B: WriteBuf> fmt::Debug for Ring<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("entries", &self.ring.params().sq_entries())
            .field("flags", &self.flags)
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

/// Ring flags to try, best first: each later one for kernels that refuse
/// (`EINVAL`) the one before (DEFER_TASKRUN needs 6.1, SINGLE_ISSUER 6.0,
/// COOP_TASKRUN 5.19).
#[derive(Clone, Copy)]
enum Setup {
    SingleIssuerDefer,
    Coop,
    Plain,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::SingleIssuerDefer => "SINGLE_ISSUER|DEFER_TASKRUN",
            Setup::Coop => "COOP_TASKRUN",
            Setup::Plain => "none",
        }
    }
}

fn setup_err(step: &'static str, source: io::Error) -> SetupError {
    SetupError { step, source }
}

impl<B: WriteBuf> Ring<B> {
    /// Makes a ring on the calling thread (the only one that may use it):
    /// the best flags the kernel accepts, every opcode it will issue
    /// probed, io-wq workers bounded as `opts` say.
    pub fn new(opts: RingOptions) -> Result<Self, SetupError> {
        let entries = opts.entries.clamp(8, 4096).next_power_of_two();
        let mut last = None;
        let mut made = None;
        for setup in [Setup::SingleIssuerDefer, Setup::Coop, Setup::Plain] {
            let mut b = IoUring::builder();
            match setup {
                Setup::SingleIssuerDefer => {
                    b.setup_single_issuer().setup_defer_taskrun();
                }
                Setup::Coop => {
                    b.setup_coop_taskrun();
                }
                Setup::Plain => {}
            }
            b.setup_cqsize(entries * 2);
            match b.build(entries) {
                Ok(r) => {
                    made = Some((r, setup));
                    break;
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
                Err(e) => return Err(setup_err("io_uring_setup", e)),
            }
        }
        let Some((ring, setup)) = made else {
            return Err(setup_err(
                "io_uring_setup",
                last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINVAL)),
            ));
        };
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| setup_err("probe opcodes", e))?;
        for (code, name) in OPCODES {
            if !probe.is_supported(code) {
                return Err(setup_err(
                    "probe opcodes",
                    io::Error::new(
                        io::ErrorKind::Unsupported,
                        format!("the kernel has no io_uring {name}"),
                    ),
                ));
            }
        }
        if opts.iowq_max != [0, 0] {
            let mut max = opts.iowq_max;
            // Linux 5.15; a kernel without it keeps its own bound, which
            // costs threads, not correctness.
            match ring.submitter().register_iowq_max_workers(&mut max) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(setup_err("bound io-wq workers", e)),
            }
        }
        Ok(Ring {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            ready: Vec::new(),
            flags: setup.name(),
            max_write: opts.max_write.clamp(1, MAX_WRITE),
            _thread: std::marker::PhantomData,
        })
    }

    /// The setup flags the kernel accepted.
    pub fn flags(&self) -> &'static str {
        self.flags
    }

    /// Operations pushed and not reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Most operations in flight at once: the completion queue's size,
    /// so no completion ever overflows it.
    fn capacity(&self) -> usize {
        self.ring.params().cq_entries() as usize
    }

    /// Queues `op` (submitted by the next [`Ring::submit`] or
    /// [`Ring::wait`]). Where the queue is full, submits what is queued
    /// and, if the operations in flight fill the completion queue, waits
    /// for some first (their completions are kept for [`Ring::wait`]).
    /// Fails only where the kernel refuses `io_uring_enter`, giving the
    /// operation back (nothing of it reached the kernel).
    pub fn push(&mut self, tag: u64, op: Op<B>) -> Result<(), (io::Error, Op<B>)> {
        while self.in_flight >= self.capacity() {
            if let Err(e) = self.reap_some() {
                return Err((e, op));
            }
        }
        if self.ring.submission().is_full() {
            if let Err(e) = self.enter(0) {
                return Err((e, op));
            }
            if self.ring.submission().is_full() {
                return Err((io::Error::other("io_uring submission queue full"), op));
            }
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let op = match op {
            Op::Close(fd) => Held::Closing(fd.into_raw_fd()),
            op => Held::Op(op),
        };
        let p = Box::new(Pending { tag, op });
        let sqe = sqe_for(&p.op, self.max_write).user_data(slot as u64);
        // SAFETY: every pointer in `sqe` points into `*p` (the CString
        // bytes of a path, the bytes `buf` derefs to) or is an fd `*p`
        // owns. The kernel reads none of it before the next
        // `io_uring_enter`, by which time `p` is in `self.slots[slot]`;
        // there `*p` stays, neither moved (moving a box never moves its
        // contents), touched nor dropped, until the completion carrying
        // `slot` is reaped (`take_cqes`), or, if the ring is dropped
        // first, until every completion is (`Drop`, which leaks the slots
        // when it cannot wait). A `WriteBuf` is only reached through `&B`
        // here and nowhere else until then, so the slice it derefs to
        // stays valid: anything that could invalidate it through a shared
        // reference would make every `&[u8]` from it unsound too.
        let pushed = unsafe { self.ring.submission().push(&sqe) };
        if pushed.is_err() {
            // Not reached (the queue has room): nothing was queued.
            self.free.push(slot);
            let err = io::Error::other("io_uring submission queue full");
            return Err((err, p.op.into_op()));
        }
        self.slots[slot] = Some(p);
        self.in_flight += 1;
        Ok(())
    }

    /// Submits what is queued without waiting.
    pub fn submit(&mut self) -> io::Result<()> {
        self.enter(0).map(|_| ())
    }

    /// Submits what is queued, waits for at least one completion if any
    /// operation is in flight (or one was reaped earlier), and moves every
    /// completion at hand to `out`.
    pub fn wait(&mut self, out: &mut Vec<Completion<B>>) -> io::Result<()> {
        if self.ready.is_empty() && self.in_flight > 0 {
            self.enter(1)?;
        }
        self.take_cqes();
        out.append(&mut self.ready);
        Ok(())
    }

    /// Waits for at least one completion and keeps it in `ready`.
    fn reap_some(&mut self) -> io::Result<()> {
        self.enter(1)?;
        self.take_cqes();
        Ok(())
    }

    /// `io_uring_enter`: submits and waits for `want` completions,
    /// retrying when a signal interrupts it and reaping when the kernel
    /// says the completion queue is full.
    fn enter(&mut self, want: usize) -> io::Result<usize> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(n) => return Ok(n),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    self.take_cqes();
                    if want > 0 && !self.ready.is_empty() {
                        return Ok(0);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves the completions in the completion queue to `ready`, giving
    /// each its operation back.
    fn take_cqes(&mut self) {
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            let slot = cqe.user_data() as usize;
            let Some(p) = self.slots.get_mut(slot).and_then(Option::take) else {
                // Not ours (cannot happen: every SQE is pushed above).
                continue;
            };
            self.free.push(slot);
            self.in_flight -= 1;
            let res = cqe.result();
            let Pending { tag, op } = *p;
            let op = match op {
                Held::Op(op) => Some(op),
                Held::Closing(_) => None,
            };
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                Ok(match op {
                    // SAFETY: a successful openat returns a new fd that
                    // nothing else owns; it is wrapped exactly once.
                    Some(Op::OpenAt { .. }) => Value::Fd(unsafe { OwnedFd::from_raw_fd(res) }),
                    Some(Op::Write { .. }) => Value::Written(res as usize),
                    _ => Value::Done,
                })
            };
            self.ready.push(Completion { tag, op, result });
        }
    }
}

/// The SQE of `op`, pointing into it.
fn sqe_for<B: WriteBuf>(op: &Held<B>, max_write: usize) -> squeue::Entry {
    let fd = |f: &Arc<OwnedFd>| types::Fd(f.as_raw_fd());
    let op = match op {
        Held::Closing(fd) => return opcode::Close::new(types::Fd(*fd)).build(),
        Held::Op(op) => op,
    };
    match op {
        Op::OpenAt {
            dir,
            name,
            flags,
            mode,
        } => opcode::OpenAt::new(fd(dir), name.as_ptr())
            .flags(*flags)
            .mode(*mode)
            .build(),
        Op::Write {
            file,
            buf,
            start,
            offset,
        } => {
            let b: &[u8] = buf;
            let b = b.get(*start..).unwrap_or(&[]);
            let len = b.len().min(max_write) as u32;
            opcode::Write::new(fd(file), b.as_ptr(), len)
                .offset(*offset)
                .build()
        }
        Op::SymlinkAt { target, dir, name } => {
            opcode::SymlinkAt::new(fd(dir), target.as_ptr(), name.as_ptr()).build()
        }
        Op::LinkAt {
            old_dir,
            old_name,
            dir,
            name,
        } => opcode::LinkAt::new(fd(old_dir), old_name.as_ptr(), fd(dir), name.as_ptr()).build(),
        // Turned into `Held::Closing` by `push`.
        Op::Close(f) => opcode::Close::new(types::Fd(f.as_raw_fd())).build(),
    }
}

impl<B: WriteBuf> Drop for Ring<B> {
    fn drop(&mut self) {
        while self.in_flight > 0 {
            if self.enter(1).is_err() {
                // The kernel may still read what the slots point at:
                // leak them rather than free it.
                for s in self.slots.drain(..).flatten() {
                    std::mem::forget(s);
                }
                return;
            }
            self.take_cqes();
        }
        // `ready` and the slots drop normally (fds of unreaped opens
        // close).
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn dir() -> (std::path::PathBuf, Arc<OwnedFd>) {
        let p = std::env::temp_dir().join(format!(
            "unlade-ring-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir(&p).unwrap();
        let fd: OwnedFd = std::fs::File::open(&p).unwrap().into();
        (p, Arc::new(fd))
    }

    #[test]
    fn open_write_close_round_trip() {
        let Ok(mut ring) = Ring::<Vec<u8>>::new(RingOptions::default()) else {
            eprintln!("io_uring unavailable here; skipped");
            return;
        };
        let (p, d) = dir();
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC;
        ring.push(
            1,
            Op::OpenAt {
                dir: d.clone(),
                name: c"f".into(),
                flags,
                mode: 0o600,
            },
        )
        .map_err(|(e, _)| e)
        .unwrap();
        let mut out = Vec::new();
        while out.is_empty() {
            ring.wait(&mut out).unwrap();
        }
        let c = out.pop().unwrap();
        assert_eq!(c.tag, 1);
        let Ok(Value::Fd(fd)) = c.result else {
            panic!("{:?}", c.result)
        };
        let fd = Arc::new(fd);
        ring.push(
            2,
            Op::Write {
                file: fd.clone(),
                buf: b"hello world".to_vec(),
                start: 6,
                offset: 0,
            },
        )
        .unwrap();
        ring.wait(&mut out).unwrap();
        assert!(matches!(out.pop().unwrap().result, Ok(Value::Written(5))));
        // A second create of the same name: EEXIST, with the name back.
        ring.push(
            3,
            Op::OpenAt {
                dir: d.clone(),
                name: c"f".into(),
                flags,
                mode: 0o600,
            },
        )
        .unwrap();
        ring.wait(&mut out).unwrap();
        let c = out.pop().unwrap();
        assert_eq!(c.result.unwrap_err().raw_os_error(), Some(libc::EEXIST));
        assert!(matches!(c.op, Some(Op::OpenAt { name, .. }) if name.as_bytes() == b"f"));
        drop(fd);
        assert_eq!(std::fs::read(p.join("f")).unwrap(), b"world");
        let _ = d.as_fd();
        std::fs::remove_dir_all(&p).unwrap();
    }

    #[test]
    fn drop_waits_for_in_flight_writes() {
        let Ok(mut ring) = Ring::<Vec<u8>>::new(RingOptions::default()) else {
            return;
        };
        let (p, _d) = dir();
        let f: OwnedFd = std::fs::File::create(p.join("g")).unwrap().into();
        let f = Arc::new(f);
        for i in 0..200u64 {
            ring.push(
                i,
                Op::Write {
                    file: f.clone(),
                    buf: vec![b'x'; 4096],
                    start: 0,
                    offset: i * 4096,
                },
            )
            .unwrap();
        }
        ring.submit().unwrap();
        drop(ring);
        assert_eq!(std::fs::metadata(p.join("g")).unwrap().len(), 200 * 4096);
        std::fs::remove_dir_all(&p).unwrap();
    }
}
