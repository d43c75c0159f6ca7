//! `apply`: one layer blob → one overlay upper directory.
//!
//! [`apply_layer`] is the whole job behind `unlade apply`: open the blob
//! (memory-mapped where it is a file), detect its compression, decode it
//! whole or streaming ([`crate::layer::decode`]), hash the uncompressed bytes on
//! a second thread, parse ([`crate::layer::tar`]) and apply every entry
//! ([`Applier`]) through a file-system backend ([`crate::layer::fsops`]), then
//! compare the digest with the expected diff ID.
//!
//! The target may hold anything when a call fails: callers that need
//! all-or-nothing (the snapshotter) apply into a private directory and
//! publish it only on success.

mod applier;
mod dirs;
mod lower;
mod path;

pub use applier::{Applier, Counts, MAX_DELAYED_BYTES, MAX_DELAYED_DIRS, MAX_WARNINGS};
pub use lower::LowerLayers;
pub use path::{normalize, MAX_PATH};

use std::fs::File;
use std::io::{self, Cursor, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{self as rfs, FileType, Mode, OFlags};

use crate::layer::decode::{self, Compression, DecodeOptions, DecodeStrategy};
use crate::layer::error::{ApplyError, ErrorKind};
use crate::layer::fsops::pool::Pool;
use crate::layer::fsops::BackendOptions;
use crate::layer::stream::{Bytes, SliceSource, Source, StreamSource, RELEASE_STEP};
use crate::layer::tar::Reader;
use crate::oci::digest::Digest;

/// Where a layer blob comes from.
///
/// A regular file given as `Path`, `Stdin` or `File` is memory-mapped:
/// it must not be written to or truncated until [`apply_layer`] returns
/// (a truncation kills the process with SIGBUS; a write changes bytes the
/// parser has already checked). Unpacks of a root only hand in files that
/// nothing writes again (published content-store blobs, layout blobs);
/// give a file that may change as a `Reader`, which is streamed.
#[non_exhaustive]
pub enum LayerInput {
    /// A file (memory-mapped when it is a regular file).
    Path(PathBuf),
    /// Standard input (memory-mapped when it is a redirected regular file).
    Stdin,
    /// A file the caller opened (memory-mapped when it is a regular file):
    /// for blobs of a layout, opened safely beneath it.
    File(File),
    /// Any byte stream (always streams).
    Reader(Box<dyn Read + Send>),
}

/// How to apply.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Decoder settings: strategy and memory cap.
    pub decode: DecodeOptions,
    /// Keep the archive's numeric owners. `None`: when running as root.
    pub same_owner: Option<bool>,
    /// The diff ID the layer must hash to.
    pub diff_id: Option<Digest>,
    /// Stops the apply at the next entry when tripped.
    pub cancel: Option<crate::cancel::Cancel>,
    /// The layers below, for hard links to their files (parallel apply).
    pub lower: Option<std::sync::Arc<dyn LowerLayers>>,
    /// The worker pool to write with (a root shares one among all its
    /// applies). `None`: a pool made for this apply from `backend`.
    pub pool: Option<std::sync::Arc<Pool>>,
    /// Backend and threads of the pool made when `pool` is `None`.
    pub backend: BackendOptions,
    /// The blob's digest, where the caller checks the blob against it
    /// anyway (a content-store blob, checked when it was stored, or a
    /// blob copied into the store beside this apply and checked there).
    /// If the layer is uncompressed, its diff ID is this digest and the
    /// apply does not hash the same bytes a second time.
    pub verified_digest: Option<Digest>,
}

