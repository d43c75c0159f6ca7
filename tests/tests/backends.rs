//! The two executors of the file-writing workers give the same trees:
//! every layer here is applied with `--backend syscalls` and with
//! `--backend uring` (one and two worker threads, whole-buffer and
//! streaming decode) and the trees compared; both fail the same way on a
//! full file system. And where io_uring is refused (a seccomp filter
//! returning EPERM or ENOSYS for `io_uring_setup`, installed in the child
//! before exec), `--backend auto` falls back to plain syscalls with one
//! stderr line and writes the same tree, while `--backend uring` fails
//! with one `unlade: error:` line.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

use unlade_tests::*;

/// `unlade apply LAYER DEST --backend B EXTRA...`, whatever
/// `UNLADE_BACKEND` the test runs under.
fn apply_with(layer: &Path, dest: &Path, backend: &str, extra: &[&str]) -> Output {
    let mut args = vec!["--backend", backend];
    args.extend_from_slice(extra);
    apply(layer, dest, &args)
}

/// Whether this kernel lets the binary use io_uring at all (a container
/// may forbid it): the uring half of these tests needs it.
fn uring_available(w: &Path) -> bool {
    let f = write(w, "probe.tar", &{
        let mut t = RawTar::default();
        t.file("x", b"x").end();
        t.bytes()
    });
    let out = apply_with(&f, &w.join("probe"), "uring", &[]);
    if !out.status.success() {
        eprintln!(
            "io_uring unavailable here, uring half skipped: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.status.success()
}

/// Every entry kind and every replacement the applier knows, in one
/// layer: files over files, directories and symlinks, and back; hard
/// links replaced; whiteouts and an opaque directory; empty and
/// larger-than-a-batch files; long names.
fn replacements() -> Vec<u8> {
    let mut t = RawTar::default();
    t.dir("./")
        .file("f2d", b"file")
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
        .file("empty", b"")
        .file("big", &noise(5 << 20, 7))
        .dir("o")
        .file("o/.wh..wh..opq", b"")
        .file("o/kept", b"k")
        .file(".wh.gone", b"")
        .symlink("dangling", "/nowhere")
        .file(&"n".repeat(200), b"long name");
    for i in 0..300 {
        t.file(&format!("flat/f{i}"), &noise(i * 37 % 9000, i as u64));
    }
    for i in 0..300 {
        t.file(
            &format!("flat/f{i}"),
            &noise(i * 53 % 7000, 1000 + i as u64),
        );
    }
    t.end();
    t.bytes()
}

/// `tree` without the times the layer does not set, which are when the
/// apply ran: of whiteouts (0:0 devices), of directories no entry names
/// (made as missing parents: `flat`), and of the root where the layer
/// has no `./` entry.
fn timeless(mut tree: Tree) -> Tree {
    for (path, node) in tree.iter_mut() {
        if (node.kind == 'c' && node.content == "0:0") || path == "flat" || path.is_empty() {
            node.mtime_ns = None;
        }
    }
    tree
}

/// Applies `layer` with each backend and thread count into its own
/// directory, and compares every tree with the first.
fn same_everywhere(w: &Path, name: &str, layer: &[u8], extra: &[&str]) {
    let f = write(w, &format!("{name}.blob"), layer);
    let mut first: Option<(String, Tree, String)> = None;
    for (backend, threads) in [
        ("syscalls", "2"),
        ("uring", "2"),
        ("uring", "1"),
        ("syscalls", "1"),
    ] {
        let dest = w.join(format!("{name}-{backend}-{threads}"));
        let mut args = vec!["--threads", threads];
        args.extend_from_slice(extra);
        let id = ok_diff_id(&apply_with(&f, &dest, backend, &args));
        let tree = timeless(snapshot(&dest));
        let what = format!("{name} {backend} --threads {threads} {extra:?}");
        match &first {
            None => first = Some((what, tree, id)),
            Some((w0, t0, id0)) => {
                assert_eq!(&id, id0, "{what} vs {w0}");
                assert_same(t0, &tree, &format!("{w0} vs {what}"));
            }
        }
    }
}

#[test]
fn both_backends_write_the_same_trees() {
    let w = tmp();
    if !uring_available(w.path()) {
        return;
    }
    let src = w.path().join("src");
    build_tree(&src, true);
    let every = tar_of(&src, MT_TAR);
    same_everywhere(w.path(), "every-kind", &every.tar, &[]);
    same_everywhere(
        w.path(),
        "every-kind-streaming",
        &every.tar,
        &["--decode", "streaming"],
    );
    let repl = replacements();
    same_everywhere(w.path(), "replacements", &repl, &[]);
    // Streaming: files larger than a chunk are opened, written piecewise
    // (`Op::Write`) and finished by the workers.
    same_everywhere(
        w.path(),
        "replacements-streaming",
        &repl,
        &["--decode", "streaming"],
    );
    let many = many_files(3000, 3000, 11, MT_GZ);
    same_everywhere(w.path(), "many-gz", &many.blob(), &[]);
    let many = many_files(2000, 20_000, 12, MT_ZST);
    same_everywhere(
        w.path(),
        "many-zst-streaming",
        &many.blob(),
        &["--decode", "streaming"],
    );
}

/// A layer applied onto an existing tree (the layer below, as `apply`
/// over a directory leaves it) replaces what it names the same way.
#[test]
fn both_backends_replace_an_existing_tree_the_same() {
    let w = tmp();
    if !uring_available(w.path()) {
        return;
    }
    let below = replacements();
    let above = {
        let mut t = RawTar::default();
        t.file("f2d", b"a file again")
            .dir("d2f")
            .symlink("same", "t1")
            .file("o", b"was an opaque dir")
            .hardlink("t2", "t1")
            .file("big", b"small now");
        for i in (0..300).step_by(3) {
            t.dir(&format!("flat/f{i}"));
        }
        t.end();
        t.bytes()
    };
    let (fb, fa) = (
        write(w.path(), "below.tar", &below),
        write(w.path(), "above.tar", &above),
    );
    let mut trees = Vec::new();
    for backend in ["syscalls", "uring"] {
        let dest = w.path().join(backend);
        ok_diff_id(&apply_with(&fb, &dest, backend, &[]));
        ok_diff_id(&apply_with(&fa, &dest, backend, &[]));
        trees.push(timeless(snapshot(&dest)));
    }
    assert_same(
        &trees[0],
        &trees[1],
        "syscalls vs uring over an existing tree",
    );
}

/// On a full file system both backends fail with one line naming the
/// same step and error.
#[test]
fn both_backends_fail_the_same_on_a_full_file_system() {
    let w = tmp();
    if !uring_available(w.path()) {
        return;
    }
    let layer = many_files(400, 10_000, 13, MT_TAR);
    let f = write(w.path(), "l.tar", &layer.tar);
    let mnt = w.path().join("small");
    fs::create_dir_all(&mnt).unwrap();
    sh(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt));
    let mut lines = Vec::new();
    for backend in ["syscalls", "uring"] {
        let out = apply_with(&f, &mnt.join(backend), backend, &[]);
        let line = err_line(&out);
        assert!(line.starts_with("unlade: error:"), "{line}");
        assert!(
            line.contains("No space left on device"),
            "{backend}: {line}"
        );
        // The step, as the syscalls backend names it.
        let step = if line.contains("write file") {
            "write file"
        } else {
            "other"
        };
        lines.push((step, line));
        sh(Command::new("rm").arg("-rf").arg(mnt.join(backend)));
    }
    sh(Command::new("umount").arg(&mnt));
    assert_eq!(lines[0].0, lines[1].0, "{lines:?}");
}

/// Whether `--backend auto` tries io_uring for a target at `dest` (the
/// engine's own policy, `BackendKind::auto_for`).
fn auto_tries_uring(dest: &Path) -> bool {
    unlade::layer::fsops::BackendKind::auto_for(dest) == unlade::layer::fsops::BackendKind::Uring
}

/// `AUDIT_ARCH_*` of the build target, the arch a seccomp filter checks
/// before trusting a syscall number.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// `io_uring_setup`'s number (the same on every architecture since the
/// generic syscall table, Linux 5.1).
const NR_IO_URING_SETUP: u32 = 425;

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// A classic-BPF seccomp program: `io_uring_setup` fails with `errno`,
/// everything else (and every call of another arch) is allowed.
fn deny_io_uring(errno: i32) -> [libc::sock_filter; 6] {
    // struct seccomp_data: nr at 0, arch at 4.
    [
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 4),
        jump(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            AUDIT_ARCH,
            0,
            3,
        ),
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
        jump(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            NR_IO_URING_SETUP,
            0,
            1,
        ),
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | (errno as u32 & libc::SECCOMP_RET_DATA),
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ]
}

