//! Image resolution (`image::resolve_from`): OCI and Docker indexes,
//! manifests and configs, nested indexes, platform matching, diff IDs and
//! chain IDs, with the documents served from the fuzz input by digest.
//!
//! Input: byte 0 chooses the root's media type (bits 0-2) and the platform
//! asked for (bits 3-4: none, i.e. the host; linux/amd64; linux/arm64/v8;
//! windows/amd64). The rest is up to 8 documents separated by NUL bytes;
//! document 0 is the root. So that documents can name each other (a fuzzer
//! cannot forge a sha256), `@N` in document `i` (N a digit, i < N) is
//! replaced by the digest of document N once N's own references are
//! replaced; the served documents are the results, each under the digest
//! of its bytes, as a registry or layout serves them.
//!
//! Properties:
//! - no panic; errors are errors (displayed, never a panic);
//! - bounded work: at most 5 indexes/manifests (the nesting limit) and one
//!   config are asked for, every config after every manifest;
//! - a resolved image is what its documents say: its manifest and config
//!   digests are documents that were asked for as such (the config last);
//!   its layers are the manifest's `layers` (digest, media type) one for
//!   one with the config's `rootfs.diff_ids` (read again with serde_json's
//!   untyped `Value`, where the documents are objects); its chain IDs are
//!   the spec's; its platform is the one asked for;
//! - `Platform::parse` of the first line of the input, when it succeeds,
//!   round-trips through `Display`.
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use unlade::oci::digest::chain_ids;
use unlade::oci::image::{resolve_from, Documents, ImageError};
use unlade::{Digest, Platform};

const MEDIA_TYPES: [&str; 8] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.config.v1+json",
    "",
];

struct Docs {
    docs: Vec<(Digest, Vec<u8>)>,
    /// (document index, asked for as a config) of every call.
    calls: RefCell<Vec<(usize, bool)>>,
}

impl Documents for Docs {
    fn document(&self, d: &Digest, config: bool) -> Result<Vec<u8>, ImageError> {
        let Some(i) = self.docs.iter().position(|(k, _)| k == d) else {
            self.calls.borrow_mut().push((usize::MAX, config));
            return Err(ImageError::NotFound(format!("no document {d}")));
        };
        self.calls.borrow_mut().push((i, config));
        Ok(self.docs[i].1.clone())
    }
}

/// Replaces `@N` (N > i) in document i by the digest of document N, last
/// document first.
fn link(raw: Vec<&[u8]>) -> Vec<(Digest, Vec<u8>)> {
    let mut out: Vec<Option<(Digest, Vec<u8>)>> = vec![None; raw.len()];
    for i in (0..raw.len()).rev() {
        let mut doc = Vec::with_capacity(raw[i].len());
        let mut j = 0;
        while j < raw[i].len() {
            let b = raw[i][j];
            if b == b'@' {
                if let Some(&n) = raw[i].get(j + 1) {
                    let n = usize::from(n.wrapping_sub(b'0'));
                    if n > i && n < raw.len() {
                        let d = out[n].as_ref().unwrap().0;
                        doc.extend_from_slice(d.to_string().as_bytes());
                        j += 2;
                        continue;
                    }
                }
            }
            doc.push(b);
            j += 1;
        }
        out[i] = Some((Digest::of(&doc), doc));
    }
    out.into_iter().map(Option::unwrap).collect()
}

fn platform(sel: u8) -> Option<Platform> {
    let p = |os: &str, arch: &str, v: Option<&str>| Platform {
        os: os.into(),
        architecture: arch.into(),
        variant: v.map(Into::into),
    };
    match (sel >> 3) & 3 {
        0 => None,
        1 => Some(p("linux", "amd64", None)),
        2 => Some(p("linux", "arm64", Some("v8"))),
        _ => Some(p("windows", "amd64", None)),
    }
}

/// A document read again as an untyped JSON object. `None` where serde's
/// leniencies make that impossible: a typed parse skips unknown fields
/// without checking their strings (invalid UTF-8 is replaced here first,
/// but not every bad escape can be), and it reads a struct from an array
/// of its fields in order as well as from an object.
fn json(b: &[u8]) -> Option<serde_json::Value> {
    serde_json::from_str(&String::from_utf8_lossy(b))
        .ok()
        .filter(serde_json::Value::is_object)
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    if let Some(line) = rest.split(|&b| b == b'\n' || b == 0).next() {
        if let Ok(p) = Platform::parse(&String::from_utf8_lossy(line)) {
            assert_eq!(Platform::parse(&p.to_string()), Ok(p));
        }
    }
    let raw: Vec<&[u8]> = rest.split(|&b| b == 0).take(8).collect();
    let docs = Docs {
        docs: link(raw),
        calls: RefCell::new(Vec::new()),
    };
    let want = platform(sel);
    let media_type = MEDIA_TYPES[usize::from(sel & 7)];
    let root = docs.docs[0].0;
    let r = resolve_from(&docs, &root, media_type, want.as_ref());

    let calls = docs.calls.into_inner();
    assert!(calls.len() <= 6, "{} documents asked for", calls.len());
    if let Some(first_config) = calls.iter().position(|c| c.1) {
        assert_eq!(
            first_config,
            calls.len() - 1,
            "documents asked after a config"
        );
    }
    let img = match r {
        Ok(img) => img,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let &(ci, true) = calls.last().expect("a config was read") else {
        panic!("resolved without reading a config");
    };
    assert!(calls.len() >= 2);
    let (mi, false) = calls[calls.len() - 2] else {
        panic!("the document before the config is not a manifest");
    };
    assert_eq!(img.config, docs.docs[ci].0);
    assert_eq!(img.manifest, docs.docs[mi].0);

    if let (Some(m), Some(c)) = (json(&docs.docs[mi].1), json(&docs.docs[ci].1)) {
        let layers = m["layers"].as_array().expect("manifest layers");
        let diff_ids = c["rootfs"]["diff_ids"].as_array();
        if let Some(diff_ids) = diff_ids {
            assert_eq!(img.layers.len(), diff_ids.len());
            for (l, d) in img.layers.iter().zip(diff_ids) {
                assert_eq!(Some(l.diff_id.to_string().as_str()), d.as_str());
            }
        }
        assert_eq!(img.layers.len(), layers.len());
        for (l, j) in img.layers.iter().zip(layers) {
            if j.is_object() {
                assert_eq!(Some(l.digest.to_string().as_str()), j["digest"].as_str());
                assert_eq!(l.media_type.as_str(), j["mediaType"].as_str().unwrap_or(""));
            }
        }
    }
    let diffs: Vec<Digest> = img.layers.iter().map(|l| l.diff_id).collect();
    let chains: Vec<Digest> = img.layers.iter().map(|l| l.chain_id).collect();
    assert_eq!(chains, chain_ids(&diffs));

    let want = want.unwrap_or_else(Platform::host);
    assert_eq!(img.platform.os, want.os);
    assert_eq!(img.platform.architecture, want.architecture);
    if want.variant.is_some() {
        assert_eq!(img.platform.variant, want.variant);
    }
});
