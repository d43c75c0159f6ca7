//! The overlay snapshotter: active snapshots (private, being applied) and
//! committed snapshots (immutable, keyed by chain ID), all under
//! `ROOT/snapshots`.
//!
//! - `active/<id>/` holds `fs/` (the overlay upper directory a layer is
//!   applied into), `parent` (the parent chain ID, if any) and `lock`,
//!   which the owning process holds locked (`flock`) for the snapshot's
//!   whole life. [`Snapshotter::open`] removes active snapshots nobody holds:
//!   leftovers of a crash.
//! - `committed/<chain hex>/` is an active directory renamed into place
//!   with one `renameat2(RENAME_NOREPLACE)`: it exists whole or not at all,
//!   and when two producers race for one chain ID the loser's copy is
//!   discarded (same chain ID, same content).
//! - `rw/<key>/` are named writable snapshots (a container's rootfs,
//!   `unlade mounts --rw KEY`): `fs/` and `work/` for overlay, `parent`.
//!   They persist until removed and keep their parent chain from GC.
//! - Removal renames a committed snapshot into `trash/` first, so a
//!   half-removed snapshot never keeps its name.
//!
//! As with the content store, the directory names are the database.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, FlockOperation, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use crate::digest::Digest;

/// Why a snapshotter operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The chain ID names no committed snapshot.
    #[error("snapshot {0} not found")]
    NotFound(Digest),
    /// A committed snapshot is the parent of others and cannot go first.
    #[error("snapshot {0} is the parent of {1}: remove that first")]
    HasChildren(Digest, String),
    /// A commit whose parent is not committed (yet).
    #[error("snapshot {chain}: parent {parent} is not committed")]
    ParentMissing {
        /// What was being committed.
        chain: Digest,
        /// The missing parent.
        parent: Digest,
    },
    /// A writable snapshot key is malformed, taken or unknown.
    #[error("writable snapshot {key:?}: {detail}")]
    Key {
        /// The key.
        key: String,
        /// What is wrong.
        detail: &'static str,
    },
    /// A file-system operation failed.
    #[error("snapshots {path}: {op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Where.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> SnapshotError {
    SnapshotError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// An active snapshot without a lock file is a crash leftover only when it
/// is older than this: a live prepare creates the file right after the
/// directory.
const UNLOCKED_GRACE_SECS: u64 = 600;

/// A private snapshot being filled. Its `fs` directory is the overlay
/// upper directory to apply a layer into. Dropping it without
/// [`Snapshotter::commit`] leaves it to [`Snapshotter::remove_active`] or
/// to the next [`Snapshotter::open`] after the process ends.
#[derive(Debug)]
pub struct Active {
    dir: PathBuf,
    parent: Option<Digest>,
    _lock: OwnedFd,
}

impl Active {
    /// The snapshot's directory (`fs/`, `work/`, `parent`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The upper directory to write into.
    pub fn fs(&self) -> PathBuf {
        self.dir.join("fs")
    }

    /// The chain ID this snapshot stacks on.
    pub fn parent(&self) -> Option<Digest> {
        self.parent
    }
}

/// A committed snapshot as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// Its chain ID.
    pub chain_id: Digest,
    /// The chain ID below it.
    pub parent: Option<Digest>,
}

/// Overlay snapshots under one root.
#[derive(Debug)]
pub struct Snapshotter {
    dir: PathBuf,
    committed: OwnedFd,
    active: OwnedFd,
    rw: OwnedFd,
    trash: OwnedFd,
}

/// How to mount a snapshot: the arguments of mount(2) / mount(8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `overlay` or `bind`.
    pub kind: &'static str,
    /// The source (`overlay`, or the directory bound).
    pub source: PathBuf,
    /// Mount options (`ro`, `lowerdir=…`, `rbind`).
    pub options: Vec<String>,
}

