//! The ISA-L inflate FFI (`libisal`, the library behind `igzip`): the
//! fastest streaming inflate measured for unlade (ahead of zlib-rs, see
//! `layer::decode::GzipStreamer`), and the one `layer::decode` streams
//! gzip layers with.
//!
//! The binding is written against the system header
//! (`/usr/include/isa-l/igzip_lib.h`, Debian's `libisal-dev`) rather than
//! taken from a `-sys` crate: the caller allocates ISA-L's state, so its
//! layout is part of the ABI, and the one that must match is the library
//! the build links (`build.rs` asks pkg-config for a `libisal` of soname 2,
//! versions 2.30 up to 3, whose `struct inflate_state` is the one below;
//! the assertions under it pin every offset the wrapper touches).

use std::alloc::Layout;
use std::mem::{offset_of, size_of};

/// `struct inflate_huff_code_large` (lookup tables, opaque here).
#[repr(C)]
struct HuffCodeLarge {
    short_code_lookup: [u32; 1 << 12],
    long_code_lookup: [u16; 1264],
}

/// `struct inflate_huff_code_small` (lookup tables, opaque here).
#[repr(C)]
struct HuffCodeSmall {
    short_code_lookup: [u16; 1 << 10],
    long_code_lookup: [u16; 80],
}

/// `struct inflate_state` of `igzip_lib.h`, field for field.
#[repr(C)]
struct InflateState {
    next_out: *mut u8,
    avail_out: u32,
    total_out: u32,
    next_in: *const u8,
    read_in: u64,
    avail_in: u32,
    read_in_length: i32,
    lit_huff_code: HuffCodeLarge,
    dist_huff_code: HuffCodeSmall,
    block_state: u32,
    dict_length: u32,
    bfinal: u32,
    crc_flag: u32,
    crc: u32,
    hist_bits: u32,
    /// A union of `type0_block_len`, `count` and `dict_id`.
    count: i32,
    write_overflow_lits: i32,
    write_overflow_len: i32,
    copy_overflow_length: i32,
    copy_overflow_distance: i32,
    wrapper_flag: i16,
    tmp_in_size: i16,
    tmp_out_valid: i32,
    tmp_out_processed: i32,
    tmp_in_buffer: [u8; 328],
    tmp_out_buffer: [u8; 2 * 32768 + 288],
}

// The layout of ISA-L 2.30 on x86-64 (`sizeof` and `offsetof` printed by
// a C program against the header), which soname 2 keeps.
const _: () = {
    assert!(size_of::<InflateState>() == 87368);
    assert!(offset_of!(InflateState, next_out) == 0);
    assert!(offset_of!(InflateState, avail_out) == 8);
    assert!(offset_of!(InflateState, total_out) == 12);
    assert!(offset_of!(InflateState, next_in) == 16);
    assert!(offset_of!(InflateState, avail_in) == 32);
    assert!(offset_of!(InflateState, dist_huff_code) == 18952);
    assert!(offset_of!(InflateState, block_state) == 21160);
    assert!(offset_of!(InflateState, crc_flag) == 21172);
    assert!(offset_of!(InflateState, crc) == 21176);
    assert!(offset_of!(InflateState, tmp_in_buffer) == 21216);
    assert!(offset_of!(InflateState, tmp_out_buffer) == 21544);
};

/// `ISAL_GZIP_NO_HDR_VER`: the input is a gzip member without its header
/// (the caller parsed it); ISA-L computes the CRC32 of the output and
/// checks it and the size against the 8-byte trailer.
const ISAL_GZIP_NO_HDR_VER: u32 = 6;
/// `ISAL_BLOCK_FINISH`: the member is decoded, trailer included, and all
/// of its output handed out.
const ISAL_BLOCK_FINISH: u32 = 5;

const ISAL_INVALID_BLOCK: i32 = -1;
const ISAL_INVALID_SYMBOL: i32 = -2;
const ISAL_INVALID_LOOKBACK: i32 = -3;
const ISAL_INCORRECT_CHECKSUM: i32 = -6;

// Linked by build.rs (pkg-config `libisal`).
unsafe extern "C" {
    fn isal_inflate_init(state: *mut InflateState);
    fn isal_inflate_reset(state: *mut InflateState);
    fn isal_inflate(state: *mut InflateState) -> i32;
    fn crc32_gzip_refl(init_crc: u32, buf: *const u8, len: u64) -> u32;
}

/// Why ISA-L refused a gzip member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateFault {
    /// A malformed deflate block header (block type 3, a stored block
    /// whose length check fails, an over-subscribed Huffman code, too
    /// many codes).
    Block,
    /// A code that stands for no symbol, or a reserved length or distance
    /// symbol.
    Symbol,
    /// A match reaching back before the start of the member.
    Lookback,
    /// The trailer does not match the data: `crc` is the CRC32 of what
    /// the member inflated to and `size` its length mod 2^32, to compare
    /// with the trailer's CRC32 and ISIZE.
    Trailer {
        /// CRC32 of the inflated data.
        crc: u32,
        /// Inflated length mod 2^32.
        size: u32,
    },
    /// Another ISA-L error code (none is expected for raw deflate).
    Other(i32),
}

/// What one [`GzipMember::inflate`] call did.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    /// Input bytes consumed (ISA-L keeps what it buffered of them; on a
    /// fault, only roughly where the fault is).
    pub consumed: usize,
    /// Bytes appended to the output vector (none on a fault).
    pub produced: usize,
    /// `Ok(true)` when the member ended: its trailer is read and matched,
    /// and all of its output is out; `Ok(false)` when it goes on.
    pub outcome: Result<bool, InflateFault>,
}

