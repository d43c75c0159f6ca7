//! unlade as containerd's snapshotter, against the real containerd (1.6)
//! and runc: `ctr images import` and `ctr run` through the proxy plugin,
//! the snapshot API as `ctr snapshots` drives it, containerd's garbage
//! collection removing snapshots through Remove, and the server killed
//! and restarted.

use std::path::{Path, PathBuf};
use std::process::Command;

use unlade_tests::containerd::Containerd;
use unlade_tests::*;

fn demo_tar(dir: &Path) -> PathBuf {
    let tar = dir.join("demo.tar");
    sh(Command::new("tar")
        .arg("-C")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/demo-image"))
        .arg("-cf")
        .arg(&tar)
        .arg("."));
    tar
}

const DEMO: &str = "docker.io/unlade/demo:latest";

fn import_demo(c: &Containerd) {
    let tar = demo_tar(c.dir.path());
    c.ctr_ok(&[
        "images",
        "import",
        "--snapshotter",
        "unlade",
        "--base-name",
        "docker.io/unlade/demo",
        tar.to_str().expect("utf8"),
    ]);
}

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

/// The directories of the snapshots in unlade's root.
fn on_disk(root: &Path) -> usize {
    std::fs::read_dir(root.join("containerd/snapshots"))
        .expect("list")
        .count()
}

/// Waits (up to 30 s) for containerd's asynchronous garbage collection to
/// leave `n` snapshots in unlade's root.
fn wait_on_disk(root: &Path, n: usize) {
    let t = std::time::Instant::now();
    while on_disk(root) != n {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "{} snapshots on disk after 30 s, not {n}",
            on_disk(root)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
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
    import_demo(&c);
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
    wait_on_disk(&root, 3);
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    assert!(!mounts.contains(root.to_str().expect("utf8")), "{mounts}");

    c.ctr_ok(&["images", "rm", "--sync", DEMO]);
    assert_eq!(snapshots(&c), vec![]);
    wait_on_disk(&root, 0);
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
    import_demo(&c);
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

    // Killed: containerd's calls fail, naming the socket.
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
    assert!(err.contains("unlade.sock"), "{err}");
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
