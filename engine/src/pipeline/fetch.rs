//! Getting a blob from where an image comes from (an OCI layout, a
//! registry) into the content store, once, resuming after interruptions,
//! while an apply may read the same bytes as they arrive.
//!
//! - [`BlobSource`] is what an image source offers: a reader of a blob from
//!   a byte offset on (a registry answers that with a `Range` request), of
//!   one range of it, and for local sources the file itself.
//! - [`Fetcher::fetch_into`] writes a blob into a private content-store file,
//!   hashing as it goes; when the stream breaks it reopens the source at
//!   the number of bytes already written and hashed, with back-off and
//!   `Retry-After`; it publishes only a blob whose digest matches.
//! - A blob of more than two chunks ([`Split`]) comes over several
//!   connections at once, one chunk per request: each chunk is written at
//!   its offset as it arrives, and this thread hashes the contiguous
//!   prefix as it grows (reading it back from the page cache), so the
//!   digest and the apply follow the prefix and nothing is held in
//!   memory but each connection's read buffer. A connection takes no
//!   chunk more than [`Split::ahead`] past the prefix. A source that does
//!   ranges badly (ignores them, refuses them, answers other bytes) or a
//!   chunk that keeps failing sends the rest of the blob down one stream.
//! - [`Growing`] lets an apply read that private file while it is being
//!   written: the reader blocks at the write position until more bytes,
//!   the end, or a failure arrive. So a layer decodes and applies while it
//!   downloads, and the bytes cross the network once.
//! - Concurrent downloads are limited by the root's download
//!   permits (`pipeline::permits`), lowest layer first, and so are
//!   the connections all of them use together: a connection of a higher
//!   layer gives its permit up between two chunks when a lower layer
//!   waits for one.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::cancel::Cancel;
use crate::oci::digest::Digest;
use crate::pipeline::metrics::{RangeFallback, Stats};
use crate::pipeline::permits::{Permit, Permits};
use crate::source::{BlobSource, Ranged, Retry, SourceError, SourceErrorKind};
use crate::store::content::{ChunkWriter, ContentError, ContentStore, IngestWriter, Ingested};

/// Why [`Fetcher::fetch_into`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The source failed (after retries, where retrying made sense).
    #[error("blob {digest}")]
    Source {
        /// The digest of the blob asked for.
        digest: Digest,
        /// The last attempt's failure.
        #[source]
        source: SourceError,
    },
    /// The content store refused it (digest mismatch, too large, I/O).
    #[error(transparent)]
    Content(#[from] ContentError),
    /// The caller's token was cancelled.
    #[error("cancelled")]
    Cancelled,
}

/// How a large blob is split over connections. A registry behind an
/// object store or a CDN serves one connection at tens to a few hundred
/// MB/s, far below a node's link; several ranged requests at once add up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    /// Most connections one blob is fetched over at once (1: every blob
    /// over one stream). The root's [`crate::root::RootOptions::max_connections`]
    /// bounds all of its downloads together.
    pub connections: usize,
    /// Bytes asked per ranged request. Blobs of more than two chunks are
    /// split; smaller ones come over one stream.
    pub chunk: u64,
}

impl Default for Split {
    /// 8 connections of 16 MiB chunks (soci-snapshotter's deployed chunk
    /// size): 8 × 40 MB/s, what object-store-backed registries serve one
    /// connection, is more than 2 CPUs apply.
    fn default() -> Self {
        Split {
            connections: 8,
            chunk: 16 << 20,
        }
    }
}

impl Split {
    /// Whether a blob of `size` bytes is split.
    pub fn applies(&self, size: u64) -> bool {
        self.connections > 1 && self.chunk > 0 && size > 2 * self.chunk
    }

    /// How far past the contiguous prefix (what is hashed, what the apply
    /// reads) a connection may start a chunk: two chunks per connection.
    /// Bounds what a slow or stuck chunk leaves written ahead on disk.
    pub fn ahead(&self) -> u64 {
        self.chunk
            .saturating_mul(2 * self.connections.max(1) as u64)
    }
}

/// Where a blob goes, where it comes from, and how hard to try: see
/// [`Fetcher::fetch_into`].
pub struct Fetcher<'a> {
    /// The content store the blob is ingested into.
    pub store: &'a ContentStore,
    /// Where the blob is read from (a layout, a registry).
    pub source: &'a dyn BlobSource,
    /// Retry policy for broken streams and refused requests.
    pub retry: &'a Retry,
    /// Stops the copy between two reads.
    pub cancel: &'a Cancel,
    /// Told the bytes written so far, after each read.
    pub progress: &'a (dyn Fn(u64) + Sync),
    /// How a large blob is split over connections.
    pub split: Split,
    /// The root's connection budget, and this blob's place in it (its
    /// layer: lower first); `None`: unbounded.
    pub(crate) connections: Option<(&'a Permits, u64)>,
    /// Where the bytes fetched, retries and range fallbacks are counted.
    pub stats: Option<&'a Stats>,
}

/// Bytes copied from a mapped local blob between two progress reports
/// (and page releases).
const MAP_STEP: usize = 4 << 20;

/// A connection's read buffer, and the hasher's.
const BUF: usize = 256 << 10;

