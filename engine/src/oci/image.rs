//! Images in an OCI image layout: index → manifest (platform match) →
//! config → layers, diff IDs and chain IDs, for OCI and Docker schema2
//! media types.
//!
//! Everything read here may be hostile: every blob is read through its
//! digest (and rejected if its bytes do not hash to it), JSON documents are
//! bounded in size, nested indexes in depth, and layer and diff ID counts
//! must agree.

use std::path::PathBuf;

use serde::Deserialize;

use crate::oci::digest::{chain_ids, Digest};

/// Largest index, manifest or config read (containerd uses 4 MiB).
pub const MAX_JSON: u64 = 4 << 20;
/// Deepest chain of nested indexes followed.
const MAX_INDEX_DEPTH: usize = 4;
/// Most layers an image may have: overlayfs stacks at most 500 lower
/// directories (its `OVL_MAX_STACK`), so an image with more could be
/// unpacked but never mounted. Docker refuses at 128.
pub const MAX_LAYERS: usize = 500;

/// Why an image could not be resolved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// Reading the layout failed.
    #[error("{path}")]
    Io {
        /// The file or directory of the layout that could not be read.
        path: PathBuf,
        /// Why reading it failed.
        #[source]
        source: std::io::Error,
    },
    /// A blob's bytes do not hash to the digest that names it.
    #[error("blob {digest}: content hashes to {actual}")]
    DigestMismatch {
        /// The digest the blob was asked for by (its name).
        digest: Digest,
        /// What the bytes hash to.
        actual: Digest,
    },
    /// A document is malformed, too large, or inconsistent.
    #[error("{what}: {detail}")]
    Invalid {
        /// Which document (e.g. "manifest sha256:…").
        what: String,
        /// What is wrong with it.
        detail: String,
    },
    /// Nothing in the index matches the tag or the platform.
    #[error("{0}")]
    NotFound(String),
    /// A source (a registry) could not deliver a document. Boxed: the
    /// specification's types know nothing of where documents come from
    /// (it is a [`crate::source::SourceError`]).
    #[error(transparent)]
    Source(Box<dyn std::error::Error + Send + Sync>),
}

/// An OS/architecture/variant triple, as `--platform` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// e.g. "linux".
    pub os: String,
    /// e.g. "amd64" (Go's names).
    pub architecture: String,
    /// e.g. "v8" for arm64; `None` matches any.
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this process runs on, in Go's (and OCI's) names.
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            "loongarch64" => "loong64",
            other => other,
        };
        Platform {
            os: std::env::consts::OS.to_string(),
            architecture: architecture.to_string(),
            variant: None,
        }
    }

    /// Parses `os/arch[/variant]`.
    pub fn parse(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, v] if !os.is_empty() && !arch.is_empty() && !v.is_empty() => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(v.to_string()),
            }),
            _ => Err(format!(
                "invalid platform {s:?}: expected os/arch[/variant]"
            )),
        }
    }

    fn matches(&self, p: &JsonPlatform) -> bool {
        p.os == self.os
            && p.architecture == self.architecture
            && match (&self.variant, &p.variant) {
                (Some(want), Some(have)) => want == have,
                (Some(_), None) => false,
                (None, _) => true,
            }
    }
}

impl From<&JsonPlatform> for Platform {
    fn from(p: &JsonPlatform) -> Platform {
        Platform {
            os: p.os.clone(),
            architecture: p.architecture.clone(),
            variant: p.variant.clone(),
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// How a layer blob is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayerKind {
    /// An ordinary layer (tar, gzip or zstd: the applier tells by magic).
    Regular,
    /// A foreign / non-distributable layer: applied like any other when
    /// its blob is in the layout, as containerd does; its absence is an
    /// error naming it.
    NonDistributable,
}

/// One layer of a resolved image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The blob's digest.
    pub digest: Digest,
    /// The blob's size.
    pub size: u64,
    /// Its media type, verbatim.
    pub media_type: String,
    /// Regular or foreign.
    pub kind: LayerKind,
    /// The diff ID the config lists for it.
    pub diff_id: Digest,
    /// The chain ID of the stack up to and including it.
    pub chain_id: Digest,
}

/// A resolved image: what unpacking needs.
#[derive(Debug, Clone)]
pub struct Image {
    /// The manifest's digest.
    pub manifest: Digest,
    /// The config's digest.
    pub config: Digest,
    /// The config's platform.
    pub platform: Platform,
    /// Layers, bottom first.
    pub layers: Vec<Layer>,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    platform: Option<JsonPlatform>,
    #[serde(default)]
    annotations: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct JsonPlatform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize)]
