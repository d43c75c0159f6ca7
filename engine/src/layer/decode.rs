//! Layer decompression: detection by magic bytes, the whole-buffer gzip
//! path (libdeflate on a memory map) and the streaming path (ISA-L for
//! gzip, libzstd for zstd, a plain copy for tar) that feeds bounded
//! channels. The caller hashes the uncompressed bytes: the diff ID.
//!
//! Choosing between them is [`DecodeStrategy`]'s job: libdeflate decodes a
//! whole member in one call, the fastest inflate there is, but it needs the
//! whole input and an output buffer as large as the result, and nothing can
//! be written before it is done. So the whole-buffer path is taken only when
//! asked for (or on one CPU) for mappable input whose output fits
//! [`DecodeOptions::memory_cap`]; anything else (stdin, a layer that
//! inflates past the cap, a gzip ISIZE that lies) streams with memory
//! bounded by the channels. The gzip trailer's ISIZE is only a hint: it is
//! the last member's size modulo 2^32, so it is never trusted to size
//! anything, only to skip an attempt that is bound to fail.

use std::io::{self, BufReader, Read};
use std::sync::Arc;

use crossbeam_channel::Receiver;

use crate::layer::error::DecodeError;
use crate::layer::stream::{Block, STREAM_BLOCK};
use crate::oci::digest::{Digest, Hasher};
#[cfg(unlade_isal)]
mod isal_gzip;
use crate::sys::{Deflate, Inflate};

/// The compression of a layer blob, told by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Compression {
    /// An uncompressed tar (or anything that is not compressed).
    Plain,
    /// gzip, one or more members.
    Gzip,
    /// zstd, one or more frames (skippable frames allowed).
    Zstd,
}

impl Compression {
    /// Tells the compression from the first bytes (at least 10 where the
    /// stream has them). xz and bzip2 are recognised only to be refused with
    /// a clear message: OCI layers are tar, gzip or zstd.
    pub fn detect(head: &[u8]) -> Result<Compression, DecodeError> {
        if head.starts_with(&[0x1f, 0x8b]) {
            Ok(Compression::Gzip)
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
            || (head.len() >= 4 && head[0] & 0xf0 == 0x50 && head[1..4] == [0x2a, 0x4d, 0x18])
        {
            Ok(Compression::Zstd)
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            Err(DecodeError::Unsupported("xz"))
        } else if head.len() >= 10
            && head.starts_with(b"BZh")
            && (b'1'..=b'9').contains(&head[3])
            && head[4..10] == [0x31, 0x41, 0x59, 0x26, 0x53, 0x59]
        {
            Err(DecodeError::Unsupported("bzip2"))
        } else {
            Ok(Compression::Plain)
        }
    }

    fn name(self) -> &'static str {
        match self {
            Compression::Plain => "tar",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// Which decoding path to take.
///
/// On the 2-CPU machine this was built on, applying the 167 MB Debian base
/// layer (`perf/README.md`), the streaming path (then zlib-rs decoding,
/// sha256 and applying on three threads at once) finished 11-19% before
/// the whole-buffer path in the last series of shuffled and paired runs,
/// and the two were even in some earlier ones; whole-buffer libdeflate
/// always took about 6% less CPU. Streaming overlaps everything and does
/// not depend on huge pages being available for a large buffer, and with
/// more CPUs it can only gain; so `Auto` streams gzip when there are two
/// CPUs or more. Streaming gzip now inflates with ISA-L
/// ([`GzipStreamer::Isal`]), which also takes less CPU in all than
/// whole-buffer libdeflate: libdeflate's inflate loop is the faster one,
/// but filling a fresh buffer as large as the layer costs the kernel more
/// in page faults than that (see [`GzipStreamer`]). A single CPU still
/// takes the whole buffer: no decoder thread, no hand-offs between three
/// threads on one core, and the paired runs of whole applies there did not
/// tell the two apart. A caller that keeps every CPU busy with several
/// layers at once may ask for [`DecodeStrategy::WholeBuffer`] too.
///
/// With the `cli` feature it is also the `--decode` value of `unlade
/// apply` (`auto`, `whole`, `streaming`): the command line takes the
/// library's choices as they are instead of a copy to keep in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum DecodeStrategy {
    /// The fastest for one layer on this machine: a plain tar file is used
    /// in place (memory map), gzip streams when at least two CPUs are
    /// available (else whole-buffer when it fits), zstd streams.
    #[default]
    #[cfg_attr(
        feature = "cli",
        value(help = "The fastest for one layer: plain tar in place, gzip and zstd \
                      streamed on three threads (whole-buffer gzip on a single CPU)")
    )]
    Auto,
    /// Prefer libdeflate's whole-buffer inflate for gzip whenever the
    /// output fits the memory cap (least CPU per layer).
    #[cfg_attr(
        feature = "cli",
        value(
            name = "whole",
            help = "Whole-buffer libdeflate for gzip when it fits the memory cap"
        )
    )]
    WholeBuffer,
    /// Always stream (bounded memory, decoding overlapped with applying).
    #[cfg_attr(feature = "cli", value(help = "Always stream"))]
    Streaming,
}

