//! Blobs where the ecosystem looks for them. The fast path downloads a
//! layer's blob into unlade's content store and applies it there, so
//! containerd's own content store never holds it: `ctr images check` calls
//! the image incomplete, `ctr images export` and `nerdctl save` fail, and a
//! P2P mirror serving peers from containerd's store (Spegel) has nothing to
//! serve. Once containerd has adopted a layer's snapshot, what becomes of
//! its blob is [`Blobs`]:
//!
//! - [`Blobs::HandOff`] (the daemon's default): given to containerd's
//!   content store through its content API, in the namespace of the
//!   Prepare (the first part of its key), then removed from unlade's. Only
//!   a blob that the image's manifest in containerd's store references
//!   (the `containerd.io/gc.ref.content.l.<i>` labels containerd set when
//!   it fetched the manifest; the Prepare's labels name the manifest and
//!   the layer) is given: that reference then keeps it exactly as long as
//!   the image, as after containerd's own pull. A manifest without such
//!   labels (containerd's `discard_unpacked_layers`) means containerd keeps
//!   no layer blobs: unlade keeps none either. Each write runs under a
//!   lease of its own, deleted once the blob is committed or the write
//!   failed (and expiring after [`LEASE_EXPIRY`] should unlade stop
//!   midway), so nothing half-written outlives it. A blob containerd
//!   already has (in another namespace too: its store shares content) is
//!   not written again, only committed into the namespace; one unlade
//!   handed off earlier and no longer has is shared the same way. A node
//!   holds each blob once; when unlade needs it again it fetches it.
//! - [`Blobs::Discard`]: removed from unlade's store, given to no one
//!   (containerd's `discard_unpacked_layers`): the least disk, and export
//!   and check fail as before.
//! - [`Blobs::Keep`]: kept in unlade's store until `unlade gc`.
//!
//! The work runs on one task, queued as the Prepare is answered, one blob
//! at a time from a bounded queue (a full queue drops the offer: the blob
//! stays in unlade's store), each call and message bounded by
//! [`STEP_TIMEOUT`]: the hand-off never delays a pull, and a containerd that
//! does not answer delays only the hand-off. A blob leaves unlade's store
//! only after containerd committed it, already had it, or keeps no layer
//! blobs, and only while no unpack runs in the root
//! ([`Root::remove_blobs_when_idle`]), since a pull beside it may be about
//! to read it: removals wait on a task of their own, so that a long pull
//! holds them, not the hand-offs. A failed hand-off leaves the blob where
//! it was.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tonic::metadata::MetadataValue;

use crate::cancel::Cancel;
use crate::containerd::metrics::Metrics;
use crate::containerd::proto::services::content::v1 as content;
use crate::containerd::proto::services::leases::v1 as leases;
use crate::oci::digest::Digest;
use crate::root::Root;

/// What becomes of a fast-path layer's blob once containerd adopted its
/// snapshot (see the module docs). The library's default is `Keep`;
/// `unlade snapshotter`'s is `HandOff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Blobs {
    /// Given to containerd's content store, then removed from unlade's.
    HandOff,
    /// Kept in unlade's content store (until `unlade gc`).
    #[default]
    Keep,
    /// Removed from unlade's content store, given to no one.
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
/// Removals waiting for the root to be idle; more are dropped (the blobs
/// stay until `unlade gc`).
const REMOVALS: usize = 4096;
/// Bytes a write message carries (containerd takes messages of 16 MiB).
const CHUNK: usize = 1 << 20;
/// Write messages sent and not yet answered: reading and sending overlap
/// containerd's writing and hashing (one message at a time, the hand-off
/// of a 2.4 GB image took 11 s on 2 CPUs).
const WINDOW: usize = 4;
/// The label prefix by which a manifest references its layers.
const LAYER_REF: &str = "containerd.io/gc.ref.content.l.";

/// One layer's blob to hand off.
struct Job {
    namespace: String,
    digest: Digest,
    /// The image's manifest, whose labels must reference the layer.
    manifest: Option<Digest>,
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
    /// The server's stop: ends a removal's wait for the root.
    stop: Cancel,
}

