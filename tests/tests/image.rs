//! Resolving images in OCI layouts: tags, multi-platform indexes, OCI and
//! Docker media types, chain IDs, and hostile layouts (tampered blobs,
//! count mismatches, unknown media types, foreign platforms).

use unlade::oci::digest::chain_ids;
use unlade::oci::image::{ImageError, LayerKind, Platform};
use unlade::source::layout::Layout;
use unlade::Digest;
use unlade_tests::*;

const GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

fn two_layers() -> (Vec<Vec<u8>>, Vec<String>) {
    let tars: Vec<Vec<u8>> = ["a", "b"]
        .iter()
        .map(|n| {
            let mut t = RawTar::default();
            t.file(n, n.as_bytes()).end();
            t.bytes()
        })
        .collect();
    let diff_ids = tars.iter().map(|t| sha256(t)).collect();
    (tars, diff_ids)
}

#[test]
fn resolves_tags_platforms_and_chain_ids() {
    let w = tmp();
    let (tars, diff_ids) = two_layers();
    let gz: Vec<Vec<u8>> = tars.iter().map(|t| gzip_members(t, 1)).collect();
    let mut b = LayoutBuilder::new(w.path());
    let amd = b.image(
        "linux/amd64",
        &diff_ids,
        &[(GZ, &gz[0]), (GZ, &gz[1])],
        false,
    );
    let arm = b.image("linux/arm64/v8", &diff_ids[..1], &[(GZ, &gz[0])], false);
    let docker = b.image(
        "linux/amd64",
        &diff_ids,
        &[
            ("application/vnd.docker.image.rootfs.diff.tar.gzip", &gz[0]),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                &gz[1],
            ),
        ],
        true,
    );
    b.add(amd.clone(), Some("multi"))
        .add(arm, Some("multi"))
        .add(docker, Some("docker"))
        .add(amd, Some("one"));
    b.finish();
    let layout = Layout::open(w.path()).unwrap();
    let want_chains = chain_ids(
        &diff_ids
            .iter()
            .map(|d| d.parse::<Digest>().unwrap())
            .collect::<Vec<_>>(),
    );

    let img = layout
        .resolve(Some("one"), Some(&Platform::parse("linux/amd64").unwrap()))
        .unwrap();
    assert_eq!(img.layers.len(), 2);
    assert_eq!(
        img.layers.iter().map(|l| l.chain_id).collect::<Vec<_>>(),
        want_chains
    );
    assert_eq!(img.layers[1].diff_id.to_string(), diff_ids[1]);
    assert_eq!(img.layers[0].digest.to_string(), sha256(&gz[0]));

    let arm = layout
        .resolve(
            Some("multi"),
            Some(&Platform::parse("linux/arm64/v8").unwrap()),
        )
        .unwrap();
    assert_eq!(arm.platform.to_string(), "linux/arm64/v8");
    assert_eq!(arm.layers.len(), 1);
    let amd = layout
        .resolve(
            Some("multi"),
            Some(&Platform::parse("linux/amd64").unwrap()),
        )
        .unwrap();
    assert_eq!(amd.layers.len(), 2);

    let d = layout
        .resolve(
            Some("docker"),
            Some(&Platform::parse("linux/amd64").unwrap()),
        )
        .unwrap();
    assert_eq!(d.layers[1].kind, LayerKind::NonDistributable);

    assert!(
        matches!(layout.resolve(Some("nope"), None), Err(ImageError::NotFound(m)) if m.contains("nope"))
    );
    assert!(matches!(
        layout.resolve(Some("multi"), Some(&Platform::parse("linux/s390x").unwrap())),
        Err(ImageError::NotFound(m)) if m.contains("linux/s390x")
    ));
}

#[test]
fn foreign_platform_needs_asking() {
    let w = tmp();
    let (tars, diff_ids) = two_layers();
    let mut b = LayoutBuilder::new(w.path());
    let other = if Platform::host().architecture == "arm64" {
        "linux/amd64"
    } else {
        "linux/arm64"
    };
    let m = b.image(
        other,
        &diff_ids[..1],
        &[("application/vnd.oci.image.layer.v1.tar", &tars[0])],
        false,
    );
    b.add(m, None);
    b.finish();
    let layout = Layout::open(w.path()).unwrap();
    let e = unlade::error_chain(&layout.resolve(None, None).unwrap_err());
    assert!(e.contains(other) && e.contains("--platform"), "{e}");
    let img = layout
        .resolve(None, Some(&Platform::parse(other).unwrap()))
        .unwrap();
    assert_eq!(img.layers.len(), 1);
}

#[test]
fn hostile_layouts_are_refused() {
    let (tars, diff_ids) = two_layers();
    let host = Platform::host().to_string();
    let plat = Some(Platform::host());
    // Resolving a one-image layout with these diff IDs and layers fails
    // with this message.
    let refused = |diff_ids: &[String], layers: &[(&str, &[u8])]| {
        let w = tmp();
        let mut b = LayoutBuilder::new(w.path());
        let m = b.image(&host, diff_ids, layers, false);
        b.add(m, None);
        b.finish();
        unlade::error_chain(
            &Layout::open(w.path())
                .unwrap()
                .resolve(None, plat.as_ref())
                .unwrap_err(),
        )
    };
    // Count mismatch between layers and diff IDs.
    let e = refused(&diff_ids[..1], &[(GZ, &tars[0]), (GZ, &tars[1])]);
    assert!(
        e.contains("2 layers but the config lists 1 diff IDs"),
        "{e}"
    );
    // Unknown layer media type.
    let e = refused(&diff_ids[..1], &[("application/x-evil", &tars[0])]);
    assert!(
        e.contains("unknown media type \"application/x-evil\""),
        "{e}"
    );
    // A manifest blob whose bytes were swapped.
    let w = tmp();
    let mut b = LayoutBuilder::new(w.path());
    let m = b.image(&host, &diff_ids[..1], &[(GZ, &tars[0])], false);
    let md = m["digest"].as_str().unwrap().to_string();
    b.add(m, None);
    b.finish();
    std::fs::write(
        w.path().join("blobs/sha256").join(&md[7..]),
        b"{\"tampered\": true}",
    )
    .unwrap();
    match Layout::open(w.path()).unwrap().resolve(None, plat.as_ref()) {
        Err(ImageError::DigestMismatch { digest, .. }) => assert_eq!(digest.to_string(), md),
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    // Not a layout at all.
    let w = tmp();
    assert!(Layout::open(w.path()).is_err());
}
