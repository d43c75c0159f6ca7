//! Helpers for unlade's integration tests: the `unlade` binary, tree
//! snapshots to compare extractions, a raw tar writer for archives no
//! well-behaved tool writes, and wrappers around the independent writers
//! (GNU tar, bsdtar, Python tarfile, Go archive/tar).
//!
//! The tests run as root (CI does): they chown, mknod and set trusted.*
//! xattrs, and they compare against GNU tar extracting as root.

pub mod containerd;
pub mod registry;
pub mod snapclient;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use sha2::{Digest as _, Sha256};

pub use tempfile::TempDir;

/// Options of a root opened by a test in-process: the backend the binary
/// would take from `$UNLADE_BACKEND` (and `$UNLADE_THREADS`), so that CI
/// runs the library's tests on each backend the way it runs the binary's.
pub fn root_options() -> unlade::RootOptions {
    let kind = match std::env::var("UNLADE_BACKEND").as_deref() {
        Ok("uring") => unlade::layer::fsops::BackendKind::Uring,
        Ok("syscalls") => unlade::layer::fsops::BackendKind::Syscalls,
        Ok("auto") | Ok("") | Err(_) => unlade::layer::fsops::BackendKind::Auto,
        Ok(other) => panic!("UNLADE_BACKEND={other}: not auto, uring or syscalls"),
    };
    let threads = std::env::var("UNLADE_THREADS")
        .ok()
        .map(|t| t.parse().expect("UNLADE_THREADS is a number"));
    unlade::RootOptions {
        backend: unlade::layer::fsops::BackendOptions { kind, threads },
        ..unlade::RootOptions::default()
    }
}

/// `%XX` escapes decoded (and `+` as a space where `plus_is_space`: an
/// HTML form's encoding, as token requests use; gRPC's `grpc-message`
/// keeps `+`).
pub fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if plus_is_space && b[i] == b'+' {
            b' '
        } else {
            b[i]
        });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Polls `ready` every 50 ms until it holds; fails after 30 s with what
/// `report` says then. What the tests wait for happens asynchronously
/// (a server starting, a garbage collection, a hand-off after an answer).
pub fn wait_until(mut ready: impl FnMut() -> bool, report: impl Fn() -> String) {
    let t = std::time::Instant::now();
    while !ready() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "not within 30 s: {}",
            report()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A fresh temporary directory.
pub fn tmp() -> TempDir {
    tempfile::Builder::new()
        .prefix("unlade-test-")
        .tempdir()
        .expect("tempdir")
}

/// Path of the `unlade` binary, built once per test process with the same
/// profile as the tests; `$UNLADE_TEST_BIN` names another one instead (an
/// older build, to see a new test fail before its fix).
pub fn bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("UNLADE_TEST_BIN") {
            return PathBuf::from(p);
        }
        // target/<profile>/deps/<test> → target/<profile>
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("target root").to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "-q",
            "-p",
            "unlade",
            "--bin",
            "unlade",
            "--target-dir",
        ])
        .arg(&target_dir);
        if profile_dir.file_name() == Some(OsStr::new("release")) {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "building the unlade binary failed");
        profile_dir.join("unlade")
    })
    .clone()
}

/// Runs `unlade apply LAYER DEST EXTRA...`.
pub fn apply(layer: &Path, dest: &Path, extra: &[&str]) -> Output {
    Command::new(bin())
        .arg("apply")
        .arg(layer)
        .arg(dest)
        .args(extra)
        .output()
        .expect("run unlade")
}

/// Runs `unlade apply - DEST` with `data` on stdin (a pipe).
pub fn apply_stdin(data: &[u8], dest: &Path, extra: &[&str]) -> Output {
    let mut child = Command::new(bin())
        .arg("apply")
        .arg("-")
        .arg(dest)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn unlade");
    let mut stdin = child.stdin.take().expect("stdin");
    let data = data.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait unlade");
    writer.join().expect("writer");
    out
}