impl Fetcher<'_> {
    /// Counts `n` bytes read from the source.
    fn fetched(&self, n: usize) {
        if let Some(s) = self.stats {
            s.bytes_fetched.inc_by(n as u64);
        }
    }

    /// Counts a failed attempt about to be tried again.
    fn retrying(&self) {
        if let Some(s) = self.stats {
            s.fetch_retries.inc();
        }
    }

    /// Copies blob `d` (of `size` bytes) into the store, resuming from
    /// what was written when the stream breaks, and publishes it if its
    /// digest matches. `growing` (if given) is fed the file and the
    /// progress so that an apply can read along; it is told the outcome
    /// either way.
    pub fn fetch_into(
        &self,
        d: &Digest,
        size: u64,
        growing: Option<&Growing>,
    ) -> Result<Ingested, FetchError> {
        let r = self.fetch_inner(d, size, growing);
        if let Some(g) = growing {
            match &r {
                Ok(_) => g.finish_at(self.store.path(d)),
                Err(e) => g.fail(crate::report::error_chain(e)),
            }
        }
        r
    }

    /// The source's local file of `d`, mapped, if it has one of `size`
    /// bytes; `None` sends the copy down the reading path (which also
    /// reports whatever is wrong with the file).
    fn local_map(&self, d: &Digest, size: u64) -> Option<crate::sys::Map> {
        let (f, len) = self.source.local_file(d).ok()??;
        if len != size || size == 0 {
            return None;
        }
        crate::layer::apply::map_immutable(&f).ok()
    }

    /// One connection of the budget, waiting for it (lower layers first);
    /// `None` when unbounded. Fails only when cancelled.
    fn connection(&self, cancel: &Cancel) -> Result<Option<Permit<'_>>, FetchError> {
        match self.connections {
            None => Ok(None),
            Some((p, prio)) => p
                .acquire(prio, cancel)
                .map(Some)
                .ok_or(FetchError::Cancelled),
        }
    }

    fn fetch_inner(
        &self,
        d: &Digest,
        size: u64,
        growing: Option<&Growing>,
    ) -> Result<Ingested, FetchError> {
        let cancel = self.cancel;
        let mut w = self.store.writer(d, Some(size))?;
        if let Some(g) = growing {
            g.start(w.read_handle()?);
        } else if let Some(map) = self.local_map(d, size) {
            // A layout's file: hashed and written straight from the page
            // cache, without first copying it into a buffer (a plain
            // layer's apply maps the same pages), and written past the
            // page cache where the file system allows: those pages are
            // cached once already.
            w.direct();
            for (i, chunk) in map.chunks(MAP_STEP).enumerate() {
                if cancel.is_cancelled() {
                    return Err(FetchError::Cancelled);
                }
                w.write(chunk)?;
                self.fetched(chunk.len());
                map.release_before((i + 1) * MAP_STEP);
                (self.progress)(w.written());
            }
            return Ok(w.publish()?);
        }
        let mut first = None;
        if self.split.applies(size) {
            match split::fetch(self, d, size, &mut w, growing)? {
                split::End::Done => return Ok(w.publish()?),
                split::End::OneStream(whole) => first = whole,
            }
        }
        let _connection = self.connection(cancel)?;
        self.one_stream(d, size, &mut w, growing, first)?;
        Ok(w.publish()?)
    }

    /// The rest of the blob, from what `w` has, over one stream (resumed
    /// with a `Range` from what is written when it breaks); `first`, if
    /// given, is the whole blob already asked for.
    fn one_stream(
        &self,
        d: &Digest,
        size: u64,
        w: &mut IngestWriter<'_>,
        growing: Option<&Growing>,
        mut first: Option<Box<dyn Read + Send>>,
    ) -> Result<(), FetchError> {
        let (source, cancel) = (self.source, self.cancel);
        let mut buf = vec![0u8; BUF];
        let mut failures = 0u32;
        // Stalled attempts, never reset: a trickle makes progress.
        let mut stalls = 0u32;
        'attempts: loop {
            if cancel.is_cancelled() {
                return Err(FetchError::Cancelled);
            }
            let opened = match first.take() {
                Some(r) if w.written() == 0 => Ok(r),
                _ => source.open(d, w.written(), cancel),
            };
            let last = match opened {
                Ok(mut r) => {
                    let mut progress = crate::source::Progress::new(self.retry.stall, w.written());
                    loop {
                        if cancel.is_cancelled() {
                            return Err(FetchError::Cancelled);
                        }
                        match progress.read(&mut *r, &mut buf, w.written()) {
                            Ok(0) => break 'attempts,
                            Ok(n) => {
                                w.write(&buf[..n])?;
                                self.fetched(n);
                                failures = 0;
                                if let Some(g) = growing {
                                    g.advance(w.written());
                                }
                                (self.progress)(w.written());
                            }
                            Err(mut e) => {
                                e.message = format!("{}: {}", source.describe(), e.message);
                                break e;
                            }
                        }
                    }
                }
                Err(e) => e,
            };
            failures += 1;
            if !self.retry.worth_another(&last, failures, &mut stalls) {
                return Err(FetchError::Source {
                    digest: *d,
                    source: last,
                });
            }
            self.retrying();
            if !self.retry.wait(failures, last.retry_after, cancel) {
                return Err(FetchError::Cancelled);
            }
        }
        if w.written() < size {
            // Publishing would fail the digest anyway; say what happened.
            return Err(FetchError::Source {
                digest: *d,
                source: SourceError::fatal(format!(
                    "{}: blob ended after {} of {size} bytes",
                    source.describe(),
                    w.written()
                )),
            });
        }
        Ok(())
    }
}

impl Retry {
    /// After the `failures`th failure in a row, `last`: whether to try
    /// again. Stalls are counted in `stalls` and never reset.
    fn worth_another(&self, last: &SourceError, failures: u32, stalls: &mut u32) -> bool {
        match last.kind {
            SourceErrorKind::Transient => failures < self.attempts,
            SourceErrorKind::Stalled => {
                *stalls += 1;
                *stalls < self.stall.attempts && failures < self.attempts
            }
            _ => false,
        }
    }
}

/// A blob over several connections (see the module docs).
mod split {
    use super::*;

    /// How a split download ended.
    pub(super) enum End {
        /// Every byte is written and hashed.
        Done,
        /// The rest goes over one stream, from what is hashed; with the
        /// whole blob already asked for when the source ignored a range.
        OneStream(Option<Box<dyn Read + Send>>),
    }

    /// What the connections and the hasher share.
    struct Plan {
        /// The first byte no connection has taken yet.
        next: u64,
        /// Chunks taken and not yet wholly hashed: start → (end, written
        /// up to).
        chunks: BTreeMap<u64, (u64, u64)>,
        /// Bytes hashed: the blob's contiguous prefix.
        hashed: u64,
        /// Why the connections stopped before the end.
        stop: Option<Stop>,
        /// Whether the source answered a chunk with that chunk: more
        /// connections may join.
        ranged: bool,
    }

    enum Stop {
        OneStream(RangeFallback, Option<Box<dyn Read + Send>>),
        Failed(ContentError),
    }

    impl Plan {
        /// The end of the contiguous written prefix.
        fn frontier(&self) -> u64 {
            let mut at = self.hashed;
            for (&start, &(end, written)) in &self.chunks {
                if start > at {
                    break;
                }
                at = at.max(written);
                if written < end {
                    break;
                }
            }
            at
        }

        fn stop(&mut self, why: Stop) {
            if self.stop.is_none() {
                self.stop = Some(why);
            }
        }
    }

    struct Shared<'f, 'a> {
        f: &'f Fetcher<'a>,
        d: Digest,
        size: u64,
        ahead: u64,
        out: ChunkWriter,
        plan: Mutex<Plan>,
        cv: Condvar,
        /// Tripped when the blob is done or stops: connections leave.
        done: Cancel,
    }

