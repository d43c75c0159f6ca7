//! An unlade root: the content store, the snapshotter, the image records
//! and the locks that let several processes share them. [`Root`] is what a
//! runtime embeds: open it once, share it between threads (it is a cheap
//! `Clone` over an `Arc`), and call [`Root::unpack`], [`Root::mounts`],
//! [`Root::prepare_rw`], [`Root::gc`] from wherever it likes.
//!
//! Every operation is blocking and cancellable through a [`Cancel`]
//! token; from async code run it with `spawn_blocking` and trip the token
//! when the request goes away. Layout of the root:
//!
//! ```text
//! ROOT/content/     blobs by digest (content.rs)
//! ROOT/snapshots/   active, committed (by chain ID), rw, l (short links), trash (snapshot.rs)
//! ROOT/images/      image records (images.rs)
//! ROOT/locks/       one lock file per flight key (flight.rs)
//! ROOT/gc.lock      shared by operations that create things, exclusive for gc
//! ```

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rustix::fs::{self as rfs, Mode, OFlags};

use crate::cancel::Cancel;
use crate::content::{ContentError, ContentStore};
use crate::decode::DecodeOptions;
use crate::digest::Digest;
use crate::flight::{FileLock, Flights, LockError};
use crate::image::ImageError;
use crate::images::{ImageRecord, ImageStore, ImagesError};
use crate::snapshot::{Mount, SnapshotError, Snapshotter};
use crate::task::Task;

