//! Where an image comes from: what every source offers ([`BlobSource`]:
//! a blob from a byte offset on, or the local file holding it), how its
//! failures are told apart ([`SourceError`]), how hard a caller retries
//! ([`Retry`]), and the two sources: an OCI layout directory ([`layout`])
//! and a registry ([`remote`]).

use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::time::Duration;

use crate::cancel::Cancel;
use crate::oci::digest::Digest;

pub mod layout;
pub mod remote;

/// How a source failed, which decides what the caller does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SourceErrorKind {
    /// The source does not have it (HTTP 404, a missing file).
    NotFound,
    /// Worth trying again: a connection error, a cut stream, HTTP 5xx or
    /// 429.
    Transient,
    /// Credentials missing or refused (HTTP 401/403).
    Denied,
    /// The source stopped delivering: no answer, or less than
    /// [`Stall::min_bytes`] in a [`Stall::window`]. Retried at most
    /// [`Stall::attempts`] times in all, whatever trickled in: a registry
    /// that answers a byte a minute would otherwise hold a download (and
    /// a thread) for as long as it likes, since progress resets the
    /// other retries.
    Stalled,
    /// Anything else: retrying would fail the same way.
    Fatal,
}

/// Why a source could not deliver a blob or document. One line, naming
/// the host or file and the HTTP status when there is one.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    /// What to do about it.
    pub kind: SourceErrorKind,
    /// The line shown to the user.
    pub message: String,
    /// How long the server asked us to wait (`Retry-After`).
    pub retry_after: Option<Duration>,
    /// The HTTP status that said no, if it was one.
    pub status: Option<u16>,
}

impl SourceError {
    /// An error of `kind` with `message`.
    pub fn new(kind: SourceErrorKind, message: impl Into<String>) -> Self {
        SourceError {
            kind,
            message: message.into(),
            retry_after: None,
            status: None,
        }
    }

    /// A failure that retrying would repeat.
    pub fn fatal(message: impl Into<String>) -> Self {
        Self::new(SourceErrorKind::Fatal, message)
    }

    /// A failure worth retrying (a connection error, a cut stream).
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(SourceErrorKind::Transient, message)
    }

    /// The source stopped delivering (see [`SourceErrorKind::Stalled`]).
    pub fn stalled(message: impl Into<String>) -> Self {
        Self::new(SourceErrorKind::Stalled, message)
    }
}

/// Whether `e` is a read that waited longer than the socket's timeout.
pub fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    )
}

/// Where an image's blobs come from when they are not in the content
/// store yet: an OCI layout directory, a registry.
pub trait BlobSource: Send + Sync {
    /// A reader of blob `d` from byte `offset` to its end. A registry
    /// resumes with a `Range` request; a source that cannot seek may
    /// return the whole blob only for offset 0.
    fn open(
        &self,
        d: &Digest,
        offset: u64,
        cancel: &Cancel,
    ) -> Result<Box<dyn Read + Send>, SourceError>;
    /// The local file holding blob `d` and its size, opened, when the
    /// source is a directory that has it: it is then applied in place
    /// (memory-mapped) while a copy goes into the content store, so it
    /// must not change while it is applied (see [`crate::LayerInput`]).
    /// `Ok(None)`: not here (fetch it, or report it missing).
    fn local_file(&self, _d: &Digest) -> Result<Option<(File, u64)>, SourceError> {
        Ok(None)
    }
    /// Bytes `range` of blob `d` (of `size` bytes in all), for a
    /// download split over several connections
    /// ([`crate::pipeline::fetch`]). A source that cannot serve ranges, or
    /// served them wrongly before, says so with [`Ranged::Refused`] and is
    /// read with one stream ([`BlobSource::open`]); so does the default.
    fn open_range(
        &self,
        _d: &Digest,
        _range: Range<u64>,
        _size: u64,
        _cancel: &Cancel,
    ) -> Result<Ranged, SourceError> {
        Ok(Ranged::Refused("the source serves no ranges".into()))
    }
    /// Names the source in errors ("the layout /x", "registry r/x").
    fn describe(&self) -> String;
}

/// What a source answered to a request for part of a blob
/// ([`BlobSource::open_range`]).
#[non_exhaustive]
pub enum Ranged {
    /// Exactly the bytes asked for.
    Part(Box<dyn Read + Send>),
    /// The whole blob from byte 0: the server ignored the `Range` (HTTP
    /// 200). Good as the one stream of the blob, nothing else.
    Whole(Box<dyn Read + Send>),
    /// The source will not serve ranges, or answered one wrongly (HTTP 416
    /// or 501, a `Content-Range` other than the one asked for): fetch the
    /// blob with one stream. Says why, naming the host.
    Refused(String),
}

