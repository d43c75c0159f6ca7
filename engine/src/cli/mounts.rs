//! `unlade mounts TARGET CHAINID [--rw KEY]`: the mount command of a
//! committed snapshot, or of a new writable one on top of it.

use std::path::{Path, PathBuf};

use unlade::Cancel;

use super::{digest, emit, open_existing, Result};

#[derive(clap::Args)]
pub struct Args {
    /// Where the mount command mounts.
    target: PathBuf,
    /// The committed snapshot (an image's top chain ID).
    #[arg(value_name = "sha256:HEX")]
    chain_id: String,
    /// Create writable snapshot KEY on top and mount that.
    #[arg(long, value_name = "KEY")]
    rw: Option<String>,
}

pub fn run(a: Args, root: &Path) -> Result {
    let root = open_existing(root)?;
    let chain = digest(&a.chain_id)?;
    let m = match a.rw {
        None => root.mounts(&chain)?,
        Some(key) => root.prepare_rw(&key, Some(&chain), &Cancel::new())?,
    };
    emit(&[m.command_line(&a.target)])
}
