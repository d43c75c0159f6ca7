//! Streaming gzip through ISA-L (`sys::isal`): member headers parsed here,
//! each member's deflate stream inflated and its CRC32 and ISIZE checked by
//! ISA-L. Built where `build.rs` found libisal (`cfg(unlade_isal)`);
//! elsewhere [`super::GzipStreamer::Isal`] streams through zlib-rs.

use std::io::{self, Read};
use std::sync::Arc;

use crate::layer::error::DecodeError;
use crate::layer::stream::{Block, STREAM_BLOCK};
use crate::sys::isal::{self, GzipMember, InflateFault};

/// Compressed input buffered ahead of ISA-L. It must hold the longest
/// member header accepted ([`GZIP_HEADER_MAX`]) and the trailer bytes kept
/// behind the read position.
const GZIP_INPUT: usize = 1 << 18;

/// A gzip member trailer: CRC32 and ISIZE, little-endian.
const GZIP_TRAILER: usize = 8;

/// Longest file name or comment in a gzip header, as flate2 (the engine's
/// reference decoder) has it: 65,535 bytes before the NUL.
const GZIP_FIELD_MAX: usize = 65_535;

/// Longest gzip header accepted: the fixed part, an extra field of 65,535
/// bytes and its length, a name and a comment of [`GZIP_FIELD_MAX`] bytes
/// and their NULs, a header CRC.
const GZIP_HEADER_MAX: usize = 10 + 2 + 65_535 + 2 * (GZIP_FIELD_MAX + 1) + 2;

const _: () = assert!(GZIP_HEADER_MAX + GZIP_TRAILER <= GZIP_INPUT);

/// FLG bits of a gzip header (RFC 1952).
const FHCRC: u8 = 1 << 1;
const FEXTRA: u8 = 1 << 2;
const FNAME: u8 = 1 << 3;
const FCOMMENT: u8 = 1 << 4;
const FRESERVED: u8 = 0xe0;

/// The length of the gzip member header at the start of `b`, `Ok(None)`
/// if `b` ends inside it (or is empty), or why it is not one. The rules
/// are those of flate2's parser (zlib's, less its unbounded names):
/// magic, method 8 (deflate), no reserved flag, names and comments of at
/// most [`GZIP_FIELD_MAX`] bytes, and the header CRC16 when there is one.
fn gzip_header(b: &[u8]) -> Result<Option<usize>, String> {
    if b.first().is_some_and(|&c| c != 0x1f) || b.get(1).is_some_and(|&c| c != 0x8b) {
        return Err("not a gzip header (no magic number)".into());
    }
    if b.len() < 10 {
        return Ok(None);
    }
    if b[2] != 8 {
        return Err(format!("unsupported compression method {}", b[2]));
    }
    let flags = b[3];
    if flags & FRESERVED != 0 {
        return Err(format!("reserved header flags set ({flags:#04x})"));
    }
    let mut at = 10;
    if flags & FEXTRA != 0 {
        let Some(len) = b.get(at..at + 2) else {
            return Ok(None);
        };
        at += 2 + usize::from(u16::from_le_bytes([len[0], len[1]]));
        if b.len() < at {
            return Ok(None);
        }
    }
    for (flag, what) in [(FNAME, "file name"), (FCOMMENT, "comment")] {
        if flags & flag == 0 {
            continue;
        }
        let field = &b[at..];
        match field.iter().take(GZIP_FIELD_MAX + 1).position(|&c| c == 0) {
            Some(n) => at += n + 1,
            None if field.len() > GZIP_FIELD_MAX => {
                return Err(format!("{what} longer than {GZIP_FIELD_MAX} bytes"));
            }
            None => return Ok(None),
        }
    }
    if flags & FHCRC != 0 {
        let Some(stored) = b.get(at..at + 2) else {
            return Ok(None);
        };
        let stored = u16::from_le_bytes([stored[0], stored[1]]);
        let crc = isal::crc32(&b[..at]) as u16;
        if stored != crc {
            return Err(format!(
                "header CRC16 mismatch: the header says {stored:04x}, its bytes hash to {crc:04x}"
            ));
        }
        at += 2;
    }
    Ok(Some(at))
}

