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
//! - `l/<short>` are symlinks `../committed/<chain hex>/fs`, made when a
//!   mount needs them (see [`Snapshotter::mounts`]): `<short>` is the
//!   shortest prefix of the chain hex, 6 characters or more, that is free
//!   or links to that chain already, so the names need no record. gc
//!   removes the ones whose snapshot is gone.
//!
//! - `holds/<holder>` are files naming a committed chain that something
//!   outside unlade's own records still uses (containerd's snapshots made
//!   from unlade's, see `crate::containerd`): gc keeps a held chain and
//!   its parents as it keeps an image's.
//!
//! As with the content store, the directory names are the database.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{self as rfs, FlockOperation, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use crate::cancel::Cancel;
use crate::oci::digest::Digest;
use crate::store::statedir::io_err;

/// Why a snapshotter operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
        /// The key as the caller gave it.
        key: String,
        /// What is wrong with it: "exists already", "not found", or the
        /// characters a key may hold.
        detail: &'static str,
    },
    /// A chain deeper than overlayfs stacks: it cannot be mounted.
    #[error(
        "snapshot {chain} has {layers} layers: overlayfs mounts at most {max}",
        max = MAX_LAYERS
    )]
    TooManyLayers {
        /// The top of the chain.
        chain: Digest,
        /// How many layers it has.
        layers: usize,
    },
    /// The mount options of a chain do not fit the kernel's one page even
    /// with short names (a long writable key, many long link names).
    #[error(
        "snapshot {chain}: the mount options of its {layers} layers take {len} bytes \
         even with short names, more than the kernel's {max}",
        max = MAX_OPTIONS_LEN
    )]
    OptionsTooLong {
        /// The top of the chain.
        chain: Digest,
        /// How many layers it has.
        layers: usize,
        /// The length of the shortest option string.
        len: usize,
    },
    /// A file-system operation failed.
    #[error(transparent)]
    Io(#[from] crate::store::statedir::StoreIoError),
}

/// How this store's I/O errors name it.
pub(crate) const STORE: &str = "snapshots";

/// An active snapshot without a lock file is a crash leftover only when it
/// is older than this: a live prepare creates the file right after the
/// directory.
const UNLOCKED_GRACE_SECS: u64 = 600;

/// The most lower directories overlayfs stacks (the kernel's
/// `OVL_MAX_STACK`): the most layers an image may have to be mounted, and
/// so the most [`crate::oci::image`] accepts in a manifest.
pub use crate::oci::image::MAX_LAYERS;

/// The longest option string mount(2) takes: the kernel copies one page of
/// options, NUL included, and 4096 bytes is the smallest page Linux runs
/// with (x86-64, most arm64 kernels).
pub const MAX_OPTIONS_LEN: usize = 4095;

/// Options with absolute paths are used up to this length, which leaves
/// room for options a runtime adds (an SELinux `context=`, `userxattr`);
/// longer ones are written relative to `l/` with short names.
const ABSOLUTE_OPTIONS_MAX: usize = MAX_OPTIONS_LEN - 512;

/// The shortest name of a link under `l/`: 6 hex digits, so 500 layers
/// take 3.5 KiB of `lowerdir` and two chains of one root share a prefix
/// only once in 16 million pairs (then one gets a longer name).
const SHORT_MIN: usize = 6;

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
    links: OwnedFd,
    /// Snapshot directories read by listings (see [`Snapshotter::listed`]).
    listed: AtomicU64,
}

/// How to mount a snapshot: the arguments of mount(2) / mount(8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `overlay` or `bind`.
    pub kind: &'static str,
    /// The source (`overlay`, or the directory bound).
    pub source: PathBuf,
    /// Mount options (`ro`, `lowerdir=…`, `rbind`), joined with `,` for
    /// mount(2)'s data argument.
    pub options: Vec<String>,
    /// The directory relative paths in `options` are relative to, or
    /// `None` when every path is absolute (most images). It is set when
    /// absolute paths would not fit the kernel's one page of options
    /// (images of about 35 layers and more; fewer under a long root
    /// path): then `options` name the layers by short links in
    /// `ROOT/snapshots/l`, and the mount must be made with that directory
    /// as the working directory — from a child process that changes into
    /// it (containerd's mount helper does the same), or from a thread that
    /// has called `unshare(CLONE_FS)` first, since the working directory
    /// is otherwise shared by every thread.
    pub cwd: Option<PathBuf>,
}

