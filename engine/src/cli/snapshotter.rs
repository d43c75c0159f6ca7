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
    #[arg(long, default_value = "/run/unlade/snapshotter.sock")]
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
}

pub fn run(a: Args, root: &Path) -> Result {
    // Makes the root (and checks it is one) before containerd can call.
    let root = Arc::new(Root::open(root, RootOptions::default())?);
    let fast = (!a.no_fast_path).then(|| PullOptions {
        remote: RemoteOptions {
            plain_http: a.plain_http,
            hosts_dir: Some(a.hosts_dir.clone()),
            ..Default::default()
        },
        platform: None,
        record_as: None,
        require_chain: None,
    });
    let interrupts = signals::watch()?;
    eprintln!(
        "unlade: serving containerd's snapshots API for {} on {}",
        root.dir().display(),
        a.address.display()
    );
    unlade::containerd::serve(root, &a.address, fast, interrupts.cancel())?;
    Ok(())
}
