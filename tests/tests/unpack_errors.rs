//! `unlade unpack` on bad input and bad luck: a corrupt blob, a wrong diff
//! ID, a diff ID count mismatch, a missing blob, an unknown media type, a
//! full disk, and kill -9 at random moments. Each failure is one clear
//! stderr line naming the layer; nothing partial is ever committed; the
//! next run (with the cause removed) succeeds and leaves no leftovers.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use unlade_tests::*;

fn small_layers() -> Vec<TestLayer> {
    (0..2)
        .map(|k| {
            let mut t = RawTar::default();
            t.dir("./").dir(&format!("l{k}/"));
            for i in 0..50 {
                t.file(&format!("l{k}/f{i}"), &noise(4000, k * 100 + i));
            }
            t.end();
            TestLayer {
                tar: t.bytes(),
                media_type: MT_GZ,
            }
        })
        .collect()
}

fn run(root: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .arg("--root")
        .arg(root)
        .output()
        .unwrap()
}

fn committed(root: &Path) -> String {
    String::from_utf8_lossy(&run(root, &["snapshots", "ls"]).stdout).into_owned()
}

/// No active snapshot, no ingest file, no trash left behind.
fn no_leftovers(root: &Path) {
    for d in ["snapshots/active", "snapshots/trash", "content/ingest"] {
        let p = root.join(d);
        let n = fs::read_dir(&p).map(|r| r.count()).unwrap_or(0);
        assert_eq!(n, 0, "leftovers in {}", p.display());
    }
}

fn blob_path(layout: &Path, data: &[u8]) -> PathBuf {
    layout.join("blobs/sha256").join(&sha256(data)[7..])
}

#[test]
fn corrupt_blob_commits_nothing_and_the_fixed_layout_unpacks() {
    let w = tmp();
    let layers = small_layers();
    let layout = w.path().join("layout");
    let chains = image_layout(&layout, &[("t", &[&layers[0], &layers[1]])]);
    let root = w.path().join("root");
    let p = blob_path(&layout, &layers[0].blob());
    let good = fs::read(&p).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    for b in &mut bad[mid..mid + 64] {
        *b ^= 0x5a;
    }
    fs::write(&p, &bad).unwrap();
    let r = format!("{}:t", layout.display());
    let out = unpack(&r, &root, &[]);
    let line = err_line(&out);
    let digest = sha256(&good);
    assert!(line.contains(&digest), "{line}");
    assert!(
        line.contains("hashes to") || line.contains("corrupt"),
        "{line}"
    );
    assert_eq!(committed(&root), "");
    no_leftovers(&root);
    fs::write(&p, &good).unwrap();
    assert_eq!(last_line(&unpack(&r, &root, &[])), chains[0][1]);
    no_leftovers(&root);
}

#[test]
fn wrong_diff_id_is_an_error_naming_the_layer() {
    let w = tmp();
    let layers = small_layers();
    let layout = w.path().join("layout");
    let mut b = LayoutBuilder::new(&layout);
    let blobs: Vec<Vec<u8>> = layers.iter().map(TestLayer::blob).collect();
    let wrong = sha256(b"not this layer");
    let desc = b.image(
        "linux/amd64",
        &[layers[0].diff_id(), wrong.clone()],
        &[(MT_GZ, &blobs[0]), (MT_GZ, &blobs[1])],
        false,
    );
    b.add(desc, Some("t")).finish();
    let root = w.path().join("root");
    let line = err_line(&unpack(&format!("{}:t", layout.display()), &root, &[]));
    assert!(
        line.contains(&sha256(&blobs[1]))
            && line.contains("diff ID mismatch")
            && line.contains(&wrong),
        "{line}"
    );
    // The good lower layer may be committed (it is keyed by its own
    // content); the bad one never is.
    let ls = committed(&root);
    assert!(ls.lines().count() <= 1, "{ls}");
    no_leftovers(&root);
}

#[test]
fn count_mismatch_missing_blob_and_unknown_media_type() {
    let w = tmp();
    let layers = small_layers();
    let blobs: Vec<Vec<u8>> = layers.iter().map(TestLayer::blob).collect();
    let root = w.path().join("root");

    let l1 = w.path().join("count");
    let mut b = LayoutBuilder::new(&l1);
    let d = b.image(
        "linux/amd64",
        &[layers[0].diff_id()],
        &[(MT_GZ, &blobs[0]), (MT_GZ, &blobs[1])],
        false,
    );
    b.add(d, Some("t")).finish();
    let line = err_line(&unpack(&format!("{}:t", l1.display()), &root, &[]));
    assert!(
        line.contains("2 layers but the config lists 1 diff IDs"),
        "{line}"
    );

    let l2 = w.path().join("missing");
    image_layout(&l2, &[("t", &[&layers[0], &layers[1]])]);
    fs::remove_file(blob_path(&l2, &blobs[1])).unwrap();
    let line = err_line(&unpack(&format!("{}:t", l2.display()), &root, &[]));
    assert!(
        line.contains(&sha256(&blobs[1])) && line.contains("not found"),
        "{line}"
    );
    // The lower layer is fine and may be committed; the top is not.
    assert!(committed(&root).lines().count() <= 1);

    let l3 = w.path().join("mediatype");
    let mut b = LayoutBuilder::new(&l3);
    let d = b.image(
        "linux/amd64",
        &[layers[0].diff_id()],
        &[("application/vnd.example.layer.v1+squashfs", &blobs[0])],
        false,
    );
    b.add(d, Some("t")).finish();
    let line = err_line(&unpack(&format!("{}:t", l3.display()), &root, &[]));
    assert!(line.contains("unknown media type"), "{line}");
    no_leftovers(&root);
}