    impl Shared<'_, '_> {
        fn lock(&self) -> MutexGuard<'_, Plan> {
            self.plan.lock().unwrap_or_else(|p| p.into_inner())
        }

        fn stopped(&self) -> bool {
            self.done.is_cancelled() || self.f.cancel.is_cancelled()
        }

        fn stop(&self, why: Stop) {
            self.lock().stop(why);
            self.cv.notify_all();
        }

        /// The next chunk to fetch, waiting while it would start too far
        /// past the prefix; `None` when there is none or the blob stopped.
        fn take(&self) -> Option<(u64, u64)> {
            let mut p = self.lock();
            loop {
                if p.stop.is_some() || self.stopped() || p.next >= self.size {
                    return None;
                }
                if p.next < p.hashed.saturating_add(self.ahead) {
                    let start = p.next;
                    let end = start.saturating_add(self.f.split.chunk).min(self.size);
                    p.next = end;
                    p.chunks.insert(start, (end, start));
                    return Some((start, end));
                }
                p = self.wait(p, Duration::from_millis(200));
            }
        }

        /// Waits on the plan's condition for at most `d` (a wake-up that
        /// also polls the caller's cancellation, which does not notify).
        fn wait<'p>(&self, p: MutexGuard<'p, Plan>, d: Duration) -> MutexGuard<'p, Plan> {
            self.cv
                .wait_timeout(p, d)
                .map_or_else(|e| e.into_inner().0, |r| r.0)
        }

        fn written(&self, start: u64, upto: u64) {
            if let Some(c) = self.lock().chunks.get_mut(&start) {
                c.1 = upto;
            }
            self.cv.notify_all();
        }
    }

    /// Fetches blob `d` (`size` bytes, more than two chunks) over up to
    /// [`Split::connections`] connections into `w`, hashing the prefix
    /// as it grows; returns when it is all there, or when the rest must
    /// come over one stream.
    pub(super) fn fetch(
        f: &Fetcher<'_>,
        d: &Digest,
        size: u64,
        w: &mut IngestWriter<'_>,
        growing: Option<&Growing>,
    ) -> Result<End, FetchError> {
        let sh = Shared {
            f,
            d: *d,
            size,
            ahead: f.split.ahead(),
            out: w.chunk_writer()?,
            plan: Mutex::new(Plan {
                next: w.written(),
                chunks: BTreeMap::new(),
                hashed: w.written(),
                stop: None,
                ranged: false,
            }),
            cv: Condvar::new(),
            done: Cancel::new(),
        };
        let first = f.connection(f.cancel)?;
        let r = std::thread::scope(|s| {
            if !spawn(&sh, s, first, true) {
                sh.stop(Stop::OneStream(RangeFallback::NoThread, None));
            }
            let r = hash_prefix(&sh, s, w, growing);
            sh.done.cancel();
            if let Some((p, _)) = f.connections {
                p.wake_all();
            }
            sh.cv.notify_all();
            r
        });
        if f.cancel.is_cancelled() {
            return Err(FetchError::Cancelled);
        }
        r
    }

    /// The apply's wait for bytes not yet downloaded that adds a
    /// connection: a network slower than the apply adds them one after
    /// another, one faster (a registry on the same machine or rack) none,
    /// as they would only cost CPU there.
    const STARVED: Duration = Duration::from_millis(20);

    /// A connection delivering this much (bytes a second) outruns what an
    /// apply takes of a typical layer (ISA-L inflates about 100 to 200 MB
    /// of a compressed layer a second on one core): a download no apply
    /// reads yet gets another connection only while each of its own
    /// delivers less.
    const FAST: f64 = 128e6;

    /// When connections join a split download (see [`hash_prefix`]).
    struct Ramp<'g> {
        growing: Option<&'g Growing>,
        most: usize,
        running: usize,
        /// When a connection last joined (or the first chunk was
        /// answered): the readers' wait then, the time, the prefix.
        mark: Option<(Duration, std::time::Instant, u64)>,
    }

    impl Ramp<'_> {
        /// How many connections to add now, the prefix being at `at`:
        /// all of them when nothing reads along; one each time the apply
        /// reading along waited [`STARVED`] more for bytes; while it has
        /// not started reading, one each [`STARVED`] while the blob
        /// arrives slower than [`FAST`] a connection.
        fn wanted(&mut self, at: u64) -> usize {
            if self.running >= self.most {
                return 0;
            }
            let now = (
                self.growing.map_or(Duration::ZERO, Growing::starved),
                std::time::Instant::now(),
                at,
            );
            let (waited, then, from) = *self.mark.get_or_insert(now);
            let add = match self.growing {
                None => self.most - self.running,
                Some(g) if g.being_read() => usize::from(now.0.saturating_sub(waited) >= STARVED),
                Some(_) => {
                    let dt = now.1.duration_since(then);
                    let rate = at.saturating_sub(from) as f64 / dt.as_secs_f64().max(1e-3);
                    usize::from(dt >= STARVED && rate < FAST * self.running as f64)
                }
            };
            if add > 0 {
                self.mark = Some(now);
            }
            add
        }
    }

    /// The hasher: follows the contiguous prefix the connections write,
    /// hashing it and telling the readers, until the end or a stop. It
    /// also adds the connections, once the first was answered with a
    /// range ([`Ramp`]): where the network is slower than the apply they
    /// join within a fraction of a second; where it is faster (loopback,
    /// a registry in the same rack) the blob stays on one connection,
    /// as more would only cost CPU.
    fn hash_prefix<'s, 'f: 's, 'a: 's>(
        sh: &'s Shared<'f, 'a>,
        s: &'s std::thread::Scope<'s, '_>,
        w: &mut IngestWriter<'_>,
        growing: Option<&Growing>,
    ) -> Result<End, FetchError> {
        let mut buf = vec![0u8; BUF];
        let chunks = sh.size.div_ceil(sh.f.split.chunk.max(1));
        let most = sh.f.split.connections.min(chunks as usize);
        let mut ramp = Ramp {
            growing,
            most,
            running: 1,
            mark: None,
        };
        loop {
            let (target, stop) = {
                let mut p = sh.lock();
                loop {
                    if p.ranged && p.next < sh.size && p.stop.is_none() {
                        let add = ramp.wanted(p.frontier());
                        if add > 0 {
                            drop(p);
                            for _ in 0..add {
                                if !spawn(sh, s, None, false) {
                                    // Fewer connections: what could start.
                                    ramp.running = most;
                                    break;
                                }
                                ramp.running += 1;
                            }
                            p = sh.lock();
                        }
                    }
                    let at = p.frontier();
                    if at > p.hashed || at >= sh.size || p.stop.is_some() || sh.stopped() {
                        break (at, p.stop.take());
                    }
                    let wait = if p.ranged && ramp.running < most {
                        STARVED
                    } else {
                        Duration::from_millis(200)
                    };
                    p = sh.wait(p, wait);
                }
            };
            if sh.f.cancel.is_cancelled() {
                return Err(FetchError::Cancelled);
            }
            if target > w.written() {
                w.absorb(target, &mut buf)?;
                {
                    let mut p = sh.lock();
                    p.hashed = target;
                    p.chunks.retain(|_, c| c.0 > target);
                }
                sh.cv.notify_all();
                if let Some(g) = growing {
                    g.advance(target);
                }
                (sh.f.progress)(target);
            }
            match stop {
                Some(Stop::Failed(e)) => return Err(e.into()),
                Some(Stop::OneStream(why, whole)) => {
                    if let Some(st) = sh.f.stats {
                        st.range_fallback(why);
                    }
                    return Ok(End::OneStream(whole));
                }
                None if target >= sh.size => return Ok(End::Done),
                None => {}
            }
        }
    }

    /// One connection: takes chunks in order and fetches each (resuming
    /// it where it broke), until none is left or the blob stops. Once
    /// the first connection's first chunk is answered with that chunk,
    /// others may join (see [`hash_prefix`]): a source that ignores or
    /// refuses ranges costs one request. Between two chunks a connection
    /// gives its permit to a lower layer that waits for one.
    fn connection<'s>(sh: &'s Shared<'_, '_>, mut permit: Option<Permit<'s>>, mut first: bool) {
        let f = sh.f;
        if permit.is_none() {
            if let Some((p, prio)) = f.connections {
                match p.acquire(prio, &sh.done) {
                    Some(got) => permit = Some(got),
                    None => return,
                }
            }
        }
        while let Some((start, end)) = sh.take() {
            if !chunk(sh, start, end, &mut first) {
                return;
            }
            if let Some((p, prio)) = f.connections {
                if p.wanted_below(prio) {
                    drop(permit.take());
                    match p.acquire(prio, &sh.done) {
                        Some(got) => permit = Some(got),
                        None => return,
                    }
                }
            }
        }
    }

    /// Starts a connection (the `first`, with its permit); false if no
    /// thread could start.
    fn spawn<'s, 'f: 's, 'a: 's>(
        sh: &'s Shared<'f, 'a>,
        s: &'s std::thread::Scope<'s, '_>,
        permit: Option<Permit<'s>>,
        first: bool,
    ) -> bool {
        std::thread::Builder::new()
            .name("unlade-conn".into())
            .spawn_scoped(s, move || connection(sh, permit, first))
            .is_ok()
    }

    /// Fetches bytes `start..end` into the blob, resuming where a stream
    /// broke, retried as the root's rule says. False when the blob
    /// stopped (this chunk's failure included: the rest goes over one
    /// stream).
    fn chunk(sh: &Shared<'_, '_>, start: u64, end: u64, first: &mut bool) -> bool {
        let f = sh.f;
        let mut buf = vec![0u8; BUF];
        let mut pos = start;
        let (mut failures, mut stalls) = (0u32, 0u32);
        loop {
            if sh.stopped() {
                return false;
            }
            let at = pos;
            let last = match f.source.open_range(&sh.d, pos..end, sh.size, f.cancel) {
                Ok(Ranged::Part(mut r)) => {
                    if std::mem::take(first) {
                        sh.lock().ranged = true;
                        sh.cv.notify_all();
                    }
                    match read_part(sh, &mut *r, &mut buf, start, &mut pos, end) {
                        Ok(()) => return true,
                        Err(Some(e)) => {
                            // Progress resets the failures in a row.
                            failures = if pos > at { 1 } else { failures + 1 };
                            e
                        }
                        Err(None) => return false,
                    }
                }
                Ok(Ranged::Whole(r)) => {
                    let whole = (start == 0 && pos == 0).then_some(r);
                    sh.stop(Stop::OneStream(RangeFallback::Ignored, whole));
                    return false;
                }
                Ok(Ranged::Refused(_)) => {
                    sh.stop(Stop::OneStream(RangeFallback::Refused, None));
                    return false;
                }
                Err(e) => {
                    failures += 1;
                    e
                }
            };
            if !f.retry.worth_another(&last, failures, &mut stalls)
                || !f.retry.wait(failures, last.retry_after, &sh.done)
            {
                // A chunk that keeps failing: the rest of the blob over
                // one stream, which tries again and names the failure.
                sh.stop(Stop::OneStream(RangeFallback::Failed, None));
                return false;
            }
            f.retrying();
        }
    }

    /// Reads one answer of chunk `start..end` from `*pos` on, writing it
    /// at its offset. `Err(Some(e))`: the stream failed (retry);
    /// `Err(None)`: the blob stopped.
    fn read_part(
        sh: &Shared<'_, '_>,
        r: &mut dyn Read,
        buf: &mut [u8],
        start: u64,
        pos: &mut u64,
        end: u64,
    ) -> Result<(), Option<SourceError>> {
        let f = sh.f;
        let mut progress = crate::source::Progress::new(f.retry.stall, *pos);
        loop {
            if sh.stopped() {
                return Err(None);
            }
            // One byte more than the chunk's rest: a source that sends
            // more than asked is caught.
            let want = buf.len().min((end - *pos) as usize + 1);
            match progress.read(r, &mut buf[..want], *pos) {
                Ok(0) if *pos == end => return Ok(()),
                Ok(0) => {
                    return Err(Some(SourceError::transient(format!(
                        "{}: bytes {start}-{} ended at byte {pos}",
                        f.source.describe(),
                        end - 1
                    ))))
                }
                Ok(n) if *pos + n as u64 > end => {
                    sh.stop(Stop::OneStream(RangeFallback::Longer, None));
                    return Err(None);
                }
                Ok(n) => {
                    if let Err(e) = sh.out.write_at(*pos, &buf[..n]) {
                        sh.stop(Stop::Failed(e));
                        return Err(None);
                    }
                    f.fetched(n);
                    *pos += n as u64;
                    sh.written(start, *pos);
                }
                Err(mut e) => {
                    e.message = format!("{}: {}", f.source.describe(), e.message);
                    return Err(Some(e));
                }
            }
        }
    }
}