impl Mount {
    /// The `mount` command line that mounts this at `target`, in the form
    /// `ctr snapshots mounts` prints: `mount -t TYPE SOURCE TARGET -o OPTS`,
    /// preceded by `cd DIR && ` when the options are relative to
    /// [`Mount::cwd`] (`target` is then made absolute, so that it means
    /// what it meant where the line was made).
    pub fn command_line(&self, target: &Path) -> String {
        let line = |target: &Path| {
            format!(
                "mount -t {} {} {} -o {}",
                self.kind,
                shell_quote(&self.source.to_string_lossy()),
                shell_quote(&target.to_string_lossy()),
                shell_quote(&self.options.join(","))
            )
        };
        match &self.cwd {
            None => line(target),
            Some(dir) => {
                let target = std::path::absolute(target).unwrap_or_else(|_| target.into());
                format!(
                    "cd {} && {}",
                    shell_quote(&dir.to_string_lossy()),
                    line(&target)
                )
            }
        }
    }
}

/// The length of the options as mount(2) gets them.
fn options_len(options: &[String]) -> usize {
    options
        .iter()
        .map(|o| o.len() + 1)
        .sum::<usize>()
        .saturating_sub(1)
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
    /// The key it was created with (its directory under
    /// `snapshots/rw/`).
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
    crate::store::statedir::open_dir(p).map_err(|e| io_err(STORE, "open directory", p, e).into())
}

impl Snapshotter {
    /// Opens (creating) the snapshotter under `root/snapshots` and removes
    /// what crashed processes left: active snapshots nobody holds, trash.
    pub fn open(root: &Path) -> Result<Self, SnapshotError> {
        let dir = root.join("snapshots");
        open_dir(&dir)?;
        open_dir(&dir.join("holds"))?;
        let s = Snapshotter {
            committed: open_dir(&dir.join("committed"))?,
            active: open_dir(&dir.join("active"))?,
            rw: open_dir(&dir.join("rw"))?,
            trash: open_dir(&dir.join("trash"))?,
            links: open_dir(&dir.join("l"))?,
            listed: AtomicU64::new(0),
            dir,
        };
        s.clean()?;
        Ok(s)
    }

    fn clean(&self) -> Result<(), SnapshotError> {
        let active = self.dir.join("active");
        for ent in fs::read_dir(&active)
            .map_err(|e| io_err(STORE, "list active", &active, e))?
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
            .map_err(|e| io_err(STORE, "list trash", &trash, e))?
            .flatten()
        {
            let _ = fs::remove_dir_all(ent.path());
        }
        Ok(())
    }