/// The last stdout line of a successful apply (the diff ID); panics with
/// stderr otherwise.
pub fn ok_diff_id(out: &Output) -> String {
    assert!(
        out.status.success(),
        "unlade failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout.lines().last().expect("no stdout").to_string()
}

/// Asserts an apply failed the way the contract says: exit code 1 and one
/// line on stderr, which is returned.
pub fn err_line(out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1, got {}; stdout: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one stderr line, got: {stderr:?}");
    lines[0].to_string()
}

/// `sha256:<hex>` of bytes.
pub fn sha256(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    let mut s = String::from("sha256:");
    for b in d {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// One file-system object as the tests compare it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// f, d, l, c, b, p, s.
    pub kind: char,
    /// Permission bits incl. setuid/setgid/sticky.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Content digest (files), link target (symlinks), device (nodes).
    pub content: String,
    /// Modification time in ns (None where it is not compared).
    pub mtime_ns: Option<i128>,
    /// Extended attributes.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// For hard links: the first path (in sorted order) sharing the inode.
    pub link_group: Option<String>,
}

/// A whole tree: relative path → node ("" is the root).
pub type Tree = BTreeMap<String, Node>;

/// Extended attributes of a path, without following a symlink.
pub fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut names = vec![0u8; 65536];
    let Ok(n) = rustix::fs::llistxattr(p, &mut names) else {
        return out;
    };
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut val = vec![0u8; 65536];
        if let Ok(k) = rustix::fs::lgetxattr(p, name, &mut val) {
            val.truncate(k);
            out.insert(String::from_utf8_lossy(name).into_owned(), val);
        }
    }
    out
}