impl Mount {
    /// The `mount` command line that mounts this at `target`, in the form
    /// `ctr snapshots mounts` prints: `mount -t TYPE SOURCE TARGET -o OPTS`.
    pub fn command_line(&self, target: &Path) -> String {
        format!(
            "mount -t {} {} {} -o {}",
            self.kind,
            shell_quote(&self.source.to_string_lossy()),
            shell_quote(&target.to_string_lossy()),
            shell_quote(&self.options.join(","))
        )
    }
}

/// Quotes a word for sh when it needs it.
fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:=,+@%".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A named writable snapshot as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RwInfo {
    /// Its key.
    pub key: String,
    /// The committed snapshot it stacks on.
    pub parent: Option<Digest>,
}

/// Whether `key` may name a writable snapshot: a plain file name.
fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 200
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@+".contains(&b))
}

fn open_dir(p: &Path) -> Result<OwnedFd, SnapshotError> {
    crate::statedir::open_dir(p).map_err(|e| io_err("open directory", p, e))
}

impl Snapshotter {
    /// Opens (creating) the snapshotter under `root/snapshots` and removes
    /// what crashed processes left: active snapshots nobody holds, trash.
    pub fn open(root: &Path) -> Result<Self, SnapshotError> {
        let dir = root.join("snapshots");
        let s = Snapshotter {
            committed: open_dir(&dir.join("committed"))?,
            active: open_dir(&dir.join("active"))?,
            rw: open_dir(&dir.join("rw"))?,
            trash: open_dir(&dir.join("trash"))?,
            dir,
        };
        s.clean()?;
        Ok(s)
    }

