//! `/etc/unlade/config.toml`: every setting of `unlade snapshotter` in one
//! file (`--config FILE` names another), so that a fleet's unit file says
//! nothing but the command. A flag given on the command line wins over the
//! file; the file wins over the defaults. An unknown key or a bad value is
//! one error line naming the file, the line and the key, before anything
//! starts. `contrib/config.toml` documents every key.

use std::fmt;
use std::path::{Path, PathBuf};

/// The values each bounded setting takes, written once for its flag (clap's
/// `value_parser!(..).range(..)`) and its key in the file ([`File::check`]).
pub mod range {
    use std::ops::RangeInclusive;
    /// `max_pulls`, `max_pulls_per_registry`.
    pub const PULLS: RangeInclusive<u64> = 1..=64;
    /// `pull_timeout`, seconds.
    pub const PULL_TIMEOUT: std::ops::RangeFrom<u64> = 1..;
    /// `stall_timeout`, seconds.
    pub const STALL_TIMEOUT: RangeInclusive<u64> = 1..=3600;
    /// `max_connections`.
    pub const MAX_CONNECTIONS: RangeInclusive<u64> = 1..=1024;
    /// `blob_connections`.
    pub const BLOB_CONNECTIONS: RangeInclusive<u64> = 1..=256;
}

/// Where the file is read from when `--config` names none; it may be
/// absent.
pub const DEFAULT_PATH: &str = "/etc/unlade/config.toml";

/// The file's keys, each optional (see `contrib/config.toml`).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub root: Option<PathBuf>,
    pub address: Option<PathBuf>,
    pub hosts_dir: Option<PathBuf>,
    pub plain_http: Option<bool>,
    pub fast_path: Option<bool>,
    pub max_pulls: Option<u64>,
    pub max_pulls_per_registry: Option<u64>,
    pub pull_timeout: Option<u64>,
    pub stall_timeout: Option<u64>,
    pub cri_listen: Option<PathBuf>,
    pub cri_upstream: Option<PathBuf>,
    pub max_connections: Option<u64>,
    pub blob_connections: Option<u64>,
    pub chunk_size: Option<Size>,
    pub metrics_address: Option<std::net::SocketAddr>,
    pub log_format: Option<super::logging::LogFormat>,
    pub log_level: Option<String>,
    pub blobs: Option<unlade::containerd::Blobs>,
    pub containerd_address: Option<PathBuf>,
}

/// A size: bytes, or a string with K, M or G (`"16M"`).
#[derive(Debug, Clone, Copy)]
pub struct Size(pub u64);

impl<'de> serde::Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => super::parse_size(&n.to_string()),
            Raw::Text(t) => super::parse_size(&t),
        }
        .map(Size)
        .map_err(serde::de::Error::custom)
    }
}

/// Why the file cannot be used: one line.
#[derive(Debug)]
pub struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Reads `path` (`explicit`: named by `--config`, so it must exist; the
/// default place may not).
pub fn load(path: &Path, explicit: bool) -> Result<File, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            return Ok(File::default())
        }
        Err(e) => return Err(ConfigError(format!("config {}: {e}", path.display()))),
    };
    let file: File = toml::from_str(&text).map_err(|e| {
        let at = e.span().map(|s| {
            let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
            let key = text
                .lines()
                .nth(line - 1)
                .and_then(|l| l.split_once('='))
                .map(|(k, _)| format!(" (`{}`)", k.trim()))
                .unwrap_or_default();
            format!(", line {line}{key}")
        });
        ConfigError(format!(
            "config {}{}: {}",
            path.display(),
            at.unwrap_or_default(),
            e.message().trim()
        ))
    })?;
    file.check()
        .map_err(|m| ConfigError(format!("config {}: {m}", path.display())))?;
    Ok(file)
}

impl File {
    /// The ranges the flags take, for the same keys.
    fn check(&self) -> Result<(), String> {
        fn within(
            key: &str,
            v: Option<u64>,
            r: impl std::ops::RangeBounds<u64> + fmt::Debug,
        ) -> Result<(), String> {
            match v {
                Some(v) if !r.contains(&v) => Err(format!("`{key}` = {v}: must be in {r:?}")),
                _ => Ok(()),
            }
        }
        within("max_pulls", self.max_pulls, range::PULLS)?;
        within(
            "max_pulls_per_registry",
            self.max_pulls_per_registry,
            range::PULLS,
        )?;
        within("pull_timeout", self.pull_timeout, range::PULL_TIMEOUT)?;
        within("stall_timeout", self.stall_timeout, range::STALL_TIMEOUT)?;
        within(
            "max_connections",
            self.max_connections,
            range::MAX_CONNECTIONS,
        )?;
        within(
            "blob_connections",
            self.blob_connections,
            range::BLOB_CONNECTIONS,
        )?;
        if let Some(l) = &self.log_level {
            super::logging::parse_filter(l).map_err(|e| format!("`log_level`: {e}"))?;
        }
        if self.cri_listen.is_some() != self.cri_upstream.is_some() {
            return Err("`cri_listen` and `cri_upstream` go together".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config.toml");
        std::fs::write(&p, text).unwrap();
        (d, p)
    }

    #[test]
    fn the_documented_example_parses_whole() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/config.toml");
        let f = load(&example, true).unwrap();
        assert_eq!(f.max_pulls, Some(4));
        assert_eq!(f.chunk_size.map(|s| s.0), Some(16 << 20));
        assert_eq!(f.root.as_deref(), Some(Path::new("/var/lib/unlade")));
        assert_eq!(f.log_format, Some(super::super::logging::LogFormat::Text));
        assert_eq!(f.log_level.as_deref(), Some("info"));
        assert_eq!(f.blobs, Some(unlade::containerd::Blobs::HandOff));
    }

    #[test]
    fn bad_keys_and_values_are_one_line_naming_the_key() {
        let cases = [
            ("max_pulls = 4\nmax_pull = 3\n", "line 2", "max_pull"),
            (
                "max_pulls = \"four\"\n",
                "line 1 (`max_pulls`)",
                "invalid type",
            ),
            ("stall_timeout = 0\n", "`stall_timeout` = 0", "1..=3600"),
            ("chunk_size = \"16Q\"\n", "(`chunk_size`)", "16Q"),
            ("cri_listen = \"/run/x.sock\"\n", "cri_upstream", "together"),
            ("root = \n", "line 1", ""),
            ("log_format = \"xml\"\n", "(`log_format`)", "xml"),
            ("log_level = \"loud\"\n", "`log_level`", "loud"),
            ("blobs = \"share\"\n", "(`blobs`)", "share"),
            (
                "metrics_address = \"localhost\"\n",
                "(`metrics_address`)",
                "",
            ),
        ];
        for (text, a, b) in cases {
            let (_d, p) = write(text);
            let e = load(&p, true).unwrap_err().to_string();
            assert!(e.starts_with(&format!("config {}", p.display())), "{e}");
            assert!(e.contains(a) && e.contains(b), "{text:?}: {e}");
            assert!(!e.contains('\n'), "one line: {e:?}");
        }
    }

    #[test]
    fn the_default_file_may_be_absent_a_named_one_not() {
        let missing = Path::new("/nonexistent/unlade/config.toml");
        assert!(load(missing, false).unwrap().max_pulls.is_none());
        let e = load(missing, true).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/unlade/config.toml"), "{e}");
    }
}
