//! The fast path: what CRI's labels on a layer's Prepare ask for.
//!
//! With `disable_snapshot_annotations = false`, containerd's CRI plugin
//! labels each layer's Prepare with the layer's chain ID
//! (`containerd.io/snapshot.ref`, which containerd sets on every unpack)
//! and with the image (`containerd.io/snapshot/cri.image-ref`,
//! `.../cri.manifest-digest`, `.../cri.layer-digest`). Given those, unlade
//! pulls the image itself with its own pipeline, commits containerd's
//! snapshot under the chain ID with the parent containerd gave, and
//! answers `AlreadyExists`; containerd then finds that snapshot by its
//! label and parent (List with a filter) and adopts it, and never fetches
//! or applies the layer. Each later layer's Prepare comes the same way, so
//! every layer is handled (containerd starts fetching all the layers
//! above as soon as one Prepare returns normally).

use std::collections::BTreeMap;

use crate::oci::digest::Digest;
use crate::oci::reference::Reference;

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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
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
