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

/// A whole decoded layer that file data can be lent from: a memory map
/// of a plain tar file, or the output of whole-buffer decompression.
///
/// Shared (`Arc`) rather than borrowed so that a chunk of it can travel to
/// a worker thread of a pool that outlives the apply (the pool is shared
/// by every layer of a root), while still costing no copy.
pub trait Bytes: Send + Sync {
    /// The bytes.
    fn bytes(&self) -> &[u8];
    /// Drops the pages before `end` from this process's RSS, where the
    /// buffer can get them back unchanged (a file mapping); a no-op
    /// otherwise.
    fn release_before(&self, _end: usize) {}
}

impl Bytes for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl Bytes for crate::sys::Map {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn release_before(&self, end: usize) {
        crate::sys::Map::release_before(self, end);
    }
}

/// File data handed from a [`Source`] to the applier, and on to a backend
/// worker: it owns what it points at, so a job can outlive the parser's
/// position and run on another thread.
///
/// `Shared` is a range of a whole decoded layer (zero copy); `Owned` is a
/// copy out of a streaming source's blocks. Those are not recycled (the
/// decoder allocates a fresh one for each, see [`crate::layer::decode`])
/// but shared with the hasher and dropped once both have read them: a
/// copy lets a block go as soon as the parser has moved past it, however
/// long the chunk waits for its worker.
pub enum Chunk {
    /// `len` bytes at `start` of a whole decoded layer.
    Shared {
        /// The layer.
        buf: Arc<dyn Bytes>,
        /// Offset of the first byte.
        start: usize,
        /// Number of bytes.
        len: usize,
    },
    /// `len` bytes at `start` of one block of a streaming source (zero
    /// copy; the block lives until its last chunk is written).
    Block {
        /// The block.
        buf: Block,
        /// Offset of the first byte.
        start: usize,
        /// Number of bytes.
        len: usize,
    },
    /// A copy out of a streaming source (data that straddle blocks).
    Owned(Vec<u8>),
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Chunk::Shared { start, len, .. } => write!(f, "Shared({start}+{len})"),
            Chunk::Block { start, len, .. } => write!(f, "Block({start}+{len})"),
            Chunk::Owned(v) => write!(f, "Owned({})", v.len()),
        }
    }
}

impl Chunk {
    /// Bytes a chunk keeps alive that nothing else does: a copy's length,
    /// a block range's length (the chunks in flight cover a contiguous
    /// stretch of the stream, so their lengths add up to about the
    /// blocks they hold), nothing for a range of a whole decoded layer.
    /// What bounds memory in flight.
    pub fn owned_bytes(&self) -> usize {
        match self {
            Chunk::Shared { .. } => 0,
            Chunk::Block { len, .. } => *len,
            Chunk::Owned(v) => v.len(),
        }
    }
}

impl Deref for Chunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Chunk::Shared { buf, start, len } => &buf.bytes()[*start..*start + *len],
            Chunk::Block { buf, start, len } => &buf[*start..*start + *len],
            Chunk::Owned(v) => v,
        }
    }
}

/// What the tar parser reads from. Offsets are positions in the uncompressed
/// stream, which is what error messages report.
pub trait Source {
    /// Fills `buf` with the next block. Returns how many bytes were read:
    /// fewer than 512 only at the end of the stream.
    fn read_block(&mut self, buf: &mut [u8; 512]) -> Result<usize, DecodeError>;
    /// Returns between 1 and `max` bytes of data, or an empty chunk at the
    /// end of the stream.
    fn data(&mut self, max: usize) -> Result<Chunk, DecodeError>;
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
    /// How many bytes [`Source::data`] can lend right now without
    /// copying (at least 1 unless at the end): a piecewise reader asks for
    /// no more, so a large file goes out in zero-copy chunks.
    fn lendable(&mut self) -> Result<usize, DecodeError> {
        Ok(usize::MAX)
    }
}

/// A source over one complete buffer: a memory-mapped plain tar or the
/// output of whole-buffer decompression.
pub struct SliceSource {
    buf: Arc<dyn Bytes>,
    len: usize,
    pos: usize,
    next_release: usize,
}

/// How often a [`SliceSource`] reports its progress to its release hook.
pub const RELEASE_STEP: usize = 32 << 20;

impl SliceSource {
    /// Wraps a decoded layer. Every [`RELEASE_STEP`] bytes the parser
    /// passes, the buffer is told to release what lies two steps behind
    /// ([`Bytes::release_before`]: a memory map drops those pages from the
    /// RSS).
    pub fn new(buf: Arc<dyn Bytes>) -> Self {
        let len = buf.bytes().len();
        SliceSource {
            buf,
            len,
            pos: 0,
            next_release: RELEASE_STEP,
        }
    }

