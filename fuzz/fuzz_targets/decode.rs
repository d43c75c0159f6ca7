//! The engine's layer decoders against reference decoders: gzip (every
//! member) through the whole-buffer path (`gunzip_whole`, libdeflate) and
//! the streaming path (`decode::stream`), zstd (every frame, skippable
//! frames) through the streaming path (the only one zstd has), each with
//! the diff ID hashed as the engine hashes it (`hash_whole`,
//! `hash_blocks`). The references are `flate2::read::MultiGzDecoder`, the
//! `zstd` crate's streaming decoder, and `sha2`.
//!
//! Input: byte 0 is the mode. Bit 0: gzip (0) or zstd (1). Bit 1: raw (0):
//! bytes 1.. are the compressed stream; or encoded (1): bytes 1..17 are
//! parameters and bytes 17.. a payload that a reference encoder compresses
//! into one or more members / frames (levels, header fields, checksums,
//! skippable frames chosen by the parameters), then optionally cut, bit-
//! flipped, overwritten or extended, so that the decoders see valid
//! streams and near-valid ones and coverage goes deep.
//!
//! Properties (output bounded at `LIMIT` bytes, beyond which only the
//! first `LIMIT + 1` bytes are compared):
//! - no panic;
//! - whatever the engine outputs agrees with the reference on every byte
//!   both produced: the engine never returns different data;
//! - the streaming decode succeeds when the reference does and fails when
//!   it fails (same libraries underneath: a difference would be in the
//!   engine's plumbing), with the same bytes and sha256. One allowance,
//!   for zstd: libzstd's streaming decoder checks a frame's declared
//!   content size only when the caller's output space holds the whole
//!   frame (its single-pass path). The reference (`read_to_end`, small
//!   reads first) mostly skips the check, the engine (1 MiB blocks) mostly
//!   makes it; so the engine may fail where the reference succeeds, if
//!   the one-shot decoder (`zstd::bulk`, which always checks) fails too;
//! - the whole-buffer path, when it returns a buffer, returns exactly the
//!   reference's output and sha256; or, where the reference fails, bytes
//!   that agree with all the reference produced before failing: libdeflate
//!   decodes the reserved length symbols 286 and 287 as 285 (length 258)
//!   and the reserved distance symbols 30 and 31 as 29 (its decode tables
//!   repeat the last entry; nothing checks), where zlib rejects them.
//!
//! - the streaming gzip path (ISA-L) likewise, where the reference fails,
//!   may succeed with bytes that agree with all the reference produced:
//!   ISA-L checks that a Huffman code is not over-subscribed but not that
//!   it is complete (`decode::GzipStreamer`).
//!
//! `UNLADE_FUZZ_STRICT=1` in the environment makes the engine's known
//! leniencies failures: the whole-buffer path and the ISA-L streaming path
//! accepting what the reference rejects, and the zstd streaming path accepting what the
//! one-shot decoder rejects (a frame with a wrong content size that
//! starts near the end of a 1 MiB block). fuzz/regressions/README.md has
//! a reproducer of each.
#![no_main]

use std::io::{Read, Write};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sha2::Digest as _;
use unlade::layer::decode::{self, Compression};

/// Largest output compared in full.
const LIMIT: usize = 4 << 20;

/// What a reference decoder made of the input: the bytes it produced (at
/// most `LIMIT + 1`) and whether it failed before the end or the limit.
struct Reference {
    out: Vec<u8>,
    failed: bool,
}

/// zstd only: whether the one-shot decoder, which always checks content
/// sizes, rejects the input (for a reason other than its output not
/// fitting `LIMIT + 1`). Only asked where it matters: it is slower than
/// everything else here.
fn zstd_strict_rejects(input: &[u8], comp: Compression) -> bool {
    comp == Compression::Zstd
        && match zstd::bulk::decompress(input, LIMIT + 1) {
            Ok(_) => false,
            Err(e) => !e.to_string().contains("Destination buffer is too small"),
        }
}

