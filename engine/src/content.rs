//! The content store: blobs by digest, under `ROOT/content/blobs/sha256/<hex>`.
//!
//! A blob's name is its digest, so the file system is the index and the
//! source of truth: a blob exists once its name does. Ingest writes an
//! unnamed file (`O_TMPFILE`) in `ROOT/content/ingest`, hashes what it
//! writes, checks the digest, and then gives the file its name with one
//! `linkat`, which fails if the name exists: a reader sees a whole, verified
//! blob or nothing, a crash leaves nothing behind (the kernel frees an
//! unnamed file), and several processes ingesting the same blob at once all
//! succeed with one copy published (the others' copies are dropped). Where
//! the file system has no `O_TMPFILE`, a named private file and
//! `renameat2(RENAME_NOREPLACE)` do the same; leftovers of crashed ingests
//! are removed by the next open once they are a day old.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use crate::digest::{Digest, Hasher};

/// Why a content-store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// The bytes do not hash to the digest they were ingested under;
    /// nothing was published.
    #[error("blob {expected}: content hashes to {actual}, nothing kept")]
    DigestMismatch {
        /// The digest asked for.
        expected: Digest,
        /// What the bytes hashed to.
        actual: Digest,
    },
    /// A blob is larger than its descriptor says.
    #[error("blob {digest}: more than the expected {expected} bytes")]
    TooLarge {
        /// The blob.
        digest: Digest,
        /// The size it was announced with.
        expected: u64,
    },
    /// A file-system operation failed.
    #[error("content store {path}: {op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Where.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Result of one ingest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ingested {
    /// Size of the blob.
    pub size: u64,
    /// Whether this call published it (false: it was there already, or a
    /// concurrent ingest published it first).
    pub published: bool,
}

/// Named ingest files older than this are leftovers of a crash.
const STALE_SECS: i64 = 24 * 3600;

/// Blobs by digest in one root. Cheap to share between threads (`&self`
/// methods only).
#[derive(Debug)]
pub struct ContentStore {
    dir: PathBuf,
    blobs: OwnedFd,
    ingest: OwnedFd,
    sync: bool,
}