/// A blob file that one thread writes and others read as it grows.
#[derive(Debug, Default)]
pub struct Growing {
    state: Mutex<GrowState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct GrowState {
    file: Option<Arc<File>>,
    written: u64,
    /// Where the whole blob is once complete (the content store).
    done: Option<PathBuf>,
    failed: Option<String>,
    cancelled: bool,
    /// How long readers waited for bytes not written yet (ended
    /// waits), and since when one waits now.
    starved: Duration,
    waiting: Option<std::time::Instant>,
    /// Whether a reader has asked for bytes yet.
    read: bool,
}

impl Growing {
    /// A blob nothing has been written to yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GrowState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn start(&self, f: File) {
        let mut g = self.lock();
        g.file = Some(Arc::new(f));
        g.written = 0;
    }

    fn advance(&self, written: u64) {
        self.lock().written = written;
        self.cv.notify_all();
    }

    /// The blob is complete at `path` (written here, or by someone else
    /// whose file readers never saw).
    pub fn finish_at(&self, path: PathBuf) {
        self.lock().done = Some(path);
        self.cv.notify_all();
    }

    /// The blob will not be complete; readers get `why`.
    pub fn fail(&self, why: String) {
        self.lock().failed = Some(why);
        self.cv.notify_all();
    }

    /// Wakes readers with a cancellation error.
    pub fn cancel(&self) {
        self.lock().cancelled = true;
        self.cv.notify_all();
    }