/// What an apply did.
#[derive(Debug, Clone)]
pub struct ApplyReport {
    /// sha256 of the whole uncompressed stream.
    pub diff_id: Digest,
    /// How the blob was compressed.
    pub compression: Compression,
    /// Whether it was decoded into one buffer (else streamed).
    pub whole_buffer: bool,
    /// The decompression's time: CPU time of the streaming decoder's
    /// thread, or the whole-buffer inflate's. Decoding overlaps the apply,
    /// so this is part of the apply's wall time, not added to it.
    pub decode_time: std::time::Duration,
    /// Size of the uncompressed tar stream, trailing bytes included: the
    /// bytes the diff ID hashes.
    pub uncompressed_bytes: u64,
    /// Entry, file, directory, whiteout and byte counts.
    pub counts: Counts,
    /// What the apply did otherwise than the layer asked, one line each
    /// naming the entry (dropped overlay control xattrs); bounded by
    /// [`MAX_WARNINGS`] plus a line counting the rest. A caller shows them
    /// to the user: the layer applied, but not exactly as written.
    pub warnings: Vec<String>,
}

/// Applies one layer blob to `dest` (created if missing) as an overlay
/// upper directory. `name` labels errors (a file name or a digest).
pub fn apply_layer(
    input: LayerInput,
    dest: &Path,
    opts: &ApplyOptions,
) -> Result<ApplyReport, ApplyError> {
    let name = match &input {
        LayerInput::Path(p) => p.display().to_string(),
        LayerInput::Stdin => "-".to_string(),
        LayerInput::File(_) => "file".to_string(),
        LayerInput::Reader(_) => "stream".to_string(),
    };
    apply_inner(input, dest, opts).map_err(|e| e.layer(&name))
}

fn apply_inner(
    input: LayerInput,
    dest: &Path,
    opts: &ApplyOptions,
) -> Result<ApplyReport, ApplyError> {
    std::fs::create_dir_all(dest)
        .map_err(|e| ApplyError::fs(format!("create {}", dest.display()), e))?;
    let root = rfs::open(
        dest,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ApplyError::fs(format!("open {}", dest.display()), e.into()))?;
    let same_owner = opts
        .same_owner
        .unwrap_or_else(|| rustix::process::geteuid().is_root());
    let own_pool;
    let pool = match &opts.pool {
        Some(p) => p,
        None => {
            own_pool = Pool::new_for(opts.backend, dest).map_err(|e| {
                ApplyError::fs(format!("start the {} backend", opts.backend.kind), e)
            })?;
            &own_pool
        }
    };
    let w = Writer {
        root,
        pool,
        same_owner,
    };
    let report = match input {
        LayerInput::Path(p) => {
            let f = File::open(&p).map_err(|e| ApplyError::fs("open layer", e))?;
            from_file(f, w, opts)?
        }
        LayerInput::Stdin => {
            let fd = rustix::io::dup(std::io::stdin().as_fd())
                .map_err(|e| ApplyError::fs("read stdin", e.into()))?;
            from_file(File::from(fd), w, opts)?
        }
        LayerInput::File(f) => from_file(f, w, opts)?,
        LayerInput::Reader(r) => from_reader(r, w, opts)?,
    };
    if let Some(want) = opts.diff_id {
        if want != report.diff_id {
            return Err(ApplyError::new(ErrorKind::DiffIdMismatch {
                expected: want.to_string(),
                actual: report.diff_id.to_string(),
            }));
        }
    }
    Ok(report)
}

/// Where an apply writes: the target directory, the pool whose workers
/// write, and whether entries keep their owners.
struct Writer<'p> {
    root: OwnedFd,
    pool: &'p Arc<Pool>,
    same_owner: bool,
}

fn from_file(f: File, w: Writer<'_>, opts: &ApplyOptions) -> Result<ApplyReport, ApplyError> {
    let st = rfs::fstat(&f).map_err(|e| ApplyError::fs("stat layer", e.into()))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return from_reader(Box::new(f), w, opts);
    }
    if st.st_size == 0 {
        return whole(Arc::new(Vec::new()), Compression::Plain, w, opts);
    }
    let map = Arc::new(map(&f)?);
    let comp = Compression::detect(&map[..map.len().min(16)])?;
    let strategy = opts.decode.strategy;
    match comp {
        Compression::Plain if strategy != DecodeStrategy::Streaming => whole(map, comp, w, opts),
        Compression::Gzip if strategy.gzip_whole() => {
            let t = std::time::Instant::now();
            match decode::gunzip_whole(&map, opts.decode.memory_cap) {
                Some(buf) => {
                    let inflated = t.elapsed();
                    whole(Arc::new(buf), comp, w, opts).map(|mut r| {
                        r.decode_time = inflated;
                        r
                    })
                }
                None => streaming(&map[..], comp, w, opts),
            }
        }
        _ => streaming(&map[..], comp, w, opts),
    }
}

