//! The snapshotter's Prometheus metrics, served in the text format on
//! `--metrics-address` (`GET /metrics`): the root's work
//! ([`crate::pipeline::metrics::Stats`]: bytes fetched and written,
//! per-layer stage times, deduplication joins, retries, range fallbacks),
//! the fast path's pulls by outcome, the CRI proxy's calls, and, read at
//! each scrape, the snapshots and the disk the root holds.
//!
//! Labels take values from fixed sets (outcomes, reasons, error kinds,
//! method names, gRPC codes), never from what a client or registry says,
//! so no caller can grow the series without bound. The server answers one
//! path, reads at most [`MAX_REQUEST_HEAD`] of a request within
//! [`READ_TIMEOUT`], serves at most [`MAX_SCRAPERS`] connections at once,
//! and runs the scrape's file-system reads off the gRPC workers, one scrape
//! at a time: a scraper can slow itself, not the snapshotter.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::containerd::fast::{FellBack, Outcome};
use crate::containerd::store::CtrStore;

/// The most bytes of a request's head (request line and headers) read.
pub const MAX_REQUEST_HEAD: usize = 8 << 10;
/// How long a scraper may take to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest one scrape connection is served.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// The most scrape connections served at once; more wait in the backlog.
pub const MAX_SCRAPERS: usize = 8;

type Labels<const N: usize> = [(&'static str, &'static str); N];