impl DecodeStrategy {
    /// Whether gzip input that fits the cap should be inflated whole.
    pub fn gzip_whole(self) -> bool {
        match self {
            DecodeStrategy::WholeBuffer => true,
            DecodeStrategy::Streaming => false,
            DecodeStrategy::Auto => std::thread::available_parallelism().map_or(1, |n| n.get()) < 2,
        }
    }
}

/// Default for [`DecodeOptions::memory_cap`]: 1 GiB.
pub const DEFAULT_MEMORY_CAP: usize = 1 << 30;

/// A byte count as people write one: digits with an optional binary
/// suffix `K`, `M` or `G` (either case; `512M`, `2g`, `4096`). What
/// [`DecodeOptions::memory_cap`] is set from by a command line
/// (`--memory-cap`) or an environment variable (`UNLADE_MEMORY_CAP`): the
/// rule lives here so that every front end reads a size the same way.
/// A value that does not fit `usize` is an error, not a wrap.
pub fn parse_size(s: &str) -> Result<usize, ParseSizeError> {
    let input = s.trim();
    let err = |why| ParseSizeError {
        input: input.to_string(),
        why,
    };
    let (num, mult) = match input.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(err(": unknown suffix")),
            };
            (&input[..i], m)
        }
        _ => (input, 1),
    };
    let n: u64 = num.parse().map_err(|_| err(""))?;
    n.checked_mul(mult)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| err(": too large"))
}

/// A size [`parse_size`] cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {input:?}{why}")]
pub struct ParseSizeError {
    /// The text, trimmed.
    pub input: String,
    /// Why (empty: not a number).
    why: &'static str,
}

/// Decoder settings.
#[derive(Debug, Clone, Copy)]
pub struct DecodeOptions {
    /// Whether to decode into one buffer or stream the layer through a
    /// decoder thread (see [`DecodeStrategy`]).
    pub strategy: DecodeStrategy,
    /// Largest uncompressed layer decoded into one buffer. Above it, the
    /// layer streams and memory stays at a few MiB. Only the touched part of
    /// the buffer becomes resident.
    pub memory_cap: usize,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            strategy: DecodeStrategy::Auto,
            memory_cap: DEFAULT_MEMORY_CAP,
        }
    }
}

/// Blocks in flight between decoder and parser.
pub const STREAM_QUEUE: usize = 8;

/// Inflates a whole gzip blob (every member) into one buffer of at most
/// `cap` bytes with libdeflate. Returns `None` when the output would not
/// fit or the data are not valid gzip: the caller then streams, which
/// bounds memory and reports a corruption with its offset.
pub fn gunzip_whole(input: &[u8], cap: usize) -> Option<Whole> {
    // Deflate never shrinks data by more than a few bytes per 64 KiB
    // stored block, so a blob much larger than the cap cannot fit.
    if input.len() as u64 > cap as u64 + cap as u64 / 32 {
        return None;
    }
    if input.len() >= 18 {
        // Hint only: the last member's size mod 2^32.
        let t = &input[input.len() - 4..];
        let isize_hint = u32::from_le_bytes([t[0], t[1], t[2], t[3]]) as usize;
        if isize_hint > cap {
            return None;
        }
    }
    // An anonymous map: pages the decoder never writes are never resident,
    // and huge pages cut the page faults of filling it 512-fold.
    let mut out = memmap2::MmapMut::map_anon(cap).ok()?;
    let _ = out.advise(memmap2::Advice::HugePage);
    let mut d = Deflate::new().ok()?;
    let (mut ipos, mut opos) = (0usize, 0usize);
    loop {
        match d.gzip_member(&input[ipos..], &mut out[opos..]) {
            Inflate::Done(i, o) => {
                ipos += i;
                opos += o;
            }
            Inflate::NoSpace | Inflate::BadData => return None,
        }
        if ipos == input.len() {
            break;
        }
        if !input[ipos..].starts_with(&[0x1f, 0x8b]) {
            // Trailing data after a member: let the streaming decoder
            // produce the error with its offset.
            return None;
        }
    }
    Some(Whole {
        map: out,
        len: opos,
    })
}

