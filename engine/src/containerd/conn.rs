//! A client's connection on its way to tonic, with the HTTP/2 header
//! blocks it sends rewritten so that h2 accepts them.
//!
//! h2 (the HTTP/2 under hyper and tonic) resets every stream whose
//! `:authority` is not a valid URI authority (RST_STREAM PROTOCOL_ERROR,
//! "malformed authority") and has no option to accept it (hyperium/h2
//! #487 is still open). gRPC C-core clients (grpcio for Python, C++ and
//! Ruby) send the socket's path as the authority of a `unix:` target,
//! `/run/unlade/snapshotter.sock`, so every call from them failed; Go's
//! gRPC, containerd's, sends `localhost`.
//!
//! [`Conn`] sits between the accepted socket and tonic. What the server
//! writes passes untouched, and so does what the client sends, byte for
//! byte, except header blocks (a HEADERS frame and its CONTINUATION
//! frames): each is decoded, an `:authority` that is not a valid authority
//! becomes `localhost`, and the block is encoded again.
//!
//! HPACK is stateful: a block may refer to entries that earlier blocks put
//! in the dynamic table, which the client's encoder and the server's
//! decoder keep alike. Here the client's table is kept by [`Conn`]'s own
//! decoder, and every field goes on to h2 as a literal without indexing
//! (never-indexed fields stay never-indexed, which h2 marks sensitive), so
//! h2's table stays empty and never has to match what the client indexed,
//! whatever a rewritten block changed.
//!
//! The decoder is this module's own (the static table, the dynamic table,
//! the Huffman code of RFC 7541). loona-hpack's decoder builds its Huffman
//! tables anew for each string, about 20 µs a string, and a 256 KiB block
//! of one-byte strings held one of the runtime's two threads for over a
//! second.
//!
//! Bounds: a header block is at most [`MAX_BLOCK`] bytes as sent and its
//! fields at most [`MAX_LIST`] decoded (an "HPACK bomb" of references to
//! large table entries stops there); other frames are streamed, never held
//! whole. Anything malformed (bad HPACK, a CONTINUATION with no block open,
//! another frame inside a block, a table size over 4,096, a bound passed)
//! ends the connection with an [`io::ErrorKind::InvalidData`] error.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client's connection preface, passed on as it is.
const PREFACE: usize = 24;
/// A frame header: length (24 bits), type, flags, stream (31 bits).
const HEAD: usize = 9;
/// The largest frame payload sent on: HTTP/2's default
/// SETTINGS_MAX_FRAME_SIZE, which the server never raises.
const MAX_FRAME: usize = 16_384;
/// The most bytes of one header block as the client sent it, padding
/// included.
const MAX_BLOCK: usize = 256 << 10;
/// The most of one decoded header list, counted as HTTP/2 counts it: name,
/// value and 32 bytes for each field.
const MAX_LIST: usize = 1 << 20;
/// The dynamic table's largest size: HTTP/2's default
/// SETTINGS_HEADER_TABLE_SIZE, which the server never changes.
const TABLE_SIZE: usize = 4096;
/// Bytes read at a time while a header block or a frame header is being
/// gathered.
const READ_CHUNK: usize = 16 << 10;
/// Buffers grown past this are shrunk back once they are empty again.
const KEEP: usize = 64 << 10;

const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// What an `:authority` that h2 would refuse becomes.
const LOCALHOST: &[u8] = b"localhost";

/// Connection numbers, for [`ConnInfo::id`].
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Who is at the other end of a connection, for the handlers: tonic puts
/// it in each request's extensions
/// (`request.extensions().get::<ConnInfo>()`).
#[derive(Clone, Debug)]
pub(crate) struct ConnInfo {
    /// The connection's number, unique in this process.
    pub id: u64,
    /// The peer's process, from the socket's credentials: the calls of
    /// one process are one client to the store's fair pool.
    pub pid: Option<i32>,
}

/// An accepted connection whose client header blocks are rewritten on the
/// way in (see the module's documentation); writes pass straight through.
pub(crate) struct Conn<S> {
    inner: S,
    info: ConnInfo,
    rx: Rx,
    /// The server's count of open connections, released with this one.
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Conn<tokio::net::UnixStream> {
    /// Wraps an accepted socket, numbering it and reading its peer's
    /// credentials once.
    pub(crate) fn new(stream: tokio::net::UnixStream) -> Self {
        let cred = stream.peer_cred().ok();
        let pid = cred.and_then(|c| c.pid());
        Conn::with_peer(stream, pid)
    }
}

impl<S> Conn<S> {
    fn with_peer(inner: S, pid: Option<i32>) -> Self {
        Conn {
            inner,
            info: ConnInfo {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                pid,
            },
            rx: Rx::new(),
            _slot: None,
        }
    }

    /// This connection, holding `slot` of the server's connection count
    /// until it closes.
    pub(crate) fn holding(mut self, slot: tokio::sync::OwnedSemaphorePermit) -> Self {
        self._slot = Some(slot);
        self
    }
}

impl tonic::transport::server::Connected for Conn<tokio::net::UnixStream> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

/// Where the reader is in the client's byte stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// This many bytes pass through as they are (the preface, or a frame
    /// that is not part of a header block, header and payload).
    Pass(usize),
    /// At a frame header.
    Head,
    /// This many more bytes of a HEADERS or CONTINUATION payload go into
    /// the block.
    Block(usize),
}

/// The header block being gathered.
#[derive(Clone, Copy, Debug)]
struct Open {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
}

/// The frame whose payload is being gathered into the block.
#[derive(Clone, Copy, Debug)]
struct Frame {
    headers: bool,
    flags: u8,
    /// Where its payload starts in the block.
    start: usize,
}

/// Input that is not HTTP/2 as a client may send it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Malformed(&'static str);

impl From<Malformed> for io::Error {
    fn from(m: Malformed) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("HTTP/2 from the client: {}", m.0),
        )
    }
}

/// The reading side's state.
struct Rx {
    state: State,
    /// Bytes read and not yet passed on or gathered: `pend[pos..end]`
    /// (all of `pend` is initialized, so reads go into `pend[end..]`).
    pend: Vec<u8>,
    pos: usize,
    end: usize,
    /// Rewritten frames not yet passed on: `out[out_pos..]`.
    out: Vec<u8>,
    out_pos: usize,
    /// The header block gathered so far, without padding or priority.
    block: Vec<u8>,
    open: Option<Open>,
    frame: Frame,
    hpack: Hpack,
    /// The rewritten block, before it is cut into frames.
    enc: Vec<u8>,
    /// Set once the input was refused: every later read fails too.
    failed: Option<Malformed>,
}

impl Rx {
    fn new() -> Rx {
        Rx {
            state: State::Pass(PREFACE),
            pend: Vec::new(),
            pos: 0,
            end: 0,
            out: Vec::new(),
            out_pos: 0,
            block: Vec::new(),
            open: None,
            frame: Frame {
                headers: false,
                flags: 0,
                start: 0,
            },
            hpack: Hpack::new(),
            enc: Vec::new(),
            failed: None,
        }
    }

    /// Whether the next read can go straight into the caller's buffer:
    /// nothing is held back and the next bytes are not a header block's.
    fn direct(&self) -> bool {
        self.pos == self.end
            && self.out_pos == self.out.len()
            && matches!(self.state, State::Pass(_) | State::Head)
    }

    /// Makes room for `n` more bytes at `pend[end..]`.
    fn room(&mut self, n: usize) {
        if self.pend.len() - self.end >= n {
            return;
        }
        self.pend.copy_within(self.pos..self.end, 0);
        self.end -= self.pos;
        self.pos = 0;
        if self.pend.len() - self.end < n {
            self.pend.resize(self.end + n, 0);
        }
    }

