//! Duplicate suppression: many unpacks of one image (or of images sharing
//! layers) at once, in one process through the library and as separate
//! `unlade unpack` processes on one root. Each layer must be applied once
//! and each blob imported once (counted by the engine's own counters and
//! reported per process), and when a leader is cancelled or killed
//! mid-apply a waiter takes over.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use unlade::cancel::Cancel;
use unlade::pipeline::flight::Role;
use unlade::root::{Root, RootError};
use unlade::source::layout::Layout;
use unlade_tests::*;

fn three_layers() -> Vec<TestLayer> {
    vec![
        many_files(3000, 512, 1, MT_GZ),
        many_files(2000, 512, 2, MT_ZST),
        many_files(1000, 512, 3, MT_TAR),
    ]
}

fn open(root: &Path) -> Root {
    Root::open(root, unlade_tests::root_options()).unwrap()
}

/// Tests that run unpacks in this process take it shared; the one that
/// tells its waiters by this process's "unlade-layer" threads takes it
/// alone, so that no other test's threads are among them.
static IN_PROCESS: RwLock<()> = RwLock::new(());

fn in_process() -> RwLockReadGuard<'static, ()> {
    IN_PROCESS.read().unwrap_or_else(|p| p.into_inner())
}

fn in_process_alone() -> RwLockWriteGuard<'static, ()> {
    IN_PROCESS.write().unwrap_or_else(|p| p.into_inner())
}

/// Polls `done` every 2 ms until it holds, for at most a minute.
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "waited a minute for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// This process's threads named `name`: thread ID → whether it sleeps in
/// a futex wait (what a flight's waiter does: a channel `select!`).
fn threads_named(name: &str) -> BTreeMap<u32, bool> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir("/proc/self/task").unwrap().flatten() {
        let p = e.path();
        // A thread that ended meanwhile has no files left.
        let Ok(comm) = fs::read_to_string(p.join("comm")) else {
            continue;
        };
        if comm.trim_end() != name {
            continue;
        }
        let Ok(tid) = e.file_name().to_string_lossy().parse() else {
            continue;
        };
        // Where the kernel hides wait channels ("0"), a sleeping thread.
        let asleep = match fs::read_to_string(p.join("wchan")).as_deref() {
            Ok("0") | Ok("") | Err(_) => fs::read_to_string(p.join("stat")).is_ok_and(|st| {
                st.rsplit_once(") ")
                    .is_some_and(|(_, r)| r.starts_with('S'))
            }),
            Ok(wchan) => wchan.starts_with("futex"),
        };
        out.insert(tid, asleep);
    }
    out
}

/// The processes blocked in `flock` on the file at `path`, as
/// /proc/locks lists them ("N: -> FLOCK  ADVISORY  WRITE PID
/// MAJ:MIN:INODE 0 EOF").
fn flock_waiters(path: &Path) -> BTreeSet<u32> {
    let Ok(md) = fs::metadata(path) else {
        return BTreeSet::new();
    };
    let dev = format!(
        "{:02x}:{:02x}:{}",
        rustix::fs::major(md.dev()),
        rustix::fs::minor(md.dev()),
        md.ino()
    );
    fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f[..] {
                [_, "->", "FLOCK", _, _, pid, file, ..] if file == dev => pid.parse().ok(),
                _ => None,
            }
        })
        .collect()
}

/// Counts of "N applied here, M blobs imported" summed over outputs.
fn summed(outputs: &[std::process::Output]) -> (u64, u64) {
    let mut applied = 0;
    let mut imported = 0;
    for o in outputs {
        let text = String::from_utf8_lossy(&o.stdout);
        let line = text
            .lines()
            .find(|l| l.starts_with("unpacked "))
            .unwrap_or_else(|| panic!("no summary: {text}"));
        let num = |after: &str| -> u64 {
            let i = line.find(after).unwrap();
            line[..i].rsplit(' ').nth(1).unwrap().parse().unwrap()
        };
        applied += num("applied here");
        imported += num("blobs imported");
    }
    (applied, imported)
}

