//! `unlade unpack`: whole images into overlay snapshots, checked by
//! mounting them with the command `unlade mounts` prints and comparing the
//! merged tree with GNU tar's sequential extraction of the same layers
//! (OCI whiteouts applied by the test). Whiteouts and opaque directories
//! across layers, a hard link to a lower layer's file, gzip + zstd + plain
//! layers in one image, base layers shared between images, writable
//! snapshots, image records and gc.

use std::fs;
use std::path::Path;
use std::process::Command;

use unlade_tests::*;

/// Layer 1: a rich tree (modes, owners, xattrs, devices, hard links) plus
/// what the later layers delete, hide or link to.
fn layer1(work: &Path) -> TestLayer {
    let t = work.join("l1");
    build_tree(&t, true);
    for (p, data) in [
        ("deep/x/y/target", &b"linked from above"[..]),
        ("gone/file", b"deleted by layer 2"),
        ("gone/kept", b"stays"),
        ("gone-dir/sub/f", b"whole dir deleted"),
        ("opq/old1", b"hidden by the opaque marker"),
        ("opq/olddir/f", b"hidden too"),
        ("replaced", b"a file that becomes a directory"),
    ] {
        let f = t.join(p);
        fs::create_dir_all(f.parent().unwrap()).unwrap();
        fs::write(&f, data).unwrap();
    }
    std::os::unix::fs::symlink("target", t.join("deep/x/y/sym")).unwrap();
    sh(Command::new("mkfifo").arg(t.join("deep/x/y/fifo")));
    sh(Command::new("chown")
        .arg("1000:1000")
        .arg(t.join("deep/x/y/target")));
    sh(Command::new("chmod")
        .arg("0640")
        .arg(t.join("deep/x/y/target")));
    sh(Command::new("chmod").arg("0750").arg(t.join("deep/x")));
    tar_of(&t, MT_GZ)
}

/// Layer 2: file and directory whiteouts, an opaque directory with new
/// content, a file replaced by a directory.
fn layer2(work: &Path) -> TestLayer {
    let t = work.join("l2");
    for (p, data) in [
        ("gone/.wh.file", &b""[..]),
        (".wh.gone-dir", b""),
        ("opq/.wh..wh..opq", b""),
        ("opq/new", b"only this is in opq now"),
        ("added/file", b"new in layer 2"),
        (".wh.replaced", b""),
        ("replaced/inside", b"a directory now"),
    ] {
        let f = t.join(p);
        fs::create_dir_all(f.parent().unwrap()).unwrap();
        fs::write(&f, data).unwrap();
    }
    tar_of(&t, MT_ZST)
}

/// Layer 3 (plain tar): hard links to a lower layer's file, symlink and
/// FIFO, whose directory this layer does not otherwise touch.
fn layer3() -> TestLayer {
    let mut t = RawTar::default();
    t.dir("./")
        .dir("links2/")
        .hardlink("links2/to-lower", "deep/x/y/target")
        .hardlink("links2/to-lower-again", "deep/x/y/target")
        .hardlink("links2/to-lower-symlink", "deep/x/y/sym")
        .hardlink("links2/to-lower-fifo", "deep/x/y/fifo")
        .file("links2/own", b"layer 3's own file")
        .end();
    TestLayer {
        tar: t.bytes(),
        media_type: MT_TAR,
    }
}