#[test]
fn full_disk_commits_nothing_and_a_bigger_one_succeeds() {
    let w = tmp();
    let mut t = RawTar::default();
    t.dir("./").file("big", &noise(6 << 20, 42)).end();
    let layer = TestLayer {
        tar: t.bytes(),
        media_type: MT_GZ,
    };
    let layout = w.path().join("layout");
    let chains = image_layout(&layout, &[("t", &[&layer])]);
    let root = w.path().join("root");
    fs::create_dir_all(&root).unwrap();
    // 8 MiB: the blob (6 MiB, incompressible) fits, the file next to it not.
    sh(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&root));
    let r = format!("{}:t", layout.display());
    let out = unpack(&r, &root, &[]);
    let line = err_line(&out);
    assert!(line.contains("No space left on device"), "{line}");
    assert!(line.contains(&sha256(&layer.blob())), "{line}");
    assert_eq!(committed(&root), "");
    no_leftovers(&root);
    sh(Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&root));
    let top = last_line(&unpack(&r, &root, &[]));
    assert_eq!(top, chains[0][0]);
    no_leftovers(&root);
    sh(Command::new("umount").arg(&root));
}

/// The numbers of the `unpacked …` summary line of a successful unpack:
/// (layers committed before, applied here, blobs imported).
fn summary(out: &Output) -> (u64, u64, u64) {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("unpacked "))
        .unwrap_or_else(|| panic!("no summary: {text}"));
    let num = |after: &str| -> u64 {
        let i = line
            .find(after)
            .unwrap_or_else(|| panic!("{after:?}: {line}"));
        line[..i].rsplit(' ').next().unwrap().parse().unwrap()
    };
    (
        num(" committed before"),
        num(" applied here"),
        num(" blobs imported"),
    )
}

/// The blobs of `root`'s content store, each checked to hash to its name
/// (a store never holds a partial blob under a digest's name).
fn stored_blobs(root: &Path) -> Vec<String> {
    let dir = root.join("content/blobs/sha256");
    let mut out = Vec::new();
    for e in fs::read_dir(&dir).into_iter().flatten() {
        let e = e.unwrap();
        let name = format!("sha256:{}", e.file_name().to_string_lossy());
        assert_eq!(sha256(&fs::read(e.path()).unwrap()), name, "stored blob");
        out.push(name);
    }
    out
}

/// When [`kill_unpack`] kills.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// This long after the start.
    After(std::time::Duration),
    /// As soon as this many snapshots are committed.
    Committed(usize),
}