struct Index {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: String,
    diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct Config {
    #[serde(flatten)]
    platform: JsonPlatform,
    rootfs: RootFs,
}

const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];
const CONFIG_TYPES: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

fn layer_kind(media_type: &str) -> Option<LayerKind> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.diff.tar" => Some(LayerKind::Regular),
        "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
            Some(LayerKind::NonDistributable)
        }
        _ => None,
    }
}

fn invalid(what: impl Into<String>, detail: impl Into<String>) -> ImageError {
    ImageError::Invalid {
        what: what.into(),
        detail: detail.into(),
    }
}

fn parse_digest(what: &str, s: &str) -> Result<Digest, ImageError> {
    s.parse::<Digest>()
        .map_err(|e| invalid(what, e.to_string()))
}

/// Where the JSON documents of an image (indexes, manifests, configs) come
/// from: an OCI layout, a registry. Whatever it returns has been checked
/// against its digest and bounded by [`MAX_JSON`].
pub trait Documents {
    /// The document `d`; `config` tells a config (a registry blob) from an
    /// index or manifest (a registry manifest).
    fn document(&self, d: &Digest, config: bool) -> Result<Vec<u8>, ImageError>;
}

/// Resolves the image whose index or manifest is `digest` (of
/// `media_type`) down to its manifest for `platform` (`None`: the host;
/// then a config for another platform is an error), its config, and its
/// layers with diff IDs and chain IDs.
pub fn resolve_from(
    docs: &dyn Documents,
    digest: &Digest,
    media_type: &str,
    platform: Option<&Platform>,
) -> Result<Image, ImageError> {
    let want = platform.cloned().unwrap_or_else(Platform::host);
    let desc = Descriptor {
        media_type: media_type.to_string(),
        digest: digest.to_string(),
        size: 0,
        platform: None,
        annotations: None,
    };
    let (manifest, m) = follow(docs, &desc, &want, 0)?;
    build(docs, manifest, m, &want, platform.is_some())
}

/// Resolves `tag` in the index `index_json` (an OCI layout's
/// `index.json`; `place` names the layout in errors) for `platform`, as
/// [`resolve_from`] does below the index. `tag` is the
/// `org.opencontainers.image.ref.name` annotation; `None`: the only image,
/// or the one for the platform.
pub fn resolve_index(
    docs: &dyn Documents,
    index_json: &[u8],
    tag: Option<&str>,
    platform: Option<&Platform>,
    place: &str,
) -> Result<Image, ImageError> {
    let index: Index =
        serde_json::from_slice(index_json).map_err(|e| invalid("index.json", e.to_string()))?;
    let mut candidates: Vec<&Descriptor> = index.manifests.iter().collect();
    if let Some(t) = tag {
        candidates.retain(|d| {
            d.annotations
                .as_ref()
                .and_then(|a| a.get("org.opencontainers.image.ref.name"))
                .is_some_and(|n| n == t)
        });
        if candidates.is_empty() {
            return Err(ImageError::NotFound(format!(
                "no image tagged {t:?} in {place}"
            )));
        }
    }
    let want = platform.cloned().unwrap_or_else(Platform::host);
    let desc = pick(&candidates, &want, "index.json")?;
    let (manifest, m) = follow(docs, desc, &want, 0)?;
    build(docs, manifest, m, &want, platform.is_some())
}

/// Whether `media_type` is an index or a manifest that [`resolve_from`]
/// understands.
pub fn is_manifest_type(media_type: &str) -> bool {
    INDEX_TYPES.contains(&media_type) || MANIFEST_TYPES.contains(&media_type)
}

/// The media types of indexes and manifests, for an HTTP `Accept` header.
pub fn manifest_types() -> impl Iterator<Item = &'static str> {
    INDEX_TYPES.iter().chain(MANIFEST_TYPES).copied()
}

/// Picks one descriptor from an index's list: the only one, or the one
/// for the platform.
fn pick<'d>(
    list: &[&'d Descriptor],
    want: &Platform,
    what: &str,
) -> Result<&'d Descriptor, ImageError> {
    if let [one] = list {
        return Ok(one);
    }
    list.iter()
        .copied()
        .find(|d| d.platform.as_ref().is_some_and(|p| want.matches(p)))
        .ok_or_else(|| ImageError::NotFound(format!("{what}: no manifest for platform {want}")))
}

