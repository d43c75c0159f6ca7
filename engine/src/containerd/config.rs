//! What an operator adds to containerd's `config.toml` so that containerd
//! uses unlade, per containerd version: the configuration keys moved
//! between 1.6, 1.7 and 2.x, and a key in the wrong place may be ignored
//! without a word (containerd 2.1 even changes how CRI pulls when it
//! finds one of the old keys), so the text is generated rather than left
//! to be copied from a page written for another version.
//!
//! - [`ContainerdVersion`]: major.minor, from `containerd --version`
//!   ([`detect`]) or as an operator writes it.
//! - [`PullMode`]: how containerd 2.1's CRI pulls (transfer service or
//!   its own local pull); the keys differ.
//! - [`render`]: the TOML, with a comment header that says where it goes
//!   and what to mind, for [`ConfigOptions`].
//!
//! What each version needs:
//!
//! - every version: the proxy plugin `unlade` (`type = "snapshot"`, the
//!   socket) and CRI's snapshotter `unlade`;
//! - 1.6, 1.7, 2.0 and 2.1 in local mode: CRI's snapshot labels turned on
//!   (`disable_snapshot_annotations = false`), which the fast path reads;
//! - 1.7 and 2.x: the proxy plugin's `exports.root`, which CRI reports to
//!   kubelet as the image file system (ImageFsInfo). 1.6 reports
//!   `<containerd root>/io.containerd.snapshotter.v1.unlade` whatever the
//!   exports say, so there unlade's root belongs at that path;
//! - 2.x: the transfer service's `unpack_config`, one entry per
//!   snapshotter it may unpack into (it replaces containerd's default
//!   list, so `overlayfs` is listed again; the differ is named because
//!   more than one matches the platform); 2.1 and later also
//!   `exports.enable_remote_snapshot_annotations`, which makes the
//!   transfer service's pulls carry the labels CRI's local pull sets.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::oci::image::Platform;

/// The socket `unlade snapshotter` serves on unless `--address` says
/// otherwise: the address the configuration names by default.
pub const DEFAULT_ADDRESS: &str = "/run/unlade/snapshotter.sock";

/// containerd's own root unless its config says otherwise: where
/// containerd 1.6 tells kubelet images live.
pub const DEFAULT_CONTAINERD_ROOT: &str = "/var/lib/containerd";

/// How long [`detect`] lets `containerd --version` run.
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why no configuration could be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The containerd binary did not start.
    #[error("run {} --version", binary.display())]
    Run {
        /// The binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `containerd --version` did not finish in time (it was killed).
    #[error("{} --version did not finish within {} s", binary.display(), limit.as_secs())]
    Timeout {
        /// The binary.
        binary: PathBuf,
        /// The time it had.
        limit: Duration,
    },
    /// `containerd --version` failed.
    #[error("{} --version failed ({status}): {stderr}", binary.display())]
    Failed {
        /// The binary.
        binary: PathBuf,
        /// How it exited.
        status: ExitStatus,
        /// Its first line on stderr.
        stderr: String,
    },
    /// The output is not containerd's `--version` line.
    #[error("no containerd version in {0:?} (expected `containerd <package> <version> ...`)")]
    NoVersion(String),
    /// A version that does not read as MAJOR.MINOR[.PATCH].
    #[error("invalid containerd version {0:?}: expected MAJOR.MINOR[.PATCH], e.g. 1.7 or 2.1.9")]
    BadVersion(String),
    /// A version this configuration was not made for.
    #[error("containerd {0} is not supported: unlade configures containerd 1.6, 1.7 and 2.x")]
    Unsupported(ContainerdVersion),
    /// A pull mode the version does not have.
    #[error(
        "containerd {version}'s CRI pulls only locally: the transfer pull mode needs containerd 2.1 or later"
    )]
    NoTransferPull {
        /// The version.
        version: ContainerdVersion,
    },
    /// A path containerd could not be given.
    #[error("{what} {}: {why}", path.display())]
    Path {
        /// Which path (`unlade's socket`, ...).
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// A containerd release series, major.minor: what decides its
/// configuration (patch releases do not change it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerdVersion {
    /// e.g. 1 or 2.
    pub major: u32,
    /// e.g. 7.
    pub minor: u32,
}

