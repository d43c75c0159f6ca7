//! Faithfulness of single entries and their combinations: replacement
//! order, implicit parents, late parents, archive ends, header encodings
//! (PAX overrides, globals, GNU base-256, the PAX-before-GNU-long-name
//! differential), whiteouts and opaque directories.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use unlade_tests::*;

fn tar(f: impl FnOnce(&mut RawTar)) -> Vec<u8> {
    let mut t = RawTar::default();
    f(&mut t);
    t.end();
    t.bytes()
}

/// Applies `layer` into a fresh DEST; returns (dir guard, DEST path).
fn run(layer: &[u8]) -> (TempDir, std::path::PathBuf) {
    let w = tmp();
    let f = write(w.path(), "l.tar", layer);
    let dest = w.path().join("dest");
    let id = ok_diff_id(&apply(&f, &dest, &[]));
    assert_eq!(id, sha256(layer));
    (w, dest)
}

#[test]
fn later_entries_replace_earlier_ones() {
    let (_w, d) = run(&tar(|t| {
        t.file("f2d", b"file")
            .dir("f2d")
            .file("f2d/child", b"c")
            .dir("d2f")
            .dir("d2f/sub")
            .file("d2f/sub/deep", b"deep")
            .file("d2f", b"now a file")
            .symlink("s2f", "target")
            .file("s2f", b"now a file")
            .file("f2s", b"was a file")
            .symlink("f2s", "now/a/link")
            .file("t1", b"one")
            .file("t2", b"two")
            .hardlink("h", "t1")
            .hardlink("h", "t2")
            .file("same", b"v1")
            .file("same", b"v2")
            .dir("d2d")
            .file("d2d/keep", b"kept")
            .entry(
                H {
                    name: b"d2d",
                    typ: b'5',
                    mode: 0o700,
                    ..H::default()
                },
                b"",
            );
    }));
    assert_eq!(fs::read(d.join("f2d/child")).unwrap(), b"c");
    assert_eq!(fs::read(d.join("d2f")).unwrap(), b"now a file");
    assert_eq!(fs::read(d.join("s2f")).unwrap(), b"now a file");
    assert_eq!(
        fs::read_link(d.join("f2s")).unwrap().to_str(),
        Some("now/a/link")
    );
    assert_eq!(fs::read(d.join("h")).unwrap(), b"two");
    assert_eq!(
        fs::metadata(d.join("h")).unwrap().ino(),
        fs::metadata(d.join("t2")).unwrap().ino()
    );
    assert_eq!(fs::metadata(d.join("t1")).unwrap().nlink(), 1);
    assert_eq!(fs::read(d.join("same")).unwrap(), b"v2");
    assert_eq!(fs::read(d.join("d2d/keep")).unwrap(), b"kept");
    assert_eq!(fs::metadata(d.join("d2d")).unwrap().mode() & 0o7777, 0o700);
}

#[test]
fn missing_parents_and_late_parents() {
    let (_w, d) = run(&tar(|t| {
        t.entry(
            H {
                name: b"a/b/c/file",
                uid: 5,
                gid: 6,
                ..H::default()
            },
            b"x",
        )
        .entry(
            H {
                name: b"late/child",
                ..H::default()
            },
            b"y",
        )
        .entry(
            H {
                name: b"late/",
                typ: b'5',
                mode: 0o750,
                uid: 42,
                gid: 43,
                mtime: 1234,
                ..H::default()
            },
            b"",
        );
    }));
    for p in ["a", "a/b", "a/b/c"] {
        let md = fs::metadata(d.join(p)).unwrap();
        assert_eq!(
            (md.mode() & 0o7777, md.uid(), md.gid()),
            (0o755, 0, 0),
            "{p}"
        );
    }
    let md = fs::metadata(d.join("late")).unwrap();
    assert_eq!(
        (md.mode() & 0o7777, md.uid(), md.gid(), md.mtime()),
        (0o750, 42, 43, 1234)
    );
    assert_eq!(fs::read(d.join("late/child")).unwrap(), b"y");
}