/// `unlade apply LAYER DEST --backend B` in a child whose
/// `io_uring_setup` fails with `errno`.
fn apply_without_io_uring(layer: &Path, dest: &Path, backend: &str, errno: i32) -> Output {
    let filter = deny_io_uring(errno);
    let mut cmd = Command::new(bin());
    cmd.arg("apply")
        .arg(layer)
        .arg(dest)
        .args(["--backend", backend])
        .env_remove("UNLADE_BACKEND");
    // SAFETY: the closure runs in the forked child before exec and only
    // makes two syscalls (async-signal-safe), reading `filter`, which the
    // closure owns and which outlives both calls.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            let r = libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &prog as *const libc::sock_fprog,
            );
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("run unlade under seccomp")
}

#[test]
fn auto_falls_back_to_syscalls_where_io_uring_is_refused() {
    let w = tmp();
    let layer = replacements();
    let f = write(w.path(), "l.tar", &layer);
    let want_dest = w.path().join("want");
    ok_diff_id(&apply_with(&f, &want_dest, "syscalls", &[]));
    let want = timeless(snapshot(&want_dest));
    for (errno, what) in [
        (libc::EPERM, "Operation not permitted"),
        (libc::ENOSYS, "not implemented"),
    ] {
        // auto: one line saying why, then the syscalls backend's tree.
        let dest = w.path().join(format!("auto-{errno}"));
        let out = apply_without_io_uring(&f, &dest, "auto", errno);
        assert!(
            out.status.success(),
            "auto under seccomp ({what}) failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("auto, io_uring_setup failing with {what}: {stderr:?}");
        let lines: Vec<&str> = stderr.lines().collect();
        if auto_tries_uring(&dest) {
            assert_eq!(lines.len(), 1, "one line about io_uring: {stderr:?}");
            assert!(
                lines[0].starts_with("unlade: io_uring unavailable (")
                    && lines[0].contains(what)
                    && lines[0].ends_with("using the syscalls backend"),
                "{}",
                lines[0]
            );
        } else {
            assert!(
                lines.is_empty(),
                "auto took syscalls here, nothing to say: {stderr:?}"
            );
        }
        assert_same(
            &want,
            &timeless(snapshot(&dest)),
            &format!("auto without io_uring ({what})"),
        );
        // uring: refused, with one error line.
        let dest = w.path().join(format!("uring-{errno}"));
        let out = apply_without_io_uring(&f, &dest, "uring", errno);
        let line = err_line(&out);
        eprintln!("uring, io_uring_setup failing with {what}: {line:?}");
        assert!(line.starts_with("unlade: error:"), "{line}");
        assert!(line.contains("io_uring") && line.contains(what), "{line}");
    }
}
