//! Blobs where the ecosystem looks for them. The fast path downloads a
//! layer's blob into unlade's content store and applies it there, so
//! containerd's own content store never holds it: `ctr images check` calls
//! the image incomplete, `ctr images export` and `nerdctl save` fail, and a
//! P2P mirror serving peers from containerd's store (Spegel) has nothing to
//! serve. Once containerd has adopted a layer's snapshot, what becomes of
//! its blob is [`Blobs`]:
//!
//! - [`Blobs::HandOff`] (the daemon's default): written into containerd's
//!   content store through its content API, in the namespace of the
//!   Prepare (the first part of its key), then removed from unlade's. Each
//!   blob is written under a lease of its own (expiring after
//!   [`LEASE_EXPIRY`] should unlade die midway) that is deleted once the
//!   blob is committed: from then on the image's manifest, whose
//!   `containerd.io/gc.ref.content.l.<i>` labels containerd set when it
//!   fetched it, keeps the blob exactly as long as the image, as after
//!   containerd's own pull. A node holds each blob once; when unlade needs
//!   it again it fetches it.
//! - [`Blobs::Discard`]: removed from unlade's store, handed to no one
//!   (containerd's `discard_unpacked_layers`): the least disk, and export
//!   and check fail as before.
//! - [`Blobs::Keep`]: kept in unlade's store until `unlade gc`.
//!
//! The work runs on one task after the Prepare was answered, one blob at a
//! time from a bounded queue (a full queue drops the offer, the blob stays
//! in unlade's store), each step bounded by [`STEP_TIMEOUT`]: the hand-off
//! never delays a pull, and a containerd that does not answer delays only
//! the hand-off. A blob is removed from unlade only after containerd
//! committed it (or already had it); a failed hand-off leaves it where it
//! was, and a half-written ingest in containerd belongs to the lease, which
//! containerd's garbage collection removes once it expires.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tonic::metadata::MetadataValue;

use crate::containerd::metrics::Metrics;
use crate::containerd::proto::services::content::v1 as content;
use crate::containerd::proto::services::leases::v1 as leases;
use crate::oci::digest::Digest;
use crate::root::Root;

/// What becomes of a fast-path layer's blob once containerd adopted its
/// snapshot (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Blobs {
    /// Handed to containerd's content store, then removed from unlade's.
    #[default]
    HandOff,
    /// Kept in unlade's content store (until `unlade gc`).
    Keep,
    /// Removed from unlade's content store, handed to no one.
    Discard,
}

/// How long a lease keeps a hand-off's half-written ingest, should unlade
/// stop before it deletes the lease.
pub const LEASE_EXPIRY: Duration = Duration::from_secs(3600);
/// The longest one step of a hand-off (a call, one message of a write,
/// one read of the blob) may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Hand-offs waiting; more are dropped (their blobs stay in unlade's store).
const QUEUE: usize = 1024;
/// Bytes a write message carries (containerd takes messages of 16 MiB).
const CHUNK: usize = 1 << 20;

/// One layer's blob to hand off.
struct Job {
    namespace: String,
    digest: Digest,
}

/// The queue of hand-offs of one server.
pub(crate) struct HandOff {
    tx: tokio::sync::mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
}

/// What takes the hand-offs off the queue: [`Worker::run`], on the
/// server's runtime.
pub(crate) struct Worker {
    rx: tokio::sync::mpsc::Receiver<Job>,
    blobs: Blobs,
    root: Arc<Root>,
    /// containerd's socket, dialled once the worker runs.
    containerd: PathBuf,
    metrics: Arc<Metrics>,
}

/// How one hand-off ended: the `result` label of
/// `unlade_blob_handoffs_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    /// Written into containerd's store, removed from unlade's.
    HandedOff(u64),
    /// containerd had it already; removed from unlade's.
    Present,
    /// Removed from unlade's store ([`Blobs::Discard`]).
    Discarded,
    /// unlade's store did not have it (handed off or removed before).
    Absent,
}

