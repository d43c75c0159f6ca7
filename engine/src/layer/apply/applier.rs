//! Tar entries → file-system jobs in an overlay upper directory.
//!
//! What this layer decides (and the backend never does): which path an
//! entry lands on, OCI whiteout conversion, and what must happen before
//! what. Jobs go to the workers of a pool through a [`Lane`], each to the
//! worker of its parent directory, and run while the parser reads on.
//! The applier keeps, for every path with a job in flight, that job's id,
//! and for every directory, how many jobs in flight write into it; an
//! entry waits only for what it depends on:
//! - a name written again (a later entry replacing an earlier one) goes to
//!   the same worker after a batch boundary, so it runs after the first;
//! - a directory about to be opened or created waits for the jobs writing
//!   its path and its ancestors' paths (a symlink or file there decides
//!   what the walk finds);
//! - a hard link waits for its target's job;
//! - replacing a directory waits for every job inside it.
//!
//! Directories themselves are made on the applier's own thread (it opens
//! them right after). Directory metadata is restored at the end, after
//! every other job of the layer completed, the way
//! `tar --delay-directory-restore` does, so a directory's mtime survives
//! its children and a 0500 directory still receives them.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CStr, CString};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use rustix::io::Errno;

use super::dirs::{self, Dirs, Missing};
use super::lower::{copy_up, LowerLayers};
use super::path::{normalize, split};
use crate::cancel::Cancel;
use crate::layer::error::{ApplyError, ErrorKind};
use crate::layer::fsops::pool::Lane;
use crate::layer::fsops::{Done, Job, Meta, NodeKind, Op, OpError};
use crate::layer::stream::{Chunk, Source};
use crate::layer::tar::{Entry, Kind, Reader};

/// Most directories whose metadata waits for the end of the layer.
pub const MAX_DELAYED_DIRS: usize = 1 << 22;
/// Most bytes of paths and xattrs held for delayed directories: a layer of
/// many directories with large xattrs must not grow memory without bound.
pub const MAX_DELAYED_BYTES: usize = 256 << 20;

/// Most directory fds the metadata restore keeps open at once.
const MAX_DIR_FDS_IN_FLIGHT: usize = 256;
/// The opaque whiteout marker.
const OPAQUE: &[u8] = b".wh..wh..opq";
/// Name prefixes of the xattrs overlayfs obeys in a layer directory
/// (`redirect`, `metacopy`, `origin`, `opaque`, `upper`, `impure`,
/// `nlink`, ...): the trusted namespace, and the user namespace a mount with
/// `userxattr` reads instead.
const OVERLAY_XATTRS: [&[u8]; 2] = [b"trusted.overlay.", b"user.overlay."];
/// Most warnings an apply keeps word for word; past it they are counted.
pub const MAX_WARNINGS: usize = 32;
/// Prefix of whiteouts, and of AUFS metadata (`.wh..wh.`) when doubled.
const WH: &[u8] = b".wh.";

/// Counts of what an apply did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    /// Archive entries processed.
    pub entries: u64,
    /// Regular files written.
    pub files: u64,
    /// Directories created or updated.
    pub dirs: u64,
    /// Whiteouts (file and opaque) converted.
    pub whiteouts: u64,
    /// File data bytes written.
    pub bytes: u64,
    /// Overlay control xattrs the layer carried and the apply dropped.
    pub dropped_xattrs: u64,
}

/// An entry's name and header offset, for errors.
type Who<'n> = (&'n [u8], u64);

fn who(e: &Entry) -> Who<'_> {
    (&e.path, e.offset)
}

struct Delayed {
    meta: Option<Meta>,
    opaque: bool,
    name: Vec<u8>,
    offset: u64,
}

/// A job not complete yet: for its error, and for the path maps.
struct InFlight {
    /// Entry name and header offset, for the error.
    name: Vec<u8>,
    offset: u64,
    /// The path the job writes, and its parent directory.
    path: Vec<u8>,
    parent: Vec<u8>,
    worker: usize,
}

