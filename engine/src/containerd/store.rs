//! The snapshots containerd keeps in unlade: `ROOT/containerd/`, with the
//! file system as the only record, safe beside other unlade processes on
//! the same root.
//!
//! containerd names backend snapshots itself (`<namespace>/<n>/<key>`, any
//! bytes), so each snapshot's directory is named by a hash of its name:
//!
//! - `snapshots/<h>/`, `h` the first 32 hex digits of the SHA-256 of the
//!   name, holds `info.json` (the [`Record`]: name, parent, kind, labels,
//!   times), `fs/` (the overlay upper directory, or for a committed
//!   snapshot the layer's tree) and, while active, `work/` (overlay's work
//!   directory).
//! - A snapshot is made whole in `tmp/` and renamed into place with
//!   `renameat2(RENAME_NOREPLACE)`: it exists whole or not at all, and a
//!   second Prepare of a name gets `AlreadyExists`.
//! - Commit writes the new record as `commit.json` beside `info.json`,
//!   renames the directory to the committed name's hash, then renames
//!   `commit.json` over `info.json`. Whoever finds a `commit.json` finishes
//!   the commit (the directory already has the new name) or undoes it (it
//!   has not), so a crash at any point leaves the active snapshot or the
//!   committed one, never half of each.
//! - Remove renames the directory into `trash/` and deletes it there.
//! - `mnt/<h>/` is where an active snapshot with parents is mounted (see
//!   [`CtrStore::mounts`]).
//!
//! Every change holds `lock` (an exclusive `flock`); reads do not, since
//! each change a reader can see is one rename.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustix::fs::{self as rfs, RenameFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use crate::cancel::Cancel;
use crate::containerd::mount;
use crate::oci::digest::Digest;
use crate::pipeline::error::RootError;
use crate::root::Root;
use crate::store::images::process_alive;
use crate::store::lock::FileLock;
use crate::store::snapshot::Mount;
use crate::store::statedir::private_name;

/// The most bytes of a key or name (containerd's keys are short; this
/// bounds what a record holds).
const MAX_NAME: usize = 4096;
/// The most bytes of one label's key and value together (containerd's
/// documented limit).
const MAX_LABEL: usize = 4096;
/// The most labels on one snapshot.
const MAX_LABELS: usize = 256;
/// A hold of the fast path's that no snapshot uses is released by Cleanup
/// once it is this old.
const STALE_HOLD: std::time::Duration = std::time::Duration::from_secs(3600);
/// The most bytes of `info.json` read back.
const MAX_RECORD: u64 = 4 << 20;
/// The most bytes of a record written: under what is read back, so that
/// every record written parses again (256 labels of 4,096 control
/// characters, each escaped as six bytes of JSON, would be 6 MB), and
/// over what the largest labels of plain text make (256 of 4,096 bytes:
/// 1.05 MB).
const MAX_RECORD_WRITTEN: usize = 2 << 20;
/// The prefix of the image records of the fast path's pulls, each
/// `<prefix><pid>-<n>`: removed once the pull's layers are held; one
/// whose process is gone (a crash mid-pull) is swept.
pub(crate) const PULL_RECORD: &str = "containerd-pull:";
/// The deepest parent chain followed (containerd images have at most a
/// few hundred layers).
const MAX_DEPTH: usize = 1000;

