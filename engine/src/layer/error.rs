//! Typed errors. Every error that reaches a user names the layer, and where
//! it can the entry path, the byte offset and the operation that failed, in
//! one line: a user should never need a debugger to learn which file broke
//! an unpack.

use std::fmt;
use std::io;

/// Why decoding a compressed layer failed.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The compressed stream is malformed (bad header, bad checksum, bad
    /// block) or ends early.
    #[error("{format} data corrupt{}: {detail}", at(*.compressed_offset, "compressed offset"))]
    Corrupt {
        /// "gzip" or "zstd".
        format: &'static str,
        /// Position in the compressed input, where known.
        compressed_offset: Option<u64>,
        /// What the decoder said.
        detail: String,
    },
    /// A compression format this engine does not read (xz, bzip2).
    #[error("unsupported layer compression: {0}")]
    Unsupported(&'static str),
    /// Reading the layer failed.
    #[error("read layer: {0}")]
    Io(#[from] io::Error),
}

fn at(offset: Option<u64>, what: &str) -> String {
    match offset {
        Some(o) => format!(" at {what} {o}"),
        None => String::new(),
    }
}

/// What went wrong, without the "where" (see [`ApplyError`]).
#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    /// Decompression failed.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A tar header is malformed: checksum, number field, type.
    #[error("bad tar header: {0}")]
    Header(String),
    /// A PAX extended header record is malformed.
    #[error("bad PAX header: {0}")]
    Pax(String),
    /// A GNU or PAX sparse map is malformed or inconsistent.
    #[error("bad sparse map: {0}")]
    Sparse(String),
    /// The stream ended inside a header or inside file data.
    #[error("truncated layer: {0}")]
    Truncated(String),
    /// A name the engine refuses (`..`, empty, a non-directory at the root).
    #[error("unsafe entry name: {0}")]
    UnsafePath(String),
    /// A malformed OCI whiteout.
    #[error("bad whiteout: {0}")]
    Whiteout(String),
    /// A hard link whose target cannot be linked (deleted by a whiteout).
    #[error("bad hard link: {0}")]
    Hardlink(String),
    /// An entry exceeds a configured or built-in bound.
    #[error("limit exceeded: {0}")]
    Limit(String),
    /// A file-system operation failed.
    #[error("{op}: {source}")]
    Fs {
        /// The operation, e.g. "create file", "set xattr user.a".
        op: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The digest of the uncompressed stream is not the expected diff ID.
    #[error("diff ID mismatch: expected {expected}, got {actual}")]
    DiffIdMismatch {
        /// What the caller asked for.
        expected: String,
        /// What the stream hashed to.
        actual: String,
    },
    /// A caller-supplied argument is invalid (e.g. a malformed digest).
    #[error("{0}")]
    Invalid(String),
    /// The caller's [`crate::cancel::Cancel`] token was tripped.
    #[error("cancelled")]
    Cancelled,
}

/// An error of one layer apply: what went wrong and where.
///
/// Displays as one line, e.g.
/// `layer base.tar.gz: entry "usr/bin/ls" at offset 1536: truncated layer: ...`.
#[derive(Debug)]
pub struct ApplyError {
    /// The layer, as the caller named it (file name or digest).
    pub layer: String,
    /// The entry being processed, as named in the archive (lossy UTF-8).
    pub entry: Option<String>,
    /// Offset in the uncompressed stream of the entry's header or of the
    /// failure.
    pub offset: Option<u64>,
    /// What went wrong.
    pub kind: ErrorKind,
}

impl ApplyError {
    /// An error with no entry or offset yet; [`ApplyError::at`] adds them.
    pub fn new(kind: impl Into<ErrorKind>) -> Self {
        ApplyError {
            layer: String::new(),
            entry: None,
            offset: None,
            kind: kind.into(),
        }
    }

    /// Adds the entry and offset where they are not known yet.
    pub fn at(mut self, entry: Option<&[u8]>, offset: u64) -> Self {
        if self.entry.is_none() {
            self.entry = entry.map(|e| String::from_utf8_lossy(e).into_owned());
        }
        if self.offset.is_none() {
            self.offset = Some(offset);
        }
        self
    }

    /// Names the layer.
    pub fn layer(mut self, layer: &str) -> Self {
        if self.layer.is_empty() {
            self.layer = layer.to_string();
        }
        self
    }

    /// Names the layer, replacing any name it had.
    pub fn relabel(mut self, layer: &str) -> Self {
        self.layer = layer.to_string();
        self
    }

    /// A file-system error for operation `op`.
    pub fn fs(op: impl Into<String>, source: io::Error) -> Self {
        ApplyError::new(ErrorKind::Fs {
            op: op.into(),
            source,
        })
    }
}

impl From<DecodeError> for ApplyError {
    fn from(e: DecodeError) -> Self {
        ApplyError::new(ErrorKind::Decode(e))
    }
}

impl fmt::Display for ApplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.layer.is_empty() {
            write!(f, "layer {}: ", self.layer)?;
        }
        if let Some(e) = &self.entry {
            write!(f, "entry {e:?} ")?;
        }
        if let Some(o) = self.offset {
            write!(f, "at offset {o}")?;
        }
        if self.entry.is_some() || self.offset.is_some() {
            f.write_str(": ")?;
        }
        // One line: flatten any newlines a decoder may have put in its text.
        let msg = self.kind.to_string().replace('\n', " ");
        f.write_str(&msg)
    }
}

impl std::error::Error for ApplyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.kind)
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = ApplyError> = std::result::Result<T, E>;