    /// Moves a directory into the trash and removes it there.
    fn discard(&self, p: &Path) {
        let name = crate::store::statedir::private_name();
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
            let name = crate::store::statedir::private_name();
            let dir = self.dir.join("active").join(&name);
            crate::store::statedir::make_dir(&dir, crate::store::statedir::PRIVATE)
                .map_err(|e| io_err(STORE, "create active snapshot", &dir, e))?;
            let lock = match rfs::open(
                dir.join("lock"),
                OFlags::RDWR | OFlags::CREATE | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            ) {
                Ok(l) => l,
                Err(Errno::NOENT) if tries < 16 => continue,
                Err(e) => return Err(io_err(STORE, "create lock", &dir, e.into()).into()),
            };
            rfs::flock(&lock, FlockOperation::LockExclusive)
                .map_err(|e| io_err(STORE, "lock", &dir, e.into()))?;
            let held = rfs::fstat(&lock).map_err(|e| io_err(STORE, "lock", &dir, e.into()))?;
            match rfs::stat(dir.join("lock")) {
                Ok(st) if st.st_ino == held.st_ino && st.st_dev == held.st_dev => {
                    break (dir, lock)
                }
                _ if tries < 16 => continue,
                _ => {
                    return Err(io_err(
                        STORE,
                        "lock",
                        &dir,
                        io::Error::other("removed by a concurrent clean-up, 16 times"),
                    )
                    .into())
                }
            }
        };
        // The upper directory is the image's root unless a layer says
        // otherwise: the usual 0755, never the umask's.
        crate::store::statedir::make_dir(&dir.join("fs"), 0o755)
            .map_err(|e| io_err(STORE, "create upper", &dir, e))?;
        crate::store::statedir::make_dir(&dir.join("work"), crate::store::statedir::PRIVATE)
            .map_err(|e| io_err(STORE, "create work", &dir, e))?;
        if let Some(p) = parent {
            fs::write(dir.join("parent"), p.to_string())
                .map_err(|e| io_err(STORE, "write parent", &dir, e))?;
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
            .ok_or_else(|| io_err(STORE, "commit", &active.dir, Errno::INVAL.into()))?;
        let name = CString::new(name.as_encoded_bytes())
            .map_err(|_| io_err(STORE, "commit", &active.dir, Errno::INVAL.into()))?;
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
            Err(e) => Err(io_err(STORE, "commit", &active.dir, e.into()).into()),
        }
    }

    /// Makes everything written into `active` durable: one `syncfs` of
    /// the file system holding it (the baseline containerd offers).
    pub fn sync_active(&self, active: &Active) -> Result<(), SnapshotError> {
        let fd = open_dir(&active.fs())?;
        rfs::syncfs(&fd).map_err(|e| io_err(STORE, "sync", &active.fs(), e.into()).into())
    }

    /// Makes a commit's rename durable: fsync of `committed/`.
    pub fn sync_commits(&self) -> Result<(), SnapshotError> {
        rfs::fsync(&self.committed)
            .map_err(|e| io_err(STORE, "sync", &self.dir.join("committed"), e.into()).into())
    }

    /// Throws an active snapshot away.
    pub fn remove_active(&self, active: Active) {
        self.discard(&active.dir);
    }

    /// How many snapshots (committed and writable) the listings
    /// ([`Self::list`], [`Self::list_rw`]) of this snapshotter have read
    /// since it was opened, each a directory entry and its `parent` file:
    /// the measure of the work of what lists, which tests bound (gc of `n`
    /// snapshots reads each a few times, not `n` times).
    pub fn listed(&self) -> u64 {
        self.listed.load(Ordering::Relaxed)
    }

    /// Every committed snapshot, sorted by chain ID.
    pub fn list(&self) -> Result<Vec<Info>, SnapshotError> {
        let p = self.dir.join("committed");
        let mut out = Vec::new();
        for ent in fs::read_dir(&p)
            .map_err(|e| io_err(STORE, "list snapshots", &p, e))?
            .flatten()
        {
            let Ok(chain) =
                format!("sha256:{}", ent.file_name().to_string_lossy()).parse::<Digest>()
            else {
                continue;
            };
            self.listed.fetch_add(1, Ordering::Relaxed);
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
        self.remove_all(&[*chain], &Cancel::new()).map(drop)
    }

    /// Removes committed snapshots `chains` (a set: what one of them
    /// stacks on may be another), children before their parents, so that
    /// a removal cut short leaves no snapshot whose parent is gone. Like
    /// [`Self::remove`] it refuses, before removing anything, a chain that
    /// is not committed or that a snapshot outside the set stacks on
    /// (committed or writable); unlike a `remove` of each, it checks
    /// against one listing of each kind, so that removing `n` snapshots
    /// costs `O(n)`, not `n` listings. Stops before the next removal once
    /// `cancel` trips. Returns what it removed, in order: deepest first
    /// (then by chain ID, highest first).
    pub fn remove_all(
        &self,
        chains: &[Digest],
        cancel: &Cancel,
    ) -> Result<Vec<Digest>, SnapshotError> {
        let listed = self.list()?;
        let parent_of: HashMap<Digest, Option<Digest>> =
            listed.iter().map(|i| (i.chain_id, i.parent)).collect();
        if let Some(c) = chains.iter().find(|c| !parent_of.contains_key(c)) {
            return Err(SnapshotError::NotFound(*c));
        }
        let doomed: HashSet<Digest> = chains.iter().copied().collect();
        let stacked = |p: Option<Digest>| p.filter(|p| doomed.contains(p));
        // The first by chain ID, as the listing is sorted.
        if let Some((p, child)) = listed
            .iter()
            .filter(|i| !doomed.contains(&i.chain_id))
            .find_map(|i| stacked(i.parent).map(|p| (p, i.chain_id)))
        {
            return Err(SnapshotError::HasChildren(p, child.to_string()));
        }
        if let Some((p, key)) = self
            .list_rw()?
            .into_iter()
            .find_map(|i| stacked(i.parent).map(|p| (p, i.key)))
        {
            return Err(SnapshotError::HasChildren(
                p,
                format!("writable snapshot {key:?}"),
            ));
        }
        let depth = depths(&parent_of);
        let mut order: Vec<(usize, Digest)> = doomed.iter().map(|c| (depth[c], *c)).collect();
        order.sort_unstable_by(|a, b| b.cmp(a));
        let mut removed = Vec::with_capacity(order.len());
        for (_, chain) in order {
            if cancel.is_cancelled() {
                break;
            }
            self.remove_unchecked(&chain)?;
            removed.push(chain);
        }
        Ok(removed)
    }

    /// Removes committed snapshot `chain` with its short links, whatever
    /// stacks on it: the callers have checked.
    fn remove_unchecked(&self, chain: &Digest) -> Result<(), SnapshotError> {
        let name = crate::store::statedir::private_name();
        rfs::renameat(&self.committed, chain.hex(), &self.trash, name.as_str()).map_err(|e| {
            io_err(
                STORE,
                "remove snapshot",
                &self.committed_dir(chain),
                e.into(),
            )
        })?;
        self.remove_links(chain);
        let to = self.dir.join("trash").join(name);
        fs::remove_dir_all(&to).map_err(|e| io_err(STORE, "remove snapshot", &to, e).into())
    }

    /// The chain IDs of `chain` and everything below it, top first.
    fn chain_of(&self, chain: &Digest) -> Result<Vec<Digest>, SnapshotError> {
        let mut out = Vec::new();
        let mut cur = Some(*chain);
        while let Some(c) = cur {
            let info = self.stat(&c)?;
            out.push(c);
            cur = info.parent;
            if out.len() > 4096 {
                return Err(io_err(
                    STORE,
                    "walk parents",
                    &self.committed_dir(chain),
                    Errno::LOOP.into(),
                )
                .into());
            }
        }
        Ok(out)
    }

    /// The upper directories of `chain` and everything below it, top first:
    /// the `lowerdir` list of an overlay mount of that chain.
    pub fn lower_dirs(&self, chain: &Digest) -> Result<Vec<PathBuf>, SnapshotError> {
        Ok(self
            .chain_of(chain)?
            .iter()
            .map(|c| self.committed_dir(c).join("fs"))
            .collect())
    }
}

