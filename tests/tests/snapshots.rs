//! The overlay snapshotter: layers applied into active snapshots and
//! committed by chain ID stack into exactly the image's file system when
//! mounted with overlayfs; commits are atomic and race-safe; leftovers of
//! crashed processes are cleaned up; removal respects parents.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::Barrier;

use unlade::oci::digest::chain_ids;
use unlade::store::snapshot::{SnapshotError, Snapshotter};
use unlade::{apply_layer, ApplyOptions, Digest, LayerInput};
use unlade_tests::*;

fn layer(f: impl FnOnce(&mut RawTar)) -> Vec<u8> {
    let mut t = RawTar::default();
    f(&mut t);
    t.end();
    t.bytes()
}

/// "path kind" of everything below `root` (the root itself left out).
fn listing(root: &Path) -> Vec<String> {
    snapshot(root)
        .into_iter()
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, n)| format!("{k} {}", n.kind))
        .collect()
}

#[test]
fn committed_layers_stack_into_the_image() {
    let root = tmp();
    let snaps = Snapshotter::open(root.path()).unwrap();
    let l1 = layer(|t| {
        t.dir("etc")
            .file("etc/issue", b"Debian")
            .file("etc/keep", b"keep")
            .dir("opq")
            .file("opq/old", b"old");
        t.dir("gone").dir("gone/deep").file("gone/deep/file", b"x");
    });
    let l2 = layer(|t| {
        t.dir("etc")
            .file("etc/.wh.issue", b"")
            .dir("opq")
            .file("opq/.wh..wh..opq", b"")
            .file("opq/new", b"new");
        t.file(".wh.gone", b"").file("etc/added", b"added");
    });
    let diff_ids: Vec<Digest> = [&l1, &l2].iter().map(|l| Digest::of(l)).collect();
    let chains = chain_ids(&diff_ids);
    let mut parent = None;
    for (l, chain) in [&l1, &l2].iter().zip(&chains) {
        let active = snaps.prepare(parent).unwrap();
        let f = write(root.path(), "layer.tar", l);
        apply_layer(LayerInput::Path(f), &active.fs(), &ApplyOptions::default()).unwrap();
        assert!(snaps.commit(active, chain).unwrap());
        parent = Some(*chain);
    }
    assert_eq!(snaps.stat(&chains[1]).unwrap().parent, Some(chains[0]));
    let lowers = snaps.lower_dirs(&chains[1]).unwrap();
    assert_eq!(lowers.len(), 2);
    let target = root.path().join("mnt");
    fs::create_dir(&target).unwrap();
    let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    sh(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("ro,lowerdir={}", lowerdir.join(":")))
        .arg(&target));
    let merged = listing(&target);
    let added = fs::read(target.join("etc/added"));
    sh(Command::new("umount").arg(&target));
    assert_eq!(
        merged,
        ["etc d", "etc/added f", "etc/keep f", "opq d", "opq/new f"]
    );
    assert_eq!(added.unwrap(), b"added");
}