impl ContainerdVersion {
    /// containerd 1.6 (Debian bookworm's).
    pub const V1_6: ContainerdVersion = ContainerdVersion::new(1, 6);
    /// containerd 1.7 (Debian trixie's).
    pub const V1_7: ContainerdVersion = ContainerdVersion::new(1, 7);
    /// containerd 2.0: config version 3, CRI pulls only locally.
    pub const V2_0: ContainerdVersion = ContainerdVersion::new(2, 0);
    /// containerd 2.1: CRI pulls through the transfer service by default.
    pub const V2_1: ContainerdVersion = ContainerdVersion::new(2, 1);

    /// The version `major.minor`.
    pub const fn new(major: u32, minor: u32) -> ContainerdVersion {
        ContainerdVersion { major, minor }
    }

    /// The version in `containerd --version`'s output, e.g. `containerd
    /// github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6` or
    /// `containerd github.com/containerd/containerd/v2 2.1.9+unknown`:
    /// the first word after `containerd` that reads as a version.
    pub fn from_version_output(output: &str) -> Result<ContainerdVersion, ConfigError> {
        let line = output.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        let mut words = line.split_whitespace();
        if words.next() != Some("containerd") {
            return Err(ConfigError::NoVersion(first_chars(line)));
        }
        words
            .find_map(|w| w.parse().ok())
            .ok_or_else(|| ConfigError::NoVersion(first_chars(line)))
    }

    /// Whether unlade's configuration is made for it: 1.6, 1.7, 2.x.
    pub fn is_supported(self) -> bool {
        self >= Self::V1_6 && self.major <= 2
    }

    /// The `version` of the config.toml it reads natively (2 for 1.x, 3
    /// for 2.x), in which [`render`]'s table names are written.
    pub fn config_version(self) -> u32 {
        if self.major >= 2 {
            3
        } else {
            2
        }
    }

    /// How its CRI pulls unless configured otherwise: through the
    /// transfer service from 2.1, locally before.
    pub fn default_pull_mode(self) -> PullMode {
        if self >= Self::V2_1 {
            PullMode::Transfer
        } else {
            PullMode::Local
        }
    }
}

/// The first 120 characters of `s`, for an error.
fn first_chars(s: &str) -> String {
    s.chars().take(120).collect()
}

impl std::str::FromStr for ContainerdVersion {
    type Err = ConfigError;

    /// `MAJOR.MINOR[.PATCH]`, with an optional leading `v` and anything
    /// after the numbers (`~ds1`, `+unknown`, `-rc.1`) ignored.
    fn from_str(s: &str) -> Result<ContainerdVersion, ConfigError> {
        let bad = || ConfigError::BadVersion(first_chars(s));
        let t = s.strip_prefix('v').unwrap_or(s);
        let end = t
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(t.len());
        let mut parts = t[..end].split('.');
        let mut number = || -> Result<u32, ConfigError> {
            match parts.next() {
                Some(p) if !p.is_empty() => p.parse().map_err(|_| bad()),
                _ => Err(bad()),
            }
        };
        let v = ContainerdVersion::new(number()?, number()?);
        // A patch number, if any; nothing else after it.
        match (parts.next(), parts.next()) {
            (None, _) => Ok(v),
            (Some(p), None) if !p.is_empty() && p.parse::<u32>().is_ok() => Ok(v),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for ContainerdVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// How containerd's CRI pulls an image. The snapshot labels unlade's fast
/// path reads are turned on by different keys in each mode.
///
/// With the `cli` feature it is also `unlade containerd-config
/// --pull-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum PullMode {
    /// Through containerd's transfer service (2.1's default): the labels
    /// come from the proxy plugin's `exports`, and the transfer service
    /// unpacks only into the snapshotters its `unpack_config` lists.
    Transfer,
    /// CRI's own pull, as in 1.x and 2.0 (2.1: `use_local_image_pull`):
    /// the labels come from `disable_snapshot_annotations = false`.
    Local,
}

impl std::fmt::Display for PullMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PullMode::Transfer => "transfer",
            PullMode::Local => "local",
        })
    }
}

