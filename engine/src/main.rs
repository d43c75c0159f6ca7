//! The `unlade` command line: a thin layer over the library. Each
//! subcommand parses its arguments, calls one library function and prints
//! its result; scripts rely on the last stdout line of each command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use unlade::content::ContentStore;
use unlade::decode::{DecodeOptions, DecodeStrategy, DEFAULT_MEMORY_CAP};
use unlade::snapshot::Snapshotter;
use unlade::{apply_layer, ApplyOptions, Digest, LayerInput};

#[derive(Parser)]
#[command(
    name = "unlade",
    version,
    about = "Unpack container image layers into overlayfs snapshots"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Decode {
    /// The fastest for one layer: plain tar in place, gzip and zstd streamed
    /// on three threads (whole-buffer gzip on a single CPU).
    Auto,
    /// Whole-buffer libdeflate for gzip when it fits the memory cap.
    Whole,
    /// Always stream.
    Streaming,
}

#[derive(Subcommand)]
enum Cmd {
    /// Apply one layer blob (tar, gzip or zstd; `-` for stdin) to DEST as an
    /// overlay upper directory. The last stdout line is the diff ID.
    Apply {
        /// Layer blob, or `-` for standard input.
        layer: PathBuf,
        /// Target directory (created if missing).
        dest: PathBuf,
        /// Fail unless the uncompressed stream hashes to this.
        #[arg(long, value_name = "sha256:HEX")]
        diff_id: Option<String>,
        /// Largest layer decoded in one buffer (e.g. 512M, 2G); larger
        /// layers stream. Default 1G, or $UNLADE_MEMORY_CAP.
        #[arg(long, value_name = "BYTES")]
        memory_cap: Option<String>,
        /// Decoding path.
        #[arg(long, value_enum, default_value = "auto")]
        decode: Decode,
        /// Print nothing but the diff ID.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Committed overlay snapshots under ROOT/snapshots, keyed by chain ID.
    Snapshots {
        #[command(subcommand)]
        cmd: SnapshotsCmd,
        /// The unlade root.
        #[arg(long, global = true, default_value = DEFAULT_ROOT)]
        root: PathBuf,
    },
    /// The content store: blobs by digest under ROOT/content.
    Content {
        #[command(subcommand)]
        cmd: ContentCmd,
        /// The unlade root.
        #[arg(long, global = true, default_value = DEFAULT_ROOT)]
        root: PathBuf,
    },
}

/// Where unlade keeps its state unless --root says otherwise.
const DEFAULT_ROOT: &str = "/var/lib/unlade";

#[derive(Subcommand)]
enum SnapshotsCmd {
    /// List committed snapshots: chain ID and parent chain ID (or `-`).
    Ls,
    /// Remove committed snapshots (children first).
    Rm {
        /// Chain IDs to remove.
        #[arg(required = true, value_name = "sha256:HEX")]
        chain_ids: Vec<String>,
    },
}

fn snapshots(root: &std::path::Path, cmd: SnapshotsCmd) -> Result<(), String> {
    let snaps = Snapshotter::open(root).map_err(|e| e.to_string())?;
    match cmd {
        SnapshotsCmd::Ls => {
            let lines: Vec<String> = snaps
                .list()
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|i| {
                    format!(
                        "{}\t{}",
                        i.chain_id,
                        i.parent.map_or("-".to_string(), |p| p.to_string())
                    )
                })
                .collect();
            emit(&lines)
        }
        SnapshotsCmd::Rm { chain_ids } => {
            for c in chain_ids {
                snaps.remove(&digest(&c)?).map_err(|e| e.to_string())?;
            }
            Ok(())
        }
    }
}

#[derive(Subcommand)]
enum ContentCmd {
    /// List blobs: digest and size, one per line.
    Ls,
    /// Remove blobs.
    Rm {
        /// Digests to remove.
        #[arg(required = true, value_name = "sha256:HEX")]
        digests: Vec<String>,
    },
    /// Add a blob, verifying its digest before it becomes visible. The last
    /// stdout line is the digest.
    Ingest {
        /// The digest the bytes must have.
        #[arg(value_name = "sha256:HEX")]
        digest: String,
        /// File to read, or `-` for stdin.
        file: PathBuf,
        /// Make the blob durable (fsync) before it becomes visible.
        #[arg(long)]
        sync: bool,
    },
}