    fn advance(&mut self, n: usize) {
        self.pos += n;
        if self.pos >= self.next_release {
            // Behind by two steps: workers may still be writing the last
            // chunks handed out (a refault would be harmless, only
            // slower).
            self.buf
                .release_before(self.pos.saturating_sub(2 * RELEASE_STEP));
            self.next_release = self.pos + RELEASE_STEP;
        }
    }
}

impl Source for SliceSource {
    fn read_block(&mut self, block: &mut [u8; 512]) -> Result<usize, DecodeError> {
        let n = (self.len - self.pos).min(512);
        block[..n].copy_from_slice(&self.buf.bytes()[self.pos..self.pos + n]);
        self.advance(n);
        Ok(n)
    }

    fn data(&mut self, max: usize) -> Result<Chunk, DecodeError> {
        let n = (self.len - self.pos).min(max);
        let c = Chunk::Shared {
            buf: self.buf.clone(),
            start: self.pos,
            len: n,
        };
        self.advance(n);
        Ok(c)
    }

    fn skip(&mut self, n: u64) -> Result<u64, DecodeError> {
        let left = (self.len - self.pos) as u64;
        let k = left.min(n);
        self.advance(k as usize);
        Ok(k)
    }

    fn drain(&mut self) -> Result<(), DecodeError> {
        self.pos = self.len;
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

impl Source for StreamSource {
    fn read_block(&mut self, block: &mut [u8; 512]) -> Result<usize, DecodeError> {
        self.copy_into(block)
    }

    fn data(&mut self, max: usize) -> Result<Chunk, DecodeError> {
        if !self.refill()? {
            return Ok(Chunk::Owned(Vec::new()));
        }
        if self.cur.len() - self.pos >= max {
            // Within the current block: lend it.
            let c = Chunk::Block {
                buf: self.cur.clone(),
                start: self.pos,
                len: max,
            };
            self.pos += max;
            self.offset += max as u64;
            return Ok(c);
        }
        // Otherwise copy, so a small file is one chunk even when it
        // straddles two blocks.
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

    fn lendable(&mut self) -> Result<usize, DecodeError> {
        Ok(if self.refill()? {
            self.cur.len() - self.pos
        } else {
            0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recording(Vec<u8>, std::sync::Mutex<Vec<usize>>);
    impl Bytes for Recording {
        fn bytes(&self) -> &[u8] {
            &self.0
        }
        fn release_before(&self, end: usize) {
            self.1.lock().unwrap().push(end);
        }
    }

    #[test]
    fn slice_source_reports_progress_each_step() {
        let buf = Arc::new(Recording(
            vec![7u8; 4 * RELEASE_STEP + 100],
            Default::default(),
        ));
        let mut s = SliceSource::new(buf.clone());
        let mut total = 0;
        loop {
            let c = s.data(1 << 20).unwrap();
            if c.is_empty() {
                break;
            }
            assert!(c.iter().all(|&b| b == 7));
            assert_eq!(c.owned_bytes(), 0, "a slice source lends, never copies");
            total += c.len();
        }
        assert_eq!(total, buf.0.len());
        // Each report trails the parser by two steps and only ever grows.
        assert_eq!(
            *buf.1.lock().unwrap(),
            [0, 0, RELEASE_STEP, 2 * RELEASE_STEP]
        );
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
    fn stream_source_lends_within_a_block_and_copies_across() {
        let (tx, rx) = crossbeam_channel::bounded(4);
        tx.send(Ok(Arc::new(vec![1u8; 1000]))).unwrap();
        tx.send(Ok(Arc::new(vec![2u8; 1000]))).unwrap();
        drop(tx);
        let mut s = StreamSource::new(rx);
        assert_eq!(s.lendable().unwrap(), 1000);
        let c = s.data(600).unwrap();
        assert!(
            matches!(
                c,
                Chunk::Block {
                    start: 0,
                    len: 600,
                    ..
                }
            ),
            "{c:?}"
        );
        assert_eq!(
            c.owned_bytes(),
            600,
            "a lent block range counts toward memory in flight"
        );
        assert_eq!(s.lendable().unwrap(), 400);
        let c = s.data(600).unwrap();
        assert!(matches!(c, Chunk::Owned(_)), "straddles two blocks: {c:?}");
        assert_eq!((c[399], c[400]), (1, 2));
        assert_eq!(s.lendable().unwrap(), 800);
        assert_eq!(s.offset(), 1200);
        assert_eq!(s.skip(800).unwrap(), 800);
        assert_eq!(s.lendable().unwrap(), 0);
    }

    #[test]
    fn slice_source_short_block() {
        let mut s = SliceSource::new(Arc::new(vec![7u8; 600]));
        let mut b = [0u8; 512];
        assert_eq!(s.read_block(&mut b).unwrap(), 512);
        assert_eq!(s.read_block(&mut b).unwrap(), 88);
        assert_eq!(s.read_block(&mut b).unwrap(), 0);
    }
}