    /// Whether a reader (the apply) has asked for bytes yet: one that
    /// has not (it waits for a turn to apply) will want them all soon.
    pub fn being_read(&self) -> bool {
        self.lock().read
    }

    /// How long readers have waited, in all, for bytes not written yet:
    /// the apply starved by the download.
    pub fn starved(&self) -> Duration {
        let g = self.lock();
        g.starved + g.waiting.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// A reader from byte 0.
    pub fn reader(self: &Arc<Self>) -> GrowingReader {
        GrowingReader {
            g: self.clone(),
            pos: 0,
            done_file: None,
        }
    }
}

/// Reads a [`Growing`] blob: blocks at the write position until there is
/// more, the end, or a failure.
pub struct GrowingReader {
    g: Arc<Growing>,
    pos: u64,
    done_file: Option<File>,
}

impl Read for GrowingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(f) = &self.done_file {
            let n = f.read_at(buf, self.pos)?;
            self.pos += n as u64;
            return Ok(n);
        }
        let mut st = self.g.lock();
        st.read = true;
        loop {
            if st.cancelled {
                return Err(io::Error::other("cancelled"));
            }
            if let Some(why) = &st.failed {
                return Err(io::Error::other(format!("download failed: {why}")));
            }
            if self.pos < st.written {
                let f = st.file.clone();
                let avail = (st.written - self.pos).min(buf.len() as u64) as usize;
                drop(st);
                let Some(f) = f else {
                    return Err(io::Error::other("download lost its file"));
                };
                let n = f.read_at(&mut buf[..avail], self.pos)?;
                self.pos += n as u64;
                return Ok(n);
            }
            if let Some(p) = st.done.clone() {
                drop(st);
                // The rest (all of it if someone else downloaded it) from
                // the published blob.
                let f = File::open(&p)?;
                let n = f.read_at(buf, self.pos)?;
                self.pos += n as u64;
                self.done_file = Some(f);
                return Ok(n);
            }
            let since = std::time::Instant::now();
            st.waiting = Some(since);
            st = self.g.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            st.waiting = None;
            st.starved += since.elapsed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::time::Duration;

    /// A source that serves `data` but cuts every stream after `cut`
    /// bytes, the first `cuts` times, and counts opens and their offsets.
    struct Flaky {
        data: Vec<u8>,
        cut: usize,
        cuts: AtomicU32,
        offsets: Mutex<Vec<u64>>,
    }

    struct Cut<'a> {
        rest: &'a [u8],
        fail: bool,
    }

