//! `unlade snapshotter`: serves containerd's snapshots API on a unix
//! socket until SIGINT or SIGTERM (then it finishes the calls in flight,
//! removes the socket and exits 0). containerd loads it with
//! `[proxy_plugins.unlade] type = "snapshot" address = "SOCKET"`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use unlade::containerd::Blobs;
use unlade::source::remote::RemoteOptions;
use unlade::{PullOptions, Root, RootOptions};

use super::logging::{self, parse_filter, LogFormat};
use super::{signals, Result};

/// Every setting may also come from the config file (`--config`,
/// [`super::config`]); a flag given here wins over it.
#[derive(clap::Args)]
pub struct Args {
    /// The config file [default: /etc/unlade/config.toml, if it exists].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The unix socket to serve on (made, with its directory; a stale
    /// socket nobody answers on is replaced) [default:
    /// /run/unlade/snapshotter.sock].
    #[arg(long)]
    address: Option<PathBuf>,
    /// Where registry `hosts.toml` files are, for the images unlade pulls
    /// itself on CRI's labelled Prepares (containerd's certs.d layout)
    /// [default: /etc/unlade/certs.d].
    #[arg(long)]
    hosts_dir: Option<PathBuf>,
    /// Plain HTTP to registries no hosts.toml describes (a local test
    /// registry).
    #[arg(long)]
    plain_http: bool,
    /// Serve as a plain snapshotter only: containerd fetches and applies
    /// every layer itself, labels or not.
    #[arg(long)]
    no_fast_path: bool,
    /// Fast-path pulls running at once (more wait without a thread)
    /// [default: 4].
    #[arg(long, value_parser = clap::value_parser!(u64).range(super::config::range::PULLS))]
    max_pulls: Option<u64>,
    /// Fast-path pulls running at once from one registry host, so that a
    /// registry that stops answering cannot take every slot [default: 2].
    #[arg(long, value_parser = clap::value_parser!(u64).range(super::config::range::PULLS))]
    max_pulls_per_registry: Option<u64>,
    /// The longest a fast-path pull may take, in seconds [default: 1800].
    #[arg(long, value_parser = clap::value_parser!(u64).range(super::config::range::PULL_TIMEOUT))]
    pull_timeout: Option<u64>,
    /// A registry silent for this many seconds, or a download delivering
    /// less than 64 KiB in as long, fails the pull [default: 60].
    #[arg(long, value_parser = clap::value_parser!(u64).range(super::config::range::STALL_TIMEOUT))]
    stall_timeout: Option<u64>,
    /// Also serve CRI's image service on this socket (0600), for
    /// kubelet's `--image-service-endpoint`: every call goes on to
    /// `--cri-upstream` unchanged, and a PullImage's credentials (a pod's
    /// imagePullSecrets) reach the fast path while it runs, so private
    /// images take it too.
    #[arg(long, requires = "cri_upstream")]
    cri_listen: Option<PathBuf>,
    /// containerd's socket, where the CRI proxy forwards.
    #[arg(long, requires = "cri_listen")]
    cri_upstream: Option<PathBuf>,
    #[command(flatten)]
    fetch: super::FetchArgs,
    /// Serve Prometheus metrics on this address (`GET /metrics`), such as
    /// 127.0.0.1:9837 [default: none].
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_address: Option<std::net::SocketAddr>,
    /// How log lines on stderr are written [default: text].
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Which events are logged: a level (error, warn, info, debug,
    /// trace, off) or a list of module=level with a default level
    /// (`info,unlade::containerd=debug`) [default: info].
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// What becomes of a fast-path layer's blob once containerd adopted
    /// its snapshot: handed to containerd's content store (so that `ctr
    /// images check` and export work, and a P2P mirror serves it), kept
    /// in unlade's store, or discarded [default: hand-off].
    #[arg(long, value_enum)]
    blobs: Option<Blobs>,
    /// containerd's socket, where blobs are handed off [default:
    /// --cri-upstream if given, else /run/containerd/containerd.sock].
    #[arg(long, value_name = "SOCKET")]
    containerd_address: Option<PathBuf>,
}

pub fn run(a: Args, root: Option<&Path>) -> Result {
    let file = match &a.config {
        Some(p) => super::config::load(p, true)?,
        None => super::config::load(Path::new(super::config::DEFAULT_PATH), false)?,
    };
    let filter = parse_filter(
        a.log_level
            .as_deref()
            .or(file.log_level.as_deref())
            .unwrap_or("info"),
    )
    .map_err(|e| format!("--log-level: {e}"))?;
    logging::init(
        a.log_format.or(file.log_format).unwrap_or(LogFormat::Text),
        filter,
    );
    let metrics = a.metrics_address.or(file.metrics_address);
    let root = root
        .map(Path::to_path_buf)
        .or(file.root.clone())
        .unwrap_or_else(|| PathBuf::from(super::DEFAULT_ROOT));
    let address = a
        .address
        .or(file.address.clone())
        .unwrap_or_else(|| PathBuf::from(unlade::containerd::config::DEFAULT_ADDRESS));
    let hosts_dir = a
        .hosts_dir
        .or(file.hosts_dir.clone())
        .unwrap_or_else(|| PathBuf::from("/etc/unlade/certs.d"));
    let plain_http = a.plain_http || file.plain_http.unwrap_or(false);
    let fast_path = !a.no_fast_path && file.fast_path.unwrap_or(true);
    let max_pulls = a.max_pulls.or(file.max_pulls).unwrap_or(4);
    let per_registry = a
        .max_pulls_per_registry
        .or(file.max_pulls_per_registry)
        .unwrap_or(2);
    let pull_timeout = a.pull_timeout.or(file.pull_timeout).unwrap_or(1800);
    let stall_timeout = a.stall_timeout.or(file.stall_timeout).unwrap_or(60);
    let cri = match (&a.cri_listen, &a.cri_upstream) {
        (Some(l), Some(u)) => Some((l.clone(), u.clone())),
        _ => file.cri_listen.clone().zip(file.cri_upstream.clone()),
    };
    let containerd = a
        .containerd_address
        .or(file.containerd_address.clone())
        .or(cri.as_ref().map(|c| c.1.clone()))
        .unwrap_or_else(|| PathBuf::from("/run/containerd/containerd.sock"));
    // A second server on a live socket stops here, having made nothing.
    unlade::containerd::refuse_live(&address)?;
    if let Some((l, _)) = &cri {
        unlade::containerd::refuse_live(l)?;
    }
    let stall = std::time::Duration::from_secs(stall_timeout);
    let mut opts = RootOptions::default();
    a.fetch.apply_to(&mut opts, Some(&file));
    opts.retry.stall.window = stall;
    let retry = opts.retry;
    // Makes the root (and checks it is one) before containerd can call.
    let root = Arc::new(Root::open(&root, opts)?);
    let fast = fast_path.then(|| PullOptions {
        remote: RemoteOptions {
            plain_http,
            hosts_dir: Some(hosts_dir),
            read_timeout: stall,
            retry,
            ..Default::default()
        },
        platform: None,
        record_as: None,
        require_chain: None,
    });
    let interrupts = signals::watch()?;
    let mut opts = unlade::containerd::ServeOptions::new(fast);
    opts.limits = unlade::containerd::PullLimits {
        max_pulls: max_pulls as usize,
        per_registry: per_registry as usize,
        deadline: std::time::Duration::from_secs(pull_timeout),
        read_timeout: stall,
    };
    opts.cri = cri.map(|(listen, upstream)| unlade::containerd::CriProxy { listen, upstream });
    opts.metrics = metrics;
    opts.blobs = a.blobs.or(file.blobs).unwrap_or(Blobs::HandOff);
    opts.containerd = containerd;
    let (dir, sock) = (root.dir().to_path_buf(), address.clone());
    opts.ready = Some(Box::new(move || {
        tracing::info!(
            root = %dir.display(),
            address = %sock.display(),
            "serving containerd's snapshots API"
        );
        super::systemd::notify("READY=1");
    }));
    let served = unlade::containerd::serve(root, &address, opts, interrupts.cancel());
    super::systemd::notify("STOPPING=1");
    served?;
    Ok(())
}
