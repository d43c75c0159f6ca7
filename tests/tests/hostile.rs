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

    /// Applies `layer`, which must succeed with its own digest as the
    /// diff ID.
    fn ok(&self, layer: &[u8]) {
        assert_eq!(ok_diff_id(&self.apply(layer)), sha256(layer));
    }

    /// Applies `layer`, which must fail on `entry`, whose (first) header
    /// is at `offset`, for a reason that says each of `why`; DEST then
    /// holds exactly `left` (paths below it, sorted: what the entries
    /// before the offending one made). Returns the error line.
    fn fails(&self, layer: &[u8], entry: &str, offset: u64, why: &[&str], left: &[&str]) -> String {
        let line = err_line(&self.apply(layer));
        let prefix = format!(
            "unlade: error: layer {}: entry {entry:?} at offset {offset}: ",
            self.root.join("layer.tar").display()
        );
        assert!(
            line.starts_with(&prefix),
            "expected {prefix:?}…, got {line}"
        );
        for w in why {
            assert!(line[prefix.len()..].contains(w), "expected {w:?} in {line}");
        }
        let in_dest: Vec<String> = snapshot(&self.dest)
            .into_keys()
            .filter(|k| !k.is_empty())
            .collect();
        assert_eq!(in_dest, left, "DEST after: {line}");
        line
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
    w.ok(&tar(|t| {
        t.file(&abs, b"clamped");
    }));
    let inside = w.dest.join(abs.trim_start_matches('/'));
    assert_eq!(fs::read(inside).unwrap(), b"clamped");
}

#[test]
fn symlinked_parents_stay_inside() {
    let w = World::new();
    let outside_abs = w.outside.to_string_lossy().into_owned();
    // Each link resolves inside DEST (RESOLVE_IN_ROOT), where it dangles:
    // the entry under it fails, naming the link. (layer, failing
    // entry and its offset, what DEST holds after)
    let cases: Vec<(Vec<u8>, &str, u64, &[&str])> = vec![
        (
            // absolute
            tar(|t| {
                t.symlink("lnk", &outside_abs).file("lnk/victim", b"pwned");
            }),
            "lnk/victim",
            512,
            &["lnk"],
        ),
        (
            // relative
            tar(|t| {
                t.symlink("lnk", "../outside").file("lnk/victim", b"pwned");
            }),
            "lnk/victim",
            512,
            &["lnk"],
        ),
        (
            // chain
            tar(|t| {
                t.symlink("a", "b")
                    .symlink("b", "c/../../outside")
                    .dir("c")
                    .file("a/victim", b"pwned");
            }),
            "a/victim",
            1536,
            &["a", "b", "c"],
        ),
        (
            // new dir
            tar(|t| {
                t.symlink("lnk", "../outside")
                    .dir("lnk/newdir")
                    .file("lnk/newdir/f", b"x");
            }),
            "lnk/newdir",
            512,
            &["lnk"],
        ),
        (
            // device
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
            "lnk/null",
            512,
            &["lnk"],
        ),
        (
            // symlink
            tar(|t| {
                t.symlink("lnk", "../outside")
                    .symlink("lnk/victim", "/etc/shadow");
            }),
            "lnk/victim",
            512,
            &["lnk"],
        ),
    ];
    for (layer, entry, offset, left) in cases {
        let link = entry.split('/').next().unwrap();
        w.fails(
            &layer,
            entry,
            offset,
            &[&format!("resolve {link:?}: dangling symlink")],
            left,
        );
        let _ = fs::remove_dir_all(&w.dest);
    }
    // Links that climb to DEST itself (".." of DEST is DEST): the file
    // lands inside.
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        (
            "dotdots",
            tar(|t| {
                t.symlink("lnk", "../../../../../../../../..")
                    .file(&format!("lnk{outside_abs}/victim"), b"pwned");
            }),
            format!("{}/victim", outside_abs.trim_start_matches('/')),
        ),
        (
            "nested",
            tar(|t| {
                t.dir("d")
                    .symlink("d/up", "../..")
                    .file("d/up/outside/victim", b"pwned");
            }),
            "outside/victim".to_string(),
        ),
    ];
    for (what, layer, inside) in cases {
        w.ok(&layer);
        assert_eq!(fs::read(w.dest.join(&inside)).unwrap(), b"pwned", "{what}");
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
    let dotdot = [
        "unsafe entry name",
        "\"../outside/victim\" has a '..' component",
    ];
    w.fails(
        &tar(|t| {
            t.hardlink("h", "../outside/victim");
        }),
        "h",
        0,
        &dotdot,
        &[],
    );
    // An absolute target is resolved inside DEST, where there is no such
    // file.
    w.fails(
        &tar(|t| {
            t.hardlink("h", &abs);
        }),
        "h",
        0,
        &[
            &format!("hard link target {abs:?}"),
            "No such file or directory",
        ],
        &[],
    );
    let _ = fs::remove_dir_all(&w.dest);
    // So is a target through a symlink: the link dangles there.
    for link in [
        "../outside".to_string(),
        w.outside.to_string_lossy().into_owned(),
    ] {
        w.fails(
            &tar(|t| {
                t.symlink("lnk", &link).hardlink("h", "lnk/victim");
            }),
            "h",
            512,
            &[
                "hard link target \"lnk/victim\"",
                "resolve \"lnk\": dangling symlink",
            ],
            &["lnk"],
        );
        let _ = fs::remove_dir_all(&w.dest);
    }
}

