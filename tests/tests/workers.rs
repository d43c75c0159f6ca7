//! The worker pool: entries that depend on each other across directories
//! land as they would one after another, whatever the number of workers;
//! the default number of workers follows the CPU affinity mask.
//!
//! With one worker every job runs in submission order, so `--threads 1`
//! is the sequential reference; more workers route jobs of different
//! directories to different threads, and only the applier's dependency
//! tracking keeps the result the same.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use unlade_tests::{apply, assert_same, ok_diff_id, sh, snapshot, tmp, RawTar, Tree, H};

/// A layer whose later entries depend on earlier ones in other
/// directories, with enough files around them that the workers are busy.
fn tangled(big: usize) -> Vec<u8> {
    let mut t = RawTar::default();
    for d in 0..40 {
        t.dir(&format!("d{d}"));
        for f in 0..25 {
            t.file(&format!("d{d}/f{f}"), format!("v1 {d}/{f}").as_bytes());
        }
    }
    // Written again, right away and later: the last one wins.
    t.file("d1/f1", b"v2");
    for d in 0..40 {
        t.file(&format!("d{d}/f2"), format!("v2 {d}").as_bytes());
    }
    t.file("d1/f1", b"v3");
    // Hard links to files just written in other directories.
    for d in 0..40 {
        t.hardlink(&format!("d{}/link", (d + 7) % 40), &format!("d{d}/f3"));
    }
    // A symlink, then a file through it: lands in d3.
    t.symlink("s", "d3");
    t.file("s/through", b"via the link");
    // A directory full of pending files, replaced by a file.
    t.dir("gone");
    for f in 0..60 {
        t.file(&format!("gone/f{f}"), b"x");
    }
    t.file("gone", b"now a file");
    // A file of this layer deleted by a whiteout of the same layer.
    t.file(".wh.f4", b"");
    t.file("d5/.wh.f4", b"");
    // A large file (written piecewise when streamed) and a link to it.
    let data: Vec<u8> = (0..big).map(|i| (i * 7 % 251) as u8).collect();
    t.file("d6/big", &data);
    t.hardlink("d7/big-link", "d6/big");
    // Parents made implicitly, deep, then an entry replacing one of them.
    for f in 0..30 {
        t.file(&format!("deep/a/b/c{}/f", f % 5), b"deep");
    }
    t.file("deep/a/b/c1", b"replaced a directory");
    // A directory entry after its files: its mode and mtime are restored
    // at the end.
    t.entry(
        H {
            name: b"d8",
            typ: b'5',
            mode: 0o500,
            mtime: 1_500_000_000,
            ..H::default()
        },
        b"",
    );
    t.buf.extend_from_slice(&[0u8; 1024]);
    t.buf
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

#[test]
fn dependent_entries_land_as_in_order_on_any_number_of_workers() {
    let work = tmp();
    let plain = tangled(9 << 20);
    let layers = [("tar", plain.clone()), ("gz", gzip(&plain))];
    for (kind, bytes) in &layers {
        let layer = work.path().join(format!("layer.{kind}"));
        fs::write(&layer, bytes).expect("write layer");
        let reference = work.path().join(format!("{kind}-1"));
        let out = apply(&layer, &reference, &["--threads", "1"]);
        let id = ok_diff_id(&out);
        let want = comparable(snapshot(&reference));
        check_facts(&reference);
        for threads in ["2", "8"] {
            let dest = work.path().join(format!("{kind}-{threads}"));
            let out = apply(&layer, &dest, &["--threads", threads]);
            assert_eq!(ok_diff_id(&out), id, "{kind}, {threads} workers");
            let got = comparable(snapshot(&dest));
            assert_same(&want, &got, &format!("{kind}, {threads} workers"));
        }
    }
}

/// The tree without the times the archive does not set: the layer root
/// and the parents made implicitly get the time they were made, and so
/// do whiteouts (as containerd makes them).
fn comparable(mut t: Tree) -> Tree {
    for (path, node) in t.iter_mut() {
        let implicit = path.is_empty() || (path.starts_with("deep") && node.kind == 'd');
        let whiteout = node.kind == 'c' && node.content == "0:0";
        if implicit || whiteout {
            node.mtime_ns = None;
        }
    }
    t
}

/// What the tangled layer must look like, checked on the sequential
/// reference (the others are compared with it).
fn check_facts(root: &Path) {
    let read = |p: &str| fs::read(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(read("d1/f1"), b"v3");
    assert_eq!(read("d9/f2"), b"v2 9");
    assert_eq!(read("d3/through"), b"via the link");
    assert_eq!(read("gone"), b"now a file");
    assert_eq!(read("deep/a/b/c1"), b"replaced a directory");
    assert_eq!(read("deep/a/b/c2/f"), b"deep");
    let wh = fs::symlink_metadata(root.join("d5/f4")).expect("whiteout");
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "d5/f4 is a whiteout"
    );
    let (a, b) = (
        fs::metadata(root.join("d0/f3")).expect("link target"),
        fs::metadata(root.join("d7/link")).expect("link"),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "d7/link is d0/f3");
    let (a, b) = (
        fs::metadata(root.join("d6/big")).expect("big"),
        fs::metadata(root.join("d7/big-link")).expect("big link"),
    );
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.len(), 9 << 20);
    let d8 = fs::metadata(root.join("d8")).expect("d8");
    assert_eq!((d8.mode() & 0o7777, d8.mtime()), (0o500, 1_500_000_000));
}

#[test]
fn default_workers_follow_the_affinity_mask() {
    if !unlade_tests::have("taskset") {
        eprintln!("skipped: no taskset");
        return;
    }
    let work = tmp();
    let layer = work.path().join("layer.tar");
    let mut t = RawTar::default();
    t.file("a", b"1");
    t.buf.extend_from_slice(&[0u8; 1024]);
    fs::write(&layer, &t.buf).expect("write layer");
    let out = sh(Command::new("taskset")
        .args(["-c", "0"])
        .arg(unlade_tests::bin())
        .arg("apply")
        .arg(&layer)
        .arg(work.path().join("one"))
        .args(["--backend", "syscalls"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("by 1 syscalls worker\n"), "{text}");
    let out = apply(
        &layer,
        &work.path().join("three"),
        &["--threads", "3", "--backend", "syscalls"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("by 3 syscalls workers\n"), "{text}");
}
