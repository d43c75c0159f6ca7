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
    HasChildren(Digest, Digest),
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
    trash: OwnedFd,
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
                // No lock file: a prepare that died before taking it.
                Err(_) => {
                    self.discard(&p);
                    continue;
                }
            };
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
        let name = crate::statedir::private_name();
        let dir = self.dir.join("active").join(&name);
        fs::create_dir(&dir).map_err(|e| io_err("create active snapshot", &dir, e))?;
        let lock = rfs::open(
            dir.join("lock"),
            OFlags::RDWR | OFlags::CREATE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| io_err("create lock", &dir, e.into()))?;
        rfs::flock(&lock, FlockOperation::LockExclusive)
            .map_err(|e| io_err("lock", &dir, e.into()))?;
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
            return Err(SnapshotError::HasChildren(*chain, child.chain_id));
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