    /// Holds `bytes` back in `pend`.
    fn hold(&mut self, bytes: &[u8]) {
        self.room(bytes.len());
        self.pend[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// Walks the bytes just read into `buf` (from `from` on), leaving what
    /// passes through where it is. From the first frame header that
    /// belongs to a header block, or that is cut off at the end, the rest
    /// moves to `pend` for [`Rx::process`].
    fn scan(&mut self, buf: &mut ReadBuf<'_>, from: usize) {
        let end = buf.filled().len();
        let mut i = from;
        while i < end {
            match self.state {
                State::Pass(n) => {
                    let k = n.min(end - i);
                    i += k;
                    self.state = if k == n {
                        State::Head
                    } else {
                        State::Pass(n - k)
                    };
                }
                State::Head => {
                    let filled = buf.filled();
                    let passes = self.open.is_none()
                        && filled.get(i..i + HEAD).is_some_and(|h| {
                            !matches!(h[3], HEADERS | CONTINUATION | PUSH_PROMISE)
                        });
                    if !passes {
                        self.hold(&filled[i..end]);
                        buf.set_filled(i);
                        return;
                    }
                    self.state = State::Pass(HEAD + frame_len(&filled[i..]));
                }
                // Not reached: a read goes to `buf` only when `direct`.
                State::Block(_) => {
                    self.hold(&buf.filled()[i..end]);
                    buf.set_filled(i);
                    return;
                }
            }
        }
    }

    /// Moves what it can from `out` and `pend` into `buf`, gathering and
    /// rewriting header blocks on the way. Stops when `buf` is full or more
    /// input is needed.
    fn process(&mut self, buf: &mut ReadBuf<'_>) -> Result<(), Malformed> {
        loop {
            if self.out_pos < self.out.len() {
                let k = (self.out.len() - self.out_pos).min(buf.remaining());
                buf.put_slice(&self.out[self.out_pos..self.out_pos + k]);
                self.out_pos += k;
                if self.out_pos < self.out.len() {
                    return Ok(());
                }
                self.out.clear();
                self.out_pos = 0;
                self.out.shrink_to(KEEP);
            }
            if self.state == State::Block(0) {
                self.end_frame()?;
                continue;
            }
            let avail = &self.pend[self.pos..self.end];
            if avail.is_empty() {
                self.pos = 0;
                self.end = 0;
                if self.pend.len() > KEEP {
                    self.pend.truncate(KEEP);
                    self.pend.shrink_to_fit();
                }
                return Ok(());
            }
            match self.state {
                State::Pass(n) => {
                    let k = n.min(avail.len()).min(buf.remaining());
                    if k == 0 {
                        return Ok(());
                    }
                    buf.put_slice(&avail[..k]);
                    self.pos += k;
                    self.state = if k == n {
                        State::Head
                    } else {
                        State::Pass(n - k)
                    };
                }
                State::Head => {
                    let Some(head) = avail.get(..HEAD) else {
                        return Ok(());
                    };
                    let len = frame_len(head);
                    let (kind, flags) = (head[3], head[4]);
                    let stream =
                        u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    match kind {
                        HEADERS => {
                            if self.open.is_some() {
                                return Err(Malformed("HEADERS inside a header block"));
                            }
                            self.open = Some(Open {
                                stream,
                                end_stream: flags & END_STREAM != 0,
                                priority: None,
                            });
                        }
                        CONTINUATION => match self.open {
                            Some(o) if o.stream == stream => {}
                            Some(_) => return Err(Malformed("CONTINUATION on another stream")),
                            None => return Err(Malformed("CONTINUATION with no header block")),
                        },
                        PUSH_PROMISE => return Err(Malformed("PUSH_PROMISE from a client")),
                        _ if self.open.is_some() => {
                            return Err(Malformed("another frame inside a header block"))
                        }
                        _ => {
                            self.state = State::Pass(HEAD + len);
                            continue;
                        }
                    }
                    if self.block.len() + len > MAX_BLOCK {
                        return Err(Malformed("header block too large"));
                    }
                    self.pos += HEAD;
                    self.frame = Frame {
                        headers: kind == HEADERS,
                        flags,
                        start: self.block.len(),
                    };
                    self.block.reserve(len);
                    self.state = State::Block(len);
                }
                State::Block(n) => {
                    let k = n.min(avail.len());
                    self.block.extend_from_slice(&avail[..k]);
                    self.pos += k;
                    self.state = State::Block(n - k);
                }
            }
        }
    }

    /// A HEADERS or CONTINUATION payload is in: strips a HEADERS frame's
    /// padding and priority fields and, at END_HEADERS, rewrites the block
    /// into `out`.
    fn end_frame(&mut self) -> Result<(), Malformed> {
        self.state = State::Head;
        let Frame {
            headers,
            flags,
            start,
        } = self.frame;
        if headers {
            let payload = &self.block[start..];
            let mut skip = 0;
            let mut pad = 0;
            if flags & PADDED != 0 {
                pad = usize::from(*payload.first().ok_or(Malformed("no pad length"))?);
                skip = 1;
            }
            if flags & PRIORITY != 0 {
                let p: [u8; 5] = payload
                    .get(skip..skip + 5)
                    .and_then(|p| p.try_into().ok())
                    .ok_or(Malformed("HEADERS too short for its priority"))?;
                if let Some(o) = &mut self.open {
                    o.priority = Some(p);
                }
                skip += 5;
            }
            if skip + pad > payload.len() {
                return Err(Malformed("padding longer than the frame"));
            }
            let end = self.block.len() - pad;
            self.block.truncate(end);
            self.block.drain(start..start + skip);
        }
        if flags & END_HEADERS == 0 {
            return Ok(());
        }
        let open = self.open.take().ok_or(Malformed("no header block"))?;
        self.enc.clear();
        self.hpack.transcode(&self.block, &mut self.enc)?;
        self.block.clear();
        self.block.shrink_to(KEEP);
        self.frames(open);
        self.enc.shrink_to(KEEP);
        Ok(())
    }

    /// Cuts `enc` into a HEADERS frame and CONTINUATION frames in `out`.
    fn frames(&mut self, open: Open) {
        let prio = open.priority.map_or(0, |_| 5);
        let mut flags = if open.end_stream { END_STREAM } else { 0 };
        if prio != 0 {
            flags |= PRIORITY;
        }
        let mut rest = &self.enc[..];
        let mut kind = HEADERS;
        let mut room = MAX_FRAME - prio;
        loop {
            let k = rest.len().min(room);
            let last = k == rest.len();
            let len = k + if kind == HEADERS { prio } else { 0 };
            let these = flags | if last { END_HEADERS } else { 0 };
            let len = (len as u32).to_be_bytes();
            self.out
                .extend_from_slice(&[len[1], len[2], len[3], kind, these]);
            self.out.extend_from_slice(&open.stream.to_be_bytes());
            if kind == HEADERS {
                if let Some(p) = open.priority {
                    self.out.extend_from_slice(&p);
                }
            }
            self.out.extend_from_slice(&rest[..k]);
            rest = &rest[k..];
            if last {
                return;
            }
            kind = CONTINUATION;
            flags = 0;
            room = MAX_FRAME;
        }
    }

    /// The client closed its side: an end of file where a frame may end,
    /// an error where a header block or a frame header was cut off.
    fn eof(&self) -> io::Result<()> {
        if self.pos < self.end || self.open.is_some() || matches!(self.state, State::Block(_)) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "HTTP/2 from the client: cut off inside a header block",
            ));
        }
        Ok(())
    }
}