fn digest(s: &str) -> Result<Digest, String> {
    s.parse::<Digest>().map_err(|e| e.to_string())
}

fn content(root: &std::path::Path, cmd: ContentCmd) -> Result<(), String> {
    let sync = matches!(cmd, ContentCmd::Ingest { sync: true, .. });
    let store = ContentStore::open(root, sync).map_err(|e| e.to_string())?;
    match cmd {
        ContentCmd::Ls => {
            let lines: Vec<String> = store
                .list()
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|(d, size)| format!("{d}\t{size}"))
                .collect();
            emit(&lines)
        }
        ContentCmd::Rm { digests } => {
            for d in digests {
                let d = digest(&d)?;
                if !store.remove(&d).map_err(|e| e.to_string())? {
                    return Err(format!("blob {d} not found"));
                }
            }
            Ok(())
        }
        ContentCmd::Ingest {
            digest: d, file, ..
        } => {
            let d = digest(&d)?;
            let r = if file.as_os_str() == "-" {
                store.ingest(&d, std::io::stdin().lock(), None)
            } else {
                let f = std::fs::File::open(&file)
                    .map_err(|e| format!("open {}: {e}", file.display()))?;
                store.ingest(&d, f, None)
            }
            .map_err(|e| e.to_string())?;
            let how = if r.published {
                "published"
            } else {
                "already present"
            };
            emit(&[format!("{} bytes, {how}", r.size), d.to_string()])
        }
    }
}

fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("invalid size {s:?}: unknown suffix")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    n.checked_mul(mult)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// Directory fds are cached while applying; let the process have as many
/// open files as its hard limit allows.
fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        let _ = setrlimit(Resource::Nofile, l);
    }
}

fn run(cli: Cli) -> Result<(), String> {
    raise_nofile();
    match cli.cmd {
        Cmd::Content { cmd, root } => content(&root, cmd),
        Cmd::Snapshots { cmd, root } => snapshots(&root, cmd),
        Cmd::Apply {
            layer,
            dest,
            diff_id,
            memory_cap,
            decode,
            quiet,
        } => {
            let diff_id = diff_id
                .map(|d| d.parse::<Digest>().map_err(|e| e.to_string()))
                .transpose()?;
            let cap = match memory_cap.or_else(|| std::env::var("UNLADE_MEMORY_CAP").ok()) {
                Some(s) => parse_size(&s)?,
                None => DEFAULT_MEMORY_CAP,
            };
            let opts = ApplyOptions {
                decode: DecodeOptions {
                    strategy: match decode {
                        Decode::Auto => DecodeStrategy::Auto,
                        Decode::Whole => DecodeStrategy::WholeBuffer,
                        Decode::Streaming => DecodeStrategy::Streaming,
                    },
                    memory_cap: cap,
                },
                same_owner: None,
                diff_id,
            };
            let input = if layer.as_os_str() == "-" {
                LayerInput::Stdin
            } else {
                LayerInput::Path(layer)
            };
            let started = std::time::Instant::now();
            let r = apply_layer(input, &dest, &opts).map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            if !quiet {
                let secs = started.elapsed().as_secs_f64();
                out.push(format!(
                    "applied {} entries ({} files, {} dirs, {} whiteouts), {} bytes uncompressed ({:?}, {}) in {:.3}s",
                    r.counts.entries,
                    r.counts.files,
                    r.counts.dirs,
                    r.counts.whiteouts,
                    r.uncompressed_bytes,
                    r.compression,
                    if r.whole_buffer { "whole-buffer" } else { "streaming" },
                    secs
                ));
            }
            out.push(r.diff_id.to_string());
            emit(&out)
        }
    }
}

/// Prints result lines. A reader that went away (`| head -1`) is not an
/// error of the command: the work is done.
fn emit(lines: &[String]) -> Result<(), String> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    for l in lines {
        match writeln!(stdout, "{l}") {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(format!("write stdout: {e}")),
        }
    }
    stdout.flush().or_else(|e| {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            Ok(())
        } else {
            Err(format!("write stdout: {e}"))
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("unlade: error: {e}");
            ExitCode::from(1)
        }
    }
}