#[test]
fn archive_ends() {
    let body = {
        let mut t = RawTar::default();
        t.file("a", b"aaa");
        t.bytes()
    };
    // Trailing garbage after the end-of-archive blocks is hashed, not parsed.
    let mut garbage = tar(|t| {
        t.file("a", b"aaa");
    });
    garbage.extend_from_slice(b"trailing garbage that is not a header\n");
    // One zero block only, no end blocks, a short final block.
    let mut one_zero = body.clone();
    one_zero.extend_from_slice(&[0u8; 512]);
    let mut short = body.clone();
    short.extend_from_slice(&[0u8; 100]);
    for (what, layer) in [
        ("garbage", garbage),
        ("one zero block", one_zero),
        ("no end", body.clone()),
        ("short end", short),
    ] {
        let (_w, d) = run(&layer);
        assert_eq!(fs::read(d.join("a")).unwrap(), b"aaa", "{what}");
    }
    // The empty layer.
    let (_w, d) = run(b"");
    assert_eq!(fs::read_dir(&d).unwrap().count(), 0);
    let (_w, d) = run(&[0u8; 1024]);
    assert_eq!(fs::read_dir(&d).unwrap().count(), 0);
}

#[test]
fn pax_overrides_and_globals() {
    let long = "p/".repeat(80) + "file";
    let (_w, d) = run(&tar(|t| {
        t.pax(
            b'g',
            &[
                ("uid", b"777"),
                ("mtime", b"1000000000.5"),
                ("comment", b"built by test"),
            ],
        )
        .file("g1", b"global owner")
        // PAX size wins over a non-zero header size.
        .pax(b'x', &[("size", b"4")])
        .entry(
            H {
                name: b"sized",
                size: 2,
                ..H::default()
            },
            b"abcd",
        )
        .pax(
            b'x',
            &[
                ("path", long.as_bytes()),
                ("uid", b"3000000"),
                ("mtime", b"-1.25"),
            ],
        )
        .file("short", b"long named")
        // A local empty value reverts to the header's field.
        .pax(b'x', &[("uid", b"")])
        .entry(
            H {
                name: b"reverted",
                uid: 9,
                ..H::default()
            },
            b"r",
        )
        .pax(b'g', &[("uid", b"")])
        .file("g2", b"no global owner");
    }));
    let md = |p: &str| fs::symlink_metadata(d.join(p)).unwrap();
    assert_eq!(
        (md("g1").uid(), md("g1").mtime(), md("g1").mtime_nsec()),
        (777, 1_000_000_000, 500_000_000)
    );
    assert_eq!(fs::read(d.join("sized")).unwrap(), b"abcd");
    assert_eq!(fs::read(d.join(&long)).unwrap(), b"long named");
    assert_eq!(
        (md(&long).uid(), md(&long).mtime(), md(&long).mtime_nsec()),
        (3_000_000, -2, 750_000_000)
    );
    assert_eq!(md("reverted").uid(), 9);
    assert_eq!(md("g2").uid(), 0);
}

#[test]
fn pax_then_gnu_long_name_applies_to_the_file() {
    // The tar-rs differential: a PAX header followed by a GNU long name
    // header; both belong to the next file header, the long name wins over
    // the PAX path (Go's archive/tar order), and the PAX size is the file's,
    // not the long name header's.
    let (_w, d) = run(&tar(|t| {
        t.pax(b'x', &[("size", b"6"), ("path", b"pax-name")])
            .gnu_long(b'L', b"gnu-long-name")
            .entry(
                H {
                    name: b"hdr-name",
                    size: 1,
                    ..H::default()
                },
                b"sixsix",
            );
    }));
    assert_eq!(fs::read(d.join("gnu-long-name")).unwrap(), b"sixsix");
    assert!(!d.join("pax-name").exists() && !d.join("hdr-name").exists());
}

#[test]
fn gnu_base256_numbers() {
    let mut t = RawTar::default();
    let mut h = RawTar::header(&H {
        name: b"big",
        gnu: true,
        size: 3,
        ..H::default()
    });
    // uid 2^33 is out of range; use 3_000_000 in base-256, and size 3.
    h[108..116].copy_from_slice(&[0x80, 0, 0, 0, 0, 0x2d, 0xc6, 0xc0]);
    h[124..136].copy_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3]);
    RawTar::fix_checksum(&mut h);
    t.block(&h).data(b"abc").end();
    let (_w, d) = run(&t.bytes());
    let md = fs::metadata(d.join("big")).unwrap();
    assert_eq!((md.uid(), md.len()), (3_000_000, 3));
}

