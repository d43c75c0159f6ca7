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
    let r = format!("{}:t", layout.display());
    // How long a whole unpack takes here, to spread the kills over it.
    let probe = w.path().join("probe");
    let t0 = std::time::Instant::now();
    last_line(&unpack(&r, &probe, &[]));
    let full = t0.elapsed();
    let root = w.path().join("root");
    let mut seed = 0x9e37_79b9_u64;
    for round in 0..8 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = full.mul_f64((seed % 1000) as f64 / 1000.0);
        let mut child = Command::new(bin())
            .args(["unpack", &r, "--root"])
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        child.wait().unwrap();
        // Whatever is committed is complete: mount each committed chain
        // and compare it with the layers up to it.
        let ls = committed(&root);
        for (i, c) in chains[0].iter().enumerate() {
            if ls.contains(c.as_str()) {
                assert_same(
                    &expected_merge(&refs[..=i], &w.path().join(format!("e{round}-{i}"))),
                    &mounted_tree(&root, c, w.path()),
                    &format!("round {round}: chain {i} after kill at {delay:?}"),
                );
            }
        }
    }
    assert_eq!(last_line(&unpack(&r, &root, &[])), chains[0][2]);
    no_leftovers(&root);
    assert_same(
        &expected_merge(&refs, &w.path().join("final")),
        &mounted_tree(&root, &chains[0][2], w.path()),
        "after the rerun",
    );
}
