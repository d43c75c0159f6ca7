//! Corrupt, truncated and oversized input: exit code 1, one stderr line
//! naming the layer, the entry where there is one, the byte offset and the
//! problem; memory bounded on decompression bombs.

use std::fs;
use std::process::Command;

use sha2::{Digest as _, Sha256};
use unlade_tests::*;

/// `sha256:<hex>` of a finished hash.
fn hex(d: &[u8]) -> String {
    let mut s = String::from("sha256:");
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn layer() -> Vec<u8> {
    let mut t = RawTar::default();
    t.dir("d")
        .file("d/a", &noise(3000, 1))
        .file("d/b", &noise(70_000, 2))
        .end();
    t.bytes()
}

fn fails_with(data: &[u8], extra: &[&str], needles: &[&str]) -> String {
    let w = tmp();
    let f = write(w.path(), "bad.layer", data);
    let line = err_line(&apply(&f, &w.path().join("d"), extra));
    assert!(
        line.contains("layer ") && line.contains("bad.layer"),
        "{line}"
    );
    for n in needles {
        assert!(line.contains(n), "expected {n:?} in {line:?}");
    }
    line
}

#[test]
fn truncated_tar_names_entry_and_offset() {
    let l = layer();
    // Inside d/b's data (header of d/b at 512 * 4).
    fails_with(
        &l[..3000 + 2048 + 100],
        &[],
        &["entry \"d/b\"", "truncated", "bytes of file data expected"],
    );
    // Inside a header block.
    fails_with(
        &l[..512 + 200],
        &[],
        &["at offset 512", "truncated", "header block"],
    );
    // Streaming path too (same bytes through gzip).
    let gz = gzip_members(&l[..3000 + 2048 + 100], 1);
    fails_with(
        &gz,
        &["--decode", "streaming"],
        &["entry \"d/b\"", "truncated"],
    );
}

#[test]
fn bad_header_checksum() {
    let mut l = layer();
    l[512 + 10] ^= 0x55;
    fails_with(&l, &[], &["at offset 512", "checksum mismatch"]);
}

#[test]
fn bad_numbers() {
    type Patch = Box<dyn Fn(&mut [u8; 512])>;
    let cases: Vec<(&str, Patch)> = vec![
        (
            "invalid octal",
            Box::new(|h: &mut [u8; 512]| h[124..136].copy_from_slice(b"0000000009x\0")),
        ),
        (
            "negative size",
            Box::new(|h: &mut [u8; 512]| h[124..136].copy_from_slice(&[0xff; 12])),
        ),
        (
            "overflows",
            Box::new(|h: &mut [u8; 512]| {
                let mut f = [0xffu8; 12];
                f[0] = 0x80;
                h[124..136].copy_from_slice(&f)
            }),
        ),
        (
            "out of range",
            Box::new(|h: &mut [u8; 512]| h[108..116].copy_from_slice(b"7777777\0")),
        ),
    ];
    for (what, f) in cases {
        let mut h = RawTar::header(&H {
            name: b"x",
            size: 1,
            ..H::default()
        });
        if what == "out of range" {
            // uid via PAX beyond u32.
            let mut t = RawTar::default();
            t.pax(b'x', &[("uid", b"99999999999")])
                .file("x", b"1")
                .end();
            fails_with(&t.bytes(), &[], &["out of range"]);
            continue;
        }
        f(&mut h);
        RawTar::fix_checksum(&mut h);
        let mut t = RawTar::default();
        t.block(&h).data(b"1").end();
        fails_with(
            &t.bytes(),
            &[],
            &[
                "entry \"x\"",
                "at offset 0",
                what.split(' ').next_back().unwrap(),
            ],
        );
    }
    // A huge (valid) size runs past the end of the stream.
    let mut h = RawTar::header(&H {
        name: b"huge",
        size: 0o77777777777,
        ..H::default()
    });
    RawTar::fix_checksum(&mut h);
    let mut t = RawTar::default();
    t.block(&h).data(b"abc");
    fails_with(&t.bytes(), &[], &["entry \"huge\"", "truncated"]);
}

#[test]
fn bad_pax_records() {
    for (rec, needle) in [
        (&b"10 path=ab\n"[..], "PAX"),
        (b"x path=a\n", "bad length"),
        (b"99 path=a\n", "out of range"),
        (b"8 patha\n", "no '='"),
    ] {
        let mut t = RawTar::default();
        t.entry(
            H {
                name: b"PaxHeaders/x",
                typ: b'x',
                ..H::default()
            },
            rec,
        )
        .file("f", b"x")
        .end();
        fails_with(&t.bytes(), &[], &["at offset 0", needle]);
    }
    for (k, v, needle) in [
        ("size", &b"1x"[..], "invalid value for size"),
        ("mtime", b"1.\xff", "invalid value for mtime"),
        ("size", b"-100", "negative size"),
        ("GNU.sparse.map", b"1,2,3", "odd number"),
    ] {
        let mut t = RawTar::default();
        t.pax(b'x', &[(k, v), ("GNU.sparse.size", b"10")])
            .file("f", b"x")
            .end();
        fails_with(&t.bytes(), &[], &["entry \"f\" at offset 0", needle]);
    }
    // An oversized PAX header is refused before it is read.
    let mut t = RawTar::default();
    t.block(&RawTar::header(&H {
        name: b"PaxHeaders/x",
        typ: b'x',
        size: 5 << 20,
        ..H::default()
    }))
    .end();
    fails_with(
        &t.bytes(),
        &[],
        &["limit exceeded", "PAX header of 5242880 bytes"],
    );
}

#[test]
fn corrupt_and_truncated_compression() {
    let l = layer();
    let gz = gzip_members(&l, 1);
    for decode in ["auto", "whole", "streaming"] {
        let line = fails_with(
            &gz[..gz.len() / 2],
            &["--decode", decode],
            &["gzip data corrupt"],
        );
        assert!(line.contains("compressed offset"), "{line}");
    }
    let mut flipped = gz.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    flipped[mid + 1] ^= 0xff;
    fails_with(&flipped, &[], &["gzip"]);
    let mut garbage = gz.clone();
    garbage.extend_from_slice(b"not another member");
    fails_with(&garbage, &[], &["gzip"]);
    let zst = zstd_frames(&l, 1);
    fails_with(&zst[..zst.len() / 2], &[], &["zstd"]);
    // The zstd CLI writes frame checksums: flipped data bytes are caught
    // by the decoder, not only by the diff ID.
    let w = tmp();
    let plain = write(w.path(), "l.tar", &l);
    sh(Command::new("zstd").arg("-q").arg("-f").arg(&plain));
    let zst = fs::read(w.path().join("l.tar.zst")).unwrap();
    let mut zflip = zst.clone();
    let zm = zflip.len() / 2;
    zflip[zm] ^= 0xff;
    zflip[zm + 3] ^= 0xff;
    fails_with(&zflip, &[], &["zstd"]);
    fails_with(
        &[0xfd, b'7', b'z', b'X', b'Z', 0, 0, 0],
        &[],
        &["unsupported layer compression: xz"],
    );
}

#[test]
fn diff_id_mismatch_and_bad_argument() {
    let l = layer();
    let wrong = sha256(b"something else");
    let line = fails_with(
        &l,
        &["--diff-id", &wrong],
        &["diff ID mismatch", &wrong, &sha256(&l)],
    );
    assert!(!line.contains("entry"), "{line}");
    let w = tmp();
    let f = write(w.path(), "l.tar", &l);
    assert_eq!(
        ok_diff_id(&apply(
            &f,
            &w.path().join("ok"),
            &["--diff-id", &sha256(&l)]
        )),
        sha256(&l)
    );
    let line = err_line(&apply(
        &f,
        &w.path().join("x"),
        &["--diff-id", "sha256:nothex"],
    ));
    assert!(line.contains("invalid digest"), "{line}");
}

#[test]
fn stdin_streams_and_reports() {
    let l = layer();
    let w = tmp();
    let out = apply_stdin(&gzip_members(&l, 2), &w.path().join("d"), &[]);
    assert_eq!(ok_diff_id(&out), sha256(&l));
    assert_eq!(fs::read(w.path().join("d/d/a")).unwrap(), noise(3000, 1));
    let out = apply_stdin(&l[..4000], &w.path().join("e"), &[]);
    let line = err_line(&out);
    assert!(
        line.contains("layer -:") && line.contains("truncated"),
        "{line}"
    );
}

/// Peak RSS in KiB of `unlade apply` on `layer`, through Python's
/// getrusage(RUSAGE_CHILDREN) of a process whose only child is unlade.
fn peak_rss_kib(layer: &std::path::Path, dest: &std::path::Path, extra: &[&str]) -> (u64, String) {
    let script = "import resource,subprocess,sys\n\
                  r=subprocess.run(sys.argv[1:],capture_output=True)\n\
                  sys.stderr.write(r.stderr.decode())\n\
                  print(r.stdout.decode().strip().splitlines()[-1] if r.returncode==0 else 'failed')\n\
                  print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)";
    let out = sh(Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(bin())
        .arg("apply")
        .arg(layer)
        .arg(dest)
        .args(extra));
    let s = String::from_utf8_lossy(&out.stdout);
    let mut lines = s.lines();
    let id = lines.next().unwrap_or("").to_string();
    (
        lines
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("rss"),
        id,
    )
}

#[test]
fn decompression_bomb_memory_stays_bounded() {
    // 2 GiB of zeros: an empty archive followed by 2 GiB of trailing bytes,
    // all of which must be inflated and hashed.
    let w = tmp();
    let bomb = w.path().join("bomb.gz");
    sh(Command::new("sh").arg("-c").arg(format!(
        "head -c 2G /dev/zero | gzip -1 > {}",
        bomb.display()
    )));
    assert!(fs::metadata(&bomb).unwrap().len() < 10 << 20);
    let (rss, id) = peak_rss_kib(&bomb, &w.path().join("d"), &[]);
    // The diff IDs expected, hashed here with sha2 (the engine uses ring):
    // 2 GiB of zeros, and the same followed by the liar's "x" below.
    let (want, want_liar) = {
        let mut h = Sha256::new();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..2048 {
            h.update(&zeros);
        }
        let bomb = hex(&h.clone().finalize());
        h.update(b"x");
        (bomb, hex(&h.finalize()))
    };
    assert_eq!(id, want);
    assert!(rss < 100 * 1024, "peak RSS {rss} KiB for a 2 GiB bomb");
    // A lying ISIZE (a tiny last member after the bomb) may tempt the
    // whole-buffer path: it is bounded by the memory cap.
    let liar = w.path().join("liar.gz");
    sh(Command::new("sh").arg("-c").arg(format!(
        "cp {} {} && printf x | gzip >> {}",
        bomb.display(),
        liar.display(),
        liar.display()
    )));
    let (rss, id) = peak_rss_kib(
        &liar,
        &w.path().join("e"),
        &["--memory-cap", "64M", "--decode", "whole"],
    );
    // Every member was inflated and hashed: the diff ID is that of 2 GiB
    // of zeros and the "x", not of what fitted under the cap.
    assert_eq!(id, want_liar);
    assert!(
        rss < (64 + 100) * 1024,
        "peak RSS {rss} KiB with a 64 MiB cap"
    );
}
