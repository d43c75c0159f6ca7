//! unlade as containerd's snapshotter: containerd's snapshots API
//! (`containerd.services.snapshots.v1`) served over gRPC on a unix socket,
//! which containerd loads as a proxy plugin:
//!
//! ```toml
//! [proxy_plugins.unlade]
//!   type = "snapshot"
//!   address = "/run/unlade/snapshotter.sock"
//! ```
//!
//! - [`store`]: the snapshots, under `ROOT/containerd`, the file system as
//!   the record.
//! - [`fast`]: the fast path, CRI pulls done by unlade's own pipeline.
//! - [`filter`]: containerd's filter syntax, for List.
//! - [`service`]: the gRPC methods over the store.
//! - [`serve`]: the server loop the `unlade snapshotter` command runs.

pub mod fast;
pub mod filter;
mod mount;
pub mod proto;
pub mod service;
pub mod store;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cancel::Cancel;
use crate::pipeline::pull::PullOptions;
use crate::root::Root;

pub use service::Service;
pub use store::{CtrError, CtrStore};

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Opening the store failed.
    #[error("open the snapshot store")]
    Store(#[from] CtrError),
    /// Another server answers on the socket.
    #[error("{} is in use: another snapshotter serves it", .0.display())]
    InUse(PathBuf),
    /// Setting up the socket or the runtime failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The socket.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The gRPC server stopped with an error.
    #[error("serve {}", path.display())]
    Serve {
        /// The socket.
        path: PathBuf,
        /// The error.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Binds `socket` (removing a stale one nobody answers on), then serves
/// containerd's snapshots API for unlade root `root` until `cancel`
/// trips; then stops accepting, lets calls in flight finish and removes
/// the socket. Blocks; runs its own small tokio runtime (two workers; the
/// file-system work goes to tokio's blocking pool, at most 16 threads).
/// With `fast` (how to reach registries), CRI's labelled Prepares make
/// unlade pull images itself (see [`fast`]).
pub fn serve(
    root: Arc<Root>,
    socket: &Path,
    fast: Option<PullOptions>,
    cancel: &Cancel,
) -> Result<(), ServeError> {
    let store = Arc::new(CtrStore::open(root, fast)?);
    let ioe = |op, source| ServeError::Io {
        op,
        path: socket.to_path_buf(),
        source,
    };
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| ioe("create the directory of", e))?;
    }
    match std::os::unix::net::UnixStream::connect(socket) {
        Ok(_) => return Err(ServeError::InUse(socket.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        // A socket left by a server that died, or something else there.
        Err(_) => {
            use std::os::unix::fs::FileTypeExt;
            match std::fs::symlink_metadata(socket) {
                Ok(m) if m.file_type().is_socket() => {
                    std::fs::remove_file(socket).map_err(|e| ioe("remove the stale socket", e))?
                }
                Ok(_) => {
                    return Err(ioe(
                        "bind",
                        io::Error::new(io::ErrorKind::AlreadyExists, "not a socket"),
                    ))
                }
                Err(_) => {}
            }
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(socket).map_err(|e| ioe("bind", e))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| ioe("chmod", e))?;
    }
    listener
        .set_nonblocking(true)
        .map_err(|e| ioe("set up", e))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .thread_name("unlade-grpc")
        .enable_all()
        .build()
        .map_err(|e| ioe("start the runtime for", e))?;
    let stop = cancel.signal().clone();
    let result = rt.block_on(async {
        let listener =
            tokio::net::UnixListener::from_std(listener).map_err(|e| ioe("listen on", e))?;
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let shutdown = async move {
            // The token's channel closes or sends when it trips.
            let _ = tokio::task::spawn_blocking(move || stop.recv()).await;
        };
        tonic::transport::Server::builder()
            .add_service(Service::new(store).into_server())
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(|source| ServeError::Serve {
                path: socket.to_path_buf(),
                source,
            })
    });
    let _ = std::fs::remove_file(socket);
    // Calls in flight have finished (graceful shutdown waits for them);
    // what is left is the wait on the token.
    rt.shutdown_background();
    result
}
