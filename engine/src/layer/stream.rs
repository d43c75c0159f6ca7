//! Byte sources for the tar parser: a decoded layer seen either as one
//! borrowed buffer (the whole-buffer path) or as a stream of owned blocks
//! handed over by a decoder thread (the streaming path).
//!
//! The parser only ever asks for "the next 512-byte block", "up to N data
//! bytes" and "skip N bytes", so both paths look the same to it. The
//! difference shows in [`Chunk`]: the whole-buffer source lends slices of its
//! buffer (zero copy, so file data go from the decoder's output straight to
//! `write`), the streaming source copies out of its blocks.

use std::ops::Deref;
use std::sync::Arc;

use crossbeam_channel::Receiver;

use crate::layer::error::DecodeError;

/// Size of the blocks a streaming decoder hands over.
pub const STREAM_BLOCK: usize = 1 << 20;

/// File data handed from a [`Source`] to the applier.
///
/// `Borrowed` points into the decoded layer that outlives the whole apply;
/// `Owned` is a copy out of a streaming source's blocks. Those are not
/// recycled (the decoder allocates a fresh one for each, see
/// [`crate::layer::decode`]) but shared with the hasher and dropped once
/// both have read them: a copy lets a block go as soon as the parser has
/// moved past it, however long the applier keeps the chunk (a file's data
/// wait in a batch until the batch runs).
#[derive(Debug)]
pub enum Chunk<'a> {
    /// A slice of the whole decoded layer.
    Borrowed(&'a [u8]),
    /// A copy out of a streaming source.
    Owned(Vec<u8>),
}

impl Deref for Chunk<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Chunk::Borrowed(s) => s,
            Chunk::Owned(v) => v,
        }
    }
}

/// What the tar parser reads from. Offsets are positions in the uncompressed
/// stream, which is what error messages report.
pub trait Source<'a> {
    /// Fills `buf` with the next block. Returns how many bytes were read:
    /// fewer than 512 only at the end of the stream.
    fn read_block(&mut self, buf: &mut [u8; 512]) -> Result<usize, DecodeError>;
    /// Returns between 1 and `max` bytes of data, or an empty chunk at the
    /// end of the stream.
    fn data(&mut self, max: usize) -> Result<Chunk<'a>, DecodeError>;
    /// Skips up to `n` bytes; returns how many were skipped (fewer only at
    /// the end of the stream).
    fn skip(&mut self, n: u64) -> Result<u64, DecodeError>;
    /// Reads and discards everything left, so that the digest of the stream
    /// covers bytes after the end-of-archive marker too.
    fn drain(&mut self) -> Result<(), DecodeError>;
    /// Position in the uncompressed stream.
    fn offset(&self) -> u64;
    /// Largest chunk worth asking [`Source::data`] for: a whole-buffer
    /// source lends any size for free, a streaming one copies.
    fn max_chunk(&self) -> usize {
        usize::MAX
    }
}

/// A source over one complete buffer: a memory-mapped plain tar or the
/// output of whole-buffer decompression.
pub struct SliceSource<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Told, every [`RELEASE_STEP`] bytes, how far the parser has got (a
    /// memory map drops the pages behind it from the RSS).
    release: Option<&'a (dyn Fn(usize) + Sync)>,
    next_release: usize,
}

/// How often a [`SliceSource`] reports its progress to its release hook.
pub const RELEASE_STEP: usize = 32 << 20;

impl<'a> SliceSource<'a> {
    /// Wraps a decoded layer.
    pub fn new(buf: &'a [u8]) -> Self {
        SliceSource {
            buf,
            pos: 0,
            release: None,
            next_release: RELEASE_STEP,
        }
    }

    /// Wraps a memory-mapped layer, calling `release(offset)` each time
    /// the parser has passed another [`RELEASE_STEP`] bytes.
    pub fn releasing(buf: &'a [u8], release: &'a (dyn Fn(usize) + Sync)) -> Self {
        SliceSource {
            release: Some(release),
            ..SliceSource::new(buf)
        }
    }

    fn advance(&mut self, n: usize) {
        self.pos += n;
        if self.pos >= self.next_release {
            if let Some(r) = self.release {
                // Behind by a step: the backend may still be writing the
                // last chunks handed out (a refault would be harmless,
                // only slower).
                r(self.pos.saturating_sub(RELEASE_STEP));
            }
            self.next_release = self.pos + RELEASE_STEP;
        }
    }
}

impl<'a> Source<'a> for SliceSource<'a> {
    fn read_block(&mut self, block: &mut [u8; 512]) -> Result<usize, DecodeError> {
        let n = (self.buf.len() - self.pos).min(512);
        block[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.advance(n);
        Ok(n)
    }

    fn data(&mut self, max: usize) -> Result<Chunk<'a>, DecodeError> {
        let n = (self.buf.len() - self.pos).min(max);
        let s = &self.buf[self.pos..self.pos + n];
        self.advance(n);
        Ok(Chunk::Borrowed(s))
    }

    fn skip(&mut self, n: u64) -> Result<u64, DecodeError> {
        let left = (self.buf.len() - self.pos) as u64;
        let k = left.min(n);
        self.advance(k as usize);
        Ok(k)
    }

    fn drain(&mut self) -> Result<(), DecodeError> {
        self.pos = self.buf.len();
        Ok(())
    }

    fn offset(&self) -> u64 {
        self.pos as u64
    }
}

