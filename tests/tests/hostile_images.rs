//! Hostile images, round two: what a layer, a layout or a manifest can do
//! without writing outside the target — change what the mounted image
//! shows (overlay control xattrs, links to whiteouts), or exhaust memory,
//! fds and threads, or hang the reader (FIFOs, `/dev/zero`, deep paths,
//! thousands of layers). Each test builds the attack and checks the
//! outcome: refused with one clear line, or applied without the effect.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use unlade_tests::*;

fn tar(f: impl FnOnce(&mut RawTar)) -> Vec<u8> {
    let mut t = RawTar::default();
    f(&mut t);
    t.end();
    t.bytes()
}

fn layer(tar: Vec<u8>) -> TestLayer {
    TestLayer {
        tar,
        media_type: MT_TAR,
    }
}

/// One stderr line starting with "unlade: error:" and exit 1: no panic,
/// no abort, no multi-line dump.
fn clear_error(out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(1),
        "want exit 1, got {:?}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = err_line(out);
    assert!(line.starts_with("unlade: error: "), "{line}");
    line
}

/// `unlade unpack` under `timeout`, so that a reader blocking forever
/// fails the test instead of hanging it.
fn unpack_bounded(layout_ref: &Path, root: &Path, extra: &[&str]) -> Output {
    Command::new("timeout")
        .arg("60")
        .arg(bin())
        .arg("unpack")
        .arg(layout_ref)
        .arg("--root")
        .arg(root)
        .args(extra)
        .output()
        .expect("run unlade unpack")
}

const OVERLAY_XATTRS: [&str; 8] = [
    "trusted.overlay.redirect",
    "trusted.overlay.metacopy",
    "trusted.overlay.origin",
    "trusted.overlay.opaque",
    "trusted.overlay.upper",
    "trusted.overlay.impure",
    "trusted.overlay.nlink",
    "user.overlay.redirect",
];