/// The compressed input of [`isal_gunzip`]: a buffer over the reader that
/// knows where it is in the stream and keeps the [`GZIP_TRAILER`] bytes
/// before the read position (a member's trailer, to say which of its
/// fields a mismatch is in).
struct GzipInput<R> {
    inner: R,
    buf: Box<[u8]>,
    /// Unread bytes: `buf[start..end]`.
    start: usize,
    end: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
    eof: bool,
}

impl<R> GzipInput<R> {
    fn new(inner: R) -> Self {
        GzipInput {
            inner,
            buf: vec![0; GZIP_INPUT].into_boxed_slice(),
            start: 0,
            end: 0,
            base: 0,
            eof: false,
        }
    }

    /// Stream offset of the next unread byte.
    fn pos(&self) -> u64 {
        self.base + self.start as u64
    }

    fn unread(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// The `n` bytes before the read position, if still buffered.
    fn behind(&self, n: usize) -> Option<&[u8]> {
        self.buf.get(self.start.checked_sub(n)?..self.start)
    }
}

impl<R: Read> GzipInput<R> {
    /// Reads more input after the unread bytes: `Ok(false)` at the end of
    /// the input.
    fn fill(&mut self) -> io::Result<bool> {
        if self.eof {
            return Ok(false);
        }
        if self.end == self.buf.len() || self.start >= self.buf.len() / 2 {
            let keep = self.start.saturating_sub(GZIP_TRAILER);
            self.buf.copy_within(keep..self.end, 0);
            self.base += keep as u64;
            self.start -= keep;
            self.end -= keep;
        }
        if self.end == self.buf.len() {
            // Unreachable: a header is parsed or refused before it fills
            // the buffer, and the inflater consumes what it is given.
            return Err(io::Error::other("gzip input buffer full without progress"));
        }
        loop {
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(false);
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Streams gzip (every member) through ISA-L in [`STREAM_BLOCK`]-byte
/// blocks; see [`stream`]. Headers are parsed here ([`gzip_header`]);
/// ISA-L inflates each member's deflate stream and checks its CRC32 and
/// ISIZE. Like flate2's `MultiGzDecoder`, anything after a member that is
/// not a whole valid member is an error.
pub(super) fn isal_gunzip<R: Read>(
    input: R,
    mut send: impl FnMut(Block) -> bool,
) -> Result<bool, DecodeError> {
    let corrupt = |at: u64, detail: String| DecodeError::Corrupt {
        format: "gzip",
        compressed_offset: Some(at),
        detail,
    };
    let mut input = GzipInput::new(input);
    let mut inflater = GzipMember::new();
    let mut block = Vec::with_capacity(STREAM_BLOCK);
    let mut members = 0u64;
    loop {
        // A member starts here, or the stream ends.
        let header_at = input.pos();
        let header_len = loop {
            match gzip_header(input.unread()) {
                Ok(Some(n)) => break n,
                Ok(None) => {
                    if input.fill()? {
                        continue;
                    }
                    if input.unread().is_empty() && members > 0 {
                        if !block.is_empty() && !send(Arc::new(block)) {
                            return Ok(false);
                        }
                        return Ok(true);
                    }
                    let why = if input.unread().is_empty() {
                        "no gzip member"
                    } else {
                        "the stream ends inside a member header"
                    };
                    return Err(corrupt(
                        input.pos() + input.unread().len() as u64,
                        why.into(),
                    ));
                }
                Err(why) if members > 0 => {
                    return Err(corrupt(
                        header_at,
                        format!("trailing data after member {members}: {why}"),
                    ))
                }
                Err(why) => return Err(corrupt(header_at, why)),
            }
        };
        input.start += header_len;
        members += 1;
        inflater.start();
        loop {
            if block.len() == STREAM_BLOCK {
                let full = std::mem::replace(&mut block, Vec::with_capacity(STREAM_BLOCK));
                if !send(Arc::new(full)) {
                    return Ok(false);
                }
            }
            if input.unread().is_empty() {
                input.fill()?;
            }
            let step = inflater.inflate(input.unread(), &mut block);
            input.start += step.consumed;
            match step.outcome {
                Ok(true) => break,
                Ok(false) => {}
                Err(f) => return Err(corrupt(input.pos(), fault(f, &input, members))),
            }
            if step.consumed == 0 && step.produced == 0 && !input.fill()? {
                return Err(corrupt(
                    input.pos(),
                    format!("the stream ends inside member {members}"),
                ));
            }
        }
    }
}

/// What went wrong in member `member`, in words.
fn fault<R>(f: InflateFault, input: &GzipInput<R>, member: u64) -> String {
    let what = match f {
        InflateFault::Block => "invalid deflate block header".to_string(),
        InflateFault::Symbol => "invalid deflate code".to_string(),
        InflateFault::Lookback => "invalid distance too far back".to_string(),
        InflateFault::Other(code) => format!("ISA-L inflate error {code}"),
        InflateFault::Trailer { crc, size } => match input.behind(GZIP_TRAILER) {
            Some(t) => {
                let want_crc = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
                let want_size = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
                let mut parts = Vec::new();
                if want_crc != crc {
                    parts.push(format!(
                        "CRC32 mismatch: the trailer says {want_crc:08x}, the data hash to {crc:08x}"
                    ));
                }
                if want_size != size {
                    parts.push(format!(
                        "ISIZE mismatch: the trailer says {want_size} bytes, the data are {size} \
                         (mod 2^32)"
                    ));
                }
                if parts.is_empty() {
                    "trailer mismatch".to_string()
                } else {
                    parts.join("; ")
                }
            }
            None => format!("CRC32 or ISIZE mismatch: the data hash to {crc:08x}, {size} bytes"),
        },
    };
    format!("{what} (member {member})")
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::decode::*;
    use std::io::Write;

    /// Bits in deflate order (LSB first).
    #[derive(Default)]
    struct Bits {
        out: Vec<u8>,
        acc: u64,
        n: u32,
    }

    impl Bits {
        fn put(&mut self, v: u64, n: u32) {
            self.acc |= v << self.n;
            self.n += n;
            while self.n >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.n -= 8;
            }
        }
        /// A Huffman code, sent most significant bit first.
        fn code(&mut self, code: u64, len: u32) {
            for i in (0..len).rev() {
                self.put((code >> i) & 1, 1);
            }
        }
        fn finish(mut self) -> Vec<u8> {
            if self.n > 0 {
                self.out.push(self.acc as u8);
            }
            self.out
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// A gzip member around raw deflate data of `plain`.
    fn member(deflate: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut m = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
        m.extend_from_slice(deflate);
        m.extend_from_slice(&isal::crc32(plain).to_le_bytes());
        m.extend_from_slice(&(plain.len() as u32).to_le_bytes());
        m
    }

    fn gunzip(input: &[u8], with: GzipStreamer) -> Result<Vec<u8>, DecodeError> {
        let mut out = Vec::new();
        stream_gzip(input, with, |b| {
            out.extend_from_slice(&b);
            true
        })?;
        Ok(out)
    }

    /// A fixed-Huffman final block: 'A', then the length symbol `len`
    /// (distance code `dist`, no extra bits), then end-of-block: 259
    /// bytes of 'A' when the symbols are valid (285: 258, distance 1).
    fn fixed(len: u64, dist: u64) -> Vec<u8> {
        let mut b = Bits::default();
        b.put(1, 1);
        b.put(1, 2);
        b.code(0x30 + 65, 8);
        // Length symbols 280..287: 8-bit codes from 11000000.
        b.code(0xc0 + (len - 280), 8);
        b.code(dist, 5);
        b.code(0, 7);
        b.finish()
    }

    /// Found by the decode fuzz target: an empty member, then one whose
    /// match reaches back before its start. ISA-L's assembly decoder
    /// returns from that fault with `avail_in` larger than the input it was
    /// given (its 8-byte look-ahead margin not added back), which
    /// overflowed the count of consumed bytes.
    #[test]
    fn a_fault_in_the_assembly_decoder_is_reported() {
        let gz = hex(
            "1f8b081c0df0ed5e00ff06004142020001026c617965722e746172006120636f6d6d656e7400\
             030000000000000000001f8b081c0df0ed5e00ff06004142020001026c617965722e74617200\
             6120636f6d6d656e740063606060602848ad6c524849cc2f48acccc94f4c512848acfc8f042c\
             c02471aa12532032301539508ac181210081912191812145211f007d6041fc75000000",
        );
        for with in [GzipStreamer::Isal, GzipStreamer::ZlibRs] {
            let e = gunzip(&gz, with).unwrap_err();
            assert!(e.to_string().contains("gzip data corrupt"), "{e}");
        }
        let e = gunzip(&gz, GzipStreamer::Isal).unwrap_err().to_string();
        assert!(
            e.contains("invalid distance too far back (member 2)"),
            "{e}"
        );
    }

    #[test]
    fn reserved_symbols_are_refused_as_zlib_does() {
        let ok = member(&fixed(285, 0), &[b'A'; 259]);
        for with in [GzipStreamer::Isal, GzipStreamer::ZlibRs] {
            assert_eq!(gunzip(&ok, with).unwrap(), [b'A'; 259]);
        }
        for (len, dist) in [(286, 0), (287, 0), (285, 30), (285, 31)] {
            let gz = member(&fixed(len, dist), &[b'A'; 259]);
            let e = gunzip(&gz, GzipStreamer::Isal).unwrap_err().to_string();
            assert!(e.contains("invalid deflate code (member 1)"), "{e}");
            assert!(gunzip(&gz, GzipStreamer::ZlibRs).is_err());
        }
    }

    /// ISA-L's one known leniency, documented on [`GzipStreamer::Isal`]: a
    /// dynamic block whose literal/length code is incomplete (here 'A' and
    /// end-of-block have 2-bit codes, 10 and 11 stand for nothing) decodes
    /// as long as no unassigned code occurs, where zlib refuses the block.
    #[test]
    fn incomplete_codes_decode_where_zlib_refuses_them() {
        let mut b = Bits::default();
        b.put(1, 1); // BFINAL
        b.put(2, 2); // dynamic
        b.put(0, 5); // HLIT: 257 codes
        b.put(0, 5); // HDIST: 1 code
        b.put(14, 4); // HCLEN: 18 code-length codes
        for sym in [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1] {
            b.put(
                match sym {
                    18 => 1,
                    1 | 2 => 2,
                    _ => 0,
                },
                3,
            );
        }
        // Code-length codes: 18 -> 0, 1 -> 10, 2 -> 11.
        b.code(0, 1);
        b.put(65 - 11, 7); // 65 zeros
        b.code(3, 2); // 'A': length 2
        b.code(0, 1);
        b.put(138 - 11, 7);
        b.code(0, 1);
        b.put(52 - 11, 7); // 190 zeros
        b.code(3, 2); // end-of-block: length 2
        b.code(2, 2); // distance 0: length 1
        for _ in 0..3 {
            b.code(0, 2); // 'A'
        }
        b.code(1, 2); // end-of-block
        let gz = member(&b.finish(), b"AAA");
        assert_eq!(gunzip(&gz, GzipStreamer::Isal).unwrap(), b"AAA");
        assert!(gunzip(&gz, GzipStreamer::ZlibRs).is_err());
    }

    /// Deterministic bytes: `text` compresses (about 3:1), else noise.
    fn bytes(len: usize, seed: u64, text: bool) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if text {
                    b"layer overlay snapshot\n"[(x % 23) as usize]
                } else {
                    x as u8
                }
            })
            .collect()
    }

    fn gzip(data: &[u8], level: u32, b: flate2::GzBuilder) -> Vec<u8> {
        let mut e = b.write(Vec::new(), flate2::Compression::new(level));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// A member with a header CRC (which flate2 does not write) and a name.
    fn gzip_hcrc(data: &[u8]) -> Vec<u8> {
        let mut head = vec![0x1f, 0x8b, 8, FHCRC | FNAME, 1, 2, 3, 4, 0, 3];
        head.extend_from_slice(b"name.tar\0");
        let mut c = flate2::Crc::new();
        c.update(&head);
        head.extend_from_slice(&(c.sum() as u16).to_le_bytes());
        let body = gzip(data, 6, flate2::GzBuilder::new());
        head.extend_from_slice(&body[10..]);
        head
    }

    /// A reader that hands out at most the next of `sizes` (cycled) bytes
    /// per call.
    struct Chunky<'a> {
        data: &'a [u8],
        sizes: &'a [usize],
        i: usize,
    }

    impl Read for Chunky<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.sizes[self.i % self.sizes.len()]
                .min(buf.len())
                .min(self.data.len());
            self.i += 1;
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    /// Members of every kind: header fields, levels (stored blocks at 0),
    /// empty and multi-block ones; what they decode to.
    fn members() -> (Vec<u8>, Vec<u8>) {
        let parts: Vec<(Vec<u8>, u32, u8)> = vec![
            (bytes(3 << 20, 1, true), 6, 0),
            (Vec::new(), 6, 1),
            (bytes(1, 2, false), 1, 2),
            (bytes(STREAM_BLOCK + 7, 3, false), 0, 3),
            (bytes(700_000, 4, true), 9, 4),
            (bytes(100_000, 5, true), 6, 5),
        ];
        let (mut gz, mut plain) = (Vec::new(), Vec::new());
        for (data, level, kind) in parts {
            let b = flate2::GzBuilder::new();
            gz.extend(match kind {
                1 => gzip(&data, level, b.filename("layer.tar").mtime(7)),
                2 => gzip(&data, level, b.comment("a comment")),
                3 => gzip(&data, level, b.extra(vec![b'A', b'B', 2, 0, 1, 2])),
                5 => gzip_hcrc(&data),
                _ => gzip(&data, level, b),
            });
            plain.extend_from_slice(&data);
        }
        (gz, plain)
    }

    #[test]
    fn members_decode_in_full_blocks_whatever_the_reads() {
        let (gz, plain) = members();
        for sizes in [&[usize::MAX][..], &[1, 7, 3], &[4096, 1, 100_000, 13]] {
            for with in [GzipStreamer::Isal, GzipStreamer::ZlibRs] {
                let mut blocks = Vec::new();
                let r = stream_gzip(
                    Chunky {
                        data: &gz,
                        sizes,
                        i: 0,
                    },
                    with,
                    |b| {
                        blocks.push(b);
                        true
                    },
                );
                assert!(r.unwrap(), "{with:?}");
                let (last, full) = blocks.split_last().unwrap();
                assert!(full.iter().all(|b| b.len() == STREAM_BLOCK));
                assert!(!last.is_empty() && last.len() <= STREAM_BLOCK);
                let out: Vec<u8> = blocks.iter().flat_map(|b| b.iter().copied()).collect();
                assert!(out == plain, "{with:?} {sizes:?}: output differs");
            }
        }
    }

    #[test]
    fn a_consumer_that_hangs_up_stops_the_decoder() {
        let (gz, _) = members();
        let mut n = 0;
        let r = stream_gzip(&gz[..], GzipStreamer::Isal, |_| {
            n += 1;
            n < 2
        });
        assert!(!r.unwrap());
        assert_eq!(n, 2);
    }

    fn offset(e: &DecodeError) -> u64 {
        match e {
            DecodeError::Corrupt {
                compressed_offset: Some(o),
                ..
            } => *o,
            _ => panic!("not a corruption with an offset: {e:?}"),
        }
    }

    #[test]
    fn trailer_crc32_and_isize_are_checked() {
        let a = gzip(&bytes(2 << 20, 6, true), 6, flate2::GzBuilder::new());
        let b = gzip(b"second member", 6, flate2::GzBuilder::new());
        let two = [&a[..], &b[..]].concat();
        for (at, field) in [(8, "CRC32"), (4, "ISIZE")] {
            for (member, end) in [(1, a.len()), (2, two.len())] {
                let mut bad = two.clone();
                bad[end - at] ^= 0x01;
                // Also with reads of 3 bytes: the trailer across reads.
                for sizes in [&[usize::MAX][..], &[3]] {
                    let r = stream_gzip(
                        Chunky {
                            data: &bad,
                            sizes,
                            i: 0,
                        },
                        GzipStreamer::Isal,
                        |_| true,
                    );
                    let e = r.unwrap_err();
                    let msg = e.to_string();
                    assert!(
                        msg.contains(&format!("{field} mismatch: the trailer says"))
                            && msg.contains(&format!("(member {member})")),
                        "{msg}"
                    );
                    assert_eq!(offset(&e), end as u64, "{msg}");
                }
                assert!(gunzip(&bad, GzipStreamer::ZlibRs).is_err());
            }
        }
    }

    #[test]
    fn every_truncation_is_refused_as_zlib_refuses_it() {
        let a = gzip(&bytes(5000, 7, true), 6, flate2::GzBuilder::new());
        let b = gzip_hcrc(&bytes(3000, 8, false));
        let two = [&a[..], &b[..]].concat();
        for cut in 0..two.len() {
            let isal = gunzip(&two[..cut], GzipStreamer::Isal);
            let zlib = gunzip(&two[..cut], GzipStreamer::ZlibRs);
            if cut == a.len() {
                assert_eq!(isal.unwrap(), zlib.unwrap());
                continue;
            }
            let e = isal.expect_err("a truncated stream decodes");
            assert!(zlib.is_err(), "zlib accepts a cut at {cut}");
            let msg = e.to_string();
            assert!(
                msg.contains("ends inside") || msg.contains("no gzip member"),
                "cut at {cut}: {msg}"
            );
            assert_eq!(offset(&e), cut as u64, "{msg}");
        }
    }

    #[test]
    fn trailing_data_and_bad_headers_are_refused() {
        let a = gzip(b"data", 6, flate2::GzBuilder::new());
        let with = |tail: &[u8]| [&a[..], tail].concat();
        let name = |n: usize| {
            let mut h = vec![0x1f, 0x8b, 8, FNAME, 0, 0, 0, 0, 0, 3];
            h.extend(std::iter::repeat_n(b'n', n));
            h.push(0);
            h.extend_from_slice(&a[10..]);
            h
        };
        let mut hcrc = gzip_hcrc(b"data");
        hcrc[19] ^= 1;
        let cases: Vec<(Vec<u8>, &str, u64)> = vec![
            (Vec::new(), "no gzip member", 0),
            (
                with(b"not another member"),
                "trailing data after member 1: not a gzip header",
                24,
            ),
            (
                with(&[0; 12]),
                "trailing data after member 1: not a gzip header",
                24,
            ),
            (with(&[0x1f]), "the stream ends inside a member header", 25),
            (
                with(&[0x1f, 0x8b, 7, 0, 0, 0, 0, 0, 0, 3]),
                "unsupported compression method 7",
                24,
            ),
            (
                with(&[0x1f, 0x8b, 8, 0x20, 0, 0, 0, 0, 0, 3]),
                "reserved header flags set (0x20)",
                24,
            ),
            (hcrc, "header CRC16 mismatch", 0),
            (
                name(GZIP_FIELD_MAX + 1),
                "file name longer than 65535 bytes",
                0,
            ),
        ];
        for (input, want, at) in cases {
            let e = gunzip(&input, GzipStreamer::Isal).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(want), "{want:?} in {msg:?}");
            assert_eq!(offset(&e), at, "{msg}");
            assert!(gunzip(&input, GzipStreamer::ZlibRs).is_err(), "{want}");
        }
        // The longest name both accept.
        let ok = name(GZIP_FIELD_MAX);
        assert_eq!(gunzip(&ok, GzipStreamer::Isal).unwrap(), b"data");
        assert_eq!(gunzip(&ok, GzipStreamer::ZlibRs).unwrap(), b"data");
    }