#[test]
fn hardlink_to_a_symlink_links_the_symlink() {
    let w = World::new();
    let abs = w.victim_abs();
    w.ok(&tar(|t| {
        t.symlink("s", &abs).hardlink("h", "s");
    }));
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
    w.ok(&tar(|t| {
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
    }));
    assert_eq!(fs::read(w.dest.join("s")).unwrap(), b"pwned");
    // Symlink metadata lands on the link itself.
    w.ok(&tar(|t| {
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
    }));
    let md = fs::symlink_metadata(w.dest.join("s2")).unwrap();
    assert_eq!((md.uid(), md.mtime()), (4321, 5));
    assert_eq!(
        xattrs(&w.dest.join("s2"))
            .get("trusted.x")
            .map(Vec::as_slice),
        Some(&b"1"[..])
    );
    // Delayed directory restore after the directory became a symlink.
    w.ok(&tar(|t| {
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
    }));
    // Same with a relative link and the opaque marker after (the link
    // dangles inside DEST: an error, and nothing outside is touched).
    // (DEST holds s, s2 and d from the applies above, and the link e.)
    w.fails(
        &tar(|t| {
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
        }),
        "e/.wh..wh..opq",
        1024,
        &["resolve \"e\": dangling symlink"],
        &["d", "e", "s", "s2"],
    );
    assert_eq!(
        fs::read_link(w.dest.join("e")).unwrap().to_string_lossy(),
        "../../outside/dir"
    );
}

#[test]
fn whiteouts_through_symlinked_parents_stay_inside() {
    let w = World::new();
    let outside_abs = w.outside.to_string_lossy().into_owned();
    // The link resolves inside DEST, where it dangles.
    for (layer, entry) in [
        (
            tar(|t| {
                t.symlink("lnk", "../outside").file("lnk/.wh.victim", b"");
            }),
            "lnk/.wh.victim",
        ),
        (
            tar(|t| {
                t.symlink("lnk", &outside_abs).file("lnk/.wh.victim", b"");
            }),
            "lnk/.wh.victim",
        ),
        (
            tar(|t| {
                t.symlink("lnk", "../outside")
                    .file("lnk/dir/.wh..wh..opq", b"");
            }),
            "lnk/dir/.wh..wh..opq",
        ),
    ] {
        w.fails(
            &layer,
            entry,
            512,
            &["resolve \"lnk\": dangling symlink"],
            &["lnk"],
        );
        let _ = fs::remove_dir_all(&w.dest);
    }
    // A whiteout name that climbs out is an error.
    w.fails(
        &tar(|t| {
            t.file("../.wh.outside", b"");
        }),
        "../.wh.outside",
        0,
        &["unsafe entry name", "has a '..' component"],
        &[],
    );
}

#[test]
fn special_names() {
    let w = World::new();
    // "." as a directory sets the root's metadata; as anything else it is
    // refused (a "/." symlink once sent later layers to the host).
    w.ok(&tar(|t| {
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
    }));
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
    let why = [
        "unsafe entry name",
        "\"../outside/victim\" has a '..' component",
    ];
    // The extended name is the entry's name: the error names it, and
    // nothing is made under the header's own name.
    for layer in [
        tar(|t| {
            t.pax(b'x', &[("path", b"../outside/victim")])
                .file("innocent", b"pwned");
        }),
        tar(|t| {
            t.gnu_long(b'L', b"../outside/victim")
                .file("innocent", b"pwned");
        }),
    ] {
        w.fails(&layer, "../outside/victim", 0, &why, &[]);
    }
    // A PAX linkpath is the link's target.
    w.fails(
        &tar(|t| {
            t.pax(b'x', &[("linkpath", b"../outside/victim")])
                .hardlink("h", "innocent");
        }),
        "h",
        0,
        &why,
        &[],
    );
}
