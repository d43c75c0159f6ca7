//! The gRPC face: containerd's `Snapshots` service over [`CtrStore`]. Each
//! call runs the store's blocking file-system work on the server's
//! `FairPool` (a queue per client, served in turn), and maps
//! [`CtrError`] to the gRPC code containerd turns back into its own error
//! kind (`NotFound`, `AlreadyExists`, `FailedPrecondition`,
//! `InvalidArgument`; the rest `Internal`), with the whole error chain as
//! the message. A Prepare that takes the fast path goes through
//! `FastPath` first (see [`crate::containerd::fast`]); its [`Outcome`]
//! becomes the answer here.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status};

use crate::containerd::conn::ConnInfo;
use crate::containerd::fair::FairPool;
use crate::containerd::fast::{Ask, FastPath, Outcome, PullLimits};
use crate::containerd::filter::Filter;
use crate::containerd::handoff::HandOff;
use crate::containerd::metrics::Metrics;
use crate::containerd::proto::services::snapshots::v1 as pb;
use crate::containerd::proto::types;
use crate::containerd::store::{CtrError, CtrStore, Kind, LabelUpdate, Record};
use crate::pipeline::pull::PullOptions;
use crate::report::error_chain;
use crate::store::snapshot::Mount;

/// How many records one List response message carries at most.
const LIST_BATCH: usize = 100;
/// The bytes of records one List response message carries at most (one
/// larger record goes alone): records may hold up to 2 MiB of labels, and
/// clients refuse large messages (Go's gRPC: 4 MiB by default).
const LIST_BATCH_BYTES: usize = 1 << 20;
/// The largest response message encoded.
const MAX_RESPONSE: usize = 8 << 20;
/// Requests admitted at once (decoded, or running), in all and from one
/// client process: each may hold up to [`MAX_REQUEST`] while it is
/// decoded. Past either, a request is refused (`ResourceExhausted`) before
/// its body is read. containerd makes a handful at once.
const MAX_IN_FLIGHT: usize = 512;
/// See [`MAX_IN_FLIGHT`].
const MAX_IN_FLIGHT_PER_CLIENT: usize = 128;
/// The largest request message decoded: the largest legitimate one is a
/// Prepare or Commit with 256 labels of 4,096 bytes and two names of
/// 4,096 bytes, about 1.05 MiB. A larger one is refused from its length
/// prefix, before it is read.
pub const MAX_REQUEST: usize = 2 << 20;
/// The most field paths in an Update's mask (one per label, and `labels`).
const MAX_MASK_PATHS: usize = 257;

/// The store's threads: as many as tokio's blocking pool had.
const STORE_THREADS: usize = 16;
/// Calls one client may have waiting for a thread: what admission lets
/// in ([`MAX_IN_FLIGHT_PER_CLIENT`]), so that the pool bounds itself the
/// same way.
const QUEUED_PER_CLIENT: usize = MAX_IN_FLIGHT_PER_CLIENT;

/// containerd's snapshots service, backed by a [`CtrStore`].
#[derive(Clone)]
pub struct Service {
    store: Arc<CtrStore>,
    pool: FairPool,
    fast: Option<Arc<FastPath>>,
    metrics: Arc<Metrics>,
    handoff: Option<Arc<HandOff>>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// The requests admitted, in all and by client.
#[derive(Default)]
struct InFlight {
    total: usize,
    by_client: HashMap<u64, usize>,
}

/// One admitted request, counted until it is dropped (its handler holds
/// it to the end).
struct Admitted {
    counts: Arc<Mutex<InFlight>>,
    client: u64,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total -= 1;
        if let Some(n) = c.by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                c.by_client.remove(&self.client);
            }
        }
    }
}

/// The interceptor that admits requests before their bodies are decoded
/// (see `MAX_IN_FLIGHT`).
#[derive(Clone, Default)]
pub struct Admission(Arc<Mutex<InFlight>>);

impl tonic::service::Interceptor for Admission {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let client = client_of(&req);
        {
            let mut c = self.0.lock().unwrap_or_else(|p| p.into_inner());
            let mine = c.by_client.get(&client).copied().unwrap_or(0);
            if c.total >= MAX_IN_FLIGHT || mine >= MAX_IN_FLIGHT_PER_CLIENT {
                return Err(Status::resource_exhausted(format!(
                    "too many calls in flight ({mine} from this client, {} in all)",
                    c.total
                )));
            }
            c.total += 1;
            *c.by_client.entry(client).or_default() += 1;
        }
        req.extensions_mut().insert(Arc::new(Admitted {
            counts: self.0.clone(),
            client,
        }));
        Ok(req)
    }
}

/// A handler's client and its admission, taken out of the request so that
/// it lasts as long as the handler.
fn admitted<T>(req: &mut Request<T>) -> (u64, Option<Arc<Admitted>>) {
    (
        client_of(req),
        req.extensions_mut().remove::<Arc<Admitted>>(),
    )
}