/// An ISA-L inflater for the body and trailer of gzip members, one after
/// another ([`GzipMember::start`] before each): the caller parses the
/// member headers, ISA-L inflates the deflate stream, computes its CRC32
/// and checks CRC32 and ISIZE against the trailer.
pub struct GzipMember(Box<InflateState>);

// SAFETY: the state is plain heap memory with no thread affinity. The
// pointers it holds between calls are reset to null after each call and
// only ever set, by `run`, to memory borrowed for that call.
unsafe impl Send for GzipMember {}

impl GzipMember {
    /// Allocates an inflater (88 KB of state, on the heap) for a first
    /// member.
    pub fn new() -> Self {
        // Zeroed memory is a valid `InflateState` (integers, arrays of
        // integers and null pointers), so no 88 KB value is built on the
        // stack first.
        let layout = Layout::new::<InflateState>();
        // SAFETY: the layout is not zero-sized.
        let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<InflateState>();
        if p.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        // SAFETY: `p` is a fresh allocation of `InflateState`'s layout from
        // the global allocator, as `Box` expects, and all-zero bytes are a
        // valid value of every field (integers, arrays of integers, raw
        // pointers).
        let mut state = unsafe { Box::from_raw(p) };
        // SAFETY: `state` is a live, exclusively owned `inflate_state` of
        // the header's layout (the assertions above); init only writes its
        // fields.
        unsafe { isal_inflate_init(&mut *state) };
        let mut m = GzipMember(state);
        m.start();
        m
    }

    /// Gets ready for a new member whose header the caller has consumed:
    /// the next input is the first byte of its deflate stream.
    pub fn start(&mut self) {
        // SAFETY: as in `new`: a live, exclusively owned state; reset only
        // writes its fields.
        unsafe { isal_inflate_reset(&mut *self.0) };
        self.0.crc_flag = ISAL_GZIP_NO_HDR_VER;
    }

    /// Inflates from `input` into the spare capacity of `out` (appending;
    /// at most `u32::MAX` bytes of each per call). Input that ISA-L
    /// consumed it keeps in its state as needed: the next call goes on
    /// from `input[consumed..]`. At the end of a member, the bytes after
    /// its trailer are left unconsumed.
    pub fn inflate(&mut self, input: &[u8], out: &mut Vec<u8>) -> Step {
        let spare = out.spare_capacity_mut();
        // SAFETY: the spare capacity is `spare.len()` bytes of `out`'s
        // allocation, borrowed (through `out`) for the call.
        let step = unsafe { self.run(input, spare.as_mut_ptr().cast(), spare.len()) };
        // SAFETY: ISA-L wrote `produced` bytes at the start of the spare
        // capacity (it advances `next_out` past what it writes, within
        // `avail_out`): they are initialized. `run` never claims more than
        // it lent, nor anything after a fault.
        unsafe { out.set_len(out.len() + step.produced) };
        step
    }

    /// One `isal_inflate` call from `input` to `out_len` bytes at `out`.
    ///
    /// # Safety
    ///
    /// `out` must be valid for writes of `out_len` bytes (initialized or
    /// not) and not otherwise accessed during the call.
    unsafe fn run(&mut self, input: &[u8], out: *mut u8, out_len: usize) -> Step {
        let in_len = input.len().min(u32::MAX as usize);
        let out_len = out_len.min(u32::MAX as usize);
        let s = &mut *self.0;
        s.next_in = input.as_ptr();
        s.avail_in = in_len as u32;
        s.next_out = out;
        s.avail_out = out_len as u32;
        // SAFETY: `next_in`/`avail_in` describe the live slice `input`
        // (ISA-L only reads there); `next_out`/`avail_out` memory the
        // caller lends for writing, of which ISA-L writes at most
        // `avail_out` bytes and reads back only bytes it wrote in this call
        // (matches reaching further come from its own history buffer); the
        // state is exclusively ours.
        let r = unsafe { isal_inflate(s) };
        // On a fault, ISA-L 2.30's assembly decoder leaves `avail_in` and
        // `avail_out` off by its 8-byte look-ahead margins (its error exits
        // skip the fix-up of the normal ones; found by the decode fuzz
        // target: `avail_in` came back larger than the input). So the counts
        // are clamped, and after a fault no output is claimed: what was
        // written is discarded with the member.
        let consumed = in_len.saturating_sub(s.avail_in as usize);
        let produced = if r == 0 {
            out_len.saturating_sub(s.avail_out as usize)
        } else {
            0
        };
        s.next_in = std::ptr::null();
        s.next_out = std::ptr::null_mut();
        let outcome = match r {
            0 => Ok(s.block_state == ISAL_BLOCK_FINISH),
            ISAL_INVALID_BLOCK => Err(InflateFault::Block),
            ISAL_INVALID_SYMBOL => Err(InflateFault::Symbol),
            ISAL_INVALID_LOOKBACK => Err(InflateFault::Lookback),
            ISAL_INCORRECT_CHECKSUM => Err(InflateFault::Trailer {
                crc: s.crc,
                size: s.total_out,
            }),
            code => Err(InflateFault::Other(code)),
        };
        Step {
            consumed,
            produced,
            outcome,
        }
    }
}

impl Default for GzipMember {
    fn default() -> Self {
        GzipMember::new()
    }
}

/// The CRC32 of gzip (IEEE 802.3, reflected) of `data`, by ISA-L's
/// folding implementation: for the optional header CRC of a gzip member.
pub fn crc32(data: &[u8]) -> u32 {
    // SAFETY: ISA-L reads `data.len()` bytes from the start of the live
    // slice and nothing else.
    unsafe { crc32_gzip_refl(0, data.as_ptr(), data.len() as u64) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_the_gzip_one() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }
}