    fn clean(&self) -> Result<(), SnapshotError> {
        let active = self.dir.join("active");
        for ent in fs::read_dir(&active)
            .map_err(|e| io_err("list active", &active, e))?
            .flatten()
        {
            let p = ent.path();
            let lock = match File::open(p.join("lock")) {
                Ok(f) => f,
                // No lock file: a prepare that died before making it — or
                // one that is making it right now. Only an old one is a
                // leftover.
                Err(_) => {
                    let old = ent
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age.as_secs() >= UNLOCKED_GRACE_SECS);
                    if old {
                        self.discard(&p);
                    }
                    continue;
                }
            };
            // Holding the lock while the directory goes: a prepare that
            // opened this lock file just before waits, then sees that its
            // directory is gone and starts over (see `prepare_on`).
            if rfs::flock(&lock, FlockOperation::NonBlockingLockExclusive).is_ok() {
                self.discard(&p);
            }
        }
        let trash = self.dir.join("trash");
        for ent in fs::read_dir(&trash)
            .map_err(|e| io_err("list trash", &trash, e))?
            .flatten()
        {
            let _ = fs::remove_dir_all(ent.path());
        }
        Ok(())
    }

    /// Moves a directory into the trash and removes it there.
    fn discard(&self, p: &Path) {
        let name = crate::statedir::private_name();
        let to = self.dir.join("trash").join(name);
        if fs::rename(p, &to).is_ok() {
            let _ = fs::remove_dir_all(&to);
        } else {
            let _ = fs::remove_dir_all(p);
        }
    }

    /// The directory of committed snapshot `chain` (whether or not it
    /// exists).
    pub fn committed_dir(&self, chain: &Digest) -> PathBuf {
        self.dir.join("committed").join(chain.hex())
    }

    /// The parent of a committed snapshot, or `NotFound`.
    pub fn stat(&self, chain: &Digest) -> Result<Info, SnapshotError> {
        let p = self.committed_dir(chain);
        if rfs::statat(&self.committed, chain.hex(), rfs::AtFlags::SYMLINK_NOFOLLOW).is_err() {
            return Err(SnapshotError::NotFound(*chain));
        }
        Ok(Info {
            chain_id: *chain,
            parent: read_parent(&p)?,
        })
    }

    /// Starts a private snapshot on top of `parent` (which must be
    /// committed).
    pub fn prepare(&self, parent: Option<Digest>) -> Result<Active, SnapshotError> {
        if let Some(p) = parent {
            self.stat(&p)?;
        }
        self.prepare_on(parent)
    }

    /// Starts a private snapshot on top of `parent`, which may still be
    /// being applied: layers are applied in parallel, and [`Self::commit`]
    /// refuses until the parent is committed.
    pub fn prepare_on(&self, parent: Option<Digest>) -> Result<Active, SnapshotError> {
        // Another process opening the root cleans active snapshots whose
        // lock it can take; one it takes between our mkdir and our flock
        // is gone when we look again, and we start over with a new name.
        let mut tries = 0;
        let (dir, lock) = loop {
            tries += 1;
            let name = crate::statedir::private_name();
            let dir = self.dir.join("active").join(&name);
            fs::create_dir(&dir).map_err(|e| io_err("create active snapshot", &dir, e))?;
            let lock = match rfs::open(
                dir.join("lock"),
                OFlags::RDWR | OFlags::CREATE | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            ) {
                Ok(l) => l,
                Err(Errno::NOENT) if tries < 16 => continue,
                Err(e) => return Err(io_err("create lock", &dir, e.into())),
            };
            rfs::flock(&lock, FlockOperation::LockExclusive)
                .map_err(|e| io_err("lock", &dir, e.into()))?;
            let held = rfs::fstat(&lock).map_err(|e| io_err("lock", &dir, e.into()))?;
            match rfs::stat(dir.join("lock")) {
                Ok(st) if st.st_ino == held.st_ino && st.st_dev == held.st_dev => {
                    break (dir, lock)
                }
                _ if tries < 16 => continue,
                _ => {
                    return Err(io_err(
                        "lock",
                        &dir,
                        io::Error::other("removed by a concurrent clean-up, 16 times"),
                    ))
                }
            }
        };
        fs::create_dir(dir.join("fs")).map_err(|e| io_err("create upper", &dir, e))?;
        fs::create_dir(dir.join("work")).map_err(|e| io_err("create work", &dir, e))?;
        if let Some(p) = parent {
            fs::write(dir.join("parent"), p.to_string())
                .map_err(|e| io_err("write parent", &dir, e))?;
        }
        Ok(Active {
            dir,
            parent,
            _lock: lock,
        })
    }

    /// Publishes an active snapshot as committed snapshot `chain`, with one
    /// rename. Returns false if `chain` was committed already (by anyone):
    /// then this copy is discarded.
    pub fn commit(&self, active: Active, chain: &Digest) -> Result<bool, SnapshotError> {
        if let Some(parent) = active.parent {
            if self.stat(&parent).is_err() {
                self.discard(&active.dir);
                return Err(SnapshotError::ParentMissing {
                    chain: *chain,
                    parent,
                });
            }
        }
        let name = active
            .dir
            .file_name()
            .map(|n| n.to_os_string())
            .ok_or_else(|| io_err("commit", &active.dir, Errno::INVAL.into()))?;
        let name = CString::new(name.as_encoded_bytes())
            .map_err(|_| io_err("commit", &active.dir, Errno::INVAL.into()))?;
        match rfs::renameat_with(
            &self.active,
            name.as_c_str(),
            &self.committed,
            chain.hex(),
            RenameFlags::NOREPLACE,
        ) {
            Ok(()) => Ok(true),
            Err(Errno::EXIST | Errno::NOTEMPTY) => {
                self.discard(&active.dir);
                Ok(false)
            }
            Err(e) => Err(io_err("commit", &active.dir, e.into())),
        }
    }

    /// Makes everything written into `active` durable: one `syncfs` of
    /// the file system holding it (the baseline containerd offers).
    pub fn sync_active(&self, active: &Active) -> Result<(), SnapshotError> {
        let fd = open_dir(&active.fs())?;
        rfs::syncfs(&fd).map_err(|e| io_err("sync", &active.fs(), e.into()))
    }

    /// Makes a commit's rename durable: fsync of `committed/`.
    pub fn sync_commits(&self) -> Result<(), SnapshotError> {
        rfs::fsync(&self.committed)
            .map_err(|e| io_err("sync", &self.dir.join("committed"), e.into()))
    }

    /// Throws an active snapshot away.
    pub fn remove_active(&self, active: Active) {
        self.discard(&active.dir);
    }

    /// Every committed snapshot, sorted by chain ID.
    pub fn list(&self) -> Result<Vec<Info>, SnapshotError> {
        let p = self.dir.join("committed");
        let mut out = Vec::new();
        for ent in fs::read_dir(&p)
            .map_err(|e| io_err("list snapshots", &p, e))?
            .flatten()
        {
            let Ok(chain) =
                format!("sha256:{}", ent.file_name().to_string_lossy()).parse::<Digest>()
            else {
                continue;
            };
            out.push(Info {
                chain_id: chain,
                parent: read_parent(&ent.path())?,
            });
        }
        out.sort_by_key(|i| i.chain_id);
        Ok(out)
    }

    /// Removes a committed snapshot that no other one stacks on.
    pub fn remove(&self, chain: &Digest) -> Result<(), SnapshotError> {
        self.stat(chain)?;
        if let Some(child) = self.list()?.into_iter().find(|i| i.parent == Some(*chain)) {
            return Err(SnapshotError::HasChildren(
                *chain,
                child.chain_id.to_string(),
            ));
        }
        if let Some(rw) = self
            .list_rw()?
            .into_iter()
            .find(|i| i.parent == Some(*chain))
        {
            return Err(SnapshotError::HasChildren(
                *chain,
                format!("writable snapshot {:?}", rw.key),
            ));
        }
        let name = crate::statedir::private_name();
        rfs::renameat(&self.committed, chain.hex(), &self.trash, name.as_str())
            .map_err(|e| io_err("remove snapshot", &self.committed_dir(chain), e.into()))?;
        let to = self.dir.join("trash").join(name);
        fs::remove_dir_all(&to).map_err(|e| io_err("remove snapshot", &to, e))
    }

    /// The upper directories of `chain` and everything below it, top first:
    /// the `lowerdir` list of an overlay mount of that chain.
    pub fn lower_dirs(&self, chain: &Digest) -> Result<Vec<PathBuf>, SnapshotError> {
        let mut out = Vec::new();
        let mut cur = Some(*chain);
        while let Some(c) = cur {
            let info = self.stat(&c)?;
            out.push(self.committed_dir(&c).join("fs"));
            cur = info.parent;
            if out.len() > 4096 {
                return Err(io_err(
                    "walk parents",
                    &self.committed_dir(chain),
                    Errno::LOOP.into(),
                ));
            }
        }
        Ok(out)
    }
}

