//! `unlade snapshotter`: serves containerd's snapshots API on a unix
//! socket until SIGINT or SIGTERM (then it finishes the calls in flight,
//! removes the socket and exits 0). containerd loads it with
//! `[proxy_plugins.unlade] type = "snapshot" address = "SOCKET"`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use unlade::source::remote::RemoteOptions;
use unlade::{PullOptions, Root, RootOptions};

use super::{signals, Result};

#[derive(clap::Args)]
pub struct Args {
    /// The unix socket to serve on (made, with its directory; a stale
    /// socket nobody answers on is replaced).
    #[arg(long, default_value = unlade::containerd::config::DEFAULT_ADDRESS)]
    address: PathBuf,
    /// Where registry `hosts.toml` files are, for the images unlade pulls
    /// itself on CRI's labelled Prepares (containerd's certs.d layout).
    #[arg(long, default_value = "/etc/unlade/certs.d")]
    hosts_dir: PathBuf,
    /// Plain HTTP to registries no hosts.toml describes (a local test
    /// registry).
    #[arg(long)]
    plain_http: bool,
    /// Serve as a plain snapshotter only: containerd fetches and applies
    /// every layer itself, labels or not.
    #[arg(long)]
    no_fast_path: bool,
    /// Fast-path pulls running at once (more wait without a thread).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    max_pulls: u32,
    /// Fast-path pulls running at once from one registry host, so that a
    /// registry that stops answering cannot take every slot.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    max_pulls_per_registry: u32,
    /// The longest a fast-path pull may take, in seconds.
    #[arg(long, default_value_t = 1800, value_parser = clap::value_parser!(u64).range(1..))]
    pull_timeout: u64,
    /// A registry silent for this many seconds, or a download delivering
    /// less than 64 KiB in as long, fails the pull.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    stall_timeout: u64,
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
}

pub fn run(a: Args, root: &Path) -> Result {
    // A second server on a live socket stops here, having made nothing.
    unlade::containerd::refuse_live(&a.address)?;
    if let Some(l) = &a.cri_listen {
        unlade::containerd::refuse_live(l)?;
    }
    let stall = std::time::Duration::from_secs(a.stall_timeout);
    let mut opts = RootOptions::default();
    a.fetch.apply_to(&mut opts);
    opts.retry.stall.window = stall;
    let retry = opts.retry;
    // Makes the root (and checks it is one) before containerd can call.
    let root = Arc::new(Root::open(root, opts)?);
    let fast = (!a.no_fast_path).then(|| PullOptions {
        remote: RemoteOptions {
            plain_http: a.plain_http,
            hosts_dir: Some(a.hosts_dir.clone()),
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
        max_pulls: a.max_pulls as usize,
        per_registry: a.max_pulls_per_registry as usize,
        deadline: std::time::Duration::from_secs(a.pull_timeout),
        read_timeout: stall,
    };
    opts.cri = a
        .cri_listen
        .clone()
        .zip(a.cri_upstream.clone())
        .map(|(listen, upstream)| unlade::containerd::CriProxy { listen, upstream });
    let (dir, sock) = (root.dir().to_path_buf(), a.address.clone());
    opts.ready = Some(Box::new(move || {
        eprintln!(
            "unlade: serving containerd's snapshots API for {} on {}",
            dir.display(),
            sock.display()
        );
        super::systemd::notify("READY=1");
    }));
    let served = unlade::containerd::serve(root, &a.address, opts, interrupts.cancel());
    super::systemd::notify("STOPPING=1");
    served?;
    Ok(())
}