/// Snapshots everything below `root` (root included as "").
pub fn snapshot(root: &Path) -> Tree {
    let mut tree = Tree::new();
    let mut inodes: BTreeMap<(u64, u64), String> = BTreeMap::new();
    let mut paths = Vec::new();
    walk(root, root, &mut paths);
    paths.sort();
    for rel in paths {
        let p = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        let md = fs::symlink_metadata(&p).expect("lstat");
        let ft = md.file_type();
        let (kind, content) = if ft.is_dir() {
            ('d', String::new())
        } else if ft.is_symlink() {
            (
                'l',
                fs::read_link(&p)
                    .expect("readlink")
                    .to_string_lossy()
                    .into_owned(),
            )
        } else if ft.is_file() {
            (
                'f',
                format!("{} {}", md.len(), sha256(&fs::read(&p).expect("read"))),
            )
        } else if ft.is_char_device() {
            (
                'c',
                format!(
                    "{}:{}",
                    rustix::fs::major(md.rdev()),
                    rustix::fs::minor(md.rdev())
                ),
            )
        } else if ft.is_block_device() {
            (
                'b',
                format!(
                    "{}:{}",
                    rustix::fs::major(md.rdev()),
                    rustix::fs::minor(md.rdev())
                ),
            )
        } else if ft.is_fifo() {
            ('p', String::new())
        } else {
            ('s', String::new())
        };
        let link_group = if kind != 'd' && md.nlink() > 1 {
            Some(
                inodes
                    .entry((md.dev(), md.ino()))
                    .or_insert_with(|| rel.clone())
                    .clone(),
            )
        } else {
            None
        };
        tree.insert(
            rel.clone(),
            Node {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                content,
                mtime_ns: Some(
                    i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
                ),
                xattrs: xattrs(&p),
                link_group,
            },
        );
    }
    tree
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let rel = dir
        .strip_prefix(root)
        .expect("prefix")
        .to_string_lossy()
        .into_owned();
    out.push(rel);
    let mut ents: Vec<_> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry"))
        .collect();
    ents.sort_by_key(|e| e.file_name());
    for e in ents {
        let p = e.path();
        if e.file_type().expect("file_type").is_dir() {
            walk(root, &p, out);
        } else {
            out.push(
                p.strip_prefix(root)
                    .expect("prefix")
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
}

/// Describes the differences between two trees, or "" if equal.
pub fn diff(expected: &Tree, actual: &Tree) -> String {
    let mut out = String::new();
    for (k, e) in expected {
        match actual.get(k) {
            None => {
                let _ = writeln!(out, "missing {k:?}: {e:?}");
            }
            Some(a) if a != e => {
                let _ = writeln!(out, "differs {k:?}:\n  expected {e:?}\n  actual   {a:?}");
            }
            _ => {}
        }
    }
    for (k, a) in actual {
        if !expected.contains_key(k) {
            let _ = writeln!(out, "unexpected {k:?}: {a:?}");
        }
    }
    out
}

/// Asserts two trees are equal, printing the differences.
pub fn assert_same(expected: &Tree, actual: &Tree, what: &str) {
    let d = diff(expected, actual);
    assert!(d.is_empty(), "{what}: trees differ:\n{d}");
}

/// Runs a command, panicking with its stderr on failure.
pub fn sh(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Extracts `archive` into `dest` with GNU tar as the reference extractor:
/// root, numeric owners, modes, all xattrs, delayed directory restore.
pub fn gnu_extract(archive: &Path, dest: &Path) {
    fs::create_dir_all(dest).expect("mkdir");
    sh(Command::new("tar")
        .args([
            "--xattrs",
            "--xattrs-include=*",
            "--same-owner",
            "--numeric-owner",
            "-p",
            "--delay-directory-restore",
            "-xf",
        ])
        .arg(archive)
        .arg("-C")
        .arg(dest));
}

/// Where the helper scripts of this crate live.
pub fn tools_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools")
}

/// Whether a program is on PATH.
pub fn have(prog: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {prog} >/dev/null"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Builds a tar of `src` with Go's archive/tar (format: pax, gnu, ustar),
/// the writer of Docker, containerd and BuildKit layers.
pub fn go_tar(src: &Path, out: &Path, format: &str) {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let exe = BUILT.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("unlade-gotar-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        let exe = dir.join("gotar");
        sh(Command::new("go")
            .arg("build")
            .arg("-o")
            .arg(&exe)
            .arg(tools_dir().join("gotar.go"))
            .env("GO111MODULE", "off")
            .env("GOFLAGS", "")
            .env("GOCACHE", dir.join("cache")));
        exe
    });
    sh(Command::new(exe).arg(format).arg(src).arg(out));
}

/// Builds a tar of `src` with Python's tarfile (format: ustar, gnu, pax).
pub fn py_tar(src: &Path, out: &Path, format: &str) {
    sh(Command::new("python3")
        .arg(tools_dir().join("pytar.py"))
        .arg(format)
        .arg(src)
        .arg(out));
}

/// Builds a tar of `src` with GNU tar (format: v7, ustar, gnu, oldgnu,
/// posix), sorted, with xattrs where the format has them.
pub fn gnu_tar(src: &Path, out: &Path, format: &str, extra: &[&str]) {
    let mut cmd = Command::new("tar");
    cmd.arg("-C").arg(src).arg("-cf").arg(out);
    cmd.arg(format!("--format={format}"))
        .arg("--sort=name")
        .arg("--numeric-owner");
    if format == "posix" {
        cmd.args(["--xattrs", "--xattrs-include=*"]);
    }
    cmd.args(extra).arg(".");
    sh(&mut cmd);
}

/// Builds a tar of `src` with bsdtar (format: ustar, pax, gnutar, v7).
pub fn bsd_tar(src: &Path, out: &Path, format: &str) {
    let mut cmd = Command::new("bsdtar");
    cmd.arg("-C")
        .arg(src)
        .arg("-cf")
        .arg(out)
        .arg("--format")
        .arg(format)
        .arg("--numeric-owner");
    if format == "pax" {
        cmd.arg("--xattrs");
    }
    cmd.arg(".");
    sh(&mut cmd);
}

/// gzip-compresses `data` as `members` concatenated members.
pub fn gzip_members(data: &[u8], members: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let step = data.len().div_ceil(members.max(1)).max(1);
    let chunks: Vec<&[u8]> = if data.is_empty() {
        vec![&[][..]]
    } else {
        data.chunks(step).collect()
    };
    for c in chunks {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        enc.write_all(c).expect("gzip");
        out.extend(enc.finish().expect("gzip"));
    }
    out
}

/// zstd-compresses `data` as `frames` concatenated frames.
pub fn zstd_frames(data: &[u8], frames: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let step = data.len().div_ceil(frames.max(1)).max(1);
    let chunks: Vec<&[u8]> = if data.is_empty() {
        vec![&[][..]]
    } else {
        data.chunks(step).collect()
    };
    for c in chunks {
        out.extend(zstd::encode_all(c, 3).expect("zstd"));
    }
    out
}

/// A raw tar writer for archives real tools would not produce: arbitrary
/// names, types, sizes, PAX records, broken checksums.
#[derive(Default)]
pub struct RawTar {
    /// The archive so far.
    pub buf: Vec<u8>,
}

/// One header's fields for [`RawTar::entry`].
#[derive(Clone)]
pub struct H<'a> {
    /// Name field (max 100 bytes; use PAX or GNU for longer).
    pub name: &'a [u8],
    /// Type flag.
    pub typ: u8,
    /// Mode.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size field (data given separately may differ, for hostile tests).
    pub size: u64,
    /// mtime seconds.
    pub mtime: u64,
    /// Link name field.
    pub link: &'a [u8],
    /// Device numbers.
    pub dev: (u32, u32),
    /// Magic: "ustar\0" + "00" unless set to GNU.
    pub gnu: bool,
}

impl Default for H<'_> {
    fn default() -> Self {
        H {
            name: b"",
            typ: b'0',
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 1_600_000_000,
            link: b"",
            dev: (0, 0),
            gnu: false,
        }
    }
}

fn octal(field: &mut [u8], v: u64) {
    let s = format!("{:0width$o}", v, width = field.len() - 1);
    assert!(s.len() < field.len(), "value {v} too large for field");
    field[..s.len()].copy_from_slice(s.as_bytes());
    field[s.len()] = 0;
}

impl RawTar {
    /// A header block with a valid checksum.
    pub fn header(h: &H<'_>) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..h.name.len()].copy_from_slice(h.name);
        octal(&mut b[100..108], u64::from(h.mode));
        octal(&mut b[108..116], u64::from(h.uid));
        octal(&mut b[116..124], u64::from(h.gid));
        octal(&mut b[124..136], h.size);
        octal(&mut b[136..148], h.mtime);
        b[156] = h.typ;
        b[157..157 + h.link.len()].copy_from_slice(h.link);
        if h.gnu {
            b[257..265].copy_from_slice(b"ustar  \0");
        } else {
            b[257..263].copy_from_slice(b"ustar\0");
            b[263..265].copy_from_slice(b"00");
        }
        octal(&mut b[329..337], u64::from(h.dev.0));
        octal(&mut b[337..345], u64::from(h.dev.1));
        Self::fix_checksum(&mut b);
        b
    }

    /// Recomputes the checksum of a header block.
    pub fn fix_checksum(b: &mut [u8; 512]) {
        b[148..156].copy_from_slice(b"        ");
        let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
        let s = format!("{sum:06o}\0 ");
        b[148..156].copy_from_slice(s.as_bytes());
    }

    /// Appends a raw block.
    pub fn block(&mut self, b: &[u8; 512]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }

    /// Appends data padded to a block boundary.
    pub fn data(&mut self, d: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(d);
        let pad = (512 - d.len() % 512) % 512;
        self.buf.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    /// Appends a header (size taken from `data` unless set) and its data.
    pub fn entry(&mut self, h: H<'_>, data: &[u8]) -> &mut Self {
        let mut h = h;
        if h.size == 0 {
            h.size = data.len() as u64;
        }
        let b = Self::header(&h);
        self.block(&b).data(data)
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.entry(
            H {
                name: name.as_bytes(),
                ..H::default()
            },
            data,
        )
    }

    /// A directory.
    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(
            H {
                name: name.as_bytes(),
                typ: b'5',
                mode: 0o755,
                ..H::default()
            },
            b"",
        )
    }

    /// A symlink.
    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(
            H {
                name: name.as_bytes(),
                typ: b'2',
                mode: 0o777,
                link: target.as_bytes(),
                ..H::default()
            },
            b"",
        )
    }

    /// A hard link.
    pub fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(
            H {
                name: name.as_bytes(),
                typ: b'1',
                link: target.as_bytes(),
                ..H::default()
            },
            b"",
        )
    }

    /// A PAX extended header ('x', or 'g' for global) with records.
    pub fn pax(&mut self, typ: u8, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (k, v) in records {
            let body_len = 1 + k.len() + 1 + v.len() + 1;
            let mut len = body_len + 1;
            loop {
                let total = len.to_string().len() + body_len;
                if total == len {
                    break;
                }
                len = total;
            }
            data.extend_from_slice(format!("{len} {k}=").as_bytes());
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        self.entry(
            H {
                name: b"PaxHeaders/x",
                typ,
                ..H::default()
            },
            &data,
        )
    }

    /// A GNU long name ('L') or long link ('K') header.
    pub fn gnu_long(&mut self, typ: u8, value: &[u8]) -> &mut Self {
        let mut v = value.to_vec();
        v.push(0);
        self.entry(
            H {
                name: b"././@LongLink",
                typ,
                gnu: true,
                ..H::default()
            },
            &v,
        )
    }

    /// Two zero blocks.
    pub fn end(&mut self) -> &mut Self {
        self.buf.extend(std::iter::repeat_n(0u8, 1024));
        self
    }

    /// The archive.
    pub fn bytes(&self) -> Vec<u8> {
        self.buf.clone()
    }
}

