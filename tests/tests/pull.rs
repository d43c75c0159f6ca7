//! `unlade pull` against Debian's docker-registry on 127.0.0.1, images
//! pushed with skopeo: references by tag and digest, a multi-platform
//! index, Basic and Bearer auth, hosts.toml mirrors (down and working), a
//! stream cut mid-blob (Range resume), wrong bytes, 404, 503, and 20
//! concurrent pulls (each blob fetched once, counted by a proxy).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use unlade_tests::registry::{
    self, free_port, Fault, Proxy, RegAuth, Registry, TestCa, TokenServer,
};
use unlade_tests::*;

/// A test image: its layers, the layout it was pushed from, chain IDs.
struct Img {
    layers: Vec<TestLayer>,
    layout: PathBuf,
    chains: Vec<String>,
    /// Blob digests, bottom first.
    blobs: Vec<String>,
}

/// A layer of these files (and an optional symlink), archived by GNU tar
/// from a real directory: every directory has its entry and times.
fn layer(
    dir: &Path,
    files: &[(&str, Vec<u8>)],
    link: Option<(&str, &str)>,
    mt: &'static str,
) -> TestLayer {
    for (name, data) in files {
        let f = dir.join(name);
        std::fs::create_dir_all(f.parent().expect("parent")).expect("mkdir");
        std::fs::write(&f, data).expect("write");
    }
    if let Some((name, target)) = link {
        std::os::unix::fs::symlink(target, dir.join(name)).expect("symlink");
    }
    tar_of(dir, mt)
}

/// Three layers (gzip, zstd, gzip with a whiteout and a 1.5 MiB file so
/// that cuts land mid-blob) in an OCI layout tagged `v1`.
fn image(work: &Path, seed: u64) -> Img {
    image_sized(work, seed, 1_500_000)
}

/// [`image`] with a top-layer file of `big` bytes.
fn image_sized(work: &Path, seed: u64, big: usize) -> Img {
    let d = |i: u32| work.join(format!("img{seed}-l{i}"));
    let l0 = layer(
        &d(0),
        &[
            ("etc/os-release", format!("ID=test{seed}\n").into_bytes()),
            ("bin/tool", noise(200_000, seed)),
            ("etc/gone", b"bye".to_vec()),
        ],
        None,
        MT_GZ,
    );
    let l1 = layer(
        &d(1),
        &[("usr/share/data.bin", noise(300_000, seed + 1))],
        Some(("usr/link", "share/data.bin")),
        MT_ZST,
    );
    let l2 = layer(
        &d(2),
        &[
            ("opt/big.bin", noise(big, seed + 2)),
            ("etc/.wh.gone", Vec::new()),
        ],
        None,
        MT_GZ,
    );
    let layout = work.join(format!("layout-{seed}"));
    let layers = vec![l0, l1, l2];
    let refs: Vec<&TestLayer> = layers.iter().collect();
    let chains = image_layout(&layout, &[("v1", &refs)]).remove(0);
    let blobs = layers.iter().map(|l| sha256(&l.blob())).collect();
    Img {
        layers,
        layout,
        chains,
        blobs,
    }
}

struct Env {
    docker_config: PathBuf,
    hosts_dir: PathBuf,
}

impl Env {
    fn new(work: &Path) -> Env {
        let e = Env {
            docker_config: work.join("docker"),
            hosts_dir: work.join("certs.d"),
        };
        std::fs::create_dir_all(&e.docker_config).expect("mkdir");
        std::fs::create_dir_all(&e.hosts_dir).expect("mkdir");
        e
    }

    fn login(&self, host: &str, user: &str, pass: &str) {
        use base64::Engine;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        std::fs::write(
            self.docker_config.join("config.json"),
            format!(r#"{{"auths": {{"{host}": {{"auth": "{auth}"}}}}}}"#),
        )
        .expect("write docker config");
    }

    fn hosts(&self, registry: &str, toml: &str) {
        let d = self.hosts_dir.join(registry);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("hosts.toml"), toml).expect("write hosts.toml");
    }

    fn pull_cmd(&self, reference: &str, root: &Path, extra: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.arg("pull")
            .arg(reference)
            .arg("--root")
            .arg(root)
            .arg("--plain-http")
            .arg("--hosts-dir")
            .arg(&self.hosts_dir)
            .args(extra)
            .env("DOCKER_CONFIG", &self.docker_config);
        c
    }

    fn pull(&self, reference: &str, root: &Path, extra: &[&str]) -> Output {
        self.pull_cmd(reference, root, extra)
            .output()
            .expect("run unlade pull")
    }
}

fn expected(img: &Img, work: &Path) -> Tree {
    let refs: Vec<&TestLayer> = img.layers.iter().collect();
    let w = work.join(format!("expect-{}", &img.chains[0][7..15]));
    std::fs::create_dir_all(&w).expect("mkdir");
    expected_merge(&refs, &w)
}