/// A frame's payload length, from its header.
fn frame_len(head: &[u8]) -> usize {
    match head {
        [a, b, c, ..] => (usize::from(*a) << 16) | (usize::from(*b) << 8) | usize::from(*c),
        _ => 0,
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let rx = &mut this.rx;
        if let Some(m) = rx.failed {
            return Poll::Ready(Err(m.into()));
        }
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let start = buf.filled().len();
        loop {
            if let Err(m) = rx.process(buf) {
                rx.failed = Some(m);
                return Poll::Ready(Err(m.into()));
            }
            if buf.filled().len() > start || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if rx.direct() {
                // The usual case: frames (DATA above all) are read straight
                // into the caller's buffer and looked at in place.
                match Pin::new(&mut this.inner).poll_read(cx, buf) {
                    Poll::Ready(Ok(())) => {}
                    other => return other,
                }
                if buf.filled().len() == start {
                    return Poll::Ready(rx.eof());
                }
                rx.scan(buf, start);
            } else {
                rx.room(READ_CHUNK);
                let mut rb = ReadBuf::new(&mut rx.pend[rx.end..]);
                let polled = Pin::new(&mut this.inner).poll_read(cx, &mut rb);
                let n = rb.filled().len();
                rx.end += n;
                match polled {
                    Poll::Ready(Ok(())) => {}
                    other => return other,
                }
                if n == 0 {
                    return Poll::Ready(rx.eof());
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A dynamic table entry: name and value.
type Entry = (Box<[u8]>, Box<[u8]>);

/// The client's HPACK dynamic table (RFC 7541 §2.3.2).
struct Table {
    /// Newest first: index 62 is the front.
    entries: VecDeque<Entry>,
    size: usize,
    max: usize,
}

impl Table {
    fn get(&self, index: usize) -> Result<(&[u8], &[u8]), Malformed> {
        let index = index.checked_sub(1).ok_or(Malformed("HPACK index 0"))?;
        if let Some(&field) = STATIC.get(index) {
            return Ok(field);
        }
        self.entries
            .get(index - STATIC.len())
            .map(|(n, v)| (&n[..], &v[..]))
            .ok_or(Malformed("HPACK index past the table"))
    }

    fn insert(&mut self, entry: Entry) {
        let size = entry.0.len() + entry.1.len() + 32;
        if size > self.max {
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.size += size;
        self.entries.push_front(entry);
        self.evict();
    }

    fn resize(&mut self, max: usize) {
        self.max = max;
        self.evict();
    }

    fn evict(&mut self) {
        while self.size > self.max {
            match self.entries.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + 32,
                None => self.size = 0,
            }
        }
    }
}

/// A connection's HPACK decoder, which writes each field it decodes out
/// again as a literal without indexing.
struct Hpack {
    table: Table,
    /// Huffman-decoded name and value.
    name: Vec<u8>,
    value: Vec<u8>,
}

impl Hpack {
    fn new() -> Hpack {
        Hpack {
            table: Table {
                entries: VecDeque::new(),
                size: 0,
                max: TABLE_SIZE,
            },
            name: Vec::new(),
            value: Vec::new(),
        }
    }

    /// Decodes `src`, a whole header block, appending its fields to `enc`,
    /// each as a literal without indexing and with a new name, with an
    /// invalid `:authority` replaced.
    fn transcode(&mut self, src: &[u8], enc: &mut Vec<u8>) -> Result<(), Malformed> {
        let mut list = 0;
        let mut first = true;
        let mut i = 0;
        while let Some(&b) = src.get(i) {
            let rest = &src[i..];
            if b & 0x80 != 0 {
                // Indexed field (§6.1).
                let (index, n) = integer(rest, 7)?;
                i += n;
                let (name, value) = self.table.get(index)?;
                field(enc, &mut list, false, name, value)?;
            } else if b & 0xe0 == 0x20 {
                // Dynamic table size update (§6.3): only at a block's start.
                if !first {
                    return Err(Malformed("HPACK table size update after a field"));
                }
                let (size, n) = integer(rest, 5)?;
                i += n;
                if size > TABLE_SIZE {
                    return Err(Malformed("HPACK table size over 4096"));
                }
                self.table.resize(size);
                continue;
            } else {
                // Literal field (§6.2): with incremental indexing (01),
                // without indexing (0000) or never indexed (0001).
                let indexing = b & 0x40 != 0;
                let never = !indexing && b & 0x10 != 0;
                let (index, n) = integer(rest, if indexing { 6 } else { 4 })?;
                i += n;
                let name = if index == 0 {
                    let (name, n) = string(&src[i..], &mut self.name)?;
                    i += n;
                    name
                } else {
                    self.table.get(index)?.0
                };
                let (value, n) = string(&src[i..], &mut self.value)?;
                i += n;
                field(enc, &mut list, never, name, value)?;
                if indexing {
                    let entry = (Box::from(name), Box::from(value));
                    self.table.insert(entry);
                }
            }
            first = false;
        }
        self.name.shrink_to(KEEP);
        self.value.shrink_to(KEEP);
        Ok(())
    }
}

/// Appends one field to `enc` as a literal with a new name, not indexed
/// (or never indexed), counting it against [`MAX_LIST`].
fn field(
    enc: &mut Vec<u8>,
    list: &mut usize,
    never: bool,
    name: &[u8],
    value: &[u8],
) -> Result<(), Malformed> {
    *list += name.len() + value.len() + 32;
    if *list > MAX_LIST {
        return Err(Malformed("header list too large"));
    }
    let value = if name == b":authority" && http::uri::Authority::try_from(value).is_err() {
        LOCALHOST
    } else {
        value
    };
    enc.push(if never { 0x10 } else { 0x00 });
    put_integer(enc, name.len(), 7);
    enc.extend_from_slice(name);
    put_integer(enc, value.len(), 7);
    enc.extend_from_slice(value);
    Ok(())
}

/// Decodes an HPACK integer with a `prefix`-bit prefix (§5.1): the value
/// and the bytes it took. Values past 2^28 are refused (nothing in a block
/// of [`MAX_BLOCK`] bytes is that large).
fn integer(src: &[u8], prefix: u8) -> Result<(usize, usize), Malformed> {
    const SHORT: Malformed = Malformed("HPACK integer cut off");
    let mask = (1u8 << prefix) - 1;
    let first = src.first().ok_or(SHORT)? & mask;
    if first < mask {
        return Ok((usize::from(first), 1));
    }
    let mut value = usize::from(mask);
    for (k, &b) in src.iter().enumerate().skip(1).take(4) {
        value += usize::from(b & 0x7f) << (7 * (k - 1));
        if b & 0x80 == 0 {
            return Ok((value, k + 1));
        }
    }
    if src.len() > 5 {
        return Err(Malformed("HPACK integer too large"));
    }
    Err(SHORT)
}

/// Encodes an HPACK integer with a `prefix`-bit prefix whose other bits
/// are zero.
fn put_integer(enc: &mut Vec<u8>, value: usize, prefix: u8) {
    let mask = (1usize << prefix) - 1;
    if value < mask {
        enc.push(value as u8);
        return;
    }
    enc.push(mask as u8);
    let mut v = value - mask;
    while v >= 0x80 {
        enc.push((v & 0x7f) as u8 | 0x80);
        v >>= 7;
    }
    enc.push(v as u8);
}

/// Decodes an HPACK string (§5.2): the string, in `src` or, when it is
/// Huffman-coded, decoded into `buf`, and the bytes it took.
fn string<'a>(src: &'a [u8], buf: &'a mut Vec<u8>) -> Result<(&'a [u8], usize), Malformed> {
    let huffman = src.first().is_some_and(|b| b & 0x80 != 0);
    let (len, n) = integer(src, 7)?;
    let raw = src
        .get(n..n + len)
        .ok_or(Malformed("HPACK string cut off"))?;
    if !huffman {
        return Ok((raw, n + len));
    }
    buf.clear();
    huffman_decode(raw, buf)?;
    Ok((&buf[..], n + len))
}

/// Decodes a Huffman-coded string (RFC 7541 Appendix B). The code is
/// canonical, so one bit at a time, a code of `len` bits is a symbol when
/// it is below the first code of that length plus the number of codes of
/// that length.
fn huffman_decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), Malformed> {
    // Bits of the symbol read so far, their count, and whether all are 1
    // (padding must be a prefix of EOS, all ones).
    let mut code: u32 = 0;
    let mut len = 0;
    let mut ones = true;
    // The first code of `len` bits, and its symbol's index in
    // `HUFFMAN_SYMBOLS`.
    let mut first: u32 = 0;
    let mut index = 0;
    out.reserve(src.len() * 8 / 5);
    for &byte in src {
        for shift in (0..8).rev() {
            let bit = u32::from((byte >> shift) & 1);
            code |= bit;
            len += 1;
            ones &= bit == 1;
            let count = u32::from(HUFFMAN_COUNT[len]);
            if code.wrapping_sub(first) < count {
                let i = index + (code - first) as usize;
                // Index 256 is EOS, which a string must not hold.
                let &symbol = HUFFMAN_SYMBOLS
                    .get(i)
                    .ok_or(Malformed("Huffman EOS in a string"))?;
                out.push(symbol);
                code = 0;
                len = 0;
                ones = true;
                first = 0;
                index = 0;
            } else {
                if len == HUFFMAN_COUNT.len() - 1 {
                    return Err(Malformed("bad Huffman code"));
                }
                index += count as usize;
                first = (first + count) << 1;
                code <<= 1;
            }
        }
    }
    if len > 7 || !ones {
        return Err(Malformed("bad Huffman padding"));
    }
    Ok(())
}

/// How many Huffman codes there are of each length, 0 to 30 bits.
const HUFFMAN_COUNT: [u8; 31] = [
    0, 0, 0, 0, 0, 10, 26, 32, 6, 0, 5, 3, 2, 6, 2, 3, 0, 0, 0, 3, 8, 13, 26, 29, 12, 4, 15, 19,
    29, 0, 4,
];

/// The symbols in the order of their codes (shortest first, then by
/// value); EOS, the 257th, is left out.
const HUFFMAN_SYMBOLS: [u8; 256] = [
    48, 49, 50, 97, 99, 101, 105, 111, 115, 116, 32, 37, 45, 46, 47, 51, 52, 53, 54, 55, 56, 57,
    61, 65, 95, 98, 100, 102, 103, 104, 108, 109, 110, 112, 114, 117, 58, 66, 67, 68, 69, 70, 71,
    72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86, 87, 89, 106, 107, 113, 118, 119,
    120, 121, 122, 38, 42, 44, 59, 88, 90, 33, 34, 40, 41, 63, 39, 43, 124, 35, 62, 0, 36, 64, 91,
    93, 126, 94, 125, 60, 96, 123, 92, 195, 208, 128, 130, 131, 162, 184, 194, 224, 226, 153, 161,
    167, 172, 176, 177, 179, 209, 216, 217, 227, 229, 230, 129, 132, 133, 134, 136, 146, 154, 156,
    160, 163, 164, 169, 170, 173, 178, 181, 185, 186, 187, 189, 190, 196, 198, 228, 232, 233, 1,
    135, 137, 138, 139, 140, 141, 143, 147, 149, 150, 151, 152, 155, 157, 158, 165, 166, 168, 174,
    175, 180, 182, 183, 188, 191, 197, 231, 239, 9, 142, 144, 145, 148, 159, 171, 206, 215, 225,
    236, 237, 199, 207, 234, 235, 192, 193, 200, 201, 202, 205, 210, 213, 218, 219, 238, 240, 242,
    243, 255, 203, 204, 211, 212, 214, 221, 222, 223, 241, 244, 245, 246, 247, 248, 250, 251, 252,
    253, 254, 2, 3, 4, 5, 6, 7, 8, 11, 12, 14, 15, 16, 17, 18, 19, 20, 21, 23, 24, 25, 26, 27, 28,
    29, 30, 31, 127, 220, 249, 10, 13, 22,
];

/// HPACK's static table (RFC 7541 Appendix A), indices 1 to 61.
const STATIC: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::MaybeUninit;
    use std::task::Waker;

    const PREFACE_BYTES: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    /// xorshift64*.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        /// Below `n` (n > 0).
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
        /// Up to `n - 1` random bytes.
        fn some_bytes(&mut self, n: usize) -> Vec<u8> {
            let len = self.below(n);
            self.bytes(len)
        }
    }

    /// A client that hands over `data` in pieces of 1 to `max_piece`
    /// bytes, sometimes saying Pending first; writes go nowhere.
    struct Feed {
        data: Vec<u8>,
        pos: usize,
        rng: Rng,
        max_piece: usize,
    }

    impl AsyncRead for Feed {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if this.rng.below(4) == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = (1 + this.rng.below(this.max_piece))
                .min(this.data.len() - this.pos)
                .min(buf.remaining());
            buf.put_slice(&this.data[this.pos..this.pos + n]);
            this.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Feed {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Reads `input` through a [`Conn`] to the end or an error, the client
    /// sending pieces of up to `max_piece` bytes and the reader asking for
    /// up to `max_read` at a time (into initialized or uninitialized
    /// buffers, some partly filled already).
    fn run(
        input: &[u8],
        seed: u64,
        max_piece: usize,
        max_read: usize,
    ) -> (Vec<u8>, Option<io::Error>) {
        let mut rng = Rng(seed | 1);
        let feed = Feed {
            data: input.to_vec(),
            pos: 0,
            rng: Rng(rng.next() | 1),
            max_piece,
        };
        let mut conn = Conn::with_peer(feed, None);
        let mut cx = Context::from_waker(Waker::noop());
        let mut out = Vec::new();
        let mut spins = 0;
        let mut init = vec![0u8; max_read];
        let mut uninit = vec![MaybeUninit::<u8>::uninit(); max_read];
        let marker = vec![0xee; max_read];
        loop {
            let size = 1 + rng.below(max_read);
            let pre = if size > 1 && rng.below(4) == 0 {
                rng.below(size.min(64))
            } else {
                0
            };
            let mut rb = if rng.below(2) == 0 {
                ReadBuf::new(&mut init[..size])
            } else {
                ReadBuf::uninit(&mut uninit[..size])
            };
            rb.put_slice(&marker[..pre]);
            match Pin::new(&mut conn).poll_read(&mut cx, &mut rb) {
                Poll::Pending => {
                    spins += 1;
                    assert!(spins < 10_000_000, "no progress");
                }
                Poll::Ready(Err(e)) => {
                    // Sticky.
                    let mut rb = ReadBuf::new(&mut init);
                    assert!(
                        matches!(
                            Pin::new(&mut conn).poll_read(&mut cx, &mut rb),
                            Poll::Ready(Err(_))
                        ) || e.kind() == io::ErrorKind::UnexpectedEof
                    );
                    return (out, Some(e));
                }
                Poll::Ready(Ok(())) => {
                    assert!(rb.filled()[..pre].iter().all(|&b| b == 0xee));
                    if rb.filled().len() == pre {
                        return (out, None);
                    }
                    out.extend_from_slice(&rb.filled()[pre..]);
                }
            }
        }
    }

    fn run_ok(input: &[u8], seed: u64, max_piece: usize, max_read: usize) -> Vec<u8> {
        let (out, err) = run(input, seed, max_piece, max_read);
        assert!(err.is_none(), "{err:?}");
        out
    }

    fn run_err(input: &[u8]) -> io::ErrorKind {
        let mut kind = None;
        for (seed, piece, read) in [(1, 1 << 20, 1 << 20), (2, 1, 1), (3, 7, 100), (4, 5000, 3)] {
            let (_, err) = run(input, seed, piece, read);
            let k = err.expect("an error").kind();
            assert!(kind.is_none_or(|kind| kind == k));
            kind = Some(k);
        }
        kind.unwrap_or(io::ErrorKind::Other)
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A header block as a HEADERS frame and CONTINUATION frames, cut
    /// after the given lengths.
    fn block_frames(stream: u32, end_stream: bool, block: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = block;
        let mut kind = HEADERS;
        let mut flags = if end_stream { END_STREAM } else { 0 };
        for &c in cuts.iter().chain(std::iter::once(&usize::MAX)) {
            let k = c.min(rest.len());
            let last = k == rest.len();
            out.extend(frame(
                kind,
                flags | if last { END_HEADERS } else { 0 },
                stream,
                &rest[..k],
            ));
            rest = &rest[k..];
            if last {
                break;
            }
            kind = CONTINUATION;
            flags = 0;
        }
        out
    }

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    fn fields(list: &[(&str, &str)]) -> Fields {
        list.iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Item {
        Frame(Vec<u8>),
        Block {
            stream: u32,
            end_stream: bool,
            priority: Option<[u8; 5]>,
            fields: Fields,
            never: Vec<bool>,
        },
    }

    /// Splits what the server would read into frames, checking that
    /// header blocks are as promised: no padding, frames of at most
    /// 16,384 bytes, every field a literal with a new name and no
    /// indexing, so a fresh decoder reads each block.
    fn parse(out: &[u8]) -> Vec<Item> {
        assert_eq!(&out[..PREFACE], PREFACE_BYTES);
        let mut items = Vec::new();
        let mut i = PREFACE;
        while i < out.len() {
            let len = frame_len(&out[i..]);
            let (kind, flags) = (out[i + 3], out[i + 4]);
            let stream = u32::from_be_bytes(out[i + 5..i + 9].try_into().unwrap());
            if kind != HEADERS {
                assert_ne!(kind, CONTINUATION);
                items.push(Item::Frame(out[i..i + HEAD + len].to_vec()));
                i += HEAD + len;
                continue;
            }
            assert_eq!(flags & !(END_STREAM | END_HEADERS | PRIORITY), 0);
            assert!(len <= MAX_FRAME);
            let mut payload = &out[i + HEAD..i + HEAD + len];
            let mut priority = None;
            if flags & PRIORITY != 0 {
                priority = Some(payload[..5].try_into().unwrap());
                payload = &payload[5..];
            }
            let mut block = payload.to_vec();
            i += HEAD + len;
            let mut end = flags & END_HEADERS != 0;
            while !end {
                let len = frame_len(&out[i..]);
                assert!(len <= MAX_FRAME);
                assert_eq!(out[i + 3], CONTINUATION);
                assert_eq!(out[i + 4] & !END_HEADERS, 0);
                assert_eq!(
                    u32::from_be_bytes(out[i + 5..i + 9].try_into().unwrap()),
                    stream
                );
                end = out[i + 4] & END_HEADERS != 0;
                block.extend_from_slice(&out[i + HEAD..i + HEAD + len]);
                i += HEAD + len;
            }
            // Every field: 0x00 or 0x10, then two raw strings.
            let mut never = Vec::new();
            let mut j = 0;
            while j < block.len() {
                assert!(block[j] == 0x00 || block[j] == 0x10, "{:#x}", block[j]);
                never.push(block[j] == 0x10);
                j += 1;
                for _ in 0..2 {
                    assert_eq!(block[j] & 0x80, 0);
                    let (len, n) = integer(&block[j..], 7).unwrap();
                    j += n + len;
                }
            }
            assert_eq!(j, block.len());
            let fields = loona_hpack::Decoder::new().decode(&block).unwrap();
            items.push(Item::Block {
                stream,
                end_stream: flags & END_STREAM != 0,
                priority,
                fields,
                never,
            });
        }
        assert_eq!(i, out.len());
        items
    }

    fn fields_of(item: &Item) -> &Fields {
        match item {
            Item::Block { fields, .. } => fields,
            Item::Frame(f) => panic!("a frame, not a block: {f:?}"),
        }
    }

    /// The request headers a grpcio client sends on a `unix:` target.
    fn grpc_request(authority: &str, path: &str) -> Fields {
        fields(&[
            (":scheme", "http"),
            (":method", "POST"),
            (":authority", authority),
            (":path", path),
            ("te", "trailers"),
            ("content-type", "application/grpc"),
            (
                "user-agent",
                "grpc-python/1.51.1 grpc-c/29.0.0 (linux; chttp2)",
            ),
            ("grpc-accept-encoding", "identity, deflate, gzip"),
        ])
    }

    fn with_authority(mut f: Fields, authority: &str) -> Fields {
        for (n, v) in &mut f {
            if n == b":authority" {
                *v = authority.as_bytes().to_vec();
            }
        }
        f
    }

    fn encode(enc: &mut loona_hpack::Encoder<'_>, f: &Fields) -> Vec<u8> {
        enc.encode(f.iter().map(|(n, v)| (&n[..], &v[..])))
    }

    /// Every way of cutting the input gives the same output.
    fn run_all(input: &[u8]) -> Vec<u8> {
        let whole = run_ok(input, 1, 1 << 20, 1 << 20);
        for (seed, piece, read) in [
            (2, 1, 1 << 20),
            (3, 1 << 20, 1),
            (4, 1, 1),
            (5, 13, 29),
            (6, 4000, 100_000),
            (7, 17_000, 9),
        ] {
            assert_eq!(run_ok(input, seed, piece, read), whole, "seed {seed}");
        }
        whole
    }

    /// An encoder like C-core's and Go's: it puts every field it has not
    /// sent before in the dynamic table (Huffman-coding some) and refers to
    /// the table where it can.
    #[derive(Default)]
    struct Indexing {
        table: VecDeque<(Vec<u8>, Vec<u8>)>,
        size: usize,
        n: usize,
    }

    impl Indexing {
        fn encode(&mut self, f: &Fields) -> Vec<u8> {
            let mut b = Vec::new();
            for (name, value) in f {
                if let Some(k) = self
                    .table
                    .iter()
                    .position(|e| e.0 == *name && e.1 == *value)
                {
                    let start = b.len();
                    put_integer(&mut b, 62 + k, 7);
                    b[start] |= 0x80;
                    continue;
                }
                let index = (self.table.iter().position(|e| e.0 == *name).map(|k| 62 + k))
                    .or_else(|| STATIC.iter().position(|e| e.0 == name).map(|k| 1 + k))
                    .unwrap_or(0);
                let start = b.len();
                put_integer(&mut b, index, 6);
                b[start] |= 0x40;
                self.n += 1;
                if index == 0 {
                    b.extend(lit(name, self.n % 2 == 0));
                }
                b.extend(lit(value, self.n % 3 != 0));
                self.table.push_front((name.clone(), value.clone()));
                self.size += name.len() + value.len() + 32;
                while self.size > TABLE_SIZE {
                    let (n, v) = self.table.pop_back().unwrap();
                    self.size -= n.len() + v.len() + 32;
                }
            }
            b
        }
    }

    #[test]
    fn dynamic_table_across_blocks() {
        let mut enc = Indexing::default();
        let stat = grpc_request(
            "/tmp/x/s.sock",
            "/containerd.services.snapshots.v1.Snapshots/Stat",
        );
        let list = grpc_request(
            "/tmp/x/s.sock",
            "/containerd.services.snapshots.v1.Snapshots/List",
        );
        // A table size update to the most allowed, at the start.
        let mut b1 = vec![0x3f, 0xe1, 0x1f];
        b1.extend(enc.encode(&stat));
        let b2 = enc.encode(&list);
        let b3 = enc.encode(&stat);
        // The later blocks lean on the table.
        assert!(b2.len() < 60 && b3.len() == 8, "{} {}", b2.len(), b3.len());
        // A large field evicts the oldest entries; the rest stay reachable.
        let mut big = list.clone();
        big.push((b"x-big".to_vec(), vec![b'b'; 3700]));
        let b4 = enc.encode(&big);
        assert!(enc.table.len() < 9, "{}", enc.table.len());
        let b5 = enc.encode(&list);

        let data = frame(0, END_STREAM, 1, b"\0\0\0\0\x05\n\x03abc");
        let mut input = PREFACE_BYTES.to_vec();
        input.extend(frame(4, 0, 0, &[0, 3, 0, 0, 0, 100]));
        input.extend(block_frames(1, false, &b1, &[]));
        input.extend(&data);
        input.extend(block_frames(3, false, &b2, &[10]));
        input.extend(frame(8, 0, 0, &[0, 0, 1, 0]));
        input.extend(block_frames(5, true, &b3, &[1, 1, 1]));
        input.extend(block_frames(7, true, &b4, &[]));
        input.extend(block_frames(9, true, &b5, &[]));
        let items = parse(&run_all(&input));
        assert_eq!(items.len(), 8);
        assert_eq!(fields_of(&items[6]), &with_authority(big, "localhost"));
        assert_eq!(
            fields_of(&items[7]),
            &with_authority(list.clone(), "localhost")
        );
        assert_eq!(items[0], Item::Frame(frame(4, 0, 0, &[0, 3, 0, 0, 0, 100])));
        assert_eq!(
            fields_of(&items[1]),
            &with_authority(stat.clone(), "localhost")
        );
        assert_eq!(items[2], Item::Frame(data));
        assert_eq!(fields_of(&items[3]), &with_authority(list, "localhost"));
        assert_eq!(items[4], Item::Frame(frame(8, 0, 0, &[0, 0, 1, 0])));
        match &items[5] {
            Item::Block {
                stream,
                end_stream,
                priority,
                fields,
                never,
            } => {
                assert_eq!((*stream, *end_stream, *priority), (5, true, None));
                assert_eq!(fields, &with_authority(stat, "localhost"));
                assert!(never.iter().all(|n| !n));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn valid_authorities_are_kept() {
        for authority in [
            "localhost",
            "localhost:50051",
            "example.com",
            "[::1]:80",
            "user@host:1",
        ] {
            let mut enc = loona_hpack::Encoder::new();
            let f = grpc_request(authority, "/a/b");
            let mut input = PREFACE_BYTES.to_vec();
            input.extend(block_frames(1, true, &encode(&mut enc, &f), &[]));
            let items = parse(&run_all(&input));
            assert_eq!(fields_of(&items[0]), &f);
        }
        for authority in ["", "/run/unlade/snapshotter.sock", "a b", "h\u{e9}"] {
            let mut enc = loona_hpack::Encoder::new();
            let f = grpc_request(authority, "/a/b");
            let mut input = PREFACE_BYTES.to_vec();
            input.extend(block_frames(1, true, &encode(&mut enc, &f), &[]));
            let items = parse(&run_all(&input));
            assert_eq!(fields_of(&items[0]), &with_authority(f, "localhost"));
        }
    }

    /// The canonical Huffman code rebuilt from the tables: (code, length)
    /// of each symbol, EOS last.
    fn huffman_codes() -> Vec<(u32, usize)> {
        let mut codes = vec![(0, 0); 257];
        let (mut code, mut index) = (0u32, 0);
        for (len, &count) in HUFFMAN_COUNT.iter().enumerate() {
            for _ in 0..count {
                let symbol = HUFFMAN_SYMBOLS.get(index).map_or(256, |&s| usize::from(s));
                codes[symbol] = (code, len);
                code += 1;
                index += 1;
            }
            code <<= 1;
        }
        codes
    }

    fn huffman_encode(s: &[u8]) -> Vec<u8> {
        let codes = huffman_codes();
        let mut out = Vec::new();
        let (mut acc, mut bits) = (0u64, 0);
        for &b in s {
            let (code, len) = codes[usize::from(b)];
            acc = (acc << len) | u64::from(code);
            bits += len;
            while bits >= 8 {
                out.push((acc >> (bits - 8)) as u8);
                bits -= 8;
            }
        }
        if bits > 0 {
            out.push(((acc << (8 - bits)) as u8) | (0xff >> bits));
        }
        out
    }

    /// An HPACK string literal, Huffman-coded or not.
    fn lit(s: &[u8], huffman: bool) -> Vec<u8> {
        let body = if huffman {
            huffman_encode(s)
        } else {
            s.to_vec()
        };
        let mut out = Vec::new();
        put_integer(&mut out, body.len(), 7);
        if huffman {
            out[0] |= 0x80;
        }
        out.extend(body);
        out
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        s.chunks(2)
            .map(|c| u8::from_str_radix(std::str::from_utf8(c).unwrap(), 16).unwrap())
            .collect()
    }

    #[test]
    fn huffman_code_matches_rfc_and_loona() {
        assert_eq!(
            huffman_encode(b"www.example.com"),
            hex("f1e3 c2e5 f23a 6ba0 ab90 f4ff")
        );
        assert_eq!(huffman_encode(b"no-cache"), hex("a8eb 1064 9cbf"));
        assert_eq!(huffman_codes()[256], (0x3fff_ffff, 30));
        let mut rng = Rng(7);
        for round in 0..2000 {
            let len = rng.below(if round < 1000 { 8 } else { 300 });
            let s = if round % 2 == 0 {
                rng.bytes(len)
            } else {
                (0..len).map(|_| b"abc/-.:0123"[rng.below(11)]).collect()
            };
            let coded = huffman_encode(&s);
            let mut mine = Vec::new();
            huffman_decode(&coded, &mut mine).unwrap();
            assert_eq!(mine, s);
            let mut block = vec![0x00];
            block.extend(lit(b"k", false));
            block.extend(lit(&s, true));
            let theirs = loona_hpack::Decoder::new().decode(&block).unwrap();
            assert_eq!(theirs[0].1, s);
        }
        // Padding longer than 7 bits, padding not all ones, EOS.
        assert!(huffman_decode(&[0xff], &mut Vec::new()).is_err());
        assert!(huffman_decode(&hex("f1e3 c2e5 f23a 6ba0 ab90 f4fe"), &mut Vec::new()).is_err());
        assert!(huffman_decode(&[0xff, 0xff, 0xff, 0xfc], &mut Vec::new()).is_err());
        assert!(huffman_decode(&[0xff, 0xff, 0xff, 0xff], &mut Vec::new()).is_err());
    }

    #[test]
    fn rfc_7541_c4_requests_with_huffman() {
        let blocks = [
            hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"),
            hex("8286 84be 5886 a8eb 1064 9cbf"),
            hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"),
        ];
        let mut input = PREFACE_BYTES.to_vec();
        for (k, b) in blocks.iter().enumerate() {
            input.extend(block_frames(1 + 2 * k as u32, true, b, &[]));
        }
        // And an authority h2 would refuse, Huffman-coded, indexed, then
        // referred to from the table.
        let mut b = vec![0x41];
        b.extend(lit(b"/run/unlade/snapshotter.sock", true));
        b.extend([0x82, 0x86, 0x84]);
        input.extend(block_frames(7, true, &b, &[]));
        input.extend(block_frames(9, true, &[0xbe, 0x83, 0x86, 0x84], &[]));
        let items = parse(&run_all(&input));
        let get = |k: usize| fields_of(&items[k]).clone();
        assert_eq!(
            get(0),
            fields(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        assert_eq!(
            get(1),
            fields(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ])
        );
        assert_eq!(
            get(2),
            fields(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ])
        );
        let fixed = [
            (":authority", "localhost"),
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
        ];
        assert_eq!(get(3), fields(&fixed));
        let fixed = [
            (":authority", "localhost"),
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/"),
        ];
        assert_eq!(get(4), fields(&fixed));
    }

    #[test]
    fn large_block_is_cut_into_continuations() {
        let big = "v".repeat(40_000);
        let f = fields(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/a/b"),
            (":authority", "/x.sock"),
            ("x-big", &big),
            ("x-after", "1"),
        ]);
        let mut enc = loona_hpack::Encoder::new();
        let b = encode(&mut enc, &f);
        let mut input = PREFACE_BYTES.to_vec();
        input.extend(block_frames(1, true, &b, &[1000, 20_000]));
        let out = run_all(&input);
        // HEADERS and two CONTINUATIONs.
        assert_eq!(out[PREFACE + 3], HEADERS);
        assert_eq!(frame_len(&out[PREFACE..]), MAX_FRAME);
        let items = parse(&out);
        assert_eq!(items.len(), 1);
        assert_eq!(fields_of(&items[0]), &with_authority(f, "localhost"));
        let frames = out[PREFACE..]
            .windows(4)
            .filter(|w| w[3] == CONTINUATION && w[..3] != [0, 0, 0])
            .count();
        assert!(frames >= 2);
    }

    #[test]
    fn padding_priority_and_end_stream() {
        let f = grpc_request("/tmp/s.sock", "/a/b");
        let mut enc = loona_hpack::Encoder::new();
        let b = encode(&mut enc, &f);
        let prio = [0x80, 0, 0, 3, 15];
        for (padded, priority, end_stream, cut) in [
            (true, true, true, None),
            (true, false, false, Some(7)),
            (false, true, false, Some(1)),
            (true, true, false, Some(30)),
        ] {
            let first = cut.unwrap_or(b.len());
            let mut payload = Vec::new();
            let mut flags = 0;
            if padded {
                payload.push(9);
                flags |= PADDED;
            }
            if priority {
                payload.extend(prio);
                flags |= PRIORITY;
            }
            if end_stream {
                flags |= END_STREAM;
            }
            payload.extend(&b[..first]);
            if padded {
                payload.extend([0; 9]);
            }
            let mut input = PREFACE_BYTES.to_vec();
            if first == b.len() {
                input.extend(frame(HEADERS, flags | END_HEADERS, 3, &payload));
            } else {
                input.extend(frame(HEADERS, flags, 3, &payload));
                input.extend(frame(CONTINUATION, END_HEADERS, 3, &b[first..]));
            }
            input.extend(frame(0, END_STREAM, 3, b"hello"));
            let items = parse(&run_all(&input));
            assert_eq!(
                items[0],
                Item::Block {
                    stream: 3,
                    end_stream,
                    priority: priority.then_some(prio),
                    fields: with_authority(f.clone(), "localhost"),
                    never: vec![false; f.len()],
                }
            );
            assert_eq!(items[1], Item::Frame(frame(0, END_STREAM, 3, b"hello")));
        }
        // Empty blocks, and an empty CONTINUATION ending one.
        let mut input = PREFACE_BYTES.to_vec();
        input.extend(frame(HEADERS, END_HEADERS | PADDED, 1, &[0]));
        input.extend(frame(HEADERS, 0, 3, &[]));
        input.extend(frame(CONTINUATION, 0, 3, &[0x82]));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, &[]));
        let items = parse(&run_all(&input));
        assert_eq!(fields_of(&items[0]), &Fields::new());
        assert_eq!(fields_of(&items[1]), &fields(&[(":method", "GET")]));
    }

    #[test]
    fn never_indexed_stays_never_indexed() {
        let mut b = vec![0x10];
        b.extend(lit(b"authorization", false));
        b.extend(lit(b"secret", true));
        b.push(0x04);
        b.extend(lit(b"/p", false));
        let mut input = PREFACE_BYTES.to_vec();
        input.extend(block_frames(1, false, &b, &[]));
        match &parse(&run_all(&input))[0] {
            Item::Block {
                fields: f, never, ..
            } => {
                assert_eq!(f, &fields(&[("authorization", "secret"), (":path", "/p")]));
                assert_eq!(never, &[true, false]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn data_passes_unchanged_in_any_pieces() {
        let mut rng = Rng(42);
        let big = rng.bytes(100 << 10);
        let mut enc = loona_hpack::Encoder::new();
        let f = grpc_request("/tmp/s.sock", "/a/b");
        let mut input = PREFACE_BYTES.to_vec();
        input.extend(frame(4, 0, 0, &[]));
        input.extend(block_frames(1, false, &encode(&mut enc, &f), &[]));
        let data = frame(0, 0, 1, &big);
        input.extend(&data);
        let small: Vec<Vec<u8>> = (0..50)
            .map(|k| frame(0, 0, 1, &rng.bytes(k * 37)))
            .collect();
        for s in &small {
            input.extend(s);
        }
        input.extend(frame(6, 0, 0, &[1; 8]));
        input.extend(block_frames(
            1,
            true,
            &encode(&mut enc, &fields(&[("grpc-status", "0")])),
            &[],
        ));
        let out = run_all(&input);
        // One copy of the DATA payload, the frame itself.
        let items = parse(&out);
        assert_eq!(items.len(), 55);
        assert_eq!(items[0], Item::Frame(frame(4, 0, 0, &[])));
        assert_eq!(items[2], Item::Frame(data));
        for (k, s) in small.iter().enumerate() {
            assert_eq!(&items[3 + k], &Item::Frame(s.clone()));
        }
        assert_eq!(fields_of(&items[54]), &fields(&[("grpc-status", "0")]));
        // Random pieces and reads.
        for seed in 10..20 {
            let piece = 1 + seed as usize * 997 % 20_000;
            let read = 1 + seed as usize * 7919 % 40_000;
            assert_eq!(run_ok(&input, seed, piece, read), out);
        }
    }

    fn with_preface(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut input = PREFACE_BYTES.to_vec();
        for f in frames {
            input.extend(f);
        }
        input
    }

    #[test]
    fn malformed_input_is_invalid_data() {
        let inv = io::ErrorKind::InvalidData;
        // A block over MAX_BLOCK.
        let mut frames = vec![frame(HEADERS, 0, 1, &[0x82; MAX_FRAME])];
        for _ in 0..MAX_BLOCK / MAX_FRAME {
            frames.push(frame(CONTINUATION, 0, 1, &[0x82; MAX_FRAME]));
        }
        assert_eq!(run_err(&with_preface(&frames)), inv);
        // An HPACK bomb: one 4,000-byte entry referred to 300 times.
        let mut b = vec![0x40];
        b.extend(lit(b"x", false));
        b.extend(lit(&[b'a'; 4000], false));
        let bomb = [0xbe; 300];
        assert_eq!(
            run_err(&with_preface(&[
                block_frames(1, true, &b, &[]),
                block_frames(3, true, &bomb, &[])
            ])),
            inv
        );
        // Just under the bound is fine.
        let ok = [0xbe; 250];
        let (out, err) = run(
            &with_preface(&[
                block_frames(1, true, &b, &[]),
                block_frames(3, true, &ok, &[]),
            ]),
            1,
            99,
            999,
        );
        assert!(err.is_none());
        assert_eq!(fields_of(&parse(&out)[1]).len(), 250);
        // Bad HPACK.
        let bad: &[&[u8]] = &[
            &[0x80],                               // index 0
            &[0xbe],                               // past the table
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0x7f], // integer too large
            &[0xff, 0x80],                         // integer cut off
            &[0x04, 0x05, b'a'],                   // string cut off
            &[0x04, 0x81, 0xfe],                   // bad Huffman padding
            &[0x04, 0x84, 0xff, 0xff, 0xff, 0xff], // EOS
            &[0x3f, 0xe2, 0x1f],                   // table size 4,097
            &[0x82, 0x20],                         // table size update after a field
            &[0x00, 0x01],                         // name cut off
        ];
        for b in bad {
            assert_eq!(
                run_err(&with_preface(&[block_frames(1, true, b, &[])])),
                inv,
                "{b:?}"
            );
        }
        // Framing.
        let cases: Vec<Vec<Vec<u8>>> = vec![
            // CONTINUATION with no HEADERS.
            vec![frame(CONTINUATION, END_HEADERS, 1, &[0x82])],
            // Another frame inside a block.
            vec![frame(HEADERS, 0, 1, &[0x82]), frame(0, 0, 1, b"x")],
            vec![frame(HEADERS, 0, 1, &[0x82]), frame(4, 0, 0, &[])],
            // A CONTINUATION on another stream.
            vec![
                frame(HEADERS, 0, 1, &[0x82]),
                frame(CONTINUATION, END_HEADERS, 3, &[0x84]),
            ],
            // HEADERS inside a block.
            vec![
                frame(HEADERS, 0, 1, &[0x82]),
                frame(HEADERS, END_HEADERS, 3, &[0x84]),
            ],
            // PUSH_PROMISE.
            vec![frame(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2, 0x82])],
            // Padding as long as the frame; no room for priority.
            vec![frame(HEADERS, END_HEADERS | PADDED, 1, &[2, 0x82])],
            vec![frame(HEADERS, END_HEADERS | PADDED, 1, &[])],
            vec![frame(HEADERS, END_HEADERS | PRIORITY, 1, &[0, 0, 0, 0])],
        ];
        for frames in &cases {
            assert_eq!(run_err(&with_preface(frames)), inv, "{frames:?}");
        }
        // Cut off inside a block, or a frame header.
        let cut = [
            frame(HEADERS, 0, 1, &[0x82]),
            frame(HEADERS, END_HEADERS, 1, &[0x82, 0x84])[..5].to_vec(),
        ];
        for c in cut {
            assert_eq!(run_err(&with_preface(&[c])), io::ErrorKind::UnexpectedEof);
        }
        // But an end inside another frame is h2's to see.
        let (out, err) = run(
            &with_preface(&[frame(0, 0, 1, b"abcdef")[..12].to_vec()]),
            1,
            3,
            5,
        );
        assert!(err.is_none());
        assert_eq!(out.len(), PREFACE + 12);
    }

    /// A header block of random representations, sometimes broken.
    fn random_block(rng: &mut Rng) -> Vec<u8> {
        let mut b = Vec::new();
        if rng.below(8) == 0 {
            b.push(0x20 | rng.below(32) as u8);
        }
        let names: [&[u8]; 4] = [b":authority", b"x", b"content-type", b"grpc-timeout"];
        for _ in 0..1 + rng.below(8) {
            let value = match rng.below(4) {
                0 => b"/tmp/x.sock".to_vec(),
                1 => rng.some_bytes(6),
                2 => vec![b'v'; rng.below(700)],
                _ => b"localhost:1".to_vec(),
            };
            match rng.below(4) {
                0 => {
                    let mut i = Vec::new();
                    put_integer(&mut i, 1 + rng.below(70), 7);
                    i[0] |= 0x80;
                    b.extend(i);
                }
                k => {
                    let (flag, prefix) = [(0x40, 6), (0x00, 4), (0x10, 4)][k - 1];
                    let mut i = Vec::new();
                    let index = if rng.below(2) == 0 {
                        0
                    } else {
                        1 + rng.below(66)
                    };
                    put_integer(&mut i, index, prefix);
                    i[0] |= flag;
                    b.extend(i);
                    if index == 0 {
                        b.extend(lit(names[rng.below(4)], rng.below(2) == 0));
                    }
                    b.extend(lit(&value, rng.below(2) == 0));
                }
            }
        }
        if rng.below(10) == 0 {
            let at = rng.below(b.len());
            b[at] = rng.next() as u8;
        }
        if rng.below(20) == 0 {
            b.truncate(rng.below(b.len()));
        }
        b
    }

    fn fix(mut f: Fields) -> Fields {
        for (n, v) in &mut f {
            if n == b":authority" && http::uri::Authority::try_from(&v[..]).is_err() {
                *v = b"localhost".to_vec();
            }
        }
        f
    }

    #[test]
    fn decoder_agrees_with_loona() {
        let mut rng = Rng(99);
        let (mut agree, mut errors) = (0, 0);
        let mut mine = Hpack::new();
        let mut theirs = loona_hpack::Decoder::new();
        theirs.set_max_allowed_table_size(TABLE_SIZE);
        for _ in 0..20_000 {
            let b = random_block(&mut rng);
            let mut enc = Vec::new();
            let m = mine.transcode(&b, &mut enc);
            let t = theirs.decode(&b);
            match (m, t) {
                (Ok(()), Ok(t)) => {
                    let m = loona_hpack::Decoder::new().decode(&enc).unwrap();
                    assert_eq!(m, fix(t), "{b:?}");
                    agree += 1;
                }
                (Err(_), Err(_)) => {
                    errors += 1;
                    mine = Hpack::new();
                    theirs = loona_hpack::Decoder::new();
                    theirs.set_max_allowed_table_size(TABLE_SIZE);
                }
                // loona refuses a block that ends in a size update.
                (Ok(()), Err(loona_hpack::decoder::DecoderError::SizeUpdateAtEnd)) => {
                    mine = Hpack::new();
                    theirs = loona_hpack::Decoder::new();
                    theirs.set_max_allowed_table_size(TABLE_SIZE);
                }
                // RFC 7541 §4.2: a size update only starts a block (h2
                // agrees); loona takes one anywhere.
                (Err(Malformed("HPACK table size update after a field")), Ok(_)) => {
                    mine = Hpack::new();
                    theirs = loona_hpack::Decoder::new();
                    theirs.set_max_allowed_table_size(TABLE_SIZE);
                }
                (m, t) => panic!("{b:?}: mine {m:?}, loona {t:?}"),
            }
        }
        assert!(agree > 5_000 && errors > 1_000, "{agree} {errors}");
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = Rng(2024);
        for round in 0..4000 {
            let mut input = PREFACE_BYTES.to_vec();
            if round % 4 == 0 {
                input.extend(rng.some_bytes(3000));
            } else {
                for _ in 0..rng.below(12) {
                    let kind = [0, 1, 1, 1, 9, 9, 4, 8, 2, 5][rng.below(10)];
                    let flags = rng.next() as u8;
                    let stream = 1 + rng.below(3) as u32;
                    let payload = if kind == 1 || kind == 9 {
                        random_block(&mut rng)
                    } else {
                        rng.some_bytes(64)
                    };
                    let mut f = frame(kind, flags, stream, &payload);
                    if rng.below(30) == 0 {
                        f[rng.below(9)] = rng.next() as u8;
                    }
                    input.extend(f);
                }
            }
            let piece = 1 + rng.below(40);
            let read = 1 + rng.below(60);
            let (out, _) = run(&input, rng.next(), piece, read);
            assert!(out.len() <= input.len() + (1 << 20));
        }
    }

    #[tokio::test]
    async fn unix_peer_credentials() {
        use tonic::transport::server::Connected;
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (a, b) = (Conn::new(a), Conn::new(b));
        let (ia, ib) = (a.connect_info(), b.connect_info());
        assert_ne!(ia.id, ib.id);
        assert_eq!(ia.pid, Some(std::process::id() as i32));
        assert_eq!(ib.pid, ia.pid);
    }

    #[tokio::test]
    async fn over_a_socket() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::net::UnixStream::pair().unwrap();
        let mut server = Conn::new(server);
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE_BYTES.to_vec();
        input.extend(block_frames(
            1,
            false,
            &encode(&mut enc, &grpc_request("/s.sock", "/a/b")),
            &[],
        ));
        input.extend(frame(0, END_STREAM, 1, &[7; 70_000]));
        let writer = tokio::spawn(async move {
            let mut client = client;
            for piece in input.chunks(1000) {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut out = Vec::new();
        server.read_to_end(&mut out).await.unwrap();
        writer.await.unwrap();
        let items = parse(&out);
        assert_eq!(fields_of(&items[0]), &grpc_request("localhost", "/a/b"));
        assert_eq!(items[1], Item::Frame(frame(0, END_STREAM, 1, &[7; 70_000])));
        // Writes pass straight through.
        let (mut client, server) = tokio::net::UnixStream::pair().unwrap();
        let mut server = Conn::new(server);
        server.write_all(b"\0\0\0\x04\0\0\0\0\0").await.unwrap();
        server.flush().await.unwrap();
        let mut got = [0; 9];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\0\0\0\x04\0\0\0\0\0");
    }
}
