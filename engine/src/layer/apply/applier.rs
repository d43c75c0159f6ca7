//! Tar entries → file-system jobs in an overlay upper directory.
//!
//! What this layer decides (and the backend never does): which path an
//! entry lands on, OCI whiteout conversion, what must happen before what,
//! and which jobs are independent enough to share a batch. Regular files,
//! the bulk of every layer, are batched; everything structural
//! (directories, links, nodes, whiteouts, replacing a directory) first
//! flushes the batch and runs alone, so a backend never sees two jobs that
//! depend on each other. Directory metadata is restored at the end, deepest
//! first, the way `tar --delay-directory-restore` does, so a directory's
//! mtime survives its children and a 0500 directory still receives them.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{CStr, CString};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use rustix::io::Errno;

use super::dirs::{self, Dirs, Missing};
use super::lower::{copy_up, LowerLayers};
use super::path::{normalize, split};
use crate::cancel::Cancel;
use crate::layer::error::{ApplyError, ErrorKind};
use crate::layer::fsops::{Backend, Done, Job, Meta, NodeKind, Op};
use crate::layer::stream::{Chunk, Source};
use crate::layer::tar::{Entry, Kind, Reader};

/// Most regular files in one batch.
const BATCH_FILES: usize = 256;
/// Most copied (streaming) bytes held by one batch.
const BATCH_BYTES: usize = 32 << 20;
/// Most directories whose metadata waits for the end of the layer.
pub const MAX_DELAYED_DIRS: usize = 1 << 22;
/// Most bytes of paths and xattrs held for delayed directories: a layer of
/// many directories with large xattrs must not grow memory without bound.
pub const MAX_DELAYED_BYTES: usize = 256 << 20;

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

/// Applies entries of one layer to one target directory.
pub struct Applier<'a, B: Backend> {
    backend: B,
    dirs: Dirs,
    same_owner: bool,
    pending: Vec<Job<'a>>,
    /// Entry name and offset of each pending job, by job id.
    ctx: Vec<(Vec<u8>, u64)>,
    pending_paths: HashSet<Vec<u8>>,
    pending_bytes: usize,
    done: Vec<Done>,
    delayed: BTreeMap<Vec<u8>, Delayed>,
    delayed_bytes: usize,
    counts: Counts,
    warnings: Vec<String>,
    cancel: Option<Cancel>,
    lower: Option<Arc<dyn LowerLayers>>,
}

