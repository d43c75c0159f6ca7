//! `pull`: a registry reference → committed snapshots, by the same
//! pipeline as `unpack`, with layers downloaded into the content store
//! while they are applied.
//!
//! Resolution (tag → digest → index → platform manifest → config) reads
//! small documents; then [`Root::unpack_observed`] runs with the registry
//! as the blob source: committed chain IDs are skipped without a request,
//! blobs in the content store are not fetched, each missing blob is
//! downloaded once (flight `Blob(digest)`, across processes by its lock
//! file) while the layer decodes from the growing file, and nothing
//! commits before both the blob digest and the diff ID hold.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cancel::Cancel;
use crate::oci::digest::Digest;
use crate::oci::image::{Image, Platform};
use crate::oci::reference::Reference;
use crate::pipeline::error::RootError;
use crate::pipeline::flight::Key;
use crate::pipeline::unpack::{Progress, Unpacked};
use crate::pipeline::Context;
use crate::source::remote::{Remote, RemoteBlobs, RemoteOptions};

/// How to pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Registry access: plain HTTP, hosts.toml directory, credentials.
    pub remote: RemoteOptions,
    /// The platform to pick from an index (`None`: the host's).
    pub platform: Option<Platform>,
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The image record's name (the normalized reference).
    pub name: String,
    /// The digest the reference resolved to (index or manifest).
    pub resolved: Digest,
    /// The image as resolved for the platform.
    pub image: Image,
    /// What the unpack did.
    pub unpacked: Unpacked,
    /// HTTP requests sent.
    pub requests: u64,
    /// Blob bytes downloaded.
    pub bytes_fetched: u64,
    /// Time to resolve the reference to an image (documents included).
    pub resolve_time: Duration,
    /// Time to download and unpack the layers.
    pub unpack_time: Duration,
}

/// A reference resolved to an image, with the client that did it (its
/// documents and token serve the downloads too).
#[derive(Clone)]
pub(crate) struct Resolved {
    digest: Digest,
    image: Image,
    remote: Arc<Remote>,
    took: Duration,
}

impl Context {
    /// Pulls `reference` from its registry into committed snapshots and
    /// records it under its normalized name. Safe beside other pulls and
    /// unpacks of the same or overlapping images, in this process and
    /// others: each blob is downloaded once and each layer applied once;
    /// concurrent pulls of one reference in this process also share one
    /// resolution (so `requests` and `bytes_fetched` count that shared
    /// client's work).
    pub(crate) fn pull(
        &self,
        reference: &Reference,
        opts: &PullOptions,
        progress: Option<Arc<dyn Progress>>,
        cancel: &Cancel,
    ) -> Result<Pulled, RootError> {
        let key = Key::Resolve(Digest::of(
            format!(
                "{reference}\n{:?}\n{:?}\n{:?}\n{}",
                opts.platform,
                opts.remote.hosts_dir,
                opts.remote.docker_config,
                opts.remote.plain_http
            )
            .as_bytes(),
        ));
        let adopt = |e: &Arc<RootError>| !crate::pipeline::unpack::is_cancel(e);
        let r = self.0.resolves.run(key, cancel, adopt, || {
            self.resolve(reference, opts, cancel).map_err(Arc::new)
        });
        let (res, _) =
            crate::pipeline::unpack::flown(r).map_err(crate::pipeline::unpack::unshare)?;
        let t1 = Instant::now();
        let name = reference.to_string();
        let unpacked = self.unpack_observed(
            Arc::new(RemoteBlobs(res.remote.clone())),
            &res.image,
            &name,
            progress,
            cancel,
        )?;
        let stats = &res.remote.stats;
        Ok(Pulled {
            name,
            resolved: res.digest,
            image: res.image,
            unpacked,
            requests: stats.requests.load(std::sync::atomic::Ordering::Relaxed),
            bytes_fetched: stats.blob_bytes.load(std::sync::atomic::Ordering::Relaxed),
            resolve_time: res.took,
            unpack_time: t1.elapsed(),
        })
    }

    /// Reference → image: the registry client, the tag's digest, the
    /// platform's manifest and config.
    fn resolve(
        &self,
        reference: &Reference,
        opts: &PullOptions,
        cancel: &Cancel,
    ) -> Result<Resolved, RootError> {
        let t0 = Instant::now();
        let remote = Arc::new(Remote::new(reference, &opts.remote)?);
        let (digest, media_type) = remote.resolve(cancel).map_err(|mut e| {
            e.message = format!("resolve {reference}: {}", e.message);
            RootError::Source(e)
        })?;
        let docs = StoreFirst {
            root: self,
            remote: &remote,
        };
        let image =
            crate::oci::image::resolve_from(&docs, &digest, &media_type, opts.platform.as_ref())?;
        Ok(Resolved {
            digest,
            image,
            remote,
            took: t0.elapsed(),
        })
    }
}

/// Documents from the content store when it has them (an earlier pull
/// verified them), else from the registry.
struct StoreFirst<'a> {
    root: &'a Context,
    remote: &'a Remote,
}

impl crate::oci::image::Documents for StoreFirst<'_> {
    fn document(&self, d: &Digest, config: bool) -> Result<Vec<u8>, crate::oci::image::ImageError> {
        use std::io::Read;
        if let Ok(Some(f)) = self.root.0.content.open_blob(d) {
            let mut buf = Vec::new();
            if f.take(crate::oci::image::MAX_JSON + 1)
                .read_to_end(&mut buf)
                .is_ok()
                && buf.len() as u64 <= crate::oci::image::MAX_JSON
            {
                return Ok(buf);
            }
        }
        self.remote.document(d, config)
    }
}
