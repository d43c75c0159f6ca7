//! The error of every root operation.

use std::path::PathBuf;
use std::sync::Arc;

use crate::oci::digest::Digest;
use crate::oci::image::ImageError;
use crate::store::content::ContentError;
use crate::store::images::ImagesError;
use crate::store::lock::LockError;
use crate::store::snapshot::SnapshotError;

/// Why a root operation failed. Its chain (see
/// [`crate::report::error_chain`]) reads as one line naming the layer,
/// blob or snapshot concerned, then what failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
        /// The layer's blob digest, as the manifest lists it.
        digest: Digest,
        /// The source looked in, as it describes itself (e.g. "the
        /// layout /x", "registry r/x").
        place: String,
        /// Empty, or advice for a foreign (non-distributable) layer, which
        /// registries need not serve.
        hint: &'static str,
    },
    /// Fetching a blob from its source failed (after retries).
    #[error(transparent)]
    Fetch(#[from] crate::pipeline::fetch::FetchError),
    /// [`crate::pipeline::pull::PullOptions::require_chain`]: the image
    /// has no layer of that chain.
    #[error("image {reference} has no layer of chain {chain}")]
    NotInImage {
        /// The image reference pulled.
        reference: String,
        /// The chain asked for.
        chain: Digest,
    },
    /// Creating or opening the root directory itself failed.
    #[error("open the root {}", path.display())]
    OpenRoot {
        /// The root directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Taking a lock file failed.
    #[error("lock {path}")]
    Lock {
        /// The lock file, under the root's `locks/` (or `gc.lock`).
        path: PathBuf,
        /// Why opening or locking it failed.
        source: std::io::Error,
    },
    /// An environment failure (I/O, space, locks) while working on one
    /// layer.
    #[error("layer {digest}")]
    Layer {
        /// The digest of the layer's blob.
        digest: Digest,
        /// What failed while working on it.
        #[source]
        source: Box<RootError>,
    },
    /// Another operation failed; this one adopted its outcome (the same
    /// blob, which would fail the same way).
    #[error(transparent)]
    Shared(Arc<RootError>),
    /// The system refused a thread the work needs (a memory or task
    /// limit): nothing half-done is committed.
    #[error("start a thread to {what}")]
    Thread {
        /// What the thread was for.
        what: &'static str,
        /// Why the system refused it (`EAGAIN`: a limit reached).
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
    /// The worker pool that writes files could not start (`--backend
    /// uring` where the kernel refuses io_uring, or no threads).
    #[error("start the {kind} backend")]
    Backend {
        /// The backend asked for.
        kind: crate::layer::fsops::BackendKind,
        /// Why it did not start.
        #[source]
        source: std::io::Error,
    },
}

impl RootError {
    /// The source's failure this error comes from, if it does (a
    /// registry that refused, stalled or was not found), wherever it is
    /// in the chain: the callers that decide what to do next (the
    /// containerd snapshotter: answer unavailable for a stalled
    /// registry) look at its kind.
    pub fn source_error(&self) -> Option<&crate::source::SourceError> {
        use crate::layer::error::ErrorKind as K;
        match self {
            RootError::Source(e) => Some(e),
            RootError::Fetch(crate::pipeline::fetch::FetchError::Source { source, .. }) => {
                Some(source)
            }
            RootError::Layer { source, .. } => source.source_error(),
            RootError::Shared(e) => e.source_error(),
            RootError::Apply(e) => match &*e.kind {
                K::Lower { source, .. } => source
                    .downcast_ref::<RootError>()
                    .and_then(RootError::source_error),
                _ => None,
            },
            _ => None,
        }
    }

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
            RootError::Apply(e) => match &*e.kind {
                // A lower layer's failure: its own fault, if any.
                K::Lower { source, .. } => source
                    .downcast_ref::<RootError>()
                    .and_then(RootError::content_fault),
                K::Fs { .. }
                | K::Cancelled
                | K::Invalid(_)
                | K::Decode(crate::layer::error::DecodeError::Io(_)) => None,
                _ => e.digest,
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

    /// What kind of failure this is, as one word for a metric's label or
    /// a log field (never the message, whose digests and paths would make
    /// a label per failure): the registry's answer where one caused it
    /// (`not_found`, `denied`, `unavailable`, `stalled`, `source`), else
    /// `content` (a blob or layer that is wrong), `image` (its documents),
    /// `cancelled`, or `local` (this machine: files, locks, threads).
    pub fn kind(&self) -> &'static str {
        use crate::source::{SourceError, SourceErrorKind as S};
        let source = |e: &SourceError| match e.kind {
            S::NotFound => "not_found",
            S::Denied => "denied",
            S::Transient => "unavailable",
            S::Stalled => "stalled",
            S::Fatal => "source",
        };
        match self {
            RootError::Source(e)
            | RootError::Fetch(crate::pipeline::fetch::FetchError::Source { source: e, .. }) => {
                source(e)
            }
            RootError::Shared(e) => e.kind(),
            RootError::Layer { source, .. } => source.kind(),
            RootError::MissingBlob { .. } => "not_found",
            RootError::Cancelled => "cancelled",
            _ if self.content_fault().is_some() => "content",
            _ => {
                // A registry error further down (a document's fetch).
                let mut e = std::error::Error::source(self);
                while let Some(x) = e {
                    if let Some(s) = x.downcast_ref::<SourceError>() {
                        return source(s);
                    }
                    e = x.source();
                }
                match self {
                    RootError::Image(_) | RootError::NotInImage { .. } => "image",
                    _ => "local",
                }
            }
        }
    }

    pub(crate) fn lock(path: PathBuf, e: LockError) -> RootError {
        match e {
            LockError::Cancelled => RootError::Cancelled,
            LockError::Io(source) => RootError::Lock { path, source },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::error::{ApplyError, ErrorKind};

    #[test]
    fn content_fault_is_typed_and_sees_through_lower_layers() {
        let d = Digest::of(b"layer");
        let corrupt = || ApplyError::new(ErrorKind::Truncated("x".into())).at(None, 0);
        assert_eq!(RootError::Apply(corrupt().blob(d)).content_fault(), Some(d));
        // Named otherwise (a file), no blob is at fault.
        assert_eq!(
            RootError::Apply(corrupt().layer("x.tar")).content_fault(),
            None
        );
        let io = ApplyError::fs("create file", std::io::Error::other("full")).blob(d);
        assert_eq!(RootError::Apply(io).content_fault(), None);
        // A lower layer's fault is that layer's blob's.
        let below = Digest::of(b"below");
        let lower = ApplyError::new(ErrorKind::Lower {
            op: "wait for the layers below",
            source: Box::new(RootError::Apply(corrupt().blob(below))),
        })
        .blob(d);
        let e = RootError::Apply(lower);
        assert_eq!(e.content_fault(), Some(below));
        assert_eq!(
            crate::report::error_chain(&e),
            format!(
                "layer {d}: wait for the layers below: layer {below}: at offset 0: \
                 truncated layer: x"
            )
        );
    }
}
