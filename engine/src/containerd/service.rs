//! The gRPC face: containerd's `Snapshots` service over [`CtrStore`]. Each
//! call runs the store's blocking file-system work on tokio's blocking
//! pool and maps [`CtrError`] to the gRPC code containerd turns back into
//! its own error kind (`NotFound`, `AlreadyExists`, `FailedPrecondition`,
//! `InvalidArgument`; the rest `Internal`), with the whole error chain as
//! the message.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::containerd::filter::Filter;
use crate::containerd::proto::services::snapshots::v1 as pb;
use crate::containerd::proto::types;
use crate::containerd::store::{CtrError, CtrStore, Kind, LabelUpdate, Record};
use crate::report::error_chain;
use crate::store::snapshot::Mount;

/// How many records one List response message carries.
const LIST_BATCH: usize = 100;

/// containerd's snapshots service, backed by a [`CtrStore`].
#[derive(Debug, Clone)]
pub struct Service {
    store: Arc<CtrStore>,
}

impl Service {
    /// The service over `store`.
    pub fn new(store: Arc<CtrStore>) -> Service {
        Service { store }
    }

    /// The tonic service to add to a server.
    pub fn into_server(self) -> pb::snapshots_server::SnapshotsServer<Service> {
        pb::snapshots_server::SnapshotsServer::new(self).max_decoding_message_size(16 << 20)
    }

    async fn run<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&CtrStore) -> Result<T, CtrError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Status::internal(format!("snapshotter task: {e}")))?
            .map_err(|e| status(&e))
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
        req: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        let m = self
            .run(move |s| s.create(&r.key, &r.parent, labels(r.labels), false))
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: to_pb_mounts(m),
        }))
    }

    async fn view(
        &self,
        req: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let m = self
            .run(move |s| s.create(&r.key, &r.parent, labels(r.labels), true))
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: to_pb_mounts(m),
        }))
    }

    async fn mounts(
        &self,
        req: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = req.into_inner();
        let m = self.run(move |s| s.mounts(&r.key)).await?;
        Ok(Response::new(pb::MountsResponse {
            mounts: to_pb_mounts(m),
        }))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.run(move |s| s.commit(&r.name, &r.key, labels(r.labels)))
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.run(move |s| s.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = req.into_inner();
        let rec = self.run(move |s| s.stat(&r.key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(to_pb_info(rec)),
        }))
    }

    async fn update(
        &self,
        req: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let how = label_update(r.update_mask)?;
        let info = r
            .info
            .ok_or_else(|| Status::invalid_argument("Update without info"))?;
        let rec = self
            .run(move |s| s.update(&info.name, labels(info.labels), how))
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(to_pb_info(rec)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<ListStream>, Status> {
        let r = req.into_inner();
        let filter = Filter::parse(&r.filters).map_err(|e| status(&e))?;
        let recs = self.run(|s| s.list()).await?;
        let infos: Vec<pb::Info> = recs
            .into_iter()
            .filter(|r| filter.matches(r))
            .map(to_pb_info)
            .collect();
        let batches: Vec<Result<pb::ListSnapshotsResponse, Status>> = infos
            .chunks(LIST_BATCH)
            .map(|c| Ok(pb::ListSnapshotsResponse { info: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        req: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = req.into_inner();
        let u = self.run(move |s| s.usage(&r.key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, _req: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        self.run(|s| s.cleanup()).await?;
        Ok(Response::new(()))
    }
}
