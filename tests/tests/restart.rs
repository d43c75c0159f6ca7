//! Restarts that keep containers running: snapshots are plain kernel
//! overlay mounts, so a crash or restart of unlade must not touch a
//! running container. In a test binary of its own: a container started
//! while another test's view is mounted gets a copy of that mount, which
//! can make the other test's unmount fail as busy.

use unlade_tests::containerd::Containerd;
use unlade_tests::*;

const DEMO: &str = "docker.io/unlade/demo:latest";

/// Runs `cmd` in the running container `task` (a fresh exec ID each time)
/// and returns what it printed.
fn exec_in(c: &Containerd, task: &str, cmd: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let id = format!("x{}", N.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
    c.ctr_ok(&["tasks", "exec", "--exec-id", &id, task, "sh", "-c", cmd])
}

/// Snapshots are plain kernel overlay mounts: a container keeps reading
/// and writing its files while unlade is killed (SIGKILL, as a crash or an
/// OOM kill) and after it is restarted on the same root; the restarted
/// server makes the next container's snapshot, and removing both leaves
/// nothing behind (no mount of the root, no active snapshot, no temporary
/// of a snapshot). The server starts and serves with no registry at all
/// (the image comes by `ctr images import`).
#[test]
fn a_running_container_survives_unlade_killed_and_restarted() {
    let t = tmp();
    let root = t.path().join("root");
    let mut c = Containerd::start(&root, "");
    c.import_demo();
    c.ctr_ok(&[
        "run",
        "-d",
        "--snapshotter",
        "unlade",
        DEMO,
        "survivor",
        "sh",
        "-c",
        "while true; do cat /etc/motd > /tmp/seen; sleep 0.2; done",
    ]);
    let motd = "unpacked by unlade";
    let t0 = std::time::Instant::now();
    while !exec_in(&c, "survivor", "cat /tmp/seen 2>/dev/null || true").contains(motd) {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "the container never ran"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    c.unlade.kill();
    // unlade is gone: the container reads its image and writes its layer.
    let out = exec_in(
        &c,
        "survivor",
        "cat /usr/share/demo/os-release >/dev/null && cat /etc/motd && echo kept > /root/during && cat /root/during",
    );
    assert!(out.contains(motd) && out.contains("kept"), "{out}");

    c.unlade = unlade_tests::containerd::Server::start(&root, &c.dir.path().join("unlade.sock"));
    let out = exec_in(
        &c,
        "survivor",
        "cat /root/during && rm /tmp/seen && echo ok",
    );
    assert!(out.contains("kept") && out.contains("ok"), "{out}");
    // The restarted server makes the next container's snapshot (containerd
    // redials it with a back-off of at most 3 s).
    let t0 = std::time::Instant::now();
    loop {
        let out = c.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "unlade",
            DEMO,
            "after-restart",
            "hello",
        ]);
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "Hello, world!");
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }

    // Removed: the container's task, then the container and its snapshot.
    c.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", "survivor"]);
    let t0 = std::time::Instant::now();
    while !c.ctr(&["tasks", "delete", "survivor"]).status.success() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "task never stopped"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    c.ctr_ok(&["containers", "delete", "survivor"]);
    c.wait_on_disk(&root, 3);
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    assert!(!mounts.contains(root.to_str().expect("utf8")), "{mounts}");
    let entries = |p: &str| std::fs::read_dir(root.join(p)).map_or(0, |rd| rd.count());
    assert_eq!(entries("snapshots/active"), 0, "no active snapshot left");
    assert_eq!(entries("containerd/mnt"), 0, "no view mount point left");
}
