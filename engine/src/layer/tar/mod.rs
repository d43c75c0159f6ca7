//! A streaming tar parser over a [`Source`]: v7, ustar, star, GNU (long
//! names and link names, base-256 numbers, old sparse) and PAX (local and
//! global headers, sparse 0.0 / 0.1 / 1.0, xattrs).
//!
//! It yields one [`Entry`] per file-system object with every extension
//! header already merged into it, in the order Go's `archive/tar` merges
//! them (the writer of most image layers): PAX records override header
//! fields, a GNU long name overrides a PAX path, and extension headers apply
//! to the next *file* header, never to another extension header. A PAX
//! `size` always wins over the header's size field (the tar-rs
//! CVE-2026-33055 differential). Header-only types (links, directories,
//! devices, FIFOs) carry no data whatever their size field says, again as
//! Go reads them.
//!
//! File data are read with [`Reader::read`] as [`Chunk`]s: slices of the
//! decoded layer on the whole-buffer path, so nothing is copied between
//! decoder and `write`.

mod header;
mod pax;

pub use header::BLOCK;
use header::{cstr, is_zero, Header};

use std::collections::BTreeMap;

use crate::layer::error::{ApplyError, ErrorKind};
use crate::layer::stream::{Chunk, Source};

/// Largest PAX header or GNU long name/link data accepted, per header and
/// for the sum of chained local headers (Go uses the same 1 MiB bound).
pub const MAX_EXTENSION: u64 = 1 << 20;
/// Largest number of extents in one sparse map.
pub const MAX_SPARSE_EXTENTS: usize = 1 << 20;

/// The kind of file-system object an entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file (also contiguous files and unknown types, which POSIX
    /// says to extract as regular files).
    File,
    /// A hard link to an earlier entry, named by [`Entry::link`].
    Hardlink,
    /// A symbolic link whose target is [`Entry::link`], stored verbatim.
    Symlink,
    /// A character device.
    CharDev,
    /// A block device.
    BlockDev,
    /// A directory.
    Dir,
    /// A named pipe.
    Fifo,
}

/// Seconds and nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Time {
    /// Whole seconds (may be negative).
    pub secs: i64,
    /// Nanoseconds, 0..1e9.
    pub nanos: u32,
}

/// The layout of a sparse file: where its data extents lie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sparse {
    /// The file's size once expanded (holes included).
    pub real_size: u64,
    /// (offset, length) of each data extent, in order, non-overlapping; the
    /// archive holds their bytes back to back.
    pub extents: Vec<(u64, u64)>,
}

/// One archive member with all its extension headers merged.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The name as written in the archive (not yet normalized).
    pub path: Vec<u8>,
    /// Link target for hard and symbolic links.
    pub link: Vec<u8>,
    /// What the entry creates.
    pub kind: Kind,
    /// Permission bits incl. setuid, setgid and sticky.
    pub mode: u32,
    /// Numeric owner.
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// Modification time.
    pub mtime: Time,
    /// Access time, where the archive records one.
    pub atime: Option<Time>,
    /// Device major and minor numbers.
    pub dev: (u32, u32),
    /// Extended attributes, by name.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Bytes of data that follow in the archive (for sparse files: the
    /// extents' bytes, without any in-data map).
    pub size: u64,
    /// The sparse layout, for sparse files.
    pub sparse: Option<Sparse>,
    /// Offset of the entry's first header (extension headers included).
    pub offset: u64,
}

/// The tar parser. See the module docs.
pub struct Reader<S: Source> {
    src: S,
    /// Data bytes of the current entry not yet read.
    remaining: u64,
    /// Padding after the current entry's data.
    padding: u64,
    /// Name of the current entry, for errors while reading its data.
    current: Vec<u8>,
    globals: BTreeMap<Vec<u8>, Vec<u8>>,
    globals_bytes: u64,
    done: bool,
}