/// Who made a call, for [`FairPool`]: the peer process (all of one
/// process's connections are one client), or the connection when the
/// peer's credentials are unknown.
fn client_of<T>(req: &Request<T>) -> u64 {
    match req.extensions().get::<ConnInfo>() {
        Some(ConnInfo { pid: Some(pid), .. }) => *pid as u32 as u64,
        Some(c) => (1 << 63) | c.id,
        None => 0,
    }
}

impl Service {
    /// The service over `store`; with `fast` (how to reach registries),
    /// CRI's labelled Prepares take the fast path, its pulls within
    /// `limits`.
    pub(crate) fn new(
        store: Arc<CtrStore>,
        fast: Option<PullOptions>,
        limits: PullLimits,
        metrics: Arc<Metrics>,
        handoff: Option<Arc<HandOff>>,
    ) -> Service {
        let pool = FairPool::new(STORE_THREADS, QUEUED_PER_CLIENT);
        Service {
            fast: fast.map(|o| Arc::new(FastPath::new(store.clone(), pool.clone(), o, limits))),
            store,
            pool,
            metrics,
            handoff,
        }
    }

    /// Ends the fast path's pulls (the server is stopping): the Prepares
    /// waiting for them fall back at once.
    pub(crate) fn shutdown(&self) {
        if let Some(f) = &self.fast {
            f.shutdown();
        }
    }

    /// The tonic service to add to a server: requests admitted before
    /// they are decoded ([`Admission`]), bounded in size both ways.
    pub fn into_server(
        self,
    ) -> tonic::service::interceptor::InterceptedService<
        pb::snapshots_server::SnapshotsServer<Service>,
        Admission,
    > {
        let server = pb::snapshots_server::SnapshotsServer::new(self)
            .max_decoding_message_size(MAX_REQUEST)
            .max_encoding_message_size(MAX_RESPONSE);
        tonic::service::interceptor::InterceptedService::new(server, Admission::default())
    }

    async fn run<T, F>(&self, client: u64, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&CtrStore) -> Result<T, CtrError> + Send + 'static,
    {
        let store = self.store.clone();
        match self.pool.run(client, move || f(&store)).await {
            Ok(r) => r.map_err(|e| status(&e)),
            Err(r) => Err(status(&r.into())),
        }
    }

    /// A Prepare: the fast path's first when its labels ask for it, then
    /// (unless it made the layer) a plain one.
    async fn prepare_snapshot(
        &self,
        client: u64,
        r: pb::PrepareSnapshotRequest,
    ) -> Result<Vec<Mount>, Status> {
        let labels = labels(r.labels);
        let ask = self
            .fast
            .as_ref()
            .and_then(|f| Some((f, Ask::of(&labels)?)));
        let mut fell_back = None;
        if let Some((fast, ask)) = ask {
            let outcome = fast
                .prepare(client, &ask, &r.key, &r.parent, &labels)
                .await
                .map_err(|e| {
                    let s = status(&e);
                    self.metrics.prepare_failed(s.code());
                    s
                })?;
            self.metrics.prepared(&outcome);
            match outcome {
                Outcome::Adopted(stats) => {
                    if let Some(s) = stats {
                        s.log();
                    }
                    // containerd has the layer: its blob can go where
                    // containerd looks for it.
                    if let (Some(h), Some(layer)) = (&self.handoff, ask.layer) {
                        h.offer(&r.key, layer, ask.manifest);
                    }
                    return Err(Status::already_exists(format!(
                        "snapshot {:?} already exists",
                        ask.target
                    )));
                }
                Outcome::NameTaken => {}
                Outcome::FallBack(f) => {
                    tracing::warn!(
                        image = %ask.image(),
                        layer = %ask.layer.map_or_else(|| "?".into(), |d| d.to_string()),
                        chain = %ask.chain,
                        reason = f.reason,
                        error = f.error.unwrap_or("none"),
                        why = %f.why,
                        "falls back to containerd"
                    );
                    fell_back = Some(ask.image());
                }
            }
        }
        self.run(client, move |s| match fell_back {
            Some(image) => s.create_fallen_back(&r.key, &r.parent, labels, &image),
            None => s.create(&r.key, &r.parent, labels, false),
        })
        .await
    }
}

/// The gRPC status for `e`.
pub fn status(e: &CtrError) -> Status {
    let msg = error_chain(e);
    match e {
        CtrError::NotFound(_) => Status::not_found(msg),
        CtrError::AlreadyExists(_) => Status::already_exists(msg),
        CtrError::FailedPrecondition { .. } => Status::failed_precondition(msg),
        CtrError::InvalidArgument(_) => Status::invalid_argument(msg),
        CtrError::Busy(_) => Status::resource_exhausted(msg),
        _ => Status::internal(msg),
    }
}