/// Every overlay control xattr a layer carries is dropped with a warning
/// naming the entry and the xattr (SCHILY and LIBARCHIVE encodings, on
/// directories and files); other xattrs stay; the applier's own opaque
/// marker is still written.
#[test]
fn overlay_control_xattrs_are_dropped_with_a_warning() {
    let w = tmp();
    let mut recs: Vec<(String, Vec<u8>)> = OVERLAY_XATTRS
        .iter()
        .map(|k| (format!("SCHILY.xattr.{k}"), b"/secret".to_vec()))
        .collect();
    recs.push(("SCHILY.xattr.user.keep".into(), b"1".to_vec()));
    let recs: Vec<(&str, &[u8])> = recs.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
    let t = tar(|t| {
        t.pax(b'x', &recs).dir("pub/");
        // libarchive's encoding: %-escaped name, base64 value ("/secret").
        t.pax(
            b'x',
            &[("LIBARCHIVE.xattr.trusted.overlay.metacopy", b"L3NlY3JldA")],
        )
        .file("pub/f", b"data");
        t.dir("opq/").file("opq/.wh..wh..opq", b"");
    });
    let f = write(w.path(), "l.tar", &t);
    let dest = w.path().join("dest");
    let out = apply(&f, &dest, &[]);
    ok_diff_id(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for k in OVERLAY_XATTRS {
        assert!(
            stderr.contains("entry \"pub/\"") && stderr.contains(&format!(": dropped xattr {k} (")),
            "no warning for {k}: {stderr}"
        );
    }
    assert!(
        stderr.contains("entry \"pub/f\"") && stderr.contains("trusted.overlay.metacopy"),
        "{stderr}"
    );
    let pubx = xattrs(&dest.join("pub"));
    assert_eq!(
        pubx.keys().collect::<Vec<_>>(),
        vec!["user.keep"],
        "overlay xattrs written: {pubx:?}"
    );
    assert!(xattrs(&dest.join("pub/f")).is_empty());
    assert_eq!(
        xattrs(&dest.join("opq")).get("trusted.overlay.opaque"),
        Some(&b"y".to_vec())
    );
}

/// The attack the xattrs were for: a `redirect` on a directory of layer 2
/// showing a private directory of layer 1 under a public name.
#[test]
fn a_redirect_xattr_does_not_reveal_a_lower_directory() {
    let w = tmp();
    let l1 = layer(tar(|t| {
        t.entry(
            H {
                name: b"secret/",
                typ: b'5',
                mode: 0o700,
                ..H::default()
            },
            b"",
        );
        t.entry(
            H {
                name: b"secret/key",
                mode: 0o600,
                ..H::default()
            },
            b"top secret",
        );
    }));
    let l2 = layer(tar(|t| {
        t.pax(
            b'x',
            &[
                ("SCHILY.xattr.trusted.overlay.redirect", b"/secret"),
                ("SCHILY.xattr.trusted.overlay.origin", b"\0\xfb\x21"),
            ],
        )
        .dir("pub/");
        t.file("pub/readme", b"public");
    }));
    let layout = w.path().join("layout");
    let chains = image_layout(&layout, &[("x", &[&l1, &l2])]);
    let root = w.path().join("root");
    let out = unpack(&format!("{}:x", layout.display()), &root, &[]);
    let top = last_line(&out);
    assert_eq!(top, chains[0][1]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unlade: warning: layer sha256:")
            && stderr.contains("dropped xattr trusted.overlay.redirect"),
        "{stderr}"
    );
    let merged = mounted_tree(&root, &top, w.path());
    let names: Vec<&String> = merged.keys().filter(|k| k.starts_with("pub")).collect();
    assert_eq!(names, vec!["pub", "pub/readme"], "{merged:?}");
    assert!(merged.contains_key("secret/key"));
}

/// Mounts `chain` read-only at `target` with the line `unlade mounts`
/// prints, runs `f` on it, unmounts.
fn with_mount<T>(root: &Path, chain: &str, target: &Path, f: impl FnOnce(&Path) -> T) -> T {
    fs::create_dir_all(target).unwrap();
    let out = Command::new(bin())
        .arg("mounts")
        .arg(target)
        .arg(chain)
        .arg("--root")
        .arg(root)
        .output()
        .unwrap();
    sh(Command::new("sh").arg("-c").arg(last_line(&out)));
    let r = f(target);
    sh(Command::new("umount").arg(target));
    r
}

/// Layer 1 plants `lib -> usr/lib`; layer 2 writes `lib/new.so` and
/// whites out `lib/old.so`. As containerd's overlayfs snapshotter gives
/// it (checked side by side with containerd 1.6.20): `lib` becomes a
/// directory of layer 2 holding `new.so` (the whiteout below it hides a
/// name no lower directory has: readdir may list it, stat says ENOENT),
/// and `usr/lib/old.so` stays — layer 2's entries never follow a symlink
/// of a lower layer. With parallel apply on, the two layers are applied
/// at the same time.
#[test]
fn writes_below_a_lower_layer_symlink_stay_in_a_directory_of_their_own() {
    let w = tmp();
    let l1 = layer(tar(|t| {
        t.dir("usr/").dir("usr/lib/").file("usr/lib/old.so", b"old");
        t.symlink("lib", "usr/lib");
    }));
    let l2 = layer(tar(|t| {
        t.file("lib/new.so", b"new").file("lib/.wh.old.so", b"");
    }));
    let layout = w.path().join("layout");
    let chains = image_layout(&layout, &[("x", &[&l1, &l2])]);
    let root = w.path().join("root");
    let top = last_line(&unpack(
        &format!("{}:x", layout.display()),
        &root,
        &["--parallel", "2"],
    ));
    assert_eq!(top, chains[0][1]);
    with_mount(&root, &top, &w.path().join("mnt"), |m| {
        let lib = fs::symlink_metadata(m.join("lib")).unwrap();
        assert!(lib.is_dir(), "lib is {:?}", lib.file_type());
        assert_eq!(fs::read(m.join("lib/new.so")).unwrap(), b"new");
        assert_eq!(
            fs::symlink_metadata(m.join("lib/old.so"))
                .map_err(|e| e.kind())
                .err(),
            Some(std::io::ErrorKind::NotFound)
        );
        assert_eq!(fs::read(m.join("usr/lib/old.so")).unwrap(), b"old");
        let in_usr_lib: Vec<_> = fs::read_dir(m.join("usr/lib"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(in_usr_lib, vec![std::ffi::OsString::from("old.so")]);
    });
}

/// `.wh.gone` then `h` → `gone`: the target does not exist (this layer
/// deleted it), so the link is an error naming the entry — alone and over
/// a lower layer that has `gone`; never a second whiteout.
#[test]
fn a_hard_link_to_a_name_whited_out_in_the_same_layer_is_an_error() {
    let w = tmp();
    let t = tar(|t| {
        t.file(".wh.gone", b"").hardlink("h", "gone");
    });
    let f = write(w.path(), "l.tar", &t);
    let dest = w.path().join("dest");
    let line = clear_error(&apply(&f, &dest, &[]));
    assert!(
        line.contains("entry \"h\"") && line.contains("whiteout"),
        "{line}"
    );

    let l1 = layer(tar(|t| {
        t.file("gone", b"was here");
    }));
    let l2 = layer(t);
    let layout = w.path().join("layout");
    let chains = image_layout(&layout, &[("x", &[&l1, &l2])]);
    let root = w.path().join("root");
    let out = unpack(&format!("{}:x", layout.display()), &root, &[]);
    let line = clear_error(&out);
    assert!(
        line.contains("entry \"h\"") && line.contains("whiteout"),
        "{line}"
    );
    let committed = root.join("snapshots/committed");
    assert!(!committed.join(&chains[0][1][7..]).exists());
}

/// A path of 10,000 levels in one PAX record is refused by its length
/// (PATH_MAX), at once; one just under the limit (2,000 levels) applies
/// with a few hundred fds, not one per level.
#[test]
fn deep_paths_are_bounded() {
    let w = tmp();
    let deep = "a/".repeat(10_000) + "f";
    let t = tar(|t| {
        t.pax(b'x', &[("path", deep.as_bytes())]).file("x", b"deep");
    });
    let f = write(w.path(), "deep.tar", &t);
    let line = clear_error(&apply(&f, &w.path().join("d1"), &[]));
    assert!(line.contains("path longer than 4095 bytes"), "{line}");

    let levels = 2_000;
    let ok = "a/".repeat(levels - 1) + "f";
    assert!(ok.len() < 4096);
    let t = tar(|t| {
        t.pax(b'x', &[("path", ok.as_bytes())]).file("x", b"deep");
    });
    let f = write(w.path(), "ok.tar", &t);
    let dest = w.path().join("d2");
    let out = Command::new("prlimit")
        .arg("--nofile=400:400")
        .arg(bin())
        .arg("apply")
        .arg(&f)
        .arg(&dest)
        .output()
        .expect("run prlimit unlade apply");
    ok_diff_id(&out);
    // Walk down fd by fd: the path is too long for one syscall.
    let mut fd = rustix::fs::open(
        &dest,
        rustix::fs::OFlags::DIRECTORY,
        rustix::fs::Mode::empty(),
    )
    .expect("open dest");
    for _ in 0..levels - 1 {
        fd = rustix::fs::openat(
            &fd,
            "a",
            rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::NOFOLLOW,
            rustix::fs::Mode::empty(),
        )
        .expect("open level");
    }
    let st = rustix::fs::statat(&fd, "f", rustix::fs::AtFlags::empty()).expect("stat f");
    assert_eq!(st.st_size, 4);
}

/// A valid one-layer layout to spoil, and the digests of its manifest and
/// layer blob.
fn small_layout(dir: &Path) -> (PathBuf, String, String) {
    let l = layer(tar(|t| {
        t.file("hello", b"hello");
    }));
    let layout = dir.join("layout");
    image_layout(&layout, &[("x", &[&l])]);
    let idx: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest = idx["manifests"][0]["digest"].as_str().unwrap().to_string();
    let m: serde_json::Value = serde_json::from_slice(
        &fs::read(layout.join("blobs/sha256").join(&manifest[7..])).unwrap(),
    )
    .unwrap();
    let blob = m["layers"][0]["digest"].as_str().unwrap().to_string();
    (layout, manifest, blob)
}

fn blob_path(layout: &Path, d: &str) -> PathBuf {
    layout.join("blobs/sha256").join(&d[7..])
}

fn replace_with_fifo(p: &Path) {
    fs::remove_file(p).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
}

fn replace_with_symlink(p: &Path, target: &str) {
    fs::remove_file(p).unwrap();
    std::os::unix::fs::symlink(target, p).unwrap();
}

/// Files of a layout that are FIFOs, devices, symlinks out of the layout
/// or huge are refused with one line naming them, at once: nothing
/// blocks, nothing unbounded is read, nothing outside is opened.
#[test]
fn layout_files_are_opened_beneath_the_layout_bounded_and_regular() {
    let w = tmp();
    type Spoil = fn(&Path, &str, &str);
    let cases: Vec<(&str, Spoil, &str)> = vec![
        (
            "oci-layout -> /dev/zero",
            |l, _, _| replace_with_symlink(&l.join("oci-layout"), "/dev/zero"),
            "oci-layout",
        ),
        (
            "index.json -> /dev/zero",
            |l, _, _| replace_with_symlink(&l.join("index.json"), "/dev/zero"),
            "index.json",
        ),
        (
            "index.json of 8 GiB (sparse)",
            |l, _, _| {
                let f = fs::OpenOptions::new()
                    .append(true)
                    .open(l.join("index.json"))
                    .unwrap();
                f.set_len(8 << 30).unwrap();
            },
            "larger than 4194304 bytes",
        ),
        (
            "index.json is a FIFO",
            |l, _, _| replace_with_fifo(&l.join("index.json")),
            "not a regular file",
        ),
        (
            "manifest blob is a FIFO",
            |l, m, _| replace_with_fifo(&blob_path(l, m)),
            "not a regular file",
        ),
        (
            "layer blob is a FIFO",
            |l, _, b| replace_with_fifo(&blob_path(l, b)),
            "not a regular file",
        ),
        (
            "layer blob -> /etc/shadow",
            |l, _, b| replace_with_symlink(&blob_path(l, b), "/etc/shadow"),
            "outside the layout",
        ),
        (
            "layer blob -> ../../../../etc/passwd",
            |l, _, b| {
                let up = "../".repeat(l.components().count() + 3);
                replace_with_symlink(&blob_path(l, b), &format!("{up}etc/passwd"))
            },
            "outside the layout",
        ),
    ];
    let shadow_size = fs::metadata("/etc/shadow").map(|m| m.len()).ok();
    for (i, (what, spoil, want)) in cases.iter().enumerate() {
        let dir = w.path().join(format!("case{i}"));
        let (layout, manifest, blob) = small_layout(&dir);
        spoil(&layout, &manifest, &blob);
        let root = dir.join("root");
        bin(); // built before the clock starts
        let started = std::time::Instant::now();
        let out = unpack_bounded(&layout, &root, &[]);
        let line = clear_error(&out);
        assert!(line.contains(want), "{what}: {line}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{what}: took {:?}",
            started.elapsed()
        );
        if let Some(n) = shadow_size {
            assert!(
                !line.contains(&format!(" {n} bytes")),
                "{what}: the error tells /etc/shadow's size: {line}"
            );
        }
        // Nothing committed.
        let committed = root.join("snapshots/committed");
        let n = fs::read_dir(&committed).map_or(0, |d| d.count());
        assert_eq!(n, 0, "{what}: committed something");
    }

    // A symlink that stays inside the layout is fine (some tools
    // deduplicate blobs that way).
    let dir = w.path().join("inside");
    let (layout, manifest, blob) = small_layout(&dir);
    let p = blob_path(&layout, &blob);
    fs::rename(&p, layout.join("moved")).unwrap();
    std::os::unix::fs::symlink("../../moved", &p).unwrap();
    let out = unpack_bounded(&layout, &dir.join("root"), &[]);
    // One layer: its chain ID is its diff ID, which the config names.
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(blob_path(&layout, &manifest)).unwrap()).unwrap();
    let config = m["config"]["digest"].as_str().unwrap();
    let c: serde_json::Value =
        serde_json::from_slice(&fs::read(blob_path(&layout, config)).unwrap()).unwrap();
    let diff_id = c["rootfs"]["diff_ids"][0].as_str().unwrap();
    assert_eq!(last_line(&out), chain_ids_of(&[diff_id.to_string()])[0]);
    let hello = dir
        .join("root/snapshots/committed")
        .join(&diff_id[7..])
        .join("fs/hello");
    assert_eq!(fs::read(hello).unwrap(), b"hello");
}

/// A layer blob whose size is not the manifest's is refused by its size,
/// before it is read.
#[test]
fn a_layer_blob_of_the_wrong_size_is_refused_before_reading() {
    let w = tmp();
    let (layout, _, blob) = small_layout(w.path());
    let f = fs::OpenOptions::new()
        .append(true)
        .open(blob_path(&layout, &blob))
        .unwrap();
    f.set_len(64 << 30).unwrap();
    bin(); // built before the clock starts
    let started = std::time::Instant::now();
    let line = clear_error(&unpack_bounded(&layout, &w.path().join("root"), &[]));
    assert!(
        line.contains(&blob) && line.contains("but the manifest says"),
        "{line}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}

/// An image of `n` one-file layers (every tenth whites out the file of the
/// layer before it).
fn many_layers(dir: &Path, n: usize) -> (PathBuf, Vec<String>) {
    let layers: Vec<TestLayer> = (0..n)
        .map(|i| {
            layer(tar(|t| {
                t.file(&format!("f{i}"), format!("layer {i}").as_bytes());
                if i % 10 == 9 {
                    t.file(&format!(".wh.f{}", i - 1), b"");
                }
            }))
        })
        .collect();
    let refs: Vec<&TestLayer> = layers.iter().collect();
    let layout = dir.join("layout");
    let chains = image_layout(&layout, &[("x", &refs)]);
    (layout, chains.into_iter().next().unwrap())
}

/// A pids cgroup (v1 or v2) limiting a command to `max` tasks, threads
/// included; removed when dropped.
struct PidsCgroup(PathBuf);

impl PidsCgroup {
    fn new(max: u32) -> PidsCgroup {
        let v1 = Path::new("/sys/fs/cgroup/pids");
        let base = if v1.join("cgroup.procs").exists() {
            v1.to_path_buf()
        } else {
            let v2 = Path::new("/sys/fs/cgroup");
            let controllers = fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
            assert!(
                controllers.split_whitespace().any(|c| c == "pids"),
                "no pids cgroup controller on this machine (v1 /sys/fs/cgroup/pids or v2)"
            );
            v2.to_path_buf()
        };
        let dir = base.join(format!("unlade-test-{}-{max}", std::process::id()));
        fs::create_dir_all(&dir).expect("create cgroup");
        fs::write(dir.join("pids.max"), max.to_string()).expect("pids.max");
        PidsCgroup(dir)
    }

    /// Runs `unlade unpack LAYOUT --root ROOT --parallel 2` inside the
    /// cgroup (two apply permits: a worker pool of the same size on any
    /// machine).
    fn unpack(&self, layout: &Path, root: &Path) -> Output {
        let procs = self.0.join("cgroup.procs");
        Command::new("sh")
            .arg("-c")
            .arg("echo $$ > \"$0\" && exec \"$@\"")
            .arg(&procs)
            .arg(bin())
            .arg("unpack")
            .arg(layout)
            .arg("--root")
            .arg(root)
            .args(["--parallel", "2"])
            .output()
            .expect("run in cgroup")
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

/// More layers than overlayfs can stack (500) is one clear error before
/// anything is read; at the limit's side, threads stay bounded by the
/// worker pool whatever the layer count: 200 layers unpack with 40 tasks
/// allowed, and with two (no layer worker can start) the unpack fails
/// with one clear line instead of a panic.
#[test]
fn layer_count_and_threads_are_bounded() {
    let w = tmp();
    let (layout, _) = many_layers(&w.path().join("big"), 501);
    let line = clear_error(&unpack(
        &layout.display().to_string(),
        &w.path().join("r0"),
        &[],
    ));
    assert!(line.contains("501 layers: more than 500"), "{line}");

    let (layout, chains) = many_layers(&w.path().join("mid"), 200);
    let root = w.path().join("r1");
    let cg = PidsCgroup::new(40);
    let out = cg.unpack(&layout, &root);
    assert_eq!(last_line(&out), chains[199]);
    // Every layer is there, committed.
    for c in &chains {
        assert!(root.join("snapshots/committed").join(&c[7..]).is_dir());
    }
    drop(cg);

    let root = w.path().join("r2");
    let cg = PidsCgroup::new(2);
    let out = cg.unpack(&layout, &root);
    let line = clear_error(&out);
    assert!(line.contains("thread"), "{line}");
    let committed = root.join("snapshots/committed");
    let n = fs::read_dir(&committed).map_or(0, |d| d.count());
    // Whatever it committed is whole (layers commit in order); the rest
    // is not there at all.
    for c in chains.iter().take(n) {
        assert!(committed.join(&c[7..]).is_dir());
    }
}