/// Short links: `l/<prefix of the chain hex>` → `../committed/<hex>/fs`.
///
/// A name, once made, links to one chain until it is removed, and it is
/// removed only when that chain's snapshot is gone (by [`Snapshotter::remove`]
/// of that chain, or by [`Snapshotter::sweep_links`] when it dangles). So
/// making links needs no lock against other makers — `symlinkat` fails on a
/// taken name, and the taken name is read back — but whoever removes links
/// must not run beside someone making them for a snapshot being removed:
/// [`crate::Root`] makes links holding `gc.lock` shared, and removes them
/// holding it shared ([`crate::Root::remove_snapshot`]) or exclusively (gc).
impl Snapshotter {
    /// The target of chain `hex`'s short link.
    fn link_target(hex: &str) -> String {
        format!("../committed/{hex}/fs")
    }

    /// The name in `l/` of a link to committed snapshot `chain`'s `fs`
    /// directory, made if needed: the shortest prefix of its hex, at least
    /// [`SHORT_MIN`] long, that is free or links to `chain` already. A
    /// prefix taken by another chain (or by anything that is not such a
    /// link) just means one more character.
    fn short_link(&self, chain: &Digest) -> Result<String, SnapshotError> {
        let hex = chain.hex();
        let target = Self::link_target(&hex);
        let mut len = SHORT_MIN;
        let mut vanished = 0;
        while len <= hex.len() {
            let name = &hex[..len];
            let err = |op, e: Errno| io_err(STORE, op, &self.dir.join("l").join(name), e.into());
            match rfs::symlinkat(target.as_str(), &self.links, name) {
                Ok(()) => return Ok(name.to_string()),
                Err(Errno::EXIST) => {}
                Err(e) => return Err(err("create short link", e).into()),
            }
            match rfs::readlinkat(&self.links, name, Vec::new()) {
                Ok(t) if t.as_bytes() == target.as_bytes() => return Ok(name.to_string()),
                // Removed between the two calls: its chain is gone, so
                // the name is free again.
                Err(Errno::NOENT) if vanished < 16 => vanished += 1,
                // Another chain's, or not a symlink.
                Ok(_) | Err(Errno::INVAL) => len += 1,
                Err(e) => return Err(err("read short link", e).into()),
            }
        }
        Err(io_err(
            STORE,
            "create short link",
            &self.dir.join("l").join(&hex),
            io::Error::other("every prefix of the chain ID is taken"),
        )
        .into())
    }

    /// Removes the links to `chain` (best effort: what is left dangles,
    /// and [`Self::sweep_links`] removes it).
    fn remove_links(&self, chain: &Digest) {
        let hex = chain.hex();
        let target = Self::link_target(&hex);
        for len in SHORT_MIN..=hex.len() {
            let name = &hex[..len];
            if rfs::readlinkat(&self.links, name, Vec::new())
                .is_ok_and(|t| t.as_bytes() == target.as_bytes())
            {
                let _ = rfs::unlinkat(&self.links, name, rfs::AtFlags::empty());
            }
        }
    }

