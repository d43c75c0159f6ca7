//! unlade as containerd's snapshotter, against the real containerd (1.6)
//! and runc: `ctr images import` and `ctr run` through the proxy plugin,
//! the snapshot API as `ctr snapshots` drives it, containerd's garbage
//! collection removing snapshots through Remove, and the server killed
//! and restarted.

use std::path::Path;
use std::process::Command;

use unlade_tests::containerd::{on_disk, Containerd};
use unlade_tests::*;

const DEMO: &str = "docker.io/unlade/demo:latest";

/// The snapshots containerd lists for `unlade`: (name, parent, kind).
fn snapshots(c: &Containerd) -> Vec<(String, String, String)> {
    c.ctr_ok(&["snapshots", "--snapshotter", "unlade", "ls"])
        .lines()
        .skip(1)
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w[..] {
                [k, kind] => (k.into(), String::new(), kind.into()),
                [k, p, kind] => (k.into(), p.into(), kind.into()),
                _ => panic!("ctr snapshots ls line {l:?}"),
            }
        })
        .collect()
}

/// Makes view `key` of `parent` with `ctr snapshots view --target`, mounts
/// what that prints, snapshots the tree and unmounts. (ctr holds the view
/// by a lease only while it runs; containerd's GC may remove it soon after,
/// so its mounts are taken as it is made.)
fn ctr_mounted_tree(c: &Containerd, key: &str, parent: &str) -> Tree {
    let target = c.dir.path().join(format!("mnt-{key}"));
    std::fs::create_dir_all(&target).expect("mkdir");
    let line = c.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        "unlade",
        "view",
        "--target",
        target.to_str().expect("utf8"),
        key,
        parent,
    ]);
    let line = line.trim().replace("mount -t bind", "mount --bind");
    sh(Command::new("sh").arg("-c").arg(&line));
    let tree = snapshot(&target);
    sh(Command::new("umount").arg(&target));
    tree
}

/// The tree of the demo image as unlade itself unpacks it.
fn unlade_demo_tree(work: &Path) -> Tree {
    let root = work.join("unlade-own");
    let layout = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/demo-image");
    let chain = last_line(&unpack(&format!("{}:latest", layout.display()), &root, &[]));
    mounted_tree(&root, &chain, work)
}

/// containerd's applier writes the demo image into the mounts unlade
/// returns; the image's tree as containerd mounts it equals unlade's own
/// unpack of it; `ctr run` runs its `hello`; removing the image lets
/// containerd's GC remove every snapshot from unlade's root.
#[test]
fn ctr_imports_and_runs_the_demo_image() {
    let t = tmp();
    let root = t.path().join("root");
    let c = Containerd::start(&root, "");
    c.import_demo();
    let snaps = snapshots(&c);
    assert_eq!(snaps.len(), 3, "{snaps:?}");
    assert!(snaps.iter().all(|s| s.2 == "Committed"), "{snaps:?}");
    assert_eq!(on_disk(&root), 3);
    // The top: the one no other names as parent.
    let top = snaps
        .iter()
        .find(|s| !snaps.iter().any(|o| o.1 == s.0))
        .expect("a top")
        .0
        .clone();

    // The image as containerd shows it to a container, against unlade's
    // own unpack. Modification times of directories are left out: the
    // applier creates a directory's children through the overlay after
    // setting its time, unlike unlade, which sets them last.
    let strip = |t: Tree| -> Tree {
        t.into_iter()
            .map(|(k, mut n)| {
                if n.kind == 'd' {
                    n.mtime_ns = None;
                }
                (k, n)
            })
            .collect()
    };
    let via_ctr = strip(ctr_mounted_tree(&c, "demo-view", &top));
    let own = strip(unlade_demo_tree(t.path()));
    assert_same(&own, &via_ctr, "the demo image through containerd");

    let out = c.ctr_ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "unlade",
        DEMO,
        "unlade-hello",
        "hello",
    ]);
    assert_eq!(out.trim(), "Hello, world!");
    // The container's snapshot is gone with it (containerd removes it
    // from the backend by its garbage collection, soon after), and
    // nothing is left mounted.
    c.wait_on_disk(&root, 3);
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    assert!(!mounts.contains(root.to_str().expect("utf8")), "{mounts}");

    c.ctr_ok(&["images", "rm", "--sync", DEMO]);
    assert_eq!(snapshots(&c), vec![]);
    c.wait_on_disk(&root, 0);
}