/// The metrics of one server (see the module docs).
pub struct Metrics {
    registry: Registry,
    pulls: Family<Labels<3>, Counter>,
    prepares: Family<Labels<1>, Counter>,
    cri: Family<Labels<2>, Counter>,
    handoffs: Family<Labels<1>, Counter>,
    handed_off: Counter,
    snapshots: Family<Labels<1>, Gauge>,
    layers: Gauge,
    content: Gauge,
    filesystem: Family<Labels<1>, Gauge>,
    store: Arc<CtrStore>,
    /// One scrape reads the store at a time: taken (without a thread)
    /// before a render is started, held until it ends.
    scrape: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// The metrics of a server over `store` (and its root's).
    pub fn new(store: Arc<CtrStore>) -> Metrics {
        let mut registry = Registry::with_prefix("unlade");
        store.root().metrics().register(&mut registry);
        let m = Metrics {
            registry: Registry::default(),
            pulls: Family::default(),
            prepares: Family::default(),
            cri: Family::default(),
            handoffs: Family::default(),
            handed_off: Counter::default(),
            snapshots: Family::default(),
            layers: Gauge::default(),
            content: Gauge::default(),
            filesystem: Family::default(),
            store,
            scrape: Arc::new(tokio::sync::Mutex::new(())),
        };
        registry.register(
            "fast_path_pulls",
            "Images the fast path pulled for containerd (outcome fast_path), or whose pull \
             fell back to containerd (outcome fallback; reason and, for a failed pull, the \
             error's kind), or a labelled Prepare answered with an error (outcome error)",
            m.pulls.clone(),
        );
        registry.register(
            "fast_path_prepares",
            "Labelled Prepares by what the fast path did: adopted (answered AlreadyExists), \
             name_taken, fallback (the layer or one below it fell back), error",
            m.prepares.clone(),
        );
        registry.register(
            "cri_calls",
            "CRI image service calls the proxy forwarded to containerd, by method and gRPC code",
            m.cri.clone(),
        );
        registry.register(
            "blob_handoffs",
            "Fast-path layer blobs after containerd adopted their snapshots, by result: \
             handed_off (into containerd's content store), present (containerd had it), \
             unreferenced (containerd keeps no layer blobs: removed), discarded, \
             absent (neither had it), failed (unlade keeps it), dropped (queue full)",
            m.handoffs.clone(),
        );
        registry.register_with_unit(
            "handed_off",
            "Blob bytes written into containerd's content store",
            Unit::Bytes,
            m.handed_off.clone(),
        );
        registry.register(
            "snapshots",
            "containerd's snapshots in unlade's store, by kind (read at scrape)",
            m.snapshots.clone(),
        );
        registry.register(
            "committed_layers",
            "Committed layer snapshots of the root, shared by containerd's snapshots (read at scrape)",
            m.layers.clone(),
        );
        registry.register_with_unit(
            "content",
            "Blobs in the root's content store (read at scrape)",
            Unit::Bytes,
            m.content.clone(),
        );
        registry.register_with_unit(
            "root_filesystem",
            "The root's file system: size and free bytes (read at scrape)",
            Unit::Bytes,
            m.filesystem.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts what the fast path did with one labelled Prepare.
    pub(crate) fn prepared(&self, outcome: &Outcome) {
        let (prepare, pull): (_, Option<Labels<3>>) = match outcome {
            Outcome::Adopted(stats) => (
                "adopted",
                stats.as_ref().map(|_| {
                    [
                        ("outcome", "fast_path"),
                        ("reason", "none"),
                        ("error", "none"),
                    ]
                }),
            ),
            Outcome::NameTaken => ("name_taken", None),
            Outcome::FallBack(FellBack {
                reason,
                error,
                first,
                ..
            }) => (
                "fallback",
                // One pull however many Prepares waited for it, and the
                // layers above one that fell back follow it.
                (*first && *reason != "below_fell_back").then(|| {
                    [
                        ("outcome", "fallback"),
                        ("reason", reason),
                        ("error", error.unwrap_or("none")),
                    ]
                }),
            ),
        };
        self.prepares.get_or_create(&[("outcome", prepare)]).inc();
        if let Some(l) = pull {
            self.pulls.get_or_create(&l).inc();
        }
    }

    /// Counts a labelled Prepare answered with an error (`code`, the
    /// gRPC code's name).
    pub(crate) fn prepare_failed(&self, code: tonic::Code) {
        self.prepares.get_or_create(&[("outcome", "error")]).inc();
        self.pulls
            .get_or_create(&[
                ("outcome", "error"),
                ("reason", "request"),
                ("error", code_name(code)),
            ])
            .inc();
    }

    /// Counts one blob hand-off's `result` and the `bytes` it wrote.
    pub(crate) fn handoff(&self, result: &'static str, bytes: u64) {
        self.handoffs.get_or_create(&[("result", result)]).inc();
        self.handed_off.inc_by(bytes);
    }

    /// Counts one CRI call forwarded: `path` the call's method path,
    /// `code` its answer's.
    pub(crate) fn cri_call(&self, path: &str, code: tonic::Code) {
        let method = path.rsplit('/').next().unwrap_or("");
        let method = CRI_METHODS
            .iter()
            .find(|m| **m == method)
            .copied()
            .unwrap_or("other");
        self.cri
            .get_or_create(&[("method", method), ("code", code_name(code))])
            .inc();
    }

    /// Reads the store's state into the gauges and encodes every metric
    /// in Prometheus's text format. Blocking: reads directories.
    pub fn render(&self) -> String {
        if let Ok(records) = self.store.list() {
            for kind in ["active", "committed", "view"] {
                let n = records.iter().filter(|r| r.kind.as_str() == kind).count();
                self.snapshots
                    .get_or_create(&[("kind", kind)])
                    .set(n as i64);
            }
        }
        let root = self.store.root();
        if let Ok(layers) = root.snapshots().list() {
            self.layers.set(layers.len() as i64);
        }
        if let Ok(blobs) = root.content().list() {
            let bytes: u64 = blobs.iter().map(|b| b.1).sum();
            self.content.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        if let Ok(st) = rustix::fs::statvfs(root.dir()) {
            let block = st.f_frsize;
            let set = |state, blocks: u64| {
                let v = blocks.saturating_mul(block);
                self.filesystem
                    .get_or_create(&[("state", state)])
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            };
            set("size", st.f_blocks);
            set("free", st.f_bavail);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The CRI image service's methods (both versions), the `method` label's
/// values; anything else is `other`.
const CRI_METHODS: [&str; 5] = [
    "PullImage",
    "ImageStatus",
    "ListImages",
    "RemoveImage",
    "ImageFsInfo",
];

/// A gRPC code's name, as the `code` label.
fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match c {
        C::Ok => "OK",
        C::Cancelled => "Canceled",
        C::Unknown => "Unknown",
        C::InvalidArgument => "InvalidArgument",
        C::DeadlineExceeded => "DeadlineExceeded",
        C::NotFound => "NotFound",
        C::AlreadyExists => "AlreadyExists",
        C::PermissionDenied => "PermissionDenied",
        C::ResourceExhausted => "ResourceExhausted",
        C::FailedPrecondition => "FailedPrecondition",
        C::Aborted => "Aborted",
        C::OutOfRange => "OutOfRange",
        C::Unimplemented => "Unimplemented",
        C::Internal => "Internal",
        C::Unavailable => "Unavailable",
        C::DataLoss => "DataLoss",
        C::Unauthenticated => "Unauthenticated",
    }
}

/// Binds the metrics listener: before the server starts, so that a bad
/// address is an error at start, not a missing endpoint later.
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub(crate) async fn serve(listener: std::net::TcpListener, metrics: Arc<Metrics>) {
    use http_body_util::Full;
    use hyper::body::{Bytes, Incoming};
    use hyper::{Method, Request, Response, StatusCode};

    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPERS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                // Out of file descriptors or memory: pause, not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let answer = |status, body: String| {
                        let mut r = Response::new(Full::new(Bytes::from(body)));
                        *r.status_mut() = status;
                        r
                    };
                    let r = match (req.method(), req.uri().path()) {
                        (&Method::GET, "/metrics") => {
                            // Waited for here, where a scraper that leaves
                            // stops waiting: renders never queue up.
                            let one = metrics.scrape.clone().lock_owned().await;
                            let text = tokio::task::spawn_blocking(move || {
                                let text = metrics.render();
                                drop(one);
                                text
                            })
                            .await
                            .unwrap_or_default();
                            let mut r = answer(StatusCode::OK, text);
                            r.headers_mut().insert(
                                hyper::header::CONTENT_TYPE,
                                hyper::header::HeaderValue::from_static(
                                    "text/plain; version=0.0.4; charset=utf-8",
                                ),
                            );
                            r
                        }
                        (_, "/metrics") => {
                            answer(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into())
                        }
                        _ => answer(StatusCode::NOT_FOUND, "see /metrics\n".into()),
                    };
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .max_buf_size(MAX_REQUEST_HEAD)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // One request a connection, and a bound on the whole of it: a
            // scraper that stops reading its answer lets the slot go.
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
        });
    }
}
