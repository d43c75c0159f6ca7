//! An OCI image layout directory as a source: its `index.json` resolved
//! to an image, its blobs opened in place.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, FileType, Mode, OFlags, ResolveFlags};

use super::{BlobSource, SourceError, SourceErrorKind};
use crate::cancel::Cancel;
use crate::oci::digest::Digest;
use crate::oci::image::{resolve_index, Documents, Image, ImageError, Platform, MAX_JSON};

fn invalid(what: impl Into<String>, detail: impl Into<String>) -> ImageError {
    ImageError::Invalid {
        what: what.into(),
        detail: detail.into(),
    }
}

/// An OCI image layout directory: `oci-layout`, `index.json`, `blobs/`.
///
/// A layout may be hostile: every file in it is opened beneath the
/// directory (no symlink may lead out of it, no `/proc` magic link is
/// followed), must be a regular file (a FIFO would block the reader
/// forever, `/dev/zero` would never end), and is bounded by its size
/// before a byte is read.
pub struct Layout {
    dir: PathBuf,
    fd: OwnedFd,
}

/// Opens `rel` beneath `dir` for reading, as a regular file: with
/// `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`, first as `O_PATH`
/// to look at what it is without opening it (opening a FIFO blocks, a
/// device may act on open), then for reading, checking that it is still
/// the same file. Returns the file and its size.
pub fn open_regular_beneath(dir: BorrowedFd<'_>, rel: &Path) -> std::io::Result<(File, u64)> {
    let how = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
    let explain = |e: rustix::io::Errno| -> std::io::Error {
        match e {
            rustix::io::Errno::XDEV => std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "resolves outside the layout directory (refused)",
            ),
            e => e.into(),
        }
    };
    let path = rfs::openat2(dir, rel, OFlags::PATH | OFlags::CLOEXEC, Mode::empty(), how)
        .map_err(explain)?;
    let st = rfs::fstat(&path)?;
    let kind = FileType::from_raw_mode(st.st_mode);
    if kind != FileType::RegularFile {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not a regular file ({kind:?})"),
        ));
    }
    let fd = rfs::openat2(
        dir,
        rel,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
        how,
    )
    .map_err(explain)?;
    let st2 = rfs::fstat(&fd)?;
    if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino) {
        return Err(std::io::Error::other("replaced while being opened"));
    }
    // Regular files ignore O_NONBLOCK; clear it all the same.
    rfs::fcntl_setfl(&fd, OFlags::empty())?;
    Ok((File::from(fd), u64::try_from(st2.st_size).unwrap_or(0)))
}

impl Layout {
    /// Opens a layout, checking its `oci-layout` marker.
    pub fn open(dir: &Path) -> Result<Layout, ImageError> {
        let fd = rfs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ImageError::Io {
            path: dir.to_path_buf(),
            source: e.into(),
        })?;
        let layout = Layout {
            dir: dir.to_path_buf(),
            fd,
        };
        let text = layout.read_bounded(Path::new("oci-layout"), "oci-layout")?;
        if !String::from_utf8_lossy(&text).contains("imageLayoutVersion") {
            return Err(invalid(
                dir.join("oci-layout").display().to_string(),
                "not an OCI image layout marker",
            ));
        }
        Ok(layout)
    }

    /// The layout directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where blob `d` lives, relative to the layout directory.
    fn blob_rel(d: &Digest) -> PathBuf {
        Path::new("blobs/sha256").join(d.hex())
    }

    /// Where blob `d` lives (for messages; open it with
    /// [`Layout::open_blob`]).
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.dir.join(Self::blob_rel(d))
    }

    /// Opens blob `d` (see [`open_regular_beneath`]): the file and its
    /// size.
    pub fn open_blob(&self, d: &Digest) -> std::io::Result<(File, u64)> {
        open_regular_beneath(self.fd.as_fd(), &Self::blob_rel(d))
    }

    /// Reads `rel`, refusing it by its size before reading when it is
    /// larger than [`MAX_JSON`] (and stopping there if it grows).
    fn read_bounded(&self, rel: &Path, what: &str) -> Result<Vec<u8>, ImageError> {
        let io = |source| ImageError::Io {
            path: self.dir.join(rel),
            source,
        };
        let (f, size) = open_regular_beneath(self.fd.as_fd(), rel).map_err(io)?;
        let too_large = || invalid(what, format!("larger than {MAX_JSON} bytes"));
        if size > MAX_JSON {
            return Err(too_large());
        }
        let mut buf = Vec::with_capacity(size as usize);
        f.take(MAX_JSON + 1).read_to_end(&mut buf).map_err(io)?;
        if buf.len() as u64 > MAX_JSON {
            return Err(too_large());
        }
        Ok(buf)
    }

    /// Reads a JSON blob, bounded and verified against its digest.
    fn read_json_blob(&self, d: &Digest) -> Result<Vec<u8>, ImageError> {
        let buf = self.read_bounded(&Self::blob_rel(d), &format!("blob {d}"))?;
        let actual = Digest::of(&buf);
        if actual != *d {
            return Err(ImageError::DigestMismatch { digest: *d, actual });
        }
        Ok(buf)
    }

    /// Resolves `tag` (the `org.opencontainers.image.ref.name` annotation;
    /// `None`: the only image, or the one for the platform) for
    /// `platform` (`None`: the host, and a config for another platform is
    /// an error).
    pub fn resolve(
        &self,
        tag: Option<&str>,
        platform: Option<&Platform>,
    ) -> Result<Image, ImageError> {
        let raw = self.read_bounded(Path::new("index.json"), "index.json")?;
        resolve_index(self, &raw, tag, platform, &self.dir.display().to_string())
    }
}