/// A block of decoded bytes, shared between the parser and the hasher.
pub type Block = Arc<Vec<u8>>;

/// A block of decoded bytes sent by a decoder thread, or the error that
/// stopped it.
pub type BlockMsg = Result<Block, DecodeError>;

/// A source fed by a decoder thread through a bounded channel, so memory
/// stays at (channel capacity + 1) blocks however large the layer is.
pub struct StreamSource {
    rx: Receiver<BlockMsg>,
    cur: Block,
    pos: usize,
    offset: u64,
    eof: bool,
}

impl StreamSource {
    /// Reads blocks from `rx` until the sender hangs up (end of stream).
    pub fn new(rx: Receiver<BlockMsg>) -> Self {
        StreamSource {
            rx,
            cur: Arc::new(Vec::new()),
            pos: 0,
            offset: 0,
            eof: false,
        }
    }

    /// Makes sure the current block has unread bytes; false at end of stream.
    fn refill(&mut self) -> Result<bool, DecodeError> {
        while self.pos == self.cur.len() {
            if self.eof {
                return Ok(false);
            }
            match self.rx.recv() {
                Ok(Ok(block)) => {
                    self.cur = block;
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.eof = true;
                    return Err(e);
                }
                Err(_) => {
                    self.eof = true;
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    fn copy_into(&mut self, out: &mut [u8]) -> Result<usize, DecodeError> {
        let mut got = 0;
        while got < out.len() && self.refill()? {
            let n = (self.cur.len() - self.pos).min(out.len() - got);
            out[got..got + n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
            self.pos += n;
            got += n;
        }
        self.offset += got as u64;
        Ok(got)
    }
}

impl<'a> Source<'a> for StreamSource {
    fn read_block(&mut self, block: &mut [u8; 512]) -> Result<usize, DecodeError> {
        self.copy_into(block)
    }

    fn data(&mut self, max: usize) -> Result<Chunk<'a>, DecodeError> {
        if !self.refill()? {
            return Ok(Chunk::Owned(Vec::new()));
        }
        // Try to hand out the whole request at once so small files are one
        // chunk even when they straddle two blocks.
        let mut v = vec![0u8; max];
        let n = self.copy_into(&mut v)?;
        v.truncate(n);
        Ok(Chunk::Owned(v))
    }

    fn skip(&mut self, n: u64) -> Result<u64, DecodeError> {
        let mut left = n;
        while left > 0 && self.refill()? {
            let k = ((self.cur.len() - self.pos) as u64).min(left);
            self.pos += k as usize;
            left -= k;
        }
        self.offset += n - left;
        Ok(n - left)
    }

    fn drain(&mut self) -> Result<(), DecodeError> {
        while self.refill()? {
            self.offset += (self.cur.len() - self.pos) as u64;
            self.pos = self.cur.len();
        }
        Ok(())
    }

    fn offset(&self) -> u64 {
        self.offset
    }

    fn max_chunk(&self) -> usize {
        STREAM_BLOCK * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_source_reports_progress_each_step() {
        let buf = vec![7u8; 3 * RELEASE_STEP + 100];
        let seen = std::sync::Mutex::new(Vec::new());
        let hook = |at: usize| seen.lock().unwrap().push(at);
        let mut s = SliceSource::releasing(&buf, &hook);
        let mut total = 0;
        while let Ok(Chunk::Borrowed(c)) = s.data(1 << 20) {
            if c.is_empty() {
                break;
            }
            assert!(c.iter().all(|&b| b == 7));
            total += c.len();
        }
        assert_eq!(total, buf.len());
        // Each report trails the parser by a step and only ever grows.
        assert_eq!(*seen.lock().unwrap(), [0, RELEASE_STEP, 2 * RELEASE_STEP]);
    }

    #[test]
    fn stream_source_spans_blocks() {
        let (tx, rx) = crossbeam_channel::bounded(4);
        tx.send(Ok(Arc::new(vec![1u8; 300]))).unwrap();
        tx.send(Ok(Arc::new(vec![2u8; 300]))).unwrap();
        tx.send(Ok(Arc::new(vec![3u8; 100]))).unwrap();
        drop(tx);
        let mut s = StreamSource::new(rx);
        let mut b = [0u8; 512];
        assert_eq!(s.read_block(&mut b).unwrap(), 512);
        assert_eq!(b[299], 1);
        assert_eq!(b[300], 2);
        assert_eq!(s.offset(), 512);
        let c = s.data(50).unwrap();
        assert_eq!(c.len(), 50);
        assert_eq!(c[49], 2);
        assert_eq!(s.skip(1000).unwrap(), 138);
        assert_eq!(s.data(10).unwrap().len(), 0);
        assert_eq!(s.offset(), 700);
    }

    #[test]
    fn slice_source_short_block() {
        let data = [7u8; 600];
        let mut s = SliceSource::new(&data);
        let mut b = [0u8; 512];
        assert_eq!(s.read_block(&mut b).unwrap(), 512);
        assert_eq!(s.read_block(&mut b).unwrap(), 88);
        assert_eq!(s.read_block(&mut b).unwrap(), 0);
    }
}