    /// Removes the links in `l/` that dangle (their snapshot is gone) and
    /// says how many. Holders of the root's gc lock only: see above.
    pub fn sweep_links(&self) -> Result<usize, SnapshotError> {
        let p = self.dir.join("l");
        let mut removed = 0;
        for ent in fs::read_dir(&p)
            .map_err(|e| io_err(STORE, "list short links", &p, e))?
            .flatten()
        {
            let name = ent.file_name();
            let is_link = ent.file_type().is_ok_and(|t| t.is_symlink());
            if is_link
                && matches!(
                    rfs::statat(&self.links, &name, rfs::AtFlags::empty()),
                    Err(Errno::NOENT)
                )
                && rfs::unlinkat(&self.links, &name, rfs::AtFlags::empty()).is_ok()
            {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The overlay mount of `lowers` (chain IDs, top first, of the chain
    /// `top`), read-only or with writable snapshot `rw`'s directories on
    /// top. Paths are absolute when the options fit comfortably in a page
    /// ([`ABSOLUTE_OPTIONS_MAX`]), and relative to `l/` otherwise, with the
    /// layers named by their short links ([`Mount::cwd`]).
    fn overlay(
        &self,
        top: &Digest,
        lowers: &[Digest],
        rw: Option<&str>,
    ) -> Result<Mount, SnapshotError> {
        if lowers.len() > MAX_LAYERS {
            return Err(SnapshotError::TooManyLayers {
                chain: *top,
                layers: lowers.len(),
            });
        }
        // The options before `lowerdir`, with the snapshots directory
        // written as `base`.
        let head = |base: &str| match rw {
            None => vec!["ro".to_string()],
            Some(key) => vec![
                "index=off".to_string(),
                format!("workdir={base}/rw/{key}/work"),
                format!("upperdir={base}/rw/{key}/fs"),
            ],
        };
        let mut options = head(&self.dir.display().to_string());
        let dirs: Vec<String> = lowers
            .iter()
            .map(|c| self.committed_dir(c).join("fs").display().to_string())
            .collect();
        options.push(format!("lowerdir={}", dirs.join(":")));
        if options_len(&options) <= ABSOLUTE_OPTIONS_MAX {
            return Ok(Mount {
                kind: "overlay",
                source: "overlay".into(),
                options,
                cwd: None,
            });
        }
        let mut options = head("..");
        let names = lowers
            .iter()
            .map(|c| self.short_link(c))
            .collect::<Result<Vec<_>, _>>()?;
        options.push(format!("lowerdir={}", names.join(":")));
        let len = options_len(&options);
        if len > MAX_OPTIONS_LEN {
            return Err(SnapshotError::OptionsTooLong {
                chain: *top,
                layers: lowers.len(),
                len,
            });
        }
        Ok(Mount {
            kind: "overlay",
            source: "overlay".into(),
            options,
            cwd: Some(self.dir.join("l")),
        })
    }
}

impl Snapshotter {
    /// How to mount committed snapshot `chain` read-only: a bind mount of
    /// its one directory, or an overlay of all of them (overlayfs needs two
    /// lower directories when it has no upper one).
    ///
    /// Up to [`MAX_LAYERS`] layers. Images of more than about 35 layers get
    /// options relative to `ROOT/snapshots/l` ([`Mount::cwd`]), whose short
    /// links this makes; a caller sharing the root with gc holds its lock
    /// meanwhile ([`crate::Root::mounts`] does).
    pub fn mounts(&self, chain: &Digest) -> Result<Mount, SnapshotError> {
        let lowers = self.chain_of(chain)?;
        if let [one] = lowers.as_slice() {
            return Ok(Mount {
                kind: "bind",
                source: self.committed_dir(one).join("fs"),
                options: vec!["rbind".into(), "ro".into()],
                cwd: None,
            });
        }
        self.overlay(chain, &lowers, None)
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
            Err(e) => {
                return Err(io_err(STORE, "create writable snapshot", &active.dir, e.into()).into())
            }
        }
        let _ = fs::remove_file(self.rw_dir(key).join("lock"));
        // A chain that cannot be mounted (too many layers) gets no
        // snapshot.
        self.rw_mounts(key).inspect_err(|_| {
            let _ = self.remove_rw(key);
        })
    }

    fn rw_dir(&self, key: &str) -> PathBuf {
        self.dir.join("rw").join(key)
    }

    /// How to mount writable snapshot `key`: an overlay whose upper
    /// directory is the snapshot's own, on at most [`MAX_LAYERS`] layers,
    /// relative to `ROOT/snapshots/l` as in [`Self::mounts`] when they are
    /// many.
    pub fn rw_mounts(&self, key: &str) -> Result<Mount, SnapshotError> {
        let dir = self.rw_dir(key);
        if !valid_key(key) || !dir.join("fs").is_dir() {
            return Err(SnapshotError::Key {
                key: key.into(),
                detail: "not found",
            });
        }
        match read_parent(&dir)? {
            Some(p) => self.overlay(&p, &self.chain_of(&p)?, Some(key)),
            None => {
                // overlayfs needs a lower directory: an empty one.
                let empty = self.dir.join("empty");
                crate::store::statedir::make_dirs(&empty, 0o755)
                    .map_err(|e| io_err(STORE, "create", &empty, e))?;
                Ok(Mount {
                    kind: "overlay",
                    source: "overlay".into(),
                    options: vec![
                        "index=off".to_string(),
                        format!("workdir={}", dir.join("work").display()),
                        format!("upperdir={}", dir.join("fs").display()),
                        format!("lowerdir={}", empty.display()),
                    ],
                    cwd: None,
                })
            }
        }
    }

    /// Keeps committed snapshot `chain` (and its parents) from gc for
    /// `holder` (a key, as writable snapshots have) until
    /// [`Self::release`]; a second hold by one holder replaces the first.
    /// The chain need not exist yet: a hold taken before a pull covers what
    /// the pull commits.
    pub fn hold(&self, holder: &str, chain: &Digest) -> Result<(), SnapshotError> {
        if !valid_key(holder) {
            return Err(SnapshotError::Key {
                key: holder.into(),
                detail: "a holder is 1 to 200 of a-z A-Z 0-9 . _ - @ +, not starting with .",
            });
        }
        let dir = self.dir.join("holds");
        let tmp = dir.join(format!(".{}", crate::store::statedir::private_name()));
        fs::write(&tmp, format!("{chain}\n"))
            .and_then(|()| fs::rename(&tmp, dir.join(holder)))
            .map_err(|e| {
                let _ = fs::remove_file(&tmp);
                io_err(STORE, "write hold", &dir.join(holder), e).into()
            })
    }

    /// Ends `holder`'s hold (none: nothing to do).
    pub fn release(&self, holder: &str) -> Result<(), SnapshotError> {
        if !valid_key(holder) {
            return Ok(());
        }
        let p = self.dir.join("holds").join(holder);
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(STORE, "remove hold", &p, e).into()),
        }
    }

    /// How long ago `holder`'s hold was last taken (`None`: no hold).
    pub fn hold_age(&self, holder: &str) -> Option<std::time::Duration> {
        if !valid_key(holder) {
            return None;
        }
        let m = fs::metadata(self.dir.join("holds").join(holder)).ok()?;
        m.modified().ok()?.elapsed().ok()
    }

    /// Every hold: (holder, chain), sorted by holder.
    pub fn list_holds(&self) -> Result<Vec<(String, Digest)>, SnapshotError> {
        let dir = self.dir.join("holds");
        let mut out = Vec::new();
        for ent in fs::read_dir(&dir)
            .map_err(|e| io_err(STORE, "list holds", &dir, e))?
            .flatten()
        {
            let holder = ent.file_name().to_string_lossy().into_owned();
            if holder.starts_with('.') {
                continue;
            }
            let text = fs::read_to_string(ent.path())
                .map_err(|e| io_err(STORE, "read hold", &ent.path(), e))?;
            let chain = text.trim().parse::<Digest>().map_err(|e| {
                io_err(
                    STORE,
                    "read hold",
                    &ent.path(),
                    io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
                )
            })?;
            out.push((holder, chain));
        }
        out.sort();
        Ok(out)
    }

    /// Every named writable snapshot, sorted by key.
    pub fn list_rw(&self) -> Result<Vec<RwInfo>, SnapshotError> {
        let p = self.dir.join("rw");
        let mut out = Vec::new();
        for ent in fs::read_dir(&p)
            .map_err(|e| io_err(STORE, "list writable snapshots", &p, e))?
            .flatten()
        {
            let key = ent.file_name().to_string_lossy().into_owned();
            self.listed.fetch_add(1, Ordering::Relaxed);
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
        let name = crate::store::statedir::private_name();
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
                    STORE,
                    "remove writable snapshot",
                    &self.rw_dir(key),
                    e.into(),
                )
                .into())
            }
        }
        let to = self.dir.join("trash").join(name);
        fs::remove_dir_all(&to)
            .map_err(|e| io_err(STORE, "remove writable snapshot", &to, e).into())
    }
}