impl Reference {
    fn complete(&self) -> bool {
        !self.failed && self.out.len() <= LIMIT
    }
}

fn reference(input: &[u8], comp: Compression) -> Reference {
    let mut out = Vec::new();
    let r = match comp {
        Compression::Gzip => flate2::read::MultiGzDecoder::new(input)
            .take(LIMIT as u64 + 1)
            .read_to_end(&mut out),
        Compression::Zstd => match zstd::stream::read::Decoder::new(input) {
            Ok(d) => d.take(LIMIT as u64 + 1).read_to_end(&mut out),
            Err(e) => Err(e),
        },
        _ => unreachable!("no reference decoder for {comp:?}"),
    };
    Reference {
        out,
        failed: r.is_err(),
    }
}

/// Whether the known leniencies count as failures (`UNLADE_FUZZ_STRICT=1`).
fn strict() -> bool {
    static S: OnceLock<bool> = OnceLock::new();
    *S.get_or_init(|| std::env::var_os("UNLADE_FUZZ_STRICT").is_some_and(|v| v == "1"))
}

fn sha256(b: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(b).into()
}

fn common_prefix_agrees(a: &[u8], b: &[u8], what: &str) {
    let n = a.len().min(b.len());
    assert!(
        a[..n] == b[..n],
        "{what}: output differs from the reference"
    );
}

fn check(input: &[u8], comp: Compression) {
    let _ = Compression::detect(input);
    let want = reference(input, comp);

    // Streaming, as apply does: blocks to the parser and to the hasher.
    let mut out = Vec::new();
    let mut blocks = Vec::new();
    let r = decode::stream(input, comp, |b| {
        out.extend_from_slice(&b);
        blocks.push(b);
        out.len() <= LIMIT
    });
    common_prefix_agrees(&out, &want.out, "stream");
    match r {
        Ok(true) if !want.complete() && comp == Compression::Gzip && !strict() => {
            // ISA-L's leniency: a dynamic block whose Huffman code is
            // incomplete decodes when no unassigned pattern occurs, where
            // zlib refuses the block. What it produced agrees with all
            // the reference produced (checked above).
        }
        Ok(true) => {
            assert!(
                want.complete(),
                "stream: engine decoded what the reference rejects"
            );
            assert!(out == want.out, "stream: output differs from the reference");
            assert!(
                !(strict() && zstd_strict_rejects(input, comp)),
                "stream: engine decoded what the one-shot zstd decoder rejects"
            );
            let (tx, rx) = crossbeam_channel::unbounded();
            for b in blocks {
                tx.send(b).unwrap();
            }
            drop(tx);
            let digest = decode::hash_blocks(rx);
            assert_eq!(digest.0, sha256(&want.out), "stream: diff ID differs");
        }
        Ok(false) => {
            // Stopped at the limit: the reference went that far too.
            assert!(out.len() > LIMIT);
            assert!(
                want.out.len() > LIMIT,
                "stream: engine output more than the reference"
            );
        }
        Err(e) => {
            let _ = e.to_string();
            assert!(
                !want.complete() || zstd_strict_rejects(input, comp),
                "stream: engine rejects what the reference decodes ({e})"
            );
        }
    }

    if comp == Compression::Gzip {
        if let Some(w) = decode::gunzip_whole(input, LIMIT) {
            if want.complete() {
                assert!(
                    w[..] == want.out[..],
                    "whole: output differs from the reference"
                );
                assert_eq!(
                    decode::hash_whole(&w, |_| {}).0,
                    sha256(&want.out),
                    "whole: diff ID differs"
                );
            } else {
                assert!(
                    want.failed,
                    "whole: engine output ends where the reference goes on"
                );
                assert!(
                    !strict(),
                    "whole: engine decoded what the reference rejects"
                );
                common_prefix_agrees(&w, &want.out, "whole");
            }
        }
    }
}