#[test]
fn twenty_library_unpacks_apply_each_layer_once() {
    let _shared = in_process();
    let w = tmp();
    let layers = three_layers();
    let refs: Vec<&TestLayer> = layers.iter().collect();
    let dir = w.path().join("layout");
    let chains = image_layout(&dir, &[("t", &refs)]);
    let layout = Arc::new(Layout::open(&dir).unwrap());
    let image = layout.resolve(Some("t"), None).unwrap();
    let root = open(&w.path().join("root"));
    let barrier = Barrier::new(20);
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..20)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    root.unpack(layout.clone(), &image, "t", &Cancel::new())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut workers: BTreeMap<String, usize> = BTreeMap::new();
    for r in &results {
        let u = r.as_ref().unwrap();
        assert_eq!(u.top_chain.unwrap().to_string(), chains[0][2]);
        for (chain, role) in &u.roles {
            if *role != Role::Waited {
                *workers.entry(chain.to_string()).or_default() += 1;
            }
        }
    }
    let s = root.stats();
    assert_eq!((s.layers_applied, s.blobs_ingested), (3, 3));
    // Each chain had exactly one caller doing the work.
    assert_eq!(workers.len(), 3, "{workers:?}");
    assert!(workers.values().all(|&n| n == 1), "{workers:?}");
    let expected = expected_merge(&refs, w.path());
    assert_same(
        &expected,
        &mounted_tree(root.dir(), &chains[0][2], w.path()),
        "after 20 unpacks",
    );
}

