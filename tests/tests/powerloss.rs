//! Power loss during `unlade unpack --sync`, simulated the way
//! dm-log-writes crash tests do, without device-mapper: a scratch ext4 on
//! a loop device whose backing file is served by `logdisk` (a FUSE file
//! system in this crate) records every block write and every flush. The
//! log is then replayed onto the initial image up to many crash points —
//! everything before the last flush, and a random subset of the writes
//! after it, which a disk cache may or may not have kept — and each
//! resulting disk is checked: e2fsck finds nothing it cannot repair, every
//! committed snapshot is complete (equal, file by file, to the same
//! snapshot unpacked normally), and the next `unlade unpack` cleans up
//! whatever was in progress and completes the image.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use unlade_tests::*;

enum Rec {
    Write(u64, Vec<u8>),
    Flush,
}

fn parse_log(p: &Path) -> Vec<Rec> {
    let d = fs::read(p).unwrap();
    let mut out = Vec::new();
    let mut i = 0;
    while i < d.len() {
        let kind = d[i];
        let off = u64::from_le_bytes(d[i + 1..i + 9].try_into().unwrap());
        let len = u64::from_le_bytes(d[i + 9..i + 17].try_into().unwrap()) as usize;
        let data = d[i + 17..i + 17 + len].to_vec();
        i += 17 + len;
        out.push(if kind == b'W' {
            Rec::Write(off, data)
        } else {
            Rec::Flush
        });
    }
    out
}

fn logdisk_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_logdisk"))
}

