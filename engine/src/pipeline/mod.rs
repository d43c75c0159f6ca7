//! The work of a root: blobs fetched from a [`crate::layer::stream`] into the
//! [`crate::store`] once ([`fetch`], deduplicated by [`flight`]), layers
//! applied ([`crate::layer`]) in order into committed snapshots
//! ([`unpack`]), references resolved and pulled from registries
//! ([`pull`]), unreferenced things removed ([`gc`]), and any of it run on
//! its own thread as a [`task::Task`].

pub mod error;
pub mod fetch;
pub mod flight;
pub mod gc;
pub mod metrics;
pub(crate) mod permits;
pub mod pull;
pub mod task;
pub mod unpack;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{self as rfs, Mode, OFlags};

use crate::cancel::Cancel;
use crate::layer::decode::DecodeOptions;
use crate::layer::fsops::pool::Pool;
use crate::layer::fsops::BackendOptions;
use crate::source::Retry;
use crate::store::content::ContentStore;
use crate::store::durable::Durability;
use crate::store::images::ImageStore;
use crate::store::lock::{FileLock, LockError};
use crate::store::snapshot::Snapshotter;
use error::RootError;
use flight::Flights;
use permits::Permits;

/// How a root works.
#[derive(Debug, Clone)]
pub struct RootOptions {
    /// Whether and how blobs, snapshots and records are made durable
    /// before they become visible (README, "Durability").
    pub durability: Durability,
    /// How layers are decoded.
    pub decode: DecodeOptions,
    /// Most layers applied at the same time by this root, however many
    /// unpacks run (waiting for another's result takes none): each holds
    /// a decoder and a hasher thread. Default: the CPUs of the affinity
    /// mask, as the writers, clamped to 2..8.
    pub parallel_layers: usize,
    /// Most blobs downloaded at the same time by this root (containerd's
    /// `max_concurrent_downloads`, 3 by default); lower layers first.
    pub max_downloads: usize,
    /// Most connections all of this root's downloads use at once (16 by
    /// default): a blob split over connections ([`Self::split`]) takes
    /// what the lower layers leave, and gives a connection back between
    /// two chunks when a lower layer waits for one.
    pub max_connections: usize,
    /// How a large blob is fetched over several connections at once.
    pub split: crate::pipeline::fetch::Split,
    /// How interrupted or refused downloads are retried.
    pub retry: Retry,
    /// The backend and number of worker threads that write files: one
    /// pool for the root, shared by every layer it applies at once.
    pub backend: BackendOptions,
}

impl Default for RootOptions {
    fn default() -> Self {
        RootOptions {
            durability: Durability::None,
            decode: DecodeOptions::default(),
            // The writers' default count (ARCHITECTURE.md, "Threads").
            parallel_layers: crate::layer::fsops::pool::default_threads().clamp(2, 8),
            max_downloads: 3,
            max_connections: 16,
            split: crate::pipeline::fetch::Split::default(),
            retry: Retry::default(),
            backend: BackendOptions::default(),
        }
    }
}

pub use metrics::{Stats, StatsSnapshot};

/// The parts of an open root that the pipeline works with: the stores,
/// the flights and limits of this process, and its options. The public
/// face is [`crate::Root`], which owns one [`Context`] and hands it to the
/// pipeline's operations.
pub(crate) struct Parts {
    pub(crate) dir: PathBuf,
    pub(crate) content: ContentStore,
    pub(crate) snapshots: Snapshotter,
    pub(crate) images: ImageStore,
    pub(crate) locks: OwnedFd,
    pub(crate) flights: Flights<(), Arc<RootError>>,
    /// Concurrent pulls of one reference share one resolution (and its
    /// registry client, documents and token).
    pub(crate) resolves: Flights<pull::Resolved, Arc<RootError>>,
    pub(crate) opts: RootOptions,
    pub(crate) stats: Stats,
    pub(crate) permits: Permits,
    pub(crate) downloads: Permits,
    /// The connections of all downloads ([`RootOptions::max_connections`]).
    pub(crate) connections: Permits,
    /// The writers' pool, started by the first apply.
    pool: std::sync::OnceLock<Arc<Pool>>,
    gc_lock_path: PathBuf,
}

/// A shared handle on [`Parts`]: cheap to clone into the threads of an
/// unpack.
#[derive(Clone)]
pub(crate) struct Context(pub(crate) Arc<Parts>);

/// The shared side of `ROOT/gc.lock`, held by operations that create what
/// gc would otherwise see as unreferenced (a snapshot committed before its
/// image record is written).
pub(crate) struct GcGuard {
    _fd: OwnedFd,
}

impl Context {
    /// The parts themselves.
    pub(crate) fn parts(&self) -> &Parts {
        &self.0
    }

    /// Opens (creating) the stores of the root at `dir`.
    pub(crate) fn open(dir: &Path, opts: RootOptions) -> Result<Context, RootError> {
        crate::store::statedir::open_root(dir).map_err(|source| RootError::OpenRoot {
            path: dir.to_path_buf(),
            source,
        })?;
        let content = ContentStore::open(dir, opts.durability != Durability::None)?;
        let snapshots = Snapshotter::open(dir)?;
        let images = ImageStore::open(dir)?;
        let locks_dir = dir.join("locks");
        let locks =
            crate::store::statedir::open_dir(&locks_dir).map_err(|source| RootError::Lock {
                path: locks_dir,
                source,
            })?;
        Ok(Context(Arc::new(Parts {
            dir: dir.to_path_buf(),
            content,
            snapshots,
            images,
            locks,
            flights: Flights::new(),
            resolves: Flights::new(),
            permits: Permits::new(opts.parallel_layers),
            downloads: Permits::new(opts.max_downloads),
            connections: Permits::new(opts.max_connections),
            opts,
            stats: Stats::default(),
            pool: std::sync::OnceLock::new(),
            gc_lock_path: dir.join("gc.lock"),
        })))
    }

    /// The root's worker pool, started on first use. Two applies starting
    /// at once may both start one; only the first is kept.
    pub(crate) fn pool(&self) -> Result<Arc<Pool>, RootError> {
        if let Some(p) = self.0.pool.get() {
            return Ok(p.clone());
        }
        let kind = self.0.opts.backend.kind;
        // Snapshots are made below the root: its file system decides
        // what `auto` takes.
        let p = Pool::new_for(self.0.opts.backend, &self.0.dir)
            .map_err(|source| RootError::Backend { kind, source })?;
        Ok(self.0.pool.get_or_init(|| p).clone())
    }

    /// What this process did so far.
    pub(crate) fn stats(&self) -> StatsSnapshot {
        self.0.stats.snapshot()
    }

    /// Takes `ROOT/gc.lock`: exclusive for gc, shared for whatever creates
    /// something gc must not see half-made.
    pub(crate) fn gc_lock(&self, exclusive: bool, cancel: &Cancel) -> Result<GcGuard, RootError> {
        let path = &self.0.gc_lock_path;
        let fd = rfs::open(
            path,
            OFlags::RDWR | OFlags::CREATE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| RootError::lock(path.clone(), LockError::Io(e.into())))?;
        let fd = crate::store::lock::flock_wait(fd, exclusive, cancel)
            .map_err(|e| RootError::lock(path.clone(), e))?;
        Ok(GcGuard { _fd: fd })
    }

    /// Takes the lock file `name` of a flight.
    pub(crate) fn file_lock(&self, name: &str, cancel: &Cancel) -> Result<FileLock, RootError> {
        FileLock::acquire(&self.0.locks, name, cancel)
            .map_err(|e| RootError::lock(self.0.dir.join("locks").join(name), e))
    }
}
