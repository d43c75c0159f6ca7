//! Typed errors. Every error that reaches a user names the layer, and where
//! it can the entry path, the byte offset and the operation that failed, in
//! one line: a user should never need a debugger to learn which file broke
//! an unpack. As for every error of the crate (see [`crate::report`]),
//! each level's text says only what that level knows, and the error it
//! wraps is its `source()`.

use std::fmt;
use std::io;

use crate::oci::digest::Digest;

/// Why decoding a compressed layer failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    #[error("read layer")]
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
#[non_exhaustive]
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
    #[error("{op}")]
    Fs {
        /// The operation, e.g. "create file", "set xattr user.a".
        op: String,
        /// The error the system returned (`ENOSPC`, `EACCES`, …).
        source: io::Error,
    },
    /// The layers below the one being applied (see
    /// [`crate::layer::apply::LowerLayers`]), needed for a hard link into
    /// them, could not be had: a lower layer failed, or listing them did.
    #[error("{op}")]
    Lower {
        /// What was asked of them, e.g. "wait for the layers below".
        op: &'static str,
        /// The caller's own error, kept typed (the pipeline's is its
        /// `RootError`): downcast it to inspect it.
        source: Box<dyn std::error::Error + Send + Sync>,
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
/// Displays where (`layer base.tar.gz: entry "usr/bin/ls" at offset
/// 1536`); what went wrong is its `source()`, the [`ErrorKind`]. The
/// chain reads as one line (see [`crate::report::error_chain`]):
/// `layer base.tar.gz: entry "usr/bin/ls" at offset 1536: truncated layer: ...`.
/// With neither layer, entry nor offset known it is transparent: its text
/// and source are the kind's.
#[derive(Debug)]
#[non_exhaustive]
pub struct ApplyError {
    /// The layer, as the caller named it (file name or digest); empty if
    /// not named.
    pub layer: String,
    /// The digest of the layer's blob, when the caller named the layer by
    /// it ([`ApplyError::blob`]): the blob at fault when the kind is about
    /// content.
    pub digest: Option<Digest>,
    /// The entry being processed, as named in the archive (lossy UTF-8).
    pub entry: Option<String>,
    /// Offset in the uncompressed stream of the entry's header or of the
    /// failure.
    pub offset: Option<u64>,
    /// What went wrong (boxed: an `ApplyError` is the `Err` of every step
    /// of an apply, and stays small).
    pub kind: Box<ErrorKind>,
}

impl ApplyError {
    /// An error with no entry or offset yet; [`ApplyError::at`] adds them.
    pub fn new(kind: impl Into<ErrorKind>) -> Self {
        ApplyError {
            layer: String::new(),
            digest: None,
            entry: None,
            offset: None,
            kind: Box::new(kind.into()),
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

    /// Names the layer, unless it has a name already (the innermost
    /// caller knows best).
    pub fn layer(mut self, layer: &str) -> Self {
        if self.layer.is_empty() {
            self.layer = layer.to_string();
        }
        self
    }

    /// Names the layer, replacing any name it had: for a caller that knows
    /// a better one than [`apply_layer`](crate::layer::apply::apply_layer)'s
    /// ("file" for a [`LayerInput::File`](crate::layer::apply::LayerInput)),
    /// such as the path it opened.
    pub fn relabel(mut self, layer: &str) -> Self {
        self.layer = layer.to_string();
        self
    }

    /// Names the layer by its blob's digest, replacing any name it had
    /// (the pipeline does, and reads the digest back typed to tell a
    /// content fault from an environment one).
    pub fn blob(mut self, digest: Digest) -> Self {
        self.layer = digest.to_string();
        self.digest = Some(digest);
        self
    }

    /// Whether the error names no layer, entry or offset: then it has no
    /// text of its own.
    fn bare(&self) -> bool {
        self.layer.is_empty() && self.entry.is_none() && self.offset.is_none()
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
        if self.bare() {
            return self.kind.fmt(f);
        }
        let mut parts = Vec::with_capacity(2);
        if !self.layer.is_empty() {
            parts.push(format!("layer {}", self.layer));
        }
        match (&self.entry, self.offset) {
            (Some(e), Some(o)) => parts.push(format!("entry {e:?} at offset {o}")),
            (Some(e), None) => parts.push(format!("entry {e:?}")),
            (None, Some(o)) => parts.push(format!("at offset {o}")),
            (None, None) => {}
        }
        f.write_str(&parts.join(": "))
    }
}

impl std::error::Error for ApplyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        if self.bare() {
            std::error::Error::source(&*self.kind)
        } else {
            Some(&*self.kind)
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = ApplyError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::error_chain;

    #[test]
    fn each_level_says_its_part_once() {
        let e = ApplyError::fs("create file", io::Error::from_raw_os_error(libc::EACCES))
            .at(Some(b"etc/passwd"), 512)
            .layer("base.tar");
        assert_eq!(
            e.to_string(),
            "layer base.tar: entry \"etc/passwd\" at offset 512"
        );
        assert_eq!(
            error_chain(&e),
            "layer base.tar: entry \"etc/passwd\" at offset 512: create file: \
             Permission denied (os error 13)"
        );
        // Knowing no where, it is its kind.
        let e = ApplyError::new(ErrorKind::Truncated("in a header".into()));
        assert_eq!(error_chain(&e), "truncated layer: in a header");
        let e = ApplyError::from(DecodeError::Io(io::Error::other("cut")));
        assert_eq!(error_chain(&e), "read layer: cut");
    }
}
