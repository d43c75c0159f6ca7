//! Every layer is hostile: no entry or combination of entries may create,
//! change, remove or reveal anything outside DEST. Each test builds the
//! attack with a raw tar writer, applies it next to an `outside/` directory
//! full of victims, and checks that `outside/` (content, modes, owners,
//! times, xattrs, link counts) and the rest of the world are exactly as
//! before, whether the apply failed or not.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use unlade_tests::*;

struct World {
    _dir: TempDir,
    root: PathBuf,
    dest: PathBuf,
    outside: PathBuf,
}

impl World {
    fn new() -> World {
        let dir = tmp();
        let root = dir.path().to_path_buf();
        let outside = root.join("outside");
        fs::create_dir_all(outside.join("dir")).unwrap();
        fs::write(outside.join("victim"), b"original").unwrap();
        fs::write(outside.join("dir/inner"), b"inner").unwrap();
        let dest = root.join("dest");
        World {
            _dir: dir,
            root,
            dest,
            outside,
        }
    }

    /// Absolute path of the victim file, as a layer would name it.
    fn victim_abs(&self) -> String {
        self.outside.join("victim").to_string_lossy().into_owned()
    }

    /// Applies `layer` (plain tar) and checks the world outside DEST.
    fn apply(&self, layer: &[u8]) -> Output {
        let before = snapshot(&self.outside);
        let names_before = list(&self.root);
        let f = write(&self.root, "layer.tar", layer);
        let out = apply(&f, &self.dest, &[]);
        fs::remove_file(&f).unwrap();
        // Exit 0, or exit 1 with one clear line: never a crash.
        if !out.status.success() {
            let line = err_line(&out);
            assert!(line.starts_with("unlade: error: layer "), "{line}");
        }
        assert_same(&before, &snapshot(&self.outside), "outside DEST");
        assert_eq!(names_before, list(&self.root), "entries next to DEST");
        assert_eq!(
            fs::metadata(self.outside.join("victim")).unwrap().nlink(),
            1,
            "victim gained a hard link"
        );
        out
    }
}

fn list(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "dest" && n != "layer.tar")
        .collect();
    v.sort();
    v
}

fn tar(f: impl FnOnce(&mut RawTar)) -> Vec<u8> {
    let mut t = RawTar::default();
    f(&mut t);
    t.end();
    t.bytes()
}

#[test]
fn dotdot_names_are_refused() {
    let w = World::new();
    for name in [
        "../outside/victim",
        "a/../../outside/victim",
        "..",
        "./../outside/victim",
    ] {
        let out = w.apply(&tar(|t| {
            t.file(name, b"pwned");
        }));
        let line = err_line(&out);
        assert!(line.contains("'..'"), "{name}: {line}");
        assert!(line.contains("at offset 0"), "{name}: {line}");
    }
}

#[test]
fn absolute_names_are_clamped_into_dest() {
    let w = World::new();
    let abs = w.victim_abs();
    ok_diff_id(&w.apply(&tar(|t| {
        t.file(&abs, b"clamped");
    })));
    let inside = w.dest.join(abs.trim_start_matches('/'));
    assert_eq!(fs::read(inside).unwrap(), b"clamped");
}

