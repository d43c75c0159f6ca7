//! A real containerd for the snapshotter tests: Debian's `containerd`
//! (1.6) on its own root, state and socket, with unlade's server beside it
//! as the proxy snapshot plugin `unlade`, both killed by PID when dropped.
//! CRI is off unless asked for (it wants a CNI set-up the image pulls do
//! not need).
//!
//! [`Containerd::start_version`] runs any of the [`Version`]s instead
//! (1.6, 1.7, 2.1 in either CRI pull mode), with CRI on and configured by
//! what `unlade containerd-config` prints for it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use crate::{bin, tmp};

/// unlade's `snapshotter` server on a root and socket.
pub struct Server {
    /// The unlade root.
    pub root: PathBuf,
    /// Its socket.
    pub sock: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Server {
    /// Starts `unlade snapshotter --root ROOT --address SOCK` and waits
    /// until it answers.
    pub fn start(root: &Path, sock: &Path) -> Server {
        Server::start_with(root, sock, &[])
    }

    /// [`Server::start`] with more arguments (`--plain-http`); its log is
    /// appended to, so a restarted server's follows the first's.
    pub fn start_with(root: &Path, sock: &Path, args: &[&str]) -> Server {
        Server::spawn(root, sock, args, None)
    }

    /// [`Server::start_with`] in a process whose umask is `umask`.
    pub fn start_in_umask(root: &Path, sock: &Path, args: &[&str], umask: u32) -> Server {
        Server::spawn(root, sock, args, Some(umask))
    }

    fn spawn(root: &Path, sock: &Path, args: &[&str], umask: Option<u32>) -> Server {
        // Beside the socket, unless the server is to make its directory.
        let log = if sock.parent().is_some_and(Path::is_dir) {
            sock.with_extension("log")
        } else {
            root.with_extension("log")
        };
        let mut cmd = match umask {
            None => Command::new(bin()),
            Some(m) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("umask {m:03o}; exec \"$0\" \"$@\""))
                    .arg(bin());
                c
            }
        };
        let child = cmd
            .arg("--root")
            .arg(root)
            .arg("snapshotter")
            .arg("--address")
            .arg(sock)
            .args(args)
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .expect("log file"),
            )
            .spawn()
            .expect("start unlade snapshotter");
        let s = Server {
            root: root.to_path_buf(),
            sock: sock.to_path_buf(),
            child: Some(child),
            log,
        };
        wait_for(
            || std::os::unix::net::UnixStream::connect(sock).is_ok(),
            || s.log(),
        );
        s
    }

    /// What the server wrote to stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills it with SIGKILL (as a crash would) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops it with SIGTERM and returns its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&c),
            rustix::process::Signal::TERM,
        )
        .expect("kill -TERM");
        c.wait().expect("wait")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        // The overlays it mounted for active snapshots stay mounted when
        // it dies (as containers need); a test's are detached here, or
        // they would pile up in the host's mount table.
        if let Ok(rd) = std::fs::read_dir(self.root.join("containerd/mnt")) {
            for e in rd.flatten() {
                let _ = rustix::mount::unmount(e.path(), rustix::mount::UnmountFlags::DETACH);
            }
        }
    }
}

fn wait_for(ready: impl FnMut() -> bool, log: impl Fn() -> String) {
    crate::wait_until(ready, || format!("it did not start:\n{}", log()));
}

/// containerd's CRI configuration for pulls from a plain-HTTP registry at
/// `addr` (127.0.0.1:PORT) into snapshotter `unlade`, with the snapshot
/// labels the fast path reads turned on (1.6 has them off by default).
pub fn cri_config(addr: &str) -> String {
    format!(
        "[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"unlade\"\n  \
         disable_snapshot_annotations = false\n\
         [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{addr}\"]\n  \
         endpoint = [\"http://{addr}\"]\n"
    )
}

/// A containerd release the tests run, and how its CRI pulls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// The system's (Debian bookworm's 1.6), found in PATH.
    V1_6,
    /// Debian trixie's 1.7, from `scripts/containerd-peers.sh`.
    V1_7,
    /// Debian sid's 2.1, CRI pulling through the transfer service.
    V2_1Transfer,
    /// Debian sid's 2.1, CRI pulling locally (`use_local_image_pull`).
    V2_1Local,
}

