//! The unpack pipeline: a resolved image → one committed snapshot per
//! layer, each blob read once and each layer applied once however many
//! callers ask at the same time.
//!
//! For an image of layers `0..n` with chain IDs `c0..cn-1`:
//!
//! 1. The highest committed chain ID is found; nothing at or below it is
//!    read again (its blobs are not even opened).
//! 2. Every missing layer `i`, bottom first, is taken by one of a bounded
//!    pool of layer workers ([`layer_workers`]), which joins the flight
//!    `Snapshot(ci)`. Its leader takes the lock file of `ci` (so a second
//!    process waits for it), re-checks that `ci` is still missing, prepares
//!    an active snapshot on `ci-1` (which may itself still be in progress),
//!    and applies the blob into it — from the content store if the blob is
//!    there, otherwise from the source while a second thread copies the
//!    same bytes into the content store (flight `Blob(digest)`), verifying
//!    the digest. Up to `parallel_layers` applies run at once.
//! 3. After its apply, layer `i` waits for `ci-1` — the same flight, so it
//!    waits for whoever does it — and commits with one rename. Commits
//!    therefore happen in chain order while applies overlap.
//! 4. A hard link to a file of a lower layer waits the same way, then
//!    copies the file up (see `apply::lower`).
//! 5. The diff ID is checked against the config before the commit; on any
//!    failure the active snapshot is removed and nothing is committed. The
//!    first failure of an unpack cancels its other layers (work that other
//!    callers share is taken over by one of them).
//! 6. When the top layer is committed the image record is written.
//!
//! The whole unpack holds `gc.lock` shared, so gc never removes a snapshot
//! committed before the record that references it exists.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::cancel::Cancel;
use crate::layer::apply::{apply_layer, ApplyOptions, LayerInput, LowerLayers};
use crate::oci::digest::Digest;
use crate::oci::image::{Image, Layer, LayerKind};
use crate::pipeline::error::RootError;
use crate::pipeline::fetch::{FetchError, Growing};
use crate::pipeline::flight::{FlightError, Key, Role};
use crate::pipeline::metrics::{Stage, StageTimes};
use crate::pipeline::Context;
use crate::store::durable::Durability;
use crate::store::images::{ImageRecord, LayerRecord};

pub use crate::source::BlobSource;

/// What an unpack reports while it works, per layer (for a progress
/// display). Called from the layer threads: keep it quick.
pub trait Progress: Send + Sync {
    /// The unpack of `image` begins (before any event).
    fn start(&self, _image: &Image) {}
    /// Layer `index` (bottom = 0) of the image changed state.
    fn event(&self, index: usize, layer: &Layer, event: ProgressEvent);
}

/// One step of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProgressEvent {
    /// Committed before this unpack started: nothing to do.
    Present,
    /// Its blob is being fetched: bytes written so far.
    Fetching(u64),
    /// Its blob is complete in the content store.
    Fetched,
    /// Being applied (possibly while its blob still downloads).
    Applying,
    /// Committed, by this call or by another that did the work.
    Committed(Role),
}

/// What an unpack did.
#[derive(Debug, Clone)]
pub struct Unpacked {
    /// The image's top chain ID (None for an image without layers).
    pub top_chain: Option<Digest>,
    /// Chain IDs of every layer, bottom first.
    pub chain_ids: Vec<Digest>,
    /// Layers that were committed already when the unpack started.
    pub already: usize,
    /// Per layer above those: how this call got it.
    pub roles: Vec<(Digest, Role)>,
    /// What the layers this call applied did otherwise than they asked
    /// (see [`crate::ApplyReport::warnings`]), each line naming its layer.
    pub warnings: Vec<String>,
    /// The time each stage took, summed over the layers this call did
    /// itself (not those it waited for): fetch, decode, apply, commit.
    pub stages: StageTimes,
}