#[test]
fn symlinked_parents_stay_inside() {
    let w = World::new();
    let outside_abs = w.outside.to_string_lossy().into_owned();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "absolute",
            tar(|t| {
                t.symlink("lnk", &outside_abs).file("lnk/victim", b"pwned");
            }),
        ),
        (
            "relative",
            tar(|t| {
                t.symlink("lnk", "../outside").file("lnk/victim", b"pwned");
            }),
        ),
        (
            "dotdots",
            tar(|t| {
                t.symlink("lnk", "../../../../../../../../..")
                    .file(&format!("lnk{outside_abs}/victim"), b"pwned");
            }),
        ),
        (
            "chain",
            tar(|t| {
                t.symlink("a", "b")
                    .symlink("b", "c/../../outside")
                    .dir("c")
                    .file("a/victim", b"pwned");
            }),
        ),
        (
            "nested",
            tar(|t| {
                t.dir("d")
                    .symlink("d/up", "../..")
                    .file("d/up/outside/victim", b"pwned");
            }),
        ),
        (
            "new dir",
            tar(|t| {
                t.symlink("lnk", "../outside")
                    .dir("lnk/newdir")
                    .file("lnk/newdir/f", b"x");
            }),
        ),
        (
            "device",
            tar(|t| {
                t.symlink("lnk", "../outside").entry(
                    H {
                        name: b"lnk/null",
                        typ: b'3',
                        dev: (1, 3),
                        ..H::default()
                    },
                    b"",
                );
            }),
        ),
        (
            "symlink",
            tar(|t| {
                t.symlink("lnk", "../outside")
                    .symlink("lnk/victim", "/etc/shadow");
            }),
        ),
    ];
    for (what, layer) in cases {
        let out = w.apply(&layer);
        if what == "dotdots" {
            // The link resolves to DEST itself: the file lands inside.
            ok_diff_id(&out);
            let inside = w
                .dest
                .join(outside_abs.trim_start_matches('/'))
                .join("victim");
            assert_eq!(fs::read(inside).unwrap(), b"pwned");
        }
        let _ = fs::remove_dir_all(&w.dest);
    }
}

#[test]
fn symlink_loops_fail_cleanly() {
    let w = World::new();
    let out = w.apply(&tar(|t| {
        t.symlink("a", "b").symlink("b", "a").file("a/x", b"x");
    }));
    let line = err_line(&out);
    assert!(line.contains("entry \"a/x\""), "{line}");
}

#[test]
fn hardlinks_cannot_reach_outside() {
    let w = World::new();
    let abs = w.victim_abs();
    let cases: Vec<Vec<u8>> = vec![
        tar(|t| {
            t.hardlink("h", "../outside/victim");
        }),
        tar(|t| {
            t.hardlink("h", &abs);
        }),
        tar(|t| {
            t.symlink("lnk", "../outside").hardlink("h", "lnk/victim");
        }),
        tar(|t| {
            t.symlink("lnk", &w.outside.to_string_lossy())
                .hardlink("h", "lnk/victim");
        }),
    ];
    for layer in cases {
        let out = w.apply(&layer);
        err_line(&out);
        let _ = fs::remove_dir_all(&w.dest);
    }
}

#[test]
fn hardlink_to_a_symlink_links_the_symlink() {
    let w = World::new();
    let abs = w.victim_abs();
    ok_diff_id(&w.apply(&tar(|t| {
        t.symlink("s", &abs).hardlink("h", "s");
    })));
    let md = fs::symlink_metadata(w.dest.join("h")).unwrap();
    assert!(md.file_type().is_symlink());
    assert_eq!(md.nlink(), 2);
    assert_eq!(
        fs::read_link(w.dest.join("h")).unwrap().to_string_lossy(),
        abs
    );
}