fn pad(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

fn is_header_only(flag: u8) -> bool {
    matches!(flag, b'1' | b'2' | b'3' | b'4' | b'5' | b'6')
}

impl<S: Source> Reader<S> {
    /// A parser at the start of `src`.
    pub fn new(src: S) -> Self {
        Reader {
            src,
            remaining: 0,
            padding: 0,
            current: Vec::new(),
            globals: BTreeMap::new(),
            globals_bytes: 0,
            done: false,
        }
    }

    /// Position in the uncompressed stream.
    pub fn offset(&self) -> u64 {
        self.src.offset()
    }

    /// Reads the rest of the stream (after the end-of-archive marker), so
    /// that a hashing source has seen every byte, and returns the source.
    pub fn finish(mut self) -> Result<S, ApplyError> {
        let at = self.src.offset();
        self.src
            .drain()
            .map_err(|e| ApplyError::from(e).at(None, at))?;
        Ok(self.src)
    }

    /// Reads up to `max` bytes of the current entry's data; an empty chunk
    /// once all of it has been read. A stream that ends early is an error
    /// naming the entry and offset.
    pub fn read(&mut self, max: usize) -> Result<Chunk, ApplyError> {
        if self.remaining == 0 {
            return Ok(Chunk::Owned(Vec::new()));
        }
        let want = self.remaining.min(max as u64) as usize;
        let at = self.src.offset();
        let c = self
            .src
            .data(want)
            .map_err(|e| ApplyError::from(e).at(Some(&self.current), at))?;
        if c.is_empty() {
            return Err(self.truncated(format!(
                "{} more bytes of file data expected",
                self.remaining
            )));
        }
        self.remaining -= c.len() as u64;
        Ok(c)
    }

    /// Largest chunk worth asking [`Reader::read`] for.
    pub fn max_chunk(&self) -> usize {
        self.src.max_chunk()
    }

    /// How many bytes [`Reader::read`] can return right now without a
    /// copy (see [`Source::lendable`]); at least 1 while data remain.
    pub fn lendable(&mut self) -> Result<usize, ApplyError> {
        let at = self.src.offset();
        let n = self
            .src
            .lendable()
            .map_err(|e| ApplyError::from(e).at(Some(&self.current), at))?;
        Ok(n.max(1))
    }

    fn truncated(&self, what: String) -> ApplyError {
        ApplyError::new(ErrorKind::Truncated(what)).at(Some(&self.current), self.src.offset())
    }

    /// Reads one whole block of `what`; a short read is a truncation.
    fn read_full_block(&mut self, block: &mut [u8; BLOCK], what: &str) -> Result<(), ApplyError> {
        let at = self.src.offset();
        let n = self
            .src
            .read_block(block)
            .map_err(|e| ApplyError::from(e).at(Some(&self.current), at))?;
        if n < BLOCK {
            return Err(self.truncated(format!("inside {what}")));
        }
        Ok(())
    }

    fn skip_exact(&mut self, n: u64, entry: &[u8]) -> Result<u64, ApplyError> {
        let at = self.src.offset();
        self.src
            .skip(n)
            .map_err(|e| ApplyError::from(e).at(Some(entry), at))
    }

    /// Reads the whole data of an extension header (bounded by
    /// [`MAX_EXTENSION`]) and its padding.
    fn read_ext(&mut self, size: u64, what: &str, at: u64) -> Result<Vec<u8>, ApplyError> {
        if size > MAX_EXTENSION {
            return Err(ApplyError::new(ErrorKind::Limit(format!(
                "{what} of {size} bytes (max {MAX_EXTENSION})"
            )))
            .at(None, at));
        }
        let mut out = Vec::with_capacity(size as usize);
        while (out.len() as u64) < size {
            let pos = self.src.offset();
            let c = self
                .src
                .data((size - out.len() as u64) as usize)
                .map_err(|e| ApplyError::from(e).at(None, pos))?;
            if c.is_empty() {
                return Err(
                    ApplyError::new(ErrorKind::Truncated(format!("inside {what}"))).at(None, pos),
                );
            }
            out.extend_from_slice(&c);
        }
        self.skip_exact(pad(size), b"")?;
        Ok(out)
    }

    /// Reads the next block; `None` at the end of the archive (end of
    /// stream, or a zero block: a lone zero block ends the archive as it
    /// does for GNU tar, and anything after it is trailing data).
    fn next_block(&mut self, block: &mut [u8; BLOCK]) -> Result<bool, ApplyError> {
        let at = self.src.offset();
        let n = self
            .src
            .read_block(block)
            .map_err(|e| ApplyError::from(e).at(None, at))?;
        if n == 0 || is_zero(&block[..n]) {
            return Ok(false);
        }
        if n < BLOCK {
            return Err(ApplyError::new(ErrorKind::Truncated(format!(
                "header block has only {n} of {BLOCK} bytes"
            )))
            .at(None, at));
        }
        Ok(true)
    }

    /// Returns the next entry, or `None` at the end of the archive.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, ApplyError> {
        if self.done {
            return Ok(None);
        }
        // Skip whatever the caller did not read of the previous entry.
        if self.remaining > 0 {
            let want = self.remaining;
            let cur = std::mem::take(&mut self.current);
            let got = self.skip_exact(want, &cur)?;
            self.current = cur;
            if got < want {
                return Err(
                    self.truncated(format!("{} more bytes of file data expected", want - got))
                );
            }
            self.remaining = 0;
        }
        if self.padding > 0 {
            let p = self.padding;
            self.padding = 0;
            if self.skip_exact(p, b"")? < p {
                // Data complete, padding cut: treat as a missing
                // end-of-archive marker.
                self.done = true;
                return Ok(None);
            }
        }
        let start = self.src.offset();
        let mut locals: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut locals_bytes = 0u64;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut block = [0u8; BLOCK];
        loop {
            let hdr_at = self.src.offset();
            if !self.next_block(&mut block)? {
                self.done = true;
                if !locals.is_empty() || long_name.is_some() || long_link.is_some() {
                    return Err(ApplyError::new(ErrorKind::Truncated(
                        "archive ends after an extension header".into(),
                    ))
                    .at(long_name.as_deref(), hdr_at));
                }
                return Ok(None);
            }
            let h = Header(&block);
            let name_for_err = h.name();
            let herr =
                |e: String| ApplyError::new(ErrorKind::Header(e)).at(Some(&name_for_err), hdr_at);
            h.check_checksum().map_err(herr)?;
            let flag = h.typeflag();
            match flag {
                b'x' | b'g' | b'L' | b'K' | b'V' | b'N' => {
                    let size = h.size().map_err(herr)?;
                    let size =
                        u64::try_from(size).map_err(|_| herr(format!("negative size {size}")))?;
                    let what = match flag {
                        b'x' => "PAX header",
                        b'g' => "PAX global header",
                        b'L' => "GNU long name",
                        b'K' => "GNU long link name",
                        b'V' => "volume label",
                        _ => "GNU old long names",
                    };
                    if matches!(flag, b'V' | b'N') {
                        // Nothing to extract; skip the data.
                        let total = size + pad(size);
                        if self.skip_exact(total, &name_for_err)? < size {
                            return Err(ApplyError::new(ErrorKind::Truncated(format!(
                                "inside {what}"
                            )))
                            .at(None, hdr_at));
                        }
                        continue;
                    }
                    let data = self.read_ext(size, what, hdr_at)?;
                    match flag {
                        b'x' | b'g' => {
                            let recs = pax::parse_records(&data)
                                .map_err(|e| ApplyError::new(ErrorKind::Pax(e)).at(None, hdr_at))?;
                            if flag == b'x' {
                                locals_bytes += size;
                                if locals_bytes > MAX_EXTENSION {
                                    return Err(ApplyError::new(ErrorKind::Limit(
                                        "chained PAX headers exceed 1 MiB".into(),
                                    ))
                                    .at(None, hdr_at));
                                }
                                locals.extend(recs);
                            } else {
                                self.merge_globals(recs, size, hdr_at)?;
                            }
                        }
                        b'L' => long_name = Some(cstr(&data).to_vec()),
                        _ => long_link = Some(cstr(&data).to_vec()),
                    }
                }
                b'M' => {
                    return Err(herr(
                        "multi-volume continuation entries are not supported".into(),
                    ));
                }
                _ => {
                    let e = self
                        .build(&h, flag, &locals, long_name, long_link, start)
                        .map_err(|e| e.at(Some(&name_for_err), start))?;
                    return Ok(Some(e));
                }
            }
        }
    }

    fn merge_globals(
        &mut self,
        recs: Vec<(Vec<u8>, Vec<u8>)>,
        size: u64,
        at: u64,
    ) -> Result<(), ApplyError> {
        self.globals_bytes += size;
        if self.globals_bytes > MAX_EXTENSION {
            return Err(ApplyError::new(ErrorKind::Limit(
                "PAX global headers exceed 1 MiB".into(),
            ))
            .at(None, at));
        }
        for (k, v) in recs {
            if v.is_empty() {
                self.globals.remove(&k);
            } else {
                self.globals.insert(k, v);
            }
        }
        Ok(())
    }

    fn build(
        &mut self,
        h: &Header<'_>,
        flag: u8,
        locals: &[(Vec<u8>, Vec<u8>)],
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
        start: u64,
    ) -> Result<Entry, ApplyError> {
        let herr = |e: String| ApplyError::new(ErrorKind::Header(e));
        let perr = |e: String| ApplyError::new(ErrorKind::Pax(e));
        let size = h.size().map_err(herr)?;
        let mut size = u64::try_from(size).map_err(|_| herr(format!("negative size {size}")))?;
        let (maj, min) = h.device().map_err(herr)?;
        let mut e = Entry {
            path: h.name(),
            link: h.linkname(),
            kind: Kind::File,
            mode: h.mode().map_err(herr)?,
            uid: id(h.uid().map_err(herr)?, "uid").map_err(herr)?,
            gid: id(h.gid().map_err(herr)?, "gid").map_err(herr)?,
            mtime: Time {
                secs: h.mtime().map_err(herr)?,
                nanos: 0,
            },
            atime: None,
            dev: (dev(maj).map_err(herr)?, dev(min).map_err(herr)?),
            xattrs: BTreeMap::new(),
            size: 0,
            sparse: None,
            offset: start,
        };
        if h.format() == header::Format::Gnu {
            let a = h.gnu_atime().map_err(herr)?;
            if a != 0 {
                e.atime = Some(Time { secs: a, nanos: 0 });
            }
        }
        let header_fields = (e.path.clone(), e.link.clone(), size, e.uid, e.gid, e.mtime);

        // Sparse bookkeeping from PAX records.
        let mut sp_major: Option<i64> = None;
        let mut sp_realsize: Option<u64> = None;
        let mut sp_map: Vec<u64> = Vec::new();
        let mut sp_name: Option<Vec<u8>> = None;
        let mut sp_seen = false;

        let globals: Vec<(Vec<u8>, Vec<u8>)> = self
            .globals
            .iter()
            .filter(|(k, _)| {
                !matches!(k.as_slice(), b"path" | b"linkpath" | b"size")
                    && !k.starts_with(b"GNU.sparse.")
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, v) in globals.iter().chain(locals.iter()) {
            let k = k.as_slice();
            if v.is_empty() {
                // An empty value reverts the field to the header's.
                match k {
                    b"path" => e.path = header_fields.0.clone(),
                    b"linkpath" => e.link = header_fields.1.clone(),
                    b"size" => size = header_fields.2,
                    b"uid" => e.uid = header_fields.3,
                    b"gid" => e.gid = header_fields.4,
                    b"mtime" => e.mtime = header_fields.5,
                    b"atime" => e.atime = None,
                    _ => {
                        // Not a revert: an xattr record with an empty value
                        // is an xattr with an empty value, as GNU tar,
                        // bsdtar and Go's archive/tar read and write it.
                        if let Some((name, value)) = pax::xattr(k, b"").map_err(perr)? {
                            e.xattrs.insert(name, value);
                        }
                    }
                }
                continue;
            }
            match k {
                b"path" => e.path = v.clone(),
                b"linkpath" => e.link = v.clone(),
                b"size" => {
                    let s = pax::parse_decimal(k, v).map_err(perr)?;
                    size = u64::try_from(s).map_err(|_| perr(format!("negative size {s}")))?;
                }
                b"uid" => {
                    e.uid = id(pax::parse_decimal(k, v).map_err(perr)?, "uid").map_err(perr)?
                }
                b"gid" => {
                    e.gid = id(pax::parse_decimal(k, v).map_err(perr)?, "gid").map_err(perr)?
                }
                b"mtime" => {
                    let (secs, nanos) = pax::parse_time(k, v).map_err(perr)?;
                    e.mtime = Time { secs, nanos };
                }
                b"atime" => {
                    let (secs, nanos) = pax::parse_time(k, v).map_err(perr)?;
                    e.atime = Some(Time { secs, nanos });
                }
                b"SCHILY.devmajor" => {
                    e.dev.0 = dev(pax::parse_decimal(k, v).map_err(perr)?).map_err(perr)?
                }
                b"SCHILY.devminor" => {
                    e.dev.1 = dev(pax::parse_decimal(k, v).map_err(perr)?).map_err(perr)?
                }
                b"GNU.sparse.major" => {
                    sp_seen = true;
                    sp_major = Some(pax::parse_decimal(k, v).map_err(perr)?);
                }
                b"GNU.sparse.minor" => {
                    sp_seen = true;
                    pax::parse_decimal(k, v).map_err(perr)?;
                }
                b"GNU.sparse.size" | b"GNU.sparse.realsize" => {
                    sp_seen = true;
                    let s = pax::parse_decimal(k, v).map_err(perr)?;
                    sp_realsize =
                        Some(u64::try_from(s).map_err(|_| perr(format!("negative {s}")))?);
                }
                b"GNU.sparse.name" => {
                    sp_seen = true;
                    sp_name = Some(v.clone());
                }
                b"GNU.sparse.offset" | b"GNU.sparse.numbytes" => {
                    sp_seen = true;
                    // 0.0: pairs in order, offset first.
                    let want_offset = sp_map.len() % 2 == 0;
                    if want_offset != (k == b"GNU.sparse.offset") {
                        return Err(ApplyError::new(ErrorKind::Sparse(
                            "GNU.sparse.offset/numbytes records out of order".into(),
                        )));
                    }
                    let n = pax::parse_decimal(k, v).map_err(perr)?;
                    sp_map.push(u64::try_from(n).map_err(|_| perr(format!("negative {n}")))?);
                    if sp_map.len() / 2 > MAX_SPARSE_EXTENTS {
                        return Err(ApplyError::new(ErrorKind::Limit(
                            "too many sparse extents".into(),
                        )));
                    }
                }
                b"GNU.sparse.map" => {
                    sp_seen = true;
                    for part in v.split(|&b| b == b',') {
                        let n = pax::parse_decimal(k, part).map_err(perr)?;
                        sp_map.push(u64::try_from(n).map_err(|_| perr(format!("negative {n}")))?);
                        if sp_map.len() / 2 > MAX_SPARSE_EXTENTS {
                            return Err(ApplyError::new(ErrorKind::Limit(
                                "too many sparse extents".into(),
                            )));
                        }
                    }
                }
                _ => {
                    if let Some((name, value)) = pax::xattr(k, v).map_err(perr)? {
                        e.xattrs.insert(name, value);
                    }
                }
            }
        }
        if let Some(n) = long_name {
            e.path = n;
        }
        if let Some(l) = long_link {
            e.link = l;
        }
        if let Some(n) = sp_name {
            e.path = n;
        }

        e.kind = match flag {
            b'1' => Kind::Hardlink,
            b'2' => Kind::Symlink,
            b'3' => Kind::CharDev,
            b'4' => Kind::BlockDev,
            b'5' | b'D' => Kind::Dir,
            b'6' => Kind::Fifo,
            b'0' | b'\0' | b'7' if e.path.ends_with(b"/") => Kind::Dir,
            _ => Kind::File,
        };
        if is_header_only(flag) {
            size = 0;
        }
        if e.kind == Kind::Dir && flag != b'D' {
            // A directory written as a regular file with a trailing slash
            // (old tars) has no data.
            size = 0;
        }

        self.current = e.path.clone();
        self.remaining = size;
        self.padding = pad(size);

        if flag == b'S' {
            let real = h.num(483..495, "sparse realsize").map_err(herr)?;
            let real = u64::try_from(real).map_err(|_| herr("negative sparse realsize".into()))?;
            let mut extents = Vec::new();
            let mut more =
                read_old_sparse(&h.0[386..482], &mut extents).map_err(herr)? && h.0[482] != 0;
            let mut block = [0u8; BLOCK];
            while more {
                self.read_full_block(&mut block, "a GNU sparse extension header")?;
                if extents.len() > MAX_SPARSE_EXTENTS {
                    return Err(ApplyError::new(ErrorKind::Limit(
                        "too many sparse extents".into(),
                    )));
                }
                more =
                    read_old_sparse(&block[..504], &mut extents).map_err(herr)? && block[504] != 0;
            }
            e.sparse = Some(Sparse {
                real_size: real,
                extents,
            });
        } else if sp_seen {
            let real = sp_realsize
                .ok_or_else(|| ApplyError::new(ErrorKind::Sparse("no GNU.sparse.size".into())))?;
            let extents = if sp_major == Some(1) {
                self.read_sparse_1_0()?
            } else {
                if sp_map.len() % 2 != 0 {
                    return Err(ApplyError::new(ErrorKind::Sparse(
                        "odd number of map values".into(),
                    )));
                }
                sp_map.chunks(2).map(|c| (c[0], c[1])).collect()
            };
            e.sparse = Some(Sparse {
                real_size: real,
                extents,
            });
        }
        if let Some(sp) = &e.sparse {
            validate_sparse(sp, self.remaining)?;
        }
        e.size = self.remaining;
        Ok(e)
    }

    /// PAX sparse 1.0 keeps its map at the start of the file data: decimal
    /// numbers one per line (count, then offset/length pairs), padded to a
    /// block.
    fn read_sparse_1_0(&mut self) -> Result<Vec<(u64, u64)>, ApplyError> {
        let mut buf: Vec<u8> = Vec::new();
        let mut pos = 0usize;
        let mut nums: Vec<u64> = Vec::new();
        let mut count: Option<u64> = None;
        loop {
            if let Some(c) = count {
                if nums.len() as u64 == c * 2 {
                    break;
                }
            }
            // Next line.
            let nl = loop {
                if let Some(i) = buf[pos..].iter().position(|&b| b == b'\n') {
                    break pos + i;
                }
                if buf.len() as u64 >= MAX_EXTENSION {
                    return Err(ApplyError::new(ErrorKind::Limit(
                        "sparse 1.0 map larger than 1 MiB".into(),
                    )));
                }
                let mut block = [0u8; BLOCK];
                let want = self.remaining.min(BLOCK as u64) as usize;
                if want < BLOCK {
                    return Err(ApplyError::new(ErrorKind::Sparse(
                        "map runs past the entry's data".into(),
                    )));
                }
                self.read_full_block(&mut block, "a sparse 1.0 map")?;
                self.remaining -= BLOCK as u64;
                buf.extend_from_slice(&block);
            };
            let line = &buf[pos..nl];
            let n = pax::parse_decimal(b"GNU.sparse map", line)
                .map_err(|e| ApplyError::new(ErrorKind::Sparse(e)))?;
            let n = u64::try_from(n)
                .map_err(|_| ApplyError::new(ErrorKind::Sparse("negative value".into())))?;
            pos = nl + 1;
            match count {
                None => {
                    if n > MAX_SPARSE_EXTENTS as u64 {
                        return Err(ApplyError::new(ErrorKind::Limit(
                            "too many sparse extents".into(),
                        )));
                    }
                    count = Some(n)
                }
                Some(_) => nums.push(n),
            }
        }
        Ok(nums.chunks(2).map(|c| (c[0], c[1])).collect())
    }
}

/// Reads (offset, numbytes) pairs of 12-byte numbers from an old GNU sparse
/// area; stops at the first empty pair. Returns whether the area was full
/// (so an extension block may follow).
fn read_old_sparse(area: &[u8], out: &mut Vec<(u64, u64)>) -> Result<bool, String> {
    for pair in area.chunks_exact(24) {
        if pair[0] == 0 && pair[12] == 0 {
            return Ok(false);
        }
        let off = header::parse_number(&pair[..12])?;
        let len = header::parse_number(&pair[12..])?;
        let off = u64::try_from(off).map_err(|_| "negative sparse offset".to_string())?;
        let len = u64::try_from(len).map_err(|_| "negative sparse length".to_string())?;
        out.push((off, len));
    }
    Ok(true)
}

fn validate_sparse(sp: &Sparse, data: u64) -> Result<(), ApplyError> {
    let serr = |m: String| ApplyError::new(ErrorKind::Sparse(m));
    let mut end = 0u64;
    let mut total = 0u64;
    for &(off, len) in &sp.extents {
        if off < end {
            return Err(serr(format!("extent at {off} overlaps or is out of order")));
        }
        end = off
            .checked_add(len)
            .ok_or_else(|| serr("extent end overflows".into()))?;
        if end > sp.real_size {
            return Err(serr(format!(
                "extent ends at {end}, past the file size {}",
                sp.real_size
            )));
        }
        total += len;
    }
    if total != data {
        return Err(serr(format!(
            "extents hold {total} bytes but the entry has {data}"
        )));
    }
    Ok(())
}

fn id(v: i64, what: &str) -> Result<u32, String> {
    // u32::MAX is "no change" to chown: not a real owner.
    u32::try_from(v)
        .ok()
        .filter(|&x| x != u32::MAX)
        .ok_or_else(|| format!("{what} {v} out of range"))
}

fn dev(v: i64) -> Result<u32, String> {
    u32::try_from(v).map_err(|_| format!("device number {v} out of range"))
}