impl Unpacked {
    /// One JSON object per layer of `image` (the image this unpack did),
    /// bottom first: `digest`, `size`, `media_type`, `diff_id`,
    /// `chain_id` and `done` — `"present"` (committed before the unpack
    /// started), `"here"` (this call applied it, or took it over from a
    /// failed leader) or `"by another"` (another caller applied it while
    /// this one waited). Part of the machine-readable summary scripts read
    /// (`unlade pull --json`); kept here, beside what it describes, so
    /// that its keys change only with the fields they come from.
    pub fn layers_json(&self, image: &Image) -> Vec<serde_json::Value> {
        let roles: std::collections::HashMap<_, _> = self.roles.iter().cloned().collect();
        image
            .layers
            .iter()
            .map(|l| {
                serde_json::json!({
                    "digest": l.digest,
                    "size": l.size,
                    "media_type": l.media_type,
                    "diff_id": l.diff_id,
                    "chain_id": l.chain_id,
                    "done": match roles.get(&l.chain_id) {
                        None => "present",
                        Some(Role::Waited) => "by another",
                        Some(Role::Led | Role::TookOver) => "here",
                    },
                })
            })
            .collect()
    }
}

/// How one layer of an unpack ended.
type LayerResult = Result<Role, Arc<RootError>>;

/// How many layer workers one unpack runs: enough for every apply permit,
/// every download slot and as many layers again waiting for the commits
/// below them, never one per layer (a 10,000-layer manifest must not cost
/// 10,000 threads).
pub fn layer_workers(opts: &crate::pipeline::RootOptions, layers: usize) -> usize {
    (2 * opts.parallel_layers.max(1) + opts.max_downloads.max(1)).min(layers.max(1))
}

/// One unpack in progress: what its layer threads share.
struct Job {
    root: Context,
    image: Image,
    source: Arc<dyn BlobSource>,
    cancel: Cancel,
    progress: Option<Arc<dyn Progress>>,
    /// Blobs being downloaded for this job, whose readers a cancel wakes.
    growing: Mutex<Vec<std::sync::Weak<Growing>>>,
    /// Warnings of the layers this job applied.
    warnings: Mutex<Vec<String>>,
    /// The stage times of the layers this job did itself.
    stages: Mutex<StageTimes>,
}

impl Job {
    /// Stops every layer of this job: cancels, and wakes whatever they
    /// wait for (apply permits, download slots, growing blobs).
    fn stop(&self) {
        self.cancel.cancel();
        self.root.0.permits.wake_all();
        self.root.0.downloads.wake_all();
        self.root.0.connections.wake_all();
        let list = self.growing.lock().unwrap_or_else(|p| p.into_inner());
        for g in list.iter().filter_map(|w| w.upgrade()) {
            g.cancel();
        }
    }

    /// Records that one layer's `stage` took `d`: in the root's metrics
    /// and in this job's own sums.
    fn timed(&self, stage: Stage, d: std::time::Duration) {
        self.root.0.stats.observe(stage, d);
        self.stages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(stage, d);
    }

    fn report(&self, i: usize, e: ProgressEvent) {
        if let Some(p) = &self.progress {
            p.event(i, &self.image.layers[i], e);
        }
    }
}

/// The layers below layer `index` of a job, for hard links into them.
struct Below {
    job: Arc<Job>,
    index: usize,
}

impl std::fmt::Debug for Below {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "layers below {}", self.index)
    }
}

impl LowerLayers for Below {
    fn dirs(&self) -> Result<Vec<PathBuf>, crate::layer::error::ApplyError> {
        let Some(parent) = self.index.checked_sub(1) else {
            return Ok(Vec::new());
        };
        // Waiting holds no apply permit: the layers waited for may need it.
        let permits = &self.job.root.0.permits;
        permits.pause();
        let waited = ensure_layer(&self.job, parent);
        permits.resume();
        let lower = |op, e: RootError| {
            crate::layer::error::ApplyError::new(crate::layer::error::ErrorKind::Lower {
                op,
                source: Box::new(e),
            })
        };
        waited.map_err(|e| lower("wait for the layers below", unshare(e)))?;
        let chain = self.job.image.layers[parent].chain_id;
        self.job
            .root
            .0
            .snapshots
            .lower_dirs(&chain)
            .map_err(|e| lower("list the layers below", e.into()))
    }
}