/// What [`render`] writes a configuration for: made by
/// [`ConfigOptions::new`], which refuses what containerd could not use,
/// so that rendering cannot fail.
#[derive(Debug, Clone)]
pub struct ConfigOptions {
    version: ContainerdVersion,
    mode: PullMode,
    address: String,
    root: String,
    containerd_root: String,
    platform: Platform,
}

impl ConfigOptions {
    /// A configuration for containerd `version` and unlade serving on
    /// `address` with root `root` (both absolute: containerd resolves
    /// nothing against unlade's working directory), in the version's
    /// default [`PullMode`], containerd's root at
    /// [`DEFAULT_CONTAINERD_ROOT`] and the transfer service unpacking for
    /// the host's platform.
    pub fn new(
        version: ContainerdVersion,
        address: &Path,
        root: &Path,
    ) -> Result<ConfigOptions, ConfigError> {
        if !version.is_supported() {
            return Err(ConfigError::Unsupported(version));
        }
        Ok(ConfigOptions {
            version,
            mode: version.default_pull_mode(),
            address: absolute("unlade's socket", address)?,
            root: absolute("unlade's root", root)?,
            containerd_root: DEFAULT_CONTAINERD_ROOT.to_string(),
            platform: Platform::host(),
        })
    }

    /// CRI pulls in `mode`; [`PullMode::Transfer`] needs containerd 2.1 or
    /// later.
    pub fn pull_mode(mut self, mode: PullMode) -> Result<ConfigOptions, ConfigError> {
        if mode == PullMode::Transfer && self.version < ContainerdVersion::V2_1 {
            return Err(ConfigError::NoTransferPull {
                version: self.version,
            });
        }
        self.mode = mode;
        Ok(self)
    }

    /// containerd's root is `dir` (its config's `root`), which containerd
    /// 1.6 names to kubelet.
    pub fn containerd_root(mut self, dir: &Path) -> Result<ConfigOptions, ConfigError> {
        self.containerd_root = absolute("containerd's root", dir)?;
        Ok(self)
    }

    /// The transfer service unpacks into unlade for `platform` (default:
    /// the host's).
    pub fn platform(mut self, platform: Platform) -> ConfigOptions {
        self.platform = platform;
        self
    }

    /// The version configured.
    pub fn version(&self) -> ContainerdVersion {
        self.version
    }

    /// The pull mode configured.
    pub fn mode(&self) -> PullMode {
        self.mode
    }

    /// Where containerd 1.6 tells kubelet images live:
    /// `<containerd root>/io.containerd.snapshotter.v1.unlade`.
    pub fn fixed_image_fs(&self) -> PathBuf {
        Path::new(&self.containerd_root).join("io.containerd.snapshotter.v1.unlade")
    }
}

/// `path` as TOML can hold it: absolute and UTF-8.
fn absolute(what: &'static str, path: &Path) -> Result<String, ConfigError> {
    let err = |why| ConfigError::Path {
        what,
        path: path.to_path_buf(),
        why,
    };
    if !path.is_absolute() {
        return Err(err(
            "not absolute; containerd would resolve it against its own directory",
        ));
    }
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| err("not UTF-8, which containerd's TOML config cannot name"))
}