    impl Read for Cut<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.rest.is_empty() && self.fail {
                return Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset"));
            }
            let n = self.rest.len().min(buf.len()).min(1000);
            buf[..n].copy_from_slice(&self.rest[..n]);
            self.rest = &self.rest[n..];
            Ok(n)
        }
    }

    impl BlobSource for Flaky {
        fn open(
            &self,
            _d: &Digest,
            offset: u64,
            _c: &Cancel,
        ) -> Result<Box<dyn Read + Send>, SourceError> {
            self.offsets.lock().unwrap().push(offset);
            let rest = &self.data[offset as usize..];
            let fail = self
                .cuts
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1))
                .is_ok();
            let take = if fail {
                rest.len().min(self.cut)
            } else {
                rest.len()
            };
            // 'static for the box: leak a copy; tests only.
            let v: &'static [u8] = Box::leak(rest[..take].to_vec().into_boxed_slice());
            Ok(Box::new(Cut { rest: v, fail }))
        }
        fn describe(&self) -> String {
            "flaky".into()
        }
    }

    fn store(name: &str) -> (PathBuf, ContentStore) {
        let t = std::env::temp_dir().join(format!("unlade-fetch-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        let s = ContentStore::open(&t, false).unwrap();
        (t, s)
    }

    const FAST: Retry = Retry {
        attempts: 3,
        base: Duration::from_millis(1),
        max: Duration::from_millis(5),
        stall: crate::source::Stall {
            window: Duration::from_secs(60),
            min_bytes: 1,
            attempts: 2,
        },
    };

    fn fetcher<'a>(s: &'a ContentStore, src: &'a dyn BlobSource) -> Fetcher<'a> {
        static CANCEL: std::sync::OnceLock<Cancel> = std::sync::OnceLock::new();
        Fetcher {
            store: s,
            source: src,
            retry: &FAST,
            cancel: CANCEL.get_or_init(Cancel::new),
            progress: &|_| {},
            split: Split::default(),
            connections: None,
            stats: None,
        }
    }

    #[test]
    fn resumes_where_it_broke_and_a_reader_follows() {
        let (t, s) = store("resume");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let d = Digest::of(&data);
        let src = Flaky {
            data: data.clone(),
            cut: 100_000,
            cuts: AtomicU32::new(2),
            offsets: Mutex::new(vec![]),
        };
        let g = Arc::new(Growing::new());
        let mut reader = g.reader();
        let got = std::thread::scope(|sc| {
            let h = sc.spawn(move || {
                let mut v = Vec::new();
                reader.read_to_end(&mut v).map(|_| v)
            });
            fetcher(&s, &src)
                .fetch_into(&d, data.len() as u64, Some(&g))
                .unwrap();
            h.join().unwrap().unwrap()
        });
        assert_eq!(got, data);
        assert_eq!(*src.offsets.lock().unwrap(), vec![0, 100_000, 200_000]);
        assert_eq!(std::fs::read(s.path(&d)).unwrap(), data);
        std::fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn wrong_bytes_are_not_kept_and_readers_hear_of_it() {
        let (t, s) = store("wrong");
        let data = vec![1u8; 5000];
        let d = Digest::of(b"something else");
        let src = Flaky {
            data: data.clone(),
            cut: 0,
            cuts: AtomicU32::new(0),
            offsets: Mutex::new(vec![]),
        };
        let g = Arc::new(Growing::new());
        let mut reader = g.reader();
        let e = fetcher(&s, &src)
            .fetch_into(&d, 5000, Some(&g))
            .unwrap_err();
        assert!(
            matches!(e, FetchError::Content(ContentError::DigestMismatch { .. })),
            "{e}"
        );
        let mut v = Vec::new();
        let err = reader.read_to_end(&mut v).unwrap_err();
        assert!(err.to_string().contains("download failed"), "{err}");
        assert!(!s.contains(&d));
        assert_eq!(
            std::fs::read_dir(t.join("content/ingest")).unwrap().count(),
            0
        );
        std::fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn gives_up_after_attempts_without_progress() {
        let (t, s) = store("giveup");
        let data = vec![3u8; 5000];
        let d = Digest::of(&data);
        let src = Flaky {
            data,
            cut: 0,
            cuts: AtomicU32::new(100),
            offsets: Mutex::new(vec![]),
        };
        let e = fetcher(&s, &src).fetch_into(&d, 5000, None).unwrap_err();
        let text = crate::report::error_chain(&e);
        assert!(text.contains("stream broke at byte 0"), "{text}");
        assert_eq!(src.offsets.lock().unwrap().len(), 3);
        std::fs::remove_dir_all(&t).unwrap();
    }

    /// How [`Ranges`] answers a ranged request.
    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        /// The bytes asked for.
        Parts,
        /// The whole blob (a server that ignores `Range`).
        Whole,
        /// Refuses (HTTP 416 or 501, or a wrong `Content-Range`).
        Refused,
        /// Answers a range with more bytes than asked.
        Longer,
    }

    /// A source serving ranges of `data` as `mode` says, `every` between
    /// two reads of 4 KiB; the chunk starting at `fail_at` always fails,
    /// the first `cuts` answers of chunks are cut after `cut` bytes, and
    /// the chunk at `hold` waits `hold_for` before its first byte. It
    /// records what was asked and the most answers open at once.
    struct Ranges {
        data: Vec<u8>,
        mode: Mode,
        every: Duration,
        fail_at: Option<u64>,
        cut: usize,
        cuts: AtomicU32,
        hold: Option<(u64, Duration)>,
        asked: Mutex<Vec<(u64, u64)>>,
        opens: Mutex<Vec<u64>>,
        open_now: Arc<AtomicU32>,
        most_open: Arc<AtomicU32>,
        /// While the held chunk waits: the highest chunk start asked.
        during_hold: Arc<Mutex<u64>>,
        holding: Arc<AtomicBool>,
    }

    impl Ranges {
        fn new(data: Vec<u8>, mode: Mode) -> Ranges {
            Ranges {
                data,
                mode,
                // Slow enough that a reader following along waits for
                // bytes, and more connections join.
                every: Duration::from_millis(1),
                fail_at: None,
                cut: 0,
                cuts: AtomicU32::new(0),
                hold: None,
                asked: Mutex::new(vec![]),
                opens: Mutex::new(vec![]),
                open_now: Arc::default(),
                most_open: Arc::default(),
                during_hold: Arc::default(),
                holding: Arc::default(),
            }
        }
    }

    struct Answer {
        rest: Vec<u8>,
        at: usize,
        every: Duration,
        cut: Option<usize>,
        open_now: Arc<AtomicU32>,
        hold: Option<(Duration, Arc<AtomicBool>)>,
    }

    impl Read for Answer {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if let Some((d, holding)) = self.hold.take() {
                holding.store(true, Ordering::SeqCst);
                std::thread::sleep(d);
                holding.store(false, Ordering::SeqCst);
            }
            std::thread::sleep(self.every);
            if self.cut == Some(self.at) {
                return Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset"));
            }
            let end = self.cut.unwrap_or(usize::MAX).min(self.rest.len());
            let n = (end - self.at).min(buf.len()).min(4096);
            buf[..n].copy_from_slice(&self.rest[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    impl Drop for Answer {
        fn drop(&mut self) {
            self.open_now.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl Ranges {
        fn answer(&self, bytes: &[u8], cut: Option<usize>, hold: Option<Duration>) -> Box<Answer> {
            let now = self.open_now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_open.fetch_max(now, Ordering::SeqCst);
            Box::new(Answer {
                rest: bytes.to_vec(),
                at: 0,
                every: self.every,
                cut,
                open_now: self.open_now.clone(),
                hold: hold.map(|d| (d, self.holding.clone())),
            })
        }
    }

    impl BlobSource for Ranges {
        fn open(
            &self,
            _: &Digest,
            offset: u64,
            _: &Cancel,
        ) -> Result<Box<dyn Read + Send>, SourceError> {
            self.opens.lock().unwrap().push(offset);
            Ok(self.answer(&self.data[offset as usize..], None, None))
        }

        fn open_range(
            &self,
            _: &Digest,
            range: std::ops::Range<u64>,
            _: u64,
            _: &Cancel,
        ) -> Result<Ranged, SourceError> {
            self.asked.lock().unwrap().push((range.start, range.end));
            if self.holding.load(Ordering::SeqCst) {
                let mut m = self.during_hold.lock().unwrap();
                *m = (*m).max(range.start);
            }
            match self.mode {
                Mode::Whole => return Ok(Ranged::Whole(self.answer(&self.data, None, None))),
                Mode::Refused => return Ok(Ranged::Refused("no".into())),
                Mode::Longer => {
                    let end = (range.end as usize + 100).min(self.data.len());
                    let bytes = &self.data[range.start as usize..end];
                    return Ok(Ranged::Part(self.answer(bytes, None, None)));
                }
                Mode::Parts => {}
            }
            if self
                .fail_at
                .is_some_and(|f| range.start <= f && f < range.end)
            {
                return Err(SourceError::transient("injected"));
            }
            let cut = self
                .cuts
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1))
                .is_ok()
                .then_some(self.cut);
            let hold = self.hold.filter(|h| h.0 == range.start).map(|h| h.1);
            let bytes = &self.data[range.start as usize..range.end as usize];
            Ok(Ranged::Part(self.answer(bytes, cut, hold)))
        }

        fn describe(&self) -> String {
            "ranges".into()
        }
    }

    const CHUNK: u64 = 64 << 10;

    /// Fetches `src`'s data split in 64 KiB chunks over `conns`
    /// connections (with `budget` connections in all, if given), with a
    /// reader following; checks what the reader and the store got.
    fn split_fetch(
        name: &str,
        src: &Ranges,
        conns: usize,
        budget: Option<(&Permits, u64)>,
    ) -> Result<(), FetchError> {
        let (t, s) = store(name);
        let d = Digest::of(&src.data);
        let g = Arc::new(Growing::new());
        let mut reader = g.reader();
        let cancel = Cancel::new();
        let f = Fetcher {
            store: &s,
            source: src,
            retry: &FAST,
            cancel: &cancel,
            progress: &|_| {},
            split: Split {
                connections: conns,
                chunk: CHUNK,
            },
            connections: budget,
            stats: None,
        };
        let (r, got) = std::thread::scope(|sc| {
            let h = sc.spawn(move || {
                let mut v = Vec::new();
                reader.read_to_end(&mut v).map(|_| v)
            });
            let r = f.fetch_into(&d, src.data.len() as u64, Some(&g));
            (r, h.join().unwrap())
        });
        if r.is_ok() {
            assert!(got.unwrap() == src.data, "the reader got the blob");
            assert!(std::fs::read(s.path(&d)).unwrap() == src.data);
        }
        std::fs::remove_dir_all(&t).unwrap();
        r.map(|_| ())
    }

    fn noise(n: usize) -> Vec<u8> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A blob of 16 chunks comes over 4 connections at once, each chunk
    /// asked once, and a reader following the prefix gets every byte.
    #[test]
    fn a_large_blob_comes_over_several_connections_in_chunks() {
        let src = Ranges::new(noise(16 * CHUNK as usize - 1000), Mode::Parts);
        split_fetch("split", &src, 4, None).unwrap();
        let mut asked = src.asked.lock().unwrap().clone();
        asked.sort();
        let want: Vec<(u64, u64)> = (0..16)
            .map(|i| (i * CHUNK, ((i + 1) * CHUNK).min(src.data.len() as u64)))
            .collect();
        assert_eq!(asked, want);
        assert!(src.opens.lock().unwrap().is_empty(), "no single stream");
        let most = src.most_open.load(Ordering::SeqCst);
        assert!(most > 1 && most <= 4, "{most} answers open at once");
    }

    /// Connections join while the apply reading along waits for bytes:
    /// an apply that never waits (here: one busy elsewhere after its
    /// first byte) has the blob over one connection, as on a network
    /// faster than it; one that has not started reading gets them all.
    #[test]
    fn connections_join_only_while_the_apply_waits_for_bytes() {
        let (t, s) = store("nowait");
        let src = Ranges::new(noise(16 * CHUNK as usize), Mode::Parts);
        let d = Digest::of(&src.data);
        let g = Arc::new(Growing::new());
        let cancel = Cancel::new();
        let f = Fetcher {
            store: &s,
            source: &src,
            retry: &FAST,
            cancel: &cancel,
            progress: &|_| {},
            split: Split {
                connections: 4,
                chunk: CHUNK,
            },
            connections: None,
            stats: None,
        };
        let done = AtomicBool::new(false);
        let mut reader = g.reader();
        let got = std::thread::scope(|sc| {
            let h = sc.spawn(|| {
                let mut v = vec![0u8; 1];
                reader.read_exact(&mut v).unwrap();
                while !done.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                reader.read_to_end(&mut v).unwrap();
                v
            });
            f.fetch_into(&d, src.data.len() as u64, Some(&g)).unwrap();
            done.store(true, Ordering::SeqCst);
            h.join().unwrap()
        });
        assert!(got == src.data);
        assert_eq!(src.most_open.load(Ordering::SeqCst), 1);
        assert_eq!(src.asked.lock().unwrap().len(), 16, "still in chunks");

        // Not read at all yet: every connection joins.
        let src = Ranges::new(noise(16 * CHUNK as usize), Mode::Parts);
        let g = Growing::new();
        let f = Fetcher { source: &src, ..f };
        f.fetch_into(&Digest::of(&src.data), src.data.len() as u64, Some(&g))
            .unwrap();
        assert!(src.most_open.load(Ordering::SeqCst) > 1);
        std::fs::remove_dir_all(&t).unwrap();
    }

    /// A source that ignores ranges or refuses them is read with one
    /// stream: a whole answer to the first chunk's request is that stream.
    #[test]
    fn a_source_that_does_ranges_badly_is_read_with_one_stream() {
        let src = Ranges::new(noise(5 * CHUNK as usize), Mode::Whole);
        split_fetch("whole", &src, 4, None).unwrap();
        assert_eq!(src.asked.lock().unwrap().len(), 1, "one request");
        assert!(
            src.opens.lock().unwrap().is_empty(),
            "its answer is the stream"
        );
        let src = Ranges::new(noise(5 * CHUNK as usize), Mode::Refused);
        split_fetch("refused", &src, 4, None).unwrap();
        assert_eq!(src.asked.lock().unwrap().len(), 1);
        assert_eq!(*src.opens.lock().unwrap(), vec![0]);
        // More bytes than asked: not one of them is written where the
        // next chunk goes (split_fetch checks the blob); the rest comes
        // over one stream, from the prefix. An overrun shows only at the
        // end of a chunk, so connections that joined meanwhile (the
        // reader waited) may each have asked one chunk, and no more.
        let src = Ranges::new(noise(5 * CHUNK as usize), Mode::Longer);
        split_fetch("longer", &src, 4, None).unwrap();
        let asked = src.asked.lock().unwrap().clone();
        let starts: std::collections::BTreeSet<u64> = asked.iter().map(|a| a.0).collect();
        assert!(asked.len() <= 4, "{asked:?}");
        assert!(
            starts.len() == asked.len() && starts.contains(&0),
            "{asked:?}"
        );
        let last = asked.iter().map(|a| a.1).max().unwrap_or(0);
        let opens = src.opens.lock().unwrap().clone();
        assert!(opens.len() == 1 && opens[0] <= last, "{opens:?} {asked:?}");
    }

    /// A chunk whose stream breaks is asked again from where it broke.
    #[test]
    fn a_cut_chunk_resumes_where_it_broke() {
        let mut src = Ranges::new(noise(8 * CHUNK as usize), Mode::Parts);
        src.cut = 10_000;
        src.cuts = AtomicU32::new(3);
        split_fetch("cutchunk", &src, 3, None).unwrap();
        let asked = src.asked.lock().unwrap().clone();
        // Each answer cut after 10000 bytes is asked again from there.
        let resumed: Vec<u64> = asked
            .iter()
            .map(|&(s, _)| s % CHUNK)
            .filter(|&off| off != 0)
            .collect();
        assert_eq!(resumed.len(), 3, "{asked:?}");
        assert!(resumed.iter().all(|off| off % 10_000 == 0), "{asked:?}");
        assert_eq!(asked.len(), 8 + 3);
    }

    /// A chunk that keeps failing: the rest of the blob comes over one
    /// stream, from the end of the prefix.
    #[test]
    fn a_chunk_that_keeps_failing_sends_the_rest_down_one_stream() {
        let mut src = Ranges::new(noise(8 * CHUNK as usize), Mode::Parts);
        src.fail_at = Some(3 * CHUNK);
        split_fetch("failchunk", &src, 2, None).unwrap();
        let asked = src.asked.lock().unwrap().clone();
        let tries = asked.iter().filter(|(s, _)| *s == 3 * CHUNK).count();
        assert_eq!(tries as u32, FAST.attempts, "{asked:?}");
        // From the prefix: below the failing chunk, past what was done
        // before the chunk below it.
        let opens = src.opens.lock().unwrap().clone();
        assert!(opens.len() == 1 && opens[0] <= 3 * CHUNK, "{opens:?}");
    }

    /// No chunk starts further past the prefix than the bound while a
    /// chunk below it waits; and the root's budget bounds the
    /// connections.
    #[test]
    fn connections_stay_near_the_prefix_and_within_the_budget() {
        let mut src = Ranges::new(noise(40 * CHUNK as usize), Mode::Parts);
        src.hold = Some((CHUNK, Duration::from_millis(500)));
        split_fetch("ahead", &src, 4, None).unwrap();
        let highest = *src.during_hold.lock().unwrap();
        let bound = Split {
            connections: 4,
            chunk: CHUNK,
        }
        .ahead();
        // The prefix stops at the held chunk (byte CHUNK).
        assert!(highest < CHUNK + bound, "{highest} ≥ {}", CHUNK + bound);
        assert!(highest >= bound / 2, "the others went on: {highest}");

        let src = Ranges::new(noise(16 * CHUNK as usize), Mode::Parts);
        let budget = Permits::new(2);
        split_fetch("budget", &src, 8, Some((&budget, 0))).unwrap();
        let most = src.most_open.load(Ordering::SeqCst);
        assert!(most <= 2, "{most} answers open at once with a budget of 2");
    }

    /// A lower layer waiting for a connection gets one between two chunks
    /// of a higher layer's download, not after it.
    #[test]
    fn a_higher_layer_gives_a_connection_to_a_lower_one() {
        let src = Ranges::new(noise(32 * CHUNK as usize), Mode::Parts);
        let budget = Permits::new(2);
        let got_early = std::thread::scope(|sc| {
            let lower = sc.spawn(|| {
                // Once the download holds both connections.
                while src.most_open.load(Ordering::SeqCst) < 2 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let c = Cancel::new();
                let p = budget.acquire(1, &c).expect("a permit");
                // Chunks asked by then: all 32 if it had to wait for the end.
                let asked = src.asked.lock().unwrap().len();
                drop(p);
                asked < 32
            });
            split_fetch("yield", &src, 2, Some((&budget, 5))).unwrap();
            lower.join().unwrap()
        });
        assert!(got_early, "the lower layer waited for the whole download");
    }

    /// A source that trickles: `every` between bytes, then a timeout
    /// after `bytes` of them if `silent` (a registry that stops
    /// answering); counts its opens.
    struct Trickle {
        every: Duration,
        bytes: usize,
        opens: AtomicU32,
    }

    struct TrickleRead {
        every: Duration,
        left: usize,
    }

    impl Read for TrickleRead {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            std::thread::sleep(self.every);
            if self.left == 0 {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, "timed out"));
            }
            self.left -= 1;
            buf[0] = b'x';
            Ok(1)
        }
    }

    impl BlobSource for Trickle {
        fn open(
            &self,
            _: &Digest,
            _: u64,
            _: &Cancel,
        ) -> Result<Box<dyn Read + Send>, SourceError> {
            self.opens.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(TrickleRead {
                every: self.every,
                left: self.bytes,
            }))
        }
        fn describe(&self) -> String {
            "trickle".into()
        }
    }

    /// A download that delivers less than the minimum in a window, or
    /// times out waiting (a silent registry), is stalled: tried again as
    /// many times as the rule says in all, however many bytes trickled in
    /// (progress resets the other retries, so a trickle used to hold a
    /// download for ever), then given up.
    #[test]
    fn a_trickle_or_a_silence_is_a_stall_tried_a_bounded_number_of_times() {
        let (t, s) = store("stall");
        let retry = Retry {
            stall: crate::source::Stall {
                window: Duration::from_millis(200),
                min_bytes: 100,
                attempts: 2,
            },
            ..FAST
        };
        let cancel = Cancel::new();
        let run = |src: &Trickle| {
            Fetcher {
                store: &s,
                source: src,
                retry: &retry,
                cancel: &cancel,
                progress: &|_| {},
                split: Split::default(),
                connections: None,
                stats: None,
            }
            .fetch_into(&Digest::of(b"never"), 1 << 20, None)
        };
        for (every, bytes) in [
            (Duration::from_millis(20), 1_000_000),
            (Duration::from_millis(5), 3),
        ] {
            let src = Trickle {
                every,
                bytes,
                opens: AtomicU32::new(0),
            };
            let t0 = std::time::Instant::now();
            let e = run(&src).unwrap_err();
            match &e {
                FetchError::Source { source, .. } => {
                    assert_eq!(source.kind, SourceErrorKind::Stalled, "{e}")
                }
                other => panic!("{other}"),
            }
            assert_eq!(src.opens.load(Ordering::SeqCst), 2, "tried twice");
            assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        }
        std::fs::remove_dir_all(&t).unwrap();
    }
}
