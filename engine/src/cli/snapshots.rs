//! `unlade snapshots ls|rm`: committed snapshots by chain ID, writable
//! ones by key.

use std::path::Path;

use super::{digest, emit, open_existing, or_dash, Result};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
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

pub fn run(a: Args, root: &Path) -> Result {
    let root = open_existing(root)?;
    match a.cmd {
        Cmd::Ls => {
            let snaps = root.snapshots();
            let mut lines: Vec<String> = snaps
                .list()?
                .into_iter()
                .map(|i| format!("{}\t{}\tcommitted", i.chain_id, or_dash(i.parent)))
                .collect();
            lines.extend(
                snaps
                    .list_rw()?
                    .into_iter()
                    .map(|i| format!("{}\t{}\twritable", i.key, or_dash(i.parent))),
            );
            emit(&lines)
        }
        Cmd::Rm { names } => {
            for n in names {
                if n.starts_with("sha256:") {
                    root.remove_snapshot(&digest(&n)?)?;
                } else {
                    root.remove_rw(&n)?;
                }
            }
            Ok(())
        }
    }
}
