//! Getting a blob from where an image comes from (an OCI layout, a
//! registry) into the content store, once, resuming after interruptions,
//! while an apply may read the same bytes as they arrive.
//!
//! - [`BlobSource`] is what an image source offers: a reader of a blob from
//!   a byte offset on (a registry answers that with a `Range` request), and
//!   for local sources the file itself.
//! - [`Fetcher::fetch_into`] writes a blob into a private content-store file,
//!   hashing as it goes; when the stream breaks it reopens the source at
//!   the number of bytes already written and hashed, with back-off and
//!   `Retry-After`; it publishes only a blob whose digest matches.
//! - [`Growing`] lets an apply read that private file while it is being
//!   written: the reader blocks at the write position until more bytes,
//!   the end, or a failure arrive. So a layer decodes and applies while it
//!   downloads, and the bytes cross the network once.
//! - Concurrent downloads are limited by the root's download
//!   [`crate::pipeline::permits::Permits`], lowest layer first.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};

use crate::cancel::Cancel;
use crate::oci::digest::Digest;
use crate::source::{BlobSource, Retry, SourceError, SourceErrorKind};
use crate::store::content::{ContentError, ContentStore, Ingested};

/// Why [`fetch_into`] failed.
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
}

/// Bytes copied from a mapped local blob between two progress reports
/// (and page releases).
const MAP_STEP: usize = 4 << 20;

impl Fetcher<'_> {
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

    fn fetch_inner(
        &self,
        d: &Digest,
        size: u64,
        growing: Option<&Growing>,
    ) -> Result<Ingested, FetchError> {
        let (source, cancel) = (self.source, self.cancel);
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
                map.release_before((i + 1) * MAP_STEP);
                (self.progress)(w.written());
            }
            return Ok(w.publish()?);
        }
        let mut buf = vec![0u8; 256 << 10];
        let mut failures = 0u32;
        // Stalled attempts, never reset: a trickle makes progress.
        let mut stalls = 0u32;
        'attempts: loop {
            if cancel.is_cancelled() {
                return Err(FetchError::Cancelled);
            }
            let last = match source.open(d, w.written(), cancel) {
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
            let retry = match last.kind {
                SourceErrorKind::Transient => failures < self.retry.attempts,
                SourceErrorKind::Stalled => {
                    stalls += 1;
                    stalls < self.retry.stall.attempts && failures < self.retry.attempts
                }
                _ => false,
            };
            if !retry {
                return Err(FetchError::Source {
                    digest: *d,
                    source: last,
                });
            }
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
        Ok(w.publish()?)
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
            st = self.g.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
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