fn wait_for(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A layer of files in a few directories; layer 1 also whites out and
/// makes a directory opaque.
fn layer(k: u64) -> TestLayer {
    let mut t = RawTar::default();
    t.dir("./");
    if k == 1 {
        t.dir("l0-d0/")
            .file("l0-d0/.wh.f0", b"")
            .dir("l0-d1/")
            .file("l0-d1/.wh..wh..opq", b"");
    }
    for d in 0..4 {
        t.dir(&format!("l{k}-d{d}/"));
        for i in 0..60 {
            let len = 1000 + ((k * 7919 + d * 104_729 + i * 31) % 30_000) as usize;
            t.file(
                &format!("l{k}-d{d}/f{i}"),
                &noise(len, k * 1000 + d * 100 + i),
            );
        }
    }
    t.end();
    TestLayer {
        tar: t.bytes(),
        media_type: if k == 1 { MT_ZST } else { MT_GZ },
    }
}

struct Xorshift(u64);
impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn committed_trees(root: &Path) -> Vec<(String, Tree)> {
    let dir = root.join("snapshots/committed");
    let mut out: Vec<(String, Tree)> = fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    let mut tree = snapshot(&e.path().join("fs"));
                    // Whiteouts get the time they were made, as containerd's.
                    for n in tree.values_mut() {
                        if n.kind == 'c' && n.content == "0:0" {
                            n.mtime_ns = None;
                        }
                    }
                    (format!("sha256:{}", e.file_name().to_string_lossy()), tree)
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Writes onto a copy of `base` the disk as a crash at log position `k`
/// leaves it: every write before the last flush before `k`, and of the
/// writes after that flush, those `keep` picks.
fn disk_at(
    base: &Path,
    img: &Path,
    recs: &[Rec],
    flushes: &[usize],
    k: usize,
    mut keep: impl FnMut() -> bool,
) {
    let last_flush = flushes.iter().rev().find(|&&f| f < k).copied();
    fs::copy(base, img).unwrap();
    let mut f = fs::OpenOptions::new().write(true).open(img).unwrap();
    for (i, rec) in recs[..k].iter().enumerate() {
        if let Rec::Write(off, data) = rec {
            let durable = last_flush.is_some_and(|lf| i < lf);
            if durable || keep() {
                f.seek(SeekFrom::Start(*off)).unwrap();
                f.write_all(data).unwrap();
            }
        }
    }
}

/// e2fsck, then mount `img` at `mnt`; the caller unmounts.
fn check_and_mount(img: &Path, mnt: &Path, what: &str) {
    let fsck = Command::new("e2fsck")
        .args(["-f", "-y"])
        .arg(img)
        .output()
        .unwrap();
    let code = fsck.status.code().unwrap_or(8);
    assert!(
        code < 4,
        "{what}: e2fsck exit {code}: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    sh(Command::new("mount").args(["-o", "loop"]).arg(img).arg(mnt));
}

fn committed_count(root: &Path) -> usize {
    fs::read_dir(root.join("snapshots/committed")).map_or(0, |rd| rd.count())
}

struct Disk {
    logdisk: Child,
    fuse: PathBuf,
    loopdev: String,
    fs: PathBuf,
}

fn attach(work: &Path, base: &Path, log: &Path) -> Disk {
    let fuse = work.join("fuse");
    let fsdir = work.join("fs");
    fs::create_dir_all(&fuse).unwrap();
    fs::create_dir_all(&fsdir).unwrap();
    let logdisk = Command::new(logdisk_bin())
        .arg(base)
        .arg(&fuse)
        .arg(log)
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait_for(&fuse.join("disk"));
    let out = sh(Command::new("losetup")
        .args(["--direct-io=on", "--find", "--show"])
        .arg(fuse.join("disk")));
    let loopdev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    sh(Command::new("mount").arg(&loopdev).arg(&fsdir));
    Disk {
        logdisk,
        fuse,
        loopdev,
        fs: fsdir,
    }
}

fn detach(mut d: Disk) {
    sh(Command::new("umount").arg(&d.fs));
    sh(Command::new("losetup").arg("-d").arg(&d.loopdev));
    // The loop device lets go of the file asynchronously.
    let t = Instant::now();
    loop {
        let st = Command::new("umount").arg(&d.fuse).status().unwrap();
        if st.success() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "cannot unmount logdisk"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.logdisk.wait().unwrap().success());
}

#[test]
fn sync_unpack_survives_power_loss_at_any_point() {
    let w = tmp();
    let layers: Vec<TestLayer> = (0..3).map(layer).collect();
    let refs: Vec<&TestLayer> = layers.iter().collect();
    let layout = w.path().join("layout");
    let chains = image_layout(&layout, &[("t", &refs)]);
    let r = format!("{}:t", layout.display());

    // What each committed snapshot must hold: a normal unpack's.
    let reference = w.path().join("reference");
    last_line(&unpack(&r, &reference, &[]));
    let want = committed_trees(&reference);
    assert_eq!(want.len(), 3);

    let base = w.path().join("base.img");
    fs::File::create(&base).unwrap().set_len(64 << 20).unwrap();
    sh(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
        ])
        .arg(&base));
    let log = w.path().join("log");
    let disk = attach(w.path(), &base, &log);
    let out = unpack(&r, &disk.fs.join("root"), &["--sync", "--parallel", "2"]);
    assert_eq!(last_line(&out), chains[0][2]);
    detach(disk);

    let recs = parse_log(&log);
    let flushes: Vec<usize> = recs
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r, Rec::Flush))
        .map(|(i, _)| i)
        .collect();
    assert!(flushes.len() > 10, "only {} flushes logged", flushes.len());
    // Crash points: just before many flushes (the most writes in doubt),
    // and random points in between.
    let mut rng = Xorshift(0x2545_f491_4f6c_dd1d);
    let mut points: Vec<usize> = (0..24)
        .map(|k| flushes[k * flushes.len() / 24])
        .chain((0..8).map(|_| (rng.next() % recs.len() as u64) as usize))
        .collect();
    points.push(recs.len());
    let img = w.path().join("crash.img");
    let mnt = w.path().join("crash");
    fs::create_dir_all(&mnt).unwrap();
    // And around each commit: the committed count of the durable prefix
    // grows with the log, so bisection finds the flush that made commit c
    // durable; crash just before it, at it, and just after.
    let durable_count = |j: usize| {
        disk_at(&base, &img, &recs, &flushes, flushes[j] + 1, || false);
        check_and_mount(&img, &mnt, "bisect");
        let n = committed_count(&mnt.join("root"));
        sh(Command::new("umount").arg(&mnt));
        n
    };
    for c in 1..=3 {
        let (mut lo, mut hi) = (0usize, flushes.len() - 1);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if durable_count(mid) >= c {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        points.extend([flushes[lo], flushes[lo] + 1]);
        if lo > 0 {
            points.push(flushes[lo - 1] + 1);
        }
    }
    points.sort_unstable();
    points.dedup();
    let mut partial = 0;
    let mut seen_counts = std::collections::BTreeSet::new();
    for &k in &points {
        // The disk at the crash: everything up to the last flush before
        // k, then any subset of the writes after it.
        disk_at(&base, &img, &recs, &flushes, k, || {
            rng.next().is_multiple_of(2)
        });
        check_and_mount(&img, &mnt, &format!("crash point {k}"));
        let root = mnt.join("root");
        let got = committed_trees(&root);
        seen_counts.insert(got.len());
        if !got.is_empty() && got.len() < 3 {
            partial += 1;
        }
        for (chain, tree) in &got {
            let (_, expected) = want
                .iter()
                .find(|(c, _)| c == chain)
                .unwrap_or_else(|| panic!("crash point {k}: unknown snapshot {chain}"));
            assert_same(
                expected,
                tree,
                &format!("crash point {k}: committed {chain}"),
            );
        }
        // The next run cleans up and completes the image.
        if root.exists() {
            let again = unpack(&r, &root, &[]);
            assert_eq!(last_line(&again), chains[0][2], "crash point {k}");
            assert_eq!(
                fs::read_dir(root.join("snapshots/active")).unwrap().count(),
                0,
                "crash point {k}: leftovers"
            );
            let all = committed_trees(&root);
            assert_eq!(all.len(), 3);
            for ((c1, t1), (c2, t2)) in all.iter().zip(&want) {
                assert_eq!(c1, c2);
                assert_same(t2, t1, &format!("crash point {k}: after the rerun"));
            }
        }
        sh(Command::new("umount").arg(&mnt));
    }
    eprintln!(
        "{} log records, {} flushes, {} crash points; committed-snapshot counts seen: {seen_counts:?}",
        recs.len(),
        flushes.len(),
        points.len()
    );
    // The points cover the interesting region: some crashes left part of
    // the image committed.
    assert!(
        partial > 0,
        "no crash point fell between two commits: {seen_counts:?}"
    );
}
