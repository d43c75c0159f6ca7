//! `pull`: a registry reference → committed snapshots, by the same
//! pipeline as `unpack`, with layers downloaded into the content store
//! while they are applied.
//!
//! Resolution (tag → digest → index → platform manifest → config) reads
//! small documents; then [`Root::unpack_observed`](crate::Root::unpack_observed) runs with the registry
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
    /// The image record's name (`None`: the normalized reference). The
    /// containerd snapshotter records its pulls apart from the user's.
    pub record_as: Option<String>,
    /// A layer chain the image must have: checked once the image is
    /// resolved, before anything is fetched or applied
    /// ([`RootError::NotInImage`] otherwise). The containerd snapshotter's
    /// fast path pulls an image for one layer a label names; an image
    /// that lacks it is not pulled at all.
    pub require_chain: Option<Digest>,
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The image record's name (the normalized reference, or
    /// [`PullOptions::record_as`]).
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

impl Pulled {
    /// Seconds per layer stage, summed over the layers this pull did.
    fn stages_json(&self) -> serde_json::Value {
        use crate::pipeline::metrics::Stage;
        Stage::ALL
            .iter()
            .map(|s| {
                (
                    s.name().to_string(),
                    serde_json::json!(self.unpacked.stages.get(*s).as_secs_f64()),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    /// The pull as one JSON object, what `unlade pull --json` prints and
    /// scripts parse: `name`, `resolved`, `manifest`, `config`,
    /// `platform`, `layers` (see [`Unpacked::layers_json`]), `top_chain`,
    /// `requests`, `bytes_fetched`, `layers_applied` and `blobs_fetched`
    /// (from `stats`, the root's counters after the pull: what this
    /// process applied and fetched) and `seconds` (`resolve`,
    /// `fetch_and_unpack`, `total`, the caller's wall time, which
    /// includes opening the root, and `layer_stages`: `fetch`, `decode`,
    /// `apply` and `commit` summed over the layers this pull did, which
    /// overlap in time). In the library so that the keys are
    /// defined once, next to the fields they report.
    pub fn summary_json(
        &self,
        stats: crate::pipeline::StatsSnapshot,
        total: Duration,
    ) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "resolved": self.resolved,
            "manifest": self.image.manifest,
            "config": self.image.config,
            "platform": self.image.platform.to_string(),
            "layers": self.unpacked.layers_json(&self.image),
            "top_chain": self.unpacked.top_chain,
            "requests": self.requests,
            "bytes_fetched": self.bytes_fetched,
            "layers_applied": stats.layers_applied,
            "blobs_fetched": stats.blobs_ingested,
            "seconds": {
                "resolve": self.resolve_time.as_secs_f64(),
                "fetch_and_unpack": self.unpack_time.as_secs_f64(),
                "total": total.as_secs_f64(),
                "layer_stages": self.stages_json(),
            },
        })
    }
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
    /// The work of [`Root::pull`](crate::Root::pull): one resolution per
    /// reference in flight, then the unpack with the registry as source.
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
        if let Some(chain) = opts.require_chain {
            if !res.image.layers.iter().any(|l| l.chain_id == chain) {
                return Err(RootError::NotInImage {
                    reference: reference.to_string(),
                    chain,
                });
            }
        }
        let t1 = Instant::now();
        let name = opts
            .record_as
            .clone()
            .unwrap_or_else(|| reference.to_string());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::image::{Layer, LayerKind};
    use crate::pipeline::flight::Role;

    #[test]
    fn summary_json_names_every_layer_and_who_did_it() {
        let layer = |n: &[u8]| Layer {
            digest: Digest::of(n),
            size: n.len() as u64,
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            kind: LayerKind::Regular,
            diff_id: Digest::of(n),
            chain_id: Digest::of(&[n, b"-chain"].concat()),
        };
        let layers = vec![layer(b"a"), layer(b"b"), layer(b"c")];
        let chains: Vec<Digest> = layers.iter().map(|l| l.chain_id).collect();
        let p = Pulled {
            name: "reg/x:1".into(),
            resolved: Digest::of(b"index"),
            image: Image {
                manifest: Digest::of(b"manifest"),
                config: Digest::of(b"config"),
                platform: Platform::parse("linux/arm64/v8").unwrap(),
                layers,
            },
            unpacked: Unpacked {
                top_chain: Some(chains[2]),
                chain_ids: chains.clone(),
                already: 1,
                roles: vec![(chains[1], Role::Waited), (chains[2], Role::TookOver)],
                warnings: vec![],
                stages: {
                    let mut t = crate::pipeline::metrics::StageTimes::default();
                    t.add(
                        crate::pipeline::metrics::Stage::Apply,
                        Duration::from_millis(1500),
                    );
                    t
                },
            },
            requests: 7,
            bytes_fetched: 42,
            resolve_time: Duration::from_millis(250),
            unpack_time: Duration::from_secs(2),
        };
        let stats = crate::pipeline::StatsSnapshot {
            layers_applied: 1,
            blobs_ingested: 2,
        };
        let j = p.summary_json(stats, Duration::from_secs(3));
        assert_eq!(j["name"], "reg/x:1");
        assert_eq!(j["resolved"], Digest::of(b"index").to_string());
        assert_eq!(j["manifest"], Digest::of(b"manifest").to_string());
        assert_eq!(j["config"], Digest::of(b"config").to_string());
        assert_eq!(j["platform"], "linux/arm64/v8");
        assert_eq!(j["top_chain"], chains[2].to_string());
        assert_eq!(j["requests"], 7);
        assert_eq!(j["bytes_fetched"], 42);
        assert_eq!(j["layers_applied"], 1);
        assert_eq!(j["blobs_fetched"], 2);
        assert_eq!(j["seconds"]["resolve"], 0.25);
        assert_eq!(j["seconds"]["fetch_and_unpack"], 2.0);
        assert_eq!(j["seconds"]["total"], 3.0);
        assert_eq!(j["seconds"]["layer_stages"]["apply"], 1.5);
        assert_eq!(j["seconds"]["layer_stages"]["fetch"], 0.0);
        let done: Vec<&str> = j["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["done"].as_str().unwrap())
            .collect();
        assert_eq!(done, ["present", "by another", "here"]);
        let l0 = &j["layers"][0];
        assert_eq!(l0["digest"], Digest::of(b"a").to_string());
        assert_eq!(l0["size"], 1);
        assert_eq!(l0["media_type"], "application/vnd.oci.image.layer.v1.tar");
        assert_eq!(l0["chain_id"], chains[0].to_string());
        // One line: what a script reads with `tail -2 | head -1`.
        assert!(!j.to_string().contains('\n'));
    }
}