/// Starts `unlade unpack R --root ROOT EXTRA` and kills it with SIGKILL
/// `when` says; false if it had finished by then (or exited before the
/// commits came).
fn kill_unpack(r: &str, root: &Path, extra: &[&str], when: Kill) -> bool {
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(bin())
        .args(["unpack", r, "--root"])
        .arg(root)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    match when {
        Kill::After(d) => std::thread::sleep(d),
        Kill::Committed(m) => {
            let started = std::time::Instant::now();
            let committed = root.join("snapshots/committed");
            while fs::read_dir(&committed).map_or(0, |d| d.count()) < m {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                assert!(
                    started.elapsed() < std::time::Duration::from_secs(300),
                    "no {m} commits"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
    let _ = child.kill();
    let status = child.wait().unwrap();
    if status.signal() == Some(9) {
        return true;
    }
    assert!(status.success(), "unpack failed: {status}");
    false
}

#[test]
fn kill_9_at_random_moments_then_rerun() {
    let w = tmp();
    let layers: Vec<TestLayer> = (0..3)
        .map(|k| {
            let mut t = RawTar::default();
            t.dir("./");
            for d in 0..40 {
                t.dir(&format!("k{k}-{d}/"));
                for i in 0..100 {
                    t.file(
                        &format!("k{k}-{d}/f{i}"),
                        &noise(700, k * 10_000 + d * 100 + i),
                    );
                }
            }
            t.end();
            TestLayer {
                tar: t.bytes(),
                media_type: if k == 1 { MT_ZST } else { MT_GZ },
            }
        })
        .collect();
    let refs: Vec<&TestLayer> = layers.iter().collect();
    let layout = w.path().join("layout");
    let chains = image_layout(&layout, &[("t", &refs)]);
    let blobs: Vec<String> = layers.iter().map(|l| sha256(&l.blob())).collect();
    let r = format!("{}:t", layout.display());
    // The merged tree of layers 0..=i, computed once without the engine.
    let expected: Vec<Tree> = (0..refs.len())
        .map(|i| expected_merge(&refs[..=i], &w.path().join(format!("expected{i}"))))
        .collect();
    // Layers applied in parallel (the default) commit close together at
    // the end; one at a time, they commit one after the other.
    let modes: [&[&str]; 2] = [&[], &["--parallel", "1"]];
    // How long a whole unpack takes here, to spread the kills over it.
    let full: Vec<std::time::Duration> = modes
        .iter()
        .map(|extra| {
            let probe = w.path().join("probe");
            let t0 = std::time::Instant::now();
            assert_eq!(last_line(&unpack(&r, &probe, extra)), chains[0][2]);
            let took = t0.elapsed();
            fs::remove_dir_all(&probe).unwrap();
            took
        })
        .collect();
    // Each round kills an unpack on a root of its own, at a point of its
    // own. Per mode: at a random moment of the first half and of the
    // second half of a whole unpack, and as soon as one and two layers are
    // committed.
    let mut rounds = Vec::new();
    let mut seed = 0x9e37_79b9_u64;
    for (mode, whole) in full.iter().enumerate() {
        for half in 0..2 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let at = (half as f64 + (seed % 1000) as f64 / 1000.0) / 2.0;
            rounds.push((mode, Kill::After(whole.mul_f64(at))));
        }
        rounds.push((mode, Kill::Committed(1)));
        rounds.push((mode, Kill::Committed(2)));
    }
    let mut points = Vec::new();
    for (round, (mode, mut when)) in rounds.into_iter().enumerate() {
        let extra = modes[mode];
        // An unpack that finished before its kill tested nothing: that
        // round starts again on a fresh root (a timed kill earlier).
        let mut attempt = 0;
        let root = loop {
            let root = w.path().join(format!("root{round}-{attempt}"));
            if kill_unpack(&r, &root, extra, when) {
                break root;
            }
            attempt += 1;
            assert!(attempt < 6, "round {round}: every unpack beat its kill");
            if let Kill::After(d) = &mut when {
                *d /= 2;
            }
            let _ = fs::remove_dir_all(&root);
        };
        let what = format!("round {round}: after a kill {when:?} ({extra:?})");
        // Commits happen in chain order: what is committed is chains 0..k.
        let ls = committed(&root);
        let listed: Vec<&str> = ls.lines().filter_map(|l| l.split('\t').next()).collect();
        let k = listed.len();
        let mut want: Vec<&str> = chains[0][..k].iter().map(String::as_str).collect();
        want.sort();
        let mut got = listed.clone();
        got.sort();
        assert_eq!(got, want, "{what}: committed is not a prefix of the chain");
        if let Kill::Committed(m) = when {
            assert!(k >= m, "{what}: {k} committed");
        }
        // Whatever is committed is complete. The layers' directories are
        // disjoint, so the top committed chain shows every committed layer.
        if k > 0 {
            assert_same(
                &expected[k - 1],
                &mounted_tree(&root, &chains[0][k - 1], w.path()),
                &format!("{what}: chain {}", k - 1),
            );
        }
        // Every blob in the store is whole; a committed layer's blob is
        // there (the commit waits for its import).
        let stored = stored_blobs(&root);
        let have: Vec<bool> = blobs.iter().map(|b| stored.contains(b)).collect();
        assert!(
            have[..k].iter().all(|&h| h),
            "{what}: {have:?}, {k} committed"
        );
        // An image record only once the top layer is committed.
        let records = fs::read_dir(root.join("images"))
            .map(|d| {
                d.flatten()
                    .filter(|e| !e.file_name().to_string_lossy().starts_with(".tmp-"))
                    .count()
            })
            .unwrap_or(0);
        assert!(
            records == 0 || k == 3,
            "{what}: a record with {k} committed"
        );
        // The rerun does exactly what was left: the layers above k, the
        // blobs not yet stored.
        let out = unpack(&r, &root, extra);
        assert_eq!(last_line(&out), chains[0][2], "{what}");
        let missing = have.iter().filter(|&&h| !h).count() as u64;
        assert_eq!(
            summary(&out),
            (k as u64, 3 - k as u64, missing),
            "{what}: the rerun"
        );
        no_leftovers(&root);
        assert_same(
            &expected[2],
            &mounted_tree(&root, &chains[0][2], w.path()),
            &format!("{what}: after the rerun"),
        );
        assert_eq!(
            stored_blobs(&root).len(),
            5,
            "{what}: layers, manifest, config"
        );
        points.push((mode, when, k, missing));
        fs::remove_dir_all(&root).unwrap();
    }
    eprintln!("kill points (mode, when, committed, blobs missing): {points:?}");
}
