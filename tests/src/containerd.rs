//! A real containerd for the snapshotter tests: Debian's `containerd`
//! (1.6) on its own root, state and socket, with unlade's server beside it
//! as the proxy snapshot plugin `unlade`, both killed by PID when dropped.
//! CRI is off unless asked for (it wants a CNI set-up the image pulls do
//! not need).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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

fn wait_for(mut ready: impl FnMut() -> bool, log: impl Fn() -> String) {
    let t = Instant::now();
    while !ready() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "did not start in 30 s:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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

/// A private containerd whose proxy plugin `unlade` is a [`Server`].
pub struct Containerd {
    /// Scratch: config, root, state, sockets, logs.
    pub dir: tempfile::TempDir,
    /// containerd's socket.
    pub sock: PathBuf,
    /// unlade's server.
    pub unlade: Server,
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
        let unlade = Server::start_with(root, &usock, args);
        let sock = d.join("containerd.sock");
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
        std::fs::write(d.join("config.toml"), config).expect("write config");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("containerd.log")).expect("log"))
            .spawn()
            .expect("start containerd");
        let c = Containerd {
            sock,
            unlade,
            child,
            dir,
        };
        wait_for(
            || {
                c.sock.exists()
                    && Command::new("ctr")
                        .arg("-a")
                        .arg(&c.sock)
                        .arg("version")
                        .output()
                        .is_ok_and(|o| o.status.success())
            },
            || c.log(),
        );
        c
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

    /// Runs `ctr -a SOCK ARGS…`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
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
            tail(&self.log()),
            tail(&self.unlade.log())
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
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
