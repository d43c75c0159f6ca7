//! The fast path: what CRI's labels on a layer's Prepare ask for.
//!
//! With `disable_snapshot_annotations = false` (containerd 1.x's CRI), or
//! the proxy plugin's export `enable_remote_snapshot_annotations` (2.x),
//! containerd labels each layer's Prepare with the layer's chain ID
//! (`containerd.io/snapshot.ref`, which containerd sets on every unpack)
//! and with the image (`containerd.io/snapshot/cri.image-ref`,
//! `.../cri.manifest-digest`, `.../cri.layer-digest`). Given those, unlade
//! pulls the image itself with its own pipeline, commits containerd's
//! snapshot under the chain ID with the parent containerd gave, and
//! answers `AlreadyExists`; containerd then finds that snapshot by its
//! label and parent and adopts it, and never fetches or applies the layer.
//!
//! **Never worse than containerd.** When unlade cannot make the layer for
//! a reason of its own (credentials it lacks or that are refused, a
//! registry it cannot reach or that stalls, an unsupported media type, a
//! limit, a corrupt blob), the Prepare [falls back](Outcome::FallBack):
//! it goes on as a plain Prepare and returns mounts, and containerd
//! fetches and applies this layer and every one above it itself (its
//! unpacker fetches `layers[i:]` once a Prepare returns normally). The
//! snapshot is marked with the image, and so is the one containerd
//! commits from it, so that the layers above fall back at once instead of
//! trying the same pull again; the next pull of the image (once these are
//! gone) tries the fast path again. Layers adopted below stay adopted;
//! nothing half-done is committed.
//!
//! - [`adopt`]: the three blocking steps on the store (begin, pull,
//!   finish).
//! - [`pulls`]: the pulls, apart from the store's threads, shared and
//!   bounded.
//! - `FastPath`: the steps in order, one [`Outcome`] out.

pub mod adopt;
pub mod pulls;

use std::collections::BTreeMap;

use std::sync::Arc;

use crate::containerd::fair::FairPool;
use crate::containerd::store::{CtrError, CtrStore};
use crate::oci::digest::Digest;
use crate::oci::reference::Reference;
use crate::pipeline::pull::PullOptions;

pub use adopt::PullStats;
pub use pulls::{PullFailure, PullLimits};

/// The label containerd puts on every layer's Prepare: the chain ID.
pub const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// CRI's label: the image reference being pulled.
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// CRI's label: the manifest's digest.
pub const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// CRI's label: this layer's blob digest.
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";

/// A fast-path request: the chain to make and the image that has it.
#[derive(Debug, Clone)]
pub struct Ask {
    /// The label's value: the name containerd will look for.
    pub target: String,
    /// The same, parsed.
    pub chain: Digest,
    /// The image, pinned to the manifest containerd resolved when CRI said
    /// which.
    pub reference: Reference,
    /// The layer's blob, when CRI said which (for the log, and the blob
    /// hand-off, which checks it against the manifest).
    pub layer: Option<Digest>,
    /// The image's manifest, when CRI said which.
    pub manifest: Option<Digest>,
}

impl Ask {
    /// The request the labels make, if they make one: a chain ID and an
    /// image reference that parse. Anything else is containerd's ordinary
    /// unpack (ctr, or CRI with annotations off), which unlade serves as
    /// a plain snapshotter.
    pub fn of(labels: &BTreeMap<String, String>) -> Option<Ask> {
        let target = labels.get(SNAPSHOT_REF)?;
        let chain = target.parse::<Digest>().ok()?;
        let image = labels.get(CRI_IMAGE_REF)?;
        let pinned = match labels.get(CRI_MANIFEST_DIGEST) {
            Some(d) if !image.contains('@') && d.parse::<Digest>().is_ok() => {
                format!("{image}@{d}")
            }
            _ => image.clone(),
        };
        let reference = Reference::parse(&pinned)
            .or_else(|_| Reference::parse(image))
            .ok()?;
        Some(Ask {
            target: target.clone(),
            chain,
            reference,
            layer: labels.get(CRI_LAYER_DIGEST).and_then(|d| d.parse().ok()),
            manifest: labels.get(CRI_MANIFEST_DIGEST).and_then(|d| d.parse().ok()),
        })
    }