/// Writes bytes to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, data).expect("write");
    p
}

/// Deterministic pseudo-random bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn set_mtime(p: &Path, secs: i64, nanos: i64) {
    let t = rustix::fs::Timespec {
        tv_sec: secs,
        tv_nsec: nanos,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .expect("utimensat");
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn lchown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).expect("lchown");
}

/// Builds the test tree every writer archives: every entry type, odd modes
/// (setuid, 0000, 0500 and 0300 directories with children), hard link
/// chains (also to 0000 and setuid files), symlinks of every shape,
/// devices, owners, UTF-8 and long (ustar prefix) names, sub-second
/// mtimes. `extended` adds what only PAX/GNU can carry: names over 100
/// bytes in one component, a uid past the octal range, xattrs (user,
/// trusted, security.capability).
pub fn build_tree(root: &Path, extended: bool) {
    let d = |p: &str| {
        let p = root.join(p);
        fs::create_dir_all(&p).expect("mkdir");
        p
    };
    let f = |p: &str, data: &[u8], mode: u32| {
        let p = root.join(p);
        fs::write(&p, data).expect("write");
        chmod(&p, mode);
        p
    };
    d("dir0755");
    f("dir0755/empty", b"", 0o644);
    f("dir0755/small.txt", b"hello, layer\n", 0o644);
    f("dir0755/big.bin", &noise(300_000, 1), 0o640);
    f("dir0755/setuid", b"#!/bin/sh\n", 0o4755);
    f("dir0755/setgid", b"#!/bin/sh\n", 0o2711);
    f("dir0755/mode0000", b"secret", 0o000);
    fs::hard_link(root.join("dir0755/setuid"), root.join("dir0755/hl-setuid")).expect("link");
    fs::hard_link(
        root.join("dir0755/mode0000"),
        root.join("dir0755/hl-mode0000"),
    )
    .expect("link");
    d("chain");
    f("chain/a", b"chain data", 0o644);
    fs::hard_link(root.join("chain/a"), root.join("chain/b")).expect("link");
    fs::hard_link(root.join("chain/b"), root.join("chain/c")).expect("link");
    d("links");
    let sl = |target: &str, name: &str| {
        std::os::unix::fs::symlink(target, root.join(name)).expect("symlink")
    };
    sl("../dir0755/small.txt", "links/rel");
    sl("/etc/passwd", "links/abs");
    sl("nowhere/none", "links/dangling");
    sl("../dir0755", "links/dirlink");
    sl("../../../../../../etc/shadow", "links/escape");
    d("dev");
    let node = |name: &str, ft: rustix::fs::FileType, mode: u32, dev: u64| {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join(name),
            ft,
            rustix::fs::Mode::from_raw_mode(mode),
            dev,
        )
        .expect("mknod");
        chmod(&root.join(name), mode);
    };
    node(
        "dev/null",
        rustix::fs::FileType::CharacterDevice,
        0o666,
        rustix::fs::makedev(1, 3),
    );
    node(
        "dev/loop0",
        rustix::fs::FileType::BlockDevice,
        0o660,
        rustix::fs::makedev(7, 0),
    );
    node("dev/fifo", rustix::fs::FileType::Fifo, 0o600, 0);
    d("ro0500");
    f("ro0500/inner.txt", b"in a read-only dir", 0o644);
    d("noperm0000/sub");
    f("noperm0000/sub/inner.txt", b"in a 0000 dir", 0o600);
    d("wx0300");
    f("wx0300/f", b"write-only dir", 0o644);
    d("sticky");
    d("setgid-dir");
    d("owned");
    let o = f("owned/file", b"owned", 0o644);
    lchown(&o, 1000, 2000);
    lchown(&root.join("owned"), 65534, 65534);
    lchown(&root.join("links/rel"), 1000, 1000);
    d("utf8");
    f("utf8/héllo wörld ✓.txt", b"unicode", 0o644);
    f("utf8/name with spaces", b"spaces", 0o644);
    let long_dir = format!("long/{}", "d".repeat(60));
    d(&long_dir);
    f(
        &format!("{long_dir}/{}", "f".repeat(80)),
        b"prefix split",
        0o644,
    );
    if extended {
        d("ext");
        // A link target over 100 bytes: GNU 'K' headers or PAX linkpath.
        sl(&format!("../{}/target", "t".repeat(120)), "ext/long-link");
        f(
            &format!("ext/{}", "n".repeat(200)),
            b"long component",
            0o644,
        );
        let big = f("ext/biguid", b"big ids", 0o644);
        lchown(&big, 3_000_000, 4_000_000);
        let x = f("ext/xattrs", b"with xattrs", 0o755);
        rustix::fs::setxattr(
            &x,
            "user.test",
            b"value\0with nul",
            rustix::fs::XattrFlags::empty(),
        )
        .expect("xattr");
        rustix::fs::setxattr(&x, "trusted.t", b"tv", rustix::fs::XattrFlags::empty())
            .expect("xattr");
        // An empty value is a value: restored as such by GNU tar.
        rustix::fs::setxattr(&x, "user.empty", b"", rustix::fs::XattrFlags::empty())
            .expect("xattr");
        // cap_net_raw+p, VFS_CAP_REVISION_2.
        let cap = [
            0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        rustix::fs::setxattr(
            &x,
            "security.capability",
            &cap,
            rustix::fs::XattrFlags::empty(),
        )
        .expect("xattr");
        rustix::fs::setxattr(
            root.join("ext"),
            "user.dir",
            b"d",
            rustix::fs::XattrFlags::empty(),
        )
        .expect("xattr");
    }
    // Times last, deepest first, then modes of directories (a 0000 or 0500
    // directory must still have been writable above).
    let mut all = Vec::new();
    walk(root, root, &mut all);
    all.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count() + usize::from(!p.is_empty())));
    for (i, rel) in all.iter().enumerate() {
        if rel.is_empty() {
            continue;
        }
        let p = root.join(rel);
        set_mtime(
            &p,
            1_500_000_000 + i as i64 * 3600,
            (i as i64 * 123_456_789) % 1_000_000_000,
        );
    }
    for (rel, mode) in [
        ("sticky", 0o1777),
        ("setgid-dir", 0o2755),
        ("ro0500", 0o500),
        ("noperm0000/sub", 0o000),
        ("noperm0000", 0o000),
        ("wx0300", 0o300),
    ] {
        let p = root.join(rel);
        let md = fs::symlink_metadata(&p).expect("lstat");
        chmod(&p, mode);
        set_mtime(&p, md.mtime(), md.mtime_nsec());
    }
}