impl HandOff {
    /// The queue, and the worker to run on the server's runtime; `None`
    /// for [`Blobs::Keep`].
    pub(crate) fn new(
        blobs: Blobs,
        containerd: PathBuf,
        root: Arc<Root>,
        metrics: Arc<Metrics>,
    ) -> Option<(HandOff, Worker)> {
        if blobs == Blobs::Keep {
            return None;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        Some((
            HandOff {
                tx,
                metrics: metrics.clone(),
            },
            Worker {
                rx,
                blobs,
                root,
                containerd,
                metrics,
            },
        ))
    }

    /// Offers the blob `digest` of a layer whose snapshot containerd
    /// adopted on a Prepare of `key` (containerd's backend key,
    /// `<namespace>/<sequence>/<name>`).
    pub(crate) fn offer(&self, key: &str, digest: Digest) {
        let Some(namespace) = namespace_of(key) else {
            return;
        };
        let job = Job {
            namespace: namespace.to_string(),
            digest,
        };
        if self.tx.try_send(job).is_err() {
            self.metrics.handoff("dropped", 0);
        }
    }
}

/// The namespace of a backend key, if it is one containerd could have made
/// (letters, digits, `.`, `_`, `-`; at most 76 bytes).
fn namespace_of(key: &str) -> Option<&str> {
    let (ns, _) = key.split_once('/')?;
    let ok = !ns.is_empty()
        && ns.len() <= 76
        && ns.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    ok.then_some(ns)
}

/// A failed step, one line.
type Failed = String;

impl Worker {
    /// Hands off what is offered, one blob at a time, until the queue's
    /// sender is dropped or the task is.
    pub(crate) async fn run(mut self) {
        // Made here: the channel needs the runtime.
        let channel = crate::containerd::client::channel(self.containerd.clone());
        while let Some(job) = self.rx.recv().await {
            let t = std::time::Instant::now();
            match self.one(&job, &channel).await {
                Ok(done) => {
                    let (result, bytes) = match done {
                        Done::HandedOff(n) => ("handed_off", n),
                        Done::Present => ("present", 0),
                        Done::Discarded => ("discarded", 0),
                        Done::Absent => ("absent", 0),
                    };
                    self.metrics.handoff(result, bytes);
                    if done != Done::Absent {
                        tracing::debug!(
                            namespace = %job.namespace,
                            digest = %job.digest,
                            result,
                            bytes,
                            seconds = t.elapsed().as_secs_f64(),
                            "blob hand-off"
                        );
                    }
                }
                Err(why) => {
                    self.metrics.handoff("failed", 0);
                    tracing::warn!(
                        namespace = %job.namespace,
                        digest = %job.digest,
                        why = %why,
                        "blob not handed to containerd; unlade keeps it"
                    );
                }
            }
        }
    }

    async fn one(&self, job: &Job, channel: &tonic::transport::Channel) -> Result<Done, Failed> {
        let root = self.root.clone();
        let d = job.digest;
        let path = root.content().path(&d);
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Done::Absent),
            Err(e) => return Err(format!("open {}: {e}", path.display())),
        };
        let done = match self.blobs {
            Blobs::Discard => Done::Discarded,
            Blobs::Keep => return Ok(Done::Absent),
            Blobs::HandOff => self.write(job, file, channel).await?,
        };
        // Only now is unlade's copy not needed.
        let removed = tokio::task::spawn_blocking(move || root.remove_blob(&d))
            .await
            .map_err(|e| format!("remove {d} from unlade's store: {e}"))?;
        removed.map_err(|e| {
            format!(
                "remove {d} from unlade's store: {}",
                crate::report::error_chain(&e)
            )
        })?;
        Ok(done)
    }

    /// A request carrying the namespace (and lease) containerd reads.
    fn request<T>(
        &self,
        msg: T,
        ns: &str,
        lease: Option<&str>,
    ) -> Result<tonic::Request<T>, Failed> {
        let mut r = tonic::Request::new(msg);
        let value =
            |v: &str| MetadataValue::try_from(v).map_err(|_| format!("not a header value: {v:?}"));
        r.metadata_mut().insert("containerd-namespace", value(ns)?);
        if let Some(l) = lease {
            r.metadata_mut().insert("containerd-lease", value(l)?);
        }
        r.set_timeout(STEP_TIMEOUT);
        Ok(r)
    }

    /// Writes the blob in `file` into containerd's store, unless it is
    /// there already.
    async fn write(
        &self,
        job: &Job,
        file: tokio::fs::File,
        channel: &tonic::transport::Channel,
    ) -> Result<Done, Failed> {
        let ns = job.namespace.as_str();
        let d = job.digest.to_string();
        let mut store = content::content_client::ContentClient::new(channel.clone())
            .max_decoding_message_size(1 << 20);
        let info = store
            .info(self.request(content::InfoRequest { digest: d.clone() }, ns, None)?)
            .await;
        match info {
            Ok(_) => return Ok(Done::Present),
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => return Err(format!("containerd's content store: {}", s.message())),
        }
        let mut lessor = leases::leases_client::LeasesClient::new(channel.clone());
        let id = format!(
            "unlade-handoff-{}-{}",
            &job.digest.hex()[..12],
            crate::store::statedir::private_name()
        );
        let expires = std::time::SystemTime::now() + LEASE_EXPIRY;
        let expires = prost_types::Timestamp::from(expires);
        let expires = prost_types::Timestamp {
            seconds: expires.seconds,
            nanos: 0,
        };
        lessor
            .create(self.request(
                leases::CreateRequest {
                    id: id.clone(),
                    labels: [("containerd.io/gc.expire".to_string(), expires.to_string())].into(),
                },
                ns,
                None,
            )?)
            .await
            .map_err(|s| format!("create a lease in containerd: {}", s.message()))?;
        let written = self.stream(&mut store, ns, &id, &d, file).await;
        // The lease goes either way: a committed blob is the image's now,
        // a half-written ingest is containerd's to collect.
        let _ = lessor
            .delete(self.request(leases::DeleteRequest { id, sync: false }, ns, None)?)
            .await;
        written
    }

    /// The Write stream: the blob in messages of [`CHUNK`] bytes, each
    /// answered before the next is sent, the last one committing.
    async fn stream(
        &self,
        store: &mut content::content_client::ContentClient<tonic::transport::Channel>,
        ns: &str,
        lease: &str,
        d: &str,
        mut file: tokio::fs::File,
    ) -> Result<Done, Failed> {
        use content::{WriteAction, WriteContentRequest};
        let late = |what: &str| {
            format!(
                "containerd's content store: {what} took over {} s",
                STEP_TIMEOUT.as_secs()
            )
        };
        let refused = |s: tonic::Status| format!("containerd's content store: {}", s.message());
        let total = file
            .metadata()
            .await
            .map_err(|e| format!("stat {d}: {e}"))?
            .len();
        if i64::try_from(total).is_err() {
            return Err(format!("{d}: too large"));
        }
        let ingest = format!("unlade-{lease}");
        let mut buf = vec![0u8; CHUNK];
        let mut offset = 0u64;
        let mut w = Chunks {
            file: &mut file,
            buf: &mut buf,
            total,
            ingest: &ingest,
            digest: d,
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(1);
        let (first, mut end) = w.next(offset).await?;
        let mut committing = first.action == WriteAction::Commit as i32;
        // Queued before the call, which may wait for it.
        tx.send(first)
            .await
            .map_err(|_| "the write ended before it started".to_string())?;
        let mut req = self.request(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            ns,
            Some(lease),
        )?;
        // The stream lasts as long as the blob takes; each step is bounded
        // here instead.
        req.set_timeout(Duration::from_secs(24 * 3600));
        let mut answers = match tokio::time::timeout(STEP_TIMEOUT, store.write(req)).await {
            Err(_) => return Err(late("starting a write")),
            Ok(Err(s)) if s.code() == tonic::Code::AlreadyExists => return Ok(Done::Present),
            Ok(Err(s)) => return Err(refused(s)),
            Ok(Ok(r)) => r.into_inner(),
        };
        loop {
            let answer = match tokio::time::timeout(STEP_TIMEOUT, answers.message()).await {
                Err(_) => return Err(late("a write")),
                Ok(Err(s)) if s.code() == tonic::Code::AlreadyExists => return Ok(Done::Present),
                Ok(Err(s)) => return Err(refused(s)),
                Ok(Ok(None)) => return Err("containerd's content store ended the write".into()),
                Ok(Ok(Some(a))) => a,
            };
            if u64::try_from(answer.offset).ok() != Some(end) {
                return Err(format!(
                    "containerd's content store is at byte {} of {d}, not {end}",
                    answer.offset
                ));
            }
            if committing {
                if answer.digest != d {
                    return Err(format!("containerd committed {} for {d}", answer.digest));
                }
                return Ok(Done::HandedOff(total));
            }
            offset = end;
            let (m, e) = w.next(offset).await?;
            committing = m.action == WriteAction::Commit as i32;
            end = e;
            tx.send(m)
                .await
                .map_err(|_| "containerd's content store ended the write".to_string())?;
        }
    }
}