/// Parameter bytes, zero once used up.
struct Params<'a>(&'a [u8]);

impl Params<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> usize {
        usize::from(self.byte()) << 8 | usize::from(self.byte())
    }
}

/// Cuts `payload` into `n` pieces at positions from `p`.
fn split<'a>(p: &mut Params, payload: &'a [u8], n: usize) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = (1..n).map(|_| p.u16() % (payload.len() + 1)).collect();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut at = 0;
    for c in cuts {
        out.push(&payload[at..c]);
        at = c;
    }
    out.push(&payload[at..]);
    out
}

fn gzip(p: &mut Params, payload: &[u8]) -> Vec<u8> {
    let n = 1 + usize::from(p.byte() % 4);
    let mut out = Vec::new();
    for piece in split(p, payload, n) {
        let level = flate2::Compression::new(u32::from(p.byte() % 10));
        let h = p.byte();
        let mut b = flate2::GzBuilder::new();
        if h & 1 != 0 {
            b = b.filename(&b"layer.tar"[..]);
        }
        if h & 2 != 0 {
            b = b.comment(&b"a comment"[..]);
        }
        if h & 4 != 0 {
            b = b.extra(vec![b'A', b'B', 2, 0, 1, 2]);
        }
        if h & 8 != 0 {
            b = b.mtime(0x5eed_f00d);
        }
        let mut e = b.write(Vec::new(), level);
        e.write_all(piece).unwrap();
        out.extend(e.finish().unwrap());
    }
    out
}

fn zstd_frames(p: &mut Params, payload: &[u8]) -> Vec<u8> {
    let n = 1 + usize::from(p.byte() % 4);
    let mut out = Vec::new();
    for piece in split(p, payload, n) {
        let o = p.byte();
        if o & 1 != 0 {
            // A skippable frame first.
            let len = usize::from(p.byte() % 16);
            out.extend_from_slice(&(0x184D_2A50u32 | u32::from(o >> 4)).to_le_bytes());
            out.extend_from_slice(&(len as u32).to_le_bytes());
            out.extend(std::iter::repeat_n(0xa5, len));
        }
        let level = i32::from(p.byte() % 7) - 3;
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), level).unwrap();
        e.include_checksum(o & 2 != 0).unwrap();
        if o & 4 != 0 {
            e.set_pledged_src_size(Some(piece.len() as u64)).unwrap();
            e.include_contentsize(true).unwrap();
        } else {
            e.include_contentsize(false).unwrap();
        }
        e.write_all(piece).unwrap();
        out.extend(e.finish().unwrap());
    }
    out
}

/// Damages an encoded stream as the parameters say (or not at all).
fn mutate(p: &mut Params, mut s: Vec<u8>) -> Vec<u8> {
    let how = p.byte() % 6;
    let at = (p.u16() << 8 | usize::from(p.byte())) % s.len().max(1);
    let v = p.byte();
    match how {
        1 => s.truncate(at),
        2 if !s.is_empty() => s[at] ^= 1 << (v % 8),
        3 if !s.is_empty() => s[at] = v,
        4 => s.extend_from_slice(&[v; 3]),
        5 => {
            // A second copy of the first bytes: a member / frame start
            // followed by garbage.
            let head = s[..at.min(s.len())].to_vec();
            s.extend(head);
        }
        _ => {}
    }
    s
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let comp = if mode & 1 == 0 {
        Compression::Gzip
    } else {
        Compression::Zstd
    };
    if mode & 2 == 0 {
        check(rest, comp);
        return;
    }
    let (params, payload) = rest.split_at(rest.len().min(16));
    let mut p = Params(params);
    let encoded = match comp {
        Compression::Gzip => gzip(&mut p, payload),
        _ => zstd_frames(&mut p, payload),
    };
    let input = mutate(&mut p, encoded);
    check(&input, comp);
});
