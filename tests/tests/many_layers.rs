//! Images of many layers. Absolute `lowerdir` paths pass the kernel's one
//! page of mount options at about 35 layers; past that, the line
//! `unlade mounts` prints changes into `ROOT/snapshots/l` and names the
//! layers by short links there. A 128-layer image (overwrites, file and
//! directory whiteouts, an opaque directory across layers) mounts that
//! way, read-only and writable, and matches its flattened tree; gc sweeps
//! links whose snapshot is gone; 500 layers, overlayfs's maximum, mount,
//! and 501 are refused clearly.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use unlade::store::snapshot::Snapshotter;
use unlade::Digest;
use unlade_tests::*;

const LAYERS: usize = 128;

/// Layer `i` of the image: adds `f/NNN`; every tenth overwrites a file of
/// a lower layer, every seventh whites one out; layer 20 fills `o/`, which
/// layer 60 makes opaque; layer 30 adds `d/e/f`, which layer 90 removes
/// with its directory.
fn layer(i: usize) -> TestLayer {
    let mut t = RawTar::default();
    t.dir("./").dir("f/");
    t.file(&format!("f/{i:03}"), format!("layer {i}").as_bytes());
    if i % 10 == 9 {
        t.file(
            &format!("f/{:03}", i - 5),
            format!("overwritten by {i}").as_bytes(),
        );
    }
    if i % 7 == 6 {
        t.file(&format!("f/.wh.{:03}", i - 3), b"");
    }
    match i {
        20 => {
            t.dir("o/")
                .file("o/old", b"hidden by layer 60")
                .dir("o/sub/")
                .file("o/sub/x", b"hidden too");
        }
        30 => {
            t.dir("d/")
                .dir("d/e/")
                .file("d/e/f", b"removed by layer 90");
        }
        60 => {
            t.dir("o/")
                .file("o/.wh..wh..opq", b"")
                .file("o/new", b"all o/ has from layer 60 on");
        }
        90 => {
            t.file(".wh.d", b"");
        }
        _ => {}
    }
    t.end();
    TestLayer {
        tar: t.bytes(),
        media_type: [MT_TAR, MT_GZ, MT_ZST][i % 3],
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `unlade ARGS --root ROOT` in `cwd`.
fn unlade(root: &Path, cwd: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .current_dir(cwd)
        .args(args)
        .arg("--root")
        .arg(root)
        .output()
        .expect("run unlade")
}

/// The `-o` argument of a printed mount line (unquoted: hex names and
/// plain paths need no quotes).
fn options_of(line: &str) -> &str {
    line.rsplit_once(" -o ").expect("-o").1
}

/// The entries of a directory, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_128_layer_image_mounts_and_matches_its_flattened_tree() {
    let w = tmp();
    let layers: Vec<TestLayer> = (0..LAYERS).map(layer).collect();
    let refs: Vec<&TestLayer> = layers.iter().collect();
    let layout = w.path().join("layout");
    let chains = image_layout(&layout, &[("many", &refs)]);
    let root = w.path().join("root");
    let image = format!("{}:many", layout.display());
    let top = last_line(&unpack(&image, &root, &["-q"]));
    assert_eq!(top, chains[0][LAYERS - 1]);

    // Absolute paths would take ~15 KiB: the line changes into l/ and
    // names each layer by a short link.
    let l = root.join("snapshots/l");
    let target = w.path().join("mnt");
    let line = last_line(&unlade(
        &root,
        w.path(),
        &["mounts", target.to_str().unwrap(), &top],
    ));
    let want = format!(
        "cd {} && mount -t overlay overlay {} -o ro,lowerdir=",
        l.display(),
        target.display()
    );
    assert!(line.starts_with(&want), "{line}");
    let opts = options_of(&line);
    assert!(opts.len() < 4096, "{} bytes: {opts}", opts.len());
    let lowers: Vec<&str> = opts["ro,lowerdir=".len()..].split(':').collect();
    assert_eq!(lowers.len(), LAYERS);
    for (name, chain) in lowers.iter().zip(chains[0].iter().rev()) {
        assert!(chain[7..].starts_with(name) && name.len() >= 6, "{name}");
    }
    assert_eq!(names(&l).len(), LAYERS);

    let expected = expected_merge(&refs, &w.path().join("expected"));
    for gone in ["f/003", "o/old", "o/sub", "d"] {
        assert!(!expected.contains_key(gone), "{gone}");
    }
    for kept in ["f/000", "f/127", "o/new"] {
        assert!(expected.contains_key(kept), "{kept}");
    }
    let actual = mounted_tree(&root, &top, w.path());
    assert_same(&expected, &actual, "128 layers mounted vs flattened");
    assert_eq!(
        fs::read(w.path().join("expected/expected/f/004")).unwrap(),
        b"overwritten by 9"
    );

    // A container on it: the line is made with a relative target and run
    // from elsewhere, so the target in it must be absolute.
    let rw = last_line(&unlade(
        &root,
        w.path(),
        &["mounts", "rootfs", &top, "--rw", "c1"],
    ));
    assert!(
        rw.starts_with(&format!(
            "cd {} && mount -t overlay overlay {} -o index=off,workdir=../rw/c1/work,upperdir=../rw/c1/fs,lowerdir=",
            l.display(),
            w.path().join("rootfs").display()
        )),
        "{rw}"
    );
    let rootfs = w.path().join("rootfs");
    fs::create_dir(&rootfs).unwrap();
    sh(Command::new("sh").current_dir("/").arg("-c").arg(&rw));
    let base = fs::read(rootfs.join("f/000"));
    fs::write(rootfs.join("written-by-container"), b"hi").unwrap();
    fs::remove_file(rootfs.join("f/127")).unwrap();
    sh(Command::new("umount").arg(&rootfs));
    assert_eq!(base.unwrap(), b"layer 0");
    let upper = root.join("snapshots/rw/c1/fs");
    assert_eq!(fs::read(upper.join("written-by-container")).unwrap(), b"hi");
    assert_eq!(
        snapshot(&upper)["f/127"].content,
        "0:0",
        "a whiteout in the upper directory"
    );
    assert_same(
        &expected,
        &mounted_tree(&root, &top, w.path()),
        "read-only view after the container wrote",
    );

    // gc removes a dangling link and keeps the live ones.
    let live = names(&l);
    std::os::unix::fs::symlink(
        format!("../committed/{}/fs", "0".repeat(64)),
        l.join("000000"),
    )
    .unwrap();
    let gc = unlade(&root, w.path(), &["gc"]);
    assert!(
        stdout(&gc).contains("removed 0 snapshots, 0 blobs (0 bytes), 1 links"),
        "{}",
        stdout(&gc)
    );
    assert_eq!(names(&l), live);
    // Once the image and the container go, the snapshots go with their
    // links, and nothing is left.
    assert!(unlade(&root, w.path(), &["images", "rm", &image])
        .status
        .success());
    assert!(unlade(&root, w.path(), &["snapshots", "rm", "c1"])
        .status
        .success());
    let gc = unlade(&root, w.path(), &["gc"]);
    assert!(
        stdout(&gc).contains(&format!("removed {LAYERS} snapshots")),
        "{}",
        stdout(&gc)
    );
    assert!(names(&l).is_empty(), "{:?}", names(&l));
    assert_eq!(stdout(&unlade(&root, w.path(), &["snapshots", "ls"])), "");
}

/// Removing a snapshot with `snapshots rm` takes its short link along.
#[test]
fn snapshots_rm_removes_the_short_link() {
    let w = tmp();
    let root = w.path().join("root");
    let snaps = Snapshotter::open(&root).unwrap();
    let mut chains: Vec<Digest> = Vec::new();
    for i in 0..40 {
        let a = snaps.prepare(chains.last().copied()).unwrap();
        let c = Digest::of(format!("rm {i}").as_bytes());
        snaps.commit(a, &c).unwrap();
        chains.push(c);
    }
    let top = chains[39].to_string();
    let line = last_line(&unlade(&root, w.path(), &["mounts", "/mnt", &top]));
    assert!(line.starts_with("cd "), "{line}");
    let l = root.join("snapshots/l");
    assert_eq!(names(&l).len(), 40);
    assert!(unlade(&root, w.path(), &["snapshots", "rm", &top])
        .status
        .success());
    assert_eq!(names(&l).len(), 39);
    assert!(!names(&l).iter().any(|n| top[7..].starts_with(n.as_str())));
}

/// overlayfs's deepest stack, mounted for real with the printed line, read-only
/// and writable; one layer more is a clear error.
#[test]
fn five_hundred_layers_mount_and_501_are_refused() {
    let w = tmp();
    let root = w.path().join("root");
    let snaps = Snapshotter::open(&root).unwrap();
    let mut chains: Vec<Digest> = Vec::new();
    for i in 0..501 {
        let a = snaps.prepare(chains.last().copied()).unwrap();
        fs::write(a.fs().join(format!("{i:03}")), format!("{i}")).unwrap();
        let c = Digest::of(format!("deep {i}").as_bytes());
        snaps.commit(a, &c).unwrap();
        chains.push(c);
    }
    let top = chains[499].to_string();
    let target = w.path().join("mnt");
    fs::create_dir(&target).unwrap();
    let line = last_line(&unlade(
        &root,
        w.path(),
        &["mounts", target.to_str().unwrap(), &top],
    ));
    assert!(options_of(&line).len() < 4096, "{line}");
    sh(Command::new("sh").arg("-c").arg(&line));
    let merged = names(&target);
    sh(Command::new("umount").arg(&target));
    assert_eq!(merged.len(), 500);
    assert_eq!(merged[0], "000");

    // Writable, with the longest key there is.
    let key = "k".repeat(200);
    let rw = last_line(&unlade(
        &root,
        w.path(),
        &["mounts", target.to_str().unwrap(), &top, "--rw", &key],
    ));
    assert!(options_of(&rw).len() < 4096, "{rw}");
    sh(Command::new("sh").arg("-c").arg(&rw));
    fs::write(target.join("new"), b"x").unwrap();
    let merged = names(&target);
    sh(Command::new("umount").arg(&target));
    assert_eq!(merged.len(), 501);
    assert!(root.join("snapshots/rw").join(&key).join("fs/new").exists());

    let deeper = chains[500].to_string();
    for extra in [&[][..], &["--rw", "c2"][..]] {
        let mut args = vec!["mounts", "/mnt", deeper.as_str()];
        args.extend_from_slice(extra);
        let e = err_line(&unlade(&root, w.path(), &args));
        assert!(
            e.contains(&deeper) && e.contains("has 501 layers") && e.contains("at most 500"),
            "{e}"
        );
    }
    let ls = stdout(&unlade(&root, w.path(), &["snapshots", "ls"]));
    assert!(
        !ls.lines().any(|l| l.starts_with("c2\t")),
        "no writable snapshot is left: {ls}"
    );
}

/// The most threads `pid` had at once while it ran, sampled every
/// millisecond (a sample can miss a peak; it never invents one), and its
/// exit status.
fn peak_threads(mut child: std::process::Child) -> (usize, std::process::ExitStatus) {
    let tasks = format!("/proc/{}/task", child.id());
    let mut peak = 0;
    loop {
        if let Ok(d) = fs::read_dir(&tasks) {
            peak = peak.max(d.count());
        }
        if let Some(status) = child.try_wait().unwrap() {
            return (peak, status);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// An unpack's threads are bounded by its options, not by its layers:
/// ARCHITECTURE.md, "Threads", gives the bound. With 2 layers at a time,
/// 3 downloads and 2 writers: 4 fixed threads (main, signals, the cancel
/// watcher, progress), 7 layer threads each with at most one copy into
/// the store, a decoder and a hasher per layer being applied, and each
/// writer with at most 4 io-wq threads: 4 + 14 + 4 + 2 × 5 = 32.
#[test]
fn threads_stay_bounded_however_many_layers() {
    let w = tmp();
    let layers: Vec<TestLayer> = (0..48)
        .map(|i| many_files(40, 8 << 10, 500 + i as u64, [MT_TAR, MT_GZ, MT_ZST][i % 3]))
        .collect();
    let refs: Vec<&TestLayer> = layers.iter().collect();
    let layout = w.path().join("layout");
    let chains = image_layout(&layout, &[("wide", &refs)]);
    let image = format!("{}:wide", layout.display());
    let bound = 32;
    let mut peaks = Vec::new();
    for (round, layers) in [8usize, 48].into_iter().enumerate() {
        let root = w.path().join(format!("root{round}"));
        // The first 8 layers: an image of its own, the same lower chain.
        let r = if layers == 48 {
            image.clone()
        } else {
            let small = w.path().join("small");
            image_layout(&small, &[("narrow", &refs[..layers])]);
            format!("{}:narrow", small.display())
        };
        let child = Command::new(bin())
            .args([
                "unpack",
                &r,
                "-q",
                "--parallel",
                "2",
                "--threads",
                "2",
                "--root",
            ])
            .arg(&root)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let (peak, status) = peak_threads(child);
        assert!(status.success(), "{layers} layers: {status}");
        let top = Snapshotter::open(&root)
            .unwrap()
            .stat(&chains[0][layers - 1].parse::<Digest>().unwrap());
        assert!(top.is_ok(), "{layers} layers: the top is committed");
        // Sampling worked: the two writers and the main thread at least.
        assert!(peak >= 3, "{layers} layers: {peak} threads seen");
        assert!(
            peak <= bound,
            "{layers} layers: {peak} threads, over {bound}"
        );
        peaks.push(peak);
    }
    eprintln!("peak threads (8 layers, 48 layers): {peaks:?}");
}
