//! `unlade content ls|rm|ingest`: the content store. `ingest` adds, so
//! it creates the root if needed; `ls` and `rm` need one.

use std::path::{Path, PathBuf};

use unlade::root::{Root, RootOptions};
use unlade::store::durable::Durability;

use super::{digest, emit, open_existing, Result};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
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

pub fn run(a: Args, root: &Path) -> Result {
    match a.cmd {
        Cmd::Ls => {
            let lines: Vec<String> = open_existing(root)?
                .content()
                .list()?
                .into_iter()
                .map(|(d, size)| format!("{d}\t{size}"))
                .collect();
            emit(&lines)
        }
        Cmd::Rm { digests } => {
            let root = open_existing(root)?;
            for d in digests {
                let d = digest(&d)?;
                if !root.remove_blob(&d)? {
                    return Err(format!("blob {d} not found").into());
                }
            }
            Ok(())
        }
        Cmd::Ingest {
            digest: d,
            file,
            sync,
        } => {
            let d = digest(&d)?;
            let opts = RootOptions {
                durability: if sync {
                    Durability::Written
                } else {
                    Durability::None
                },
                ..RootOptions::default()
            };
            // The input first: a mistyped FILE creates no root.
            let input: Box<dyn std::io::Read> = if file.as_os_str() == "-" {
                Box::new(std::io::stdin().lock())
            } else {
                Box::new(
                    std::fs::File::open(&file)
                        .map_err(|e| format!("open {}: {e}", file.display()))?,
                )
            };
            let r = Root::open(root, opts)?.content().ingest(&d, input, None)?;
            let how = if r.published {
                "published"
            } else {
                "already present"
            };
            emit(&[format!("{} bytes, {how}", r.size), d.to_string()])
        }
    }
}