    /// A small differential fuzz: damaged streams (cut, bits flipped,
    /// bytes overwritten, garbage appended) decode, or fail, as with
    /// zlib-rs, to the same bytes.
    #[test]
    fn damaged_streams_agree_with_zlib() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let base: Vec<Vec<u8>> = (0..4)
            .map(|k| {
                let data = bytes(200 + 3000 * k, k as u64, k % 2 == 0);
                let mut m = gzip(&data, (k * 3) as u32, flate2::GzBuilder::new());
                m.extend(gzip(&data[..data.len() / 3], 1, flate2::GzBuilder::new()));
                m
            })
            .collect();
        let (mut failed, mut same) = (0, 0);
        for round in 0..4000 {
            let mut s = base[round % base.len()].clone();
            // Every tenth stream undamaged.
            for _ in 0..(round % 10 != 0) as u64 * (1 + next() % 3) {
                let at = (next() as usize) % s.len().max(1);
                match next() % 4 {
                    0 => s.truncate(at),
                    1 if !s.is_empty() => s[at] ^= 1 << (next() % 8),
                    2 if !s.is_empty() => s[at] = next() as u8,
                    _ => s.extend_from_slice(&[next() as u8; 3]),
                }
            }
            let isal = gunzip(&s, GzipStreamer::Isal);
            let zlib = gunzip(&s, GzipStreamer::ZlibRs);
            match (&isal, &zlib) {
                (Ok(a), Ok(b)) => {
                    assert!(a == b, "round {round}: outputs differ");
                    same += 1;
                }
                (Err(_), Err(_)) => failed += 1,
                _ => panic!("round {round}: isal {isal:?}, zlib {zlib:?}"),
            }
        }
        assert!(
            failed > 3000 && same > 400,
            "{failed} failed, {same} decoded"
        );
    }
}
