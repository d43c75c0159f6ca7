//! A gRPC client of containerd's snapshots API for the tests: unary and
//! server-streaming calls over HTTP/2 (the `h2` crate) on a unix socket,
//! messages encoded with unlade's own prost types. It is written against
//! the wire, not against unlade's server code, so that tests can also send
//! what no well-behaved client sends (floods of streams, requests cut
//! short, connections dropped mid-call).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Buf, Bytes};
use prost::Message;

pub use unlade::containerd::proto::services::snapshots::v1 as pb;

/// A call's failure: the gRPC status code and message, or a transport
/// error (code -1).
#[derive(Debug, Clone)]
pub struct Status {
    /// gRPC status code (5 NotFound, 6 AlreadyExists, 3 InvalidArgument,
    /// 9 FailedPrecondition, 8 ResourceExhausted, 4 DeadlineExceeded,
    /// 14 Unavailable, 13 Internal), or -1 when the transport failed.
    pub code: i32,
    /// The message.
    pub message: String,
}

/// gRPC codes the tests look for.
pub mod code {
    /// The request is wrong.
    pub const INVALID_ARGUMENT: i32 = 3;
    /// The deadline or progress rule ended it.
    pub const DEADLINE_EXCEEDED: i32 = 4;
    /// No such snapshot.
    pub const NOT_FOUND: i32 = 5;
    /// The name is taken.
    pub const ALREADY_EXISTS: i32 = 6;
    /// A bound was hit.
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    /// Not in a state that allows it.
    pub const FAILED_PRECONDITION: i32 = 9;
    /// The server is going away, or the call was cancelled there.
    pub const UNAVAILABLE: i32 = 14;
}

const SERVICE: &str = "/containerd.services.snapshots.v1.Snapshots/";

/// One HTTP/2 connection to a snapshotter socket.
#[derive(Clone)]
pub struct Conn {
    send: h2::client::SendRequest<Bytes>,
}

/// Opens an HTTP/2 connection to `sock` (its driver runs on the current
/// tokio runtime).
pub async fn connect(sock: &Path) -> std::io::Result<Conn> {
    let io = tokio::net::UnixStream::connect(sock).await?;
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .handshake(io)
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Conn { send })
}

fn transport(e: impl std::fmt::Display) -> Status {
    Status {
        code: -1,
        message: e.to_string(),
    }
}

impl Conn {
    /// Calls `method` with the encoded request `body`; returns the
    /// response messages (one for a unary call).
    pub async fn call_raw(&self, method: &str, body: Vec<u8>) -> Result<Vec<Bytes>, Status> {
        self.call_path(&format!("{SERVICE}{method}"), body).await
    }

    /// Calls the method at `path` (`/package.Service/Method`, any
    /// service) with the encoded request `body`.
    pub async fn call_path(&self, path: &str, body: Vec<u8>) -> Result<Vec<Bytes>, Status> {
        let mut send = self.send.clone().ready().await.map_err(transport)?;
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("http://localhost{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .map_err(transport)?;
        let (resp, mut stream) = send.send_request(req, false).map_err(transport)?;
        let mut framed = Vec::with_capacity(body.len() + 5);
        framed.push(0);
        framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
        framed.extend_from_slice(&body);
        stream.send_data(framed.into(), true).map_err(transport)?;
        let resp = resp.await.map_err(transport)?;
        let (head, mut body) = resp.into_parts();
        if let Some(st) = status_of(&head.headers) {
            return Err(st);
        }
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(transport)?;
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await.map_err(transport)?;
        if let Some(st) = trailers.as_ref().and_then(status_of) {
            return Err(st);
        }
        let mut out = Vec::new();
        let mut buf = Bytes::from(data);
        while buf.remaining() >= 5 {
            buf.advance(1);
            let n = buf.get_u32() as usize;
            if buf.remaining() < n {
                return Err(transport("a response message cut short"));
            }
            out.push(buf.split_to(n));
        }
        Ok(out)
    }

    /// A unary call with a prost request and response.
    pub async fn call<R: Message + Default>(
        &self,
        method: &str,
        req: &impl Message,
    ) -> Result<R, Status> {
        let msgs = self.call_raw(method, req.encode_to_vec()).await?;
        let first = msgs.into_iter().next().unwrap_or_default();
        R::decode(first).map_err(transport)
    }
}

/// The status a header map carries, if it is not OK.
fn status_of(h: &http::HeaderMap) -> Option<Status> {
    let code: i32 = h.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    if code == 0 {
        return None;
    }
    let raw = h
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    Some(Status {
        code,
        message: crate::percent_decode(raw, false),
    })
}

/// Labels from pairs.
pub fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A blocking client: one connection and a small runtime of its own.
pub struct Client {
    /// The runtime its calls run on.
    pub rt: tokio::runtime::Runtime,
    /// The connection.
    pub conn: Conn,
    /// The socket.
    pub sock: PathBuf,
}

impl Client {
    /// Connects to `sock`.
    pub fn connect(sock: &Path) -> Client {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let conn = rt
            .block_on(connect(sock))
            .unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
        Client {
            rt,
            conn,
            sock: sock.to_path_buf(),
        }
    }