impl Snapshotter {
    /// How to mount committed snapshot `chain` read-only: a bind mount of
    /// its one directory, or an overlay of all of them (overlayfs needs two
    /// lower directories when it has no upper one).
    pub fn mounts(&self, chain: &Digest) -> Result<Mount, SnapshotError> {
        let lowers = self.lower_dirs(chain)?;
        if let [one] = lowers.as_slice() {
            return Ok(Mount {
                kind: "bind",
                source: one.clone(),
                options: vec!["rbind".into(), "ro".into()],
            });
        }
        Ok(Mount {
            kind: "overlay",
            source: "overlay".into(),
            options: vec!["ro".into(), lowerdir_option(&lowers)],
        })
    }

    /// Creates the named writable snapshot `key` on top of `parent` (a
    /// committed chain ID; `None`: empty) and says how to mount it. The
    /// key must be new.
    pub fn create_rw(&self, key: &str, parent: Option<&Digest>) -> Result<Mount, SnapshotError> {
        if !valid_key(key) {
            return Err(SnapshotError::Key {
                key: key.into(),
                detail: "use letters, digits and ._-@+ (not first .), at most 200",
            });
        }
        let active = self.prepare(parent.copied())?;
        let name = active
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match rfs::renameat_with(
            &self.active,
            name.as_str(),
            &self.rw,
            key,
            RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {}
            Err(Errno::EXIST | Errno::NOTEMPTY) => {
                self.discard(&active.dir);
                return Err(SnapshotError::Key {
                    key: key.into(),
                    detail: "exists already",
                });
            }
            Err(e) => return Err(io_err("create writable snapshot", &active.dir, e.into())),
        }
        let _ = fs::remove_file(self.rw_dir(key).join("lock"));
        self.rw_mounts(key)
    }