/// Names in a directory of the root.
fn names(root: &Path, dir: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(root.join(dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn racing_commits_keep_one_copy() {
    let root = tmp();
    let snaps = Snapshotter::open(root.path()).unwrap();
    // A second snapshotter of the same root, as another process has.
    let other = Snapshotter::open(root.path()).unwrap();
    let mut chains: Vec<Digest> = Vec::new();
    let mut wins = [0; 2];
    for round in 0..64 {
        let chain = Digest::of(format!("layer {round}").as_bytes());
        // Every other round stacks on the chain before (the commit checks
        // the parent too); half the rounds race within one snapshotter.
        let parent = chains.last().copied().filter(|_| round % 2 == 1);
        let racers = [&snaps, if round % 4 < 2 { &snaps } else { &other }];
        let actives = racers.map(|s| s.prepare(parent).unwrap());
        let mut trees = Vec::new();
        for (who, a) in ["a", "b"].iter().zip(&actives) {
            fs::write(a.fs().join("who"), who).unwrap();
            fs::create_dir(a.fs().join(format!("only-{who}"))).unwrap();
            trees.push(snapshot(&a.fs()));
        }
        let barrier = Barrier::new(2);
        let won: Vec<bool> = std::thread::scope(|s| {
            let hs: Vec<_> = racers
                .into_iter()
                .zip(actives)
                .map(|(snaps, active)| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        snaps.commit(active, &chain)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
        });
        // Exactly one commit published its copy; the other was told so
        // (Ok(false)) and its copy is gone.
        let winners: Vec<usize> = (0..2).filter(|&i| won[i]).collect();
        assert_eq!(winners.len(), 1, "round {round}: {won:?}");
        let w = winners[0];
        wins[w] += 1;
        assert_same(
            &trees[w],
            &snapshot(&snaps.committed_dir(&chain).join("fs")),
            &format!("round {round}: the winner's copy"),
        );
        assert_eq!(snaps.stat(&chain).unwrap().parent, parent);
        assert_eq!(other.stat(&chain).unwrap().parent, parent);
        assert!(
            names(root.path(), "snapshots/active").is_empty(),
            "round {round}"
        );
        assert!(
            names(root.path(), "snapshots/trash").is_empty(),
            "round {round}"
        );
        chains.push(chain);
    }
    eprintln!("commits won by the first / second racer: {wins:?}");
    // The store holds exactly the committed chains, each once.
    let mut want: Vec<String> = chains.iter().map(Digest::hex).collect();
    want.sort();
    assert_eq!(names(root.path(), "snapshots/committed"), want);
    let listed: Vec<Digest> = snaps
        .list()
        .unwrap()
        .into_iter()
        .map(|i| i.chain_id)
        .collect();
    let mut sorted = chains.clone();
    sorted.sort();
    assert_eq!(listed, sorted);
}

#[test]
fn crash_leftovers_go_live_snapshots_stay() {
    let root = tmp();
    let snaps = Snapshotter::open(root.path()).unwrap();
    let live = snaps.prepare(None).unwrap();
    fs::write(live.fs().join("f"), b"in progress").unwrap();
    // A snapshot whose process died: its lock file is not held.
    let dead = root.path().join("snapshots/active/99999-0");
    fs::create_dir_all(dead.join("fs/deep")).unwrap();
    fs::write(dead.join("lock"), b"").unwrap();
    // One that died before making its lock file, an hour ago: a leftover.
    let half = root.path().join("snapshots/active/99999-1");
    fs::create_dir_all(&half).unwrap();
    sh(Command::new("touch").args(["-d", "1 hour ago"]).arg(&half));
    // One without a lock file just now: maybe a prepare of another process
    // between its mkdir and its lock. It stays.
    let fresh = root.path().join("snapshots/active/99999-2");
    fs::create_dir_all(&fresh).unwrap();
    let again = Snapshotter::open(root.path()).unwrap();
    assert!(!dead.exists() && !half.exists());
    assert!(fresh.exists());
    fs::remove_dir(&fresh).unwrap();
    assert_eq!(fs::read(live.fs().join("f")).unwrap(), b"in progress");
    again.remove_active(live);
    assert_eq!(
        fs::read_dir(root.path().join("snapshots/active"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn removal_respects_parents() {
    let root = tmp();
    let snaps = Snapshotter::open(root.path()).unwrap();
    let (c0, c1) = (Digest::of(b"0"), Digest::of(b"1"));
    let a = snaps.prepare(None).unwrap();
    snaps.commit(a, &c0).unwrap();
    let b = snaps.prepare(Some(c0)).unwrap();
    snaps.commit(b, &c1).unwrap();
    assert!(
        matches!(snaps.remove(&c0), Err(SnapshotError::HasChildren(p, c)) if p == c0 && c == c1.to_string())
    );
    assert!(matches!(
        snaps.prepare(Some(Digest::of(b"missing"))),
        Err(SnapshotError::NotFound(_))
    ));
    snaps.remove(&c1).unwrap();
    snaps.remove(&c0).unwrap();
    assert!(snaps.list().unwrap().is_empty());
    assert!(matches!(snaps.remove(&c0), Err(SnapshotError::NotFound(_))));
}

#[test]
fn cli_lists_and_removes_snapshots() {
    let root = tmp();
    let snaps = Snapshotter::open(root.path()).unwrap();
    let (c0, c1) = (Digest::of(b"0"), Digest::of(b"1"));
    snaps.commit(snaps.prepare(None).unwrap(), &c0).unwrap();
    snaps.commit(snaps.prepare(Some(c0)).unwrap(), &c1).unwrap();
    let run = |args: &[&str]| {
        Command::new(bin())
            .arg("snapshots")
            .args(args)
            .arg("--root")
            .arg(root.path())
            .output()
            .unwrap()
    };
    let ls = run(&["ls"]);
    assert!(ls.status.success());
    let mut want = vec![
        format!("{c0}\t-\tcommitted"),
        format!("{c1}\t{c0}\tcommitted"),
    ];
    want.sort();
    assert_eq!(
        String::from_utf8_lossy(&ls.stdout)
            .lines()
            .map(String::from)
            .collect::<Vec<_>>(),
        want
    );
    let line = err_line(&run(&["rm", &c0.to_string()]));
    assert!(line.contains("is the parent of"), "{line}");
    assert!(run(&["rm", &c1.to_string(), &c0.to_string()])
        .status
        .success());
    assert!(run(&["ls"]).stdout.is_empty());
}