/// Writes OCI image layouts for tests: blobs by digest, configs,
/// manifests and an index, with any media types (hostile ones included).
pub struct LayoutBuilder {
    /// The layout directory.
    pub dir: PathBuf,
    manifests: Vec<serde_json::Value>,
}

impl LayoutBuilder {
    /// An empty layout at `dir`.
    pub fn new(dir: &Path) -> LayoutBuilder {
        fs::create_dir_all(dir.join("blobs/sha256")).expect("mkdir");
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("write");
        LayoutBuilder {
            dir: dir.to_path_buf(),
            manifests: Vec::new(),
        }
    }

    /// Stores a blob; returns (digest, size).
    pub fn blob(&self, data: &[u8]) -> (String, u64) {
        let d = sha256(data);
        fs::write(self.dir.join("blobs/sha256").join(&d[7..]), data).expect("write blob");
        (d, data.len() as u64)
    }

    /// Stores a config for `platform` ("os/arch[/variant]") with these diff
    /// IDs and a manifest for these layer blobs (media type, data); returns
    /// the manifest's descriptor (not yet in the index).
    pub fn image(
        &self,
        platform: &str,
        diff_ids: &[String],
        layers: &[(&str, &[u8])],
        docker: bool,
    ) -> serde_json::Value {
        let p: Vec<&str> = platform.split('/').collect();
        let mut cfg = serde_json::json!({
            "os": p[0], "architecture": p[1],
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        if let Some(v) = p.get(2) {
            cfg["variant"] = serde_json::json!(v);
        }
        let (cd, cs) = self.blob(cfg.to_string().as_bytes());
        let (mt, ct) = if docker {
            (
                "application/vnd.docker.distribution.manifest.v2+json",
                "application/vnd.docker.container.image.v1+json",
            )
        } else {
            (
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.oci.image.config.v1+json",
            )
        };
        let layers: Vec<serde_json::Value> = layers
            .iter()
            .map(|(t, data)| {
                let (d, s) = self.blob(data);
                serde_json::json!({"mediaType": t, "digest": d, "size": s})
            })
            .collect();
        let m = serde_json::json!({
            "schemaVersion": 2, "mediaType": mt,
            "config": {"mediaType": ct, "digest": cd, "size": cs},
            "layers": layers,
        });
        let (md, ms) = self.blob(m.to_string().as_bytes());
        let mut desc = serde_json::json!({"mediaType": mt, "digest": md, "size": ms});
        let mut plat = serde_json::json!({"os": p[0], "architecture": p[1]});
        if let Some(v) = p.get(2) {
            plat["variant"] = serde_json::json!(v);
        }
        desc["platform"] = plat;
        desc
    }

    /// Adds a descriptor to the top-level index, with a tag if given.
    pub fn add(&mut self, mut desc: serde_json::Value, tag: Option<&str>) -> &mut Self {
        if let Some(t) = tag {
            desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": t});
        }
        self.manifests.push(desc);
        self
    }

    /// Writes index.json.
    pub fn finish(&self) {
        let idx = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": self.manifests,
        });
        fs::write(self.dir.join("index.json"), idx.to_string()).expect("write index");
    }
}