    /// The image, as the fallback marks name it.
    pub fn image(&self) -> String {
        self.reference.to_string()
    }
}

/// What the fast path did with a Prepare.
#[derive(Debug)]
pub enum Outcome {
    /// The layer's snapshot is there under containerd's name: containerd
    /// is answered `AlreadyExists` and adopts it. With what the pull did,
    /// for the one Prepare that started it.
    Adopted(Option<PullStats>),
    /// The name is taken by a snapshot the fast path did not make: a
    /// plain Prepare, which containerd's own unpack handles.
    NameTaken,
    /// The fast path cannot make this layer: a plain Prepare marked as
    /// fallen back (see the module docs), and containerd fetches and
    /// applies the layer and those above it.
    FallBack(FellBack),
}

/// Why a Prepare fell back to containerd: a word for metrics and log
/// fields, and the full line.
#[derive(Debug, Clone)]
pub struct FellBack {
    /// `pull_failed` (its [`Self::error`] says how), `deadline`,
    /// `shutdown`, `abandoned` (no Prepare waited), `below_fell_back`
    /// (a layer below this one fell back), or `unlade` (unlade's own
    /// files or holds).
    pub reason: &'static str,
    /// For `pull_failed`: [`crate::RootError::kind`] of the failure.
    pub error: Option<&'static str>,
    /// The whole reason, one line.
    pub why: String,
    /// Whether this Prepare's own pull fell back (the one a pull's
    /// fallback is counted for), not one it waited for with others.
    pub first: bool,
}

impl FellBack {
    /// Unlade's own trouble (its store, its holds).
    fn own(why: String) -> FellBack {
        FellBack {
            reason: "unlade",
            error: None,
            why,
            first: true,
        }
    }

    /// A pull's failure; `first`: this Prepare started the pull.
    fn pull(f: &PullFailure, first: bool) -> FellBack {
        let (reason, error) = match f {
            PullFailure::Failed(e) => ("pull_failed", Some(e.kind())),
            PullFailure::Deadline(_) => ("deadline", None),
            PullFailure::Shutdown => ("shutdown", None),
            PullFailure::Abandoned => ("abandoned", None),
        };
        FellBack {
            reason,
            error,
            why: f.to_string(),
            first,
        }
    }
}

impl std::fmt::Display for FellBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

/// The fast path of one server: its pulls, and the store's threads its
/// blocking steps run on (the same pool as every other call).
pub(crate) struct FastPath {
    store: Arc<CtrStore>,
    pool: FairPool,
    pulls: Arc<pulls::Pulls>,
}

impl FastPath {
    /// The fast path over `store`, pulling as `opts` says within
    /// `limits`; its steps run on `pool`.
    pub(crate) fn new(
        store: Arc<CtrStore>,
        pool: FairPool,
        opts: PullOptions,
        limits: PullLimits,
    ) -> FastPath {
        FastPath {
            pulls: pulls::Pulls::new(store.clone(), opts, limits),
            store,
            pool,
        }
    }

    /// Ends every pull (the server is stopping): their Prepares fall back
    /// at once.
    pub(crate) fn shutdown(&self) {
        self.pulls.shutdown();
    }