/// A whole decoded layer: an anonymous map and how much of it is filled.
pub struct Whole {
    map: memmap2::MmapMut,
    len: usize,
}

impl std::ops::Deref for Whole {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[..self.len]
    }
}

impl crate::layer::stream::Bytes for Whole {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// Bytes [`hash_whole`] hashes between two calls of its `passed`.
pub const HASH_CHUNK: usize = 1 << 22;

/// Hashes a whole decoded buffer, calling `passed(n)` after each
/// [`HASH_CHUNK`] with the bytes hashed so far (the whole-buffer apply
/// releases a memory map's pages behind the hasher with it).
pub fn hash_whole(buf: &[u8], mut passed: impl FnMut(usize)) -> Digest {
    let mut h = Hasher::new();
    let mut done = 0;
    // Chunked so the hasher's inner loop sees large slices.
    for c in buf.chunks(HASH_CHUNK) {
        h.update(c);
        done += c.len();
        passed(done);
    }
    h.finish()
}

/// Counts the compressed bytes read and keeps the underlying read error,
/// so a decoder error can be told apart from an I/O error and placed.
struct Counting<R> {
    inner: R,
    count: u64,
    io_error: Option<io::ErrorKind>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.count += n as u64;
                Ok(n)
            }
            Err(e) => {
                self.io_error = Some(e.kind());
                Err(e)
            }
        }
    }
}

/// Decodes `input` as `comp` on the calling thread and hands the output
/// to `send` in [`STREAM_BLOCK`]-byte blocks. Returns `Ok(true)` at the end
/// of the stream, `Ok(false)` as soon as `send` returns false (a consumer
/// hung up). Hashing is the consumer's business: on two cores, decoding,
/// hashing and applying on three threads keeps both busy.
pub fn stream(
    input: impl Read,
    comp: Compression,
    send: impl FnMut(Block) -> bool,
) -> Result<bool, DecodeError> {
    if comp == Compression::Gzip {
        return stream_gzip(input, GzipStreamer::default(), send);
    }
    let counting = Counting {
        inner: input,
        count: 0,
        io_error: None,
    };
    match comp {
        Compression::Zstd => pump(ZstdFrames::new(counting), send, comp, |d| &d.inner),
        _ => pump(counting, send, comp, |c| c),
    }
}

/// The library that inflates a gzip layer on the streaming path.
///
/// ISA-L (`libisal`, the library of `igzip`) is the default, measured
/// against the others on the 2-CPU machine this was built on (AMD EPYC,
/// shared with other builds: CPU time is the steadier figure) decoding the
/// five gzip layers of the golang image (308 MB to 973 MB) on one core,
/// output discarded, 18 shuffled rounds (`bench/examples/gunzip.rs`;
/// medians of user + system time): ISA-L streaming 1.69 s, `igzip -dc`
/// 1.73 s, zlib-rs streaming 1.93 s, whole-buffer libdeflate 2.66 s (1.46 s
/// of it in user space, the fastest inflate loop of the three; the rest is
/// the kernel faulting in the 1 GiB output map and the read input), `pigz
/// -dc` 4.63 s. zlib-rs stays for comparison and as the reference the
/// tests hold ISA-L to.
///
/// One difference between the two: ISA-L checks that a Huffman code is
/// not over-subscribed but not that it is complete, so a dynamic block
/// whose code leaves some bit patterns unassigned decodes as long as none
/// of them occurs, where zlib refuses the block (the same class of
/// leniency as whole-buffer libdeflate's, `fuzz/regressions/README.md`).
/// No encoder writes such blocks, the output is the unique decoding of
/// the bits present, and the member's CRC32 and the layer's diff ID still
/// hold it to the right bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum GzipStreamer {
    /// ISA-L's stateful inflate; member headers parsed here, CRC32 and
    /// ISIZE checked by ISA-L. In a build without libisal
    /// ([`GzipStreamer::isal_built_in`] is false) it is zlib-rs.
    #[default]
    Isal,
    /// flate2's `MultiGzDecoder` on zlib-rs.
    ZlibRs,
}

impl GzipStreamer {
    /// Whether this build links ISA-L (`build.rs` found libisal with
    /// pkg-config); without it [`GzipStreamer::Isal`] falls back to zlib-rs,
    /// so benchmarks say which one they measured.
    pub const fn isal_built_in() -> bool {
        cfg!(unlade_isal)
    }
}

