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
//! - [`service`]: the gRPC methods over the store, their blocking work
//!   on a pool shared fairly between clients (`fair`), the fast path's
//!   pulls apart from it ([`fast::pulls`]).
//! - `conn`: each accepted connection, its HTTP/2 header blocks made
//!   acceptable to h2 (gRPC C-core clients send the socket path as
//!   `:authority`).
//! - `cri`: the CRI image service proxy (kubelet's
//!   `--image-service-endpoint`), which forwards every call to containerd
//!   and lends a PullImage's credentials to the fast path while it runs.
//! - [`serve`]: the server loop the `unlade snapshotter` command runs.

mod client;
pub mod config;
mod conn;
mod cri;
mod fair;
pub mod fast;
pub mod filter;
pub mod handoff;
pub mod metrics;
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

pub use fast::PullLimits;
pub use handoff::Blobs;
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
    /// The metrics address could not be listened on.
    #[error("listen for metrics on {addr}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// How [`serve`] runs, beyond its root and socket.
#[derive(Default)]
#[non_exhaustive]
pub struct ServeOptions {
    /// How to reach registries: with it, CRI's labelled Prepares make
    /// unlade pull images itself (see [`fast`]); without, unlade is a
    /// plain snapshotter.
    pub fast: Option<PullOptions>,
    /// How many fast-path pulls run at once, and for how long.
    pub limits: PullLimits,
    /// Called once the socket accepts calls (a daemon says it is ready
    /// here, not before).
    pub ready: Option<Box<dyn FnOnce() + Send>>,
    /// The CRI image service proxy to serve beside, if any.
    pub cri: Option<CriProxy>,
    /// Where to serve Prometheus metrics (`GET /metrics`, see
    /// [`metrics`]), if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// What becomes of a fast-path layer's blob once containerd adopted
    /// its snapshot ([`handoff`]); [`Blobs::Keep`] unless set (`unlade
    /// snapshotter` sets `HandOff`).
    pub blobs: Blobs,
    /// containerd's socket, where blobs are handed off.
    pub containerd: PathBuf,
}

/// The CRI image service proxy (kubelet's `--image-service-endpoint`):
/// every ImageService call on `listen` goes on to containerd's CRI on
/// `upstream` unchanged; a PullImage's `auth` (a pod's
/// `imagePullSecrets`) is lent to the fast path while the call runs, so
/// that private images take it too.
#[derive(Debug, Clone)]
pub struct CriProxy {
    /// The socket kubelet calls (made 0600, as the snapshotter's).
    pub listen: PathBuf,
    /// containerd's socket.
    pub upstream: PathBuf,
}

/// How long calls in flight may finish once the server is told to stop;
/// then it stops whatever is left (a client that never completes its
/// request, a store call stuck on another process's lock). Nothing is
/// half-done either way: every change to the store is one rename.
pub const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The most connections served at once; more wait in the listen backlog
/// until one closes. With HTTP/2's flow-control windows (1 MiB a
/// connection at most unread) this bounds what clients can make the
/// server hold before any handler runs.
const MAX_CONNECTIONS: usize = 256;

