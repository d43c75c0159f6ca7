//! A private image (a registry with Basic auth, the credentials only in
//! CRI's `PullImageRequest.auth`, as kubelet sends a pod's
//! `imagePullSecrets`), pulled through CRI into snapshotter `unlade` on the
//! real containerd:
//!
//! - through unlade's CRI proxy (`--cri-listen`), the credentials reach
//!   the fast path: unlade fetches every layer, containerd none, and the
//!   password is nowhere in unlade's log or files;
//! - straight to containerd, unlade has no credentials: its fast path falls
//!   back, containerd fetches the layers itself, and the pull succeeds.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use unlade_tests::containerd::{cri_config, Containerd, Server};
use unlade_tests::registry::{demo_layout, RegAuth, Registry};
use unlade_tests::*;

const USER: &str = "kubelet-user";
const PASSWORD: &str = "pull-secret-7f3a9c";

/// A registry with Basic auth holding the demo image as `demo:latest`.
fn private_registry() -> Registry {
    let reg = Registry::start(RegAuth::Basic(USER.into(), PASSWORD.into()));
    reg.push(&demo_layout(), "latest", "demo:latest");
    reg
}

/// containerd with CRI, its registry at `addr` over plain HTTP; with
/// `proxy`, unlade serves its CRI proxy there, forwarding to containerd
/// (restarted so: the harness starts it before containerd's socket
/// exists).
fn containerd_with(root: &Path, addr: &str, proxy: Option<&Path>) -> Containerd {
    let none = root.with_extension("no-hosts");
    let mut args = vec!["--plain-http", "--hosts-dir", none.to_str().expect("utf8")];
    let mut c = Containerd::start_with(root, &cri_config(addr), &args);
    let Some(proxy) = proxy else {
        return c;
    };
    c.unlade.terminate();
    let upstream = c.sock.clone();
    args.extend_from_slice(&[
        "--cri-listen",
        proxy.to_str().expect("utf8"),
        "--cri-upstream",
        upstream.to_str().expect("utf8"),
    ]);
    c.unlade = Server::start_with(root, &c.dir.path().join("unlade.sock"), &args);
    // containerd redials the proxy plugin with a back-off of at most 3 s;
    // a Prepare is a call that reaches it (a listing is answered from
    // containerd's own records).
    let t0 = Instant::now();
    while !c
        .ctr(&["snapshots", "--snapshotter", "unlade", "prepare", "probe"])
        .status
        .success()
    {
        assert!(t0.elapsed() < Duration::from_secs(20), "{}", c.unlade.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    c.ctr_ok(&["snapshots", "--snapshotter", "unlade", "rm", "probe"]);
    c
}

/// One CRI PullImage of `reference` on socket `sock`, with the
/// credentials in its `auth`.
fn cri_pull_with_auth(sock: &Path, reference: &str) -> std::process::Output {
    Command::new("/usr/bin/python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../perf/cri_pull.py"))
        .arg(sock)
        .arg(reference)
        .arg("1")
        .env("CRI_PULL_AUTH", format!("{USER}:{PASSWORD}"))
        .output()
        .expect("run cri_pull.py")
}

/// The demo image's layer digests as the registry holds them.
fn layers(reg: &Registry) -> Vec<String> {
    let out = sh(Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("--creds={USER}:{PASSWORD}"))
        .arg(format!("docker://{}/demo:latest", reg.addr)));
    let man: serde_json::Value = serde_json::from_slice(&out.stdout).expect("manifest");
    man["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("digest").to_string())
        .collect()
}

/// How many of the registry's layer blob GETs the client with user agent
/// `agent` made.
fn layer_gets(reg: &Registry, agent: &str) -> usize {
    let layers = layers(reg);
    reg.log()
        .lines()
        .filter(|l| {
            l.contains(agent)
                && layers
                    .iter()
                    .any(|d| l.contains(&format!("GET /v2/demo/blobs/{d}")))
        })
        .count()
}

/// Every file under `dir` whose bytes contain `needle` (sockets and
/// such skipped).
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(md) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if md.is_dir() {
                stack.push(p);
            } else if md.is_file() {
                if let Ok(b) = std::fs::read(&p) {
                    if b.windows(needle.len()).any(|w| w == needle) {
                        found.push(p.display().to_string());
                    }
                }
            }
        }
    }
    found
}

#[test]
fn a_private_image_takes_the_fast_path_through_the_cri_proxy() {
    let reg = private_registry();
    let t = tmp();
    let root = t.path().join("root");
    let proxy_sock = t.path().join("run/cri.sock");
    let c = containerd_with(&root, &reg.addr, Some(&proxy_sock));
    // The proxy's socket is the owner's only.
    let mode = std::fs::metadata(&proxy_sock)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");

    let reference = format!("{}/demo:latest", reg.addr);
    let out = cri_pull_with_auth(&proxy_sock, &reference);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.unlade.log()
    );
    let log = c.unlade.log();
    assert!(
        log.contains(&format!("pulled {reference}")),
        "the fast path did not pull: {log}"
    );
    assert!(!log.contains("falls back"), "{log}");
    assert_eq!(
        layer_gets(&reg, "containerd/"),
        0,
        "containerd fetched layers: {}",
        reg.log()
    );
    assert!(layer_gets(&reg, "unlade/") >= 3, "{}", reg.log());
    // The image is containerd's, as a CRI pull's is: ImageStatus and the
    // rest went through the proxy too (the pull asks for the image's
    // status first).
    let images = c.ctr_ok(&["-n", "k8s.io", "images", "ls", "-q"]);
    assert!(images.contains(&reference), "{images}");
    // The secret: not in unlade's log, not in any file of its root or of
    // containerd's state, and lent no longer.
    assert!(!log.contains(PASSWORD), "{log}");
    for dir in [&root, &c.dir.path().to_path_buf()] {
        let found = files_containing(dir, PASSWORD.as_bytes());
        assert!(found.is_empty(), "the password is in {found:?}");
    }
}

#[test]
fn without_the_proxy_a_private_image_falls_back_and_is_pulled() {
    let reg = private_registry();
    let t = tmp();
    let root = t.path().join("root");
    let c = containerd_with(&root, &reg.addr, None);
    let reference = format!("{}/demo:latest", reg.addr);
    let out = cri_pull_with_auth(&c.sock, &reference);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.unlade.log()
    );
    let log = c.unlade.log();
    let fell: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("falls back to containerd"))
        .collect();
    assert!(
        fell.iter()
            .any(|l| l.contains(&reference) && l.contains("authentication required")),
        "{log}"
    );
    // containerd fetched every layer itself, and holds the blobs.
    assert!(layer_gets(&reg, "containerd/") >= 3, "{}", reg.log());
    assert_eq!(layer_gets(&reg, "unlade/"), 0, "{}", reg.log());
    let content = c.ctr_ok(&["-n", "k8s.io", "content", "ls"]);
    assert!(
        content.lines().filter(|l| l.contains("layer")).count() >= 3
            || content.lines().count() >= 5,
        "{content}"
    );
    // A container runs from it.
    let out = c.ctr_ok(&[
        "-n",
        "k8s.io",
        "run",
        "--rm",
        "--snapshotter",
        "unlade",
        &reference,
        "private-hello",
        "hello",
    ]);
    assert_eq!(out.trim(), "Hello, world!");
}