/// Why a root operation failed. Displays as one line naming the layer,
/// blob or snapshot concerned.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// Resolving the image (index, manifest, config) failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The content store failed (including a blob that does not match its
    /// digest).
    #[error(transparent)]
    Content(#[from] ContentError),
    /// The snapshotter failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The image records failed.
    #[error(transparent)]
    Images(#[from] ImagesError),
    /// Applying a layer failed; the error names the layer, entry, offset.
    #[error(transparent)]
    Apply(#[from] crate::Error),
    /// A layer's blob is neither in the content store nor in the source.
    #[error("layer {digest}: blob not found in {place}{hint}")]
    MissingBlob {
        /// The blob.
        digest: Digest,
        /// Where it was looked for.
        place: String,
        /// More for foreign layers.
        hint: &'static str,
    },
    /// Fetching a blob from its source failed (after retries).
    #[error(transparent)]
    Fetch(#[from] crate::fetch::FetchError),
    /// Taking a lock file failed.
    #[error("lock {path}: {source}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An environment failure (I/O, space, locks) while working on one
    /// layer.
    #[error("layer {digest}: {source}")]
    Layer {
        /// The layer's blob.
        digest: Digest,
        /// What failed.
        #[source]
        source: Box<UnpackError>,
    },
    /// Another operation failed; this one adopted its outcome (the same
    /// blob, which would fail the same way).
    #[error(transparent)]
    Shared(Arc<UnpackError>),
    /// The system refused a thread the work needs (a memory or task
    /// limit): nothing half-done is committed.
    #[error("start a thread to {what}: {source}")]
    Thread {
        /// What the thread was for.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The caller's token was cancelled.
    #[error("cancelled")]
    Cancelled,
}

impl UnpackError {
    /// The blob whose content caused this error, if the error is about
    /// content (corrupt data, digest or diff ID mismatch, a malformed or
    /// hostile archive) rather than the environment (I/O, space,
    /// cancellation). Anyone applying the same blob would fail the same
    /// way, so flight waiters adopt such an error instead of retrying.
    pub fn content_fault(&self) -> Option<Digest> {
        use crate::ErrorKind as K;
        match self {
            UnpackError::Content(ContentError::DigestMismatch { expected, .. }) => Some(*expected),
            UnpackError::Content(ContentError::TooLarge { digest, .. }) => Some(*digest),
            UnpackError::Apply(e) => match e.kind {
                K::Fs { .. }
                | K::Cancelled
                | K::Invalid(_)
                | K::Decode(crate::error::DecodeError::Io(_)) => None,
                _ => e.layer.parse().ok(),
            },
            UnpackError::Fetch(crate::fetch::FetchError::Content(
                ContentError::DigestMismatch { expected: d, .. }
                | ContentError::TooLarge { digest: d, .. },
            )) => Some(*d),
            UnpackError::Shared(e) => e.content_fault(),
            UnpackError::Layer { source, .. } => source.content_fault(),
            _ => None,
        }
    }

    pub(crate) fn lock(path: PathBuf, e: LockError) -> UnpackError {
        match e {
            LockError::Cancelled => UnpackError::Cancelled,
            LockError::Io(source) => UnpackError::Lock { path, source },
        }
    }
}

/// How a root works.
#[derive(Debug, Clone)]
pub struct RootOptions {
    /// Whether and how blobs, snapshots and records are made durable
    /// before they become visible (README, "Durability").
    pub durability: crate::durable::Durability,
    /// How layers are decoded.
    pub decode: DecodeOptions,
    /// Most layers applied at the same time by this root, however many
    /// unpacks run (waiting for another's result takes none).
    pub parallel_layers: usize,
    /// Most blobs downloaded at the same time by this root (containerd's
    /// `max_concurrent_downloads`, 3 by default); lower layers first.
    pub max_downloads: usize,
    /// How interrupted or refused downloads are retried.
    pub retry: crate::fetch::Retry,
}

impl Default for RootOptions {
    fn default() -> Self {
        RootOptions {
            durability: crate::durable::Durability::None,
            decode: DecodeOptions::default(),
            parallel_layers: std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .clamp(2, 8),
            max_downloads: 3,
            retry: crate::fetch::Retry::default(),
        }
    }
}

/// Counters of the work a root did in this process: what the tests of
/// duplicate suppression count.
#[derive(Debug, Default)]
pub struct Stats {
    /// Layers applied into a snapshot (by this process).
    pub layers_applied: AtomicU64,
    /// Layer blobs copied into the content store (by this process).
    pub blobs_ingested: AtomicU64,
}

/// A copy of [`Stats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// See [`Stats::layers_applied`].
    pub layers_applied: u64,
    /// See [`Stats::blobs_ingested`].
    pub blobs_ingested: u64,
}

pub(crate) struct Inner {
    pub(crate) dir: PathBuf,
    pub(crate) content: ContentStore,
    pub(crate) snapshots: Snapshotter,
    pub(crate) images: ImageStore,
    pub(crate) locks: OwnedFd,
    pub(crate) flights: Flights<(), Arc<UnpackError>>,
    /// Concurrent pulls of one reference share one resolution (and its
    /// registry client, documents and token).
    pub(crate) resolves: Flights<crate::pull::Resolved, Arc<UnpackError>>,
    pub(crate) opts: RootOptions,
    pub(crate) stats: Stats,
    pub(crate) permits: crate::unpack::Permits,
    pub(crate) downloads: crate::fetch::Slots,
    gc_lock_path: PathBuf,
}

/// An open unlade root. Clones share everything, flights included.
#[derive(Clone)]
pub struct Root(pub(crate) Arc<Inner>);

impl std::fmt::Debug for Root {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Root").field("dir", &self.0.dir).finish()
    }
}

/// The shared side of `ROOT/gc.lock`, held by operations that create what
/// gc would otherwise see as unreferenced (a snapshot committed before its
/// image record is written).
pub(crate) struct GcGuard {
    _fd: OwnedFd,
}

impl Root {
    /// Opens (creating) the root at `dir`, cleaning what crashed processes
    /// left behind (unheld active snapshots, trash, stale ingest files).
    pub fn open(dir: &Path, opts: RootOptions) -> Result<Root, UnpackError> {
        let content = ContentStore::open(dir, opts.durability != crate::durable::Durability::None)?;
        let snapshots = Snapshotter::open(dir)?;
        let images = ImageStore::open(dir)?;
        let locks_dir = dir.join("locks");
        let locks = crate::statedir::open_dir(&locks_dir).map_err(|source| UnpackError::Lock {
            path: locks_dir,
            source,
        })?;
        Ok(Root(Arc::new(Inner {
            dir: dir.to_path_buf(),
            content,
            snapshots,
            images,
            locks,
            flights: Flights::new(),
            resolves: Flights::new(),
            permits: crate::unpack::Permits::new(opts.parallel_layers),
            downloads: crate::fetch::Slots::new(opts.max_downloads),
            opts,
            stats: Stats::default(),
            gc_lock_path: dir.join("gc.lock"),
        })))
    }

    /// The root directory.
    pub fn dir(&self) -> &Path {
        &self.0.dir
    }

    /// The content store.
    pub fn content(&self) -> &ContentStore {
        &self.0.content
    }

    /// The snapshotter.
    pub fn snapshots(&self) -> &Snapshotter {
        &self.0.snapshots
    }

    /// The image records.
    pub fn images(&self) -> &ImageStore {
        &self.0.images
    }

    /// What this process did so far.
    pub fn stats(&self) -> StatsSnapshot {
        StatsSnapshot {
            layers_applied: self.0.stats.layers_applied.load(Ordering::Relaxed),
            blobs_ingested: self.0.stats.blobs_ingested.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn gc_lock(&self, exclusive: bool, cancel: &Cancel) -> Result<GcGuard, UnpackError> {
        let path = &self.0.gc_lock_path;
        let err = |e: std::io::Error| UnpackError::Lock {
            path: path.clone(),
            source: e,
        };
        let fd = rfs::open(
            path,
            OFlags::RDWR | OFlags::CREATE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| err(e.into()))?;
        let fd = crate::flight::flock_wait(fd, exclusive, cancel)
            .map_err(|e| UnpackError::lock(path.clone(), e))?;
        Ok(GcGuard { _fd: fd })
    }

    pub(crate) fn file_lock(&self, name: &str, cancel: &Cancel) -> Result<FileLock, UnpackError> {
        FileLock::acquire(&self.0.locks, name, cancel)
            .map_err(|e| UnpackError::lock(self.0.dir.join("locks").join(name), e))
    }

    /// How to mount committed snapshot `chain` read-only (see
    /// [`Snapshotter::mounts`]: the mount of a chain of more than about 35
    /// layers is relative to [`Mount::cwd`]). Holds `gc.lock` shared while
    /// it makes the short links such a mount names, so that gc, which
    /// removes the links of snapshots that are gone, never runs beside.
    pub fn mounts(&self, chain: &Digest) -> Result<Mount, UnpackError> {
        let _gc = self.gc_lock(false, &Cancel::new())?;
        Ok(self.0.snapshots.mounts(chain)?)
    }

    /// Removes committed snapshot `chain`, which no other snapshot may
    /// stack on, with its short links (holding `gc.lock` shared, as link
    /// removal requires).
    pub fn remove_snapshot(&self, chain: &Digest) -> Result<(), UnpackError> {
        let _gc = self.gc_lock(false, &Cancel::new())?;
        Ok(self.0.snapshots.remove(chain)?)
    }

    /// Creates writable snapshot `key` on top of committed snapshot
    /// `parent` (a container's rootfs) and says how to mount it. It stays
    /// until [`Root::remove_rw`], and keeps its parents from gc.
    pub fn prepare_rw(
        &self,
        key: &str,
        parent: Option<&Digest>,
        cancel: &Cancel,
    ) -> Result<Mount, UnpackError> {
        let _gc = self.gc_lock(false, cancel)?;
        Ok(self.0.snapshots.create_rw(key, parent)?)
    }

    /// Removes writable snapshot `key` (unmount it first).
    pub fn remove_rw(&self, key: &str) -> Result<(), UnpackError> {
        Ok(self.0.snapshots.remove_rw(key)?)
    }

    /// [`Root::unpack`] on its own thread: a [`Task`] to `.await` or
    /// [`Task::wait`] for; dropping it cancels the unpack.
    pub fn unpack_task(
        &self,
        source: Arc<dyn crate::unpack::BlobSource>,
        image: crate::image::Image,
        name: String,
    ) -> Task<Result<crate::unpack::Unpacked, UnpackError>> {
        let root = self.clone();
        crate::task::spawn(move |cancel| root.unpack(source, &image, &name, cancel))
    }

    /// [`Root::gc`] on its own thread, as a [`Task`].
    pub fn gc_task(&self) -> Task<Result<crate::gc::GcReport, UnpackError>> {
        let root = self.clone();
        crate::task::spawn(move |cancel| root.gc(cancel))
    }

    /// Image records, sorted by name.
    pub fn list_images(&self) -> Result<Vec<ImageRecord>, UnpackError> {
        Ok(self.0.images.list()?)
    }

    /// Forgets image `name`; [`Root::gc`] then removes what only it used.
    pub fn remove_image(&self, name: &str) -> Result<(), UnpackError> {
        Ok(self.0.images.remove(name)?)
    }
}
