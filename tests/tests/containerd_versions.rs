//! unlade as the snapshotter of each containerd it supports: 1.6 (the
//! system's), 1.7 and 2.1 (Debian's, from `scripts/containerd-peers.sh`),
//! 2.1 once with CRI pulling through the transfer service (its default)
//! and once locally. Each is configured by what `unlade containerd-config`
//! prints for it, and each goes through the same steps:
//!
//! - `ctr images import` and `ctr run` of the demo image into `unlade`;
//! - a CRI pull done by unlade's fast path: unlade fetches every layer
//!   blob once, containerd none; the blobs are then handed to containerd's
//!   content store (`ctr images check` says complete, `ctr images export`
//!   writes them) and unlade keeps none; on 2.1 also `ctr images pull
//!   --snapshotter unlade`, which goes through the transfer service;
//! - ImageFsInfo names unlade's root (on 1.6 because unlade runs with its
//!   root at the one path 1.6 reports);
//! - removing every image lets containerd's GC remove every snapshot from
//!   unlade's root, and unlade's gc then every layer;
//! - a registry unlade cannot reach (it tries HTTPS) but containerd can
//!   (its hosts.toml says HTTP): the CRI pull falls back to containerd,
//!   which fetches the layers itself;
//! - a private image (Basic auth; the credentials only in the PullImage's
//!   `auth`, as kubelet sends a pod's pull secret): straight to
//!   containerd, unlade has none and falls back, and containerd pulls it;
//!   through unlade's CRI proxy the fast path takes it (containerd fetches
//!   no layer), which is also the next pull of the same image trying the
//!   fast path again; the password is in no log and no file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use unlade_tests::containerd::{
    blobs_kept, on_disk, tail, write_plain_http_hosts, Containerd, Options, Version,
};
use unlade_tests::registry::{demo_layers, demo_layout, demo_registry, Proxy, RegAuth, Registry};
use unlade_tests::*;

/// unlade's own committed snapshots (the fast path's layers).
fn committed(root: &Path) -> usize {
    std::fs::read_dir(root.join("snapshots/committed"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Every image of namespace `ns` removed, synchronously (`--sync` waits
/// for containerd's GC).
fn remove_images(c: &Containerd, ns: &str) {
    for name in c.ctr_ok(&["-n", ns, "images", "ls", "-q"]).lines() {
        c.ctr_ok(&["-n", ns, "images", "rm", "--sync", name]);
    }
}

const USER: &str = "kubelet-user";
const PASSWORD: &str = "pull-secret-7f3a9c";

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            match std::fs::symlink_metadata(&p) {
                Ok(md) if md.is_dir() => stack.push(p),
                Ok(md)
                    if md.is_file()
                        && std::fs::read(&p)
                            .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) =>
                {
                    found.push(p.display().to_string());
                }
                _ => {}
            }
        }
    }
    found
}