    /// Runs `f` on the client's runtime, giving up after `limit`.
    pub fn within<T>(
        &self,
        limit: Duration,
        f: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        self.rt
            .block_on(async { tokio::time::timeout(limit, f).await })
            .unwrap_or_else(|_| Err(transport(format!("no answer in {limit:?}"))))
    }

    fn unary<R: Message + Default>(&self, method: &str, req: &impl Message) -> Result<R, Status> {
        self.within(Duration::from_secs(120), self.conn.call(method, req))
    }

    /// Prepare: the mounts.
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<unlade::containerd::proto::types::Mount>, Status> {
        let r: pb::PrepareSnapshotResponse = self.unary(
            "Prepare",
            &pb::PrepareSnapshotRequest {
                snapshotter: "unlade".into(),
                key: key.into(),
                parent: parent.into(),
                labels,
            },
        )?;
        Ok(r.mounts)
    }

    /// View: the mounts.
    pub fn view(
        &self,
        key: &str,
        parent: &str,
    ) -> Result<Vec<unlade::containerd::proto::types::Mount>, Status> {
        let r: pb::ViewSnapshotResponse = self.unary(
            "View",
            &pb::ViewSnapshotRequest {
                snapshotter: "unlade".into(),
                key: key.into(),
                parent: parent.into(),
                labels: HashMap::new(),
            },
        )?;
        Ok(r.mounts)
    }

    /// Commit.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), Status> {
        self.unary::<()>(
            "Commit",
            &pb::CommitSnapshotRequest {
                snapshotter: "unlade".into(),
                name: name.into(),
                key: key.into(),
                labels,
            },
        )
    }

    /// Remove.
    pub fn remove(&self, key: &str) -> Result<(), Status> {
        self.unary::<()>(
            "Remove",
            &pb::RemoveSnapshotRequest {
                snapshotter: "unlade".into(),
                key: key.into(),
            },
        )
    }

    /// Stat.
    pub fn stat(&self, key: &str) -> Result<pb::Info, Status> {
        let r: pb::StatSnapshotResponse = self.unary(
            "Stat",
            &pb::StatSnapshotRequest {
                snapshotter: "unlade".into(),
                key: key.into(),
            },
        )?;
        r.info.ok_or_else(|| transport("Stat without info"))
    }

    /// Usage: (bytes, inodes).
    pub fn usage(&self, key: &str) -> Result<(i64, i64), Status> {
        let r: pb::UsageResponse = self.unary(
            "Usage",
            &pb::UsageRequest {
                snapshotter: "unlade".into(),
                key: key.into(),
            },
        )?;
        Ok((r.size, r.inodes))
    }

    /// List with `filters`: every record's info.
    pub fn list(&self, filters: &[String]) -> Result<Vec<pb::Info>, Status> {
        let req = pb::ListSnapshotsRequest {
            snapshotter: "unlade".into(),
            filters: filters.to_vec(),
        };
        let msgs = self.within(
            Duration::from_secs(120),
            self.conn.call_raw("List", req.encode_to_vec()),
        )?;
        let mut out = Vec::new();
        for m in msgs {
            out.extend(
                pb::ListSnapshotsResponse::decode(m)
                    .map_err(transport)?
                    .info,
            );
        }
        Ok(out)
    }

    /// Update with a field mask of `paths`.
    pub fn update(
        &self,
        name: &str,
        labels: HashMap<String, String>,
        paths: Vec<String>,
    ) -> Result<pb::Info, Status> {
        let r: pb::UpdateSnapshotResponse = self.unary(
            "Update",
            &pb::UpdateSnapshotRequest {
                snapshotter: "unlade".into(),
                info: Some(pb::Info {
                    name: name.into(),
                    labels,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            },
        )?;
        r.info.ok_or_else(|| transport("Update without info"))
    }
}