impl Version {
    /// The directory of its `containerd`, `ctr` and shim: `None` for the
    /// system's, found in PATH; the peers' under `$UNLADE_PEERS` (default
    /// `/opt/unlade-peers`).
    pub fn bin_dir(self) -> Option<PathBuf> {
        let peers = std::env::var_os("UNLADE_PEERS").unwrap_or_else(|| "/opt/unlade-peers".into());
        let suite = match self {
            Version::V1_6 => return None,
            Version::V1_7 => "trixie",
            Version::V2_1Transfer | Version::V2_1Local => "sid",
        };
        Some(Path::new(&peers).join(suite).join("usr/bin"))
    }

    /// Its binary `name` (`containerd`, `ctr`).
    pub fn bin(self, name: &str) -> PathBuf {
        match self.bin_dir() {
            None => PathBuf::from(name),
            Some(d) => {
                let p = d.join(name);
                assert!(
                    p.exists(),
                    "{} is missing: run scripts/containerd-peers.sh (as root)",
                    p.display()
                );
                p
            }
        }
    }

    /// The PATH it runs with: its own directory first (so that its shim
    /// starts the containers), then the system's, where runc is
    /// (`/usr/sbin`).
    pub fn path_env(self) -> OsString {
        let system = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs: Vec<PathBuf> = self.bin_dir().into_iter().collect();
        dirs.extend(std::env::split_paths(&system));
        for d in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
            if !dirs.iter().any(|x| x == Path::new(d)) {
                dirs.push(d.into());
            }
        }
        std::env::join_paths(dirs).expect("PATH")
    }

    /// Its major version.
    pub fn major(self) -> u32 {
        match self {
            Version::V1_6 | Version::V1_7 => 1,
            Version::V2_1Transfer | Version::V2_1Local => 2,
        }
    }

    /// `unlade containerd-config --pull-mode`, where one is asked for.
    fn pull_mode(self) -> Option<&'static str> {
        match self {
            Version::V2_1Transfer => Some("transfer"),
            Version::V2_1Local => Some("local"),
            Version::V1_6 | Version::V1_7 => None,
        }
    }

    /// The table of its CRI configuration that holds `registry`.
    fn cri_images_table(self) -> &'static str {
        match self.major() {
            1 => "plugins.\"io.containerd.grpc.v1.cri\"",
            _ => "plugins.'io.containerd.cri.v1.images'",
        }
    }
}

