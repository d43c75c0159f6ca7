//! Layer decompression: detection by magic bytes, the whole-buffer gzip
//! path (libdeflate on a memory map) and the streaming path (zlib-rs for
//! gzip, libzstd for zstd, a plain copy for tar) that feeds a bounded
//! channel. Both hash the uncompressed bytes: the diff ID.
//!
//! Choosing between them is [`DecodeStrategy`]'s job: libdeflate decodes a
//! whole member in one call, which is the fastest inflate there is, but it
//! needs the whole input and an output buffer as large as the result. So
//! the whole-buffer path is taken only for mappable input whose output fits
//! [`DecodeOptions::memory_cap`]; anything else (stdin, a layer that
//! inflates past the cap, a gzip ISIZE that lies) streams with memory
//! bounded by the channel. The gzip trailer's ISIZE is only a hint: it is
//! the last member's size modulo 2^32, so it is never trusted to size
//! anything, only to skip an attempt that is bound to fail.

use std::io::{self, BufReader, Read};

use crossbeam_channel::Sender;

use crate::digest::{Digest, Hasher};
use crate::error::DecodeError;
use crate::source::BlockMsg;
use crate::sys::{Deflate, Inflate};

/// The compression of a layer blob, told by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecodeStrategy {
    /// Whole-buffer where the input is mappable and the output fits the
    /// memory cap, streaming otherwise.
    #[default]
    Auto,
    /// Always stream (bounded memory, decoding overlapped with applying).
    Streaming,
}

/// Default for [`DecodeOptions::memory_cap`]: 1 GiB.
pub const DEFAULT_MEMORY_CAP: usize = 1 << 30;

/// Decoder settings.
#[derive(Debug, Clone, Copy)]
pub struct DecodeOptions {
    /// Path choice.
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

/// Size of the blocks a streaming decoder hands over.
pub const STREAM_BLOCK: usize = 1 << 20;
/// Blocks in flight between decoder and parser.
pub const STREAM_QUEUE: usize = 8;

/// Inflates a whole gzip blob (every member) into one buffer of at most
/// `cap` bytes with libdeflate. Returns `None` when the output would not
/// fit or the data are not valid gzip: the caller then streams, which
/// bounds memory and reports a corruption with its offset.
pub fn gunzip_whole(input: &[u8], cap: usize) -> Option<Vec<u8>> {
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
    // calloc'd: pages the decoder never writes are never resident.
    let mut out = vec![0u8; cap];
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
    out.truncate(opos);
    Some(out)
}

/// Hashes a whole decoded buffer.
pub fn hash_whole(buf: &[u8]) -> Digest {
    let mut h = Hasher::new();
    // Chunked so the hasher's inner loop sees large slices.
    for c in buf.chunks(1 << 22) {
        h.update(c);
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

/// Decodes `input` as `comp` on the calling thread and sends the output in
/// [`STREAM_BLOCK`]-byte blocks. Returns the digest of the whole output,
/// or `None` if decoding failed (the error went down the channel) or the
/// receiver hung up.
pub fn stream(input: impl Read, comp: Compression, tx: &Sender<BlockMsg>) -> Option<Digest> {
    let counting = Counting {
        inner: input,
        count: 0,
        io_error: None,
    };
    let mut hasher = Hasher::new();
    let result = match comp {
        Compression::Plain => pump(counting, &mut hasher, tx, comp, |c| c),
        Compression::Gzip => {
            let dec =
                flate2::bufread::MultiGzDecoder::new(BufReader::with_capacity(1 << 16, counting));
            pump(dec, &mut hasher, tx, comp, |d| d.get_ref().get_ref())
        }
        Compression::Zstd => match zstd::stream::read::Decoder::with_buffer(
            BufReader::with_capacity(1 << 17, counting),
        ) {
            Ok(dec) => pump(dec, &mut hasher, tx, comp, |d| d.get_ref().get_ref()),
            Err(e) => Err(DecodeError::Io(e)),
        },
    };
    match result {
        Ok(true) => Some(hasher.finish()),
        Ok(false) => None,
        Err(e) => {
            let _ = tx.send(Err(e));
            None
        }
    }
}

/// Reads `r` to the end in blocks, hashing and sending each. `Ok(false)`
/// if the receiver hung up.
fn pump<R: Read, I>(
    mut r: R,
    hasher: &mut Hasher,
    tx: &Sender<BlockMsg>,
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
        hasher.update(&block);
        if tx.send(Ok(block)).is_err() {
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
}