#[test]
fn metadata_never_goes_through_a_symlink() {
    let w = World::new();
    let abs = w.victim_abs();
    let outside_dir = w.outside.join("dir").to_string_lossy().into_owned();
    // A later header for the same name replaces the link, it does not write
    // (or chmod, chown, touch, setxattr) through it.
    ok_diff_id(&w.apply(&tar(|t| {
        t.symlink("s", &abs)
            .pax(b'x', &[("SCHILY.xattr.trusted.x", b"1")])
            .entry(
                H {
                    name: b"s",
                    mode: 0o4777,
                    uid: 1234,
                    gid: 1234,
                    mtime: 1,
                    ..H::default()
                },
                b"pwned",
            );
    })));
    assert_eq!(fs::read(w.dest.join("s")).unwrap(), b"pwned");
    // Symlink metadata lands on the link itself.
    ok_diff_id(&w.apply(&tar(|t| {
        t.pax(b'x', &[("SCHILY.xattr.trusted.x", b"1")]).entry(
            H {
                name: b"s2",
                typ: b'2',
                link: abs.as_bytes(),
                uid: 4321,
                gid: 4321,
                mtime: 5,
                ..H::default()
            },
            b"",
        );
    })));
    let md = fs::symlink_metadata(w.dest.join("s2")).unwrap();
    assert_eq!((md.uid(), md.mtime()), (4321, 5));
    assert_eq!(
        xattrs(&w.dest.join("s2"))
            .get("trusted.x")
            .map(Vec::as_slice),
        Some(&b"1"[..])
    );
    // Delayed directory restore after the directory became a symlink.
    ok_diff_id(&w.apply(&tar(|t| {
        t.entry(
            H {
                name: b"d/",
                typ: b'5',
                mode: 0o777,
                uid: 99,
                mtime: 7,
                ..H::default()
            },
            b"",
        )
        .file("d/.wh..wh..opq", b"")
        .symlink("d", &outside_dir);
    })));
    // Same with a relative link and the opaque marker after (the link
    // dangles inside DEST: an error, and nothing outside is touched).
    err_line(&w.apply(&tar(|t| {
        t.entry(
            H {
                name: b"e/",
                typ: b'5',
                mode: 0o777,
                uid: 99,
                mtime: 7,
                ..H::default()
            },
            b"",
        )
        .symlink("e", "../../outside/dir")
        .file("e/.wh..wh..opq", b"");
    })));
}

#[test]
fn whiteouts_through_symlinked_parents_stay_inside() {
    let w = World::new();
    let outside_abs = w.outside.to_string_lossy().into_owned();
    for layer in [
        tar(|t| {
            t.symlink("lnk", "../outside").file("lnk/.wh.victim", b"");
        }),
        tar(|t| {
            t.symlink("lnk", &outside_abs).file("lnk/.wh.victim", b"");
        }),
        tar(|t| {
            t.symlink("lnk", "../outside")
                .file("lnk/dir/.wh..wh..opq", b"");
        }),
    ] {
        w.apply(&layer);
        let _ = fs::remove_dir_all(&w.dest);
    }
    // A whiteout name that climbs out is an error.
    let out = w.apply(&tar(|t| {
        t.file("../.wh.outside", b"");
    }));
    err_line(&out);
}

#[test]
fn special_names() {
    let w = World::new();
    // "." as a directory sets the root's metadata; as anything else it is
    // refused (a "/." symlink once sent later layers to the host).
    ok_diff_id(&w.apply(&tar(|t| {
        t.entry(
            H {
                name: b"./",
                typ: b'5',
                mode: 0o711,
                mtime: 42,
                ..H::default()
            },
            b"",
        );
    })));
    let md = fs::metadata(&w.dest).unwrap();
    assert_eq!((md.mode() & 0o7777, md.mtime()), (0o711, 42));
    for (name, typ) in [
        (&b"."[..], b'2'),
        (b".", b'0'),
        (b"/", b'2'),
        (b".", b'1'),
        (b"./", b'6'),
    ] {
        let out = w.apply(&tar(|t| {
            t.entry(
                H {
                    name,
                    typ,
                    link: b"/",
                    ..H::default()
                },
                b"",
            );
        }));
        let line = err_line(&out);
        assert!(line.contains("layer root"), "{line}");
    }
    let out = w.apply(&tar(|t| {
        t.file("", b"x");
    }));
    assert!(err_line(&out).contains("empty name"));
    for name in [".wh.", ".wh..", ".wh...", "d/.wh.."] {
        let out = w.apply(&tar(|t| {
            t.file(name, b"");
        }));
        let line = err_line(&out);
        assert!(line.contains("whiteout"), "{name}: {line}");
    }
}

#[test]
fn pax_and_gnu_names_are_checked_too() {
    let w = World::new();
    for layer in [
        tar(|t| {
            t.pax(b'x', &[("path", b"../outside/victim")])
                .file("innocent", b"pwned");
        }),
        tar(|t| {
            t.gnu_long(b'L', b"../outside/victim")
                .file("innocent", b"pwned");
        }),
        tar(|t| {
            t.pax(b'x', &[("linkpath", b"../outside/victim")])
                .hardlink("h", "innocent");
        }),
    ] {
        err_line(&w.apply(&layer));
    }
}
