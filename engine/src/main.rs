//! The `unlade` command line: a thin layer over the library. It parses,
//! hands each subcommand to its module under `cli/` (one library call,
//! its result printed; scripts rely on the last stdout line of each
//! command), prints a failure as one stderr line and maps it to the exit
//! code: 0, 1 for an error, 128 + N when signal N interrupted a pull or
//! unpack (`cli::signals`).
#![deny(unsafe_code)]

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "unlade",
    version,
    about = "Unpack container image layers into overlayfs snapshots"
)]
struct Cli {
    /// The unlade root. Only `pull`, `unpack` and `content ingest`
    /// create it; the other commands need an existing one [default:
    /// /var/lib/unlade; for `snapshotter`, its config file's `root` first].
    #[arg(long, global = true)]
    root: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Apply one layer blob (tar, gzip or zstd; `-` for stdin) to DEST as an
    /// overlay upper directory. The last stdout line is the diff ID.
    Apply(cli::apply::Args),
    /// Unpack an image from an OCI image-layout directory into committed
    /// snapshots, one per layer. The last stdout line is the image's top
    /// chain ID, for `unlade mounts`.
    Unpack(cli::unpack::Args),
    /// Pull an image from a registry into committed snapshots, one per
    /// layer, downloading each layer while it is applied. The last stdout
    /// line is the image's top chain ID, for `unlade mounts`.
    Pull(cli::pull::Args),
    /// Print, as the last stdout line, the `mount` command that mounts
    /// committed snapshot CHAINID read-only at TARGET, or with --rw a new
    /// writable snapshot KEY on top of it (as `ctr snapshots mounts`).
    /// For images of more than about 35 layers (up to 500) the line starts
    /// with `cd ROOT/snapshots/l && `: its options name the layers by
    /// short links there, to fit the kernel's 4096 bytes of options.
    Mounts(cli::mounts::Args),
    /// Image records: name, manifest, top chain ID.
    Images(cli::images::Args),
    /// Remove snapshots and blobs that no image and no writable snapshot
    /// references, printing each. Waits for running unpacks.
    Gc(cli::gc::Args),
    /// Snapshots under ROOT/snapshots: committed ones keyed by chain ID,
    /// writable ones by key.
    Snapshots(cli::snapshots::Args),
    /// The content store: blobs by digest under ROOT/content.
    Content(cli::content::Args),
    /// Serve containerd's snapshots API on a unix socket, as the proxy
    /// snapshotter plugin containerd loads with `[proxy_plugins.unlade]
    /// type = "snapshot" address = "SOCKET"`. Its snapshots live under
    /// ROOT/containerd. Runs until SIGINT or SIGTERM.
    Snapshotter(cli::snapshotter::Args),
    /// Print the TOML to merge into containerd's config.toml so that
    /// containerd (ctr and CRI) uses `unlade snapshotter`, written for the
    /// installed containerd's version (1.6, 1.7, 2.x) or
    /// --containerd-version. ROOT is unlade's root, as the snapshotter's.
    ContainerdConfig(cli::containerd_config::Args),
}

/// Directory fds are cached while applying; let the process have as many
/// open files as its hard limit allows.
fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        let _ = setrlimit(Resource::Nofile, l);
    }
}

fn run(cli: Cli) -> cli::Result {
    raise_nofile();
    let given = cli.root.as_deref();
    let default = PathBuf::from(cli::DEFAULT_ROOT);
    let root = given.unwrap_or(&default);
    match cli.cmd {
        Cmd::Apply(a) => cli::apply::run(a),
        Cmd::Unpack(a) => cli::unpack::run(a, root),
        Cmd::Pull(a) => cli::pull::run(a, root),
        Cmd::Mounts(a) => cli::mounts::run(a, root),
        Cmd::Images(a) => cli::images::run(a, root),
        Cmd::Gc(a) => cli::gc::run(a, root),
        Cmd::Snapshots(a) => cli::snapshots::run(a, root),
        Cmd::Content(a) => cli::content::run(a, root),
        Cmd::Snapshotter(a) => cli::snapshotter::run(a, given),
        Cmd::ContainerdConfig(a) => cli::containerd_config::run(a, root),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<cli::signals::Interrupted>() {
            Some(i) => {
                eprintln!("unlade: {i}");
                ExitCode::from(i.exit_code())
            }
            None => {
                eprintln!("unlade: error: {}", cli::error_line(&*e));
                ExitCode::from(1)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn root_is_global_and_the_old_values_parse() {
        let c = Cli::try_parse_from(["unlade", "images", "ls", "--root", "/r"]).unwrap();
        assert_eq!(c.root, Some(PathBuf::from("/r")));
        let c = Cli::try_parse_from(["unlade", "--root", "/r", "gc"]).unwrap();
        assert_eq!(c.root, Some(PathBuf::from("/r")));
        let c = Cli::try_parse_from(["unlade", "gc"]).unwrap();
        assert_eq!(c.root, None);
        for d in ["auto", "whole", "streaming"] {
            Cli::try_parse_from(["unlade", "apply", "l", "d", "--decode", d]).unwrap();
        }
        assert!(
            Cli::try_parse_from(["unlade", "apply", "l", "d", "--decode", "whole-buffer"]).is_err()
        );
        for m in ["written", "syncfs"] {
            Cli::try_parse_from(["unlade", "unpack", "x", "--sync", "--sync-mode", m]).unwrap();
        }
        assert!(
            Cli::try_parse_from(["unlade", "unpack", "x", "--sync", "--sync-mode", "none"])
                .is_err()
        );
        assert!(Cli::try_parse_from(["unlade", "unpack", "x", "--sync-mode", "written"]).is_err());
        Cli::try_parse_from([
            "unlade",
            "pull",
            "r",
            "--platform",
            "linux/arm64",
            "--parallel",
            "2",
            "-q",
            "--json",
            "--sync",
            "--plain-http",
            "--max-concurrent-downloads",
            "5",
            "--hosts-dir",
            "/h",
        ])
        .unwrap();
        let c = Cli::try_parse_from([
            "unlade",
            "containerd-config",
            "--containerd-version",
            "2.1",
            "--pull-mode",
            "local",
        ])
        .unwrap();
        assert!(matches!(c.cmd, Cmd::ContainerdConfig(_)));
        assert!(Cli::try_parse_from([
            "unlade",
            "containerd-config",
            "--containerd-version",
            "two"
        ])
        .is_err());
        assert!(
            Cli::try_parse_from(["unlade", "containerd-config", "--pull-mode", "remote"]).is_err()
        );
    }
}