fn to_pb_mounts(m: Vec<Mount>) -> Vec<types::Mount> {
    m.into_iter()
        .map(|m| types::Mount {
            r#type: m.kind.to_string(),
            source: m.source.to_string_lossy().into_owned(),
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn timestamp(ns: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ns / 1_000_000_000) as i64,
        nanos: (ns % 1_000_000_000) as i32,
    }
}

fn to_pb_info(r: Record) -> pb::Info {
    pb::Info {
        name: r.name,
        parent: r.parent,
        kind: match r.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(r.created_ns)),
        updated_at: Some(timestamp(r.updated_ns)),
        labels: r.labels.into_iter().collect(),
    }
}

fn labels(m: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

/// What an Update's field mask asks for: only labels may change.
fn label_update(mask: Option<prost_types::FieldMask>) -> Result<LabelUpdate, Status> {
    let paths = mask.map(|m| m.paths).unwrap_or_default();
    if paths.len() > MAX_MASK_PATHS {
        return Err(Status::invalid_argument(format!(
            "an update mask of {} paths, more than {MAX_MASK_PATHS}",
            paths.len()
        )));
    }
    if paths.is_empty() {
        return Ok(LabelUpdate::All);
    }
    let mut keys = Vec::new();
    for p in paths {
        if p == "labels" {
            return Ok(LabelUpdate::All);
        }
        match p.strip_prefix("labels.") {
            Some(k) if !k.is_empty() => keys.push(k.to_string()),
            _ => {
                return Err(Status::invalid_argument(format!(
                    "cannot update field {p:?} of a snapshot: only labels change"
                )))
            }
        }
    }
    Ok(LabelUpdate::Keys(keys))
}

type ListStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::snapshots_server::Snapshots for Service {
    async fn prepare(
        &self,
        mut req: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let (client, _admitted) = admitted(&mut req);
        let m = self.prepare_snapshot(client, req.into_inner()).await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: to_pb_mounts(m),
        }))
    }

    async fn view(
        &self,
        mut req: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let (client, _admitted) = admitted(&mut req);
        let r = req.into_inner();
        let m = self
            .run(client, move |s| {
                s.create(&r.key, &r.parent, labels(r.labels), true)
            })
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: to_pb_mounts(m),
        }))
    }

    async fn mounts(
        &self,
        mut req: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let (client, _admitted) = admitted(&mut req);
        let r = req.into_inner();
        let m = self.run(client, move |s| s.mounts(&r.key)).await?;
        Ok(Response::new(pb::MountsResponse {
            mounts: to_pb_mounts(m),
        }))
    }

    async fn commit(
        &self,
        mut req: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let (client, _admitted) = admitted(&mut req);
        let r = req.into_inner();
        self.run(client, move |s| s.commit(&r.name, &r.key, labels(r.labels)))
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        mut req: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let (client, _admitted) = admitted(&mut req);
        let r = req.into_inner();
        self.run(client, move |s| s.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        mut req: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let (client, _admitted) = admitted(&mut req);
        let r = req.into_inner();
        let rec = self.run(client, move |s| s.stat(&r.key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(to_pb_info(rec)),
        }))
    }

    async fn update(
        &self,
        mut req: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let (client, _admitted) = admitted(&mut req);
        let r = req.into_inner();
        let how = label_update(r.update_mask)?;
        let info = r
            .info
            .ok_or_else(|| Status::invalid_argument("Update without info"))?;
        let rec = self
            .run(client, move |s| {
                s.update(&info.name, labels(info.labels), how)
            })
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(to_pb_info(rec)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        mut req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<ListStream>, Status> {
        let (client, _admitted) = admitted(&mut req);
        let r = req.into_inner();
        let filter = Filter::parse(&r.filters).map_err(|e| status(&e))?;
        let infos: Vec<pb::Info> = self
            .run(client, move |s| {
                Ok(s.list()?
                    .into_iter()
                    .filter(|r| filter.matches(r))
                    .map(to_pb_info)
                    .collect())
            })
            .await?;
        let mut batches: Vec<Result<pb::ListSnapshotsResponse, Status>> = Vec::new();
        let (mut batch, mut bytes) = (Vec::new(), 0);
        for info in infos {
            let n = prost::Message::encoded_len(&info);
            if !batch.is_empty() && (batch.len() >= LIST_BATCH || bytes + n > LIST_BATCH_BYTES) {
                batches.push(Ok(pb::ListSnapshotsResponse {
                    info: std::mem::take(&mut batch),
                }));
                bytes = 0;
            }
            bytes += n;
            batch.push(info);
        }
        if !batch.is_empty() {
            batches.push(Ok(pb::ListSnapshotsResponse { info: batch }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        mut req: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let (client, _admitted) = admitted(&mut req);
        let r = req.into_inner();
        let u = self.run(client, move |s| s.usage(&r.key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, mut req: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let (client, _admitted) = admitted(&mut req);
        self.run(client, |s| s.cleanup()).await?;
        Ok(Response::new(()))
    }
}
