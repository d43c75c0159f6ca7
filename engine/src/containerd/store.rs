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
use crate::containerd::{fast, mount};
use crate::oci::digest::Digest;
use crate::pipeline::error::RootError;
use crate::pipeline::pull::PullOptions;
use crate::root::Root;
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
}

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
    fast: Option<PullOptions>,
}

impl std::fmt::Debug for CtrStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CtrStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
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

fn to_json(r: &Record) -> Vec<u8> {
    // A record of strings and numbers always serializes.
    serde_json::to_vec_pretty(r).unwrap_or_default()
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
    /// directories, trash. With `fast` (how to reach registries), a
    /// Prepare that carries CRI's labels makes unlade pull the image
    /// itself (see [`CtrStore::create`]).
    pub fn open(root: Arc<Root>, fast: Option<PullOptions>) -> Result<CtrStore, CtrError> {
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
            fast,
        };
        let _lock = s.lock()?;
        for ent in s.entries()? {
            s.settle(&ent)?;
        }
        s.sweep()?;
        Ok(s)
    }

    /// The directory: `ROOT/containerd`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> Result<FileLock, CtrError> {
        FileLock::acquire(&self.dirfd, "lock", &Cancel::new()).map_err(|e| CtrError::Io {
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
    fn fs_of(&self, rec: &Record) -> PathBuf {
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
    /// directory `h`. Holders of the lock only.
    fn settle(&self, h: &str) -> Result<(), CtrError> {
        let d = self.snap_dir(h);
        let pending = d.join("commit.json");
        let Some(rec) = read_record(&pending)? else {
            return Ok(());
        };
        if hash_name(&rec.name) == h {
            fs::rename(&pending, d.join("info.json")).map_err(io_err("finish commit", &pending))
        } else {
            fs::remove_file(&pending).map_err(io_err("undo commit", &pending))
        }
    }

    /// The record in directory `h`, if it holds a whole snapshot; `held`
    /// says whether the caller holds the lock (a pending commit is settled
    /// under it).
    fn load_dir(&self, h: &str, held: bool) -> Result<Option<Record>, CtrError> {
        let d = self.snap_dir(h);
        if d.join("commit.json").exists() {
            if held {
                self.settle(h)?;
            } else {
                let _lock = self.lock()?;
                self.settle(h)?;
            }
        }
        read_record(&d.join("info.json"))
    }

    /// The record of snapshot `name`.
    pub fn stat(&self, name: &str) -> Result<Record, CtrError> {
        self.get(name, false)
    }

    fn get(&self, name: &str, held: bool) -> Result<Record, CtrError> {
        check_name("key", name)?;
        match self.load_dir(&hash_name(name), held)? {
            Some(r) if r.name == name => Ok(r),
            _ => Err(CtrError::NotFound(name.to_string())),
        }
    }

    /// Every snapshot, in no particular order.
    pub fn list(&self) -> Result<Vec<Record>, CtrError> {
        self.list_inner(false)
    }

    fn list_inner(&self, held: bool) -> Result<Vec<Record>, CtrError> {
        let mut out = Vec::new();
        for h in self.entries()? {
            if let Some(r) = self.load_dir(&h, held)? {
                if hash_name(&r.name) == h {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }

    /// The `fs/` directories of `parent` and its ancestors, nearest first:
    /// an overlay's `lowerdir` list.
    fn lowers(&self, parent: &str) -> Result<Vec<PathBuf>, CtrError> {
        let mut out = Vec::new();
        let mut next = parent.to_string();
        while !next.is_empty() {
            if out.len() >= MAX_DEPTH {
                return Err(CtrError::FailedPrecondition {
                    name: parent.to_string(),
                    why: format!("more than {MAX_DEPTH} ancestors"),
                });
            }
            let r = self.get(&next, true)?;
            out.push(self.fs_of(&r));
            next = r.parent;
        }
        Ok(out)
    }

    /// Prepare (`view` false) or View (`view` true): a new snapshot
    /// `key` on top of committed snapshot `parent` (empty for none), and
    /// the mounts that show it.
    pub fn create(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        view: bool,
    ) -> Result<Vec<Mount>, CtrError> {
        check_name("key", key)?;
        check_labels(&labels)?;
        if !view {
            if let Some(opts) = &self.fast {
                if let Some(ask) = fast::Ask::of(&labels) {
                    if let Some(made) = self.adopt(parent, &labels, &ask, opts)? {
                        return Err(made);
                    }
                }
            }
        }
        let _lock = self.lock()?;
        if !parent.is_empty() {
            let p = self.get(parent, true)?;
            if p.kind != Kind::Committed {
                return Err(CtrError::InvalidArgument(format!(
                    "parent {parent:?} is {}, not committed",
                    p.kind.as_str()
                )));
            }
        }
        let h = hash_name(key);
        if let Some(r) = self.load_dir(&h, true)? {
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
        };
        self.publish(&rec, if view { &["fs"] } else { &["fs", "work"] })?;
        match self.mounts_locked(&rec) {
            Ok(m) => Ok(m),
            Err(e) => {
                // Not usable, so not made.
                let _ = self.remove_locked(&rec);
                Err(e)
            }
        }
    }

    /// The fast path (see [`fast`]): makes committed snapshot `ask.target`
    /// on `parent` from unlade's own committed snapshot of that chain,
    /// pulling the image first when unlade has not got it, and returns the
    /// `AlreadyExists` to answer containerd with — or `None` when the name
    /// is taken by a snapshot of another parent or kind, which leaves the
    /// Prepare to containerd's own unpack.
    fn adopt(
        &self,
        parent: &str,
        labels: &BTreeMap<String, String>,
        ask: &fast::Ask,
        opts: &PullOptions,
    ) -> Result<Option<CtrError>, CtrError> {
        let target = ask.target.as_str();
        let made = || Some(CtrError::AlreadyExists(target.to_string()));
        // Made before, by this server or another, for this namespace or
        // another: `None` if the name is taken otherwise.
        let existing = |s: &CtrStore| -> Result<Option<Option<CtrError>>, CtrError> {
            match s.get(target, true) {
                Ok(r) if r.kind == Kind::Committed && r.parent == parent => Ok(Some(made())),
                Ok(_) => Ok(Some(None)),
                Err(CtrError::NotFound(_)) => Ok(None),
                Err(e) => Err(e),
            }
        };
        {
            let _lock = self.lock()?;
            if let Some(answer) = existing(self)? {
                return Ok(answer);
            }
            if !parent.is_empty() && self.get(parent, true)?.kind != Kind::Committed {
                return Err(CtrError::InvalidArgument(format!(
                    "parent {parent:?} is not committed"
                )));
            }
        }
        let root_err = |op: &'static str, name: String| {
            move |e: RootError| CtrError::Root {
                op,
                name,
                source: Box::new(e),
            }
        };
        // Held before it exists, so that the pull's commit is never
        // between unlade's record and this one.
        self.root
            .hold_snapshot(&holder(target), &ask.chain)
            .map_err(root_err("hold", target.to_string()))?;
        let result = self.pull_for(ask, opts).and_then(|()| {
            let now = now_ns();
            let mut rec = Record {
                name: target.to_string(),
                parent: parent.to_string(),
                kind: Kind::Committed,
                created_ns: now,
                updated_ns: now,
                labels: labels.clone(),
                usage: None,
                chain: Some(ask.chain.to_string()),
            };
            rec.usage = Some(tree_usage(&self.fs_of(&rec))?);
            let _lock = self.lock()?;
            if let Some(answer) = existing(self)? {
                return Ok(answer);
            }
            self.publish(&rec, &[])?;
            Ok(made())
        });
        // Not made here: the hold goes, unless it is another snapshot's of
        // the same name (one made by the fast path holds under it).
        let held_by_other = |s: &CtrStore| s.stat(target).is_ok_and(|r| r.chain.is_some());
        if !matches!(result, Ok(Some(_))) && !held_by_other(self) {
            let _ = self.root.release_snapshot(&holder(target));
        }
        result
    }

    /// Makes sure unlade has committed snapshot `ask.chain`: pulls
    /// `ask.reference` if not (shared with every other pull of it in
    /// flight), recorded under a private name that is dropped once every
    /// layer's chain is held for the Prepares containerd sends next.
    fn pull_for(&self, ask: &fast::Ask, opts: &PullOptions) -> Result<(), CtrError> {
        if self.root.snapshots().stat(&ask.chain).is_ok() {
            return Ok(());
        }
        let record = format!("containerd-pull:{}", private_name());
        let opts = PullOptions {
            record_as: Some(record.clone()),
            ..opts.clone()
        };
        let t = std::time::Instant::now();
        let pulled = self
            .root
            .pull(&ask.reference, &opts, None, &Cancel::new())
            .map_err(|e| CtrError::Root {
                op: "pull",
                name: ask.reference.to_string(),
                source: Box::new(e),
            })?;
        for c in &pulled.unpacked.chain_ids {
            let _ = self.root.hold_snapshot(&holder(&c.to_string()), c);
        }
        let _ = self.root.remove_image(&record);
        let count = |r: crate::pipeline::flight::Role| {
            pulled.unpacked.roles.iter().filter(|x| x.1 == r).count()
        };
        eprintln!(
            "unlade: pulled {} for containerd: {} layers, {} present, {} applied here, \
             {} by another; {} bytes fetched; {:.2} s",
            ask.reference,
            pulled.unpacked.chain_ids.len(),
            pulled.unpacked.already,
            count(crate::pipeline::flight::Role::Led)
                + count(crate::pipeline::flight::Role::TookOver),
            count(crate::pipeline::flight::Role::Waited),
            pulled.bytes_fetched,
            t.elapsed().as_secs_f64()
        );
        if pulled.unpacked.chain_ids.contains(&ask.chain) {
            Ok(())
        } else {
            Err(CtrError::InvalidArgument(format!(
                "image {} has no layer of chain {}",
                ask.reference, ask.target
            )))
        }
    }

    /// Makes snapshot `rec` whole in `tmp/` — its record and the empty
    /// directories `dirs` (`fs`, `work`; none for a snapshot whose tree is
    /// unlade's) — and renames it into place, `AlreadyExists` if the name
    /// is taken. Holders of the lock only.
    fn publish(&self, rec: &Record, dirs: &[&str]) -> Result<(), CtrError> {
        let h = hash_name(&rec.name);
        let name = private_name();
        let tmp = self.dir.join("tmp").join(&name);
        let made = (|| {
            fs::create_dir(&tmp).map_err(io_err("create", &tmp))?;
            for d in dirs {
                let p = tmp.join(d);
                fs::create_dir(&p).map_err(io_err("create", &p))?;
                fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                    .map_err(io_err("chmod", &p))?;
            }
            write_synced(&tmp.join("info.json"), &to_json(rec))?;
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
        }
        made
    }

    /// The mounts that show snapshot `key` (Mounts).
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, CtrError> {
        let _lock = self.lock()?;
        let rec = self.get(key, true)?;
        self.mounts_locked(&rec)
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
    /// - a view of more: a read-only overlay of their trees;
    /// - a committed snapshot: none (FailedPrecondition), as in containerd.
    fn mounts_locked(&self, rec: &Record) -> Result<Vec<Mount>, CtrError> {
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
                let lowers = self.lowers(&rec.parent)?;
                let target = self.mnt_dir(&h);
                fs::create_dir_all(&target).map_err(io_err("create", &target))?;
                if !mount::is_mount_point(&target).map_err(io_err("stat", &target))? {
                    mount::overlay(&target, &lowers, &d.join("fs"), &d.join("work"))
                        .map_err(io_err("mount overlay", &target))?;
                }
                Ok(vec![bind(target, true)])
            }
            Kind::View => {
                let lowers = self.lowers(&rec.parent)?;
                match lowers.len() {
                    0 => Ok(vec![bind(d.join("fs"), false)]),
                    1 => Ok(vec![bind(lowers[0].clone(), false)]),
                    _ => Ok(vec![Mount {
                        kind: "overlay",
                        source: "overlay".into(),
                        options: vec![
                            "ro".into(),
                            format!("lowerdir={}", mount::join_lowers(&lowers)),
                        ],
                        cwd: None,
                    }]),
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
        let _lock = self.lock()?;
        let rec = self.get(key, true)?;
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
        if self.load_dir(&hn, true)?.is_some() {
            return Err(CtrError::AlreadyExists(name.to_string()));
        }
        let target = self.mnt_dir(&hk);
        if mount::is_mount_point(&target).map_err(io_err("stat", &target))? {
            // Mounted elsewhere too (the mounts containerd was given are
            // binds of this one): it could change after the commit.
            let others = mount::other_mounts(&target).map_err(io_err("list mounts of", &target))?;
            if let Some(o) = others.first() {
                return Err(CtrError::FailedPrecondition {
                    name: key.to_string(),
                    why: format!("still mounted at {o}"),
                });
            }
            mount::unmount(&target, false).map_err(|e| {
                if e.raw_os_error() == Some(libc::EBUSY) {
                    CtrError::FailedPrecondition {
                        name: key.to_string(),
                        why: format!("still in use where it is mounted ({})", target.display()),
                    }
                } else {
                    io_err("unmount", &target)(e)
                }
            })?;
        }
        let _ = fs::remove_dir(&target);
        let d = self.snap_dir(&hk);
        let work = d.join("work");
        if work.exists() {
            fs::remove_dir_all(&work).map_err(io_err("remove", &work))?;
        }
        let usage = tree_usage(&d.join("fs"))?;
        let committed = Record {
            name: name.to_string(),
            parent: rec.parent.clone(),
            kind: Kind::Committed,
            created_ns: now_ns(),
            updated_ns: now_ns(),
            labels,
            usage: Some(usage),
            chain: None,
        };
        write_synced(&d.join("commit.json"), &to_json(&committed))?;
        match rfs::renameat_with(
            &self.snaps,
            hk.as_str(),
            &self.snaps,
            hn.as_str(),
            RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {}
            Err(e) => {
                let _ = fs::remove_file(d.join("commit.json"));
                return Err(if e == Errno::EXIST {
                    CtrError::AlreadyExists(name.to_string())
                } else {
                    io_err("rename", &d)(e.into())
                });
            }
        }
        self.settle(&hn)
    }

    /// Removes snapshot `key`; a snapshot that is another's parent stays.
    pub fn remove(&self, key: &str) -> Result<(), CtrError> {
        let trash = {
            let _lock = self.lock()?;
            let rec = self.get(key, true)?;
            if let Some(child) = self.list_inner(true)?.into_iter().find(|r| r.parent == key) {
                return Err(CtrError::FailedPrecondition {
                    name: key.to_string(),
                    why: format!("it is the parent of {:?}", child.name),
                });
            }
            let trash = self.remove_locked(&rec)?;
            if rec.chain.is_some() {
                // unlade's snapshot is free for its gc once nothing else
                // holds it.
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

    /// Unmounts `rec` and moves its directory into the trash; returns
    /// where it went, for the caller to delete outside the lock.
    fn remove_locked(&self, rec: &Record) -> Result<PathBuf, CtrError> {
        let h = hash_name(&rec.name);
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
        let _lock = self.lock()?;
        let mut rec = self.get(name, true)?;
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
        let d = self.snap_dir(&hash_name(name));
        let tmp = d.join(format!("info.json.{}", private_name()));
        write_synced(&tmp, &to_json(&rec))?;
        fs::rename(&tmp, d.join("info.json")).map_err(io_err("rename", &tmp))?;
        Ok(rec)
    }

    /// Usage of snapshot `key`'s own tree: measured now for active
    /// snapshots and views, as measured at commit for committed ones.
    pub fn usage(&self, key: &str) -> Result<Usage, CtrError> {
        let rec = self.stat(key)?;
        match rec.usage {
            Some(u) if rec.kind == Kind::Committed => Ok(u),
            _ => tree_usage(&self.snap_dir(&hash_name(key)).join("fs")),
        }
    }

    /// Cleanup: deletes the trash, staging directories and mount points
    /// of snapshots that are gone, and releases the fast path's holds that
    /// no snapshot uses (after an hour).
    pub fn cleanup(&self) -> Result<(), CtrError> {
        let _lock = self.lock()?;
        self.sweep()
    }

    fn sweep(&self) -> Result<(), CtrError> {
        for sub in ["tmp", "trash"] {
            let p = self.dir.join(sub);
            for ent in fs::read_dir(&p).map_err(io_err("list", &p))?.flatten() {
                // Another process may be deleting the same trash entry.
                let _ = fs::remove_dir_all(ent.path());
            }
        }
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
            let stale = snaps.hold_age(&holder).is_some_and(|a| a > STALE_HOLD);
            if stale && !self.snap_dir(h).exists() {
                let _ = self.root.release_snapshot(&holder);
            }
        }
        Ok(())
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
        CtrStore::open(Arc::new(root), None).unwrap()
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
        write_synced(&d.join("commit.json"), &to_json(&target)).unwrap();
        // Before the rename: still the active snapshot.
        assert_eq!(s.stat("act").unwrap().kind, Kind::Active);
        assert!(!d.join("commit.json").exists());
        // After the rename.
        write_synced(&d.join("commit.json"), &to_json(&target)).unwrap();
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
        for name in ["used", "unused-old", "unused-young"] {
            s.root.hold_snapshot(&holder(name), &chain).unwrap();
        }
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        for name in ["used", "unused-old"] {
            let p = t.path().join("snapshots/holds").join(holder(name));
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
        let mut want = vec![holder("used"), holder("unused-young")];
        want.sort();
        assert_eq!(held, want);
    }

    /// An active snapshot with a parent is an overlay unlade mounts
    /// itself; containerd gets a bind of it, and Commit refuses while
    /// that bind is still mounted, then unmounts and commits what was
    /// written through it.
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
        assert!(matches!(
            s.commit("top-c", "top", BTreeMap::new()),
            Err(CtrError::FailedPrecondition { .. })
        ));
        mount::unmount(&bind, false).unwrap();
        s.commit("top-c", "top", BTreeMap::new()).unwrap();
        assert!(!mount::is_mount_point(&ovl).unwrap());
        let fsd = s.snap_dir(&hash_name("top-c")).join("fs");
        assert_eq!(fs::read(fsd.join("new")).unwrap(), b"new");
        assert_eq!(fs::read(fsd.join("linked")).unwrap(), b"lower");
        let wh = fs::symlink_metadata(fsd.join("lower")).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(
            wh.file_type().is_char_device() && wh.rdev() == 0,
            "a whiteout"
        );
        assert!(!s.snap_dir(&hash_name("top-c")).join("work").exists());
        // A view of both: a read-only overlay.
        let v = s.create("v", "top-c", BTreeMap::new(), true).unwrap();
        assert_eq!(v[0].kind, "overlay");
        assert!(v[0].options[1].starts_with(&format!("lowerdir={}:", fsd.display())));
        // Removing a mounted active snapshot unmounts it.
        let m = s.create("top2", "top-c", BTreeMap::new(), false).unwrap();
        s.remove("top2").unwrap();
        assert!(!m[0].source.exists());
    }
}