/// A container's writable snapshot as `ctr snapshots` drives it: its
/// mounts show the image, what is written through them (a new file, a
/// removal, a hard link to a file of a lower layer) is what commits; the
/// server killed with SIGKILL makes containerd's calls fail with a clear
/// error, and once restarted it serves the same snapshots; unlade's own gc
/// leaves containerd's snapshots alone; SIGTERM stops it cleanly.
#[test]
fn snapshots_survive_a_killed_server_and_commit_what_was_written() {
    let t = tmp();
    let root = t.path().join("root");
    let mut c = Containerd::start(&root, "");
    c.import_demo();
    let snaps = snapshots(&c);
    let top = snaps
        .iter()
        .find(|s| !snaps.iter().any(|o| o.1 == s.0))
        .expect("a top")
        .0
        .clone();
    fn u(c: &Containerd, args: &[&str]) -> String {
        let mut a = vec!["snapshots", "--snapshotter", "unlade"];
        a.extend_from_slice(args);
        c.ctr_ok(&a)
    }
    u(&c, &["prepare", "work", &top]);
    let target = t.path().join("work-mnt");
    std::fs::create_dir(&target).expect("mkdir");
    let line = u(&c, &["mounts", target.to_str().expect("utf8"), "work"]);
    sh(Command::new("sh")
        .arg("-c")
        .arg(line.trim().replace("mount -t bind", "mount --bind")));
    assert!(
        target.join("usr/bin/hello").exists(),
        "the image shows through"
    );
    std::fs::write(target.join("new-file"), b"written").expect("write");
    std::fs::hard_link(
        target.join("usr/bin/hello"),
        target.join("usr/bin/hello-link"),
    )
    .expect("link");
    std::fs::remove_file(target.join("usr/bin/hello")).expect("remove");
    sh(Command::new("umount").arg(&target));
    u(&c, &["commit", "work-done", "work"]);
    u(&c, &["label", "work-done", "purpose=test"]);
    assert!(u(&c, &["info", "work-done"]).contains("\"purpose\": \"test\""));
    assert!(u(&c, &["usage", "work-done"]).contains("work-done"));

    // Killed: containerd's calls fail as unavailable (naming the socket
    // once containerd redials it).
    c.unlade.kill();
    let out = c.ctr(&[
        "snapshots",
        "--snapshotter",
        "unlade",
        "view",
        "v-dead",
        "work-done",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unavailable"), "{err}");
    // Restarted on the same root and (stale) socket: the same snapshots.
    c.unlade = unlade_tests::containerd::Server::start(&root, &c.dir.path().join("unlade.sock"));
    // containerd redials with a back-off of at most 3 s.
    let t0 = std::time::Instant::now();
    while !c
        .ctr(&[
            "snapshots",
            "--snapshotter",
            "unlade",
            "view",
            "v",
            "work-done",
        ])
        .status
        .success()
    {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "containerd did not reconnect: {}",
            c.unlade.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let tree = ctr_mounted_tree(&c, "v2", "work-done");
    assert!(!tree.contains_key("usr/bin/hello"));
    assert_eq!(
        tree["new-file"].content,
        format!("7 {}", sha256(b"written"))
    );
    assert!(tree["usr/bin/hello-link"].kind == 'f');

    // unlade's gc is about unlade's own images; containerd's snapshots
    // are containerd's to remove.
    let before = on_disk(&root);
    sh(Command::new(bin()).arg("gc").arg("--root").arg(&root));
    assert_eq!(on_disk(&root), before);

    // SIGTERM: exit 0, socket gone.
    let st = c.unlade.terminate();
    assert!(st.success(), "{st:?}");
    assert!(!c.dir.path().join("unlade.sock").exists());
}

// The fast path: CRI pulls through unlade's own pipeline.

use unlade_tests::containerd::cri_config;
use unlade_tests::registry::{demo_layers, demo_registry, Fault, Proxy};

/// The pulls the server's log reports: (layers applied here, by another).
fn pulls_logged(c: &Containerd) -> Vec<(usize, usize)> {
    c.unlade
        .log()
        .lines()
        .filter(|l| l.contains("pulled for containerd"))
        .map(|l| {
            let num = |key: &str| -> usize {
                let at = l.find(&format!(" {key}=")).expect(key) + key.len() + 2;
                l[at..]
                    .split(' ')
                    .next()
                    .expect("n")
                    .parse()
                    .expect("number")
            };
            (num("applied"), num("by_another"))
        })
        .collect()
}

fn fast_path(root: &Path, proxy: &Proxy) -> Containerd {
    let none = root.with_extension("no-hosts");
    Containerd::start_with(
        root,
        &cri_config(&proxy.addr),
        &["--plain-http", "--hosts-dir", none.to_str().expect("utf8")],
    )
}

/// One CRI PullImage with snapshotter `unlade`: unlade fetches every layer
/// blob once and containerd none; the rootfs containerd mounts equals
/// `unlade pull` of the image; a container runs from it; removing the
/// image lets containerd's GC remove its snapshots, and then unlade's gc
/// the layers.
#[test]
fn cri_pull_is_done_by_unlade() {
    let (reg, proxy) = demo_registry();
    let t = tmp();
    let root = t.path().join("root");
    let c = fast_path(&root, &proxy);
    let reference = format!("{}/demo:latest", proxy.addr);
    c.cri_pull_ok(&reference, 1);
    let layers = demo_layers(&reg);
    for l in &layers {
        assert_eq!(
            proxy.blob_gets(l).len(),
            1,
            "layer {l} fetched once: {:?}\n{}",
            proxy.seen(),
            c.unlade.log()
        );
        assert_eq!(
            reg.demo_blob_gets_by(l, "containerd/"),
            0,
            "containerd fetched layer {l}; unlade's log:\n{}\nsnapshots:\n{}",
            c.unlade.log(),
            c.ctr_ok(&["-n", "k8s.io", "snapshots", "--snapshotter", "unlade", "ls"])
        );
    }
    assert_eq!(pulls_logged(&c), vec![(layers.len(), 0)]);

    // The rootfs as containerd mounts it, against unlade's own pull.
    let own = t.path().join("own");
    let top = last_line(&sh(Command::new(bin())
        .args(["pull", "-q", "--plain-http", "--root"])
        .arg(&own)
        .arg(&reference)));
    let own_tree = mounted_tree(&own, &top, t.path());
    let target = t.path().join("cri-view");
    std::fs::create_dir(&target).expect("mkdir");
    let k8s = |args: &[&str]| {
        let mut a = vec!["-n", "k8s.io"];
        a.extend_from_slice(args);
        c.ctr_ok(&a)
    };
    let line = k8s(&[
        "snapshots",
        "--snapshotter",
        "unlade",
        "view",
        "--target",
        target.to_str().expect("utf8"),
        "cri-view",
        &top,
    ]);
    sh(Command::new("sh")
        .arg("-c")
        .arg(line.trim().replace("mount -t bind", "mount --bind")));
    let via_cri = snapshot(&target);
    sh(Command::new("umount").arg(&target));
    assert_same(&own_tree, &via_cri, "the CRI-pulled rootfs");

    let out = k8s(&[
        "run",
        "--rm",
        "--snapshotter",
        "unlade",
        &reference,
        "cri-hello",
        "hello",
    ]);
    assert_eq!(out.trim(), "Hello, world!");

    // unlade recorded no image of its own for the pull: the holds of
    // containerd's snapshots are what keep the layers from unlade's gc.
    let images = sh(Command::new(bin())
        .args(["images", "ls", "--root"])
        .arg(&root));
    assert!(
        images.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&images.stdout)
    );
    let gc = last_line(&sh(Command::new(bin()).arg("gc").arg("--root").arg(&root)));
    assert!(gc.starts_with("removed 0 snapshots"), "{gc}");

    // The view, unless containerd's GC took it already (ctr held it by a
    // lease only): left, it keeps the image's snapshots until a later GC.
    let _ = c.ctr(&[
        "-n",
        "k8s.io",
        "snapshots",
        "--snapshotter",
        "unlade",
        "rm",
        "cri-view",
    ]);
    // Every image record CRI made (by reference and by ID), then GC.
    for name in k8s(&["images", "ls", "-q"]).lines() {
        k8s(&["images", "rm", "--sync", name]);
    }
    c.wait_on_disk(&root, 0);
    let gc = last_line(&sh(Command::new(bin()).arg("gc").arg("--root").arg(&root)));
    assert!(
        gc.starts_with(&format!("removed {} snapshots", layers.len())),
        "{gc}"
    );
}

/// A registry silent to unlade (and answering containerd): unlade's pull
/// stalls, and after the stall timeout its Prepare falls back; containerd
/// fetches every layer itself and the CRI pull succeeds.
#[test]
fn a_registry_that_stalls_unlade_falls_back_to_containerd() {
    let (reg, proxy) = demo_registry();
    proxy.fault(Fault::HangAgent("unlade/".into()));
    let t = tmp();
    let root = t.path().join("root");
    let none = root.with_extension("no-hosts");
    let c = Containerd::start_with(
        &root,
        &cri_config(&proxy.addr),
        &[
            "--plain-http",
            "--hosts-dir",
            none.to_str().expect("utf8"),
            "--stall-timeout",
            "2",
        ],
    );
    let reference = format!("{}/demo:latest", proxy.addr);
    let t0 = std::time::Instant::now();
    c.cri_pull_ok(&reference, 1);
    let took = t0.elapsed();
    let log = c.unlade.log();
    assert!(
        log.lines()
            .any(|l| l.contains("falls back to containerd") && l.contains(&reference)),
        "{log}"
    );
    // Within the stall rule's two tries of the manifest, not the pull's
    // deadline.
    assert!(took < std::time::Duration::from_secs(30), "{took:?}");
    for l in demo_layers(&reg) {
        assert_eq!(
            proxy.blob_gets(&l).len(),
            1,
            "layer {l}: {:?}",
            proxy.seen()
        );
        assert_eq!(reg.demo_blob_gets_by(&l, "containerd/"), 1, "{}", reg.log());
    }
}

/// 20 concurrent CRI pulls of one image: every layer applied once, every
/// blob fetched once.
#[test]
fn twenty_concurrent_cri_pulls_apply_each_layer_once() {
    let (reg, proxy) = demo_registry();
    let t = tmp();
    let root = t.path().join("root");
    let c = fast_path(&root, &proxy);
    let reference = format!("{}/demo:latest", proxy.addr);
    c.cri_pull_ok(&reference, 20);
    let layers = demo_layers(&reg);
    let applied: usize = pulls_logged(&c).iter().map(|p| p.0).sum();
    assert_eq!(applied, layers.len(), "{:?}", pulls_logged(&c));
    for l in &layers {
        assert_eq!(proxy.blob_gets(l).len(), 1, "layer {l} fetched once");
    }
}

/// A corrupt layer: unlade's pull fails on it and falls back (its log
/// names the layer), containerd fetches it itself and fails the CRI pull
/// with its own error naming it; nothing of it is committed. unlade killed
/// in the middle of a pull fails that pull, and after a restart the next
/// pull succeeds.
#[test]
fn cri_pull_faults_bad_layer_and_killed_server() {
    {
        let (reg, proxy) = demo_registry();
        let layers = demo_layers(&reg);
        let top_layer = layers.last().expect("layers").clone();
        let t = tmp();
        let root = t.path().join("root");
        let c = fast_path(&root, &proxy);
        proxy.fault(Fault::Corrupt(top_layer.clone()));
        let out = c.cri_pull(&format!("{}/demo:latest", proxy.addr), 1);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&top_layer[7..19]) || err.contains(&top_layer),
            "{err}"
        );
        let log = c.unlade.log();
        assert!(
            log.lines()
                .any(|l| l.contains("falls back to containerd") && l.contains(&top_layer)),
            "{log}"
        );
        // Nothing of the bad layer was committed: only the layers below.
        let committed = std::fs::read_dir(root.join("snapshots/committed"))
            .expect("list")
            .count();
        assert!(committed < layers.len(), "{committed} committed");
    }
    let (reg, proxy) = demo_registry();
    // The base layer: the one big enough to stall in (6 MiB).
    let base_layer = demo_layers(&reg)[0].clone();
    let t = tmp();
    let root = t.path().join("root");
    let mut c = fast_path(&root, &proxy);
    let reference = format!("{}/demo:latest", proxy.addr);
    proxy.fault(Fault::Stall(base_layer, 100_000));
    let pull = c
        .cri_pull_cmd(&reference, 1)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start cri_pull.py");
    let t0 = std::time::Instant::now();
    while !proxy.stalled.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "no stall"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    c.unlade.kill();
    let out = pull.wait_with_output().expect("wait");
    assert!(!out.status.success(), "the pull failed with the server");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unlade.sock") || err.contains("navailable"),
        "{err}"
    );
    proxy.release();
    let none = root.with_extension("no-hosts");
    c.unlade = unlade_tests::containerd::Server::start_with(
        &root,
        &c.dir.path().join("unlade.sock"),
        &["--plain-http", "--hosts-dir", none.to_str().expect("utf8")],
    );
    // containerd redials within 3 s; until then the pull fails fast.
    let t0 = std::time::Instant::now();
    loop {
        let out = c.cri_pull(&reference, 1);
        if out.status.success() {
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            c.unlade.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}