/// Applies entries of one layer to one target directory.
pub struct Applier {
    lane: Lane,
    dirs: Dirs,
    same_owner: bool,
    next_id: u64,
    /// Jobs sent or queued and not complete, by id.
    in_flight: HashMap<u64, InFlight>,
    /// Path → the latest job in flight that writes it.
    by_path: HashMap<Vec<u8>, u64>,
    /// Directory → how many jobs in flight write into it.
    busy: BTreeMap<Vec<u8>, usize>,
    done: Vec<Done>,
    delayed: BTreeMap<Vec<u8>, Delayed>,
    delayed_bytes: usize,
    counts: Counts,
    warnings: Vec<String>,
    cancel: Option<Cancel>,
    lower: Option<Arc<dyn LowerLayers>>,
}

/// Where a job runs: on a worker, or right here (a directory).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Worker(usize),
    Here,
}

fn lane_err(e: std::io::Error) -> ApplyError {
    ApplyError::fs("backend", e)
}

impl Applier {
    /// An applier writing below `root` through `lane`. With `same_owner`,
    /// entries keep their numeric owner (as root); without, the process's.
    pub fn new(root: OwnedFd, lane: Lane, same_owner: bool) -> Self {
        Applier {
            lane,
            dirs: Dirs::new(root),
            same_owner,
            next_id: 0,
            in_flight: HashMap::new(),
            by_path: HashMap::new(),
            busy: BTreeMap::new(),
            done: Vec::new(),
            delayed: BTreeMap::new(),
            delayed_bytes: 0,
            counts: Counts::default(),
            warnings: Vec::new(),
            cancel: None,
            lower: None,
        }
    }

    /// Stops at the next entry once `cancel` is tripped.
    pub fn with_cancel(mut self, cancel: Option<Cancel>) -> Self {
        self.cancel = cancel;
        self
    }

    /// Resolves hard links to files of the layers below through `lower`
    /// (see the private `apply::lower`).
    pub fn with_lower(mut self, lower: Option<Arc<dyn LowerLayers>>) -> Self {
        self.lower = lower;
        self
    }

    /// What went right but not as the layer asked (dropped overlay
    /// xattrs), one line each naming the entry; at most [`MAX_WARNINGS`],
    /// then one line with the count of the rest. Taken once.
    pub fn take_warnings(&mut self) -> Vec<String> {
        let mut w = std::mem::take(&mut self.warnings);
        let told = w.len() as u64;
        if self.counts.dropped_xattrs > told {
            w.push(format!(
                "and {} more overlay xattrs dropped",
                self.counts.dropped_xattrs - told
            ));
        }
        w
    }

    fn meta(&mut self, e: &Entry) -> Result<Meta, ApplyError> {
        let mut xattrs = Vec::with_capacity(e.xattrs.len());
        for (k, v) in &e.xattrs {
            if OVERLAY_XATTRS.iter().any(|p| k.starts_with(p)) {
                // overlayfs obeys these in a lower directory: a layer that
                // set `redirect` or `origin` would show another layer's
                // files under its own names, `metacopy` would point a file
                // at other data. Dropped, not refused: no builder writes
                // them on purpose, but a layer tarred from an overlay upper
                // directory carries harmless ones, and that image should
                // still work. The applier's own opaque marker is separate.
                self.counts.dropped_xattrs += 1;
                if self.warnings.len() < MAX_WARNINGS {
                    self.warnings.push(format!(
                        "entry {:?} at offset {}: dropped xattr {} (overlayfs control \
                         attributes from a layer would change what the mounted image shows)",
                        String::from_utf8_lossy(&e.path),
                        e.offset,
                        String::from_utf8_lossy(k)
                    ));
                }
                continue;
            }
            let k = CString::new(k.clone()).map_err(|_| {
                ApplyError::new(ErrorKind::Pax("xattr name contains a NUL byte".into()))
            })?;
            xattrs.push((k, v.clone()));
        }
        Ok(Meta {
            owner: self.same_owner.then_some((e.uid, e.gid)),
            mode: e.mode,
            mtime: e.mtime,
            atime: e.atime,
            xattrs,
        })
    }