/// How one hand-off ended: the `result` label of
/// `unlade_blob_handoffs_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    /// Written into containerd's store.
    HandedOff(u64),
    /// containerd had it (in this namespace, or shared from another).
    Present,
    /// The manifest in containerd's store references no layer blob
    /// (`discard_unpacked_layers`): containerd keeps none, nor does unlade.
    Unreferenced,
    /// Removed from unlade's store ([`Blobs::Discard`]).
    Discarded,
    /// Neither unlade's store nor containerd's had it.
    Absent,
}

impl Done {
    fn result(self) -> (&'static str, u64) {
        match self {
            Done::HandedOff(n) => ("handed_off", n),
            Done::Present => ("present", 0),
            Done::Unreferenced => ("unreferenced", 0),
            Done::Discarded => ("discarded", 0),
            Done::Absent => ("absent", 0),
        }
    }
}

impl HandOff {
    /// The queue, and the worker to run on the server's runtime; `None`
    /// for [`Blobs::Keep`]. `stop` is the server's.
    pub(crate) fn new(
        blobs: Blobs,
        containerd: PathBuf,
        root: Arc<Root>,
        metrics: Arc<Metrics>,
        stop: Cancel,
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
                stop,
            },
        ))
    }

    /// Offers the blob `digest` of a layer of the image whose manifest is
    /// `manifest`, once containerd adopted its snapshot on a Prepare of
    /// `key` (containerd's backend key, `<namespace>/<sequence>/<name>`).
    pub(crate) fn offer(&self, key: &str, digest: Digest, manifest: Option<Digest>) {
        let Some(namespace) = namespace_of(key) else {
            return;
        };
        let job = Job {
            namespace: namespace.to_string(),
            digest,
            manifest,
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

/// `f` within [`STEP_TIMEOUT`], or a line saying which step took too long.
async fn step<T>(what: &str, f: impl std::future::Future<Output = T>) -> Result<T, Failed> {
    tokio::time::timeout(STEP_TIMEOUT, f).await.map_err(|_| {
        format!(
            "containerd's content store: {what} took over {} s",
            STEP_TIMEOUT.as_secs()
        )
    })
}

/// A call's refusal, one line.
fn refused(what: &str, s: tonic::Status) -> Failed {
    format!("containerd's content store: {what}: {}", s.message())
}

impl Worker {
    /// Hands off what is offered, one blob at a time, until the queue's
    /// sender is dropped or the task is.
    pub(crate) async fn run(mut self) {
        // Made here: the channel needs the runtime.
        let channel = crate::containerd::client::channel(self.containerd.clone());
        let (removals, pending) = tokio::sync::mpsc::channel(REMOVALS);
        tokio::spawn(remove_when_idle(
            self.root.clone(),
            pending,
            self.stop.clone(),
        ));
        while let Some(job) = self.rx.recv().await {
            let t = std::time::Instant::now();
            match self.one(&job, &channel).await {
                Ok(done) => {
                    let (result, bytes) = done.result();
                    self.metrics.handoff(result, bytes);
                    if done != Done::Absent {
                        // Only now is unlade's copy not needed.
                        let _ = removals.try_send(job.digest);
                    }
                    tracing::debug!(
                        namespace = %job.namespace,
                        digest = %job.digest,
                        result,
                        bytes,
                        seconds = t.elapsed().as_secs_f64(),
                        "blob hand-off"
                    );
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
        let d = job.digest;
        let path = self.root.content().path(&d);
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("open {}: {e}", path.display())),
        };
        match self.blobs {
            Blobs::Keep => Ok(Done::Absent),
            Blobs::Discard if file.is_some() => Ok(Done::Discarded),
            Blobs::Discard => Ok(Done::Absent),
            Blobs::HandOff => self.give(job, file, channel).await,
        }
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

    /// Gives the blob (in `file`, if unlade still has it) to containerd's
    /// store, if the image's manifest there references it.
    async fn give(
        &self,
        job: &Job,
        file: Option<tokio::fs::File>,
        channel: &tonic::transport::Channel,
    ) -> Result<Done, Failed> {
        let ns = job.namespace.as_str();
        let d = job.digest.to_string();
        let mut store = content::content_client::ContentClient::new(channel.clone())
            .max_decoding_message_size(1 << 20);
        let Some(manifest) = job.manifest else {
            return Err("the Prepare named no manifest to check the layer against".into());
        };
        let info = |digest: String| {
            let mut store = store.clone();
            let req = self.request(content::InfoRequest { digest }, ns, None);
            async move {
                match step("Info", store.info(req?)).await? {
                    Ok(r) => Ok(r.into_inner().info),
                    Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
                    Err(s) => Err(refused("Info", s)),
                }
            }
        };
        let Some(m) = info(manifest.to_string()).await? else {
            return Err(format!("containerd has no manifest {manifest} in {ns}"));
        };
        let layers: Vec<&String> = m
            .labels
            .iter()
            .filter(|(k, _)| k.starts_with(LAYER_REF))
            .map(|(_, v)| v)
            .collect();
        if layers.is_empty() {
            return Ok(Done::Unreferenced);
        }
        if !layers.iter().any(|v| **v == d) {
            return Err(format!("manifest {manifest} does not reference {d}"));
        }
        if info(d.clone()).await?.is_some() {
            return Ok(Done::Present);
        }
        let mut lessor = leases::leases_client::LeasesClient::new(channel.clone());
        let id = format!(
            "unlade-handoff-{}-{}",
            &job.digest.hex()[..12],
            crate::store::statedir::private_name()
        );
        let expires = prost_types::Timestamp::from(std::time::SystemTime::now() + LEASE_EXPIRY);
        let expires = prost_types::Timestamp {
            seconds: expires.seconds,
            nanos: 0,
        };
        let create = self.request(
            leases::CreateRequest {
                id: id.clone(),
                labels: [("containerd.io/gc.expire".to_string(), expires.to_string())].into(),
            },
            ns,
            None,
        )?;
        step("creating a lease", lessor.create(create))
            .await?
            .map_err(|s| refused("creating a lease", s))?;
        let written = self.stream(&mut store, ns, &id, &d, file).await;
        // The lease goes either way: a committed blob is the image's now,
        // a half-written ingest goes with it.
        let delete = self.request(leases::DeleteRequest { id, sync: false }, ns, None)?;
        let _ = step("deleting a lease", lessor.delete(delete)).await;
        written
    }

    /// The Write stream: a Stat first (containerd may have the blob from
    /// another namespace: then a Commit without data shares it into this
    /// one), else the blob in messages of [`CHUNK`] bytes, the last one
    /// committing, up to [`WINDOW`] of them sent ahead of their answers.
    async fn stream(
        &self,
        store: &mut content::content_client::ContentClient<tonic::transport::Channel>,
        ns: &str,
        lease: &str,
        d: &str,
        file: Option<tokio::fs::File>,
    ) -> Result<Done, Failed> {
        use content::{WriteAction, WriteContentRequest};
        let ingest = format!("unlade-{lease}");
        let message =
            |action: WriteAction, offset: u64, total: u64, data: Vec<u8>| WriteContentRequest {
                action: action as i32,
                r#ref: ingest.clone(),
                total: total as i64,
                expected: d.to_string(),
                offset: offset as i64,
                data,
                labels: Default::default(),
            };
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(1);
        let send = |m| {
            let tx = tx.clone();
            async move {
                tx.send(m)
                    .await
                    .map_err(|_| "containerd's content store ended the write".to_string())
            }
        };
        // Queued before the call, which may wait for it.
        send(message(WriteAction::Stat, 0, 0, Vec::new())).await?;
        let mut req = self.request(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            ns,
            Some(lease),
        )?;
        // The stream lasts as long as the blob takes; each step is bounded
        // here instead.
        req.set_timeout(Duration::from_secs(24 * 3600));
        let mut answers = match step("starting a write", store.write(req)).await? {
            Err(s) if s.code() == tonic::Code::AlreadyExists => return Ok(Done::Present),
            Err(s) => return Err(refused("Write", s)),
            Ok(r) => r.into_inner(),
        };
        let Some(stat) = answer(&mut answers).await? else {
            return Ok(Done::Present);
        };
        // A fresh ingest (its ref is new) starts at 0, unless containerd
        // has the blob whole from another namespace: then committing
        // without data shares it into this one.
        if stat.offset > 0 {
            let have = stat.offset as u64;
            send(message(WriteAction::Commit, have, have, Vec::new())).await?;
            return match answer(&mut answers).await? {
                None => Ok(Done::Present),
                Some(a) if a.digest == d => Ok(Done::Present),
                Some(a) => Err(format!("containerd committed {} for {d}", a.digest)),
            };
        }
        let Some(mut file) = file else {
            return Ok(Done::Absent);
        };
        let total = file
            .metadata()
            .await
            .map_err(|e| format!("stat {d}: {e}"))?
            .len();
        if i64::try_from(total).is_err() {
            return Err(format!("{d}: too large"));
        }
        // The blob is read and sent while containerd writes and hashes
        // what came before: at most WINDOW messages unanswered. Each
        // answer is checked, in order, against the end of its message.
        let (ends_tx, mut ends_rx) = tokio::sync::mpsc::channel::<u64>(WINDOW);
        let sending = async move {
            let mut offset = 0u64;
            let result = loop {
                let mut data = vec![0u8; CHUNK];
                let n = step("reading the blob", read_full(&mut file, &mut data))
                    .await?
                    .map_err(|e| format!("read {d}: {e}"))?;
                data.truncate(n);
                let end = offset + n as u64;
                if n == 0 && end < total {
                    break Err(format!("{d}: ended at {end} of {total} bytes"));
                }
                let last = end >= total;
                let action = if last {
                    WriteAction::Commit
                } else {
                    WriteAction::Write
                };
                // A stream containerd ended: its answers say why.
                if send(message(action, offset, total, data)).await.is_err()
                    || ends_tx.send(end).await.is_err()
                    || last
                {
                    break Ok::<(), Failed>(());
                }
                offset = end;
            };
            // No more ends: the answers are drained, then the stream's end.
            drop(ends_tx);
            result
        };
        let answering = async move {
            while let Some(end) = ends_rx.recv().await {
                let Some(a) = answer(&mut answers).await? else {
                    return Ok(Done::Present);
                };
                if u64::try_from(a.offset).ok() != Some(end) {
                    return Err(format!(
                        "containerd's content store is at byte {} of {d}, not {end}",
                        a.offset
                    ));
                }
                if end >= total {
                    if a.digest != d {
                        return Err(format!("containerd committed {} for {d}", a.digest));
                    }
                    return Ok(Done::HandedOff(total));
                }
            }
            // The sending stopped early: containerd ended the stream.
            match answer(&mut answers).await? {
                None => Ok(Done::Present),
                Some(_) => Err("containerd's content store ended the write".into()),
            }
        };
        tokio::pin!(sending, answering);
        let mut sent = false;
        loop {
            tokio::select! {
                r = &mut sending, if !sent => {
                    r?;
                    sent = true;
                }
                done = &mut answering => return done,
            }
        }
    }
}

/// Removes the blobs `pending` sends from the root's store, each batch once
/// no unpack runs in the root, until the server stops.
async fn remove_when_idle(
    root: Arc<Root>,
    mut pending: tokio::sync::mpsc::Receiver<Digest>,
    stop: Cancel,
) {
    while let Some(first) = pending.recv().await {
        let mut batch = vec![first];
        while let Ok(d) = pending.try_recv() {
            batch.push(d);
        }
        let (root, stop) = (root.clone(), stop.clone());
        let removed =
            tokio::task::spawn_blocking(move || root.remove_blobs_when_idle(&batch, &stop)).await;
        match removed {
            Ok(Ok(_)) => {}
            Ok(Err(crate::root::RootError::Cancelled)) | Err(_) => return,
            Ok(Err(e)) => tracing::warn!(
                error = %crate::report::error_chain(&e),
                "handed-off blobs not removed from unlade's store"
            ),
        }
    }
}

/// The answer to the last message of a Write stream; `None` when
/// containerd says it has the blob already.
async fn answer(
    answers: &mut tonic::Streaming<content::WriteContentResponse>,
) -> Result<Option<content::WriteContentResponse>, Failed> {
    match step("a write", answers.message()).await? {
        Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(None),
        Err(s) => Err(refused("Write", s)),
        Ok(None) => Err("containerd's content store ended the write".into()),
        Ok(Some(a)) => Ok(Some(a)),
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