/// The messages of one Write stream, read from the blob's file.
struct Chunks<'a> {
    file: &'a mut tokio::fs::File,
    buf: &'a mut [u8],
    total: u64,
    ingest: &'a str,
    digest: &'a str,
}

impl Chunks<'_> {
    /// The message at `offset`: the next chunk, or the commit with the
    /// last; and the offset after it.
    async fn next(&mut self, offset: u64) -> Result<(content::WriteContentRequest, u64), Failed> {
        use content::WriteAction;
        let d = self.digest;
        let n = tokio::time::timeout(STEP_TIMEOUT, read_full(self.file, self.buf))
            .await
            .map_err(|_| format!("reading {d} took over {} s", STEP_TIMEOUT.as_secs()))?
            .map_err(|e| format!("read {d}: {e}"))?;
        let end = offset + n as u64;
        if n == 0 && end < self.total {
            return Err(format!("{d}: ended at {end} of {} bytes", self.total));
        }
        let action = if end >= self.total {
            WriteAction::Commit
        } else {
            WriteAction::Write
        };
        Ok((
            content::WriteContentRequest {
                action: action as i32,
                r#ref: self.ingest.to_string(),
                total: self.total as i64,
                expected: d.to_string(),
                offset: offset as i64,
                data: self.buf[..n].to_vec(),
                labels: Default::default(),
            },
            end,
        ))
    }
}

/// Fills `buf` from `file` unless the file ends first; the bytes read.
async fn read_full(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]).await? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_namespace_is_the_key_s_first_part_when_containerd_could_have_made_it() {
        assert_eq!(namespace_of("k8s.io/12/sha256:ab"), Some("k8s.io"));
        assert_eq!(namespace_of("default/3/x"), Some("default"));
        for bad in [
            "", "nokey", "/1/x", "a b/1/x", "ns\n/1/x", "-x/1/y", "é/1/x",
        ] {
            assert_eq!(namespace_of(bad), None, "{bad:?}");
        }
        let long = format!("{}/1/x", "n".repeat(77));
        assert_eq!(namespace_of(&long), None);
    }
}
