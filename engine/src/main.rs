//! The `unlade` command line: a thin layer over the library. Each
//! subcommand parses its arguments, calls one library function and prints
//! its result; scripts rely on the last stdout line of each command.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use unlade::cancel::Cancel;
use unlade::layer::decode::{DecodeOptions, DecodeStrategy, DEFAULT_MEMORY_CAP};
use unlade::oci::image::Platform;
use unlade::pipeline::flight::Role;
use unlade::root::{Root, RootOptions};
use unlade::source::layout::Layout;
use unlade::store::content::ContentStore;
use unlade::store::durable::Durability;
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

#[derive(Clone, Copy, ValueEnum)]
enum SyncMode {
    /// fsync what each layer wrote, overlapped with the next layers.
    Written,
    /// syncfs of the file system holding the snapshot, per layer.
    Syncfs,
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
    /// Unpack an image from an OCI image-layout directory into committed
    /// snapshots, one per layer. The last stdout line is the image's top
    /// chain ID, for `unlade mounts`.
    Unpack {
        /// The layout directory, optionally with `:TAG` (the
        /// org.opencontainers.image.ref.name annotation).
        layout: String,
        /// The unlade root.
        #[arg(long, default_value = DEFAULT_ROOT)]
        root: PathBuf,
        /// Unpack this platform's image (os/arch[/variant]) instead of the
        /// host's.
        #[arg(long)]
        platform: Option<String>,
        /// Record the image under this name (default: LAYOUT:TAG, or the
        /// layout with the manifest digest).
        #[arg(long)]
        name: Option<String>,
        /// Make every file of every snapshot durable before its commit,
        /// and the commit itself (also blobs and the image record).
        #[arg(long)]
        sync: bool,
        /// How --sync syncs: `written` (the files and directories each
        /// layer wrote) or `syncfs` (the whole file system per layer).
        #[arg(long, value_enum, default_value = "written", requires = "sync")]
        sync_mode: SyncMode,
        /// Most layers applied at once.
        #[arg(long, value_name = "N")]
        parallel: Option<usize>,
        /// Print nothing but the chain ID.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Pull an image from a registry into committed snapshots, one per
    /// layer, downloading each layer while it is applied. The last stdout
    /// line is the image's top chain ID, for `unlade mounts`.
    Pull {
        /// The image reference: `redis`, `host:port/repo:tag`,
        /// `repo@sha256:…`, `repo:tag@sha256:…`.
        reference: String,
        /// The unlade root.
        #[arg(long, default_value = DEFAULT_ROOT)]
        root: PathBuf,
        /// Pull this platform's image (os/arch[/variant]) instead of the
        /// host's.
        #[arg(long)]
        platform: Option<String>,
        /// Talk plain HTTP to the registry (when no hosts.toml says
        /// otherwise).
        #[arg(long)]
        plain_http: bool,
        /// Most blobs downloaded at once.
        #[arg(long, value_name = "N", default_value_t = 3)]
        max_concurrent_downloads: usize,
        /// Directory of per-registry `hosts.toml` files (containerd's
        /// format: mirrors, plain HTTP, CA).
        #[arg(long, value_name = "DIR", default_value = "/etc/unlade/certs.d")]
        hosts_dir: PathBuf,
        /// Make every snapshot, blob and record durable before it is
        /// visible (as `unpack --sync`).
        #[arg(long)]
        sync: bool,
        /// Most layers applied at once.
        #[arg(long, value_name = "N")]
        parallel: Option<usize>,
        /// Print nothing but the chain ID.
        #[arg(long, short)]
        quiet: bool,
        /// Print a JSON summary (digests, chain IDs, bytes, time per
        /// stage) before the chain ID.
        #[arg(long)]
        json: bool,
    },
    /// Print, as the last stdout line, the `mount` command that mounts
    /// committed snapshot CHAINID read-only at TARGET, or with --rw a new
    /// writable snapshot KEY on top of it (as `ctr snapshots mounts`).
    /// For images of more than about 35 layers (up to 500) the line starts
    /// with `cd ROOT/snapshots/l && `: its options name the layers by
    /// short links there, to fit the kernel's 4096 bytes of options.
    Mounts {
        /// Where the mount command mounts.
        target: PathBuf,
        /// The committed snapshot (an image's top chain ID).
        #[arg(value_name = "sha256:HEX")]
        chain_id: String,
        /// The unlade root.
        #[arg(long, default_value = DEFAULT_ROOT)]
        root: PathBuf,
        /// Create writable snapshot KEY on top and mount that.
        #[arg(long, value_name = "KEY")]
        rw: Option<String>,
    },
    /// Image records: name, manifest, top chain ID.
    Images {
        #[command(subcommand)]
        cmd: ImagesCmd,
        /// The unlade root.
        #[arg(long, global = true, default_value = DEFAULT_ROOT)]
        root: PathBuf,
    },
    /// Remove snapshots and blobs that no image and no writable snapshot
    /// references. Waits for running unpacks.
    Gc {
        /// The unlade root.
        #[arg(long, default_value = DEFAULT_ROOT)]
        root: PathBuf,
    },
    /// Snapshots under ROOT/snapshots: committed ones keyed by chain ID,
    /// writable ones by key.
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
    /// List snapshots: name (chain ID or key), parent chain ID (or `-`),
    /// kind (`committed` or `writable`), tab-separated.
    Ls,
    /// Remove committed snapshots (children first) or writable ones (by
    /// key; unmount them first).
    Rm {
        /// Chain IDs or keys to remove.
        #[arg(required = true, value_name = "sha256:HEX|KEY")]
        names: Vec<String>,
    },
}

fn open_root(root: &std::path::Path) -> Result<Root, String> {
    Root::open(root, RootOptions::default()).map_err(|e| unlade::error_chain(&e))
}

fn or_dash(d: Option<Digest>) -> String {
    d.map_or("-".to_string(), |p| p.to_string())
}

fn snapshots(root: &std::path::Path, cmd: SnapshotsCmd) -> Result<(), String> {
    let root = open_root(root)?;
    let snaps = root.snapshots();
    match cmd {
        SnapshotsCmd::Ls => {
            let mut lines: Vec<String> = snaps
                .list()
                .map_err(|e| unlade::error_chain(&e))?
                .into_iter()
                .map(|i| format!("{}\t{}\tcommitted", i.chain_id, or_dash(i.parent)))
                .collect();
            lines.extend(
                snaps
                    .list_rw()
                    .map_err(|e| unlade::error_chain(&e))?
                    .into_iter()
                    .map(|i| format!("{}\t{}\twritable", i.key, or_dash(i.parent))),
            );
            emit(&lines)
        }
        SnapshotsCmd::Rm { names } => {
            for n in names {
                if n.starts_with("sha256:") {
                    root.remove_snapshot(&digest(&n)?)
                        .map_err(|e| unlade::error_chain(&e))?;
                } else {
                    root.remove_rw(&n).map_err(|e| unlade::error_chain(&e))?;
                }
            }
            Ok(())
        }
    }
}

#[derive(Subcommand)]
enum ImagesCmd {
    /// List images: name, manifest digest, top chain ID, platform.
    Ls,
    /// Forget images (gc then removes what only they used).
    Rm {
        /// Image names.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

fn images(root: &std::path::Path, cmd: ImagesCmd) -> Result<(), String> {
    let root = open_root(root)?;
    match cmd {
        ImagesCmd::Ls => {
            let lines: Vec<String> = root
                .list_images()
                .map_err(|e| unlade::error_chain(&e))?
                .into_iter()
                .map(|r| {
                    format!(
                        "{}\t{}\t{}\t{}",
                        r.name,
                        r.manifest,
                        or_dash(r.top_chain),
                        r.platform
                    )
                })
                .collect();
            emit(&lines)
        }
        ImagesCmd::Rm { names } => {
            for n in names {
                root.remove_image(&n).map_err(|e| unlade::error_chain(&e))?;
            }
            Ok(())
        }
    }
}

/// Splits `LAYOUT[:TAG]`: a suffix after the last `:` is a tag unless the
/// whole string names a directory or the suffix has a `/`.
fn split_layout(s: &str) -> (PathBuf, Option<String>) {
    if std::path::Path::new(s).is_dir() {
        return (PathBuf::from(s), None);
    }
    match s.rsplit_once(':') {
        Some((dir, tag)) if !tag.is_empty() && !tag.contains('/') => {
            (PathBuf::from(dir), Some(tag.to_string()))
        }
        _ => (PathBuf::from(s), None),
    }
}

struct UnpackArgs {
    layout: String,
    root: PathBuf,
    platform: Option<String>,
    name: Option<String>,
    sync: Option<SyncMode>,
    parallel: Option<usize>,
    quiet: bool,
}

fn unpack(a: UnpackArgs) -> Result<(), String> {
    let started = std::time::Instant::now();
    let (dir, tag) = split_layout(&a.layout);
    let platform = a.platform.as_deref().map(Platform::parse).transpose()?;
    let layout = Layout::open(&dir).map_err(|e| unlade::error_chain(&e))?;
    let image = layout
        .resolve(tag.as_deref(), platform.as_ref())
        .map_err(|e| unlade::error_chain(&e))?;
    let mut opts = RootOptions {
        durability: match a.sync {
            None => Durability::None,
            Some(SyncMode::Written) => Durability::Written,
            Some(SyncMode::Syncfs) => Durability::Syncfs,
        },
        ..RootOptions::default()
    };
    if let Some(n) = a.parallel {
        opts.parallel_layers = n.max(1);
    }
    let root = Root::open(&a.root, opts).map_err(|e| unlade::error_chain(&e))?;
    let name = a.name.unwrap_or_else(|| match &tag {
        Some(t) => format!("{}:{t}", dir.display()),
        None => format!("{}@{}", dir.display(), image.manifest),
    });
    let cancel = Cancel::new();
    let r = root
        .unpack(std::sync::Arc::new(layout), &image, &name, &cancel)
        .map_err(|e| unlade::error_chain(&e))?;
    warn(&r.warnings);
    let stats = root.stats();
    let mut out = Vec::new();
    if !a.quiet {
        for (chain, role) in &r.roles {
            let how = match role {
                Role::TookOver => "applied (took over)",
                Role::Waited => "done by another",
                _ => "applied",
            };
            out.push(format!("layer {chain}: {how}"));
        }
        out.push(format!(
            "unpacked {name}: {} layers, {} committed before, {} applied here, {} blobs imported, in {:.3}s",
            r.chain_ids.len(),
            r.already,
            stats.layers_applied,
            stats.blobs_ingested,
            started.elapsed().as_secs_f64()
        ));
    }
    match r.top_chain {
        Some(c) => out.push(c.to_string()),
        None => return Err(format!("image {name} has no layers: nothing to mount")),
    }
    emit(&out)
}

struct PullArgs {
    reference: String,
    root: PathBuf,
    platform: Option<String>,
    plain_http: bool,
    max_downloads: usize,
    hosts_dir: PathBuf,
    sync: bool,
    parallel: Option<usize>,
    quiet: bool,
    json: bool,
}

fn pull(a: PullArgs) -> Result<(), String> {
    let started = std::time::Instant::now();
    let reference = unlade::Reference::parse(&a.reference).map_err(|e| unlade::error_chain(&e))?;
    let platform = a.platform.as_deref().map(Platform::parse).transpose()?;
    let mut opts = RootOptions {
        durability: if a.sync {
            Durability::Written
        } else {
            Durability::None
        },
        max_downloads: a.max_downloads.max(1),
        ..RootOptions::default()
    };
    if let Some(n) = a.parallel {
        opts.parallel_layers = n.max(1);
    }
    let root = Root::open(&a.root, opts).map_err(|e| unlade::error_chain(&e))?;
    let popts = unlade::PullOptions {
        remote: unlade::source::remote::RemoteOptions {
            plain_http: a.plain_http,
            hosts_dir: Some(a.hosts_dir),
            ..Default::default()
        },
        platform,
    };
    let display = (!a.quiet).then(cli::progress::Display::new);
    let cancel = Cancel::new();
    let r = root.pull(
        &reference,
        &popts,
        display
            .clone()
            .map(|d| d as std::sync::Arc<dyn unlade::Progress>),
        &cancel,
    );
    if let Some(d) = &display {
        d.finish();
    }
    let p = r.map_err(|e| unlade::error_chain(&e))?;
    warn(&p.unpacked.warnings);
    let stats = root.stats();
    let mut out = Vec::new();
    if a.json {
        let roles: std::collections::HashMap<_, _> = p.unpacked.roles.iter().cloned().collect();
        let layers: Vec<_> = p
            .image
            .layers
            .iter()
            .map(|l| {
                serde_json::json!({
                    "digest": l.digest,
                    "size": l.size,
                    "media_type": l.media_type,
                    "diff_id": l.diff_id,
                    "chain_id": l.chain_id,
                    "done": match roles.get(&l.chain_id) {
                        None => "present",
                        Some(Role::Waited) => "by another",
                        Some(_) => "here",
                    },
                })
            })
            .collect();
        out.push(
            serde_json::json!({
                "name": p.name,
                "resolved": p.resolved,
                "manifest": p.image.manifest,
                "config": p.image.config,
                "platform": p.image.platform.to_string(),
                "layers": layers,
                "top_chain": p.unpacked.top_chain,
                "requests": p.requests,
                "bytes_fetched": p.bytes_fetched,
                "layers_applied": stats.layers_applied,
                "blobs_fetched": stats.blobs_ingested,
                "seconds": {
                    "resolve": p.resolve_time.as_secs_f64(),
                    "fetch_and_unpack": p.unpack_time.as_secs_f64(),
                    "total": started.elapsed().as_secs_f64(),
                },
            })
            .to_string(),
        );
    } else if !a.quiet {
        out.push(format!(
            "pulled {} ({}): {} layers, {} present before, {} applied here, {} blobs fetched ({} bytes, {} requests), in {:.3}s",
            p.name,
            p.image.manifest,
            p.image.layers.len(),
            p.unpacked.already,
            stats.layers_applied,
            stats.blobs_ingested,
            p.bytes_fetched,
            p.requests,
            started.elapsed().as_secs_f64()
        ));
    }
    match p.unpacked.top_chain {
        Some(c) => out.push(c.to_string()),
        None => return Err(format!("image {} has no layers: nothing to mount", p.name)),
    }
    emit(&out)
}

fn mounts(
    target: PathBuf,
    chain: &str,
    root: &std::path::Path,
    rw: Option<String>,
) -> Result<(), String> {
    let root = open_root(root)?;
    let chain = digest(chain)?;
    let m = match rw {
        None => root.mounts(&chain),
        Some(key) => root.prepare_rw(&key, Some(&chain), &Cancel::new()),
    }
    .map_err(|e| unlade::error_chain(&e))?;
    emit(&[m.command_line(&target)])
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
    s.parse::<Digest>().map_err(|e| unlade::error_chain(&e))
}

fn content(root: &std::path::Path, cmd: ContentCmd) -> Result<(), String> {
    let sync = matches!(cmd, ContentCmd::Ingest { sync: true, .. });
    let store = ContentStore::open(root, sync).map_err(|e| unlade::error_chain(&e))?;
    match cmd {
        ContentCmd::Ls => {
            let lines: Vec<String> = store
                .list()
                .map_err(|e| unlade::error_chain(&e))?
                .into_iter()
                .map(|(d, size)| format!("{d}\t{size}"))
                .collect();
            emit(&lines)
        }
        ContentCmd::Rm { digests } => {
            for d in digests {
                let d = digest(&d)?;
                if !store.remove(&d).map_err(|e| unlade::error_chain(&e))? {
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
            .map_err(|e| unlade::error_chain(&e))?;
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
        Cmd::Images { cmd, root } => images(&root, cmd),
        Cmd::Gc { root } => {
            let r = open_root(&root)?
                .gc(&Cancel::new())
                .map_err(|e| unlade::error_chain(&e))?;
            let freed: u64 = r.blobs.iter().map(|(_, s)| s).sum();
            emit(&[format!(
                "removed {} snapshots, {} blobs ({freed} bytes), {} links",
                r.snapshots.len(),
                r.blobs.len(),
                r.links
            )])
        }
        Cmd::Mounts {
            target,
            chain_id,
            root,
            rw,
        } => mounts(target, &chain_id, &root, rw),
        Cmd::Pull {
            reference,
            root,
            platform,
            plain_http,
            max_concurrent_downloads,
            hosts_dir,
            sync,
            parallel,
            quiet,
            json,
        } => pull(PullArgs {
            reference,
            root,
            platform,
            plain_http,
            max_downloads: max_concurrent_downloads,
            hosts_dir,
            sync,
            parallel,
            quiet,
            json,
        }),
        Cmd::Unpack {
            layout,
            root,
            platform,
            name,
            sync,
            sync_mode,
            parallel,
            quiet,
        } => unpack(UnpackArgs {
            layout,
            root,
            platform,
            name,
            sync: sync.then_some(sync_mode),
            parallel,
            quiet,
        }),
        Cmd::Apply {
            layer,
            dest,
            diff_id,
            memory_cap,
            decode,
            quiet,
        } => {
            let diff_id = diff_id
                .map(|d| d.parse::<Digest>().map_err(|e| unlade::error_chain(&e)))
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
                ..ApplyOptions::default()
            };
            let input = if layer.as_os_str() == "-" {
                LayerInput::Stdin
            } else {
                LayerInput::Path(layer)
            };
            let started = std::time::Instant::now();
            let r = apply_layer(input, &dest, &opts).map_err(|e| unlade::error_chain(&e))?;
            warn(&r.warnings);
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

/// Prints warnings on stderr, one line each (even with `--quiet`: the
/// layer was not applied exactly as written).
fn warn(lines: &[String]) {
    for l in lines {
        eprintln!("unlade: warning: {l}");
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
