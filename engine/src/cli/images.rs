//! `unlade images ls|rm`: the image records.

use std::path::Path;

use super::{emit, open_existing, or_dash, Result};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// List images: name, manifest digest, top chain ID, platform.
    Ls,
    /// Forget images (gc then removes what only they used).
    Rm {
        /// Image names.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

pub fn run(a: Args, root: &Path) -> Result {
    let root = open_existing(root)?;
    match a.cmd {
        Cmd::Ls => {
            let lines: Vec<String> = root
                .list_images()?
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
        Cmd::Rm { names } => {
            for n in names {
                root.remove_image(&n)?;
            }
            Ok(())
        }
    }
}