/// A TOML string (quoted and escaped).
fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The TOML an operator merges into containerd's `config.toml` (of the
/// `version` [`ContainerdVersion::config_version`] says) to run unlade as
/// its snapshotter for `ctr --snapshotter unlade` and for CRI: a comment
/// header (which version and pull mode, what to mind), then the tables.
/// It holds no top-level key, so it may follow the tables already there.
pub fn render(o: &ConfigOptions) -> String {
    let v = o.version;
    let v2 = v.major >= 2;
    let transfer = o.mode == PullMode::Transfer;
    let mut out = String::new();
    let mut line = |s: &str| {
        out.push_str(s);
        out.push('\n');
    };

    line(&format!(
        "# unlade as containerd {v}'s snapshotter (`unlade containerd-config`)."
    ));
    line(&format!(
        "# Merge into containerd's config.toml (`version = {}` at its top): a table",
        v.config_version()
    ));
    line("# it already has takes these keys rather than a second copy of the table.");
    line("# Then restart containerd, with unlade serving before it starts:");
    line(&format!(
        "#   unlade snapshotter --address {} --root {}",
        o.address, o.root
    ));
    line("# kubelet: --container-runtime-endpoint stays containerd's socket; for");
    line("# private images --image-service-endpoint names unlade's CRI proxy");
    line("# (README.md, \"Private images: the CRI proxy\").");
    if v2 {
        let how = match (transfer, v >= ContainerdVersion::V2_1) {
            (true, _) => "through the transfer service (containerd 2.1's default)",
            (false, true) => "locally (`use_local_image_pull`), not through the transfer service",
            (false, false) => "locally (containerd 2.0's CRI has no other way)",
        };
        line(&format!("# CRI pulls {how}."));
    }
    if transfer {
        line("# containerd 2.1 switches CRI back to local pulls, saying \"Falling back to");
        line("# local image pull mode\" in its log, when 'io.containerd.cri.v1.images'");
        line("# sets disable_snapshot_annotations, max_concurrent_downloads (other than");
        line("# 3) or registry mirrors, configs or auths: name registries with");
        line("# `[plugins.'io.containerd.cri.v1.images'.registry] config_path` instead.");
    }
    if v < ContainerdVersion::V1_7 {
        let fixed = o.fixed_image_fs();
        line(&format!(
            "# containerd {v} tells kubelet (CRI ImageFsInfo) that images live in"
        ));
        line(&format!("# {}", fixed.display()));
        if Path::new(&o.root) == fixed {
            line("# which is unlade's root: kubelet's image garbage collection measures it.");
        } else {
            line("# whatever unlade's root is: run unlade with --root there (or bind-mount");
            line("# unlade's root there), or kubelet's image garbage collection measures");
            line("# another file system. (--containerd-root names containerd's root.)");
        }
    }

    line("");
    line("[proxy_plugins.unlade]");
    line("  type = \"snapshot\"");
    line(&format!("  address = {}", quote(&o.address)));
    if v >= ContainerdVersion::V1_7 {
        // CRI reports the exported root as the image file system; the
        // transfer service copies the exports into its unpacks.
        line("  [proxy_plugins.unlade.exports]");
        line(&format!("    root = {}", quote(&o.root)));
        if v >= ContainerdVersion::V2_1 {
            line("    enable_remote_snapshot_annotations = \"true\"");
        }
    }

    line("");
    if v2 {
        line("[plugins.'io.containerd.cri.v1.images']");
        line("  snapshotter = \"unlade\"");
        if !transfer {
            if v >= ContainerdVersion::V2_1 {
                line("  use_local_image_pull = true");
            }
            line("  disable_snapshot_annotations = false");
        }
        let platform = quote(&o.platform.to_string());
        for snapshotter in ["overlayfs", "unlade"] {
            line("");
            line("[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]");
            line(&format!("  platform = {platform}"));
            line(&format!("  snapshotter = \"{snapshotter}\""));
            line("  differ = \"walking\"");
        }
    } else {
        line("[plugins.\"io.containerd.grpc.v1.cri\".containerd]");
        line("  snapshotter = \"unlade\"");
        line("  disable_snapshot_annotations = false");
    }
    out
}