impl Context {
    /// The work of [`Root::unpack_observed`](crate::Root::unpack_observed)
    /// (and of `Root::unpack`, without `progress`): see the module
    /// documentation for the steps.
    pub(crate) fn unpack_observed(
        &self,
        source: Arc<dyn BlobSource>,
        image: &Image,
        name: &str,
        progress: Option<Arc<dyn Progress>>,
        cancel: &Cancel,
    ) -> Result<Unpacked, RootError> {
        let _gc = self.gc_lock(false, cancel)?;
        for d in [image.manifest, image.config] {
            self.import_small(source.as_ref(), &d)?;
        }
        let chain_ids: Vec<Digest> = image.layers.iter().map(|l| l.chain_id).collect();
        let already = image
            .layers
            .iter()
            .rposition(|l| self.0.snapshots.stat(&l.chain_id).is_ok())
            .map_or(0, |i| i + 1);
        let job = Arc::new(Job {
            root: self.clone(),
            image: image.clone(),
            source,
            cancel: Cancel::new(),
            progress,
            growing: Mutex::new(Vec::new()),
            warnings: Mutex::new(Vec::new()),
            stages: Mutex::new(StageTimes::default()),
        });
        if let Some(p) = &job.progress {
            p.start(image);
        }
        for i in 0..already {
            job.report(i, ProgressEvent::Present);
        }
        let n = image.layers.len();
        let slots: Vec<Mutex<Option<LayerResult>>> =
            (already..n).map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(already);
        let spawned = std::thread::scope(|s| -> Result<(), RootError> {
            let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
            let thread = |what| move |source| RootError::Thread { what, source };
            // The caller's cancel stops this job's layers.
            let watcher = {
                let job = job.clone();
                let outer = cancel.clone();
                std::thread::Builder::new()
                    .name("unlade-cancel".into())
                    .spawn_scoped(s, move || {
                        crossbeam_channel::select! {
                            recv(outer.signal()) -> _ => job.stop(),
                            recv(done_rx) -> _ => {}
                        }
                    })
                    .map_err(thread("watch for cancellation"))?
            };
            // Workers take layers bottom first, so the lowest unfinished
            // layer always has one: a worker waiting for the commit below
            // it waits for work that is under way.
            let work = || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let r = if job.cancel.is_cancelled() {
                    Err(Arc::new(RootError::Cancelled))
                } else {
                    ensure_layer(&job, i)
                };
                // Counted here, not where a layer waits for its parent:
                // that is most often this unpack's own worker.
                if let Ok(Role::Waited) = r {
                    self.0.stats.joined("layer");
                }
                match &r {
                    Ok(role) => job.report(i, ProgressEvent::Committed(*role)),
                    Err(_) => job.stop(),
                }
                *slots[i - already].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            };
            let mut workers = Vec::new();
            let mut refused = None;
            for _ in 0..layer_workers(&self.0.opts, n - already) {
                match std::thread::Builder::new()
                    .name("unlade-layer".into())
                    .spawn_scoped(s, work)
                {
                    Ok(h) => workers.push(h),
                    // Fewer workers are slower, not wrong.
                    Err(e) => {
                        refused = Some(e);
                        break;
                    }
                }
            }
            let r = match refused {
                Some(e) if workers.is_empty() && n > already => {
                    job.stop();
                    Err(thread("apply layers")(e))
                }
                _ => Ok(()),
            };
            for w in workers {
                // A panicking worker leaves its layer's slot empty:
                // reported as cancelled below.
                if w.join().is_err() {
                    job.stop();
                }
            }
            drop(done_tx);
            let _ = watcher.join();
            r
        });
        spawned?;
        let results: Vec<LayerResult> = slots
            .into_iter()
            .map(|m| {
                m.into_inner()
                    .unwrap_or_else(|p| p.into_inner())
                    .unwrap_or(Err(Arc::new(RootError::Cancelled)))
            })
            .collect();
        let mut roles = Vec::new();
        let mut first_err: Option<Arc<RootError>> = None;
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(role) => roles.push((image.layers[already + i].chain_id, role)),
                Err(e) => {
                    // The cause, not the cancellations it caused.
                    let better = match &first_err {
                        None => true,
                        Some(f) => is_cancel(f) && !is_cancel(&e),
                    };
                    if better {
                        first_err = Some(e);
                    }
                }
            }
        }
        if let Some(e) = first_err {
            if cancel.is_cancelled() {
                return Err(RootError::Cancelled);
            }
            return Err(unshare(e));
        }
        let record = ImageRecord {
            name: name.to_string(),
            manifest: image.manifest,
            config: image.config,
            platform: image.platform.to_string(),
            layers: image
                .layers
                .iter()
                .map(|l| LayerRecord {
                    digest: l.digest,
                    size: l.size,
                    media_type: l.media_type.clone(),
                    diff_id: l.diff_id,
                    chain_id: l.chain_id,
                })
                .collect(),
            top_chain: chain_ids.last().copied(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        self.0
            .images
            .put(&record, self.0.opts.durability != Durability::None)?;
        let warnings = std::mem::take(&mut *job.warnings.lock().unwrap_or_else(|p| p.into_inner()));
        let stages = *job.stages.lock().unwrap_or_else(|p| p.into_inner());
        Ok(Unpacked {
            top_chain: chain_ids.last().copied(),
            chain_ids,
            already,
            roles,
            warnings,
            stages,
        })
    }

    /// Copies a small blob (manifest, config) into the content store.
    fn import_small(&self, source: &dyn BlobSource, d: &Digest) -> Result<(), RootError> {
        if self.0.content.contains(d) {
            return Ok(());
        }
        let cancel = Cancel::new();
        let r = source
            .open(d, 0, &cancel)
            .map_err(|e| source_error(source, d, e, ""))?;
        self.0
            .content
            .ingest(d, r, Some(crate::oci::image::MAX_JSON))?;
        Ok(())
    }
}