    /// Takes in completions: forgets their jobs, and returns the first
    /// failure among them (in job order) as the error of its entry.
    fn absorb(&mut self) -> Result<(), ApplyError> {
        let mut first: Option<(u64, ApplyError)> = None;
        for d in std::mem::take(&mut self.done) {
            let Some(f) = self.in_flight.remove(&d.id) else {
                continue;
            };
            if self.by_path.get(&f.path) == Some(&d.id) {
                self.by_path.remove(&f.path);
            }
            if let Some(n) = self.busy.get_mut(&f.parent) {
                *n -= 1;
                if *n == 0 {
                    self.busy.remove(&f.parent);
                }
            }
            if let Err(oe) = d.result {
                if first.as_ref().is_none_or(|(id, _)| d.id < *id) {
                    let err = ApplyError::fs(oe.op, oe.err).at(Some(&f.name), f.offset);
                    first = Some((d.id, err));
                }
            }
        }
        match first {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits until every job submitted so far has completed; the first
    /// failure is the error.
    pub fn flush(&mut self) -> Result<(), ApplyError> {
        self.lane.cut_all().map_err(lane_err)?;
        while self.lane.reap(true, &mut self.done).map_err(lane_err)? {
            self.absorb()?;
        }
        self.absorb()
    }

    /// Waits until job `id` has completed (and whatever its worker had
    /// before it).
    fn wait_for(&mut self, id: u64) -> Result<(), ApplyError> {
        let Some(w) = self.in_flight.get(&id).map(|f| f.worker) else {
            return Ok(());
        };
        self.lane.cut(w).map_err(lane_err)?;
        while self.in_flight.contains_key(&id) {
            if !self.lane.reap(true, &mut self.done).map_err(lane_err)? && self.done.is_empty() {
                break;
            }
            self.absorb()?;
        }
        Ok(())
    }

    /// Before a job at `path` routed `route`: a job in flight at the same
    /// path runs first. On the same worker a batch boundary is enough;
    /// elsewhere, wait for it.
    fn after_path(&mut self, path: &[u8], route: Route) -> Result<(), ApplyError> {
        let Some(&id) = self.by_path.get(path) else {
            return Ok(());
        };
        match (route, self.in_flight.get(&id).map(|f| f.worker)) {
            (Route::Worker(w), Some(v)) if w == v => {
                if self.lane.queued(w) {
                    self.lane.cut(w).map_err(lane_err)?;
                }
                Ok(())
            }
            _ => self.wait_for(id),
        }
    }

    /// Queues a job for `w`; `path` is what it writes, `parent` the
    /// directory it writes into.
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &mut self,
        who: Who<'_>,
        w: usize,
        path: Vec<u8>,
        parent: &[u8],
        dir: Arc<OwnedFd>,
        name: CString,
        op: Op,
    ) -> Result<(), ApplyError> {
        let id = self.next_id;
        self.next_id += 1;
        *self.busy.entry(parent.to_vec()).or_insert(0) += 1;
        self.by_path.insert(path.clone(), id);
        self.in_flight.insert(
            id,
            InFlight {
                name: who.0.to_vec(),
                offset: who.1,
                path,
                parent: parent.to_vec(),
                worker: w,
            },
        );
        self.lane
            .submit(w, Job { id, dir, name, op }, &mut self.done)
            .map_err(lane_err)?;
        self.lane.reap(false, &mut self.done).map_err(lane_err)?;
        self.absorb()
    }

    /// Runs one job on this thread now; returns an opened fd.
    fn run_here(
        &mut self,
        who: Who<'_>,
        dir: Arc<OwnedFd>,
        name: CString,
        op: Op,
    ) -> Result<Option<OwnedFd>, ApplyError> {
        let d = self.lane.run_here(Job {
            id: u64::MAX,
            dir,
            name,
            op,
        });
        d.result
            .map_err(|oe| ApplyError::fs(oe.op, oe.err).at(Some(who.0), who.1))
    }

    /// Before the directory walk to `dir` (unless it is cached): waits for
    /// the jobs in flight at `dir` and at each of its ancestors, since one
    /// may create or replace something on the way (a symlink the walk must
    /// follow, a file it must refuse).
    fn before_walk(&mut self, dir: &[u8]) -> Result<(), ApplyError> {
        if self.dirs.is_cached(dir) {
            return Ok(());
        }
        let mut end = 0;
        while end < dir.len() {
            end = dir[end..]
                .iter()
                .position(|&b| b == b'/')
                .map_or(dir.len(), |i| end + i);
            if let Some(&id) = self.by_path.get(&dir[..end]) {
                self.wait_for(id)?;
            }
            end += 1;
        }
        Ok(())
    }

    /// The parent directory of `parent`, creating missing ones (0755,
    /// root-owned like containerd and GNU tar as root make them).
    fn parent(&mut self, e: &Entry, parent: &[u8]) -> Result<Arc<OwnedFd>, ApplyError> {
        self.before_walk(parent)?;
        let chown = self.same_owner;
        let lane = &mut self.lane;
        let mut mk = |dir: &Arc<OwnedFd>, name: &CStr| -> Result<(), ApplyError> {
            let d = lane.run_here(Job {
                id: u64::MAX,
                dir: dir.clone(),
                name: name.to_owned(),
                op: Op::MkdirParent { chown },
            });
            d.result
                .map(|_| ())
                .map_err(|oe: OpError| ApplyError::fs(oe.op, oe.err))
        };
        self.dirs
            .get(parent, &mut Missing::Create(&mut mk))
            .map_err(|err| err.at(Some(&e.path), e.offset))
    }

    /// Before an entry lands on `path`, run `route`: a job in flight at
    /// `path` runs first, and if `path` is (or was) a directory, every job
    /// in flight inside it completes first and every cached fd and delayed
    /// metadata at or below it is forgotten.
    fn replacing(&mut self, path: &[u8], route: Route) -> Result<(), ApplyError> {
        self.after_path(path, route)?;
        if dirs::has_under(&self.busy, path) {
            self.flush()?;
        }
        if dirs::has_under(&self.delayed, path) {
            for k in dirs::keys_under(&self.delayed, path) {
                self.delayed.remove(&k);
            }
        }
        self.dirs.invalidate(path);
        Ok(())
    }

    /// Applies one entry; its data are read from `r`.
    pub fn entry<S: Source>(&mut self, r: &mut Reader<S>, e: Entry) -> Result<(), ApplyError> {
        self.counts.entries += 1;
        let at = |err: ApplyError| err.at(Some(&e.path), e.offset);
        if self.cancel.as_ref().is_some_and(Cancel::is_cancelled) {
            return Err(at(ApplyError::new(ErrorKind::Cancelled)));
        }
        let path = normalize(&e.path).map_err(at)?;
        if path.is_empty() {
            if e.kind != Kind::Dir {
                return Err(at(ApplyError::new(ErrorKind::UnsafePath(
                    "a non-directory entry would replace the layer root".into(),
                ))));
            }
            let meta = self.meta(&e).map_err(at)?;
            self.delay(&e, path, Some(meta), false)?;
            return Ok(());
        }
        let (parent, base) = split(&path);
        let (parent, base) = (parent.to_vec(), base.to_vec());
        let name = CString::new(base.clone())
            .map_err(|_| at(ApplyError::new(ErrorKind::UnsafePath("NUL in name".into()))))?;

        if let Some(wh) = base.strip_prefix(WH) {
            return self.whiteout(&e, &parent, &base, wh);
        }

        if e.kind == Kind::File && e.sparse.is_none() {
            return self.file(r, &e, path, &parent, name);
        }

        // Everything else is structural. A directory over a directory
        // merges (cached fds and an earlier opaque marker stay valid);
        // anything else replaces what is there.
        let w = self.lane.worker_for(&parent);
        match e.kind {
            Kind::Dir => self.after_path(&path, Route::Here)?,
            // Opened here, written by the worker.
            Kind::File => self.replacing(&path, Route::Here)?,
            _ => self.replacing(&path, Route::Worker(w))?,
        }
        let dir = self.parent(&e, &parent)?;
        match e.kind {
            Kind::Dir => {
                self.run_here(who(&e), dir, name, Op::Mkdir)?;
                self.counts.dirs += 1;
                let meta = self.meta(&e).map_err(at)?;
                let opaque = self.delayed.get(&path).is_some_and(|d| d.opaque);
                self.delay(&e, path, Some(meta), opaque)?;
            }
            Kind::File => self.sparse_file(r, &e, path, &parent, dir, name)?,
            Kind::Symlink => {
                let target = CString::new(e.link.clone()).map_err(|_| {
                    at(ApplyError::new(ErrorKind::UnsafePath(
                        "NUL in symlink target".into(),
                    )))
                })?;
                let meta = self.meta(&e).map_err(at)?;
                let op = Op::Symlink { target, meta };
                self.submit(who(&e), w, path, &parent, dir, name, op)?;
            }
            Kind::Hardlink => self.hardlink(&e, path, &parent, dir, name)?,
            Kind::CharDev | Kind::BlockDev | Kind::Fifo => {
                let kind = match e.kind {
                    Kind::CharDev => NodeKind::Char(e.dev.0, e.dev.1),
                    Kind::BlockDev => NodeKind::Block(e.dev.0, e.dev.1),
                    _ => NodeKind::Fifo,
                };
                let meta = self.meta(&e).map_err(at)?;
                let op = Op::Node { kind, meta };
                self.submit(who(&e), w, path, &parent, dir, name, op)?;
            }
        }
        Ok(())
    }

    fn delay(
        &mut self,
        e: &Entry,
        path: Vec<u8>,
        meta: Option<Meta>,
        opaque: bool,
    ) -> Result<(), ApplyError> {
        // Counted on every update, never given back: a bound, not a tally.
        self.delayed_bytes += path.len()
            + e.path.len()
            + meta.as_ref().map_or(0, |m| {
                m.xattrs
                    .iter()
                    .map(|(k, v)| k.as_bytes().len() + v.len())
                    .sum::<usize>()
            });
        if (self.delayed.len() >= MAX_DELAYED_DIRS && !self.delayed.contains_key(&path))
            || self.delayed_bytes > MAX_DELAYED_BYTES
        {
            return Err(ApplyError::new(ErrorKind::Limit(format!(
                "directory metadata held until the end of the layer exceeds {MAX_DELAYED_DIRS} \
                 directories or {MAX_DELAYED_BYTES} bytes"
            )))
            .at(Some(&e.path), e.offset));
        }
        let d = self.delayed.entry(path).or_insert(Delayed {
            meta: None,
            opaque: false,
            name: e.path.clone(),
            offset: e.offset,
        });
        if meta.is_some() {
            d.meta = meta;
            d.name = e.path.clone();
            d.offset = e.offset;
        }
        d.opaque |= opaque;
        Ok(())
    }

    fn whiteout(
        &mut self,
        e: &Entry,
        parent: &[u8],
        base: &[u8],
        wh: &[u8],
    ) -> Result<(), ApplyError> {
        let at = |err: ApplyError| err.at(Some(&e.path), e.offset);
        if base == OPAQUE {
            // The directory holding the marker hides the layers below.
            self.parent(e, parent)?;
            self.counts.whiteouts += 1;
            return self.delay(e, parent.to_vec(), None, true);
        }
        if wh.starts_with(WH) {
            // AUFS bookkeeping (.wh..wh.plnk and friends): not content.
            return Ok(());
        }
        if wh.is_empty() || wh == b"." || wh == b".." {
            return Err(at(ApplyError::new(ErrorKind::Whiteout(format!(
                "{:?} names no file",
                String::from_utf8_lossy(base)
            )))));
        }
        let mut target = parent.to_vec();
        if !target.is_empty() {
            target.push(b'/');
        }
        target.extend_from_slice(wh);
        let w = self.lane.worker_for(parent);
        self.replacing(&target, Route::Worker(w))?;
        let dir = self.parent(e, parent)?;
        let name = CString::new(wh)
            .map_err(|_| at(ApplyError::new(ErrorKind::Whiteout("NUL in name".into()))))?;
        let meta = Meta {
            owner: self.same_owner.then_some((e.uid, e.gid)),
            ..Meta::default()
        };
        let op = Op::Node {
            kind: NodeKind::Whiteout,
            meta,
        };
        self.submit(who(e), w, target, parent, dir, name, op)?;
        self.counts.whiteouts += 1;
        Ok(())
    }

    fn file<S: Source>(
        &mut self,
        r: &mut Reader<S>,
        e: &Entry,
        path: Vec<u8>,
        parent: &[u8],
        name: CString,
    ) -> Result<(), ApplyError> {
        let at = |err: ApplyError| err.at(Some(&e.path), e.offset);
        let w = self.lane.worker_for(parent);
        self.replacing(&path, Route::Worker(w))?;
        let dir = self.parent(e, parent)?;
        let meta = self.meta(e).map_err(at)?;
        let max = r.max_chunk() as u64;
        // A file that fits a chunk is read whole (copied if it straddles
        // blocks); a larger one is read as lent pieces from the start.
        let want = if e.size <= max {
            e.size
        } else {
            max.min(r.lendable()? as u64)
        };
        let first = r.read(want as usize)?;
        self.counts.files += 1;
        self.counts.bytes += e.size;
        if first.len() as u64 == e.size {
            // Whole file in hand: one job.
            let op = Op::File {
                data: vec![(0, first)],
                size: e.size,
                meta,
            };
            return self.submit(who(e), w, path, parent, dir, name, op);
        }
        // Larger than a chunk of a streaming source: written piecewise,
        // opened here, so after any job in flight at the same name.
        self.after_path(&path, Route::Here)?;
        let extents = [(0, e.size)];
        let file = PieceFile {
            path,
            parent,
            dir,
            name,
            size: e.size,
            meta,
        };
        self.piecewise(r, e, file, &extents, Some(first))
    }

    /// Writes a file whose data arrive in several chunks: opens it here,
    /// then its worker writes each extent's bytes at its offset (holes
    /// between extents stay holes) and, after all of them, sets its size
    /// and metadata. `first` is data already read for the first extent.
    fn piecewise<S: Source>(
        &mut self,
        r: &mut Reader<S>,
        e: &Entry,
        f: PieceFile<'_>,
        extents: &[(u64, u64)],
        mut first: Option<Chunk>,
    ) -> Result<(), ApplyError> {
        let w = self.lane.worker_for(f.parent);
        let fd = self.open(e, f.dir, f.name)?;
        let max = r.max_chunk() as u64;
        for &(off, len) in extents {
            let (mut at, end) = (off, off + len);
            while at < end {
                let c = match first.take() {
                    Some(c) => c,
                    None => {
                        let want = (end - at).min(max).min(r.lendable()? as u64);
                        r.read(want as usize)?
                    }
                };
                if c.is_empty() {
                    return Err(ApplyError::new(ErrorKind::Truncated(
                        "file data ends early".into(),
                    ))
                    .at(Some(&e.path), e.offset));
                }
                let n = c.len() as u64;
                let op = Op::Write {
                    file: fd.clone(),
                    offset: at,
                    data: c,
                };
                let path = f.path.clone();
                self.submit(
                    who(e),
                    w,
                    path,
                    f.parent,
                    fd.clone(),
                    CString::default(),
                    op,
                )?;
                at += n;
            }
        }
        // After every write.
        self.lane.cut(w).map_err(lane_err)?;
        let op = Op::Finish {
            file: fd.clone(),
            size: f.size,
            meta: f.meta,
        };
        self.submit(who(e), w, f.path, f.parent, fd, CString::default(), op)
    }

    fn open(
        &mut self,
        e: &Entry,
        dir: Arc<OwnedFd>,
        name: CString,
    ) -> Result<Arc<OwnedFd>, ApplyError> {
        let fd = self.run_here(who(e), dir, name, Op::Open)?.ok_or_else(|| {
            ApplyError::fs("open file", Errno::IO.into()).at(Some(&e.path), e.offset)
        })?;
        Ok(Arc::new(fd))
    }

    fn sparse_file<S: Source>(
        &mut self,
        r: &mut Reader<S>,
        e: &Entry,
        path: Vec<u8>,
        parent: &[u8],
        dir: Arc<OwnedFd>,
        name: CString,
    ) -> Result<(), ApplyError> {
        let Some(sp) = &e.sparse else {
            return Ok(());
        };
        let meta = self
            .meta(e)
            .map_err(|err| err.at(Some(&e.path), e.offset))?;
        self.counts.files += 1;
        self.counts.bytes += e.size;
        let file = PieceFile {
            path,
            parent,
            dir,
            name,
            size: sp.real_size,
            meta,
        };
        self.piecewise(r, e, file, &sp.extents, None)
    }

    fn hardlink(
        &mut self,
        e: &Entry,
        path: Vec<u8>,
        parent: &[u8],
        dir: Arc<OwnedFd>,
        name: CString,
    ) -> Result<(), ApplyError> {
        let at = |err: ApplyError| err.at(Some(&e.path), e.offset);
        let target = normalize(&e.link).map_err(at)?;
        if target.is_empty() {
            return Err(at(ApplyError::new(ErrorKind::UnsafePath(
                "hard link to the layer root".into(),
            ))));
        }
        if target == path {
            // A link to itself: already there.
            return Ok(());
        }
        match self.link_in_layer(e, &target, &path, parent, dir.clone(), name.clone()) {
            Err(err) if self.lower.is_some() && is_missing(&err) => {}
            r => return r,
        }
        // The target is not in this layer: copy it up from the layers
        // below, once they are complete, and link to the copy.
        let Some(lower) = self.lower.clone() else {
            return Ok(());
        };
        self.flush()?;
        let dirs = lower.dirs().map_err(at)?;
        copy_up(self.dirs.root(), &dirs, &target, self.same_owner).map_err(at)?;
        self.link_in_layer(e, &target, &path, parent, dir, name)
    }

    fn link_in_layer(
        &mut self,
        e: &Entry,
        target: &[u8],
        path: &[u8],
        parent: &[u8],
        dir: Arc<OwnedFd>,
        name: CString,
    ) -> Result<(), ApplyError> {
        let at = |err: ApplyError| err.at(Some(&e.path), e.offset);
        let (tparent, tbase) = split(target);
        // The target, and the directories on the way to it, complete
        // first: the link must see the file whole.
        if let Some(&id) = self.by_path.get(target) {
            self.wait_for(id)?;
        }
        self.before_walk(tparent)?;
        let tdir = self.dirs.get(tparent, &mut Missing::Fail).map_err(|err| {
            let link = String::from_utf8_lossy(&e.link);
            at(match *err.kind {
                ErrorKind::Fs { op, source } => {
                    ApplyError::fs(format!("hard link target {link:?}: {op}"), source)
                }
                other => ApplyError::new(other),
            })
        })?;
        let tname = CString::new(tbase)
            .map_err(|_| at(ApplyError::new(ErrorKind::UnsafePath("NUL in link".into()))))?;
        // A whiteout this layer made is a deletion, not a file: linking to
        // it would make a second whiteout under the link's name. GNU tar
        // extracting the flattened tree fails the same way ("Cannot hard
        // link ... No such file or directory").
        match rustix::fs::statat(&*tdir, &tname, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => {
                if rustix::fs::FileType::from_raw_mode(st.st_mode)
                    == rustix::fs::FileType::CharacterDevice
                    && st.st_rdev == 0
                {
                    return Err(at(ApplyError::new(ErrorKind::Hardlink(format!(
                        "target {:?} does not exist: this layer deleted it with a whiteout",
                        String::from_utf8_lossy(&e.link)
                    )))));
                }
            }
            Err(Errno::NOENT) => {
                // Said by the link itself, run here so the caller can
                // copy the target up from the layers below.
                return Err(at(ApplyError::fs("create hard link", Errno::NOENT.into())));
            }
            Err(_) => {}
        }
        let w = self.lane.worker_for(parent);
        let op = Op::Hardlink {
            target_dir: tdir,
            target_name: tname,
        };
        self.submit(who(e), w, path.to_vec(), parent, dir, name, op)
    }

    /// Restores delayed directory metadata and opaque markers after
    /// everything else of the layer is written, spread over the workers:
    /// setting a directory's own metadata changes nothing of its parent,
    /// so once every entry is in place they go in any order.
    pub fn finish(mut self) -> Result<Counts, ApplyError> {
        self.flush()?;
        let all: Vec<(Vec<u8>, Delayed)> = std::mem::take(&mut self.delayed).into_iter().collect();
        for (path, d) in all {
            let fd = if path.is_empty() {
                self.dirs.root().clone()
            } else {
                match dirs::open_in_root_nofollow(self.dirs.root(), &path) {
                    Ok(fd) => Arc::new(fd),
                    // Replaced by a non-directory later in the layer.
                    Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => continue,
                    Err(err) => {
                        return Err(ApplyError::fs("open directory", err.into())
                            .at(Some(&d.name), d.offset));
                    }
                }
            };
            let op = Op::DirMeta {
                meta: d.meta,
                opaque: d.opaque,
            };
            let w = self.lane.worker_for(&path);
            self.submit(
                (&d.name, d.offset),
                w,
                path.clone(),
                &path,
                fd,
                CString::default(),
                op,
            )?;
            // Each job holds a directory fd: keep the number open bounded
            // whatever the number of workers.
            if self.in_flight.len() >= MAX_DIR_FDS_IN_FLIGHT {
                self.flush()?;
            }
        }
        self.flush()?;
        Ok(self.counts)
    }
}

/// A file written piecewise: where it goes, its final size and metadata.
struct PieceFile<'p> {
    path: Vec<u8>,
    parent: &'p [u8],
    dir: Arc<OwnedFd>,
    name: CString,
    size: u64,
    meta: Meta,
}

/// Whether an error says a hard link's target does not exist.
fn is_missing(err: &ApplyError) -> bool {
    matches!(&*err.kind, ErrorKind::Fs { source, .. } if source.raw_os_error() == Some(libc::ENOENT))
}