#[test]
fn twenty_processes_apply_each_layer_once() {
    let w = tmp();
    let layers = three_layers();
    let refs: Vec<&TestLayer> = layers.iter().collect();
    let dir = w.path().join("layout");
    let chains = image_layout(&dir, &[("t", &refs)]);
    let root = w.path().join("root");
    let r = format!("{}:t", dir.display());
    let children: Vec<_> = (0..20)
        .map(|_| {
            Command::new(bin())
                .args(["unpack", &r, "--root"])
                .arg(&root)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for o in &outs {
        assert_eq!(last_line(o), chains[0][2]);
    }
    assert_eq!(summed(&outs), (3, 3));
    assert_same(
        &expected_merge(&refs, w.path()),
        &mounted_tree(&root, &chains[0][2], w.path()),
        "after 20 processes",
    );
}

#[test]
fn images_sharing_layers_share_the_work() {
    let _shared = in_process();
    let w = tmp();
    let base = many_files(2000, 512, 7, MT_GZ);
    let a = many_files(300, 512, 8, MT_GZ);
    let b = many_files(300, 512, 9, MT_ZST);
    let dir = w.path().join("layout");
    let chains = image_layout(&dir, &[("a", &[&base, &a]), ("b", &[&base, &b])]);
    let layout = Arc::new(Layout::open(&dir).unwrap());
    let ia = layout.resolve(Some("a"), None).unwrap();
    let ib = layout.resolve(Some("b"), None).unwrap();
    let root = open(&w.path().join("root"));
    let barrier = Barrier::new(10);
    std::thread::scope(|s| {
        for k in 0..10 {
            let (img, name) = if k % 2 == 0 { (&ia, "a") } else { (&ib, "b") };
            let (root, layout, barrier) = (&root, &layout, &barrier);
            s.spawn(move || {
                barrier.wait();
                root.unpack(layout.clone(), img, name, &Cancel::new())
                    .unwrap()
            });
        }
    });
    // base + a + b: three layers applied, three blobs imported.
    let s = root.stats();
    assert_eq!((s.layers_applied, s.blobs_ingested), (3, 3));
    for (i, (tag, layers)) in [("a", [&base, &a]), ("b", [&base, &b])]
        .into_iter()
        .enumerate()
    {
        assert_same(
            &expected_merge(&layers, &w.path().join(tag)),
            &mounted_tree(root.dir(), &chains[i][1], w.path()),
            tag,
        );
    }
}

/// Waits until some active snapshot of `root` holds at least `dirs`
/// directories: a leader is in the middle of an apply.
fn wait_mid_apply(root: &Path, dirs: usize) {
    let started = Instant::now();
    loop {
        let active = root.join("snapshots/active");
        let busy = fs::read_dir(&active)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                fs::read_dir(e.path().join("fs"))
                    .map(|rd| rd.count() >= dirs)
                    .unwrap_or(false)
            });
        if busy {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no apply started"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn cancelled_leader_is_taken_over_by_a_waiter() {
    let _alone = in_process_alone();
    let w = tmp();
    let big = many_files(20_000, 512, 4, MT_GZ);
    let dir = w.path().join("layout");
    let chains = image_layout(&dir, &[("t", &[&big])]);
    let layout = Arc::new(Layout::open(&dir).unwrap());
    let image = layout.resolve(Some("t"), None).unwrap();
    let root = open(&w.path().join("root"));
    let leader_cancel = Cancel::new();
    std::thread::scope(|s| {
        let leader = s.spawn(|| root.unpack(layout.clone(), &image, "t", &leader_cancel));
        wait_mid_apply(root.dir(), 3);
        let leader_threads = threads_named("unlade-layer");
        let waiters: Vec<_> = (0..3)
            .map(|_| s.spawn(|| root.unpack(layout.clone(), &image, "t", &Cancel::new())))
            .collect();
        // Each waiter's one layer thread joins the leader's flight and
        // sleeps there; once all three do (seen twice in a row: not a
        // passing lock), pull the leader out.
        let mut seen = 0;
        wait_for("three waiters in the flight", || {
            let waiting = threads_named("unlade-layer")
                .into_iter()
                .filter(|(tid, asleep)| *asleep && !leader_threads.contains_key(tid))
                .count();
            assert!(waiting <= 3, "{waiting} waiting threads");
            seen = if waiting == 3 { seen + 1 } else { 0 };
            seen >= 2
        });
        leader_cancel.cancel();
        let lr = leader.join().unwrap();
        assert!(matches!(lr, Err(RootError::Cancelled)), "{lr:?}");
        let roles: Vec<Role> = waiters
            .into_iter()
            .map(|h| h.join().unwrap().unwrap().roles[0].1)
            .collect();
        assert_eq!(
            roles.iter().filter(|r| **r == Role::TookOver).count(),
            1,
            "{roles:?}"
        );
    });
    assert_eq!(root.stats().layers_applied, 1);
    let tree = mounted_tree(root.dir(), &chains[0][0], w.path());
    assert_same(&expected_merge(&[&big], w.path()), &tree, "after takeover");
    assert_eq!(
        fs::read_dir(root.dir().join("snapshots/active"))
            .unwrap()
            .count(),
        0
    );
}

fn unpack_child(r: &str, root: &PathBuf) -> std::process::Child {
    Command::new(bin())
        .args(["unpack", r, "--root"])
        .arg(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn killed_leader_process_is_taken_over_by_a_waiting_process() {
    let w = tmp();
    let big = many_files(20_000, 512, 5, MT_GZ);
    let dir = w.path().join("layout");
    let chains = image_layout(&dir, &[("t", &[&big])]);
    let root = w.path().join("root");
    let r = format!("{}:t", dir.display());
    let mut leader = unpack_child(&r, &root);
    wait_mid_apply(&root, 3);
    let waiters: Vec<_> = (0..3).map(|_| unpack_child(&r, &root)).collect();
    // Each waiter blocks on the leader's lock file of the chain: kill the
    // leader once the kernel lists all three waiting there.
    let lock = root
        .join("locks")
        .join(format!("snapshot-{}", &chains[0][0][7..]));
    let pids: BTreeSet<u32> = waiters.iter().map(|c| c.id()).collect();
    wait_for("three processes waiting for the lock", || {
        flock_waiters(&lock).is_superset(&pids)
    });
    leader.kill().unwrap(); // SIGKILL
    leader.wait().unwrap();
    let outs: Vec<_> = waiters
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for o in &outs {
        assert_eq!(last_line(o), chains[0][0]);
    }
    // The dead leader's attempt is not counted; one waiter redid it.
    assert_eq!(summed(&outs).0, 1);
    assert_same(
        &expected_merge(&[&big], w.path()),
        &mounted_tree(&root, &chains[0][0], w.path()),
        "after the leader was killed",
    );
    // The dead leader's active snapshot went when a root was opened.
    let _ = open(&root);
    assert_eq!(
        fs::read_dir(root.join("snapshots/active")).unwrap().count(),
        0
    );
}

/// A minimal executor: polls a future, parking the thread between wakes.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

#[test]
fn unpack_task_is_awaitable_and_dropping_it_cancels() {
    let _shared = in_process();
    let w = tmp();
    let small = many_files(50, 512, 10, MT_GZ);
    let big = many_files(20_000, 512, 11, MT_GZ);
    let dir = w.path().join("layout");
    let chains = image_layout(&dir, &[("s", &[&small]), ("b", &[&big])]);
    let layout = Arc::new(Layout::open(&dir).unwrap());
    let root = open(&w.path().join("root"));
    let s = layout.resolve(Some("s"), None).unwrap();
    let done = block_on(root.unpack_task(layout.clone(), s, "s".into())).unwrap();
    assert_eq!(done.top_chain.unwrap().to_string(), chains[0][0]);

    let b = layout.resolve(Some("b"), None).unwrap();
    let task = root.unpack_task(layout.clone(), b, "b".into());
    wait_mid_apply(root.dir(), 3);
    drop(task);
    // The cancelled apply removes its active snapshot and commits nothing.
    let started = Instant::now();
    while fs::read_dir(root.dir().join("snapshots/active"))
        .unwrap()
        .count()
        > 0
    {
        assert!(started.elapsed() < Duration::from_secs(30), "not cancelled");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(root
        .snapshots()
        .stat(&chains[1][0].parse().unwrap())
        .is_err());
}

/// gc running over and over while images are unpacked and forgotten never
/// removes what an unpack in progress has committed but not yet recorded.
#[test]
fn gc_never_takes_what_an_unpack_in_progress_uses() {
    let _shared = in_process();
    let w = tmp();
    let a = many_files(1500, 512, 12, MT_GZ);
    let b = many_files(1500, 512, 13, MT_ZST);
    let dir = w.path().join("layout");
    let chains = image_layout(&dir, &[("t", &[&a, &b])]);
    let layout = Arc::new(Layout::open(&dir).unwrap());
    let image = layout.resolve(Some("t"), None).unwrap();
    let root = open(&w.path().join("root"));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut collected = 0;
    std::thread::scope(|s| {
        let gc = s.spawn(|| {
            let mut removed = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                removed += root.gc(&Cancel::new()).unwrap().snapshots.len();
            }
            removed
        });
        for _ in 0..6 {
            let u = root
                .unpack(layout.clone(), &image, "t", &Cancel::new())
                .unwrap();
            // Recorded, so gc keeps it: it is all there.
            assert_eq!(u.top_chain.unwrap().to_string(), chains[0][1]);
            assert_same(
                &expected_merge(
                    &[&a, &b],
                    &w.path().join(format!("e{}", root.stats().layers_applied)),
                ),
                &mounted_tree(root.dir(), &chains[0][1], w.path()),
                "unpacked beside gc",
            );
            root.remove_image("t").unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        collected = gc.join().unwrap();
    });
    // gc did collect the forgotten images in between.
    assert!(collected > 0);
}