    async fn run<T: Send + 'static>(
        &self,
        client: u64,
        f: impl FnOnce(&CtrStore) -> Result<T, CtrError> + Send + 'static,
    ) -> Result<T, CtrError> {
        let store = self.store.clone();
        self.pool.run(client, move || f(&store)).await?
    }

    /// The fast path for a Prepare of `key` on `parent` with `labels`,
    /// which ask for `ask`. `Err` is an error to answer as it is (the
    /// request is wrong, the parent is gone, the client has too many calls
    /// waiting); whatever else keeps the fast path from making the layer
    /// is [`Outcome::FallBack`].
    pub(crate) async fn prepare(
        &self,
        client: u64,
        ask: &Ask,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Outcome, CtrError> {
        let (k, p, l, a) = (
            key.to_string(),
            parent.to_string(),
            labels.clone(),
            ask.clone(),
        );
        let begun = self
            .run(client, move |s| {
                s.check_request(&k, &l)?;
                adopt::begin(s, &p, &a)
            })
            .await
            .map(Ok)
            .or_else(fall_back_unless_answer)?;
        // The adoption's hold goes with `pending`, wherever this stops: a
        // failed pull, containerd gone (this future dropped), a finish
        // that never ran.
        let pending = match begun {
            Err(why) => return Ok(Outcome::FallBack(FellBack::own(why))),
            Ok(adopt::Begun::Made) => return Ok(Outcome::Adopted(None)),
            Ok(adopt::Begun::NameTaken) => return Ok(Outcome::NameTaken),
            Ok(adopt::Begun::BelowFellBack) => {
                return Ok(Outcome::FallBack(FellBack {
                    reason: "below_fell_back",
                    error: None,
                    why: "the layer below fell back to containerd".into(),
                    first: false,
                }))
            }
            Ok(adopt::Begun::Pending(p)) => p,
        };
        let mut stats = None;
        if pending.needs_pull {
            match self.pulls.pull(ask).await {
                Ok(s) => stats = s,
                Err((f, started)) => {
                    // A pull that failed above this layer may have made it.
                    let chain = ask.chain;
                    let made = self
                        .run(client, move |s| {
                            Ok(s.root().snapshots().stat(&chain).is_ok())
                        })
                        .await
                        .unwrap_or(false);
                    if !made {
                        return Ok(Outcome::FallBack(FellBack::pull(&f, started)));
                    }
                }
            }
        }
        let (p, l, a) = (parent.to_string(), labels.clone(), ask.clone());
        let finished = self
            .run(client, move |s| adopt::finish(s, &p, &l, &a, pending))
            .await
            .map(Ok)
            .or_else(fall_back_unless_answer)?;
        Ok(match finished {
            Err(why) => Outcome::FallBack(FellBack::own(why)),
            Ok(adopt::Begun::Made) => Outcome::Adopted(stats),
            Ok(_) => Outcome::NameTaken,
        })
    }
}

/// A step's error: `Err` to answer containerd with as it is (what a plain
/// Prepare would answer the same: a wrong request, a parent that is not
/// there or not committed, too many calls); `Ok(Err(why))` to fall back
/// (unlade's own trouble: its pull, its holds, its files).
fn fall_back_unless_answer<T>(e: CtrError) -> Result<Result<T, String>, CtrError> {
    match e {
        CtrError::NotFound(_)
        | CtrError::AlreadyExists(_)
        | CtrError::FailedPrecondition { .. }
        | CtrError::InvalidArgument(_)
        | CtrError::Busy(_) => Err(e),
        e => Ok(Err(crate::report::error_chain(&e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Labels from pairs (the fast path's tests, `adopt`'s too).
    pub(super) fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const CHAIN: &str = "sha256:0cd1e14e771ce6425a7a5227ebf59dba76fbb9c417a3176bfde96b64001f803a";
    const MANIFEST: &str =
        "sha256:6191388bf684b651a850e49add3b324086ce518eaeb46e7c00638f42111041ba";

    #[test]
    fn cri_labels_ask_and_the_manifest_pins_the_reference() {
        let a = Ask::of(&labels(&[
            (SNAPSHOT_REF, CHAIN),
            (CRI_IMAGE_REF, "127.0.0.1:5000/demo:latest"),
            (CRI_MANIFEST_DIGEST, MANIFEST),
        ]))
        .unwrap();
        assert_eq!(a.target, CHAIN);
        assert_eq!(
            a.reference.to_string(),
            format!("127.0.0.1:5000/demo:latest@{MANIFEST}")
        );
    }

    #[test]
    fn without_cri_labels_there_is_no_fast_path() {
        assert!(Ask::of(&labels(&[(SNAPSHOT_REF, CHAIN)])).is_none());
        assert!(Ask::of(&labels(&[(CRI_IMAGE_REF, "redis")])).is_none());
        assert!(Ask::of(&labels(&[(SNAPSHOT_REF, "junk"), (CRI_IMAGE_REF, "redis")])).is_none());
        assert!(Ask::of(&labels(&[
            (SNAPSHOT_REF, CHAIN),
            (CRI_IMAGE_REF, "::bad::")
        ]))
        .is_none());
    }
}