#[test]
fn special_files_and_hardlink_edge_cases() {
    let (_w, d) = run(&tar(|t| {
        t.entry(
            H {
                name: b"null",
                typ: b'3',
                mode: 0o666,
                dev: (1, 3),
                ..H::default()
            },
            b"",
        )
        .entry(
            H {
                name: b"sda",
                typ: b'4',
                mode: 0o660,
                gid: 6,
                dev: (8, 0),
                ..H::default()
            },
            b"",
        )
        .entry(
            H {
                name: b"fifo",
                typ: b'6',
                mode: 0o640,
                ..H::default()
            },
            b"",
        )
        .entry(
            H {
                name: b"locked",
                mode: 0o000,
                ..H::default()
            },
            b"locked",
        )
        .entry(
            H {
                name: b"suid",
                mode: 0o4755,
                uid: 1,
                ..H::default()
            },
            b"suid",
        )
        .hardlink("l1", "locked")
        .hardlink("s1", "suid")
        .hardlink("s2", "s1")
        .file("self", b"me")
        .hardlink("self", "./self");
    }));
    let md = |p: &str| fs::symlink_metadata(d.join(p)).unwrap();
    assert!(md("null").file_type().is_char_device());
    assert_eq!(
        (
            md("null").mode() & 0o7777,
            rustix::fs::major(md("null").rdev())
        ),
        (0o666, 1)
    );
    assert!(md("sda").file_type().is_block_device());
    assert_eq!(md("sda").gid(), 6);
    assert!(md("fifo").file_type().is_fifo());
    assert_eq!(md("fifo").mode() & 0o7777, 0o640);
    assert_eq!(md("l1").ino(), md("locked").ino());
    assert_eq!(md("s2").ino(), md("suid").ino());
    assert_eq!(md("suid").mode() & 0o7777, 0o4755);
    assert_eq!(md("suid").nlink(), 3);
    assert_eq!(fs::read(d.join("self")).unwrap(), b"me");
}

#[test]
fn hardlink_to_a_missing_target_is_an_error() {
    let w = tmp();
    let f = write(
        w.path(),
        "l.tar",
        &tar(|t| {
            t.file("a", b"a").hardlink("b", "missing/file");
        }),
    );
    let line = err_line(&apply(&f, &w.path().join("d"), &[]));
    assert!(
        line.contains("entry \"b\" at offset 1024") && line.contains("missing/file"),
        "{line}"
    );
}

#[test]
fn whiteouts_become_overlay_whiteouts() {
    let (_w, d) = run(&tar(|t| {
        t.dir("etc")
            .entry(
                H {
                    name: b"etc/.wh.issue",
                    uid: 3,
                    gid: 4,
                    ..H::default()
                },
                b"",
            )
            .file("opq-first/.wh..wh..opq", b"")
            .file("opq-first/new", b"n")
            .dir("opq-last")
            .file("opq-last/new", b"n")
            .file("opq-last/.wh..wh..opq", b"")
            .file(".wh..wh..opq", b"")
            .file(".wh.gone-dir", b"")
            .file("x/.wh..wh.plnk", b"")
            .file("opq-hdr/.wh..wh..opq", b"")
            .entry(
                H {
                    name: b"opq-hdr/",
                    typ: b'5',
                    mode: 0o711,
                    mtime: 77,
                    ..H::default()
                },
                b"",
            );
    }));
    let md = fs::metadata(d.join("opq-hdr")).unwrap();
    assert_eq!((md.mode() & 0o7777, md.mtime()), (0o711, 77));
    let md = fs::symlink_metadata(d.join("etc/issue")).unwrap();
    assert!(md.file_type().is_char_device());
    assert_eq!(
        (md.rdev(), md.mode() & 0o7777, md.uid(), md.gid()),
        (0, 0, 3, 4)
    );
    assert!(fs::symlink_metadata(d.join("gone-dir"))
        .unwrap()
        .file_type()
        .is_char_device());
    for p in ["opq-first", "opq-last", "", "opq-hdr"] {
        let x = xattrs(&d.join(p));
        assert_eq!(
            x.get("trusted.overlay.opaque").map(Vec::as_slice),
            Some(&b"y"[..]),
            "{p:?}"
        );
        assert!(!d.join(p).join(".wh..wh..opq").exists());
    }
    assert_eq!(fs::read(d.join("opq-first/new")).unwrap(), b"n");
    assert_eq!(fs::read(d.join("opq-last/new")).unwrap(), b"n");
    assert!(!d.join("x/.wh..wh.plnk").exists());
    assert!(!d.join("etc/.wh.issue").exists());
}

