//! Layers written by independent tar writers (GNU tar in every format,
//! bsdtar, Python tarfile, Go archive/tar) come out of `unlade apply`
//! exactly as GNU tar extracts them as root (numeric owners, modes, all
//! xattrs, delayed directory restore), whatever the compression (plain,
//! multi-member gzip, multi-frame zstd) and decoding path (whole-buffer,
//! streaming from a pipe).

use std::fs;
use std::path::Path;

use unlade_tests::*;

/// Applies `archive` every way and compares each result with GNU tar's.
fn check_archive(archive: &Path, what: &str) {
    let work = tmp();
    let reference = work.path().join("ref");
    gnu_extract(archive, &reference);
    let mut expected = snapshot(&reference);
    // The target root is only touched by a "./" entry; compare it only
    // where the archive has one.
    let has_root = expected.get("").is_some_and(|_| {
        let out = sh(std::process::Command::new("tar").arg("-tf").arg(archive));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l == "./" || l == ".")
    });
    if !has_root {
        expected.remove("");
    }
    let tar = fs::read(archive).expect("read");
    let want_id = sha256(&tar);
    let gz = write(work.path(), "l.tar.gz", &gzip_members(&tar, 3));
    let zst = write(work.path(), "l.tar.zst", &zstd_frames(&tar, 2));
    type Run<'a> = Box<dyn Fn(&Path) -> std::process::Output + 'a>;
    let runs: Vec<(&str, Run)> = vec![
        ("plain file", Box::new(|d: &Path| apply(archive, d, &[]))),
        (
            "gzip whole-buffer",
            Box::new(|d: &Path| apply(&gz, d, &["--decode", "whole"])),
        ),
        (
            "gzip streaming",
            Box::new(|d: &Path| apply(&gz, d, &["--decode", "streaming"])),
        ),
        ("zstd", Box::new(|d: &Path| apply(&zst, d, &[]))),
        (
            "plain stdin pipe",
            Box::new(|d: &Path| apply_stdin(&tar, d, &[])),
        ),
    ];
    for (i, (how, run)) in runs.iter().enumerate() {
        let dest = work.path().join(format!("out{i}"));
        fs::create_dir(&dest).expect("mkdir");
        // Same root metadata as the reference where the archive leaves it.
        let out = run(&dest);
        assert_eq!(ok_diff_id(&out), want_id, "{what} {how}: diff ID");
        let mut actual = snapshot(&dest);
        if !has_root {
            actual.remove("");
        }
        assert_same(&expected, &actual, &format!("{what} via {how}"));
    }
}

fn tree(extended: bool) -> TempDir {
    let t = tmp();
    build_tree(t.path(), extended);
    t
}

#[test]
fn gnu_tar_every_format() {
    let basic = tree(false);
    let ext = tree(true);
    let work = tmp();
    for (fmt, src) in [
        ("v7", basic.path()),
        ("ustar", basic.path()),
        ("oldgnu", ext.path()),
        ("gnu", ext.path()),
        ("posix", ext.path()),
    ] {
        if fmt == "v7" {
            // v7 has no device entries, no long names.
            let t = tmp();
            fs::create_dir(t.path().join("x")).expect("mkdir");
            fs::write(t.path().join("x/f"), b"v7 file").expect("write");
            std::os::unix::fs::symlink("f", t.path().join("x/l")).expect("symlink");
            fs::hard_link(t.path().join("x/f"), t.path().join("x/h")).expect("link");
            let out = work.path().join("v7.tar");
            gnu_tar(t.path(), &out, "v7", &[]);
            check_archive(&out, "GNU tar v7");
            continue;
        }
        let out = work.path().join(format!("{fmt}.tar"));
        gnu_tar(src, &out, fmt, &[]);
        check_archive(&out, &format!("GNU tar {fmt}"));
    }
}

#[test]
fn bsdtar_formats() {
    let basic = tree(false);
    let ext = tree(true);
    let work = tmp();
    for (fmt, src) in [
        ("ustar", basic.path()),
        ("pax", ext.path()),
        ("gnutar", basic.path()),
    ] {
        let out = work.path().join(format!("{fmt}.tar"));
        bsd_tar(src, &out, fmt);
        check_archive(&out, &format!("bsdtar {fmt}"));
    }
}

#[test]
fn python_tarfile_formats() {
    let basic = tree(false);
    let ext = tree(true);
    let work = tmp();
    for (fmt, src) in [
        ("ustar", basic.path()),
        ("gnu", ext.path()),
        ("pax", ext.path()),
    ] {
        let out = work.path().join(format!("{fmt}.tar"));
        py_tar(src, &out, fmt);
        check_archive(&out, &format!("Python tarfile {fmt}"));
    }
}

