//! The command line's parts: one module per subcommand (its arguments,
//! the library call it makes, what it prints), and what a library user
//! would not want: a terminal display ([`progress`]), signal handling
//! ([`signals`]), the one-line error report ([`error_line`]).

pub mod apply;
pub mod config;
pub mod containerd_config;
pub mod content;
pub mod gc;
pub mod images;
pub mod logging;
pub mod mounts;
pub mod progress;
pub mod pull;
pub mod signals;
pub mod snapshots;
pub mod snapshotter;
pub mod systemd;
pub mod unpack;

use std::error::Error;
use std::path::Path;

use unlade::layer::fsops::{BackendKind, BackendOptions};
use unlade::oci::image::Platform;
use unlade::root::{Root, RootOptions};
use unlade::Digest;

/// What a command returns: its error is printed once, by `main`.
pub type Result<T = ()> = std::result::Result<T, Box<dyn Error>>;

/// Where unlade keeps its state unless --root says otherwise.
pub const DEFAULT_ROOT: &str = "/var/lib/unlade";

/// The arguments of every command that writes files (`apply`, `unpack`,
/// `pull`): which backend, how many worker threads.
#[derive(clap::Args)]
pub struct WriteArgs {
    /// What writes the files: `auto` (io_uring on ext4, where it measured
    /// faster; plain syscalls elsewhere and where io_uring is
    /// unavailable), `uring` or `syscalls`.
    #[arg(long, value_enum, env = "UNLADE_BACKEND", default_value = "auto")]
    pub backend: BackendKind,
    /// Worker threads that write files (default: the CPUs this process
    /// may run on).
    #[arg(long, value_name = "N", env = "UNLADE_THREADS")]
    pub threads: Option<usize>,
}

impl WriteArgs {
    /// The backend options these arguments ask for.
    pub fn options(&self) -> BackendOptions {
        BackendOptions {
            kind: self.backend,
            threads: self.threads.map(|n| n.max(1)),
        }
    }
}

/// The arguments `pull` and `unpack` share: which image, how many layers
/// at once, how much to say, and how files are written.
#[derive(clap::Args)]
pub struct ImageArgs {
    /// Take this platform's image (os/arch[/variant]) instead of the
    /// host's.
    #[arg(long)]
    pub platform: Option<String>,
    /// Most layers applied at once.
    #[arg(long, value_name = "N")]
    pub parallel: Option<usize>,
    /// Print nothing but the chain ID.
    #[arg(long, short)]
    pub quiet: bool,
    #[command(flatten)]
    pub write: WriteArgs,
}

impl ImageArgs {
    /// `--platform`, parsed.
    pub fn platform(&self) -> Result<Option<Platform>> {
        Ok(self.platform.as_deref().map(Platform::parse).transpose()?)
    }

    /// `--parallel` applied to `opts`.
    pub fn apply_to(&self, opts: &mut RootOptions) {
        if let Some(n) = self.parallel {
            opts.parallel_layers = n.max(1);
        }
        opts.backend = self.write.options();
    }
}

/// The arguments of every command that downloads (`pull`,
/// `snapshotter`): how many connections, and how a large blob is split
/// over them.
#[derive(clap::Args)]
pub struct FetchArgs {
    /// Most connections all downloads use at once; lower layers first
    /// [default: 16].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(config::range::MAX_CONNECTIONS))]
    pub max_connections: Option<u64>,
    /// Connections one blob is fetched over at once, each asking for a
    /// chunk at a time (1: every blob over one stream) [default: 8].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(config::range::BLOB_CONNECTIONS))]
    pub blob_connections: Option<u64>,
    /// Bytes per ranged request, with an optional K, M or G (powers of
    /// 1024); blobs of more than two chunks are split over connections
    /// [default: 16M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub chunk_size: Option<u64>,
}

impl FetchArgs {
    /// These arguments applied to `opts`, over what the config file says
    /// (`file`, the snapshotter's), over the defaults.
    pub fn apply_to(&self, opts: &mut RootOptions, file: Option<&config::File>) {
        let split = unlade::pipeline::fetch::Split::default();
        let file = |f: fn(&config::File) -> Option<u64>| file.and_then(f);
        opts.max_connections = self
            .max_connections
            .or(file(|f| f.max_connections))
            .map_or(opts.max_connections, |n| n as usize);
        opts.split = unlade::pipeline::fetch::Split {
            connections: self
                .blob_connections
                .or(file(|f| f.blob_connections))
                .map_or(split.connections, |n| n as usize),
            chunk: self
                .chunk_size
                .or(file(|f| f.chunk_size.map(|s| s.0)))
                .unwrap_or(split.chunk),
        };
    }
}