/// Follows nested indexes down to one manifest.
fn follow(
    docs: &dyn Documents,
    desc: &Descriptor,
    want: &Platform,
    depth: usize,
) -> Result<(Digest, Manifest), ImageError> {
    let d = parse_digest("descriptor", &desc.digest)?;
    let what = format!("blob {d}");
    if depth > MAX_INDEX_DEPTH {
        return Err(invalid(what, "indexes nested too deep"));
    }
    let raw = docs.document(&d, false)?;
    if INDEX_TYPES.contains(&desc.media_type.as_str()) {
        let idx: Index = serde_json::from_slice(&raw).map_err(|e| invalid(&what, e.to_string()))?;
        if let Some(mt) = &idx.media_type {
            if !INDEX_TYPES.contains(&mt.as_str()) {
                return Err(invalid(&what, format!("media type {mt} is not an index")));
            }
        }
        let list: Vec<&Descriptor> = idx.manifests.iter().collect();
        let next = pick(&list, want, &what)?;
        return follow(docs, next, want, depth + 1);
    }
    if !MANIFEST_TYPES.contains(&desc.media_type.as_str()) {
        return Err(invalid(
            &what,
            format!("unknown media type {:?}", desc.media_type),
        ));
    }
    let m: Manifest = serde_json::from_slice(&raw).map_err(|e| invalid(&what, e.to_string()))?;
    if let Some(mt) = &m.media_type {
        if !MANIFEST_TYPES.contains(&mt.as_str()) {
            return Err(invalid(&what, format!("media type {mt} is not a manifest")));
        }
    }
    Ok((d, m))
}

fn build(
    docs: &dyn Documents,
    manifest: Digest,
    m: Manifest,
    want: &Platform,
    explicit: bool,
) -> Result<Image, ImageError> {
    let config = parse_digest("config descriptor", &m.config.digest)?;
    let cwhat = format!("config {config}");
    if !CONFIG_TYPES.contains(&m.config.media_type.as_str()) {
        return Err(invalid(
            &cwhat,
            format!("unknown media type {:?}", m.config.media_type),
        ));
    }
    let c: Config = serde_json::from_slice(&docs.document(&config, true)?)
        .map_err(|e| invalid(&cwhat, e.to_string()))?;
    if c.rootfs.kind != "layers" {
        return Err(invalid(
            &cwhat,
            format!("rootfs type {:?} is not \"layers\"", c.rootfs.kind),
        ));
    }
    if !want.matches(&c.platform) {
        let platform = Platform::from(&c.platform);
        let hint = if explicit {
            ""
        } else {
            " (ask for it with --platform)"
        };
        return Err(ImageError::NotFound(format!(
            "image is for {platform}, not {want}{hint}"
        )));
    }
    let diff_ids = c
        .rootfs
        .diff_ids
        .iter()
        .map(|s| parse_digest(&cwhat, s))
        .collect::<Result<Vec<_>, _>>()?;
    if m.layers.len() > MAX_LAYERS {
        return Err(invalid(
            format!("manifest {manifest}"),
            format!(
                "{} layers: more than {MAX_LAYERS}, the most overlayfs can stack",
                m.layers.len()
            ),
        ));
    }
    if diff_ids.len() != m.layers.len() {
        return Err(invalid(
            format!("manifest {manifest}"),
            format!(
                "{} layers but the config lists {} diff IDs",
                m.layers.len(),
                diff_ids.len()
            ),
        ));
    }
    let chains = chain_ids(&diff_ids);
    let mut layers = Vec::with_capacity(m.layers.len());
    for ((l, diff_id), chain_id) in m.layers.iter().zip(diff_ids).zip(chains) {
        let digest = parse_digest("layer descriptor", &l.digest)?;
        let kind = layer_kind(&l.media_type).ok_or_else(|| {
            invalid(
                format!("layer {digest}"),
                format!("unknown media type {:?}", l.media_type),
            )
        })?;
        layers.push(Layer {
            digest,
            size: l.size,
            media_type: l.media_type.clone(),
            kind,
            diff_id,
            chain_id,
        });
    }
    Ok(Image {
        manifest,
        config,
        platform: Platform::from(&c.platform),
        layers,
    })
}