fn one_error_line(out: &Output) -> String {
    assert!(!out.status.success(), "expected failure, got success");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("unlade: error"))
        .collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    lines[0].to_string()
}

fn committed(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root.join("snapshots/committed"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn pull_by_tag_and_digest_gives_the_layers_merged() {
    let work = tmp();
    let env = Env::new(work.path());
    let reg = Registry::start(RegAuth::None);
    let img = image(work.path(), 1);
    reg.push(&img.layout, "v1", "team/app:v1");
    let proxy = Proxy::start(&reg.addr);
    let root = work.path().join("root");

    let tag_ref = format!("{}/team/app:v1", proxy.addr);
    let out = env.pull(&tag_ref, &root, &["--json"]);
    let top = last_line(&out);
    assert_eq!(top, img.chains[2]);
    // The JSON summary is the line before.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value =
        serde_json::from_str(stdout.lines().rev().nth(1).expect("json line")).expect("json");
    assert_eq!(json["top_chain"], img.chains[2]);
    assert_eq!(json["layers_applied"], 3);
    assert_eq!(json["blobs_fetched"], 3);
    let total: u64 = img.layers.iter().map(|l| l.blob().len() as u64).sum();
    assert_eq!(json["bytes_fetched"], total);
    let manifest = json["manifest"].as_str().expect("manifest").to_string();
    // Not a terminal: the progress is plain lines on stderr, per layer.
    let stderr = String::from_utf8_lossy(&out.stderr);
    for b in &img.blobs {
        assert!(stderr.contains(&format!("layer {b} (")), "{stderr}");
    }
    assert!(stderr.contains("): done"), "{stderr}");
    assert_same(
        &expected(&img, work.path()),
        &mounted_tree(&root, &top, work.path()),
        "pulled image",
    );
    for b in &img.blobs {
        assert_eq!(proxy.blob_gets(b).len(), 1, "blob {b} fetched once");
    }
    // The image record names the normalized reference.
    let images = Command::new(bin())
        .args(["images", "ls", "--root"])
        .arg(&root)
        .output()
        .expect("images ls");
    assert!(String::from_utf8_lossy(&images.stdout).contains(&tag_ref));

    // Again: everything is committed, no blob is asked for.
    let before = proxy.seen().len();
    assert_eq!(last_line(&env.pull(&tag_ref, &root, &[])), top);
    let again: Vec<_> = proxy.seen()[before..].to_vec();
    assert!(
        again.iter().all(|s| !s.path.contains("/blobs/")),
        "a second pull fetched blobs: {again:?}"
    );

    // By digest, and by tag@digest, into fresh roots.
    for r in [
        format!("{}/team/app@{manifest}", reg.addr),
        format!("{}/team/app:v1@{manifest}", reg.addr),
    ] {
        let root2 = work.path().join(format!("root-{}", r.len()));
        assert_eq!(last_line(&env.pull(&r, &root2, &["-q"])), top, "{r}");
    }
}

#[test]
fn an_index_gives_the_platform_asked_for() {
    let work = tmp();
    let env = Env::new(work.path());
    let reg = Registry::start(RegAuth::None);
    let dir = work.path().join("multi");
    let amd = image(work.path(), 10);
    let arm = image(work.path(), 20);
    // One layout whose tag names an index of both images.
    let mut b = LayoutBuilder::new(&dir);
    let mut descs = Vec::new();
    for (img, plat) in [(&amd, "linux/amd64"), (&arm, "linux/arm64/v8")] {
        let diff_ids: Vec<String> = img.layers.iter().map(|l| l.diff_id()).collect();
        let blobs: Vec<Vec<u8>> = img.layers.iter().map(|l| l.blob()).collect();
        let layers: Vec<(&str, &[u8])> = img
            .layers
            .iter()
            .zip(&blobs)
            .map(|(l, b)| (l.media_type, b.as_slice()))
            .collect();
        descs.push(b.image(plat, &diff_ids, &layers, false));
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": descs,
    });
    let (d, s) = b.blob(index.to_string().as_bytes());
    b.add(
        serde_json::json!({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": d, "size": s}),
        Some("multi"),
    );
    b.finish();
    reg.push(&dir, "multi", "multi:1");
    let r = format!("{}/multi:1", reg.addr);
    let root = work.path().join("root");
    assert_eq!(
        last_line(&env.pull(&r, &root, &["-q", "--platform", "linux/arm64/v8"])),
        arm.chains[2]
    );
    if std::env::consts::ARCH == "x86_64" {
        assert_eq!(last_line(&env.pull(&r, &root, &["-q"])), amd.chains[2]);
    }
    let e = one_error_line(&env.pull(&r, &root, &["--platform", "linux/s390x"]));
    assert!(e.contains("no manifest for platform linux/s390x"), "{e}");
}

#[test]
fn basic_auth_comes_from_the_docker_config() {
    let work = tmp();
    let env = Env::new(work.path());
    let reg = Registry::start(RegAuth::Basic("alice".into(), "wonder land".into()));
    let img = image(work.path(), 30);
    reg.push(&img.layout, "v1", "private/app:v1");
    let r = format!("{}/private/app:v1", reg.addr);
    let root = work.path().join("root");
    let e = one_error_line(&env.pull(&r, &root, &[]));
    assert!(
        e.contains("authentication required") && e.contains(&reg.addr),
        "{e}"
    );
    env.login(&reg.addr, "alice", "wrong");
    let e = one_error_line(&env.pull(&r, &root, &[]));
    assert!(e.contains("HTTP 401"), "{e}");
    env.login(&reg.addr, "alice", "wonder land");
    assert_eq!(last_line(&env.pull(&r, &root, &["-q"])), img.chains[2]);
}

/// A `docker-credential-NAME` helper in `dir`, answering `get` for
/// `host` alone with user `user` and secret `secret` (by Docker's
/// protocol: the server on stdin, JSON out), "credentials not found"
/// for any other; each call is counted in `dir/NAME.calls`.
fn credential_helper(dir: &Path, name: &str, host: &str, user: &str, secret: &str) {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(format!("docker-credential-{name}"));
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 3\nread -r server\necho x >> {calls}\n\
             if [ \"$server\" = '{host}' ]; then\n  \
             printf '{{\"ServerURL\":\"%s\",\"Username\":\"{user}\",\"Secret\":\"{secret}\"}}' \"$server\"\n\
             else\n  echo 'credentials not found in native keychain'; exit 1\nfi\n",
            calls = dir.join(format!("{name}.calls")).display()
        ),
    )
    .expect("write helper");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Credentials from the Docker config's credential helpers: its
/// `credHelpers` entry for the registry comes before `credsStore`, which
/// comes before `auths`; a helper with nothing for the registry passes
/// to the next; one that fails is an error naming it. A helper's `<token>`
/// user is an identity token, exchanged at a Bearer realm by OAuth2's
/// refresh grant.
#[test]
fn credential_helpers_come_before_auths() {
    use base64::Engine;
    let work = tmp();
    let env = Env::new(work.path());
    let reg = Registry::start(RegAuth::Basic("alice".into(), "wonder land".into()));
    let img = image(work.path(), 35);
    reg.push(&img.layout, "v1", "private/app:v1");
    let r = format!("{}/private/app:v1", reg.addr);
    let bin_dir = work.path().join("bin");
    std::fs::create_dir(&bin_dir).expect("mkdir");
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let config = |json: String| {
        std::fs::write(env.docker_config.join("config.json"), json).expect("write config")
    };
    let wrong = base64::engine::general_purpose::STANDARD.encode("alice:wrong");
    let right = base64::engine::general_purpose::STANDARD.encode("alice:wonder land");
    credential_helper(&bin_dir, "right", &reg.addr, "alice", "wonder land");
    credential_helper(&bin_dir, "wrong", &reg.addr, "alice", "nope");
    credential_helper(&bin_dir, "other", "elsewhere.example", "x", "y");
    std::fs::write(
        bin_dir.join("docker-credential-broken"),
        "#!/bin/sh\necho 'the keychain is locked' >&2\nexit 2\n",
    )
    .expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        bin_dir.join("docker-credential-broken"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    let pull = |root: &str| {
        env.pull_cmd(&r, &work.path().join(root), &["-q"])
            .env("PATH", &path)
            .output()
            .expect("run unlade pull")
    };
    // credHelpers' entry wins over credsStore and auths, both wrong.
    config(format!(
        r#"{{"credHelpers": {{"{}": "right"}}, "credsStore": "wrong", "auths": {{"{}": {{"auth": "{wrong}"}}}}}}"#,
        reg.addr, reg.addr
    ));
    assert_eq!(last_line(&pull("r1")), img.chains[2]);
    // credsStore wins over auths.
    config(format!(
        r#"{{"credsStore": "right", "auths": {{"{}": {{"auth": "{wrong}"}}}}}}"#,
        reg.addr
    ));
    assert_eq!(last_line(&pull("r2")), img.chains[2]);
    // A helper without credentials for the registry passes to auths.
    config(format!(
        r#"{{"credHelpers": {{"{}": "other"}}, "credsStore": "other", "auths": {{"{}": {{"auth": "{right}"}}}}}}"#,
        reg.addr, reg.addr
    ));
    assert_eq!(last_line(&pull("r3")), img.chains[2]);
    assert!(
        std::fs::read_to_string(bin_dir.join("other.calls"))
            .expect("the helper was asked")
            .lines()
            .count()
            >= 2
    );
    // A helper that is not installed has nothing (as for a node whose
    // config names Docker Desktop's): auths serve.
    config(format!(
        r#"{{"credsStore": "desktop", "auths": {{"{}": {{"auth": "{right}"}}}}}}"#,
        reg.addr
    ));
    assert_eq!(last_line(&pull("r3b")), img.chains[2]);
    // A helper that fails: one line naming it and what it said.
    config(format!(
        r#"{{"credHelpers": {{"{}": "broken"}}}}"#,
        reg.addr
    ));
    let e = one_error_line(&pull("r4"));
    assert!(
        e.contains("credential helper \"broken\"") && e.contains("the keychain is locked"),
        "{e}"
    );
    // A helper named by path is refused, not run.
    config(format!(
        r#"{{"credHelpers": {{"{}": "../../bin/sh"}}}}"#,
        reg.addr
    ));
    let e = one_error_line(&pull("r5"));
    assert!(e.contains("not a helper name"), "{e}");

    // An identity token from a helper, at a Bearer realm.
    let tokens = TokenServer::start("bob", "builder");
    let treg = Registry::start(RegAuth::Token(tokens.clone()));
    treg.push(&img.layout, "v1", "tok/app:v1");
    credential_helper(
        &bin_dir,
        "idt",
        &treg.addr,
        "<token>",
        &tokens.identity_token(),
    );
    config(format!(r#"{{"credHelpers": {{"{}": "idt"}}}}"#, treg.addr));
    let out = env
        .pull_cmd(
            &format!("{}/tok/app:v1", treg.addr),
            &work.path().join("r6"),
            &["-q"],
        )
        .env("PATH", &path)
        .output()
        .expect("run unlade pull");
    assert_eq!(last_line(&out), img.chains[2]);
    assert!(tokens.issued.load(std::sync::atomic::Ordering::SeqCst) >= 1);
}

/// A registry that sends blob downloads elsewhere (a CDN, another
/// host): the pull follows, and the registry's credentials do not.
#[test]
fn credentials_never_follow_a_redirect() {
    use std::io::{BufRead, BufReader, Write};
    let work = tmp();
    let env = Env::new(work.path());
    let reg = Registry::start(RegAuth::Basic("alice".into(), "wonder land".into()));
    let img = image(work.path(), 37);
    reg.push(&img.layout, "v1", "private/app:v1");
    // The other host: serves blobs from the registry's storage and notes
    // each request's Authorization header.
    let cdn = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let cdn_addr = cdn.local_addr().expect("addr").to_string();
    let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Option<String>>::new()));
    let sent2 = sent.clone();
    // blobs/sha256/<2 hex>/<hex>/data, as Registry::blob_file has them.
    let zero = reg.blob_file(&format!("sha256:{}", "0".repeat(64)));
    let blobs = zero.ancestors().nth(3).expect("blob dir").to_path_buf();
    std::thread::spawn(move || {
        for s in cdn.incoming().flatten() {
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let mut auth = None;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    if k.eq_ignore_ascii_case("authorization") {
                        auth = Some(v.trim().to_string());
                    }
                }
            }
            sent2.lock().expect("lock").push(auth);
            let digest = line
                .split("/blobs/")
                .nth(1)
                .unwrap_or("")
                .split(' ')
                .next()
                .unwrap_or("");
            let hex = digest.strip_prefix("sha256:").unwrap_or("");
            let body = if hex.len() == 64 {
                std::fs::read(blobs.join(&hex[..2]).join(hex).join("data")).unwrap_or_default()
            } else {
                Vec::new()
            };
            let mut s = s;
            let _ = s.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            let _ = s.write_all(&body);
        }
    });
    let front = Proxy::start(&reg.addr);
    front.fault(Fault::Redirect(
        "/blobs/".into(),
        format!("http://{cdn_addr}"),
    ));
    env.login(&front.addr, "alice", "wonder land");
    let r = format!("{}/private/app:v1", front.addr);
    let out = env.pull(&r, &work.path().join("root"), &["-q"]);
    assert_eq!(
        last_line(&out),
        img.chains[2],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent = sent.lock().expect("lock").clone();
    assert!(!sent.is_empty(), "no download went to the other host");
    assert!(
        sent.iter().all(Option::is_none),
        "credentials followed a redirect: {sent:?}"
    );
}

#[test]
fn bearer_tokens_are_fetched_once_and_reused() {
    let work = tmp();
    let env = Env::new(work.path());
    let tokens = TokenServer::start("bob", "builder");
    let reg = Registry::start(RegAuth::Token(tokens.clone()));
    let img = image(work.path(), 40);
    reg.push(&img.layout, "v1", "tok/app:v1");
    let r = format!("{}/tok/app:v1", reg.addr);
    let root = work.path().join("root");
    // Anonymous: the token server refuses, the error says so.
    let e = one_error_line(&env.pull(&r, &root, &[]));
    assert!(e.contains("token from") && e.contains("401"), "{e}");
    env.login(&reg.addr, "bob", "builder");
    let issued = tokens.issued.load(std::sync::atomic::Ordering::SeqCst);
    let out = env.pull(&r, &root, &["--json"]);
    assert_eq!(last_line(&out), img.chains[2]);
    let after = tokens.issued.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(after - issued, 1, "one token for the whole pull");
    assert_same(
        &expected(&img, work.path()),
        &mounted_tree(&root, &img.chains[2], work.path()),
        "token-auth pull",
    );
}

#[test]
fn mirrors_serve_first_and_a_dead_one_falls_back() {
    let work = tmp();
    let env = Env::new(work.path());
    let reg = Registry::start(RegAuth::None);
    let img = image(work.path(), 50);
    reg.push(&img.layout, "v1", "lib/app:v1");
    // The "registry" the reference names is a proxy (so upstream traffic
    // is counted); the mirror is another proxy to the same storage.
    let upstream = Proxy::start(&reg.addr);
    let mirror = Proxy::start(&reg.addr);
    let r = format!("{}/lib/app:v1", upstream.addr);

    env.hosts(
        &upstream.addr,
        &format!(
            "server = \"http://{}\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            upstream.addr, mirror.addr
        ),
    );
    let root = work.path().join("root");
    assert_eq!(last_line(&env.pull(&r, &root, &["-q"])), img.chains[2]);
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());
    for b in &img.blobs {
        let gets = mirror.blob_gets(b);
        assert_eq!(gets.len(), 1);
        assert!(
            gets[0].path.ends_with(&format!("?ns={}", upstream.addr)),
            "{:?}",
            gets[0]
        );
    }

    // A mirror that is down: the upstream serves.
    let dead = format!("127.0.0.1:{}", free_port());
    env.hosts(
        &upstream.addr,
        &format!(
            "server = \"http://{}\"\n[host.\"http://{dead}\"]\n",
            upstream.addr
        ),
    );
    let root2 = work.path().join("root2");
    assert_eq!(last_line(&env.pull(&r, &root2, &["-q"])), img.chains[2]);
    for b in &img.blobs {
        assert_eq!(upstream.blob_gets(b).len(), 1);
    }
}

#[test]
fn a_cut_stream_resumes_with_a_range_request() {
    let work = tmp();
    let env = Env::new(work.path());
    let reg = Registry::start(RegAuth::None);
    let img = image(work.path(), 60);
    reg.push(&img.layout, "v1", "cut/app:v1");
    let proxy = Proxy::start(&reg.addr);
    let big = img.blobs[2].clone();
    proxy.fault(Fault::CutAfter(big.clone(), 700_000));
    let r = format!("{}/cut/app:v1", proxy.addr);
    let root = work.path().join("root");
    assert_eq!(last_line(&env.pull(&r, &root, &["-q"])), img.chains[2]);
    let gets = proxy.blob_gets(&big);
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[0].range, None);
    assert_eq!(gets[1].range.as_deref(), Some("bytes=700000-"));
    assert_same(
        &expected(&img, work.path()),
        &mounted_tree(&root, &img.chains[2], work.path()),
        "resumed pull",
    );
}

#[test]
fn wrong_bytes_fail_naming_the_digest_and_nothing_is_kept() {
    let work = tmp();
    let env = Env::new(work.path());
    let reg = Registry::start(RegAuth::None);
    let img = image(work.path(), 70);
    reg.push(&img.layout, "v1", "bad/app:v1");
    let proxy = Proxy::start(&reg.addr);
    let bad = img.blobs[1].clone();
    proxy.fault(Fault::Corrupt(bad.clone()));
    let r = format!("{}/bad/app:v1", proxy.addr);
    let root = work.path().join("root");
    let e = one_error_line(&env.pull(&r, &root, &[]));
    assert!(e.contains(&bad) && e.contains("hashes to"), "{e}");
    // Layer 1 and above are not committed; the bad blob is not kept.
    let c = committed(&root);
    assert!(!c.contains(&img.chains[1][7..].to_string()), "{c:?}");
    assert!(!c.contains(&img.chains[2][7..].to_string()), "{c:?}");
    assert!(!root.join("content/blobs/sha256").join(&bad[7..]).exists());
    assert_eq!(
        std::fs::read_dir(root.join("snapshots/active")).map_or(0, |r| r.count()),
        0
    );
    // From the registry itself the same pull completes.
    let direct = format!("{}/bad/app:v1", reg.addr);
    assert_eq!(last_line(&env.pull(&direct, &root, &["-q"])), img.chains[2]);
}

#[test]
fn not_found_and_server_errors() {
    let work = tmp();
    let env = Env::new(work.path());
    let reg = Registry::start(RegAuth::None);
    let img = image(work.path(), 80);
    reg.push(&img.layout, "v1", "err/app:v1");
    let root = work.path().join("root");
    let e = one_error_line(&env.pull(&format!("{}/err/app:nope", reg.addr), &root, &[]));
    assert!(
        e.contains("err/app:nope") && e.contains("404") && e.contains("not found"),
        "{e}"
    );
    let e = one_error_line(&env.pull(&format!("{}/nosuch/repo:v1", reg.addr), &root, &[]));
    assert!(e.contains("404"), "{e}");
    // 503s are retried (with Retry-After) until the registry answers.
    let proxy = Proxy::start(&reg.addr);
    proxy.fault(Fault::Status("/manifests/".into(), 503, 2));
    proxy.fault(Fault::Status(img.blobs[0].clone(), 503, 1));
    let r = format!("{}/err/app:v1", proxy.addr);
    assert_eq!(last_line(&env.pull(&r, &root, &["-q"])), img.chains[2]);
    // A blob that vanished from the registry: one line naming it.
    std::fs::remove_file(reg.blob_file(&img.blobs[2])).expect("remove blob");
    let root2 = work.path().join("root2");
    let e = one_error_line(&env.pull(&format!("{}/err/app:v1", reg.addr), &root2, &[]));
    assert!(e.contains(&img.blobs[2]), "{e}");
}

#[test]
fn twenty_concurrent_pulls_fetch_each_blob_once() {
    let work = tmp();
    let env = Env::new(work.path());
    let reg = Registry::start(RegAuth::None);
    let img = image(work.path(), 90);
    reg.push(&img.layout, "v1", "many/app:v1");

    // 20 processes on one root.
    let proxy = Proxy::start(&reg.addr);
    let r = format!("{}/many/app:v1", proxy.addr);
    let root = work.path().join("root-procs");
    let children: Vec<_> = (0..20)
        .map(|_| {
            env.pull_cmd(&r, &root, &["-q"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn pull")
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().expect("wait");
        assert_eq!(last_line(&out), img.chains[2]);
    }
    for b in &img.blobs {
        assert_eq!(proxy.blob_gets(b).len(), 1, "blob {b}: 20 processes");
    }
    assert_same(
        &expected(&img, work.path()),
        &mounted_tree(&root, &img.chains[2], work.path()),
        "20 processes",
    );

    // 20 library calls in one process.
    let proxy = Proxy::start(&reg.addr);
    let reference = unlade::Reference::parse(&format!("{}/many/app:v1", proxy.addr)).expect("ref");
    let root = unlade::Root::open(&work.path().join("root-lib"), unlade_tests::root_options())
        .expect("open root");
    let opts = unlade::PullOptions {
        remote: unlade::source::remote::RemoteOptions {
            plain_http: true,
            hosts_dir: None,
            docker_config: Some(env.docker_config.join("config.json")),
            ..Default::default()
        },
        platform: None,
        record_as: None,
        require_chain: None,
    };
    let tops: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..20)
            .map(|_| {
                let (root, reference, opts) = (root.clone(), &reference, &opts);
                s.spawn(move || {
                    root.pull(reference, opts, None, &unlade::Cancel::new())
                        .map(|p| p.unpacked.top_chain)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("join")).collect()
    });
    for t in tops {
        assert_eq!(t.expect("pull").expect("top").to_string(), img.chains[2]);
    }
    let stats = root.stats();
    assert_eq!(stats.layers_applied, 3);
    assert_eq!(stats.blobs_ingested, 3);
    for b in &img.blobs {
        assert_eq!(proxy.blob_gets(b).len(), 1, "blob {b}: 20 library calls");
    }
}

#[test]
fn https_with_the_ca_from_hosts_toml() {
    let work = tmp();
    let env = Env::new(work.path());
    let ca = TestCa::new();
    let reg = Registry::start_tls(RegAuth::None, &ca);
    let img = image(work.path(), 100);
    reg.push(&img.layout, "v1", "tls/app:v1");
    let r = format!("{}/tls/app:v1", reg.addr);
    let server = format!("server = \"https://{}\"\n", reg.addr);
    // Not trusted: one line saying why.
    env.hosts(&reg.addr, &server);
    let root = work.path().join("root");
    let e = one_error_line(&env.pull(&r, &root, &[]));
    assert!(e.contains("certificate") && e.contains(&reg.addr), "{e}");
    // The CA named in hosts.toml (relative to it).
    std::fs::copy(&ca.ca, env.hosts_dir.join(&reg.addr).join("ca.pem")).expect("copy ca");
    env.hosts(&reg.addr, &format!("{server}ca = \"ca.pem\"\n"));
    assert_eq!(last_line(&env.pull(&r, &root, &["-q"])), img.chains[2]);
    // skip_verify trusts anything.
    env.hosts(&reg.addr, &format!("{server}skip_verify = true\n"));
    let root2 = work.path().join("root2");
    assert_eq!(last_line(&env.pull(&r, &root2, &["-q"])), img.chains[2]);
}

/// Regular files, links and devices under `dir` (recursively).
fn non_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => out.extend(non_dirs(&p)),
            Ok(_) => out.push(p),
            Err(_) => {}
        }
    }
    out
}

#[test]
fn a_layer_is_applied_while_its_blob_downloads() {
    let work = tmp();
    let env = Env::new(work.path());
    let reg = Registry::start(RegAuth::None);
    // The top layer's blob (12 MB of noise) stops after 9 MB: decoded
    // blocks (1 MiB each) of its big file reach the applier before.
    let img = image_sized(work.path(), 110, 12_000_000);
    reg.push(&img.layout, "v1", "stream/app:v1");
    let proxy = Proxy::start(&reg.addr);
    proxy.fault(Fault::Stall(img.blobs[2].clone(), 9_000_000));
    let r = format!("{}/stream/app:v1", proxy.addr);
    let root = work.path().join("root");
    let child = env
        .pull_cmd(&r, &root, &["-q"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn pull");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !proxy.stalled.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(
            std::time::Instant::now() < deadline,
            "the blob was never asked for"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // While the rest of the blob is held back, its layer's snapshot
    // already has its big file (only that layer has /opt).
    let mut applied = Vec::new();
    while applied.is_empty() && std::time::Instant::now() < deadline {
        applied = non_dirs(&root.join("snapshots/active"));
        applied.retain(|p| p.ends_with("opt/big.bin"));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let partial = root.join(format!("content/blobs/sha256/{}", &img.blobs[2][7..]));
    assert!(!partial.exists(), "the blob is not complete yet");
    proxy.release();
    let out = child.wait_with_output().expect("wait");
    assert!(
        !applied.is_empty(),
        "nothing applied before the download ended"
    );
    assert_eq!(last_line(&out), img.chains[2]);
    assert!(partial.exists());
}

// Ranged fetch: a blob of more than two chunks comes over several
// connections; registries that do ranges badly get one stream. Chunks of
// 64 KiB here, so that the test image's layers (200 KB to 1.5 MB) split.

const SPLIT: &[&str] = &["--chunk-size", "64K", "--blob-connections", "4"];

/// Pulls `img` (pushed as `repo:v1`) through `proxy` with [`SPLIT`] and
/// `extra`, and checks the mounted result.
fn pull_split(env: &Env, img: &Img, proxy: &Proxy, repo: &str, work: &Path, extra: &[&str]) {
    let r = format!("{}/{repo}:v1", proxy.addr);
    let root = work.join(format!("root-{}", repo.replace('/', "-")));
    let args: Vec<&str> = SPLIT.iter().chain(extra).copied().collect();
    let out = env.pull(&r, &root, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(last_line(&out), img.chains[2]);
    assert_same(
        &expected(img, work),
        &mounted_tree(&root, &img.chains[2], work),
        repo,
    );
}

/// The closed ranges asked for a blob: (first, last) byte.
fn chunk_ranges(gets: &[registry::Seen]) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = gets
        .iter()
        .filter_map(|g| {
            let (a, b) = g
                .range
                .as_deref()?
                .strip_prefix("bytes=")?
                .split_once('-')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect();
    v.sort();
    v
}

fn blob_size(reg: &Registry, digest: &str) -> u64 {
    std::fs::metadata(reg.blob_file(digest))
        .expect("blob in the registry")
        .len()
}

#[test]
fn a_large_blob_comes_in_chunks_over_several_throttled_connections() {
    let work = tmp();
    let env = Env::new(work.path());
    let reg = Registry::start(RegAuth::None);
    let img = image(work.path(), 120);
    reg.push(&img.layout, "v1", "split/app:v1");
    // unlade → proxy (counts) → throttle.py (2 MB/s a connection, 5 ms a
    // request) → registry.
    let throttle = registry::Throttle::start(&reg.addr, 2.0, 5);
    let proxy = Proxy::start(&throttle.addr);
    pull_split(&env, &img, &proxy, "split/app", work.path(), &[]);
    let big = &img.blobs[2];
    let size = blob_size(&reg, big);
    let chunks = size.div_ceil(65536);
    let want: Vec<(u64, u64)> = (0..chunks)
        .map(|i| (i * 65536, ((i + 1) * 65536).min(size) - 1))
        .collect();
    assert_eq!(chunk_ranges(&proxy.blob_gets(big)), want, "each chunk once");
    let most = proxy
        .most_blob_gets
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(most > 1, "{most} blob GETs at once");
    assert!(most <= 3 * 4, "{most}: more than 4 per blob, 3 blobs");
}

#[test]
fn a_registry_that_ignores_ranges_serves_one_stream_remembered_for_its_host() {
    let work = tmp();
    let env = Env::new(work.path());
    let reg = Registry::start(RegAuth::None);
    let img = image(work.path(), 121);
    reg.push(&img.layout, "v1", "norange/app:v1");
    let proxy = Proxy::start(&reg.addr);
    proxy.fault(Fault::IgnoreRange("/blobs/".into()));
    // One download at a time: the first blob teaches the others.
    pull_split(
        &env,
        &img,
        &proxy,
        "norange/app",
        work.path(),
        &["--max-concurrent-downloads", "1"],
    );
    taught_by_one(&proxy, &img, 1, "ignored");
}

/// Of `img`'s blobs, one was asked with a range for its first chunk
/// (`gets` GETs in all: the answer as the stream, or then one stream);
/// the others, after it, with one plain GET each.
fn taught_by_one(proxy: &Proxy, img: &Img, gets: usize, name: &str) {
    let all: Vec<Vec<registry::Seen>> = img.blobs.iter().map(|b| proxy.blob_gets(b)).collect();
    let ranged: Vec<_> = all
        .iter()
        .filter(|g| g.iter().any(|s| s.range.is_some()))
        .collect();
    assert_eq!(
        ranged.len(),
        1,
        "{name}: one blob asked with a range: {all:?}"
    );
    let first = ranged[0];
    assert_eq!(first.len(), gets, "{name}: {first:?}");
    assert_eq!(first[0].range.as_deref(), Some("bytes=0-65535"), "{name}");
    assert!(
        first[1..].iter().all(|s| s.range.is_none()),
        "{name}: {first:?}"
    );
    for g in &all {
        assert!(
            std::ptr::eq(g, first) || (g.len() == 1 && g[0].range.is_none()),
            "{name}: remembered, no range asked again: {g:?}"
        );
    }
}

#[test]
fn refused_or_wrong_ranges_fall_back_to_one_stream() {
    let work = tmp();
    let env = Env::new(work.path());
    let reg = Registry::start(RegAuth::None);
    let cases = [
        ("r416", Fault::RangeStatus("/blobs/".into(), 416)),
        ("r501", Fault::RangeStatus("/blobs/".into(), 501)),
        ("shift", Fault::ShiftContentRange("/blobs/".into())),
    ];
    for (i, (name, fault)) in cases.into_iter().enumerate() {
        let img = image(work.path(), 130 + i as u64);
        let repo = format!("{name}/app");
        reg.push(&img.layout, "v1", &format!("{repo}:v1"));
        // A proxy (a host) of its own: what one remembers is its own.
        let proxy = Proxy::start(&reg.addr);
        proxy.fault(fault);
        pull_split(
            &env,
            &img,
            &proxy,
            &repo,
            work.path(),
            &["--max-concurrent-downloads", "1"],
        );
        taught_by_one(&proxy, &img, 2, name);
    }
}

#[test]
fn a_chunk_that_keeps_failing_goes_on_as_one_stream() {
    let work = tmp();
    let env = Env::new(work.path());
    let reg = Registry::start(RegAuth::None);
    let img = image(work.path(), 140);
    reg.push(&img.layout, "v1", "failchunk/app:v1");
    let proxy = Proxy::start(&reg.addr);
    let big = img.blobs[2].clone();
    proxy.fault(Fault::FailRange(big.clone(), 3 * 65536, 503));
    pull_split(&env, &img, &proxy, "failchunk/app", work.path(), &[]);
    let gets = proxy.blob_gets(&big);
    let tries = gets
        .iter()
        .filter(|g| g.range.as_deref() == Some("bytes=196608-262143"))
        .count();
    assert_eq!(tries, 5, "the root's attempts: {gets:?}");
    // The rest over one stream, from the prefix (at most where the
    // failing chunk starts).
    let open: Vec<u64> = gets
        .iter()
        .filter_map(|g| {
            g.range
                .as_deref()?
                .strip_prefix("bytes=")?
                .strip_suffix('-')?
                .parse()
                .ok()
        })
        .collect();
    assert!(open.len() == 1 && open[0] <= 3 * 65536, "{gets:?}");
}

#[test]
fn a_stalled_chunk_is_asked_again_and_a_cut_one_resumes() {
    let work = tmp();
    let env = Env::new(work.path());
    let reg = Registry::start(RegAuth::None);
    let img = image(work.path(), 150);
    reg.push(&img.layout, "v1", "stallchunk/app:v1");
    let proxy = Proxy::start(&reg.addr);
    let big = img.blobs[2].clone();
    proxy.fault(Fault::HangRange(big.clone(), 2 * 65536));
    // The first GET of the blob (its first chunk) breaks after 10000
    // bytes.
    proxy.fault(Fault::CutAfter(big.clone(), 10_000));
    pull_split(
        &env,
        &img,
        &proxy,
        "stallchunk/app",
        work.path(),
        &["--stall-timeout", "2"],
    );
    let ranges: Vec<Option<String>> = proxy.blob_gets(&big).into_iter().map(|g| g.range).collect();
    let asked = |r: &str| ranges.iter().filter(|x| x.as_deref() == Some(r)).count();
    assert_eq!(
        asked("bytes=131072-196607"),
        2,
        "stalled, then asked again: {ranges:?}"
    );
    assert_eq!(
        asked("bytes=10000-65535"),
        1,
        "resumed where it broke: {ranges:?}"
    );
    assert!(
        ranges.iter().all(Option::is_some),
        "no single stream: {ranges:?}"
    );
}
