//! `unlade pull REF`: an image from a registry into committed snapshots,
//! each layer applied while it downloads. Creates the root if needed.
//! Interruptible (SIGINT, SIGTERM: see [`super::signals`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use unlade::root::{Root, RootOptions};
use unlade::source::remote::RemoteOptions;
use unlade::store::durable::Durability;
use unlade::{PullOptions, Reference};

use super::{emit, progress, signals, warn, FetchArgs, ImageArgs, Result};

#[derive(clap::Args)]
pub struct Args {
    /// The image reference: `redis`, `host:port/repo:tag`,
    /// `repo@sha256:…`, `repo:tag@sha256:…`.
    reference: String,
    #[command(flatten)]
    image: ImageArgs,
    /// Talk plain HTTP to the registry (when no hosts.toml says
    /// otherwise).
    #[arg(long)]
    plain_http: bool,
    /// Most blobs downloaded at once.
    #[arg(long, value_name = "N", default_value_t = 3)]
    max_concurrent_downloads: usize,
    #[command(flatten)]
    fetch: FetchArgs,
    /// A registry silent for this many seconds, or a download delivering
    /// less than 64 KiB in as long, is a stall: tried once more, then
    /// given up (a split blob's chunk goes on over one stream).
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(super::config::range::STALL_TIMEOUT))]
    stall_timeout: u64,
    /// Directory of per-registry `hosts.toml` files (containerd's
    /// format: mirrors, plain HTTP, CA).
    #[arg(long, value_name = "DIR", default_value = "/etc/unlade/certs.d")]
    hosts_dir: PathBuf,
    /// Make every snapshot, blob and record durable before it is
    /// visible (as `unpack --sync`).
    #[arg(long)]
    sync: bool,
    /// Print a JSON summary (digests, chain IDs, bytes, time per
    /// stage) before the chain ID.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args, root: &Path) -> Result {
    let started = std::time::Instant::now();
    let reference = Reference::parse(&a.reference)?;
    let platform = a.image.platform()?;
    let mut opts = RootOptions {
        durability: if a.sync {
            Durability::Written
        } else {
            Durability::None
        },
        max_downloads: a.max_concurrent_downloads.max(1),
        ..RootOptions::default()
    };
    a.image.apply_to(&mut opts);
    a.fetch.apply_to(&mut opts, None);
    let stall = std::time::Duration::from_secs(a.stall_timeout);
    opts.retry.stall.window = stall;
    let retry = opts.retry;
    let interrupts = signals::watch()?;
    let root = Root::open(root, opts)?;
    let popts = PullOptions {
        remote: RemoteOptions {
            plain_http: a.plain_http,
            hosts_dir: Some(a.hosts_dir),
            read_timeout: stall,
            retry,
            ..Default::default()
        },
        platform,
        record_as: None,
        require_chain: None,
    };
    let display = (!a.image.quiet).then(progress::Display::new);
    let r = root.pull(
        &reference,
        &popts,
        display.clone().map(|d| d as Arc<dyn unlade::Progress>),
        interrupts.cancel(),
    );
    if let Some(d) = &display {
        d.finish();
    }
    let p = r.map_err(|e| interrupts.explain(e))?;
    warn(&p.unpacked.warnings);
    let stats = root.stats();
    let mut out = Vec::new();
    if a.json {
        out.push(p.summary_json(stats, started.elapsed()).to_string());
    } else if !a.image.quiet {
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
        None => return Err(format!("image {} has no layers: nothing to mount", p.name).into()),
    }
    emit(&out)
}