/// A source's failure to deliver blob `d` as this crate reports it.
fn source_error(
    source: &dyn BlobSource,
    d: &Digest,
    e: crate::source::SourceError,
    hint: &'static str,
) -> RootError {
    if e.kind == crate::source::SourceErrorKind::NotFound {
        RootError::MissingBlob {
            digest: *d,
            place: source.describe(),
            hint,
        }
    } else {
        RootError::Fetch(FetchError::Source {
            digest: *d,
            source: e,
        })
    }
}

/// A flight's outcome as this crate passes it on: a waiter's own
/// cancellation is an error like any other.
pub(crate) fn flown<T>(
    r: Result<(T, Role), FlightError<Arc<RootError>>>,
) -> Result<(T, Role), Arc<RootError>> {
    match r {
        Ok(v) => Ok(v),
        Err(FlightError::Cancelled) => Err(Arc::new(RootError::Cancelled)),
        Err(FlightError::Failed(e)) => Err(e),
    }
}

pub(crate) fn is_cancel(e: &RootError) -> bool {
    match e {
        RootError::Cancelled => true,
        RootError::Apply(a) => matches!(*a.kind, crate::layer::error::ErrorKind::Cancelled),
        RootError::Shared(s) => is_cancel(s),
        RootError::Layer { source, .. } => is_cancel(source),
        _ => false,
    }
}

/// An error this caller owns alone becomes a plain error again.
pub(crate) fn unshare(e: Arc<RootError>) -> RootError {
    Arc::try_unwrap(e).unwrap_or_else(RootError::Shared)
}