/// OCI media type of a gzip layer.
pub const MT_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI media type of a zstd layer.
pub const MT_ZST: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// OCI media type of an uncompressed layer.
pub const MT_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// A layer for [`image_layout`]: its uncompressed tar and media type
/// (which decides the compression).
pub struct TestLayer {
    /// The uncompressed tar.
    pub tar: Vec<u8>,
    /// One of [`MT_GZ`], [`MT_ZST`], [`MT_TAR`].
    pub media_type: &'static str,
}

/// A layer of `n` files of `size` noise bytes each in directories of 100
/// (names and contents from `seed`): slow enough to apply to be caught
/// in the middle, which the dedup and signal tests need.
pub fn many_files(n: usize, size: usize, seed: u64, media_type: &'static str) -> TestLayer {
    let mut t = RawTar::default();
    t.dir("./");
    for d in 0..n.div_ceil(100) {
        t.dir(&format!("s{seed}-d{d}/"));
    }
    for i in 0..n {
        t.file(
            &format!("s{seed}-d{}/f{i}", i / 100),
            &noise(size, seed * 1_000_000 + i as u64),
        );
    }
    t.end();
    TestLayer {
        tar: t.bytes(),
        media_type,
    }
}

impl TestLayer {
    /// The blob as stored.
    pub fn blob(&self) -> Vec<u8> {
        match self.media_type {
            MT_GZ => gzip_members(&self.tar, 1),
            MT_ZST => zstd_frames(&self.tar, 1),
            _ => self.tar.clone(),
        }
    }