/// Maps a layer file for the whole-buffer paths.
fn map(f: &File) -> Result<crate::sys::Map, ApplyError> {
    map_immutable(f).map_err(|e| ApplyError::fs("map layer", e))
}

/// Maps a blob file that nothing writes while it is mapped: the crate's
/// one `unsafe` outside [`crate::sys`], kept to this call. Callers: the
/// whole-buffer apply paths, and the content-store copy of a layout blob
/// (`pipeline::fetch`), which reads the file through the map instead of
/// copying it into a buffer first.
#[allow(unsafe_code)]
pub(crate) fn map_immutable(f: &File) -> io::Result<crate::sys::Map> {
    // SAFETY: `map_layer` needs the file unmodified while mapped; the map
    // lives for one apply or one copy. Every layer file unlade itself
    // hands in is immutable: content-store blobs (`Root::unpack`, `pull`)
    // are written to a private ingest file and published by rename, and
    // nothing in unlade writes a published blob again (gc only unlinks,
    // which leaves the mapped inode intact); layout blobs
    // (`BlobSource::local_file`) are content-addressed files that the OCI
    // image layout spec makes immutable. Any other file (`unlade apply
    // FILE`, `LayerInput::Path`, `Stdin`, `File` from a library caller) is
    // the caller's, and not changing it during the apply is the documented
    // precondition of `LayerInput`; where that is not sure,
    // `LayerInput::Reader` streams and maps nothing.
    unsafe { crate::sys::map_layer(f) }
}

fn from_reader(
    mut r: Box<dyn Read + Send>,
    w: Writer<'_>,
    opts: &ApplyOptions,
) -> Result<ApplyReport, ApplyError> {
    // Peek the magic without losing it.
    let mut head = [0u8; 16];
    let mut n = 0;
    while n < head.len() {
        match r.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ApplyError::fs("read layer", e)),
        }
    }
    let comp = Compression::detect(&head[..n])?;
    let input = Cursor::new(head[..n].to_vec()).chain(r);
    streaming(input, comp, w, opts)
}

const _: () = assert!(RELEASE_STEP % decode::HASH_CHUNK == 0);

/// The diff ID without hashing: an uncompressed layer's bytes are its
/// blob, whose digest the caller checks ([`ApplyOptions::verified_digest`]).
fn known_diff_id(comp: Compression, opts: &ApplyOptions) -> Option<Digest> {
    match comp {
        Compression::Plain => opts.verified_digest,
        _ => None,
    }
}

/// Applies a fully decoded layer, hashing it on a second thread. The
/// parser and the hasher each tell the buffer how far they got, so a
/// memory map drops the pages behind both from the RSS.
fn whole<B: Bytes + 'static>(
    buf: Arc<B>,
    comp: Compression,
    w: Writer<'_>,
    opts: &ApplyOptions,
) -> Result<ApplyReport, ApplyError> {
    let len = buf.bytes().len();
    let known = known_diff_id(comp, opts);
    std::thread::scope(|s| {
        let hashed = &*buf;
        let hasher = match known {
            Some(_) => None,
            None => Some(
                std::thread::Builder::new()
                    .name("unlade-hash".into())
                    .spawn_scoped(s, move || {
                        // Every RELEASE_STEP, as the parser (a whole number
                        // of hash chunks: the assertion above `whole`).
                        decode::hash_whole(hashed.bytes(), |done| {
                            if done % RELEASE_STEP == 0 {
                                hashed.release_before(done);
                            }
                        })
                    })
                    .map_err(|e| ApplyError::fs("start a thread to hash the layer", e))?,
            ),
        };
        let shared: Arc<dyn Bytes> = buf.clone();
        let done = drive(SliceSource::new(shared), applier(w, opts));
        let diff_id = match (hasher, known) {
            (Some(h), _) => h
                .join()
                .map_err(|_| ApplyError::fs("hash layer", io::Error::other("hasher panicked")))?,
            (None, Some(d)) => d,
            (None, None) => unreachable!("a hasher runs unless the digest is known"),
        };
        let (counts, warnings, _) = done?;
        Ok(ApplyReport {
            diff_id,
            compression: comp,
            whole_buffer: true,
            decode_time: std::time::Duration::ZERO,
            uncompressed_bytes: len as u64,
            counts,
            warnings,
        })
    })
}