/// [`stream`] for gzip with a chosen inflater: the same blocks, the same
/// errors (with the compressed offset where decoding stopped), whichever
/// library decodes. For benchmarks and tests that compare the two; the
/// engine uses [`GzipStreamer::default`].
pub fn stream_gzip(
    input: impl Read,
    with: GzipStreamer,
    send: impl FnMut(Block) -> bool,
) -> Result<bool, DecodeError> {
    match with {
        #[cfg(unlade_isal)]
        GzipStreamer::Isal => isal_gzip::isal_gunzip(input, send),
        #[cfg(not(unlade_isal))]
        GzipStreamer::Isal => stream_gzip(input, GzipStreamer::ZlibRs, send),
        GzipStreamer::ZlibRs => {
            let counting = Counting {
                inner: input,
                count: 0,
                io_error: None,
            };
            let dec =
                flate2::bufread::MultiGzDecoder::new(BufReader::with_capacity(1 << 16, counting));
            pump(dec, send, Compression::Gzip, |d| d.get_ref().get_ref())
        }
    }
}

/// Largest zstd frame header (`ZSTD_FRAMEHEADERSIZE_MAX`): what must be
/// in the buffer to read a frame's declared content size.
const ZSTD_HEADER_MAX: usize = 18;

/// A streaming zstd decoder of concatenated frames that holds every frame
/// to the content size its header declares. libzstd's streaming decoder
/// checks that size only on its single-pass path, which it takes when the
/// output space left can hold the whole frame: so whether a frame that
/// lies about its size was refused depended on where it fell in an output
/// block (found by the `decode` fuzz target). Here a frame that ends with
/// more or fewer bytes than it declares is always corrupt, as `zstd -t`
/// says.
struct ZstdFrames<R> {
    inner: R,
    dctx: zstd::zstd_safe::DCtx<'static>,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    /// Inside a frame: its declared size (None: not declared) and the
    /// bytes it produced so far.
    frame: Option<(Option<u64>, u64)>,
    /// Whether a frame began: a stream of none is not zstd.
    any: bool,
}

impl<R: Read> ZstdFrames<R> {
    fn new(inner: R) -> Self {
        ZstdFrames {
            inner,
            dctx: zstd::zstd_safe::DCtx::create(),
            buf: vec![0; 1 << 17],
            start: 0,
            end: 0,
            eof: false,
            frame: None,
            any: false,
        }
    }

    /// Reads until at least `want` bytes are buffered or the input ends.
    fn fill(&mut self, want: usize) -> io::Result<()> {
        if self.end - self.start >= want || self.eof {
            return Ok(());
        }
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        while self.end < want.min(self.buf.len()) {
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn zstd_corrupt(detail: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, detail.into())
}

impl<R: Read> Read for ZstdFrames<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            let want = if self.frame.is_none() {
                ZSTD_HEADER_MAX
            } else {
                1
            };
            self.fill(want)?;
            let input = &self.buf[self.start..self.end];
            if input.is_empty() {
                return match self.frame {
                    Some(_) => Err(zstd_corrupt("the stream ends inside a frame")),
                    None if !self.any => Err(zstd_corrupt("no zstd frame")),
                    None => Ok(0),
                };
            }
            self.any = true;
            let frame = match self.frame {
                Some(f) => f,
                // A frame starts here: what does its header declare?
                // (Skippable frames and frames without the field declare
                // nothing; a malformed header is the decoder's to refuse.)
                None => (
                    zstd::zstd_safe::get_frame_content_size(input)
                        .ok()
                        .flatten(),
                    0,
                ),
            };
            let mut inb = zstd::zstd_safe::InBuffer::around(input);
            let mut outb = zstd::zstd_safe::OutBuffer::around(&mut *out);
            let hint = self
                .dctx
                .decompress_stream(&mut outb, &mut inb)
                .map_err(|code| zstd_corrupt(zstd::zstd_safe::get_error_name(code)))?;
            let (used, written) = (inb.pos(), outb.pos());
            self.start += used;
            let produced = frame.1 + written as u64;
            if hint == 0 {
                if let Some(declared) = frame.0 {
                    if declared != produced {
                        return Err(zstd_corrupt(format!(
                            "a frame declares {declared} bytes but holds {produced}"
                        )));
                    }
                }
                self.frame = None;
            } else {
                self.frame = Some((frame.0, produced));
            }
            if written > 0 {
                return Ok(written);
            }
            if used == 0 && hint != 0 {
                // No progress on what is buffered: it needs more input.
                let have = self.end - self.start;
                self.fill(have + 1)?;
                if self.end - self.start == have {
                    return Err(zstd_corrupt("the stream ends inside a frame"));
                }
            }
        }
    }
}

/// Hashes blocks as they arrive until the sender hangs up.
pub fn hash_blocks(rx: Receiver<Block>) -> Digest {
    let mut h = Hasher::new();
    for b in rx {
        h.update(&b);
    }
    h.finish()
}

