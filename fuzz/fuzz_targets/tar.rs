//! The tar parser on its own (headers, PAX, GNU long names, old and PAX
//! sparse maps), over the two sources the engine has: the whole input as
//! one slice (every entry's data read in one chunk), and the same bytes
//! handed over in blocks of odd sizes through a channel, as the streaming
//! decoder does (the data of every other entry read in 1000-byte chunks,
//! the rest skipped).
//!
//! Properties, for any input:
//! - no panic, and memory bounded (run with `-rss_limit_mb`);
//! - iteration terminates: at most one entry per 512-byte block, and once
//!   the archive has ended it stays ended;
//! - every entry's offset is inside the input (a whole header block is
//!   there), after the previous entry's, and not before where the parser
//!   stood;
//! - reads return at most what was asked for, and exactly the entry's
//!   size in all, or fail (the input ends early);
//! - sparse maps hold exactly the entry's data bytes, in order, inside the
//!   file size;
//! - both sources give the same entries, the same data and the same
//!   success or failure (the parser does not depend on how its input is
//!   chunked, nor on whether data were read or skipped);
//! - `finish` after the end reads the rest of the input.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use unlade::layer::stream::{SliceSource, Source, StreamSource};
use unlade::layer::tar::{Entry, Reader, BLOCK};

#[derive(PartialEq, Eq, Debug)]
struct Outcome {
    /// `{:?}` of each entry.
    entries: Vec<String>,
    /// The data of each entry that was read.
    data: Vec<Option<Vec<u8>>>,
    failed: bool,
}

fn check_entry(e: &Entry, len: u64, before: u64, prev: Option<u64>) {
    assert!(
        e.offset + BLOCK as u64 <= len,
        "entry at {} past the input ({len} bytes)",
        e.offset
    );
    assert!(e.offset >= before, "entry at {} before {before}", e.offset);
    if let Some(p) = prev {
        assert!(e.offset > p, "entry at {} not after {p}", e.offset);
    }
    if let Some(sp) = &e.sparse {
        let mut end = 0u64;
        let mut total = 0u64;
        for &(off, n) in &sp.extents {
            assert!(off >= end, "sparse extents out of order");
            end = off.checked_add(n).expect("extent end overflows");
            assert!(end <= sp.real_size, "extent past the real size");
            total += n;
        }
        assert_eq!(total, e.size, "sparse extents vs data size");
    }
}

/// Parses `src`; `policy(i)` is the chunk size to read entry `i`'s data
/// with, or `None` to leave it to `next_entry` to skip.
fn parse<S: Source>(
    src: S,
    len: usize,
    policy: impl Fn(usize) -> Option<usize>,
) -> Outcome {
    let len64 = len as u64;
    let mut out = Outcome {
        entries: Vec::new(),
        data: Vec::new(),
        failed: false,
    };
    let mut r = Reader::new(src);
    let mut prev = None;
    loop {
        let before = r.offset();
        let e = match r.next_entry() {
            Ok(Some(e)) => e,
            Ok(None) => {
                assert!(matches!(r.next_entry(), Ok(None)), "archive ended twice");
                let src = r.finish().expect("finish");
                assert_eq!(src.offset(), len64, "finish leaves input unread");
                return out;
            }
            Err(e) => {
                let _ = e.to_string();
                out.failed = true;
                return out;
            }
        };
        assert!(
            out.entries.len() < len / BLOCK + 1,
            "more entries than header blocks"
        );
        check_entry(&e, len64, before, prev);
        prev = Some(e.offset);
        assert!(r.offset() <= len64);
        out.entries.push(format!("{e:?}"));
        let Some(chunk) = policy(out.entries.len() - 1) else {
            out.data.push(None);
            continue;
        };
        let mut data = Vec::new();
        loop {
            match r.read(chunk) {
                Ok(c) if c.is_empty() => break,
                Ok(c) => {
                    assert!(c.len() <= chunk, "read {} of {chunk} asked", c.len());
                    data.extend_from_slice(&c);
                    assert!(data.len() as u64 <= e.size, "read past the entry");
                }
                Err(err) => {
                    let _ = err.to_string();
                    out.failed = true;
                    out.data.push(Some(data));
                    return out;
                }
            }
        }
        assert_eq!(data.len() as u64, e.size, "read less than the entry size");
        out.data.push(Some(data));
    }
}

/// Splits `data` into blocks of pseudo-random sizes (0 to 1536 bytes),
/// seeded by the input, as a decoder thread would hand them over.
fn blocks(data: &[u8]) -> crossbeam_channel::Receiver<unlade::layer::stream::BlockMsg> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut seed = data.len() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    for &b in data.iter().take(16) {
        seed = seed.rotate_left(5) ^ u64::from(b);
    }
    let mut pos = 0;
    while pos < data.len() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let n = ((seed % 1537) as usize).min(data.len() - pos);
        tx.send(Ok(Arc::new(data[pos..pos + n].to_vec()))).unwrap();
        pos += n;
    }
    rx
}

fuzz_target!(|data: &[u8]| {
    let whole = parse(SliceSource::new(Arc::new(data.to_vec())), data.len(), |_| Some(usize::MAX));
    let streamed = parse(StreamSource::new(blocks(data)), data.len(), |i| {
        (i % 2 == 1).then_some(1000)
    });
    assert_eq!(whole.entries, streamed.entries, "entries differ by source");
    assert_eq!(whole.failed, streamed.failed, "outcome differs by source");
    for (a, b) in whole.data.iter().zip(&streamed.data) {
        if let (Some(a), Some(b)) = (a, b) {
            assert!(a == b, "data differ by source");
        }
    }
});