fn layer4() -> TestLayer {
    let mut t = RawTar::default();
    t.dir("./").file("image-b-only", b"b").end();
    TestLayer {
        tar: t.bytes(),
        media_type: MT_GZ,
    }
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn merged_view_matches_sequential_extraction() {
    let w = tmp();
    let (l1, l2, l3) = (layer1(w.path()), layer2(w.path()), layer3());
    let layout = w.path().join("layout");
    let chains = image_layout(&layout, &[("a", &[&l1, &l2, &l3])]);
    let root = w.path().join("root");
    let out = unpack(&format!("{}:a", layout.display()), &root, &[]);
    let top = last_line(&out);
    assert_eq!(top, chains[0][2], "{}", stdout(&out));
    assert!(stdout(&out).contains("3 applied here"), "{}", stdout(&out));

    let expected = expected_merge(&[&l1, &l2, &l3], w.path());
    // The expectation itself shows each cross-layer case.
    for gone in ["gone/file", "gone-dir", "opq/old1", "opq/olddir"] {
        assert!(!expected.contains_key(gone), "{gone}");
    }
    for kept in ["gone/kept", "opq/new", "replaced/inside", "links2/to-lower"] {
        assert!(expected.contains_key(kept), "{kept}");
    }
    assert_eq!(expected["replaced"].kind, 'd');
    assert_eq!(
        expected["links2/to-lower"].link_group,
        Some("deep/x/y/target".to_string())
    );
    let actual = mounted_tree(&root, &top, w.path());
    assert_same(&expected, &actual, "merged overlay vs GNU tar");
    // The link and its copied-up target share an inode in the top layer.
    assert_eq!(
        actual["links2/to-lower"].link_group,
        Some("deep/x/y/target".to_string())
    );

    // Every layer is a committed snapshot on its parent; the image is
    // recorded under LAYOUT:TAG.
    let ls = Command::new(bin())
        .args(["snapshots", "ls", "--root"])
        .arg(&root)
        .output()
        .unwrap();
    let want = [
        format!("{}\t-\tcommitted", chains[0][0]),
        format!("{}\t{}\tcommitted", chains[0][1], chains[0][0]),
        format!("{}\t{}\tcommitted", chains[0][2], chains[0][1]),
    ];
    for line in &want {
        assert!(stdout(&ls).lines().any(|l| l == line), "{}", stdout(&ls));
    }
    let images = Command::new(bin())
        .args(["images", "ls", "--root"])
        .arg(&root)
        .output()
        .unwrap();
    let rec = stdout(&images);
    assert!(
        rec.starts_with(&format!("{}:a\tsha256:", layout.display())),
        "{rec}"
    );
    assert!(rec.contains(&chains[0][2]), "{rec}");

    // A second unpack applies nothing and reads no blob.
    for l in [&l1, &l2, &l3] {
        fs::remove_file(layout.join("blobs/sha256").join(&sha256(&l.blob())[7..])).unwrap();
    }
    let again = unpack(&format!("{}:a", layout.display()), &root, &[]);
    assert_eq!(last_line(&again), top);
    assert!(
        stdout(&again).contains("3 committed before, 0 applied here, 0 blobs imported"),
        "{}",
        stdout(&again)
    );
}

#[test]
fn writable_snapshot_on_an_image() {
    let w = tmp();
    let (l3, l4) = (layer3_standalone(), layer4());
    let layout = w.path().join("layout");
    let chains = image_layout(&layout, &[("x", &[&l4, &l3])]);
    let root = w.path().join("root");
    let top = last_line(&unpack(&format!("{}:x", layout.display()), &root, &[]));
    assert_eq!(top, chains[0][1]);
    let target = w.path().join("rootfs");
    fs::create_dir_all(&target).unwrap();
    let mounts = |extra: &[&str]| {
        Command::new(bin())
            .arg("mounts")
            .arg(&target)
            .arg(&top)
            .arg("--root")
            .arg(&root)
            .args(extra)
            .output()
            .unwrap()
    };
    let line = last_line(&mounts(&["--rw", "c1"]));
    assert!(line.starts_with("mount -t overlay overlay "), "{line}");
    sh(Command::new("sh").arg("-c").arg(&line));
    fs::write(target.join("written-by-container"), b"hi").unwrap();
    fs::remove_file(target.join("image-b-only")).unwrap();
    sh(Command::new("umount").arg(&target));
    // The container's changes are in its own upper directory only.
    let upper = root.join("snapshots/rw/c1/fs");
    assert_eq!(fs::read(upper.join("written-by-container")).unwrap(), b"hi");
    let ro = mounted_tree(&root, &top, w.path());
    assert!(ro.contains_key("image-b-only"));
    assert!(!ro.contains_key("written-by-container"));
    // The key is taken; its parents cannot go while it exists.
    assert!(err_line(&mounts(&["--rw", "c1"])).contains("exists already"));
    let run = |args: &[&str]| {
        Command::new(bin())
            .args(args)
            .arg("--root")
            .arg(&root)
            .output()
            .unwrap()
    };
    assert!(err_line(&run(&["snapshots", "rm", &top])).contains("writable snapshot \"c1\""));
    let ls = stdout(&run(&["snapshots", "ls"]));
    assert!(
        ls.lines().any(|l| l == format!("c1\t{top}\twritable")),
        "{ls}"
    );
    // gc keeps what the writable snapshot stands on even without images.
    assert!(run(&["images", "rm", &format!("{}:x", layout.display())])
        .status
        .success());
    assert!(run(&["gc"]).status.success());
    assert!(stdout(&run(&["snapshots", "ls"])).contains(&top));
    assert!(run(&["snapshots", "rm", "c1"]).status.success());
    let gc = run(&["gc"]);
    assert!(
        stdout(&gc).contains("removed 2 snapshots"),
        "{}",
        stdout(&gc)
    );
    assert_eq!(stdout(&run(&["snapshots", "ls"])), "");
    assert_eq!(stdout(&run(&["content", "ls"])), "");
}

fn layer3_standalone() -> TestLayer {
    let mut t = RawTar::default();
    t.dir("./").file("second", b"2").end();
    TestLayer {
        tar: t.bytes(),
        media_type: MT_ZST,
    }
}

#[test]
fn shared_base_layers_are_applied_once_and_gc_keeps_them() {
    let w = tmp();
    let (l1, l2, l4) = (layer1(w.path()), layer2(w.path()), layer4());
    let la = w.path().join("layout-a");
    let lb = w.path().join("layout-b");
    let ca = image_layout(&la, &[("a", &[&l1, &l2])]);
    let cb = image_layout(&lb, &[("b", &[&l1, &l4])]);
    assert_eq!(ca[0][0], cb[0][0]);
    let root = w.path().join("root");
    last_line(&unpack(&format!("{}:a", la.display()), &root, &[]));
    // Image b's base is committed already: its blob is not even read.
    fs::remove_file(la.join("blobs/sha256").join(&sha256(&l1.blob())[7..])).unwrap();
    fs::remove_file(lb.join("blobs/sha256").join(&sha256(&l1.blob())[7..])).unwrap();
    let out = unpack(&format!("{}:b", lb.display()), &root, &[]);
    assert_eq!(last_line(&out), cb[0][1]);
    assert!(
        stdout(&out).contains("1 committed before, 1 applied here"),
        "{}",
        stdout(&out)
    );
    let expected_b = expected_merge(&[&l1, &l4], &w.path().join("eb"));
    assert_same(
        &expected_b,
        &mounted_tree(&root, &cb[0][1], w.path()),
        "image b",
    );

    // Forget a; gc removes a's top layer and its blobs, keeps the base.
    let run = |args: &[&str]| {
        Command::new(bin())
            .args(args)
            .arg("--root")
            .arg(&root)
            .output()
            .unwrap()
    };
    assert!(run(&["images", "rm", &format!("{}:a", la.display())])
        .status
        .success());
    let gc = run(&["gc"]);
    assert!(
        stdout(&gc).contains("removed 1 snapshots, 3 blobs"),
        "{}",
        stdout(&gc)
    );
    let ls = stdout(&run(&["snapshots", "ls"]));
    assert!(ls.contains(&ca[0][0]) && !ls.contains(&ca[0][1]), "{ls}");
    assert_same(
        &expected_b,
        &mounted_tree(&root, &cb[0][1], w.path()),
        "image b after gc",
    );
    let content = stdout(&run(&["content", "ls"]));
    assert_eq!(content.lines().count(), 4, "{content}");
}

#[test]
fn foreign_layers_apply_when_present_and_fail_clearly_when_not() {
    let w = tmp();
    let l = layer4();
    let blob = l.blob();
    let layout = w.path().join("layout");
    let mut b = LayoutBuilder::new(&layout);
    let desc = b.image(
        "linux/amd64",
        &[l.diff_id()],
        &[(
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            &blob,
        )],
        false,
    );
    b.add(desc, Some("f")).finish();
    let root = w.path().join("root");
    let r = format!("{}:f", layout.display());
    let top = last_line(&unpack(&r, &root, &[]));
    assert_eq!(top, l.diff_id());
    let root2 = w.path().join("root2");
    fs::remove_file(layout.join("blobs/sha256").join(&sha256(&blob)[7..])).unwrap();
    let line = err_line(&unpack(&r, &root2, &[]));
    assert!(
        line.contains(&sha256(&blob)) && line.contains("foreign layer"),
        "{line}"
    );
}

/// README's first command: the bundled image unpacks, mounts as a
/// container rootfs with the printed command, and its programs run.
#[test]
fn bundled_demo_image_unpacks_mounts_and_runs() {
    let w = tmp();
    let layout = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/demo-image");
    let root = w.path().join("root");
    let top = last_line(&unpack(
        &format!("{}:latest", layout.display()),
        &root,
        &["-q"],
    ));
    let rootfs = w.path().join("rootfs");
    fs::create_dir_all(&rootfs).unwrap();
    let line = last_line(
        &Command::new(bin())
            .arg("mounts")
            .arg(&rootfs)
            .arg(&top)
            .arg("--root")
            .arg(&root)
            .args(["--rw", "demo"])
            .output()
            .unwrap(),
    );
    sh(Command::new("sh").arg("-c").arg(&line));
    let out = Command::new("chroot")
        .arg(&rootfs)
        .args(["/bin/sh", "-c", "cat /etc/motd; hello; ls /usr/share/doc"])
        .output()
        .unwrap();
    sh(Command::new("umount").arg(&rootfs));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with("unpacked by unlade\nHello, world!\n"),
        "{text}"
    );
    // Layer 3's whiteout hid hello's docs; tree's are still there.
    assert!(
        !text.lines().any(|l| l == "hello") && text.lines().any(|l| l == "tree"),
        "{text}"
    );
}