    /// The diff ID.
    pub fn diff_id(&self) -> String {
        sha256(&self.tar)
    }
}

/// A GNU tar (posix, xattrs) of a directory tree, as a layer.
pub fn tar_of(src: &Path, media_type: &'static str) -> TestLayer {
    let out = src.with_extension("tar");
    gnu_tar(src, &out, "posix", &[]);
    TestLayer {
        tar: fs::read(&out).expect("read tar"),
        media_type,
    }
}

/// Writes an OCI layout at `dir` holding one linux/amd64 image per
/// `(tag, layers)`; returns each image's chain IDs.
pub fn image_layout(dir: &Path, images: &[(&str, &[&TestLayer])]) -> Vec<Vec<String>> {
    let mut b = LayoutBuilder::new(dir);
    let mut chains = Vec::new();
    for (tag, layers) in images {
        let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id()).collect();
        let blobs: Vec<Vec<u8>> = layers.iter().map(|l| l.blob()).collect();
        let descs: Vec<(&str, &[u8])> = layers
            .iter()
            .zip(&blobs)
            .map(|(l, b)| (l.media_type, b.as_slice()))
            .collect();
        let desc = b.image("linux/amd64", &diff_ids, &descs, false);
        b.add(desc, Some(tag));
        chains.push(chain_ids_of(&diff_ids));
    }
    b.finish();
    chains
}