impl<'a, B: Backend> Applier<'a, B> {
    /// An applier writing below `root` with `backend`. With `same_owner`,
    /// entries keep their numeric owner (as root); without, the process's.
    pub fn new(root: OwnedFd, backend: B, same_owner: bool) -> Self {
        Applier {
            backend,
            dirs: Dirs::new(root),
            same_owner,
            pending: Vec::new(),
            ctx: Vec::new(),
            pending_paths: HashSet::new(),
            pending_bytes: 0,
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
    /// (see [`super::lower`]).
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

    /// Runs the pending batch; the first failure (in job order) is the
    /// error.
    pub fn flush(&mut self) -> Result<(), ApplyError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.backend.run(&mut self.pending, &mut self.done);
        let mut first: Option<(usize, ApplyError)> = None;
        for d in self.done.drain(..) {
            if let Err(oe) = d.result {
                if first.as_ref().is_none_or(|(id, _)| d.id < *id) {
                    let (name, off) = &self.ctx[d.id];
                    first = Some((d.id, ApplyError::fs(oe.op, oe.err).at(Some(name), *off)));
                }
            }
        }
        self.pending.clear();
        self.ctx.clear();
        self.pending_paths.clear();
        self.pending_bytes = 0;
        match first {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    fn push(
        &mut self,
        e: &Entry,
        path: Vec<u8>,
        dir: Arc<OwnedFd>,
        name: CString,
        op: Op<'a>,
        bytes: usize,
    ) {
        let id = self.ctx.len();
        self.ctx.push((e.path.clone(), e.offset));
        self.pending_paths.insert(path);
        self.pending_bytes += bytes;
        self.pending.push(Job { id, dir, name, op });
    }

    /// Runs one job now (the batch must be empty); returns an opened fd.
    fn run_now(
        &mut self,
        who: Who<'_>,
        dir: Arc<OwnedFd>,
        name: CString,
        op: Op<'a>,
    ) -> Result<Option<OwnedFd>, ApplyError> {
        debug_assert!(self.pending.is_empty());
        let mut jobs = vec![Job {
            id: 0,
            dir,
            name,
            op,
        }];
        self.backend.run(&mut jobs, &mut self.done);
        let d = self
            .done
            .pop()
            .ok_or_else(|| ApplyError::fs("backend", Errno::IO.into()))?;
        self.done.clear();
        d.result
            .map_err(|oe| ApplyError::fs(oe.op, oe.err).at(Some(who.0), who.1))
    }

    /// The parent directory of `parent`, creating missing ones (0755,
    /// root-owned like containerd and GNU tar as root make them).
    fn parent(&mut self, e: &Entry, parent: &[u8]) -> Result<Arc<OwnedFd>, ApplyError> {
        if !self.dirs.is_cached(parent) {
            // A pending job may create or replace something on the way.
            self.flush()?;
        }
        let chown = self.same_owner;
        let backend = &mut self.backend;
        let done = &mut self.done;
        let mut mk = |dir: &Arc<OwnedFd>, name: &CStr| -> Result<(), ApplyError> {
            let mut jobs = vec![Job {
                id: 0,
                dir: dir.clone(),
                name: name.to_owned(),
                op: Op::MkdirParent { chown },
            }];
            backend.run(&mut jobs, done);
            let r = done.pop().map(|d| d.result);
            done.clear();
            match r {
                Some(Ok(_)) => Ok(()),
                Some(Err(oe)) => Err(ApplyError::fs(oe.op, oe.err)),
                None => Err(ApplyError::fs("backend", Errno::IO.into())),
            }
        };
        self.dirs
            .get(parent, &mut Missing::Create(&mut mk))
            .map_err(|err| err.at(Some(&e.path), e.offset))
    }

    /// Before an entry lands on `path`: if `path` is (or was) a directory
    /// this apply knows, whatever is pending runs first and every cached fd
    /// and delayed metadata at or below it is forgotten.
    fn replacing(&mut self, path: &[u8]) -> Result<(), ApplyError> {
        if self.pending_paths.contains(path) {
            self.flush()?;
        }
        if dirs::has_under(&self.delayed, path) {
            self.flush()?;
            for k in dirs::keys_under(&self.delayed, path) {
                self.delayed.remove(&k);
            }
        }
        if self.dirs.invalidate(path) {
            self.flush()?;
        }
        Ok(())
    }

    /// Applies one entry; its data are read from `r`.
    pub fn entry<S: Source<'a>>(
        &mut self,
        r: &mut Reader<'a, S>,
        e: Entry,
    ) -> Result<(), ApplyError> {
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

        // Everything else is structural: run alone, in order. A directory
        // over a directory merges (cached fds and an earlier opaque marker
        // stay valid); anything else replaces what is there.
        self.flush()?;
        if e.kind != Kind::Dir {
            self.replacing(&path)?;
        }
        let dir = self.parent(&e, &parent)?;
        match e.kind {
            Kind::Dir => {
                self.run_now(who(&e), dir, name, Op::Mkdir)?;
                self.counts.dirs += 1;
                let meta = self.meta(&e).map_err(at)?;
                let opaque = self.delayed.get(&path).is_some_and(|d| d.opaque);
                self.delay(&e, path, Some(meta), opaque)?;
            }
            Kind::File => self.sparse_file(r, &e, dir, name)?,
            Kind::Symlink => {
                let target = CString::new(e.link.clone()).map_err(|_| {
                    at(ApplyError::new(ErrorKind::UnsafePath(
                        "NUL in symlink target".into(),
                    )))
                })?;
                let meta = self.meta(&e).map_err(at)?;
                self.run_now(who(&e), dir, name, Op::Symlink { target, meta })?;
            }
            Kind::Hardlink => self.hardlink(&e, &path, dir, name)?,
            Kind::CharDev | Kind::BlockDev | Kind::Fifo => {
                let kind = match e.kind {
                    Kind::CharDev => NodeKind::Char(e.dev.0, e.dev.1),
                    Kind::BlockDev => NodeKind::Block(e.dev.0, e.dev.1),
                    _ => NodeKind::Fifo,
                };
                let meta = self.meta(&e).map_err(at)?;
                self.run_now(who(&e), dir, name, Op::Node { kind, meta })?;
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
            self.flush()?;
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
        self.flush()?;
        self.replacing(&target)?;
        let dir = self.parent(e, parent)?;
        let name = CString::new(wh)
            .map_err(|_| at(ApplyError::new(ErrorKind::Whiteout("NUL in name".into()))))?;
        let meta = Meta {
            owner: self.same_owner.then_some((e.uid, e.gid)),
            ..Meta::default()
        };
        self.run_now(
            who(e),
            dir,
            name,
            Op::Node {
                kind: NodeKind::Whiteout,
                meta,
            },
        )?;
        self.counts.whiteouts += 1;
        Ok(())
    }

    fn file<S: Source<'a>>(
        &mut self,
        r: &mut Reader<'a, S>,
        e: &Entry,
        path: Vec<u8>,
        parent: &[u8],
        name: CString,
    ) -> Result<(), ApplyError> {
        let at = |err: ApplyError| err.at(Some(&e.path), e.offset);
        self.replacing(&path)?;
        let dir = self.parent(e, parent)?;
        let meta = self.meta(e).map_err(at)?;
        let max = r.max_chunk();
        let first = r.read(e.size.min(max as u64) as usize)?;
        self.counts.files += 1;
        self.counts.bytes += e.size;
        if first.len() as u64 == e.size {
            // Whole file in hand: batch it.
            let owned = match &first {
                Chunk::Owned(v) => v.len(),
                Chunk::Borrowed(_) => 0,
            };
            let op = Op::File {
                data: vec![(0, first)],
                size: e.size,
                meta,
            };
            self.push(e, path, dir, name, op, owned);
            if self.pending.len() >= BATCH_FILES || self.pending_bytes >= BATCH_BYTES {
                self.flush()?;
            }
            return Ok(());
        }
        // Larger than a chunk of a streaming source: write it piecewise.
        self.flush()?;
        self.piecewise(r, e, dir, name, &[(0, e.size)], Some(first), e.size, meta)
    }

    /// Writes a file whose data arrive in several chunks: opens it, writes
    /// each extent's bytes at its offset (holes between extents stay
    /// holes), then sets its size and metadata. `first` is data already
    /// read for the first extent.
    #[allow(clippy::too_many_arguments)]
    fn piecewise<S: Source<'a>>(
        &mut self,
        r: &mut Reader<'a, S>,
        e: &Entry,
        dir: Arc<OwnedFd>,
        name: CString,
        extents: &[(u64, u64)],
        mut first: Option<Chunk<'a>>,
        size: u64,
        meta: Meta,
    ) -> Result<(), ApplyError> {
        let fd = self.open(e, dir, name)?;
        let max = r.max_chunk() as u64;
        for &(off, len) in extents {
            let (mut at, end) = (off, off + len);
            while at < end {
                let c = match first.take() {
                    Some(c) => c,
                    None => r.read((end - at).min(max) as usize)?,
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
                self.run_now(who(e), fd.clone(), CString::default(), op)?;
                at += n;
            }
        }
        let op = Op::Finish {
            file: fd.clone(),
            size,
            meta,
        };
        self.run_now(who(e), fd, CString::default(), op)?;
        Ok(())
    }

    fn open(
        &mut self,
        e: &Entry,
        dir: Arc<OwnedFd>,
        name: CString,
    ) -> Result<Arc<OwnedFd>, ApplyError> {
        let fd = self.run_now(who(e), dir, name, Op::Open)?.ok_or_else(|| {
            ApplyError::fs("open file", Errno::IO.into()).at(Some(&e.path), e.offset)
        })?;
        Ok(Arc::new(fd))
    }

    fn sparse_file<S: Source<'a>>(
        &mut self,
        r: &mut Reader<'a, S>,
        e: &Entry,
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
        self.piecewise(r, e, dir, name, &sp.extents, None, sp.real_size, meta)
    }

    fn hardlink(
        &mut self,
        e: &Entry,
        path: &[u8],
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
        match self.link_in_layer(e, &target, dir.clone(), name.clone()) {
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
        self.link_in_layer(e, &target, dir, name)
    }

    fn link_in_layer(
        &mut self,
        e: &Entry,
        target: &[u8],
        dir: Arc<OwnedFd>,
        name: CString,
    ) -> Result<(), ApplyError> {
        let at = |err: ApplyError| err.at(Some(&e.path), e.offset);
        let (tparent, tbase) = split(target);
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
        if let Ok(st) = rustix::fs::statat(&*tdir, &tname, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
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
        self.run_now(
            who(e),
            dir,
            name,
            Op::Hardlink {
                target_dir: tdir,
                target_name: tname,
            },
        )?;
        Ok(())
    }

    /// Restores delayed directory metadata and opaque markers, deepest
    /// directories first, after everything else of the layer is written.
    pub fn finish(mut self) -> Result<Counts, ApplyError> {
        self.flush()?;
        let mut all: Vec<(Vec<u8>, Delayed)> =
            std::mem::take(&mut self.delayed).into_iter().collect();
        // Deepest first, so a parent's mtime is set after its children's
        // last change.
        all.sort_by_key(|(p, _)| {
            std::cmp::Reverse(p.iter().filter(|&&b| b == b'/').count() + !p.is_empty() as usize)
        });
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
            self.run_now((&d.name, d.offset), fd, CString::default(), op)?;
        }
        Ok(self.counts)
    }
}

/// Whether an error says a hard link's target does not exist.
fn is_missing(err: &ApplyError) -> bool {
    matches!(&*err.kind, ErrorKind::Fs { source, .. } if source.raw_os_error() == Some(libc::ENOENT))
}