    fn rw_dir(&self, key: &str) -> PathBuf {
        self.dir.join("rw").join(key)
    }

    /// How to mount writable snapshot `key`: an overlay whose upper
    /// directory is the snapshot's own.
    pub fn rw_mounts(&self, key: &str) -> Result<Mount, SnapshotError> {
        let dir = self.rw_dir(key);
        if !valid_key(key) || !dir.join("fs").is_dir() {
            return Err(SnapshotError::Key {
                key: key.into(),
                detail: "not found",
            });
        }
        let mut options = vec![
            "index=off".to_string(),
            format!("workdir={}", dir.join("work").display()),
            format!("upperdir={}", dir.join("fs").display()),
        ];
        match read_parent(&dir)? {
            Some(p) => options.push(lowerdir_option(&self.lower_dirs(&p)?)),
            None => {
                // overlayfs needs a lower directory: an empty one.
                let empty = self.dir.join("empty");
                fs::create_dir_all(&empty).map_err(|e| io_err("create", &empty, e))?;
                options.push(format!("lowerdir={}", empty.display()));
            }
        }
        Ok(Mount {
            kind: "overlay",
            source: "overlay".into(),
            options,
        })
    }

    /// Every named writable snapshot, sorted by key.
    pub fn list_rw(&self) -> Result<Vec<RwInfo>, SnapshotError> {
        let p = self.dir.join("rw");
        let mut out = Vec::new();
        for ent in fs::read_dir(&p)
            .map_err(|e| io_err("list writable snapshots", &p, e))?
            .flatten()
        {
            let key = ent.file_name().to_string_lossy().into_owned();
            out.push(RwInfo {
                parent: read_parent(&ent.path())?,
                key,
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Removes writable snapshot `key` (unmount it first).
    pub fn remove_rw(&self, key: &str) -> Result<(), SnapshotError> {
        if !valid_key(key) {
            return Err(SnapshotError::Key {
                key: key.into(),
                detail: "not found",
            });
        }
        let name = crate::statedir::private_name();
        match rfs::renameat(&self.rw, key, &self.trash, name.as_str()) {
            Ok(()) => {}
            Err(Errno::NOENT) => {
                return Err(SnapshotError::Key {
                    key: key.into(),
                    detail: "not found",
                })
            }
            Err(e) => {
                return Err(io_err(
                    "remove writable snapshot",
                    &self.rw_dir(key),
                    e.into(),
                ))
            }
        }
        let to = self.dir.join("trash").join(name);
        fs::remove_dir_all(&to).map_err(|e| io_err("remove writable snapshot", &to, e))
    }
}

fn lowerdir_option(lowers: &[PathBuf]) -> String {
    let list: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    format!("lowerdir={}", list.join(":"))
}

fn read_parent(dir: &Path) -> Result<Option<Digest>, SnapshotError> {
    match fs::read_to_string(dir.join("parent")) {
        Ok(s) => s.trim().parse::<Digest>().map(Some).map_err(|e| {
            io_err(
                "read parent",
                dir,
                io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read parent", dir, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opening a root cleans unheld active snapshots; one that another
    /// thread (or process) is preparing at that moment must survive it.
    #[test]
    fn prepare_survives_concurrent_clean_ups() {
        let t = std::env::temp_dir().join(format!("unlade-snap-race-{}", std::process::id()));
        let _ = fs::remove_dir_all(&t);
        let s = Snapshotter::open(&t).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|sc| {
            let cleaner = sc.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    Snapshotter::open(&t).unwrap();
                }
            });
            let worker = sc.spawn(|| {
                for _ in 0..500 {
                    let a = s.prepare_on(None).unwrap();
                    fs::write(a.fs().join("f"), b"x").unwrap();
                    s.remove_active(a);
                }
            });
            let r = worker.join();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            cleaner.join().unwrap();
            assert!(r.is_ok(), "prepare failed beside a clean-up");
        });
        fs::remove_dir_all(&t).unwrap();
    }
}