#[test]
fn overlay_mount_hides_what_the_layer_whites_out() {
    let w = tmp();
    let lower = w.path().join("lower");
    for p in ["etc/issue", "etc/keep", "opq/old", "gone/deep/file"] {
        fs::create_dir_all(lower.join(p).parent().unwrap()).unwrap();
        fs::write(lower.join(p), p).unwrap();
    }
    let f = write(
        w.path(),
        "l.tar",
        &tar(|t| {
            t.dir("etc")
                .file("etc/.wh.issue", b"")
                .dir("opq")
                .file("opq/.wh..wh..opq", b"")
                .file("opq/new", b"new")
                .file(".wh.gone", b"");
        }),
    );
    let upper = w.path().join("upper");
    ok_diff_id(&apply(&f, &upper, &[]));
    let work = w.path().join("work");
    let merged = w.path().join("merged");
    fs::create_dir_all(&work).unwrap();
    fs::create_dir_all(&merged).unwrap();
    sh(std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        ))
        .arg(&merged));
    let listing = |p: &str| {
        let mut v: Vec<String> = fs::read_dir(merged.join(p))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into())
            .collect();
        v.sort();
        v
    };
    let root = listing("");
    let etc = listing("etc");
    let opq = listing("opq");
    sh(std::process::Command::new("umount").arg(&merged));
    assert_eq!(root, vec!["etc", "opq"]);
    assert_eq!(etc, vec!["keep"]);
    assert_eq!(opq, vec!["new"]);
}

#[test]
fn large_files_stream_piecewise() {
    // Bigger than the streaming chunk (4 MiB): written in pieces.
    let big = noise(9 << 20, 5);
    let mut t = RawTar::default();
    t.file("big", &big).file("after", b"after").end();
    let tarball = t.bytes();
    let w = tmp();
    let gz = write(w.path(), "l.tar.gz", &gzip_members(&tarball, 1));
    for decode in ["streaming", "whole", "auto"] {
        let d = w.path().join(decode);
        assert_eq!(
            ok_diff_id(&apply(&gz, &d, &["--decode", decode])),
            sha256(&tarball)
        );
        assert!(
            fs::read(d.join("big")).unwrap() == big,
            "{decode}: content differs"
        );
        assert_eq!(fs::read(d.join("after")).unwrap(), b"after");
    }
}

#[test]
fn stdin_from_a_file_and_from_a_pipe() {
    let mut t = RawTar::default();
    t.dir("etc").file("etc/hostname", b"unlade\n").end();
    let tarball = t.bytes();
    let w = tmp();
    let f = write(w.path(), "l.tar.zst", &zstd_frames(&tarball, 3));
    let out = std::process::Command::new(bin())
        .args(["apply", "-"])
        .arg(w.path().join("d"))
        .stdin(fs::File::open(&f).unwrap())
        .output()
        .unwrap();
    assert_eq!(ok_diff_id(&out), sha256(&tarball));
    assert_eq!(
        fs::read(w.path().join("d/etc/hostname")).unwrap(),
        b"unlade\n"
    );
    let out = apply_stdin(&gzip_members(&tarball, 2), &w.path().join("e"), &[]);
    assert_eq!(ok_diff_id(&out), sha256(&tarball));
}

#[test]
fn decode_choice_reaches_the_path_it_names() {
    let mut t = RawTar::default();
    t.file("f", b"data").end();
    let w = tmp();
    let gz = write(w.path(), "l.tar.gz", &gzip_members(&t.bytes(), 1));
    let plain = write(w.path(), "l.tar", &t.bytes());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let auto = if cpus >= 2 {
        "streaming"
    } else {
        "whole-buffer"
    };
    for (layer, flag, want) in [
        (&gz, "auto", format!("(Gzip, {auto})")),
        (&gz, "whole", "(Gzip, whole-buffer)".to_string()),
        (&gz, "streaming", "(Gzip, streaming)".to_string()),
        (&plain, "auto", "(Plain, whole-buffer)".to_string()),
        (&plain, "whole", "(Plain, whole-buffer)".to_string()),
        (&plain, "streaming", "(Plain, streaming)".to_string()),
    ] {
        let dest = w
            .path()
            .join(format!("{flag}-{}", layer.display()).replace('/', "_"));
        let out = apply(layer, &dest, &["--decode", flag]);
        ok_diff_id(&out);
        let first = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        assert!(
            first.contains(&want),
            "--decode {flag} on {}: {first}",
            layer.display()
        );
    }
}