#[test]
fn go_archive_tar_formats() {
    let basic = tree(false);
    let ext = tree(true);
    let work = tmp();
    // Go's ustar writer refuses non-ASCII names (as the format says).
    fs::remove_dir_all(basic.path().join("utf8")).expect("rm utf8");
    for (fmt, src) in [
        ("ustar", basic.path()),
        ("gnu", ext.path()),
        ("pax", ext.path()),
    ] {
        let out = work.path().join(format!("{fmt}.tar"));
        go_tar(src, &out, fmt);
        check_archive(&out, &format!("Go archive/tar {fmt}"));
    }
}

#[test]
fn gnu_sparse_every_version() {
    let src = tmp();
    // Holes at the start, middle and end; data at odd offsets.
    let p = src.path().join("sparse.img");
    let f = fs::File::create(&p).expect("create");
    use std::os::unix::fs::FileExt;
    f.write_all_at(&noise(5000, 7), 1 << 20).expect("write");
    f.write_all_at(b"tail data", (3 << 20) + 17).expect("write");
    f.set_len(8 << 20).expect("truncate");
    drop(f);
    fs::write(src.path().join("dense"), noise(10_000, 3)).expect("write");
    let work = tmp();
    for (fmt, extra) in [
        ("oldgnu", vec!["--sparse"]),
        ("gnu", vec!["--sparse"]),
        ("posix", vec!["--sparse", "--sparse-version=0.0"]),
        ("posix", vec!["--sparse", "--sparse-version=0.1"]),
        ("posix", vec!["--sparse", "--sparse-version=1.0"]),
    ] {
        let out = work.path().join(format!("{fmt}-{}.tar", extra.len()));
        gnu_tar(src.path(), &out, fmt, &extra);
        check_archive(&out, &format!("GNU tar {fmt} {extra:?}"));
        // And holes stay holes.
        let dest = work.path().join("holes");
        let _ = fs::remove_dir_all(&dest);
        ok_diff_id(&apply(&out, &dest, &[]));
        let md = fs::metadata(dest.join("sparse.img")).expect("stat");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(md.len(), 8 << 20);
        assert!(
            md.blocks() * 512 < 1 << 20,
            "{fmt} {extra:?}: sparse file not sparse ({} blocks)",
            md.blocks()
        );
    }
}

/// An xattr with an empty value (`SCHILY.xattr.user.empty=`, or
/// libarchive's form) is restored with an empty value, as GNU tar, bsdtar
/// and Go's archive/tar read it, whoever wrote the layer.
#[test]
fn empty_xattr_values_every_writer() {
    let src = tmp();
    let f = src.path().join("f");
    fs::write(&f, b"data").expect("write");
    for (k, v) in [("user.empty", &b""[..]), ("user.v", &b"x"[..])] {
        rustix::fs::setxattr(&f, k, v, rustix::fs::XattrFlags::empty()).expect("xattr");
    }
    let work = tmp();
    type Writer<'a> = Box<dyn Fn(&Path) + 'a>;
    let writers: Vec<(&str, Writer)> = vec![
        (
            "GNU tar posix",
            Box::new(|o: &Path| gnu_tar(src.path(), o, "posix", &[])),
        ),
        (
            "bsdtar pax",
            Box::new(|o: &Path| bsd_tar(src.path(), o, "pax")),
        ),
        (
            "Go archive/tar pax",
            Box::new(|o: &Path| go_tar(src.path(), o, "pax")),
        ),
    ];
    for (i, (who, make)) in writers.iter().enumerate() {
        let out = work.path().join(format!("w{i}.tar"));
        make(&out);
        let raw = fs::read(&out).expect("read");
        assert!(
            raw.windows(10).any(|w| w == b"user.empty"),
            "{who} did not write the empty xattr"
        );
        let dest = work.path().join(format!("d{i}"));
        ok_diff_id(&apply(&out, &dest, &[]));
        let got = xattrs(&dest.join("f"));
        assert_eq!(
            got.get("user.empty").map(Vec::as_slice),
            Some(&b""[..]),
            "{who}: {got:?}"
        );
        assert_eq!(
            got.get("user.v").map(Vec::as_slice),
            Some(&b"x"[..]),
            "{who}"
        );
    }
    // Raw PAX records of both encodings, and an empty value overriding a
    // global one.
    let mut t = RawTar::default();
    t.pax(b'g', &[("SCHILY.xattr.user.g", b"global")]);
    t.pax(
        b'x',
        &[
            ("SCHILY.xattr.user.s", b""),
            ("LIBARCHIVE.xattr.user.l", b""),
            ("SCHILY.xattr.user.g", b""),
        ],
    );
    t.file("raw", b"r");
    t.end();
    let layer = write(work.path(), "raw.tar", &t.bytes());
    let dest = work.path().join("raw");
    ok_diff_id(&apply(&layer, &dest, &[]));
    let got = xattrs(&dest.join("raw"));
    for k in ["user.s", "user.l", "user.g"] {
        assert_eq!(
            got.get(k).map(Vec::as_slice),
            Some(&b""[..]),
            "{k}: {got:?}"
        );
    }
}