/// The version of the containerd binary `binary` (a path, or a name
/// looked up in `PATH`): `binary --version`, given [`DETECT_TIMEOUT`].
pub fn detect(binary: &Path) -> Result<ContainerdVersion, ConfigError> {
    detect_within(binary, DETECT_TIMEOUT)
}

/// [`detect`], the command given `limit` (then killed).
pub fn detect_within(binary: &Path, limit: Duration) -> Result<ContainerdVersion, ConfigError> {
    let mut child = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ConfigError::Run {
            binary: binary.to_path_buf(),
            source,
        })?;
    // Read on threads of their own: a child that leaves its output open
    // (a daemon it started) must not block the caller past `limit`.
    let reader = |r: Option<Box<dyn Read + Send>>| {
        let (tx, rx) = std::sync::mpsc::channel();
        if let Some(r) = r {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = r.take(64 << 10).read_to_end(&mut buf);
                let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
            });
        }
        rx
    };
    let stdout = reader(child.stdout.take().map(|s| Box::new(s) as _));
    let stderr = reader(child.stderr.take().map(|s| Box::new(s) as _));
    let deadline = Instant::now() + limit;
    let timeout = |child: &mut std::process::Child| {
        let _ = child.kill();
        let _ = child.wait();
        ConfigError::Timeout {
            binary: binary.to_path_buf(),
            limit,
        }
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => return Err(timeout(&mut child)),
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ConfigError::Run {
                    binary: binary.to_path_buf(),
                    source,
                });
            }
        }
    };
    let left = || deadline.saturating_duration_since(Instant::now());
    if !status.success() {
        let err = stderr.recv_timeout(left()).unwrap_or_default();
        return Err(ConfigError::Failed {
            binary: binary.to_path_buf(),
            status,
            stderr: first_chars(err.lines().next().unwrap_or("").trim()),
        });
    }
    match stdout.recv_timeout(left()) {
        Ok(out) => ContainerdVersion::from_version_output(&out),
        Err(_) => Err(ConfigError::Timeout {
            binary: binary.to_path_buf(),
            limit,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32) -> ContainerdVersion {
        ContainerdVersion::new(major, minor)
    }

    #[test]
    fn versions_from_containerd_output() {
        for (out, want) in [
            (
                "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3\n",
                v(1, 6),
            ),
            (
                "containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1\n",
                v(1, 7),
            ),
            (
                "containerd github.com/containerd/containerd/v2 2.1.9+unknown \n",
                v(2, 1),
            ),
            // Docker's packages, and an upstream release build.
            (
                "containerd containerd.io 1.7.24 88bf19b2105c8b17560993bee28a01ddc2f97182",
                v(1, 7),
            ),
            (
                "containerd github.com/containerd/containerd/v2 v2.0.5 fb4c30d4ede3531652d86197bf3fc9515e5276d9",
                v(2, 0),
            ),
        ] {
            assert_eq!(
                ContainerdVersion::from_version_output(out).unwrap(),
                want,
                "{out}"
            );
        }
        for out in [
            "",
            "runc version 1.1.5",
            "containerd github.com/containerd/containerd",
            "containerd: unknown flag --version",
        ] {
            let e = ContainerdVersion::from_version_output(out).unwrap_err();
            assert!(matches!(e, ConfigError::NoVersion(_)), "{out:?}: {e}");
        }
    }

    #[test]
    fn versions_as_written() {
        for (s, want) in [
            ("1.6", v(1, 6)),
            ("1.7.24", v(1, 7)),
            ("v2.1.9", v(2, 1)),
            ("2.1.9+unknown", v(2, 1)),
            ("2.1.0-rc.1", v(2, 1)),
            ("1.7.24~ds1", v(1, 7)),
        ] {
            assert_eq!(s.parse::<ContainerdVersion>().unwrap(), want, "{s}");
        }
        for s in [
            "",
            "1",
            "v",
            "1.",
            ".7",
            "x.y",
            "1.7.24.1",
            "1..7",
            "99999999999.1",
        ] {
            let e = s.parse::<ContainerdVersion>().unwrap_err();
            assert!(matches!(e, ConfigError::BadVersion(_)), "{s:?}: {e}");
        }
        assert_eq!(v(2, 1).to_string(), "2.1");
        assert!(v(1, 6) < v(1, 7) && v(1, 7) < v(2, 0) && v(2, 0) < v(2, 1));
    }

    #[test]
    fn supported_versions_and_pull_modes() {
        let (sock, root) = (Path::new("/run/u.sock"), Path::new("/var/lib/unlade"));
        for bad in [v(1, 5), v(0, 9), v(3, 0)] {
            let e = ConfigOptions::new(bad, sock, root).unwrap_err();
            assert!(matches!(e, ConfigError::Unsupported(_)), "{e}");
        }
        for (ver, mode) in [
            (v(1, 6), PullMode::Local),
            (v(1, 7), PullMode::Local),
            (v(2, 0), PullMode::Local),
            (v(2, 1), PullMode::Transfer),
            (v(2, 2), PullMode::Transfer),
        ] {
            let o = ConfigOptions::new(ver, sock, root).unwrap();
            assert_eq!(o.mode(), mode, "{ver}");
            assert_eq!(
                o.pull_mode(PullMode::Local).unwrap().mode(),
                PullMode::Local
            );
        }
        for old in [v(1, 6), v(1, 7), v(2, 0)] {
            let e = ConfigOptions::new(old, sock, root)
                .unwrap()
                .pull_mode(PullMode::Transfer)
                .unwrap_err();
            assert!(matches!(e, ConfigError::NoTransferPull { .. }), "{e}");
        }
        let e = ConfigOptions::new(v(1, 7), Path::new("u.sock"), root).unwrap_err();
        assert!(e.to_string().contains("not absolute"), "{e}");
        let e = ConfigOptions::new(v(1, 7), sock, root)
            .unwrap()
            .containerd_root(Path::new("var/lib/containerd"))
            .unwrap_err();
        assert!(e.to_string().contains("containerd's root"), "{e}");
    }

    /// The rendered text after a `version` line, as containerd reads it.
    fn parsed(o: &ConfigOptions) -> (String, toml::Table) {
        let text = render(o);
        let whole = format!("version = {}\n{text}", o.version().config_version());
        let t: toml::Table = whole.parse().unwrap_or_else(|e| panic!("{e}\n{whole}"));
        (text, t)
    }

    fn get<'a>(t: &'a toml::Table, path: &[&str]) -> Option<&'a toml::Value> {
        let (last, inner) = path.split_last()?;
        let mut t = t;
        for k in inner {
            t = t.get(*k)?.as_table()?;
        }
        t.get(*last)
    }

    fn s<'a>(t: &'a toml::Table, path: &[&str]) -> Option<&'a str> {
        get(t, path).and_then(toml::Value::as_str)
    }

    fn options(ver: ContainerdVersion) -> ConfigOptions {
        ConfigOptions::new(ver, Path::new("/run/u/s.sock"), Path::new("/srv/unlade")).unwrap()
    }

    const PROXY: &[&str] = &["proxy_plugins", "unlade"];
    const CRI1: &[&str] = &["plugins", "io.containerd.grpc.v1.cri", "containerd"];
    const CRI2: &[&str] = &["plugins", "io.containerd.cri.v1.images"];

    fn at<'a>(base: &[&'a str], key: &'a str) -> Vec<&'a str> {
        let mut p = base.to_vec();
        p.push(key);
        p
    }

    #[test]
    fn config_of_1_6_and_1_7() {
        for ver in [v(1, 6), v(1, 7)] {
            let (text, t) = parsed(&options(ver));
            assert_eq!(s(&t, &at(PROXY, "type")), Some("snapshot"), "{text}");
            assert_eq!(s(&t, &at(PROXY, "address")), Some("/run/u/s.sock"));
            assert_eq!(s(&t, &at(CRI1, "snapshotter")), Some("unlade"));
            let annotations = get(&t, &at(CRI1, "disable_snapshot_annotations"));
            assert_eq!(annotations.and_then(|b| b.as_bool()), Some(false));
            assert!(get(&t, CRI2).is_none(), "{text}");
            assert!(get(&t, &["plugins", "io.containerd.transfer.v1.local"]).is_none());
            assert_eq!(t.get("version").and_then(|v| v.as_integer()), Some(2));
            assert!(
                text.contains(&format!("containerd {ver}'s snapshotter")),
                "{text}"
            );
        }
        // 1.6 reads no exports (it ignores the key): its header says where
        // kubelet will look instead.
        let (text, t) = parsed(&options(v(1, 6)));
        assert!(get(&t, &at(PROXY, "exports")).is_none(), "{text}");
        assert!(
            text.contains("/var/lib/containerd/io.containerd.snapshotter.v1.unlade"),
            "{text}"
        );
        assert!(text.contains("run unlade with --root there"), "{text}");
        let (_, t) = parsed(&options(v(1, 7)));
        assert_eq!(
            s(&t, &["proxy_plugins", "unlade", "exports", "root"]),
            Some("/srv/unlade")
        );
        assert!(get(
            &t,
            &[
                "proxy_plugins",
                "unlade",
                "exports",
                "enable_remote_snapshot_annotations"
            ]
        )
        .is_none());

        // unlade's root at containerd 1.6's fixed path: the header says so.
        let o = ConfigOptions::new(
            v(1, 6),
            Path::new("/run/u/s.sock"),
            Path::new("/c/io.containerd.snapshotter.v1.unlade"),
        )
        .unwrap()
        .containerd_root(Path::new("/c"))
        .unwrap();
        let (text, _) = parsed(&o);
        assert!(text.contains("which is unlade's root"), "{text}");
    }

    #[test]
    fn config_of_2_1_transfer_and_local() {
        let exports = ["proxy_plugins", "unlade", "exports"];
        let unpack = |t: &toml::Table| -> Vec<(String, String, String)> {
            get(
                t,
                &[
                    "plugins",
                    "io.containerd.transfer.v1.local",
                    "unpack_config",
                ],
            )
            .and_then(|a| a.as_array())
            .expect("unpack_config")
            .iter()
            .map(|e| {
                let f = |k: &str| e.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
                (f("platform"), f("snapshotter"), f("differ"))
            })
            .collect()
        };
        let host = Platform::host().to_string();
        let both = vec![
            (host.clone(), "overlayfs".to_string(), "walking".to_string()),
            (host.clone(), "unlade".to_string(), "walking".to_string()),
        ];

        let (text, t) = parsed(&options(v(2, 1)));
        assert_eq!(t.get("version").and_then(|v| v.as_integer()), Some(3));
        assert_eq!(s(&t, &at(CRI2, "snapshotter")), Some("unlade"), "{text}");
        // Any of these would turn 2.1's CRI back to local pulls.
        for k in [
            "disable_snapshot_annotations",
            "use_local_image_pull",
            "registry",
            "max_concurrent_downloads",
        ] {
            assert!(get(&t, &at(CRI2, k)).is_none(), "{k}: {text}");
        }
        assert_eq!(s(&t, &at(&exports, "root")), Some("/srv/unlade"));
        assert_eq!(
            s(&t, &at(&exports, "enable_remote_snapshot_annotations")),
            Some("true")
        );
        assert_eq!(unpack(&t), both);
        assert!(get(&t, CRI1).is_none());
        assert!(text.contains("through the transfer service"), "{text}");
        assert!(text.contains("Falling back to"), "{text}");

        let local = options(v(2, 1)).pull_mode(PullMode::Local).unwrap();
        let (text, t) = parsed(&local);
        let b = |k| get(&t, &at(CRI2, k)).and_then(|v| v.as_bool());
        assert_eq!(b("use_local_image_pull"), Some(true), "{text}");
        assert_eq!(b("disable_snapshot_annotations"), Some(false));
        assert_eq!(s(&t, &at(&exports, "root")), Some("/srv/unlade"));
        // ctr's pulls still go through the transfer service.
        assert_eq!(unpack(&t), both);

        // 2.0: local only, and neither key 2.1 added.
        let (text, t) = parsed(&options(v(2, 0)));
        assert!(
            get(&t, &at(CRI2, "use_local_image_pull")).is_none(),
            "{text}"
        );
        assert!(get(&t, &at(&exports, "enable_remote_snapshot_annotations")).is_none());
        assert_eq!(
            get(&t, &at(CRI2, "disable_snapshot_annotations")).and_then(|v| v.as_bool()),
            Some(false)
        );
        let arm = options(v(2, 1)).platform(Platform::parse("linux/arm64/v8").unwrap());
        let (_, t) = parsed(&arm);
        assert_eq!(unpack(&t)[1].0, "linux/arm64/v8");
    }

    #[test]
    fn rendered_text_is_comments_then_tables_and_quotes_paths() {
        let o = ConfigOptions::new(
            v(2, 1),
            Path::new("/run/a \"b\"\\c.sock"),
            Path::new("/var/lib/un'lade"),
        )
        .unwrap();
        let (text, t) = parsed(&o);
        assert_eq!(
            s(&t, &at(PROXY, "address")),
            Some("/run/a \"b\"\\c.sock"),
            "{text}"
        );
        assert_eq!(
            s(&t, &["proxy_plugins", "unlade", "exports", "root"]),
            Some("/var/lib/un'lade")
        );
        // No key before the first table: the text may follow any table.
        let first = text
            .lines()
            .find(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .unwrap();
        assert_eq!(first, "[proxy_plugins.unlade]");
        // Appended after another table, it reads the same.
        let after = format!("version = 3\n[grpc]\n  address = \"/x\"\n{text}");
        let t2: toml::Table = after.parse().unwrap();
        assert_eq!(s(&t2, &["grpc", "address"]), Some("/x"));
        assert_eq!(s(&t2, &at(PROXY, "type")), Some("snapshot"));
    }

    /// An executable shell script in `dir`.
    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// `detect_within`, again while another thread's fork holds the
    /// script's write descriptor (ETXTBSY, a test artefact).
    fn detect_retrying(p: &Path, limit: Duration) -> Result<ContainerdVersion, ConfigError> {
        for _ in 0..50 {
            match detect_within(p, limit) {
                Err(ConfigError::Run { source, .. })
                    if source.kind() == std::io::ErrorKind::ExecutableFileBusy =>
                {
                    std::thread::sleep(Duration::from_millis(20))
                }
                r => return r,
            }
        }
        detect_within(p, limit)
    }

    #[test]
    fn detect_runs_the_binary_within_its_time() {
        let d = tempfile::tempdir().unwrap();
        let ok = script(
            d.path(),
            "containerd",
            "[ \"$1\" = --version ] || exit 3\necho 'containerd github.com/containerd/containerd/v2 2.1.9+unknown '",
        );
        assert_eq!(detect_retrying(&ok, DETECT_TIMEOUT).unwrap(), v(2, 1));

        let fails = script(d.path(), "fails", "echo 'no such flag' >&2\nexit 2");
        let e = detect_retrying(&fails, DETECT_TIMEOUT).unwrap_err();
        assert!(matches!(e, ConfigError::Failed { .. }), "{e}");
        assert!(e.to_string().contains("no such flag"), "{e}");

        let other = script(d.path(), "other", "echo 'runc version 1.1.5'");
        let e = detect_retrying(&other, DETECT_TIMEOUT).unwrap_err();
        assert!(matches!(e, ConfigError::NoVersion(_)), "{e}");

        let t = Instant::now();
        let slow = script(d.path(), "slow", "exec sleep 30");
        let e = detect_retrying(&slow, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, ConfigError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());

        let e = detect(&d.path().join("missing")).unwrap_err();
        assert!(matches!(e, ConfigError::Run { .. }), "{e}");
    }
}