impl Documents for Layout {
    fn document(&self, d: &Digest, _config: bool) -> Result<Vec<u8>, ImageError> {
        self.read_json_blob(d)
    }
}

impl BlobSource for Layout {
    fn open(
        &self,
        d: &Digest,
        offset: u64,
        _cancel: &Cancel,
    ) -> Result<Box<dyn Read + Send>, SourceError> {
        let p = Layout::blob_path(self, d);
        let (mut f, _) = self.open_blob(d).map_err(|e| {
            let kind = if e.kind() == io::ErrorKind::NotFound {
                SourceErrorKind::NotFound
            } else {
                SourceErrorKind::Fatal
            };
            SourceError::new(kind, format!("{}: {e}", p.display()))
        })?;
        if offset > 0 {
            io::Seek::seek(&mut f, io::SeekFrom::Start(offset))
                .map_err(|e| SourceError::fatal(format!("{}: {e}", p.display())))?;
        }
        Ok(Box::new(f))
    }

    fn local_file(&self, d: &Digest) -> Result<Option<(File, u64)>, SourceError> {
        match self.open_blob(d) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SourceError::fatal(format!(
                "{}: {e}",
                Layout::blob_path(self, d).display()
            ))),
        }
    }

    fn describe(&self) -> String {
        format!("the layout {}", self.dir().display())
    }
}

/// A layout named on a command line, `LAYOUT[:TAG]`: the directory and the
/// tag (the `org.opencontainers.image.ref.name` annotation) to resolve.
///
/// The split is policy every front end must share, or the same argument
/// would name different images: a directory path may itself hold a `:`,
/// so a suffix after the last `:` is a tag only when the whole string is
/// not a directory and the suffix is not empty and has no `/` (a tag never
/// has one; `./a:b/c` is a path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutRef {
    /// The layout directory.
    pub dir: PathBuf,
    /// The tag, if one was given.
    pub tag: Option<String>,
}

impl LayoutRef {
    /// Splits `LAYOUT[:TAG]` (see the type's docs). Looks at the file
    /// system only to see whether the whole string is a directory.
    pub fn parse(s: &str) -> LayoutRef {
        let whole = || LayoutRef {
            dir: PathBuf::from(s),
            tag: None,
        };
        if Path::new(s).is_dir() {
            return whole();
        }
        match s.rsplit_once(':') {
            Some((dir, tag)) if !tag.is_empty() && !tag.contains('/') => LayoutRef {
                dir: PathBuf::from(dir),
                tag: Some(tag.to_string()),
            },
            _ => whole(),
        }
    }

    /// The name an image unpacked from here is recorded under unless the
    /// caller picks one: `LAYOUT:TAG`, or `LAYOUT@MANIFEST` without a tag
    /// (so two untagged images of one layout get two records).
    pub fn image_name(&self, manifest: &Digest) -> String {
        match &self.tag {
            Some(t) => format!("{}:{t}", self.dir.display()),
            None => format!("{}@{manifest}", self.dir.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_ref_splits_a_tag_only_where_it_can_be_one() {
        let r = LayoutRef::parse("/nonexistent/img:v1");
        assert_eq!(r.dir, Path::new("/nonexistent/img"));
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.image_name(&Digest::of(b"m")), "/nonexistent/img:v1");
        // No tag: empty, or a path component after the colon.
        for s in [
            "/nonexistent/img",
            "/nonexistent/img:",
            "/nonexistent/a:b/c",
        ] {
            let r = LayoutRef::parse(s);
            assert_eq!((r.dir.to_str().unwrap(), r.tag), (s, None));
        }
        let m = Digest::of(b"m");
        assert_eq!(
            LayoutRef::parse("/nonexistent/img").image_name(&m),
            format!("/nonexistent/img@{m}")
        );
        // A directory whose name has a colon is the directory.
        let tmp = std::env::temp_dir().join(format!("unlade-layoutref-{}:x", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let r = LayoutRef::parse(tmp.to_str().unwrap());
        std::fs::remove_dir(&tmp).unwrap();
        assert_eq!((r.dir, r.tag), (tmp, None));
    }
}