/// A size in bytes: digits with an optional K, M or G suffix (powers of
/// 1024), at least 4 KiB.
pub(crate) fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, ""),
    };
    let shift = match unit.trim_end_matches(['i', 'B']) {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        _ => return Err(format!("{s:?}: a size is digits with K, M or G")),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: a size is digits with K, M or G"))?;
    let n = n
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?}: too large"))?;
    if n < 4096 {
        return Err(format!("{s:?}: at least 4K"));
    }
    Ok(n)
}

/// Opens the root of a command that only reads or removes: a path that
/// is no root is an error ("no unlade root at PATH") and is not created.
pub fn open_existing(root: &Path) -> Result<Root> {
    Ok(Root::open_existing(root, RootOptions::default())?)
}

/// A digest argument.
pub fn digest(s: &str) -> Result<Digest> {
    Ok(s.parse::<Digest>()?)
}

/// A parent chain ID, or `-` for none.
pub fn or_dash(d: Option<Digest>) -> String {
    d.map_or("-".to_string(), |p| p.to_string())
}

/// Prints warnings on stderr, one line each (even with `--quiet`: the
/// layer was not applied exactly as written).
pub fn warn(lines: &[String]) {
    for l in lines {
        eprintln!("unlade: warning: {l}");
    }
}

/// Prints result lines. A reader that went away (`| head -1`) is not an
/// error of the command: the work is done.
pub fn emit(lines: &[String]) -> Result {
    use std::io::Write;
    let broken = |e: std::io::Error| -> Result {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            Ok(())
        } else {
            Err(format!("write stdout: {e}").into())
        }
    };
    let mut stdout = std::io::stdout().lock();
    for l in lines {
        if let Err(e) = writeln!(stdout, "{l}") {
            return broken(e);
        }
    }
    stdout.flush().or_else(broken)
}

/// An error as one line: its Display, then each `source()` down the chain
/// joined with ": ", except a source whose text the line already ends
/// with (an error that shows its source in its own Display, as
/// `#[error("{op}: {source}")]` does, would otherwise say it twice).
/// Line breaks inside a message become spaces: callers print one line.
pub fn error_line(e: &(dyn Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !text.is_empty() && !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        next = s.source();
    }
    line.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("16M"), Ok(16 << 20));
        assert_eq!(parse_size("256K"), Ok(256 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("65536"), Ok(65536));
        for bad in ["", "M", "16X", "1k2", "100", "99999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl Error for E {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }
    fn chain(texts: &[&'static str]) -> E {
        let mut e: Option<Box<E>> = None;
        for t in texts.iter().rev() {
            e = Some(Box::new(E(t, e)));
        }
        *e.unwrap()
    }

    #[test]
    fn error_line_joins_sources_that_display_does_not_show() {
        assert_eq!(error_line(&chain(&["open x"])), "open x");
        assert_eq!(
            error_line(&chain(&["layer l", "open x", "No such file"])),
            "layer l: open x: No such file"
        );
    }

    #[test]
    fn error_line_says_a_repeated_source_once() {
        // Display already ends with each source (thiserror's "{source}").
        assert_eq!(
            error_line(&chain(&[
                "layer d: lock p: No such file",
                "lock p: No such file",
                "No such file"
            ])),
            "layer d: lock p: No such file"
        );
        // Mixed: the middle one shows its source, the top does not.
        assert_eq!(
            error_line(&chain(&["unpack", "open x: denied", "denied"])),
            "unpack: open x: denied"
        );
        assert_eq!(error_line(&chain(&["a\nb", "c"])), "a b: c");
    }

    #[test]
    fn error_line_of_real_errors() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e = unlade::ApplyError::fs("open layer", io).layer("l.tar");
        let line = error_line(&e);
        assert_eq!(line.matches("gone").count(), 1, "{line}");
        assert!(line.starts_with("layer l.tar: "), "{line}");
        let e = unlade::RootError::NoRoot {
            path: "/nonexistent".into(),
        };
        assert_eq!(error_line(&e), "no unlade root at /nonexistent");
    }
}