/// Makes sure layer `i` of the job is committed: joins (or leads) its
/// flight.
fn ensure_layer(job: &Arc<Job>, i: usize) -> Result<Role, Arc<RootError>> {
    let layer = &job.image.layers[i];
    let root = &job.root.0;
    if root.snapshots.stat(&layer.chain_id).is_ok() {
        return Ok(Role::Waited);
    }
    let adopt = |e: &Arc<RootError>| e.content_fault() == Some(layer.digest);
    let r = root
        .flights
        .run(Key::Snapshot(layer.chain_id), &job.cancel, adopt, || {
            lead_layer(job, i).map_err(Arc::new)
        });
    flown(r).map(|((), role)| role)
}

/// The leader's work for layer `i`: apply into a fresh active snapshot,
/// wait for the parent, commit.
fn lead_layer(job: &Arc<Job>, i: usize) -> Result<(), RootError> {
    let digest = job.image.layers[i].digest;
    lead_layer_inner(job, i).map_err(|e| match e {
        // These name the layer already, or are not about it.
        RootError::Apply(_)
        | RootError::MissingBlob { .. }
        | RootError::Content(crate::store::content::ContentError::DigestMismatch { .. })
        | RootError::Shared(_)
        | RootError::Layer { .. }
        | RootError::Cancelled => e,
        other => RootError::Layer {
            digest,
            source: Box::new(other),
        },
    })
}

fn lead_layer_inner(job: &Arc<Job>, i: usize) -> Result<(), RootError> {
    let layer = &job.image.layers[i];
    let root = &job.root;
    let _lock = root.file_lock(&Key::Snapshot(layer.chain_id).lock_name(), &job.cancel)?;
    if root.0.snapshots.stat(&layer.chain_id).is_ok() {
        // Another process committed it while we waited for its lock.
        root.0.stats.joined("layer");
        return Ok(());
    }
    let parent = i.checked_sub(1).map(|p| job.image.layers[p].chain_id);
    let active = root.0.snapshots.prepare_on(parent)?;
    let durability = root.0.opts.durability;
    let mut synced = std::time::Duration::ZERO;
    let applied = (|| {
        apply_blob(job, i, active.fs())?;
        // Outside the apply permit: overlaps the next layers' applies.
        let t = Instant::now();
        match durability {
            Durability::None => {}
            Durability::Syncfs => root.0.snapshots.sync_active(&active)?,
            Durability::Written => {
                crate::store::durable::sync_tree(active.dir()).map_err(|e| {
                    RootError::Snapshot(crate::store::snapshot::SnapshotError::Io(
                        crate::store::statedir::io_err(
                            crate::store::snapshot::STORE,
                            "sync",
                            active.dir(),
                            e,
                        ),
                    ))
                })?;
            }
        }
        synced = t.elapsed();
        if let Some(p) = i.checked_sub(1) {
            ensure_layer(job, p).map_err(unshare)?;
        }
        Ok(())
    })();
    match applied {
        Ok(()) => {
            let t = Instant::now();
            root.0.snapshots.commit(active, &layer.chain_id)?;
            if durability != Durability::None {
                root.0.snapshots.sync_commits()?;
            }
            job.timed(Stage::Commit, synced + t.elapsed());
            root.0.stats.layers_applied.inc();
            Ok(())
        }
        Err(e) => {
            root.0.snapshots.remove_active(active);
            Err(e)
        }
    }
}

