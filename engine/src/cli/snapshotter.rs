//! `unlade snapshotter`: serves containerd's snapshots API on a unix
//! socket until SIGINT or SIGTERM (then it finishes the calls in flight,
//! removes the socket and exits 0). containerd loads it with
//! `[proxy_plugins.unlade] type = "snapshot" address = "SOCKET"`.

use std::path::{Path, PathBuf};

use unlade::{Root, RootOptions};

use super::{signals, Result};

#[derive(clap::Args)]
pub struct Args {
    /// The unix socket to serve on (made, with its directory; a stale
    /// socket nobody answers on is replaced).
    #[arg(long, default_value = "/run/unlade/snapshotter.sock")]
    address: PathBuf,
}

pub fn run(a: Args, root: &Path) -> Result {
    // Makes the root (and checks it is one) before containerd can call.
    drop(Root::open(root, RootOptions::default())?);
    let interrupts = signals::watch()?;
    eprintln!(
        "unlade: serving containerd's snapshots API for {} on {}",
        root.display(),
        a.address.display()
    );
    unlade::containerd::serve(root, &a.address, interrupts.cancel())?;
    Ok(())
}