/// Accepts connections for tonic: each wrapped in [`conn::Conn`],
/// counted against [`MAX_CONNECTIONS`]; an accept that fails for want of
/// file descriptors or memory is tried again after a pause instead of in
/// a tight loop.
fn accept_loop(
    listener: tokio::net::UnixListener,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<conn::Conn<tokio::net::UnixStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = tokio::select! {
                a = listener.accept() => a,
                // tonic stopped listening.
                _ = tx.closed() => return,
            };
            match stream {
                Ok((s, _)) => {
                    let c = conn::Conn::new(s).holding(slot);
                    if tx.send(Ok(c)).await.is_err() {
                        return;
                    }
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) =>
                {
                    tracing::error!(error = %e, "accept failed; trying again in 100 ms");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                // A client that went away while it was accepted.
                Err(_) => {}
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

impl ServeOptions {
    /// Options with the fast path as `fast` says.
    pub fn new(fast: Option<PullOptions>) -> ServeOptions {
        ServeOptions {
            fast,
            ..Default::default()
        }
    }
}

/// Fails with [`ServeError::InUse`] when a server answers on `socket`, and
/// when something other than a socket is there; a socket nobody answers
/// on (left by a server that died) is fine, [`serve`] replaces it. A
/// caller runs this before it creates anything (the root), so that a
/// second server started by mistake leaves no trace.
pub fn refuse_live(socket: &Path) -> Result<(), ServeError> {
    use std::os::unix::fs::FileTypeExt;
    // Beyond sun_path, connect fails whether or not a server is there.
    if socket.as_os_str().len() >= 108 {
        return Err(ServeError::Io {
            op: "bind",
            path: socket.to_path_buf(),
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                "a unix socket's path is at most 107 bytes",
            ),
        });
    }
    match std::os::unix::net::UnixStream::connect(socket) {
        Ok(_) => Err(ServeError::InUse(socket.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => match std::fs::symlink_metadata(socket) {
            Ok(m) if m.file_type().is_socket() => Ok(()),
            Ok(_) => Err(ServeError::Io {
                op: "bind",
                path: socket.to_path_buf(),
                source: io::Error::new(io::ErrorKind::AlreadyExists, "not a socket"),
            }),
            Err(_) => Ok(()),
        },
    }
}

/// The socket, bound and private: its directory is made (0711, each
/// level made here, whatever the umask); the socket is bound inside a
/// private (0700) directory beside it, set to 0600 there and renamed into
/// place, so that it is never reachable with the umask's mode, and a
/// stale socket is replaced in one step. Holds an exclusive `flock` on
/// the directory meanwhile, so that two servers starting at once do not
/// both take the name.
fn bind_private(socket: &Path) -> Result<std::os::unix::net::UnixListener, ServeError> {
    use crate::store::statedir::{make_dir, make_dirs, private_name, PRIVATE};
    use std::os::fd::AsRawFd;
    let ioe = |op, source| ServeError::Io {
        op,
        path: socket.to_path_buf(),
        source,
    };
    let dir = socket
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    make_dirs(dir, 0o711).map_err(|e| ioe("create the directory of", e))?;
    let dirfd = std::fs::File::open(dir).map_err(|e| ioe("open the directory of", e))?;
    // A directory another user may write to (theirs, or open to all but
    // sticky-less) would let them replace the socket under containerd.
    {
        use std::os::unix::fs::MetadataExt;
        let md = dirfd
            .metadata()
            .map_err(|e| ioe("stat the directory of", e))?;
        let me = rustix::process::geteuid().as_raw();
        let shared = md.mode() & 0o002 != 0 && md.mode() & 0o1000 == 0;
        if (md.uid() != me && md.uid() != 0) || shared {
            return Err(ioe(
                "bind",
                io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "its directory is owned by uid {} with mode {:o}: another user could replace the socket",
                        md.uid(),
                        md.mode() & 0o7777
                    ),
                ),
            ));
        }
    }
    rustix::fs::flock(&dirfd, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| ioe("lock the directory of", e.into()))?;
    // Checked again under the lock: another server may have started.
    refuse_live(socket)?;
    let tmp = dir.join(format!(".unlade-{}", private_name()));
    make_dir(&tmp, PRIVATE).map_err(|e| ioe("create a private directory beside", e))?;
    let bound = (|| {
        let tmpfd = std::fs::File::open(&tmp)?;
        // sun_path holds 107 bytes: a long directory is named through
        // this process's fd of the private one.
        let direct = tmp.join("s");
        let at = if direct.as_os_str().len() < 100 {
            direct.clone()
        } else {
            PathBuf::from(format!("/proc/self/fd/{}/s", tmpfd.as_raw_fd()))
        };
        let l = std::os::unix::net::UnixListener::bind(&at)?;
        rustix::fs::chmodat(
            &tmpfd,
            "s",
            rustix::fs::Mode::from_raw_mode(0o600),
            rustix::fs::AtFlags::empty(),
        )?;
        std::fs::rename(&direct, socket)?;
        Ok(l)
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    bound.map_err(|e| ioe("bind", e))
}

/// [`bind_private`], non-blocking for tokio, with what the socket is (to
/// remove it at the end only if it is still this one).
fn bind_nonblocking(
    socket: &Path,
) -> Result<(std::os::unix::net::UnixListener, Option<std::fs::Metadata>), ServeError> {
    let l = bind_private(socket)?;
    let ours = std::fs::symlink_metadata(socket).ok();
    l.set_nonblocking(true).map_err(|source| ServeError::Io {
        op: "set up",
        path: socket.to_path_buf(),
        source,
    })?;
    Ok((l, ours))
}

/// Binds `socket` (replacing a stale one nobody answers on; see
/// [`refuse_live`]), then serves containerd's snapshots API for unlade
/// root `root` until `cancel` trips; then stops accepting, ends the fast
/// path's pulls, lets the other calls in flight finish for up to
/// [`STOP_GRACE`] and removes the socket. Blocks; runs its own small
/// tokio runtime (two workers; the store's file-system work on at most 16
/// threads of its own, the fast path's pulls on threads of theirs, at
/// most [`PullLimits::max_pulls`]).
pub fn serve(
    root: Arc<Root>,
    socket: &Path,
    opts: ServeOptions,
    cancel: &Cancel,
) -> Result<(), ServeError> {
    refuse_live(socket)?;
    if let Some(c) = &opts.cri {
        refuse_live(&c.listen)?;
    }
    let store = Arc::new(CtrStore::open(root)?);
    // The secrets the CRI proxy lends, where the fast path's pulls look.
    let keys = Arc::new(crate::source::remote::auth::Keyring::default());
    let fast = opts.fast.map(|mut f| {
        f.remote.keyring = Some(keys.clone());
        f
    });
    let metrics = Arc::new(metrics::Metrics::new(store.clone()));
    let handoff = handoff::HandOff::new(
        opts.blobs,
        opts.containerd.clone(),
        store.root().clone(),
        metrics.clone(),
        cancel.clone(),
    );
    let (handoff, handoff_worker) = match handoff {
        Some((h, w)) => (Some(Arc::new(h)), Some(w)),
        None => (None, None),
    };
    let service = Service::new(store, fast, opts.limits, metrics.clone(), handoff);
    let ioe = |op, source| ServeError::Io {
        op,
        path: socket.to_path_buf(),
        source,
    };
    let (listener, ours) = bind_nonblocking(socket)?;
    let cri = match &opts.cri {
        Some(c) => {
            let (l, ours) = bind_nonblocking(&c.listen)?;
            Some((c.clone(), l, ours))
        }
        None => None,
    };
    let cri_socket = cri.as_ref().map(|(c, _, ours)| (c.clone(), ours.clone()));
    let metrics_listener = match opts.metrics {
        Some(addr) => {
            let l = metrics::bind(addr).map_err(|source| ServeError::Metrics { addr, source })?;
            // The port bound, where the address asked for any (`:0`).
            let at = l
                .local_addr()
                .map_or_else(|_| addr.to_string(), |a| a.to_string());
            tracing::info!(address = %at, "serving metrics");
            Some(l)
        }
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .thread_name("unlade-grpc")
        .enable_all()
        .build()
        .map_err(|e| ioe("start the runtime for", e))?;
    let stop = cancel.signal().clone();
    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
    let ready = opts.ready;
    let result = rt.block_on(async {
        let listener =
            tokio::net::UnixListener::from_std(listener).map_err(|e| ioe("listen on", e))?;
        let incoming = accept_loop(listener);
        let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
        // The token's channel closes or sends when it trips; `done` ends
        // the wait when the server stops on its own (an error).
        let done = done_rx;
        tokio::task::spawn_blocking(move || {
            crossbeam_channel::select! {
                recv(stop) -> _ => {}
                recv(done) -> _ => {}
            }
            stopping_tx.send_replace(true);
        });
        let mut graceful = stopping.clone();
        let server = tonic::transport::Server::builder()
            .max_concurrent_streams(64)
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(60)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
            .http2_max_header_list_size(1 << 20)
            .add_service(service.clone().into_server())
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = graceful.wait_for(|s| *s).await;
            });
        // The proxy's server, if any: ending with an error (it never ends
        // otherwise before the stop) ends the whole server, so that a
        // supervisor restarts it rather than kubelet's image calls failing
        // behind a snapshotter that looks up.
        let mut proxy_failed: std::pin::Pin<
            Box<dyn std::future::Future<Output = ServeError> + Send>,
        > = Box::pin(std::future::pending());
        if let Some((c, l, _)) = cri {
            let l = tokio::net::UnixListener::from_std(l).map_err(|e| ServeError::Io {
                op: "listen on",
                path: c.listen.clone(),
                source: e,
            })?;
            let (v1, v1alpha2) = cri::services(c.upstream.clone(), keys.clone(), metrics.clone());
            let mut graceful = stopping.clone();
            let proxy = tonic::transport::Server::builder()
                .max_concurrent_streams(64)
                .http2_max_header_list_size(1 << 20)
                .add_service(v1)
                .add_service(v1alpha2)
                .serve_with_incoming_shutdown(accept_loop(l), async move {
                    let _ = graceful.wait_for(|s| *s).await;
                });
            proxy_failed = Box::pin(async move {
                match proxy.await {
                    Err(source) => ServeError::Serve {
                        path: c.listen.clone(),
                        source,
                    },
                    // Stopped gracefully: the server's own stop follows.
                    Ok(()) => std::future::pending().await,
                }
            });
        }
        // Dropped with the runtime when the server stops.
        if let Some(w) = handoff_worker {
            tokio::spawn(w.run());
        }
        if let Some(l) = metrics_listener {
            tokio::spawn(metrics::serve(l, metrics.clone()));
        }
        if let Some(ready) = ready {
            ready();
        }
        let mut forced = stopping.clone();
        tokio::select! {
            r = server => r.map_err(|source| ServeError::Serve {
                path: socket.to_path_buf(),
                source,
            }),
            e = &mut proxy_failed => Err(e),
            _ = async {
                let _ = forced.wait_for(|s| *s).await;
                // Prepares waiting for pulls answer now.
                service.shutdown();
                tokio::time::sleep(STOP_GRACE).await;
            } => {
                tracing::warn!(
                    grace_seconds = STOP_GRACE.as_secs(),
                    "stopped with calls still in flight"
                );
                Ok(())
            }
        }
    });
    // Removed only if still ours (not replaced meanwhile).
    let remove_ours = |path: &Path, ours: &Option<std::fs::Metadata>| {
        use std::os::unix::fs::MetadataExt;
        if let (Some(a), Ok(b)) = (ours, std::fs::symlink_metadata(path)) {
            if a.ino() == b.ino() && a.dev() == b.dev() {
                let _ = std::fs::remove_file(path);
            }
        }
    };
    remove_ours(socket, &ours);
    if let Some((c, ours)) = &cri_socket {
        remove_ours(&c.listen, ours);
    }
    // What is left: pulls' threads winding down (within a read timeout),
    // calls past the grace. The process may exit under them.
    drop(done_tx);
    rt.shutdown_background();
    result
}