/// How many snapshots stand below each listed one (`parent_of`: each
/// listed chain's parent), each worked out once: a walk up stops at the
/// first snapshot whose depth is known, so all of them cost `O(n)` however
/// deep the stacks. A parent that is not listed counts as one level and
/// ends its stack; so does a loop (a corrupt `parent` file).
fn depths(parent_of: &HashMap<Digest, Option<Digest>>) -> HashMap<Digest, usize> {
    let mut depth: HashMap<Digest, usize> = HashMap::with_capacity(parent_of.len());
    let mut path = Vec::new();
    let mut on_path = HashSet::new();
    for &start in parent_of.keys() {
        // Up from `start` to a snapshot of known depth (whose child is at
        // `base`) or to the bottom (`base` 0).
        let mut base = 0;
        let mut cur = Some(start);
        while let Some(c) = cur {
            if let Some(&d) = depth.get(&c) {
                base = d + 1;
                break;
            }
            if !on_path.insert(c) {
                break;
            }
            path.push(c);
            cur = parent_of.get(&c).copied().flatten();
        }
        for (k, c) in path.drain(..).rev().enumerate() {
            depth.insert(c, base + k);
        }
        on_path.clear();
    }
    depth
}

fn read_parent(dir: &Path) -> Result<Option<Digest>, SnapshotError> {
    match fs::read_to_string(dir.join("parent")) {
        Ok(s) => s.trim().parse::<Digest>().map(Some).map_err(|e| {
            io_err(
                STORE,
                "read parent",
                dir,
                io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
            )
            .into()
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(STORE, "read parent", dir, e).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory for one test.
    fn scratch(name: &str) -> PathBuf {
        let t = std::env::temp_dir().join(format!("unlade-snap-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&t);
        t
    }

    /// Commits `n` empty snapshots stacked on each other; returns their
    /// chain IDs, bottom first.
    fn stack(s: &Snapshotter, n: usize, seed: &str) -> Vec<Digest> {
        let mut chains: Vec<Digest> = Vec::new();
        for i in 0..n {
            let a = s.prepare(chains.last().copied()).unwrap();
            let c = Digest::of(format!("{seed} {i}").as_bytes());
            assert!(s.commit(a, &c).unwrap());
            chains.push(c);
        }
        chains
    }

    /// The `lowerdir=` value of a mount.
    fn lowerdir(m: &Mount) -> Vec<String> {
        let o = m.options.iter().find_map(|o| o.strip_prefix("lowerdir="));
        o.unwrap().split(':').map(String::from).collect()
    }

    #[test]
    fn short_names_grow_past_collisions_and_go_with_their_snapshot() {
        let t = scratch("short");
        let s = Snapshotter::open(&t).unwrap();
        let v = stack(&s, 3, "short");
        let (c, d, e) = (v[0], v[1], v[2]);
        let l = t.join("snapshots/l");
        let (hc, hd) = (c.hex(), d.hex());
        // C's 6-character prefix links to another chain; D's is a file.
        let other = format!("../committed/{}/fs", Digest::of(b"other").hex());
        std::os::unix::fs::symlink(&other, l.join(&hc[..6])).unwrap();
        fs::write(l.join(&hd[..6]), b"").unwrap();
        assert_eq!(s.short_link(&c).unwrap(), hc[..7]);
        assert_eq!(s.short_link(&c).unwrap(), hc[..7], "made once, then reused");
        assert_eq!(s.short_link(&d).unwrap(), hd[..7]);
        let he = e.hex();
        assert_eq!(s.short_link(&e).unwrap(), he[..6]);
        assert_eq!(
            fs::read_link(l.join(&hc[..7])).unwrap(),
            Path::new(&format!("../committed/{hc}/fs"))
        );
        assert!(fs::metadata(l.join(&he[..6])).unwrap().is_dir());
        // Removing E removes its link, and only that.
        s.remove(&e).unwrap();
        assert!(fs::symlink_metadata(l.join(&he[..6])).is_err());
        assert!(fs::symlink_metadata(l.join(&hc[..7])).is_ok());
        // The sweep takes the dangling link, keeps live ones and files.
        assert_eq!(s.sweep_links().unwrap(), 1);
        assert!(fs::symlink_metadata(l.join(&hc[..6])).is_err());
        for kept in [&hc[..7], &hd[..6], &hd[..7]] {
            assert!(fs::symlink_metadata(l.join(kept)).is_ok(), "{kept}");
        }
        assert_eq!(s.sweep_links().unwrap(), 0);
        fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn small_chains_keep_absolute_paths() {
        let t = scratch("small");
        let s = Snapshotter::open(&t).unwrap();
        let chains = stack(&s, 3, "small");
        let m = s.mounts(&chains[2]).unwrap();
        assert_eq!(m.cwd, None);
        let want: Vec<String> = chains
            .iter()
            .rev()
            .map(|c| s.committed_dir(c).join("fs").display().to_string())
            .collect();
        assert_eq!(lowerdir(&m), want);
        assert_eq!(m.options[0], "ro");
        assert!(m
            .command_line(Path::new("rel/mnt"))
            .starts_with("mount -t overlay overlay rel/mnt -o ro,lowerdir=/"));
        let rw = s.create_rw("k", Some(&chains[2])).unwrap();
        assert_eq!(rw.cwd, None);
        assert_eq!(
            rw.options[..3],
            [
                "index=off".to_string(),
                format!("workdir={}", t.join("snapshots/rw/k/work").display()),
                format!("upperdir={}", t.join("snapshots/rw/k/fs").display()),
            ]
        );
        assert_eq!(lowerdir(&rw), want);
        assert_eq!(fs::read_dir(t.join("snapshots/l")).unwrap().count(), 0);
        // A single layer is a bind mount.
        let one = s.mounts(&chains[0]).unwrap();
        assert_eq!((one.kind, one.cwd), ("bind", None));
        fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn five_hundred_layers_fit_a_page_with_short_names() {
        let t = scratch("deep");
        let s = Snapshotter::open(&t).unwrap();
        let chains = stack(&s, MAX_LAYERS + 1, "deep");
        let top = chains[MAX_LAYERS - 1];
        let l = t.join("snapshots/l");
        let m = s.mounts(&top).unwrap();
        assert_eq!(m.cwd.as_deref(), Some(l.as_path()));
        assert_eq!(m.options[0], "ro");
        let names = lowerdir(&m);
        assert_eq!(names.len(), MAX_LAYERS);
        for (name, c) in names.iter().zip(chains[..MAX_LAYERS].iter().rev()) {
            assert!(c.hex().starts_with(name.as_str()) && name.len() >= SHORT_MIN);
            assert_eq!(
                fs::canonicalize(l.join(name)).unwrap(),
                fs::canonicalize(s.committed_dir(c).join("fs")).unwrap()
            );
        }
        let len = options_len(&m.options);
        assert!(len < 4096, "{len}");
        let line = m.command_line(Path::new("mnt"));
        let cwd = std::env::current_dir().unwrap();
        assert!(
            line.starts_with(&format!(
                "cd {} && mount -t overlay overlay {} -o ro,lowerdir=",
                l.display(),
                cwd.join("mnt").display()
            )),
            "{line}"
        );
        // The longest key still fits, with its directories relative too.
        let key = "k".repeat(200);
        let rw = s.create_rw(&key, Some(&top)).unwrap();
        assert!(options_len(&rw.options) <= MAX_OPTIONS_LEN);
        assert_eq!(rw.options[1], format!("workdir=../rw/{key}/work"));
        assert_eq!(rw.options[2], format!("upperdir=../rw/{key}/fs"));
        assert!(l.join(format!("../rw/{key}/fs")).is_dir());
        assert_eq!(lowerdir(&rw), names);
        // One layer more is refused, naming the chain and the count, and
        // leaves no writable snapshot.
        let deeper = chains[MAX_LAYERS];
        let e = s.mounts(&deeper).unwrap_err().to_string();
        assert!(
            e.contains(&deeper.to_string()) && e.contains("501 layers"),
            "{e}"
        );
        assert!(s.create_rw("k2", Some(&deeper)).is_err());
        assert_eq!(s.list_rw().unwrap().len(), 1);
        fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn options_that_cannot_fit_are_an_error() {
        let t = scratch("toolong");
        let s = Snapshotter::open(&t).unwrap();
        let chains = stack(&s, MAX_LAYERS, "toolong");
        // Every 6-character name taken: 7 characters each, and a 200
        // character key, are more than a page.
        let l = t.join("snapshots/l");
        for c in &chains {
            fs::write(l.join(&c.hex()[..6]), b"").unwrap();
        }
        let top = chains[MAX_LAYERS - 1];
        assert!(s.mounts(&top).is_ok(), "read-only still fits");
        let key = "k".repeat(200);
        let e = s.create_rw(&key, Some(&top)).unwrap_err();
        assert!(
            matches!(e, SnapshotError::OptionsTooLong { chain, layers: 500, len } if chain == top && len > MAX_OPTIONS_LEN),
            "{e}"
        );
        assert!(s.list_rw().unwrap().is_empty());
        fs::remove_dir_all(&t).unwrap();
    }

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