/// The steps of the module's doc for `version`.
fn each_version(version: Version) {
    let t0 = Instant::now();
    let (reg, proxy) = demo_registry();
    // The same registry under a second address that only containerd's
    // hosts.toml names as plain HTTP.
    let far = Proxy::start(&reg.addr);
    let layers = demo_layers(&reg);
    let t = tmp();
    // containerd 1.6 reports `<its root>/io.containerd.snapshotter.v1.unlade`
    // as the image file system: unlade's root goes there.
    let (root, containerd_root) = if version == Version::V1_6 {
        let croot = t.path().join("containerd-root");
        (
            croot.join("io.containerd.snapshotter.v1.unlade"),
            Some(croot),
        )
    } else {
        (t.path().join("root"), None)
    };
    let unlade_hosts = t.path().join("unlade-hosts");
    write_plain_http_hosts(&unlade_hosts, &proxy.addr);
    let private = Registry::start(RegAuth::Basic(USER.into(), PASSWORD.into()));
    private.push(&demo_layout(), "latest", "demo:latest");
    write_plain_http_hosts(&unlade_hosts, &private.addr);
    let c = Containerd::start_version(
        version,
        &root,
        &Options {
            server_args: vec![
                "--hosts-dir".into(),
                unlade_hosts.to_str().expect("utf8").into(),
            ],
            plain_http: vec![proxy.addr.clone(), far.addr.clone(), private.addr.clone()],
            containerd_root,
            cri_proxy: true,
        },
    );
    let id = |what: &str| format!("unlade-{what}-{version:?}").to_lowercase();
    let k8s = |args: &[&str]| {
        let mut a = vec!["-n", "k8s.io"];
        a.extend_from_slice(args);
        c.ctr_ok(&a)
    };
    let started = t0.elapsed();

    // ctr: import and run.
    c.import_demo();
    let out = c.ctr_ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "unlade",
        "docker.io/unlade/demo:latest",
        &id("hello"),
        "hello",
    ]);
    assert_eq!(out.trim(), "Hello, world!", "{version:?}");
    // The container's snapshot goes with it (by containerd's GC, soon),
    // and the image's with the image.
    c.wait_on_disk(&root, layers.len());
    remove_images(&c, "default");
    c.wait_on_disk(&root, 0);
    assert_eq!(
        committed(&root),
        0,
        "{version:?}: the fast path made nothing"
    );

    // CRI through the fast path.
    let reference = format!("{}/demo:latest", proxy.addr);
    c.cri_pull_ok(&reference, 1);
    let log = c.log();
    match version {
        Version::V2_1Transfer => assert!(
            log.contains("using transfer service") && !log.contains("Falling back to local"),
            "{version:?}: CRI did not pull through the transfer service:\n{}",
            tail(&log, 60)
        ),
        Version::V2_1Local => assert!(
            log.contains("using client.Pull()") && !log.contains("using transfer service"),
            "{version:?}: CRI did not pull locally:\n{}",
            tail(&log, 60)
        ),
        Version::V1_6 | Version::V1_7 => {}
    }
    for l in &layers {
        assert_eq!(
            proxy.blob_gets(l).len(),
            1,
            "{version:?}: layer {l} fetched once: {:?}\n{}",
            proxy.seen(),
            c.unlade.log()
        );
        assert_eq!(
            reg.demo_blob_gets_by(l, "containerd/"),
            0,
            "{version:?}: containerd fetched layer {l}\n{}",
            c.unlade.log()
        );
    }
    assert_eq!(committed(&root), layers.len(), "{version:?}");
    // The hand-off: every layer blob goes into containerd's content store
    // (after the pull was answered), so `ctr images check` says complete
    // and export works; unlade keeps no second copy.
    c.wait_complete("k8s.io", &reference);
    wait_until(
        || blobs_kept(&root, layers.iter().map(String::as_str)) == 0,
        || {
            format!(
                "{version:?}: unlade kept a handed-off blob\n{}",
                c.unlade.log()
            )
        },
    );
    // containerd's garbage collection keeps them: the image's manifest
    // references them (a lease deleted with --sync runs a collection).
    let lease = k8s(&["leases", "create"]);
    k8s(&["leases", "delete", "--sync", lease.trim()]);
    c.wait_complete("k8s.io", &reference);
    let tarball = t.path().join("export.tar");
    // On 2.x ctr exports through the transfer service by default, which
    // once (1 run in about 10) left a truncated tar while exiting 0; the
    // client-side export reads the same content store.
    let mut export = vec!["images", "export"];
    if version.major() >= 2 {
        export.push("--local");
    }
    export.extend_from_slice(&[tarball.to_str().expect("utf8"), &reference]);
    k8s(&export);
    let listed = sh(Command::new("tar").arg("-tf").arg(&tarball));
    let listed = String::from_utf8_lossy(&listed.stdout);
    for l in &layers {
        let name = format!("blobs/sha256/{}", l.trim_start_matches("sha256:"));
        assert!(
            listed.lines().any(|x| x == name),
            "{version:?}: {name} not exported:\n{listed}"
        );
    }
    let out = k8s(&[
        "run",
        "--rm",
        "--snapshotter",
        "unlade",
        &reference,
        &id("cri"),
        "hello",
    ]);
    assert_eq!(out.trim(), "Hello, world!", "{version:?}");

    // ctr's pull on 2.x goes through the transfer service, whose unpack
    // into `unlade` the configuration allows and labels: in namespace
    // `default`, where containerd has none of the image's snapshots (nor
    // its layer blobs), unlade's fast path answers each Prepare with the
    // layer it pulled for CRI, so containerd fetches no layer.
    if version.major() >= 2 {
        let before = on_disk(&root);
        c.ctr_ok(&[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            "unlade",
            &reference,
        ]);
        for l in &layers {
            assert_eq!(
                reg.demo_blob_gets_by(l, "containerd/"),
                0,
                "{version:?}: {l}"
            );
            assert_eq!(proxy.blob_gets(l).len(), 1, "{version:?}: {l} again");
        }
        // containerd adopts, in this namespace, the snapshots unlade
        // answered with: those it already has in `k8s.io` (one tree).
        let listed = c.ctr_ok(&["snapshots", "--snapshotter", "unlade", "ls"]);
        assert_eq!(
            listed.lines().count(),
            1 + layers.len(),
            "{version:?}: {listed}"
        );
        assert!(on_disk(&root) <= before, "{version:?}");
        // The blobs handed to `k8s.io` are committed into this namespace
        // too (containerd shares content): complete here as well.
        c.wait_complete("default", &reference);
        let out = c.ctr_ok(&[
            "run",
            "--rm",
            "--snapshotter",
            "unlade",
            &reference,
            &id("pulled"),
            "hello",
        ]);
        assert_eq!(out.trim(), "Hello, world!", "{version:?}");
    }

    // What kubelet's image garbage collection measures: the proxy
    // plugin's exported root, except on 1.6, whose path is fixed (and
    // unlade's root, since unlade runs there).
    let fs = c.image_fs_info();
    let reported: Vec<&Path> = fs.iter().map(|f| f.0.as_path()).collect();
    let expected = match version {
        Version::V1_6 => c.root.join("io.containerd.snapshotter.v1.unlade"),
        _ => root.clone(),
    };
    assert_eq!(
        reported,
        vec![expected.as_path()],
        "{version:?}: ImageFsInfo"
    );
    assert_eq!(expected, root, "{version:?}");
    // The same through unlade's CRI proxy, and by the older API where
    // containerd still serves it (1.x).
    let via = |api| -> Vec<PathBuf> {
        c.image_fs_info_on(&c.cri_proxy(), api)
            .into_iter()
            .map(|f| f.0)
            .collect()
    };
    assert_eq!(
        via("v1"),
        vec![root.clone()],
        "{version:?}: through the proxy"
    );
    if version.major() == 1 {
        assert_eq!(via("v1alpha2"), vec![root.clone()], "{version:?}: v1alpha2");
    }

    // Everything removed: containerd's GC removes every snapshot through
    // unlade, then unlade's gc every layer the fast path made.
    remove_images(&c, "default");
    remove_images(&c, "k8s.io");
    c.wait_on_disk(&root, 0);
    let gc = last_line(&sh(Command::new(bin()).arg("gc").arg("--root").arg(&root)));
    assert!(
        gc.starts_with(&format!("removed {} snapshots", layers.len())),
        "{version:?}: {gc}"
    );
    assert_eq!(committed(&root), 0, "{version:?}");
    let first_round = t0.elapsed();

    // A registry only containerd reaches: unlade falls back, containerd
    // fetches and applies the layers itself.
    let reference = format!("{}/demo:latest", far.addr);
    c.cri_pull_ok(&reference, 1);
    let log = c.unlade.log();
    assert!(
        log.lines()
            .any(|l| l.contains("falls back to containerd") && l.contains(&far.addr)),
        "{version:?}: {log}"
    );
    let content = k8s(&["content", "ls", "-q"]);
    for l in &layers {
        assert!(
            content.lines().any(|d| d == l),
            "{version:?}: {l} not in\n{content}"
        );
        assert_eq!(far.blob_gets(l).len(), 1, "{version:?}: {l}");
    }
    assert_eq!(on_disk(&root), layers.len(), "{version:?}");
    assert_eq!(
        committed(&root),
        0,
        "{version:?}: the fast path made nothing"
    );
    let out = k8s(&[
        "run",
        "--rm",
        "--snapshotter",
        "unlade",
        &reference,
        &id("fallback"),
        "hello",
    ]);
    assert_eq!(out.trim(), "Hello, world!", "{version:?}");
    remove_images(&c, "k8s.io");
    c.wait_on_disk(&root, 0);

    // A private image, its credentials only in the PullImage.
    let reference = format!("{}/demo:latest", private.addr);
    let out = c.cri_pull_on(&c.sock, &reference, Some((USER, PASSWORD)));
    assert!(
        out.status.success(),
        "{version:?}: {}
{}",
        String::from_utf8_lossy(&out.stderr),
        c.unlade.log()
    );
    let log = c.unlade.log();
    assert!(
        log.lines().any(|l| l.contains("falls back to containerd")
            && l.contains(&private.addr)
            && l.contains("authentication required")),
        "{version:?}: {log}"
    );
    let by_containerd = |l: &str| private.demo_blob_gets_by(l, "containerd/");
    for l in &layers {
        assert_eq!(by_containerd(l), 1, "{version:?}: {l}");
    }
    remove_images(&c, "k8s.io");
    c.wait_on_disk(&root, 0);
    // Through the proxy: the fast path, with kubelet's credentials.
    let out = c.cri_pull_on(&c.cri_proxy(), &reference, Some((USER, PASSWORD)));
    assert!(
        out.status.success(),
        "{version:?}: {}
{}",
        String::from_utf8_lossy(&out.stderr),
        c.unlade.log()
    );
    for l in &layers {
        assert_eq!(
            by_containerd(l),
            1,
            "{version:?}: containerd fetched {l} again"
        );
    }
    assert_eq!(committed(&root), layers.len(), "{version:?}");
    let mode = std::fs::metadata(c.cri_proxy()).expect("proxy socket");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600, "{version:?}");
    let log = c.unlade.log();
    assert!(
        log.lines()
            .any(|l| l.contains("pulled for containerd")
                && l.contains(&format!("image={reference}"))),
        "{version:?}: {log}"
    );
    assert!(!log.contains(PASSWORD), "{version:?}: {log}");
    for dir in [root.as_path(), c.dir.path(), c.root.as_path()] {
        let found = files_containing(dir, PASSWORD.as_bytes());
        assert!(
            found.is_empty(),
            "{version:?}: the password is in {found:?}"
        );
    }
    remove_images(&c, "k8s.io");
    c.wait_on_disk(&root, 0);
    eprintln!(
        "{version:?}: started in {:.1} s, first round {:.1} s, all {:.1} s",
        started.as_secs_f64(),
        first_round.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn containerd_1_6() {
    each_version(Version::V1_6);
}

#[test]
fn containerd_1_7() {
    each_version(Version::V1_7);
}

#[test]
fn containerd_2_1_transfer() {
    each_version(Version::V2_1Transfer);
}

#[test]
fn containerd_2_1_local() {
    each_version(Version::V2_1Local);
}
