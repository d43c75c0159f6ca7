//! `unlade containerd-config`: prints the TOML to merge into containerd's
//! config.toml for unlade, written for the containerd version installed
//! (or named), since the keys differ between 1.6, 1.7 and 2.x.

use std::path::{Path, PathBuf};

use unlade::containerd::config::{self, ConfigOptions, ContainerdVersion, PullMode};

use super::{emit, Result};

#[derive(clap::Args)]
pub struct Args {
    /// The containerd version to write for (MAJOR.MINOR, e.g. 1.6, 1.7,
    /// 2.1); without it, `--containerd`'s `--version` says.
    #[arg(long, value_name = "V")]
    containerd_version: Option<ContainerdVersion>,
    /// The containerd binary whose version is asked when
    /// --containerd-version is not given (a name is looked up in PATH).
    #[arg(long, value_name = "PATH", default_value = "containerd")]
    containerd: PathBuf,
    /// The socket `unlade snapshotter` serves on.
    #[arg(long, value_name = "SOCK", default_value = config::DEFAULT_ADDRESS)]
    address: PathBuf,
    /// How CRI pulls: `transfer` (containerd 2.1's default; 2.1 and later
    /// only) or `local`. Default: the version's own.
    #[arg(long, value_enum)]
    pull_mode: Option<PullMode>,
    /// containerd's root (its config's `root`): containerd 1.6 tells
    /// kubelet that images live below it.
    #[arg(long, value_name = "DIR", default_value = config::DEFAULT_CONTAINERD_ROOT)]
    containerd_root: PathBuf,
}

/// Prints the configuration; unlade's root is `--root`. Relative paths
/// are made absolute against the current directory.
pub fn run(a: Args, root: &Path) -> Result {
    let version = match a.containerd_version {
        Some(v) => v,
        None => config::detect(&a.containerd)?,
    };
    let mut opts = ConfigOptions::new(
        version,
        &std::path::absolute(&a.address)?,
        &std::path::absolute(root)?,
    )?
    .containerd_root(&std::path::absolute(&a.containerd_root)?)?;
    if let Some(mode) = a.pull_mode {
        opts = opts.pull_mode(mode)?;
    }
    let text = config::render(&opts);
    emit(&text.lines().map(str::to_string).collect::<Vec<_>>())
}