impl std::fmt::Debug for Ranged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ranged::Part(_) => f.write_str("Part"),
            Ranged::Whole(_) => f.write_str("Whole"),
            Ranged::Refused(why) => write!(f, "Refused({why})"),
        }
    }
}

/// How hard a fetch tries.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts in a row without progress before giving up.
    pub attempts: u32,
    /// First back-off; doubles each attempt.
    pub base: Duration,
    /// Longest back-off, and longest `Retry-After` honoured.
    pub max: Duration,
    /// The least a download delivers before it is given up as stalled.
    pub stall: Stall,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 5,
            base: Duration::from_millis(200),
            max: Duration::from_secs(30),
            stall: Stall::default(),
        }
    }
}

/// The minimum-progress rule of a transfer: fewer than `min_bytes` in
/// any `window` (a silent source delivers none) fails the attempt with
/// [`SourceErrorKind::Stalled`]. Retries reset by progress, so without
/// such a rule a source trickling a byte now and then never fails. A
/// registry's socket reads time out after the same window
/// ([`remote::RemoteOptions::read_timeout`]), which is what wakes a
/// transfer waiting on a silent one.
#[derive(Debug, Clone, Copy)]
pub struct Stall {
    /// The interval judged.
    pub window: Duration,
    /// The bytes it must deliver.
    pub min_bytes: u64,
    /// Stalled attempts before giving up, progress or not: 2 rides out
    /// one dropped connection or one hung request of a CDN.
    pub attempts: u32,
}

impl Default for Stall {
    /// 64 KiB a minute, twice: far below any working registry, far above
    /// a trickle.
    fn default() -> Self {
        Stall {
            window: Duration::from_secs(60),
            min_bytes: 64 << 10,
            attempts: 2,
        }
    }
}

/// [`Stall`] applied to one attempt of a transfer: every read of the
/// attempt goes through [`Progress::read`], which says when the rule is
/// broken.
#[derive(Debug)]
pub struct Progress {
    rule: Stall,
    start: std::time::Instant,
    at_start: u64,
}

impl Progress {
    /// An attempt starting now with `done` bytes transferred already.
    pub fn new(rule: Stall, done: u64) -> Progress {
        Progress {
            rule,
            start: std::time::Instant::now(),
            at_start: done,
        }
    }

    /// One read from `r` into `buf`, `done` bytes having been transferred
    /// before it (interrupted reads are tried again): the bytes read, 0 at
    /// the end; `Stalled` once a whole window passed with fewer than the
    /// rule's bytes in it, or when the read timed out (the source said
    /// nothing for a window); `Transient` when the stream broke. The
    /// message says where, the caller what.
    pub fn read(
        &mut self,
        r: &mut dyn Read,
        buf: &mut [u8],
        done: u64,
    ) -> Result<usize, SourceError> {
        loop {
            let read = r.read(buf);
            let now = done + *read.as_ref().unwrap_or(&0) as u64;
            self.check(now).map_err(SourceError::stalled)?;
            match read {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    return Err(SourceError::stalled(format!(
                        "no data for {} s at byte {done}",
                        self.rule.window.as_secs()
                    )))
                }
                Err(e) => {
                    return Err(SourceError::transient(format!(
                        "stream broke at byte {done}: {e}"
                    )))
                }
            }
        }
    }

    /// With `done` bytes transferred in all: `Err(why)` once a whole
    /// window passed with fewer than the rule's bytes in it.
    fn check(&mut self, done: u64) -> Result<(), String> {
        if self.start.elapsed() < self.rule.window {
            return Ok(());
        }
        let got = done.saturating_sub(self.at_start);
        if got < self.rule.min_bytes {
            return Err(format!(
                "{got} bytes in {} s at byte {done}, less than the {} a transfer must deliver",
                self.rule.window.as_secs(),
                self.rule.min_bytes
            ));
        }
        *self = Progress::new(self.rule, done);
        Ok(())
    }
}

impl Retry {
    /// Waits before attempt `n` (1-based), or less if cancelled; false if
    /// cancelled.
    pub fn wait(&self, n: u32, asked: Option<Duration>, cancel: &Cancel) -> bool {
        let backoff = self
            .base
            .saturating_mul(1u32 << n.saturating_sub(1).min(16))
            .min(self.max);
        let d = asked.map_or(backoff, |a| a.min(self.max).max(backoff));
        crossbeam_channel::select! {
            recv(cancel.signal()) -> _ => false,
            default(d) => !cancel.is_cancelled(),
        }
    }
}