fn open_dir(p: &Path) -> Result<OwnedFd, ContentError> {
    crate::statedir::open_dir(p).map_err(|e| io_err("open directory", p, e))
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> ContentError {
    ContentError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl ContentStore {
    /// Opens (creating) the store under `root/content`. With `sync`, blobs
    /// are on stable storage before their name appears, and the name is
    /// made durable too.
    pub fn open(root: &Path, sync: bool) -> Result<Self, ContentError> {
        let dir = root.join("content");
        let blobs = open_dir(&dir.join("blobs/sha256"))?;
        let ingest = open_dir(&dir.join("ingest"))?;
        let store = ContentStore {
            dir,
            blobs,
            ingest,
            sync,
        };
        store.remove_stale_ingests();
        Ok(store)
    }

    /// Where the blob `d` lives (whether or not it exists).
    pub fn path(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(d.hex())
    }

    /// Whether the blob is present.
    pub fn contains(&self, d: &Digest) -> bool {
        rfs::statat(&self.blobs, d.hex(), AtFlags::SYMLINK_NOFOLLOW).is_ok()
    }

    /// Opens a blob for reading; `None` if it is not there.
    pub fn open_blob(&self, d: &Digest) -> Result<Option<File>, ContentError> {
        match rfs::openat(
            &self.blobs,
            d.hex(),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => Ok(Some(File::from(fd))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(io_err("open blob", &self.path(d), e.into())),
        }
    }

    /// Every blob with its size, sorted by digest.
    pub fn list(&self) -> Result<Vec<(Digest, u64)>, ContentError> {
        let p = self.dir.join("blobs/sha256");
        let mut out = Vec::new();
        for ent in std::fs::read_dir(&p).map_err(|e| io_err("list blobs", &p, e))? {
            let ent = ent.map_err(|e| io_err("list blobs", &p, e))?;
            let name = ent.file_name();
            let Ok(d) = format!("sha256:{}", name.to_string_lossy()).parse::<Digest>() else {
                continue;
            };
            let md = ent
                .metadata()
                .map_err(|e| io_err("stat blob", &ent.path(), e))?;
            out.push((d, md.len()));
        }
        out.sort();
        Ok(out)
    }

    /// Removes a blob; false if it was not there. A reader that has it
    /// open keeps reading the old file.
    pub fn remove(&self, d: &Digest) -> Result<bool, ContentError> {
        match rfs::unlinkat(&self.blobs, d.hex(), AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(io_err("remove blob", &self.path(d), e.into())),
        }
    }

    /// Reads `r` to the end into the store as blob `expected`, verifying
    /// the digest (and, with `max_size`, that no more bytes arrive than
    /// announced) before anything is published.
    pub fn ingest(
        &self,
        expected: &Digest,
        r: impl Read,
        max_size: Option<u64>,
    ) -> Result<Ingested, ContentError> {
        if self.contains(expected) {
            return Ok(Ingested {
                size: self.size(expected)?,
                published: false,
            });
        }
        let (file, temp_name) = self.create_private()?;
        let result = self.fill_and_publish(expected, r, max_size, file, temp_name.as_ref());
        if result.is_err() {
            if let Some(n) = &temp_name {
                let _ = rfs::unlinkat(&self.ingest, n.as_c_str(), AtFlags::empty());
            }
        }
        result
    }

    fn size(&self, d: &Digest) -> Result<u64, ContentError> {
        rfs::statat(&self.blobs, d.hex(), AtFlags::SYMLINK_NOFOLLOW)
            .map(|st| st.st_size as u64)
            .map_err(|e| io_err("stat blob", &self.path(d), e.into()))
    }

    /// An unnamed file in the ingest directory, or a named one where
    /// `O_TMPFILE` is not supported.
    fn create_private(&self) -> Result<(File, Option<CString>), ContentError> {
        let ingest_path = self.dir.join("ingest");
        match rfs::openat(
            &self.ingest,
            ".",
            OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o444),
        ) {
            Ok(fd) => return Ok((File::from(fd), None)),
            Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {}
            Err(e) => return Err(io_err("create ingest file", &ingest_path, e.into())),
        }
        let name = crate::statedir::private_name();
        let name = CString::new(name)
            .map_err(|_| io_err("name ingest file", &ingest_path, Errno::INVAL.into()))?;
        let fd = rfs::openat(
            &self.ingest,
            name.as_c_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o444),
        )
        .map_err(|e| io_err("create ingest file", &ingest_path, e.into()))?;
        Ok((File::from(fd), Some(name)))
    }

    fn fill_and_publish(
        &self,
        expected: &Digest,
        mut r: impl Read,
        max_size: Option<u64>,
        mut file: File,
        temp_name: Option<&CString>,
    ) -> Result<Ingested, ContentError> {
        let target = self.path(expected);
        let mut hasher = Hasher::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err("read blob", &target, e)),
            };
            size += n as u64;
            if max_size.is_some_and(|m| size > m) {
                return Err(ContentError::TooLarge {
                    digest: *expected,
                    expected: max_size.unwrap_or(0),
                });
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n])
                .map_err(|e| io_err("write blob", &target, e))?;
        }
        let actual = hasher.finish();
        if actual != *expected {
            return Err(ContentError::DigestMismatch {
                expected: *expected,
                actual,
            });
        }
        if self.sync {
            file.sync_all()
                .map_err(|e| io_err("sync blob", &target, e))?;
        }
        let hex = expected.hex();
        let published = match temp_name {
            None => link_unnamed(&file, &self.blobs, &hex),
            Some(n) => rfs::renameat_with(
                &self.ingest,
                n.as_c_str(),
                &self.blobs,
                hex.as_str(),
                RenameFlags::NOREPLACE,
            ),
        };
        let published = match published {
            Ok(()) => true,
            // Somebody published the same bytes first.
            Err(Errno::EXIST) => {
                if let Some(n) = temp_name {
                    let _ = rfs::unlinkat(&self.ingest, n.as_c_str(), AtFlags::empty());
                }
                false
            }
            Err(e) => return Err(io_err("publish blob", &target, e.into())),
        };
        if published && self.sync {
            rfs::fsync(&self.blobs)
                .map_err(|e| io_err("sync blob directory", &target, e.into()))?;
        }
        Ok(Ingested { size, published })
    }

    /// Removes named ingest files of crashed processes (a day old or more).
    fn remove_stale_ingests(&self) {
        let p = self.dir.join("ingest");
        let Ok(rd) = std::fs::read_dir(&p) else {
            return;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        for ent in rd.flatten() {
            let Ok(md) = ent.metadata() else { continue };
            if now - std::os::unix::fs::MetadataExt::mtime(&md) >= STALE_SECS {
                let _ = std::fs::remove_file(ent.path());
            }
        }
    }
}

/// Gives an `O_TMPFILE` file a name with `linkat(AT_EMPTY_PATH)`, or, for
/// processes without `CAP_DAC_READ_SEARCH`, through its /proc entry.
fn link_unnamed(file: &File, dir: &OwnedFd, name: &str) -> rustix::io::Result<()> {
    match rfs::linkat(file.as_fd(), "", dir, name, AtFlags::EMPTY_PATH) {
        Err(Errno::NOENT | Errno::PERM) => {
            let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(file));
            rfs::linkat(
                rfs::CWD,
                proc_path.as_str(),
                dir,
                name,
                AtFlags::SYMLINK_FOLLOW,
            )
        }
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingest_verify_publish() {
        let t = std::env::temp_dir().join(format!("unlade-content-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        let s = ContentStore::open(&t, false).unwrap();
        let d = Digest::of(b"hello");
        assert!(!s.contains(&d));
        let r = s.ingest(&d, &b"hello"[..], Some(5)).unwrap();
        assert_eq!(
            r,
            Ingested {
                size: 5,
                published: true
            }
        );
        assert_eq!(std::fs::read(s.path(&d)).unwrap(), b"hello");
        assert!(!s.ingest(&d, &b"hello"[..], None).unwrap().published);
        let bad = Digest::of(b"other");
        assert!(matches!(
            s.ingest(&bad, &b"hello"[..], None),
            Err(ContentError::DigestMismatch { .. })
        ));
        assert!(!s.contains(&bad));
        assert!(matches!(
            s.ingest(&bad, &b"other!"[..], Some(5)),
            Err(ContentError::TooLarge { .. })
        ));
        assert_eq!(s.list().unwrap(), vec![(d, 5)]);
        assert_eq!(
            std::fs::read_dir(t.join("content/ingest")).unwrap().count(),
            0
        );
        assert!(s.remove(&d).unwrap());
        assert!(!s.remove(&d).unwrap());
        std::fs::remove_dir_all(&t).unwrap();
    }
}