/// Why an operation on containerd's snapshots failed. The variants map to
/// the gRPC codes containerd turns back into its own error kinds.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CtrError {
    /// No snapshot has that name (gRPC `NotFound`).
    #[error("snapshot {0:?} does not exist")]
    NotFound(String),
    /// The name is taken (gRPC `AlreadyExists`).
    #[error("snapshot {0:?} already exists")]
    AlreadyExists(String),
    /// The snapshot is not in a state that allows this (gRPC
    /// `FailedPrecondition`): committing a view, removing a parent.
    #[error("snapshot {name:?}: {why}")]
    FailedPrecondition {
        /// The snapshot.
        name: String,
        /// What stands in the way.
        why: String,
    },
    /// The request itself is wrong (gRPC `InvalidArgument`).
    #[error("{0}")]
    InvalidArgument(String),
    /// A file-system operation failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// Where.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The fast path's pull, or another call into unlade's root, failed.
    #[error("{op} {name}")]
    Root {
        /// What was being done.
        op: &'static str,
        /// The image reference or snapshot.
        name: String,
        /// The error.
        #[source]
        source: Box<RootError>,
    },
    /// The client has too many calls waiting (gRPC `ResourceExhausted`).
    #[error("{0}")]
    Busy(String),
    /// The store's thread for the call was lost (it could not start, or
    /// the call panicked).
    #[error("the snapshotter's call failed")]
    Lost,
    /// A record on disk does not parse.
    #[error("snapshot record {}", path.display())]
    Record {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

impl From<crate::containerd::fair::Refused> for CtrError {
    /// The error of a call the store's pool did not run.
    fn from(r: crate::containerd::fair::Refused) -> CtrError {
        match r {
            crate::containerd::fair::Refused::Busy(n) => {
                CtrError::Busy(format!("this client has {n} calls waiting already"))
            }
            crate::containerd::fair::Refused::Lost => CtrError::Lost,
        }
    }
}

impl CtrError {
    /// One word for what failed ([`RootError::kind`] for unlade's pull;
    /// `local` for the store's own files).
    pub fn kind(&self) -> &'static str {
        match self {
            CtrError::Root { source, .. } => source.kind(),
            _ => "local",
        }
    }

    /// Whether this says the image has no layer of the chain a fast-path
    /// Prepare named: the labels were wrong, and the Prepare is left to
    /// containerd.
    pub fn not_in_image(&self) -> bool {
        matches!(self, CtrError::Root { source, .. } if matches!(**source, RootError::NotInImage { .. }))
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CtrError + 'a {
    move |source| CtrError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A snapshot's kind, as containerd's API has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read-only, made by View; never committed.
    View,
    /// Writable, made by Prepare; committed or removed.
    Active,
    /// Immutable, made by Commit; a parent of others.
    Committed,
}

impl Kind {
    /// The name containerd's filters use (`kind==committed`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// One snapshot's record: what containerd's `Info` carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// containerd's backend name of it.
    pub name: String,
    /// The parent's name, empty for none.
    #[serde(default)]
    pub parent: String,
    /// Its kind.
    pub kind: Kind,
    /// Creation time, nanoseconds since the epoch.
    pub created_ns: u64,
    /// Last change of the record, nanoseconds since the epoch.
    pub updated_ns: u64,
    /// containerd's labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Bytes and inodes of `fs/`, measured when committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// For a snapshot made by the fast path: the chain ID of unlade's
    /// committed snapshot that is its tree (and that it holds from gc).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<String>,
    /// For a layer the fast path handed back to containerd (and the
    /// snapshot containerd committed from it): the image whose pull fell
    /// back, so that the layers above it fall back at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
}

/// The store's lock, held (see [`CtrStore::lock`]).
pub(crate) struct Locked(#[allow(dead_code)] FileLock);

/// Disk usage of a snapshot's own tree, as containerd's `Usage` reports
/// it: allocated bytes and distinct inodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Usage {
    /// Allocated bytes (`st_blocks` × 512), each inode counted once.
    pub size: i64,
    /// Distinct inodes, the root directory included.
    pub inodes: i64,
}

/// How a Update request changes a record's labels (the only mutable part).
#[derive(Debug, Clone)]
pub enum LabelUpdate {
    /// Replace all labels (an empty mask, or the path `labels`).
    All,
    /// Set or (when absent in the request) remove these keys
    /// (`labels.<key>` paths).
    Keys(Vec<String>),
}

/// containerd's snapshots in an unlade root.
pub struct CtrStore {
    dir: PathBuf,
    dirfd: OwnedFd,
    snaps: OwnedFd,
    tmp: OwnedFd,
    trash: OwnedFd,
    root: Arc<Root>,
    /// Directories whose record did not read, already reported once.
    unreadable: std::sync::Mutex<HashSet<String>>,
}

impl std::fmt::Debug for CtrStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CtrStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Whether the process that named something `<pid>-<n>` (see
/// [`private_name`]) still lives (this one does); `None` when `name`
/// does not start with a pid.
fn owner_alive(name: &str) -> Option<bool> {
    let pid = name.split('-').next()?.parse::<i32>().ok()?;
    Some(pid == std::process::id() as i32 || process_alive(pid))
}

/// The name of the hold on unlade's committed snapshot that containerd's
/// snapshot `name` keeps (fast path).
pub fn holder(name: &str) -> String {
    format!("containerd-{}", hash_name(name))
}

/// The directory name of snapshot `name`.
pub fn hash_name(name: &str) -> String {
    let mut hex = Digest::of(name.as_bytes()).hex();
    hex.truncate(32);
    hex
}

fn open_dir(p: &Path) -> Result<OwnedFd, CtrError> {
    crate::store::statedir::open_dir(p).map_err(io_err("open", p))
}

fn check_name(what: &str, name: &str) -> Result<(), CtrError> {
    if name.is_empty() {
        return Err(CtrError::InvalidArgument(format!("{what} is empty")));
    }
    if name.len() > MAX_NAME {
        return Err(CtrError::InvalidArgument(format!(
            "{what} is {} bytes, more than {MAX_NAME}",
            name.len()
        )));
    }
    Ok(())
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), CtrError> {
    if labels.len() > MAX_LABELS {
        return Err(CtrError::InvalidArgument(format!(
            "{} labels, more than {MAX_LABELS}",
            labels.len()
        )));
    }
    for (k, v) in labels {
        if k.len() + v.len() > MAX_LABEL {
            return Err(CtrError::InvalidArgument(format!(
                "label {k:?} is {} bytes with its value, more than {MAX_LABEL}",
                k.len() + v.len()
            )));
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` and flushes it to disk.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CtrError> {
    let mut f = fs::File::create(path).map_err(io_err("create", path))?;
    f.write_all(bytes).map_err(io_err("write", path))?;
    f.sync_all().map_err(io_err("sync", path))
}

fn read_record(path: &Path) -> Result<Option<Record>, CtrError> {
    let f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("open", path)(e)),
    };
    let mut buf = Vec::new();
    f.take(MAX_RECORD)
        .read_to_end(&mut buf)
        .map_err(io_err("read", path))?;
    serde_json::from_slice(&buf)
        .map(Some)
        .map_err(|source| CtrError::Record {
            path: path.to_path_buf(),
            source,
        })
}

/// `r` as the bytes of its `info.json`: compact JSON, refused when larger
/// than [`MAX_RECORD_WRITTEN`] (only labels can make it so).
fn record_json(r: &Record) -> Result<Vec<u8>, CtrError> {
    let bytes = serde_json::to_vec(r)
        .map_err(|e| CtrError::InvalidArgument(format!("snapshot {:?}: record: {e}", r.name)))?;
    if bytes.len() > MAX_RECORD_WRITTEN {
        return Err(CtrError::InvalidArgument(format!(
            "snapshot {:?}: its labels make a record of {} bytes, more than {MAX_RECORD_WRITTEN}",
            r.name,
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// The usage of the tree at `dir`, without following symlinks or
/// leaving its file system.
pub fn tree_usage(dir: &Path) -> Result<Usage, CtrError> {
    let mut seen = HashSet::new();
    let mut u = Usage::default();
    let top = fs::symlink_metadata(dir).map_err(io_err("stat", dir))?;
    let mut stack = vec![dir.to_path_buf()];
    seen.insert(top.ino());
    u.inodes = 1;
    u.size = (top.blocks() * 512) as i64;
    while let Some(d) = stack.pop() {
        for ent in fs::read_dir(&d).map_err(io_err("list", &d))? {
            let ent = ent.map_err(io_err("list", &d))?;
            let md = ent.metadata().map_err(io_err("stat", &ent.path()))?;
            if md.dev() != top.dev() {
                continue;
            }
            if seen.insert(md.ino()) {
                u.inodes += 1;
                u.size += (md.blocks() * 512) as i64;
            }
            if md.is_dir() {
                stack.push(ent.path());
            }
        }
    }
    Ok(u)
}

impl CtrStore {
    /// Opens (creating) `ROOT/containerd` of unlade root `root` and settles
    /// what a crashed process left: commits half-done, staging
    /// directories, trash.
    pub fn open(root: Arc<Root>) -> Result<CtrStore, CtrError> {
        let dir = root.dir().join("containerd");
        let dirfd = open_dir(&dir)?;
        let snaps = open_dir(&dir.join("snapshots"))?;
        let tmp = open_dir(&dir.join("tmp"))?;
        let trash = open_dir(&dir.join("trash"))?;
        open_dir(&dir.join("mnt"))?;
        let s = CtrStore {
            dir,
            dirfd,
            snaps,
            tmp,
            trash,
            root,
            unreadable: Default::default(),
        };
        let trash = {
            let l = s.lock()?;
            for ent in s.entries()? {
                s.settle(&ent, &l)?;
            }
            s.mark_all_children(&l)?;
            s.sweep(&l)?
        };
        s.empty_trash(trash);
        Ok(s)
    }

    /// The directory: `ROOT/containerd`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the store's lock: every change holds it, and every helper
    /// that changes the store (or settles what a change left) takes the
    /// guard, so that holding it is checked by the compiler.
    pub(crate) fn lock(&self) -> Result<Locked, CtrError> {
        FileLock::acquire(&self.dirfd, "lock", &Cancel::new())
            .map(Locked)
            .map_err(|e| CtrError::Io {
                op: "lock",
                path: self.dir.join("lock"),
                source: io::Error::other(e.to_string()),
            })
    }

    fn snap_dir(&self, h: &str) -> PathBuf {
        self.dir.join("snapshots").join(h)
    }

    fn mnt_dir(&self, h: &str) -> PathBuf {
        self.dir.join("mnt").join(h)
    }

    /// The tree of `rec`: its own `fs/`, or for a snapshot made from one of
    /// unlade's (the fast path) that committed snapshot's.
    pub(crate) fn fs_of(&self, rec: &Record) -> PathBuf {
        match rec.chain.as_deref().and_then(|c| c.parse::<Digest>().ok()) {
            Some(chain) => self.root.snapshots().committed_dir(&chain).join("fs"),
            None => self.snap_dir(&hash_name(&rec.name)).join("fs"),
        }
    }

    fn entries(&self) -> Result<Vec<String>, CtrError> {
        let p = self.dir.join("snapshots");
        let mut out = Vec::new();
        for ent in fs::read_dir(&p).map_err(io_err("list", &p))? {
            let ent = ent.map_err(io_err("list", &p))?;
            if let Some(n) = ent.file_name().to_str() {
                out.push(n.to_string());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Finishes or undoes a commit that stopped between its renames, in
    /// directory `h`.
    fn settle(&self, h: &str, _: &Locked) -> Result<(), CtrError> {
        let d = self.snap_dir(h);
        let pending = d.join("commit.json");
        let rec = match read_record(&pending) {
            Ok(Some(rec)) => rec,
            Ok(None) => return Ok(()),
            // Cut short while being written, before the rename that
            // would have made it count: undone.
            Err(CtrError::Record { .. }) => {
                return fs::remove_file(&pending).map_err(io_err("undo commit", &pending))
            }
            Err(e) => return Err(e),
        };
        if hash_name(&rec.name) == h {
            fs::rename(&pending, d.join("info.json")).map_err(io_err("finish commit", &pending))
        } else {
            fs::remove_file(&pending).map_err(io_err("undo commit", &pending))
        }
    }

    /// The record in directory `h`, if it holds a whole snapshot. A
    /// pending commit is settled first, under `lock` if the caller holds
    /// it, else under the lock taken here.
    fn load_dir(&self, h: &str, lock: Option<&Locked>) -> Result<Option<Record>, CtrError> {
        let d = self.snap_dir(h);
        if d.join("commit.json").exists() {
            match lock {
                Some(l) => self.settle(h, l)?,
                None => self.settle(h, &self.lock()?)?,
            }
        }
        read_record(&d.join("info.json"))
    }

    /// The record of snapshot `name`.
    pub fn stat(&self, name: &str) -> Result<Record, CtrError> {
        self.get(name, None)
    }

    /// The record of snapshot `name` (see [`Self::load_dir`] for `lock`).
    pub(crate) fn get(&self, name: &str, lock: Option<&Locked>) -> Result<Record, CtrError> {
        check_name("key", name)?;
        match self.load_dir(&hash_name(name), lock)? {
            Some(r) if r.name == name => Ok(r),
            _ => Err(CtrError::NotFound(name.to_string())),
        }
    }

    /// Every snapshot, in no particular order.
    pub fn list(&self) -> Result<Vec<Record>, CtrError> {
        let mut out = Vec::new();
        for h in self.entries()? {
            match self.load_dir(&h, None) {
                Ok(Some(r)) if hash_name(&r.name) == h => out.push(r),
                Ok(_) => {}
                // One bad record (written by an older unlade, or damaged)
                // must not hide every other snapshot from containerd; it
                // stays removable by its name.
                Err(e) => self.report_unreadable(&h, &e),
            }
        }
        Ok(out)
    }

    fn report_unreadable(&self, h: &str, e: &CtrError) {
        let mut seen = self.unreadable.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() < 10_000 && seen.insert(h.to_string()) {
            tracing::warn!(
                directory = h,
                error = %crate::report::error_chain(e),
                "snapshot directory left out of listings"
            );
        }
    }

    fn children_dir(&self, h: &str) -> PathBuf {
        self.snap_dir(h).join("children")
    }

    /// Marks `snapshots/<hash of parent>/children/<child_h>`: that a
    /// snapshot in directory `child_h` names `parent` as its parent, so
    /// that Remove finds a parent's children without reading every
    /// record. Made before the child appears (a crash leaves a marker
    /// without a child, which Remove drops); returns whether it made one.
    fn mark_child(&self, parent: &str, child_h: &str, _: &Locked) -> Result<bool, CtrError> {
        let d = self.children_dir(&hash_name(parent));
        match crate::store::statedir::make_dir(&d, crate::store::statedir::PRIVATE) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("create", &d)(e)),
        }
        let m = d.join(child_h);
        match fs::OpenOptions::new().write(true).create_new(true).open(&m) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io_err("create", &m)(e)),
        }
    }

    fn unmark_child(&self, parent: &str, child_h: &str) {
        let _ = fs::remove_file(self.children_dir(&hash_name(parent)).join(child_h));
    }

    /// The name of a snapshot whose parent is `name`, if one exists: from
    /// `name`'s markers, each checked against the child's record (markers
    /// of children that are gone are dropped). A child whose record does
    /// not read counts: its parent stays until it is removed.
    fn a_child_of(&self, name: &str, l: &Locked) -> Result<Option<String>, CtrError> {
        let d = self.children_dir(&hash_name(name));
        let rd = match fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("list", &d)(e)),
        };
        for ent in rd {
            let ent = ent.map_err(io_err("list", &d))?;
            let Some(ch) = ent.file_name().to_str().map(str::to_string) else {
                continue;
            };
            match self.load_dir(&ch, Some(l)) {
                Ok(Some(r)) if r.parent == name && hash_name(&r.name) == ch => {
                    return Ok(Some(r.name))
                }
                Ok(_) => {
                    let _ = fs::remove_file(ent.path());
                }
                Err(_) => return Ok(Some(format!("the unreadable snapshot in {ch}"))),
            }
        }
        Ok(None)
    }

    /// Makes the marker of every snapshot with a parent (a store made
    /// before markers, or a marker lost in a crash). At open.
    fn mark_all_children(&self, l: &Locked) -> Result<(), CtrError> {
        for h in self.entries()? {
            if let Ok(Some(r)) = self.load_dir(&h, Some(l)) {
                if !r.parent.is_empty()
                    && hash_name(&r.name) == h
                    && self.snap_dir(&hash_name(&r.parent)).is_dir()
                {
                    self.mark_child(&r.parent, &h, l)?;
                }
            }
        }
        Ok(())
    }

    /// The `fs/` directories of `parent` and its ancestors, nearest first:
    /// an overlay's `lowerdir` list.
    fn lowers(&self, parent: &str, l: &Locked) -> Result<Vec<PathBuf>, CtrError> {
        let mut out = Vec::new();
        let mut next = parent.to_string();
        while !next.is_empty() {
            if out.len() >= MAX_DEPTH {
                return Err(CtrError::FailedPrecondition {
                    name: parent.to_string(),
                    why: format!("more than {MAX_DEPTH} ancestors"),
                });
            }
            let r = self.get(&next, Some(l))?;
            out.push(self.fs_of(&r));
            next = r.parent;
        }
        Ok(out)
    }

    /// Prepare (`view` false) or View (`view` true): a new snapshot
    /// `key` on top of committed snapshot `parent` (empty for none), and
    /// the mounts that show it. (The fast path, CRI's labelled Prepares,
    /// is [`crate::containerd::fast`]'s, before this.)
    pub fn create(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        view: bool,
    ) -> Result<Vec<Mount>, CtrError> {
        self.create_with(key, parent, labels, view, None)
    }

    /// Prepare as [`Self::create`], for a layer whose fast-path pull of
    /// image `image` fell back to containerd: the record says so, and so
    /// does the snapshot containerd commits from it, so that the layers
    /// above fall back at once instead of trying the same pull again.
    pub fn create_fallen_back(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        image: &str,
    ) -> Result<Vec<Mount>, CtrError> {
        self.create_with(key, parent, labels, false, Some(image.to_string()))
    }

    fn create_with(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        view: bool,
        fallback: Option<String>,
    ) -> Result<Vec<Mount>, CtrError> {
        self.check_request(key, &labels)?;
        let l = self.lock()?;
        self.check_parent(parent, &l)?;
        let h = hash_name(key);
        if let Some(r) = self.load_dir(&h, Some(&l))? {
            // Same hash, another name: 128 bits make this a broken store,
            // not a collision, but never overwrite it.
            return Err(CtrError::AlreadyExists(if r.name == key {
                key.to_string()
            } else {
                format!("{key} (its directory {h} holds {:?})", r.name)
            }));
        }
        let now = now_ns();
        let rec = Record {
            name: key.to_string(),
            parent: parent.to_string(),
            kind: if view { Kind::View } else { Kind::Active },
            created_ns: now,
            updated_ns: now,
            labels,
            usage: None,
            chain: None,
            fallback,
        };
        self.publish(&rec, if view { &["fs"] } else { &["fs", "work"] }, &l)?;
        match self.mounts_of(&rec, &l) {
            Ok(m) => Ok(m),
            Err(e) => {
                // Not usable, so not made.
                let _ = self.trash(&h, &l);
                Err(e)
            }
        }
    }

    /// Checks a Prepare's key and labels as [`CtrStore::create`] does,
    /// before the fast path does anything for it.
    pub fn check_request(
        &self,
        key: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), CtrError> {
        check_name("key", key)?;
        check_labels(labels)
    }

    /// The unlade root this store is part of.
    pub fn root(&self) -> &Arc<Root> {
        &self.root
    }

    /// Fails unless `parent` is empty or names a committed snapshot.
    /// Under the lock, this is what a new child is made on: a parent
    /// removed meanwhile (while the fast path pulled) is `NotFound` here,
    /// never a child without its parent. Returns the parent's record.
    pub(crate) fn check_parent(
        &self,
        parent: &str,
        l: &Locked,
    ) -> Result<Option<Record>, CtrError> {
        if parent.is_empty() {
            return Ok(None);
        }
        let p = self.get(parent, Some(l))?;
        if p.kind != Kind::Committed {
            return Err(CtrError::InvalidArgument(format!(
                "parent {parent:?} is {}, not committed",
                p.kind.as_str()
            )));
        }
        Ok(Some(p))
    }

    /// Makes snapshot `rec` whole in `tmp/` — its record and the empty
    /// directories `dirs` (`fs`, `work`; none for a snapshot whose tree is
    /// unlade's) — and renames it into place, `AlreadyExists` if the name
    /// is taken, after marking it as its parent's child. The caller
    /// checked the parent under the same lock ([`Self::check_parent`]).
    pub(crate) fn publish(&self, rec: &Record, dirs: &[&str], l: &Locked) -> Result<(), CtrError> {
        use crate::store::statedir::{make_dir, PRIVATE};
        let h = hash_name(&rec.name);
        let name = private_name();
        let tmp = self.dir.join("tmp").join(&name);
        let mut marked = false;
        let made = (|| {
            let json = record_json(rec)?;
            make_dir(&tmp, PRIVATE).map_err(io_err("create", &tmp))?;
            for d in dirs {
                let p = tmp.join(d);
                // `fs` is the root directory a container sees (0755 unless
                // a layer says otherwise); `work` is overlay's own.
                let mode = if *d == "fs" { 0o755 } else { PRIVATE };
                make_dir(&p, mode).map_err(io_err("create", &p))?;
            }
            write_synced(&tmp.join("info.json"), &json)?;
            if !rec.parent.is_empty() {
                marked = self.mark_child(&rec.parent, &h, l)?;
            }
            match rfs::renameat_with(
                &self.tmp,
                name.as_str(),
                &self.snaps,
                h.as_str(),
                RenameFlags::NOREPLACE,
            ) {
                Ok(()) => Ok(()),
                Err(Errno::EXIST) => Err(CtrError::AlreadyExists(rec.name.clone())),
                Err(e) => Err(io_err("rename into place", &self.snap_dir(&h))(e.into())),
            }
        })();
        if made.is_err() {
            let _ = fs::remove_dir_all(&tmp);
            if marked {
                self.unmark_child(&rec.parent, &h);
            }
        }
        made
    }

    /// The mounts that show snapshot `key` (Mounts).
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, CtrError> {
        let l = self.lock()?;
        let rec = self.get(key, Some(&l))?;
        self.mounts_of(&rec, &l)
    }

    /// The mounts of `rec`, which containerd mounts in order on one
    /// target:
    /// - an active snapshot without parents: its `fs/`, bound read-write;
    /// - an active snapshot with parents: the overlay of its `fs/` on its
    ///   parents' trees, which unlade mounts itself at `mnt/<h>`, bound
    ///   read-write. containerd's applier, given an overlay mount, would
    ///   write into the upper directory directly and could not make a hard
    ///   link to a file of a lower layer, nor see lower files at all;
    ///   through a mounted overlay the kernel copies up as for any writer;
    /// - a view of one snapshot: that snapshot's tree, bound read-only;
    /// - a view of more: the read-only overlay of their trees, which
    ///   unlade mounts itself at `mnt/<h>` (one `lowerdir+` per layer, so
    ///   that no count of layers meets the page that mount options get),
    ///   bound read-only;
    /// - a committed snapshot: none (FailedPrecondition), as in containerd.
    fn mounts_of(&self, rec: &Record, l: &Locked) -> Result<Vec<Mount>, CtrError> {
        let h = hash_name(&rec.name);
        let d = self.snap_dir(&h);
        let bind = |src: PathBuf, rw: bool| Mount {
            kind: "bind",
            source: src,
            options: vec![if rw { "rw" } else { "ro" }.into(), "rbind".into()],
            cwd: None,
        };
        match rec.kind {
            Kind::Committed => Err(CtrError::FailedPrecondition {
                name: rec.name.clone(),
                why: "a committed snapshot has no mounts".into(),
            }),
            Kind::Active if rec.parent.is_empty() => Ok(vec![bind(d.join("fs"), true)]),
            Kind::Active => {
                let lowers = self.lowers(&rec.parent, l)?;
                let target = self.mnt_dir(&h);
                crate::store::statedir::make_dirs(&target, crate::store::statedir::PRIVATE)
                    .map_err(io_err("create", &target))?;
                if !mount::is_mount_point(&target).map_err(io_err("stat", &target))? {
                    mount::overlay(&target, &lowers, &d.join("fs"), &d.join("work"))
                        .map_err(io_err("mount overlay", &target))?;
                }
                Ok(vec![bind(target, true)])
            }
            Kind::View => {
                let lowers = self.lowers(&rec.parent, l)?;
                match lowers.len() {
                    0 => Ok(vec![bind(d.join("fs"), false)]),
                    1 => Ok(vec![bind(lowers[0].clone(), false)]),
                    _ => {
                        let target = self.mnt_dir(&h);
                        crate::store::statedir::make_dirs(&target, crate::store::statedir::PRIVATE)
                            .map_err(io_err("create", &target))?;
                        if !mount::is_mount_point(&target).map_err(io_err("stat", &target))? {
                            mount::overlay_ro(&target, &lowers)
                                .map_err(io_err("mount overlay", &target))?;
                        }
                        Ok(vec![bind(target, false)])
                    }
                }
            }
        }
    }

    /// Commits active snapshot `key` as `name`, with `labels`.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), CtrError> {
        check_name("name", name)?;
        check_labels(&labels)?;
        let l = self.lock()?;
        let rec = self.get(key, Some(&l))?;
        if rec.kind != Kind::Active {
            return Err(CtrError::FailedPrecondition {
                name: key.to_string(),
                why: format!(
                    "only an active snapshot commits, this is {}",
                    rec.kind.as_str()
                ),
            });
        }
        let (hk, hn) = (hash_name(key), hash_name(name));
        if self.load_dir(&hn, Some(&l))?.is_some() {
            return Err(CtrError::AlreadyExists(name.to_string()));
        }
        let now = now_ns();
        let mut committed = Record {
            name: name.to_string(),
            parent: rec.parent.clone(),
            kind: Kind::Committed,
            created_ns: now,
            updated_ns: now,
            labels,
            // As long as a usage gets: the size is checked before the
            // overlay is unmounted and its work directory removed.
            usage: Some(Usage {
                size: i64::MIN,
                inodes: i64::MIN,
            }),
            chain: None,
            fallback: rec.fallback.clone(),
        };
        record_json(&committed)?;
        // Still mounted elsewhere (the binds containerd was given), or in
        // use: containerd's contract lets a client commit without
        // unmounting first. unlade's own mount goes; the overlay lives on
        // in the others' mounts, so its work directory stays (removed with
        // the snapshot).
        let target = self.mnt_dir(&hk);
        let mut live = false;
        if mount::is_mount_point(&target).map_err(io_err("stat", &target))? {
            live = !mount::other_mounts(&target)
                .map_err(io_err("list mounts of", &target))?
                .is_empty();
            match mount::unmount(&target, false) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    live = true;
                    mount::unmount(&target, true).map_err(io_err("unmount", &target))?;
                }
                Err(e) => return Err(io_err("unmount", &target)(e)),
            }
        }
        let _ = fs::remove_dir(&target);
        let d = self.snap_dir(&hk);
        let work = d.join("work");
        if !live && work.exists() {
            fs::remove_dir_all(&work).map_err(io_err("remove", &work))?;
        }
        committed.usage = Some(tree_usage(&d.join("fs"))?);
        let json = record_json(&committed)?;
        let marked = if rec.parent.is_empty() {
            false
        } else {
            self.mark_child(&rec.parent, &hn, &l)?
        };
        let undo = |e| {
            let _ = fs::remove_file(d.join("commit.json"));
            if marked {
                self.unmark_child(&rec.parent, &hn);
            }
            e
        };
        write_synced(&d.join("commit.json"), &json).map_err(undo)?;
        match rfs::renameat_with(
            &self.snaps,
            hk.as_str(),
            &self.snaps,
            hn.as_str(),
            RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {}
            Err(e) => {
                return Err(undo(if e == Errno::EXIST {
                    CtrError::AlreadyExists(name.to_string())
                } else {
                    io_err("rename", &d)(e.into())
                }));
            }
        }
        if !rec.parent.is_empty() {
            self.unmark_child(&rec.parent, &hk);
        }
        self.settle(&hn, &l)
    }

    /// Removes snapshot `key`; a snapshot that is another's parent stays.
    /// Its children are found by their markers, not by reading every
    /// record; a snapshot whose record does not read is removed by its
    /// name all the same.
    pub fn remove(&self, key: &str) -> Result<(), CtrError> {
        let trash = {
            let l = self.lock()?;
            let h = hash_name(key);
            let rec = match self.get(key, Some(&l)) {
                Ok(r) => Some(r),
                // A directory under the name's hash whose record does not
                // read (damaged, cut short, missing): removable by the
                // name all the same.
                Err(e)
                    if self.snap_dir(&h).is_dir() && !matches!(e, CtrError::InvalidArgument(_)) =>
                {
                    if let Some(r) = self.load_dir(&h, Some(&l)).ok().flatten() {
                        // Another name's directory (a hash collision):
                        // never this name's to remove.
                        if r.name != key {
                            return Err(CtrError::NotFound(key.to_string()));
                        }
                    }
                    tracing::warn!(
                        snapshot = key,
                        error = %crate::report::error_chain(&e),
                        "removing a snapshot whose record does not read"
                    );
                    None
                }
                Err(e) => return Err(e),
            };
            if let Some(child) = self.a_child_of(key, &l)? {
                return Err(CtrError::FailedPrecondition {
                    name: key.to_string(),
                    why: format!("cannot remove snapshot with child {child:?}"),
                });
            }
            let trash = self.trash(&h, &l)?;
            if let Some(parent) = rec.as_ref().map(|r| &r.parent).filter(|p| !p.is_empty()) {
                self.unmark_child(parent, &h);
            }
            // unlade's snapshot (the fast path's) is free for its gc once
            // nothing else holds it; a record that does not read may have
            // been one.
            if rec.as_ref().is_none_or(|r| r.chain.is_some()) {
                self.root
                    .release_snapshot(&holder(key))
                    .map_err(|e| CtrError::Root {
                        op: "release the hold of",
                        name: key.to_string(),
                        source: Box::new(e),
                    })?;
            }
            trash
        };
        let _ = fs::remove_dir_all(&trash);
        Ok(())
    }

    /// Unmounts the snapshot in directory `h` and moves that directory
    /// into the trash; returns where it went, for the caller to delete
    /// outside the lock.
    fn trash(&self, h: &str, _: &Locked) -> Result<PathBuf, CtrError> {
        let h = h.to_string();
        let target = self.mnt_dir(&h);
        if mount::is_mount_point(&target).unwrap_or(false) {
            // A container still on it keeps its files open either way;
            // detaching lets the removal go on.
            mount::unmount(&target, true).map_err(io_err("unmount", &target))?;
        }
        let _ = fs::remove_dir(&target);
        let name = format!("{h}-{}", private_name());
        rfs::renameat(&self.snaps, h.as_str(), &self.trash, name.as_str()).map_err(|e| {
            CtrError::Io {
                op: "move to trash",
                path: self.snap_dir(&h),
                source: e.into(),
            }
        })?;
        Ok(self.dir.join("trash").join(name))
    }

    /// Update: sets the labels of snapshot `name` as `how` says, from
    /// `labels`; returns the new record.
    pub fn update(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
        how: LabelUpdate,
    ) -> Result<Record, CtrError> {
        let l = self.lock()?;
        let mut rec = self.get(name, Some(&l))?;
        match how {
            LabelUpdate::All => rec.labels = labels,
            LabelUpdate::Keys(keys) => {
                for k in keys {
                    match labels.get(&k) {
                        Some(v) => rec.labels.insert(k, v.clone()),
                        None => rec.labels.remove(&k),
                    };
                }
            }
        }
        check_labels(&rec.labels)?;
        rec.updated_ns = now_ns();
        self.rewrite(&rec, &l)?;
        Ok(rec)
    }

    /// Writes `rec` over its record, in one rename.
    fn rewrite(&self, rec: &Record, _: &Locked) -> Result<(), CtrError> {
        let json = record_json(rec)?;
        let d = self.snap_dir(&hash_name(&rec.name));
        let tmp = d.join(format!("info.json.{}", private_name()));
        write_synced(&tmp, &json)?;
        fs::rename(&tmp, d.join("info.json")).map_err(io_err("rename", &tmp))
    }

    /// Usage of snapshot `key`'s own tree: measured now for active
    /// snapshots and views; for committed ones as measured at commit, or
    /// for the fast path's (whose adoption does not walk the layer's tree:
    /// that would hold up the pull) when first asked, then kept in the
    /// record (containerd's CRI asks every few seconds).
    pub fn usage(&self, key: &str) -> Result<Usage, CtrError> {
        let rec = self.stat(key)?;
        match rec.usage {
            Some(u) if rec.kind == Kind::Committed => Ok(u),
            None if rec.kind == Kind::Committed => {
                let u = tree_usage(&self.fs_of(&rec))?;
                let l = self.lock()?;
                let mut now = self.get(key, Some(&l))?;
                if now.kind == Kind::Committed && now.usage.is_none() {
                    now.usage = Some(u);
                    self.rewrite(&now, &l)?;
                }
                Ok(u)
            }
            _ => tree_usage(&self.fs_of(&rec)),
        }
    }

    /// Cleanup: deletes the trash, staging directories and mount points
    /// of snapshots that are gone, and releases the fast path's holds that
    /// no snapshot uses (after an hour).
    pub fn cleanup(&self) -> Result<(), CtrError> {
        let trash = {
            let l = self.lock()?;
            self.sweep(&l)?
        };
        self.empty_trash(trash);
        Ok(())
    }

    /// Moves staging leftovers into the trash, unmounts
    /// and removes mount points of snapshots that are gone, releases
    /// stale holds; returns the trash's entries, which the caller deletes
    /// after releasing the lock (a large tree takes seconds, and every
    /// change waits for the lock).
    fn sweep(&self, _: &Locked) -> Result<Vec<PathBuf>, CtrError> {
        // Nobody stages without the lock: what is in tmp/ now is left by a
        // process that died.
        let p = self.dir.join("tmp");
        for ent in fs::read_dir(&p).map_err(io_err("list", &p))?.flatten() {
            let name = format!("tmp-{}", private_name());
            let _ = fs::rename(ent.path(), self.dir.join("trash").join(name));
        }
        let p = self.dir.join("trash");
        let trash: Vec<PathBuf> = fs::read_dir(&p)
            .map_err(io_err("list", &p))?
            .flatten()
            .map(|e| e.path())
            .collect();
        let p = self.dir.join("mnt");
        for ent in fs::read_dir(&p).map_err(io_err("list", &p))?.flatten() {
            let Some(h) = ent.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if !self.snap_dir(&h).exists() {
                if mount::is_mount_point(&ent.path()).unwrap_or(false) {
                    let _ = mount::unmount(&ent.path(), true);
                }
                let _ = fs::remove_dir(ent.path());
            }
        }
        // Holds the fast path took for the layers of a pull that containerd
        // then gave up (it never asked for them): no snapshot here uses
        // them, and they are older than any adoption still under way
        // (which takes its holds again when its pull ends).
        let snaps = self.root.snapshots();
        for (holder, _) in snaps.list_holds().unwrap_or_default() {
            let Some(h) = holder.strip_prefix("containerd-") else {
                continue;
            };
            // An adoption's own hold (`containerd-adopt-<pid>-<n>`) stays
            // while its process lives: its pull may run past the hour.
            let live = h.strip_prefix("adopt-").and_then(owner_alive) == Some(true);
            let stale = snaps.hold_age(&holder).is_some_and(|a| a > STALE_HOLD);
            if stale && !live && !self.snap_dir(h).exists() {
                let _ = self.root.release_snapshot(&holder);
            }
        }
        // The records of fast-path pulls whose process died before it
        // dropped them (each would keep an image's layers from gc).
        for img in self.root.list_images().unwrap_or_default() {
            let Some(rest) = img.name.strip_prefix(PULL_RECORD) else {
                continue;
            };
            if owner_alive(rest) == Some(false) {
                let _ = self.root.remove_image(&img.name);
            }
        }
        Ok(trash)
    }

    /// Deletes entries of the trash (another process may be deleting the
    /// same ones).
    fn empty_trash(&self, entries: Vec<PathBuf>) {
        for p in entries {
            let _ = fs::remove_dir_all(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn open(dir: &Path) -> CtrStore {
        let root = Root::open(dir, crate::root::RootOptions::default()).unwrap();
        CtrStore::open(Arc::new(root)).unwrap()
    }

    fn store() -> (tempfile::TempDir, CtrStore) {
        let t = tempfile::tempdir().unwrap();
        let s = open(t.path());
        (t, s)
    }

    /// A committed snapshot `name` (no parent) holding file `f`.
    fn committed(s: &CtrStore, name: &str, f: &str) {
        let key = format!("{name}-active");
        let m = s.create(&key, "", BTreeMap::new(), false).unwrap();
        assert_eq!(m[0].kind, "bind");
        fs::write(m[0].source.join(f), f).unwrap();
        s.commit(name, &key, labels(&[("l", "1")])).unwrap();
    }

    #[test]
    fn lifecycle_and_the_errors_containerd_expects() {
        let (_t, s) = store();
        committed(&s, "ns/1/base", "a");
        let r = s.stat("ns/1/base").unwrap();
        assert_eq!(
            (r.kind, r.labels.clone()),
            (Kind::Committed, labels(&[("l", "1")]))
        );
        assert_eq!(r.usage.unwrap().inodes, 2);
        assert!(matches!(
            s.stat("ns/1/base-active"),
            Err(CtrError::NotFound(_))
        ));
        assert!(matches!(
            s.mounts("ns/1/base"),
            Err(CtrError::FailedPrecondition { .. })
        ));
        // A second Prepare of a name, a Prepare on a missing or an active
        // parent, a commit of a view, a commit onto a taken name.
        s.create("ns/2/a", "", BTreeMap::new(), false).unwrap();
        assert!(matches!(
            s.create("ns/2/a", "", BTreeMap::new(), false),
            Err(CtrError::AlreadyExists(_))
        ));
        assert!(matches!(
            s.create("ns/3/x", "ns/9/none", BTreeMap::new(), false),
            Err(CtrError::NotFound(_))
        ));
        assert!(matches!(
            s.create("ns/3/x", "ns/2/a", BTreeMap::new(), false),
            Err(CtrError::InvalidArgument(_))
        ));
        let v = s
            .create("ns/4/v", "ns/1/base", BTreeMap::new(), true)
            .unwrap();
        assert_eq!(v[0].source, s.snap_dir(&hash_name("ns/1/base")).join("fs"));
        assert!(v[0].options.contains(&"ro".to_string()));
        assert!(matches!(
            s.commit("ns/5/c", "ns/4/v", BTreeMap::new()),
            Err(CtrError::FailedPrecondition { .. })
        ));
        assert!(matches!(
            s.commit("ns/1/base", "ns/2/a", BTreeMap::new()),
            Err(CtrError::AlreadyExists(_))
        ));
        // A parent stays while it has children.
        assert!(matches!(
            s.remove("ns/1/base"),
            Err(CtrError::FailedPrecondition { .. })
        ));
        s.remove("ns/4/v").unwrap();
        s.remove("ns/1/base").unwrap();
        assert!(matches!(s.remove("ns/1/base"), Err(CtrError::NotFound(_))));
        let names: Vec<String> = s.list().unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(names, vec!["ns/2/a".to_string()]);
        // Hostile sizes.
        let big = "k".repeat(MAX_LABEL);
        assert!(matches!(
            s.create("ns/6/l", "", labels(&[(&big, "v")]), false),
            Err(CtrError::InvalidArgument(_))
        ));
        assert!(matches!(
            s.create(&"n".repeat(MAX_NAME + 1), "", BTreeMap::new(), false),
            Err(CtrError::InvalidArgument(_))
        ));
        assert!(matches!(s.stat(""), Err(CtrError::InvalidArgument(_))));
    }

    #[test]
    fn update_changes_labels_as_the_mask_says() {
        let (_t, s) = store();
        s.create("k", "", labels(&[("a", "1"), ("b", "2")]), false)
            .unwrap();
        let r = s
            .update(
                "k",
                labels(&[("a", "9"), ("c", "3")]),
                LabelUpdate::Keys(vec!["a".into(), "b".into()]),
            )
            .unwrap();
        assert_eq!(r.labels, labels(&[("a", "9")]));
        let r = s
            .update("k", labels(&[("z", "0")]), LabelUpdate::All)
            .unwrap();
        assert_eq!(r.labels, labels(&[("z", "0")]));
        assert_eq!(s.stat("k").unwrap().labels, labels(&[("z", "0")]));
        assert!(r.updated_ns >= r.created_ns);
    }

    /// A commit stopped after its intent was written is undone; one
    /// stopped after the rename is finished: by the next reader, or by
    /// the next open.
    #[test]
    fn an_interrupted_commit_is_undone_or_finished() {
        let (t, s) = store();
        s.create("act", "", BTreeMap::new(), false).unwrap();
        let target = Record {
            name: "done".into(),
            kind: Kind::Committed,
            ..s.stat("act").unwrap()
        };
        let d = s.snap_dir(&hash_name("act"));
        write_synced(&d.join("commit.json"), &record_json(&target).unwrap()).unwrap();
        // Before the rename: still the active snapshot.
        assert_eq!(s.stat("act").unwrap().kind, Kind::Active);
        assert!(!d.join("commit.json").exists());
        // After the rename.
        write_synced(&d.join("commit.json"), &record_json(&target).unwrap()).unwrap();
        fs::rename(&d, s.snap_dir(&hash_name("done"))).unwrap();
        drop(s);
        let s = open(t.path());
        assert_eq!(s.stat("done").unwrap().kind, Kind::Committed);
        assert!(matches!(s.stat("act"), Err(CtrError::NotFound(_))));
    }

    /// Two stores on one root (two processes, as far as the files are
    /// concerned) racing for the same names: each name is made once.
    #[test]
    fn two_stores_on_one_root_make_each_snapshot_once() {
        let t = tempfile::tempdir().unwrap();
        let stores: Vec<_> = (0..2).map(|_| Arc::new(open(t.path()))).collect();
        let results: Vec<Vec<bool>> = stores
            .iter()
            .map(|s| {
                let s = s.clone();
                std::thread::spawn(move || {
                    (0..40)
                        .map(|i| {
                            let key = format!("k{i}");
                            let made = s.create(&key, "", BTreeMap::new(), false);
                            match made {
                                Ok(_) => true,
                                Err(CtrError::AlreadyExists(_)) => false,
                                Err(e) => panic!("{key}: {e}"),
                            }
                        })
                        .collect()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        for (i, (a, b)) in results[0].iter().zip(&results[1]).enumerate() {
            assert!(a ^ b, "k{i} made once");
        }
        assert_eq!(stores[0].list().unwrap().len(), 40);
        assert_eq!(
            fs::read_dir(t.path().join("containerd/tmp"))
                .unwrap()
                .count(),
            0
        );
    }

    /// Cleanup releases a fast-path hold no snapshot uses once it is old,
    /// and keeps the young ones and the used ones.
    #[test]
    fn cleanup_releases_only_stale_unused_holds() {
        let (t, s) = store();
        let chain: Digest =
            "sha256:0cd1e14e771ce6425a7a5227ebf59dba76fbb9c417a3176bfde96b64001f803a"
                .parse()
                .unwrap();
        s.create("used", "", BTreeMap::new(), false).unwrap();
        // An adoption of this process (its pull may run past the hour), and
        // one of a process that is gone.
        let live = format!("containerd-adopt-{}-7", std::process::id());
        let dead = "containerd-adopt-2147483646-7".to_string();
        let holds = [
            holder("used"),
            holder("unused-old"),
            holder("unused-young"),
            live.clone(),
            dead.clone(),
        ];
        for h in &holds {
            s.root.hold_snapshot(h, &chain).unwrap();
        }
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        for h in [&holds[0], &holds[1], &live, &dead] {
            let p = t.path().join("snapshots/holds").join(h);
            fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        s.cleanup().unwrap();
        let held: Vec<String> = s
            .root
            .snapshots()
            .list_holds()
            .unwrap()
            .into_iter()
            .map(|h| h.0)
            .collect();
        let mut want = vec![holder("used"), holder("unused-young"), live];
        want.sort();
        assert_eq!(held, want);
    }

    /// An active snapshot with a parent is an overlay unlade mounts
    /// itself; containerd gets a bind of it, and Commit (which containerd
    /// lets a client call before it unmounts) commits what was written
    /// through it, unmounting unlade's own mount and leaving the overlay's
    /// work directory to the bind still mounted. A view of more than one
    /// layer is a read-only overlay unlade mounts too.
    #[test]
    fn active_snapshots_with_parents_are_mounted_overlays() {
        let (t, s) = store();
        committed(&s, "base", "lower");
        let m = s.create("top", "base", BTreeMap::new(), false).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].kind, "bind");
        let ovl = m[0].source.clone();
        assert!(mount::is_mount_point(&ovl).unwrap());
        assert_eq!(fs::read(ovl.join("lower")).unwrap(), b"lower");
        // Through the overlay: a hard link to a lower file, a whiteout.
        fs::hard_link(ovl.join("lower"), ovl.join("linked")).unwrap();
        fs::write(ovl.join("new"), b"new").unwrap();
        fs::remove_file(ovl.join("lower")).unwrap();
        // A bind of it, as containerd mounts it.
        let bind = t.path().join("bind");
        fs::create_dir(&bind).unwrap();
        rustix::mount::mount_bind(&ovl, &bind).unwrap();
        s.commit("top-c", "top", BTreeMap::new()).unwrap();
        assert!(!mount::is_mount_point(&ovl).unwrap());
        assert!(s.snap_dir(&hash_name("top-c")).join("work").exists());
        assert_eq!(fs::read(bind.join("new")).unwrap(), b"new");
        mount::unmount(&bind, false).unwrap();
        let fsd = s.snap_dir(&hash_name("top-c")).join("fs");
        assert_eq!(fs::read(fsd.join("new")).unwrap(), b"new");
        assert_eq!(fs::read(fsd.join("linked")).unwrap(), b"lower");
        let wh = fs::symlink_metadata(fsd.join("lower")).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(
            wh.file_type().is_char_device() && wh.rdev() == 0,
            "a whiteout"
        );
        // A view of both: a read-only overlay, mounted by unlade.
        let v = s.create("v", "top-c", BTreeMap::new(), true).unwrap();
        assert_eq!(v[0].kind, "bind");
        assert_eq!(v[0].options[0], "ro");
        assert!(mount::is_mount_point(&v[0].source).unwrap());
        assert_eq!(fs::read(v[0].source.join("linked")).unwrap(), b"lower");
        assert!(!v[0].source.join("lower").exists());
        assert!(fs::write(v[0].source.join("x"), b"x").is_err());
        s.remove("v").unwrap();
        assert!(!mount::is_mount_point(&v[0].source).unwrap());
        // Removing a mounted active snapshot unmounts it.
        let m = s.create("top2", "top-c", BTreeMap::new(), false).unwrap();
        s.remove("top2").unwrap();
        assert!(!m[0].source.exists());
    }

    /// Labels that pass the per-label checks but would make a record
    /// larger than is read back are refused on Prepare, Update and
    /// Commit; the store lists and removes as before.
    #[test]
    fn oversized_records_are_refused_when_written() {
        let (_t, s) = store();
        committed(&s, "base", "a");
        // 256 labels of 4,096 control characters: 1 MiB of labels, 6 MB
        // of JSON.
        let big: BTreeMap<String, String> = (0..MAX_LABELS)
            .map(|i| {
                let k = format!("k{i:03}");
                let v = "\u{1}".repeat(MAX_LABEL - k.len());
                (k, v)
            })
            .collect();
        fn too_big<T>(r: Result<T, CtrError>) -> bool {
            matches!(r, Err(CtrError::InvalidArgument(m)) if m.contains("record of"))
        }
        assert!(too_big(s.create("p", "base", big.clone(), false)));
        assert!(too_big(s.create("v", "base", big.clone(), true)));
        s.create("act", "base", BTreeMap::new(), false).unwrap();
        assert!(too_big(s.update("act", big.clone(), LabelUpdate::All)));
        assert!(too_big(s.commit("c", "act", big.clone())));
        // Nothing half-made: the refused commit left the active snapshot.
        assert_eq!(s.stat("act").unwrap().kind, Kind::Active);
        let mut names: Vec<String> = s.list().unwrap().into_iter().map(|r| r.name).collect();
        names.sort();
        assert_eq!(names, ["act", "base"]);
        assert_eq!(fs::read_dir(s.dir.join("tmp")).unwrap().count(), 0);
        s.remove("act").unwrap();
        s.remove("base").unwrap();
        // Records are compact JSON: what a label's bytes cost is their
        // escaping only.
        s.create("n", "", labels(&[("a", "b")]), false).unwrap();
        let raw = fs::read(s.snap_dir(&hash_name("n")).join("info.json")).unwrap();
        assert!(!raw.contains(&b'\n'));
    }

    /// A record that does not parse (written by hand, cut short, or by an
    /// older unlade) is left out of List instead of failing it, does not
    /// stop Remove of the others, and is removed itself by its name.
    #[test]
    fn an_unreadable_record_blocks_nothing_and_is_removable() {
        let (t, s) = store();
        committed(&s, "base", "a");
        s.create("bad", "base", BTreeMap::new(), true).unwrap();
        s.create("good", "base", BTreeMap::new(), true).unwrap();
        let d = s.snap_dir(&hash_name("bad"));
        fs::write(d.join("info.json"), b"{\"name\": \"bad\", trunc").unwrap();
        // A huge one too (over the read bound).
        s.create("huge", "", BTreeMap::new(), false).unwrap();
        let h = s.snap_dir(&hash_name("huge"));
        fs::write(h.join("info.json"), vec![b' '; (MAX_RECORD + 10) as usize]).unwrap();
        let mut names: Vec<String> = s.list().unwrap().into_iter().map(|r| r.name).collect();
        names.sort();
        assert_eq!(names, ["base", "good"]);
        assert!(matches!(s.stat("bad"), Err(CtrError::Record { .. })));
        s.remove("good").unwrap();
        // Its parent stays while the unreadable child is there.
        assert!(matches!(
            s.remove("base"),
            Err(CtrError::FailedPrecondition { .. })
        ));
        s.remove("bad").unwrap();
        s.remove("huge").unwrap();
        s.remove("base").unwrap();
        assert!(s.list().unwrap().is_empty());
        // One whose record is gone altogether: the name stays removable
        // (its directory would block a new snapshot of that name).
        s.create("lost", "", BTreeMap::new(), false).unwrap();
        fs::remove_file(s.snap_dir(&hash_name("lost")).join("info.json")).unwrap();
        assert!(s.list().unwrap().is_empty());
        s.remove("lost").unwrap();
        s.create("lost", "", BTreeMap::new(), false).unwrap();
        s.remove("lost").unwrap();
        assert!(matches!(s.remove("lost"), Err(CtrError::NotFound(_))));
        // A commit intent cut short is undone, not an error forever.
        s.create("act", "", BTreeMap::new(), false).unwrap();
        let a = s.snap_dir(&hash_name("act"));
        fs::write(a.join("commit.json"), b"{\"na").unwrap();
        drop(s);
        let s = open(t.path());
        assert_eq!(s.stat("act").unwrap().kind, Kind::Active);
        assert!(!a.join("commit.json").exists());
    }

    /// Remove finds children by their markers, without reading every
    /// record: a parent with a child (active, view, committed) stays;
    /// markers lost (a store from before them, a crash) are made again by
    /// the next open; a marker whose child is gone is dropped.
    #[test]
    fn remove_finds_children_by_their_markers() {
        let (t, s) = store();
        committed(&s, "base", "a");
        let hb = hash_name("base");
        s.create("act", "base", BTreeMap::new(), false).unwrap();
        assert!(
            matches!(s.remove("base"), Err(CtrError::FailedPrecondition { why, .. }) if why.contains("\"act\""))
        );
        s.commit("mid", "act", BTreeMap::new()).unwrap();
        // The marker moved with the commit.
        let markers = || -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(s.children_dir(&hb))
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            v
        };
        assert_eq!(markers(), vec![hash_name("mid")]);
        assert!(
            matches!(s.remove("base"), Err(CtrError::FailedPrecondition { why, .. }) if why.contains("\"mid\""))
        );
        s.create("view", "mid", BTreeMap::new(), true).unwrap();
        assert!(matches!(
            s.remove("mid"),
            Err(CtrError::FailedPrecondition { .. })
        ));
        // Markers lost: the next open makes them again.
        fs::remove_dir_all(s.children_dir(&hb)).unwrap();
        fs::remove_dir_all(s.children_dir(&hash_name("mid"))).unwrap();
        drop(s);
        let s = open(t.path());
        assert!(matches!(
            s.remove("base"),
            Err(CtrError::FailedPrecondition { .. })
        ));
        assert!(matches!(
            s.remove("mid"),
            Err(CtrError::FailedPrecondition { .. })
        ));
        // A marker without its child (a crash between marker and rename).
        fs::write(s.children_dir(&hb).join("0".repeat(32)), b"").unwrap();
        s.remove("view").unwrap();
        s.remove("mid").unwrap();
        s.remove("base").unwrap();
        assert!(s.list().unwrap().is_empty());
        // A child is never made on a parent removed meanwhile: the parent
        // is checked under the lock where the child is published.
        committed(&s, "p2", "x");
        s.remove("p2").unwrap();
        assert!(matches!(
            s.create("orphan", "p2", BTreeMap::new(), false),
            Err(CtrError::NotFound(_))
        ));
    }

    /// Every directory of the store is private, and a snapshot's tree
    /// root is 0755 (set explicitly: the integration test
    /// `an_unprivileged_user_reaches_nothing` runs a server under umask
    /// 000; the umask is process-wide, not for a unit test to change).
    #[test]
    fn store_directories_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
        let root = t.path().join("new/root");
        let s = open(&root);
        committed(&s, "base", "a");
        let m = s.create("top", "base", BTreeMap::new(), false).unwrap();
        for p in [
            t.path().join("new"),
            root.clone(),
            root.join("snapshots"),
            root.join("snapshots/committed"),
            root.join("content"),
            root.join("content/blobs"),
            root.join("images"),
            root.join("locks"),
            s.dir.clone(),
            s.dir.join("snapshots"),
            s.dir.join("tmp"),
            s.dir.join("trash"),
            s.dir.join("mnt"),
            s.snap_dir(&hash_name("base")),
            s.snap_dir(&hash_name("top")),
            s.snap_dir(&hash_name("top")).join("work"),
            s.children_dir(&hash_name("base")),
        ] {
            assert_eq!(mode(&p), 0o700, "{}", p.display());
        }
        assert_eq!(mode(&s.snap_dir(&hash_name("base")).join("fs")), 0o755);
        assert!(m[0].source.starts_with(s.dir.join("mnt")));
        // Unmounted, not left in the host's mount table.
        s.remove("top").unwrap();
        // An older root is made private on open; a directory holding
        // other things (`--root ~`) keeps its mode, its stores do not.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(root.join("content"), fs::Permissions::from_mode(0o755)).unwrap();
        drop(s);
        let s = open(&root);
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("content")), 0o700);
        let shared = t.path().join("home");
        fs::create_dir(&shared).unwrap();
        fs::write(shared.join("notes.txt"), b"mine").unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o755)).unwrap();
        drop(s);
        let s = open(&shared);
        assert_eq!(mode(&shared), 0o755);
        assert_eq!(mode(&shared.join("snapshots")), 0o700);
        drop(s);
    }
}