/// Writes `DIR/ADDR/hosts.toml` (containerd's `config_path` layout, and
/// `unlade snapshotter --hosts-dir`'s): registry `addr` (127.0.0.1:PORT)
/// over plain HTTP.
pub fn write_plain_http_hosts(dir: &Path, addr: &str) {
    let d = dir.join(addr);
    std::fs::create_dir_all(&d).expect("mkdir hosts dir");
    std::fs::write(
        d.join("hosts.toml"),
        format!(
            "server = \"http://{addr}\"\n\n[host.\"http://{addr}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .expect("write hosts.toml");
}

/// How [`Containerd::start_version`] sets things up beyond its version.
#[derive(Default)]
pub struct Options {
    /// More arguments of `unlade snapshotter`.
    pub server_args: Vec<String>,
    /// Registries (127.0.0.1:PORT) containerd reaches over plain HTTP, each
    /// by a `hosts.toml` in CRI's `registry.config_path` (which, unlike
    /// `registry.mirrors`, keeps containerd 2.1 in transfer mode).
    pub plain_http: Vec<String>,
    /// containerd's root (default: `root` in its scratch directory).
    pub containerd_root: Option<PathBuf>,
    /// unlade also serves its CRI proxy, forwarding to containerd, at
    /// [`Containerd::cri_proxy`].
    pub cri_proxy: bool,
}

/// A private containerd whose proxy plugin `unlade` is a [`Server`].
pub struct Containerd {
    /// Scratch: config, root, state, sockets, logs.
    pub dir: tempfile::TempDir,
    /// containerd's socket.
    pub sock: PathBuf,
    /// unlade's server.
    pub unlade: Server,
    /// Which containerd runs.
    pub version: Version,
    /// containerd's root.
    pub root: PathBuf,
    /// What `unlade containerd-config` printed for it (empty for
    /// [`Containerd::start`]'s hand-written configuration).
    pub snippet: String,
    child: Child,
}

impl Containerd {
    /// Starts unlade's server on `root` and a containerd using it;
    /// `extra` is more of containerd's TOML config.
    pub fn start(root: &Path, extra: &str) -> Containerd {
        Containerd::start_with(root, extra, &[])
    }

    /// [`Containerd::start`], the server started with `args`.
    pub fn start_with(root: &Path, extra: &str, args: &[&str]) -> Containerd {
        let dir = tmp();
        let d = dir.path();
        let usock = d.join("unlade.sock");
        let sock = d.join("containerd.sock");
        let mut args = args.to_vec();
        args.extend_from_slice(&["--containerd-address", sock.to_str().expect("UTF-8")]);
        let unlade = Server::start_with(root, &usock, &args);
        let cri = if extra.contains("io.containerd.grpc.v1.cri") {
            String::new()
        } else {
            "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n".to_string()
        };
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n{cri}[grpc]\n  address = \"{sock}\"\n\
             [proxy_plugins.unlade]\n  type = \"snapshot\"\n  address = \"{usock}\"\n{extra}\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = sock.display(),
            usock = usock.display(),
        );
        let croot = d.join("root");
        Containerd::launch(
            Version::V1_6,
            dir,
            sock,
            unlade,
            croot,
            config,
            String::new(),
        )
    }

    /// Starts unlade's server on `root` and containerd `version` using it
    /// as CRI's snapshotter, configured by what `unlade containerd-config
    /// --containerd BIN [--pull-mode M] --address SOCK --root ROOT` prints
    /// for the binary (its version detected, and checked here), plus its
    /// own root, state and socket, its log at debug level, NRI off (its
    /// socket is one per host), and registry `hosts.toml`s for
    /// `opts.plain_http`.
    pub fn start_version(version: Version, root: &Path, opts: &Options) -> Containerd {
        let dir = tmp();
        let d = dir.path();
        let usock = d.join("unlade.sock");
        let sock = d.join("containerd.sock");
        let mut args: Vec<&str> = opts.server_args.iter().map(String::as_str).collect();
        // The proxy dials containerd's socket when a call first comes, and
        // so does the blob hand-off.
        let (proxy, upstream) = (d.join("cri-proxy.sock"), sock.clone());
        if !args.contains(&"--containerd-address") {
            args.extend_from_slice(&["--containerd-address", upstream.to_str().expect("UTF-8")]);
        }
        if opts.cri_proxy {
            args.extend_from_slice(&[
                "--cri-listen",
                proxy.to_str().expect("UTF-8"),
                "--cri-upstream",
                upstream.to_str().expect("UTF-8"),
            ]);
        }
        let unlade = Server::start_with(root, &usock, &args);
        let croot = opts
            .containerd_root
            .clone()
            .unwrap_or_else(|| d.join("root"));
        let mut cmd = Command::new(bin());
        cmd.arg("containerd-config")
            .arg("--containerd")
            .arg(version.bin("containerd"))
            .arg("--address")
            .arg(&usock)
            .arg("--root")
            .arg(root)
            .arg("--containerd-root")
            .arg(&croot)
            .env("PATH", version.path_env());
        if let Some(m) = version.pull_mode() {
            cmd.args(["--pull-mode", m]);
        }
        let snippet = String::from_utf8(crate::sh(&mut cmd).stdout).expect("UTF-8");
        let head = snippet.lines().next().unwrap_or("");
        assert!(
            head.starts_with(&format!("# unlade as containerd {}.", version.major())),
            "{version:?}, but unlade containerd-config says:\n{snippet}"
        );
        let hosts = d.join("certs.d");
        std::fs::create_dir_all(&hosts).expect("mkdir certs.d");
        for addr in &opts.plain_http {
            write_plain_http_hosts(&hosts, addr);
        }
        let q = |p: &Path| format!("{:?}", p.to_str().expect("UTF-8 path"));
        let config = format!(
            "version = {v}\nroot = {root}\nstate = {state}\n[grpc]\n  address = {sock}\n\
             [debug]\n  level = \"debug\"\n\
             [plugins.'io.containerd.internal.v1.opt']\n  path = {opt}\n{nri}\
             {snippet}\n[{cri}.registry]\n  config_path = {hosts}\n",
            v = if version.major() == 1 { 2 } else { 3 },
            root = q(&croot),
            state = q(&d.join("state")),
            sock = q(&sock),
            opt = q(&d.join("opt")),
            nri = if version.major() >= 2 {
                "[plugins.'io.containerd.nri.v1.nri']\n  disable = true\n"
            } else {
                ""
            },
            cri = version.cri_images_table(),
            hosts = q(&hosts),
        );
        Containerd::launch(version, dir, sock, unlade, croot, config, snippet)
    }

    /// Writes `config`, starts containerd `version` on it and waits until
    /// it answers.
    fn launch(
        version: Version,
        dir: tempfile::TempDir,
        sock: PathBuf,
        unlade: Server,
        root: PathBuf,
        config: String,
        snippet: String,
    ) -> Containerd {
        let d = dir.path();
        std::fs::write(d.join("config.toml"), config).expect("write config");
        let child = Command::new(version.bin("containerd"))
            .env("PATH", version.path_env())
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("containerd.log")).expect("log"))
            .spawn()
            .expect("start containerd");
        let c = Containerd {
            sock,
            unlade,
            version,
            root,
            snippet,
            child,
            dir,
        };
        wait_for(
            || c.sock.exists() && c.ctr(&["version"]).status.success(),
            || c.log(),
        );
        c
    }

    /// Waits (30 s at most) until `ctr -n NS images check` says image
    /// `reference` is complete: every blob in containerd's content store.
    pub fn wait_complete(&self, ns: &str, reference: &str) {
        let check = || self.ctr_ok(&["-n", ns, "images", "check"]);
        crate::wait_until(
            || {
                check()
                    .lines()
                    .find(|l| l.split_whitespace().next() == Some(reference))
                    .is_some_and(|l| l.contains(" complete ("))
            },
            || {
                format!(
                    "{reference} complete in {ns}:\n{}\nunlade:\n{}",
                    check(),
                    tail(&self.unlade.log(), 30)
                )
            },
        );
    }

    /// containerd's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Runs `perf/cri_pull.py`: `n` concurrent CRI PullImage calls of
    /// `reference` (Debian's python3 with python3-grpcio).
    pub fn cri_pull(&self, reference: &str, n: usize) -> Output {
        self.cri_pull_cmd(reference, n)
            .output()
            .expect("run cri_pull.py")
    }

    /// unlade's CRI proxy socket (there when started with
    /// [`Options::cri_proxy`]).
    pub fn cri_proxy(&self) -> PathBuf {
        self.dir.path().join("cri-proxy.sock")
    }

    /// One CRI PullImage of `reference` on socket `sock` (containerd's, or
    /// unlade's proxy), with `auth` (user, password) in its `auth` as
    /// kubelet sends a pod's pull secret.
    pub fn cri_pull_on(&self, sock: &Path, reference: &str, auth: Option<(&str, &str)>) -> Output {
        let mut c = Command::new("/usr/bin/python3");
        c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../perf/cri_pull.py"))
            .arg(sock)
            .arg(reference)
            .arg("1");
        if let Some((u, p)) = auth {
            c.env("CRI_PULL_AUTH", format!("{u}:{p}"));
        }
        c.output().expect("run cri_pull.py")
    }

    /// The command [`Containerd::cri_pull`] runs, to start it in the
    /// background.
    pub fn cri_pull_cmd(&self, reference: &str, n: usize) -> Command {
        let mut c = Command::new("/usr/bin/python3");
        c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../perf/cri_pull.py"))
            .arg(&self.sock)
            .arg(reference)
            .arg(n.to_string());
        c
    }

    /// Runs `tests/tools/cri_call.py SOCK imagefsinfo`: the image file
    /// systems CRI reports to kubelet, (mountpoint, used bytes).
    pub fn image_fs_info(&self) -> Vec<(PathBuf, u64)> {
        self.image_fs_info_on(&self.sock, "v1")
    }

    /// [`Containerd::image_fs_info`] on socket `sock` (containerd's, or
    /// unlade's proxy), by CRI API `api` (`v1`, `v1alpha2`).
    pub fn image_fs_info_on(&self, sock: &Path, api: &str) -> Vec<(PathBuf, u64)> {
        let out = crate::sh(
            Command::new("/usr/bin/python3")
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/cri_call.py"))
                .arg(sock)
                .arg("imagefsinfo")
                .arg(api),
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                let mut w = l.split('\t');
                let mount = PathBuf::from(w.next().expect("mountpoint"));
                let used = w.next().and_then(|u| u.parse().ok()).expect("used bytes");
                (mount, used)
            })
            .collect()
    }

    /// Runs `ctr -a SOCK ARGS…` (this version's ctr).
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new(self.version.bin("ctr"))
            .env("PATH", self.version.path_env())
            .arg("-a")
            .arg(&self.sock)
            .args(args)
            .output()
            .expect("run ctr")
    }

    /// Runs `ctr` and returns its stdout, failing the test (with both logs)
    /// if it fails.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed: {}\n--- containerd:\n{}\n--- unlade:\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 30),
            tail(&self.unlade.log(), 30)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ctr images import` of the bundled demo image (its layout tarred in
    /// the scratch directory) into snapshotter `unlade`, as
    /// `docker.io/unlade/demo:latest`.
    pub fn import_demo(&self) {
        let tar = self.dir.path().join("demo.tar");
        crate::sh(
            Command::new("tar")
                .arg("-C")
                .arg(crate::registry::demo_layout())
                .arg("-cf")
                .arg(&tar)
                .arg("."),
        );
        self.ctr_ok(&[
            "images",
            "import",
            "--snapshotter",
            "unlade",
            "--base-name",
            "docker.io/unlade/demo",
            tar.to_str().expect("utf8"),
        ]);
    }

    /// `n` concurrent CRI pulls of `reference`, which must all succeed
    /// (failing the test with both logs).
    pub fn cri_pull_ok(&self, reference: &str, n: usize) {
        let out = self.cri_pull(reference, n);
        assert!(
            out.status.success(),
            "{:?}: CRI pull of {reference}: {}\n--- unlade:\n{}\n--- containerd:\n{}",
            self.version,
            String::from_utf8_lossy(&out.stderr),
            self.unlade.log(),
            tail(&self.log(), 60)
        );
    }

    /// Waits (up to 30 s) for containerd's asynchronous garbage collection
    /// to leave `n` snapshots in unlade root `root`.
    pub fn wait_on_disk(&self, root: &Path, n: usize) {
        crate::wait_until(
            || on_disk(root) == n,
            || {
                format!(
                    "{:?}: {} snapshots on disk, not {n}\n{}",
                    self.version,
                    on_disk(root),
                    self.ctr_ok(&["-n", "k8s.io", "snapshots", "--snapshotter", "unlade", "ls"])
                )
            },
        );
    }
}

/// How many of the blobs `digests` unlade root `root` keeps in its
/// content store.
pub fn blobs_kept<'a>(root: &Path, digests: impl IntoIterator<Item = &'a str>) -> usize {
    digests
        .into_iter()
        .filter(|d| {
            root.join("content/blobs/sha256")
                .join(d.trim_start_matches("sha256:"))
                .exists()
        })
        .count()
}

/// The directories of containerd's snapshots in unlade root `root`.
pub fn on_disk(root: &Path) -> usize {
    std::fs::read_dir(root.join("containerd/snapshots"))
        .expect("list")
        .count()
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.unlade.kill();
        // What the snapshotter mounted for active snapshots, and what
        // containerd left mounted in its state directory.
        for dir in [
            self.unlade.root.join("containerd/mnt"),
            self.dir.path().to_path_buf(),
        ] {
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "grep -o ' {}[^ ]*' /proc/self/mounts | sort -r | xargs -r -n1 umount -l",
                    dir.display()
                ))
                .status();
        }
    }
}
