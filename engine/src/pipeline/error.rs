//! The error of every root operation.

use std::path::PathBuf;
use std::sync::Arc;

use crate::oci::digest::Digest;
use crate::oci::image::ImageError;
use crate::store::content::ContentError;
use crate::store::images::ImagesError;
use crate::store::lock::LockError;
use crate::store::snapshot::SnapshotError;

/// Why a root operation failed. Displays as one line naming the layer,
/// blob or snapshot concerned.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// Resolving the image (index, manifest, config) failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A source (a registry) could not deliver what was asked: resolving
    /// a reference, connecting.
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
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
    Apply(#[from] crate::layer::error::ApplyError),
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
    Fetch(#[from] crate::pipeline::fetch::FetchError),
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
        source: Box<RootError>,
    },
    /// Another operation failed; this one adopted its outcome (the same
    /// blob, which would fail the same way).
    #[error(transparent)]
    Shared(Arc<RootError>),
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
    /// [`crate::root::Root::open_existing`]: `path` is not a root (it
    /// holds none of `content/`, `snapshots/`, `images/`).
    #[error("no unlade root at {}", path.display())]
    NoRoot {
        /// The directory asked for.
        path: PathBuf,
    },
}

impl RootError {
    /// The blob whose content caused this error, if the error is about
    /// content (corrupt data, digest or diff ID mismatch, a malformed or
    /// hostile archive) rather than the environment (I/O, space,
    /// cancellation). Anyone applying the same blob would fail the same
    /// way, so flight waiters adopt such an error instead of retrying.
    pub fn content_fault(&self) -> Option<Digest> {
        use crate::layer::error::ErrorKind as K;
        match self {
            RootError::Content(ContentError::DigestMismatch { expected, .. }) => Some(*expected),
            RootError::Content(ContentError::TooLarge { digest, .. }) => Some(*digest),
            RootError::Apply(e) => match e.kind {
                K::Fs { .. }
                | K::Cancelled
                | K::Invalid(_)
                | K::Decode(crate::layer::error::DecodeError::Io(_)) => None,
                _ => e.layer.parse().ok(),
            },
            RootError::Fetch(crate::pipeline::fetch::FetchError::Content(
                ContentError::DigestMismatch { expected: d, .. }
                | ContentError::TooLarge { digest: d, .. },
            )) => Some(*d),
            RootError::Shared(e) => e.content_fault(),
            RootError::Layer { source, .. } => source.content_fault(),
            _ => None,
        }
    }

    pub(crate) fn lock(path: PathBuf, e: LockError) -> RootError {
        match e {
            LockError::Cancelled => RootError::Cancelled,
            LockError::Io(source) => RootError::Lock { path, source },
        }
    }
}