/// The CPU time the calling thread has used: a streaming decoder's work,
/// without its waits for input or for room in the channels.
fn thread_cpu_time() -> std::time::Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    std::time::Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// Decodes, hashes and applies on three threads connected by bounded
/// channels: memory stays at a few blocks, and two cores stay busy.
fn streaming(
    input: impl Read + Send,
    comp: Compression,
    w: Writer<'_>,
    opts: &ApplyOptions,
) -> Result<ApplyReport, ApplyError> {
    let (tx, rx) = crossbeam_channel::bounded(decode::STREAM_QUEUE);
    let (htx, hrx) = crossbeam_channel::bounded(decode::STREAM_QUEUE);
    let known = known_diff_id(comp, opts);
    let htx = known.is_none().then_some(htx);
    std::thread::scope(|s| {
        let decoder = std::thread::Builder::new()
            .name("unlade-decode".into())
            .spawn_scoped(s, move || {
                let r = decode::stream(input, comp, |b| {
                    htx.as_ref().is_none_or(|h| h.send(b.clone()).is_ok()) && tx.send(Ok(b)).is_ok()
                });
                let complete = match r {
                    Ok(complete) => complete,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        false
                    }
                };
                (complete, thread_cpu_time())
            })
            .map_err(|e| ApplyError::fs("start a thread to decode the layer", e))?;
        let hasher = match known {
            Some(_) => None,
            None => Some(
                std::thread::Builder::new()
                    .name("unlade-hash".into())
                    .spawn_scoped(s, move || decode::hash_blocks(hrx))
                    .map_err(|e| ApplyError::fs("start a thread to hash the layer", e))?,
            ),
        };
        let done = drive(StreamSource::new(rx), applier(w, opts));
        let panicked =
            |what: &str| ApplyError::fs(what.to_string(), io::Error::other("thread panicked"));
        let (complete, decode_time) = decoder.join().map_err(|_| panicked("decode layer"))?;
        let diff_id = match (hasher, known) {
            (Some(h), _) => h.join().map_err(|_| panicked("hash layer"))?,
            (None, Some(d)) => d,
            (None, None) => unreachable!("a hasher runs unless the digest is known"),
        };
        let (counts, warnings, src_len) = done?;
        if !complete {
            return Err(ApplyError::fs(
                "decode layer",
                io::Error::other("decoder stopped early"),
            ));
        }
        Ok(ApplyReport {
            diff_id,
            compression: comp,
            whole_buffer: false,
            decode_time,
            uncompressed_bytes: src_len,
            counts,
            warnings,
        })
    })
}

fn applier(w: Writer<'_>, opts: &ApplyOptions) -> Applier {
    Applier::new(w.root, w.pool.lane(), w.same_owner)
        .with_cancel(opts.cancel.clone())
        .with_lower(opts.lower.clone())
}

/// Parses `src` and applies every entry, then reads the source to its end
/// (the digest covers what follows the end-of-archive marker too).
/// Returns the counts, the warnings, and the length of the uncompressed
/// stream.
fn drive<S: Source>(src: S, mut ap: Applier) -> Result<(Counts, Vec<String>, u64), ApplyError> {
    let mut r = Reader::new(src);
    while let Some(e) = r.next_entry()? {
        ap.entry(&mut r, e)?;
    }
    let warnings = ap.take_warnings();
    let counts = ap.finish()?;
    let src = r.finish()?;
    Ok((counts, warnings, src.offset()))
}