/// Reads `r` to the end in blocks, each a fresh allocation (the receivers
/// keep a block as long as they need it), and sends each. `Ok(false)` if a
/// receiver hung up.
fn pump<R: Read, I>(
    mut r: R,
    mut send: impl FnMut(Block) -> bool,
    comp: Compression,
    counting: impl Fn(&R) -> &Counting<I>,
) -> Result<bool, DecodeError> {
    loop {
        let mut block = vec![0u8; STREAM_BLOCK];
        let mut n = 0;
        while n < block.len() {
            match r.read(&mut block[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let c = counting(&r);
                    if c.io_error.is_some() || comp == Compression::Plain {
                        return Err(DecodeError::Io(e));
                    }
                    return Err(DecodeError::Corrupt {
                        format: comp.name(),
                        compressed_offset: Some(c.count),
                        detail: e.to_string(),
                    });
                }
            }
        }
        if n == 0 {
            return Ok(true);
        }
        block.truncate(n);
        if !send(Arc::new(block)) {
            return Ok(false);
        }
        if n < STREAM_BLOCK {
            // Short block: the reader hit the end.
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 512M "), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert_eq!(
            parse_size("3T").unwrap_err().to_string(),
            "invalid size \"3T\": unknown suffix"
        );
        assert_eq!(
            parse_size("M").unwrap_err().to_string(),
            "invalid size \"M\""
        );
        assert_eq!(
            parse_size("-1").unwrap_err().to_string(),
            "invalid size \"-1\""
        );
        assert_eq!(
            parse_size("99999999999999999999G").unwrap_err().to_string(),
            "invalid size \"99999999999999999999G\""
        );
        assert_eq!(
            parse_size("18446744073709551615K").unwrap_err().to_string(),
            "invalid size \"18446744073709551615K\": too large"
        );
    }

    #[test]
    fn detects() {
        assert_eq!(
            Compression::detect(&[0x1f, 0x8b, 8, 0]).unwrap(),
            Compression::Gzip
        );
        assert_eq!(
            Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd]).unwrap(),
            Compression::Zstd
        );
        assert_eq!(
            Compression::detect(&[0x5e, 0x2a, 0x4d, 0x18]).unwrap(),
            Compression::Zstd
        );
        assert_eq!(
            Compression::detect(b"etc/passwd\0").unwrap(),
            Compression::Plain
        );
        assert_eq!(Compression::detect(b"").unwrap(), Compression::Plain);
        assert!(Compression::detect(&[0xfd, b'7', b'z', b'X', b'Z', 0]).is_err());
        assert_eq!(
            Compression::detect(b"BZh9hello").unwrap(),
            Compression::Plain
        );
    }

    fn unzstd(input: &[u8]) -> Result<Vec<u8>, DecodeError> {
        let mut out = Vec::new();
        stream(input, Compression::Zstd, |b| {
            out.extend_from_slice(&b);
            true
        })?;
        Ok(out)
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn zstd_frames_are_held_to_their_declared_size() {
        // Frames, a skippable frame between them, one without a declared
        // size (streamed), empty ones: all decode.
        let a: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut input = zstd::bulk::compress(&a[..1_500_000], 3).unwrap();
        input.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3]);
        let mut w = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        std::io::Write::write_all(&mut w, &a[1_500_000..]).unwrap();
        input.extend_from_slice(&w.finish().unwrap());
        input.extend_from_slice(&zstd::bulk::compress(b"", 1).unwrap());
        assert_eq!(unzstd(&input).unwrap(), a);
        // Found by the decode fuzz target: a frame of 1,048,476 bytes, then
        // one that declares 198 bytes and holds none. libzstd's streaming
        // decoder let the second through when it started that close to the
        // end of a 1 MiB output block, and refused it elsewhere.
        let lie = hex(
            "28b52ffda09cff0f005400001061610100fbff39c002020010610200106102001061020010610200\
             106102001061e3fc0f6128b52ffd20c6010000",
        );
        let e = unzstd(&lie).unwrap_err().to_string();
        assert!(e.contains("declares 198 bytes but holds 0"), "{e}");
        // The same lie at the start of a block.
        let e = unzstd(&lie[lie.len() - 8..]).unwrap_err().to_string();
        assert!(e.contains("zstd data corrupt"), "{e}");
        // Nothing at all (as zstd -t says: not zstd).
        assert!(unzstd(b"").is_err());
        // A truncated frame.
        let e = unzstd(&input[..100]).unwrap_err().to_string();
        assert!(e.contains("ends inside a frame"), "{e}");
    }
}