/// Applies layer `i`'s blob into `dest`, checking its diff ID. A blob not
/// in the content store yet is copied there at the same time, and the
/// apply fails unless it matches its digest: a local file is applied in
/// place while a second thread copies it; a remote blob is downloaded into
/// the store while the apply reads the same file as it grows.
fn apply_blob(job: &Arc<Job>, i: usize, dest: PathBuf) -> Result<(), RootError> {
    let layer = &job.image.layers[i];
    let root = &job.root;
    let stored = root.0.content.contains(&layer.digest);
    let local = if stored {
        Some(LayerInput::Path(root.0.content.path(&layer.digest)))
    } else {
        match job.source.local_file(&layer.digest) {
            // Refused by its size before a byte is read.
            Ok(Some((_, size))) if size != layer.size => {
                return Err(source_error(
                    job.source.as_ref(),
                    &layer.digest,
                    crate::source::SourceError::fatal(format!(
                        "{}: {size} bytes, but the manifest says {}",
                        job.source.describe(),
                        layer.size
                    )),
                    "",
                ));
            }
            Ok(f) => f.map(|(f, _)| LayerInput::File(f)),
            Err(e) => return Err(source_error(job.source.as_ref(), &layer.digest, e, "")),
        }
    };
    let growing = local.is_none().then(|| {
        let g = Arc::new(Growing::new());
        job.growing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&g));
        if job.cancel.is_cancelled() {
            g.cancel();
        }
        g
    });
    let opts = ApplyOptions {
        decode: root.0.opts.decode,
        same_owner: None,
        diff_id: Some(layer.diff_id),
        cancel: Some(job.cancel.clone()),
        lower: Some(Arc::new(Below {
            job: job.clone(),
            index: i,
        })),
        pool: Some(root.pool()?),
        backend: root.0.opts.backend,
        // A stored blob was checked when stored; any other is copied into
        // the store beside this apply, and that copy checks it (its
        // failure below outranks the apply's result).
        verified_digest: Some(layer.digest),
    };
    // Whether this call copied the blob from this source into the store
    // (and so checked the very bytes a local file's apply reads).
    let copied = std::sync::atomic::AtomicBool::new(false);
    let local_input = !stored && local.is_some();
    let (applied, ingested) = std::thread::scope(|s| {
        // The download starts before the apply waits for its permit. A
        // thread the system refuses makes it happen first, whole: slower,
        // not wrong.
        let ing = (!stored).then(|| {
            std::thread::Builder::new()
                .name("unlade-fetch".into())
                .spawn_scoped(s, || ensure_blob(job, i, growing.as_deref(), &copied))
                .map_err(|_| ensure_blob(job, i, growing.as_deref(), &copied))
        });
        // Apply permits go in no order of layers (priority 0 for all).
        let permit = root.0.permits.acquire(0, &job.cancel);
        let applied = permit.ok_or(RootError::Cancelled).and_then(|permit| {
            job.report(i, ProgressEvent::Applying);
            let input = match (local, &growing) {
                (Some(input), _) => input,
                (None, Some(g)) => LayerInput::Reader(Box::new(g.reader())),
                (None, None) => unreachable!("a blob is local or downloaded"),
            };
            let t = Instant::now();
            let r = apply_layer(input, &dest, &opts)
                .map_err(|e| RootError::Apply(e.blob(layer.digest)));
            drop(permit);
            if let Ok(report) = &r {
                job.timed(Stage::Apply, t.elapsed());
                job.timed(Stage::Decode, report.decode_time);
                root.0.stats.bytes_written.inc_by(report.counts.bytes);
            }
            r
        });
        let ingested = match ing {
            None => Ok(()),
            Some(Ok(h)) => h.join().unwrap_or(Err(Arc::new(RootError::Cancelled))),
            Some(Err(done)) => done,
        };
        (applied, ingested)
    });
    // A blob that does not match its digest is the root cause of anything
    // the apply said about it.
    ingested.map_err(unshare)?;
    if applied.is_err() && job.cancel.is_cancelled() {
        return Err(RootError::Cancelled);
    }
    let report = applied?;
    if local_input
        && report.compression == crate::layer::decode::Compression::Plain
        && !copied.load(Ordering::Relaxed)
    {
        // The store got the blob from elsewhere (another process, or a
        // pull), so nothing checked the layout's own file, whose bytes
        // were applied without a second hash: check them now.
        check_local(job, &layer.digest)?;
    }
    if !report.warnings.is_empty() {
        let mut w = job.warnings.lock().unwrap_or_else(|p| p.into_inner());
        w.extend(
            report
                .warnings
                .into_iter()
                .map(|m| format!("layer {}: {m}", layer.digest)),
        );
    }
    Ok(())
}