/// Chain IDs as the OCI image spec defines them, computed here
/// independently of the engine.
pub fn chain_ids_of(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => sha256(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

fn set_times_of(p: &Path, md: &fs::Metadata) {
    use rustix::fs::{Timespec, Timestamps};
    let ts = Timestamps {
        last_access: Timespec {
            tv_sec: md.atime(),
            tv_nsec: md.atime_nsec() as _,
        },
        last_modification: Timespec {
            tv_sec: md.mtime(),
            tv_nsec: md.mtime_nsec() as _,
        },
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &ts,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .expect("utimensat");
}

/// Removes `p` (anything) keeping its parent's times.
fn remove_keeping_parent_times(p: &Path) {
    let parent = p.parent().expect("parent");
    let Ok(pmd) = fs::symlink_metadata(parent) else {
        return;
    };
    match fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => fs::remove_dir_all(p).expect("rm -r"),
        Ok(_) => fs::remove_file(p).expect("rm"),
        Err(_) => return,
    }
    set_times_of(parent, &pmd);
}

/// The tree a sequential unpacker gives for `layers` applied in order:
/// each layer's OCI whiteouts remove what the layers below put there, then
/// GNU tar extracts the layer over the result (hard links to lower files
/// work because everything is one directory). An expectation computed
/// without the engine.
pub fn expected_merge(layers: &[&TestLayer], work: &Path) -> Tree {
    let merged = work.join("expected");
    fs::create_dir_all(&merged).expect("mkdir");
    for (i, l) in layers.iter().enumerate() {
        let f = work.join(format!("expected-layer{i}.tar"));
        fs::write(&f, &l.tar).expect("write");
        let list = sh(Command::new("tar").arg("-tf").arg(&f));
        let names: Vec<String> = String::from_utf8_lossy(&list.stdout)
            .lines()
            .map(|n| n.trim_start_matches("./").trim_end_matches('/').to_string())
            .filter(|n| !n.is_empty() && n != ".")
            .collect();
        let whiteouts: Vec<&String> = names
            .iter()
            .filter(|n| n.rsplit('/').next().is_some_and(|b| b.starts_with(".wh.")))
            .collect();
        for n in &whiteouts {
            let (dir, base) = n.rsplit_once('/').unwrap_or(("", n.as_str()));
            let dir = merged.join(dir);
            if base == ".wh..wh..opq" {
                if let Ok(rd) = fs::read_dir(&dir) {
                    for e in rd.flatten() {
                        remove_keeping_parent_times(&e.path());
                    }
                }
            } else {
                remove_keeping_parent_times(&dir.join(&base[4..]));
            }
        }
        gnu_extract(&f, &merged);
        for n in &whiteouts {
            remove_keeping_parent_times(&merged.join(n));
        }
    }
    snapshot(&merged)
}

/// Runs `unlade unpack LAYOUT_REF --root ROOT` plus `extra`.
pub fn unpack(layout_ref: &str, root: &Path, extra: &[&str]) -> Output {
    Command::new(bin())
        .arg("unpack")
        .arg(layout_ref)
        .arg("--root")
        .arg(root)
        .args(extra)
        .output()
        .expect("run unlade unpack")
}

/// The last stdout line of a successful command.
pub fn last_line(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

/// Mounts `chain` of `root` read-only with the command `unlade mounts`
/// prints (`mount …`, or `cd ROOT/snapshots/l && mount …` for many
/// layers), snapshots the merged tree, and unmounts.
pub fn mounted_tree(root: &Path, chain: &str, work: &Path) -> Tree {
    let target = work.join(format!("mnt-{}", &chain[7..19]));
    fs::create_dir_all(&target).expect("mkdir");
    let out = Command::new(bin())
        .arg("mounts")
        .arg(&target)
        .arg(chain)
        .arg("--root")
        .arg(root)
        .output()
        .expect("run unlade mounts");
    let line = last_line(&out);
    assert!(
        line.starts_with("mount ") || line.starts_with("cd "),
        "{line}"
    );
    sh(Command::new("sh").arg("-c").arg(&line));
    let tree = snapshot(&target);
    sh(Command::new("umount").arg(&target));
    tree
}