/// Hashes the source's local file of `digest` and fails unless it
/// matches: for an uncompressed layer applied from a layout file that the
/// store did not get from that file.
fn check_local(job: &Arc<Job>, digest: &Digest) -> Result<(), RootError> {
    let fault = |e| source_error(job.source.as_ref(), digest, e, "");
    let Some((mut f, _)) = job.source.local_file(digest).map_err(fault)? else {
        return Ok(());
    };
    let mut h = crate::oci::digest::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match std::io::Read::read(&mut f, &mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(fault(crate::source::SourceError::fatal(format!(
                    "{}: read {digest}: {e}",
                    job.source.describe()
                ))))
            }
        }
    }
    let actual = h.finish();
    if actual != *digest {
        return Err(RootError::Content(
            crate::store::content::ContentError::DigestMismatch {
                expected: *digest,
                actual,
            },
        ));
    }
    Ok(())
}

/// Copies layer `i`'s blob into the content store once (flight `Blob`),
/// feeding `growing` (a download's readers) with the file or, when
/// another caller or process got the blob, with the published blob.
fn ensure_blob(
    job: &Arc<Job>,
    i: usize,
    growing: Option<&Growing>,
    copied: &std::sync::atomic::AtomicBool,
) -> Result<(), Arc<RootError>> {
    let layer = &job.image.layers[i];
    let root = &job.root;
    let adopt = |e: &Arc<RootError>| e.content_fault() == Some(layer.digest);
    let r = root
        .0
        .flights
        .run(Key::Blob(layer.digest), &job.cancel, adopt, || {
            fetch_blob(job, i, growing, copied).map_err(Arc::new)
        });
    let r = flown(r).map(|((), role)| {
        if role == Role::Waited {
            root.0.stats.joined("blob");
        }
    });
    match (&r, growing) {
        (Ok(()), Some(g)) => g.finish_at(root.0.content.path(&layer.digest)),
        (Err(e), Some(g)) => g.fail(crate::report::error_chain(&**e)),
        _ => {}
    }
    if r.is_ok() {
        job.report(i, ProgressEvent::Fetched);
    }
    r
}

/// The `Blob` flight leader's work: a download slot, the blob's lock
/// file, then the copy (unless another process finished it meanwhile).
fn fetch_blob(
    job: &Arc<Job>,
    i: usize,
    growing: Option<&Growing>,
    copied: &std::sync::atomic::AtomicBool,
) -> Result<(), RootError> {
    let layer = &job.image.layers[i];
    let root = &job.root.0;
    let _slot = root
        .downloads
        .acquire(i as u64, &job.cancel)
        .ok_or(RootError::Cancelled)?;
    let _lock = job
        .root
        .file_lock(&Key::Blob(layer.digest).lock_name(), &job.cancel)?;
    if root.content.contains(&layer.digest) {
        // Another process stored it while we waited for its lock.
        root.stats.joined("blob");
        return Ok(());
    }
    let progress = |n: u64| job.report(i, ProgressEvent::Fetching(n));
    let hint = if layer.kind == LayerKind::NonDistributable {
        " (a foreign layer: put its blob in the layout; unlade does not fetch foreign URLs)"
    } else {
        ""
    };
    let fetcher = crate::pipeline::fetch::Fetcher {
        store: &root.content,
        source: job.source.as_ref(),
        retry: &root.opts.retry,
        cancel: &job.cancel,
        progress: &progress,
        split: root.opts.split,
        connections: Some((&root.connections, i as u64)),
        stats: Some(&root.stats),
    };
    let t = Instant::now();
    match fetcher.fetch_into(&layer.digest, layer.size, growing) {
        Ok(_) => {
            job.timed(Stage::Fetch, t.elapsed());
            copied.store(true, Ordering::Relaxed);
            root.stats.blobs_ingested.inc();
            Ok(())
        }
        Err(FetchError::Source { digest, source }) => {
            Err(source_error(job.source.as_ref(), &digest, source, hint))
        }
        Err(FetchError::Content(c)) => Err(RootError::Content(c)),
        Err(FetchError::Cancelled) => Err(RootError::Cancelled),
    }
}
