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

use crate::oci::digest::{Digest, Hasher};
use crate::store::statedir::io_err;

/// Why a content-store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
        /// The digest it was ingested under.
        digest: Digest,
        /// The size it was announced with.
        expected: u64,
    },
    /// A file-system operation failed.
    #[error(transparent)]
    Io(#[from] crate::store::statedir::StoreIoError),
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
    crate::store::statedir::open_dir(p).map_err(|e| io_err(STORE, "open directory", p, e).into())
}

/// How this store's I/O errors name it.
const STORE: &str = "content store";

impl ContentStore {
    /// Opens (creating) the store under `root/content`. With `sync`, blobs
    /// are on stable storage before their name appears, and the name is
    /// made durable too.
    pub fn open(root: &Path, sync: bool) -> Result<Self, ContentError> {
        let dir = root.join("content");
        for d in [dir.clone(), dir.join("blobs")] {
            open_dir(&d)?;
        }
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
            Err(e) => Err(io_err(STORE, "open blob", &self.path(d), e.into()).into()),
        }
    }

    /// Every blob with its size, sorted by digest.
    pub fn list(&self) -> Result<Vec<(Digest, u64)>, ContentError> {
        let p = self.dir.join("blobs/sha256");
        let mut out = Vec::new();
        for ent in std::fs::read_dir(&p).map_err(|e| io_err(STORE, "list blobs", &p, e))? {
            let ent = ent.map_err(|e| io_err(STORE, "list blobs", &p, e))?;
            let name = ent.file_name();
            let Ok(d) = format!("sha256:{}", name.to_string_lossy()).parse::<Digest>() else {
                continue;
            };
            let md = ent
                .metadata()
                .map_err(|e| io_err(STORE, "stat blob", &ent.path(), e))?;
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
            Err(e) => Err(io_err(STORE, "remove blob", &self.path(d), e.into()).into()),
        }
    }

    /// Reads `r` to the end into the store as blob `expected`, verifying
    /// the digest (and, with `max_size`, that no more bytes arrive than
    /// announced) before anything is published.
    pub fn ingest(
        &self,
        expected: &Digest,
        mut r: impl Read,
        max_size: Option<u64>,
    ) -> Result<Ingested, ContentError> {
        if self.contains(expected) {
            return Ok(Ingested {
                size: self.size(expected)?,
                published: false,
            });
        }
        let mut w = self.writer(expected, max_size)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(STORE, "read blob", &self.path(expected), e).into()),
            };
            w.write(&buf[..n])?;
        }
        w.publish()
    }

    /// Starts writing blob `expected` into a private file: the caller
    /// feeds it bytes (resuming an interrupted download where
    /// [`IngestWriter::written`] says) and publishes it, which verifies
    /// the digest. Dropped unpublished, it leaves nothing behind.
    pub fn writer(
        &self,
        expected: &Digest,
        max_size: Option<u64>,
    ) -> Result<IngestWriter<'_>, ContentError> {
        let (file, temp_name) = self.create_private()?;
        Ok(IngestWriter {
            store: self,
            expected: *expected,
            max_size,
            file,
            temp_name,
            hasher: Hasher::new(),
            size: 0,
            direct: false,
        })
    }

    fn size(&self, d: &Digest) -> Result<u64, ContentError> {
        rfs::statat(&self.blobs, d.hex(), AtFlags::SYMLINK_NOFOLLOW)
            .map(|st| st.st_size as u64)
            .map_err(|e| io_err(STORE, "stat blob", &self.path(d), e.into()).into())
    }

    /// An unnamed file in the ingest directory, or a named one where
    /// `O_TMPFILE` is not supported. Opened read-write: a concurrent
    /// apply reads what a download has written so far.
    fn create_private(&self) -> Result<(File, Option<CString>), ContentError> {
        let ingest_path = self.dir.join("ingest");
        match rfs::openat(
            &self.ingest,
            ".",
            OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o444),
        ) {
            Ok(fd) => return Ok((File::from(fd), None)),
            Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {}
            Err(e) => {
                return Err(io_err(STORE, "create ingest file", &ingest_path, e.into()).into())
            }
        }
        let name = crate::store::statedir::private_name();
        let name = CString::new(name)
            .map_err(|_| io_err(STORE, "name ingest file", &ingest_path, Errno::INVAL.into()))?;
        let fd = rfs::openat(
            &self.ingest,
            name.as_c_str(),
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o444),
        )
        .map_err(|e| io_err(STORE, "create ingest file", &ingest_path, e.into()))?;
        Ok((File::from(fd), Some(name)))
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

/// A blob being written into the store (see [`ContentStore::writer`]).
pub struct IngestWriter<'a> {
    store: &'a ContentStore,
    expected: Digest,
    max_size: Option<u64>,
    file: File,
    temp_name: Option<CString>,
    hasher: Hasher,
    size: u64,
    /// Whether the file is open with `O_DIRECT` ([`IngestWriter::direct`]).
    direct: bool,
}

/// The alignment `O_DIRECT` writes keep: address, length and offset in
/// whole pages (every block size a file system here uses divides it).
const DIRECT_ALIGN: usize = 4096;

impl IngestWriter<'_> {
    /// Appends bytes, hashing them; fails once more bytes arrived than
    /// announced.
    pub fn write(&mut self, buf: &[u8]) -> Result<(), ContentError> {
        let size = self.size + buf.len() as u64;
        if let Some(m) = self.max_size.filter(|&m| size > m) {
            return Err(ContentError::TooLarge {
                digest: self.expected,
                expected: m,
            });
        }
        self.hasher.update(buf);
        let aligned = |b: &[u8]| (b.as_ptr() as usize | b.len()) % DIRECT_ALIGN == 0;
        if self.direct && !aligned(buf) {
            self.set_direct(false);
        }
        // `write_all`, but a refused direct write goes on buffered from
        // where it stopped.
        let mut done = 0;
        while done < buf.len() {
            let e = match self.file.write(&buf[done..]) {
                Ok(0) => io::Error::from(io::ErrorKind::WriteZero),
                Ok(n) => {
                    done += n;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // What the file system will not write directly (or a
                // short direct write left unaligned) goes buffered.
                Err(e) if self.direct && e.raw_os_error() == Some(Errno::INVAL.raw_os_error()) => {
                    self.set_direct(false);
                    continue;
                }
                Err(e) => e,
            };
            return Err(io_err(STORE, "write blob", &self.store.path(&self.expected), e).into());
        }
        self.size = size;
        Ok(())
    }

    /// Writes the rest of the blob past the page cache (`O_DIRECT`) where
    /// the file system can: for a blob copied from a memory map of a
    /// local file, whose pages are already cached, a second cached copy
    /// only costs the CPU a page copy per page and the machine the
    /// memory. Writes that are not page-aligned go buffered (the tail of
    /// the blob); false where the file system refuses `O_DIRECT`.
    pub fn direct(&mut self) -> bool {
        self.size % DIRECT_ALIGN as u64 == 0 && self.set_direct(true)
    }

    fn set_direct(&mut self, on: bool) -> bool {
        let Ok(flags) = rfs::fcntl_getfl(&self.file) else {
            return false;
        };
        let flags = if on {
            flags | OFlags::DIRECT
        } else {
            flags - OFlags::DIRECT
        };
        let ok = rfs::fcntl_setfl(&self.file, flags).is_ok();
        self.direct = on && ok;
        ok
    }

    /// Bytes written (and hashed) so far.
    pub fn written(&self) -> u64 {
        self.size
    }

    /// A second handle on the file, for reading what is written while it
    /// grows (with positioned reads).
    pub fn read_handle(&self) -> Result<File, ContentError> {
        self.file.try_clone().map_err(|e| {
            io_err(
                STORE,
                "dup ingest file",
                &self.store.path(&self.expected),
                e,
            )
            .into()
        })
    }

    /// A handle that writes pieces of the blob at their offsets, from
    /// other threads: a blob downloaded over several connections, each
    /// chunk written where it belongs as it arrives. Nothing it writes is
    /// part of the blob until [`Self::absorb`] has hashed it.
    pub fn chunk_writer(&self) -> Result<ChunkWriter, ContentError> {
        Ok(ChunkWriter {
            file: self.read_handle()?,
            max_size: self.max_size,
            expected: self.expected,
            path: self.store.path(&self.expected),
        })
    }

    /// Makes the bytes from [`Self::written`] up to `end`, which a
    /// [`ChunkWriter`] wrote, part of the blob: reads them back (from the
    /// page cache) through `buf` and hashes them. Later [`Self::write`]s
    /// go on from `end`.
    pub fn absorb(&mut self, end: u64, buf: &mut [u8]) -> Result<(), ContentError> {
        if let Some(m) = self.max_size.filter(|&m| end > m) {
            return Err(ContentError::TooLarge {
                digest: self.expected,
                expected: m,
            });
        }
        let path = || self.store.path(&self.expected);
        while self.size < end {
            let want = buf.len().min((end - self.size) as usize);
            let n = match std::os::unix::fs::FileExt::read_at(
                &self.file,
                &mut buf[..want],
                self.size,
            ) {
                Ok(0) => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                Ok(n) => Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            }
            .map_err(|e| io_err(STORE, "read back blob", &path(), e))?;
            self.hasher.update(&buf[..n]);
            self.size += n as u64;
        }
        io::Seek::seek(&mut self.file, io::SeekFrom::Start(self.size))
            .map_err(|e| io_err(STORE, "seek blob", &path(), e))?;
        Ok(())
    }

    /// Checks the digest and gives the blob its name; nothing is published
    /// when the bytes do not match.
    pub fn publish(mut self) -> Result<Ingested, ContentError> {
        let store = self.store;
        let target = store.path(&self.expected);
        let hasher = std::mem::take(&mut self.hasher);
        let actual = hasher.finish();
        if actual != self.expected {
            return Err(ContentError::DigestMismatch {
                expected: self.expected,
                actual,
            });
        }
        if store.sync {
            self.file
                .sync_all()
                .map_err(|e| io_err(STORE, "sync blob", &target, e))?;
        }
        let hex = self.expected.hex();
        let published = match &self.temp_name {
            None => link_unnamed(&self.file, &store.blobs, &hex),
            Some(n) => rfs::renameat_with(
                &store.ingest,
                n.as_c_str(),
                &store.blobs,
                hex.as_str(),
                RenameFlags::NOREPLACE,
            ),
        };
        let published = match published {
            Ok(()) => {
                // Renamed away: nothing left to remove on drop.
                self.temp_name = None;
                true
            }
            // Somebody published the same bytes first (drop removes ours).
            Err(Errno::EXIST) => false,
            Err(e) => return Err(io_err(STORE, "publish blob", &target, e.into()).into()),
        };
        if published && store.sync {
            rfs::fsync(&store.blobs)
                .map_err(|e| io_err(STORE, "sync blob directory", &target, e.into()))?;
        }
        Ok(Ingested {
            size: self.size,
            published,
        })
    }
}

/// Writes pieces of a blob being ingested at their offsets (see
/// [`IngestWriter::chunk_writer`]); cheap to share between threads.
#[derive(Debug)]
pub struct ChunkWriter {
    file: File,
    max_size: Option<u64>,
    expected: Digest,
    path: PathBuf,
}

impl ChunkWriter {
    /// Writes `buf` at byte `offset` of the blob; fails where it would
    /// reach past the size announced.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), ContentError> {
        let end = offset.saturating_add(buf.len() as u64);
        if let Some(m) = self.max_size.filter(|&m| end > m) {
            return Err(ContentError::TooLarge {
                digest: self.expected,
                expected: m,
            });
        }
        std::os::unix::fs::FileExt::write_all_at(&self.file, buf, offset)
            .map_err(|e| io_err(STORE, "write blob", &self.path, e).into())
    }
}

impl Drop for IngestWriter<'_> {
    fn drop(&mut self) {
        if let Some(n) = &self.temp_name {
            let _ = rfs::unlinkat(&self.store.ingest, n.as_c_str(), AtFlags::empty());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blob written past the page cache: page-aligned pieces go direct
    /// where the file system allows, the rest buffered, and the bytes
    /// published are the bytes given either way.
    #[test]
    fn direct_writes_fall_back_for_unaligned_pieces() {
        let t = std::env::temp_dir().join(format!("unlade-direct-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        let s = ContentStore::open(&t, false).unwrap();
        // Page-aligned memory, as a memory-mapped source is.
        let mut map = memmap2::MmapMut::map_anon(5 * DIRECT_ALIGN).unwrap();
        for (i, b) in map.iter_mut().enumerate() {
            *b = (i * 31 % 251) as u8;
        }
        let data = &map[..3 * DIRECT_ALIGN + 100];
        let d = Digest::of(data);
        let mut w = s.writer(&d, Some(data.len() as u64)).unwrap();
        let on = w.direct();
        // ext4 writes directly (where the tests' temporary files are).
        if rfs::statfs(&t).unwrap().f_type == 0xEF53 {
            assert!(on, "ext4 takes O_DIRECT");
        }
        let has_direct =
            |w: &IngestWriter<'_>| rfs::fcntl_getfl(&w.file).unwrap().contains(OFlags::DIRECT);
        assert_eq!(has_direct(&w), on);
        w.write(&data[..2 * DIRECT_ALIGN]).unwrap();
        assert_eq!(has_direct(&w), on, "aligned pieces stay direct");
        // The tail: not a whole page, so buffered from here on.
        w.write(&data[2 * DIRECT_ALIGN..]).unwrap();
        assert!(!has_direct(&w));
        assert!(w.publish().unwrap().published);
        assert_eq!(std::fs::read(s.path(&d)).unwrap(), data);
        // Not resumable direct mid-page: the offset is not aligned.
        let e = Digest::of(&map[..DIRECT_ALIGN + 1]);
        let mut w = s.writer(&e, None).unwrap();
        w.write(&map[..1]).unwrap();
        assert!(!w.direct());
        w.write(&map[1..DIRECT_ALIGN + 1]).unwrap();
        w.publish().unwrap();
        assert_eq!(std::fs::read(s.path(&e)).unwrap(), &map[..DIRECT_ALIGN + 1]);
        std::fs::remove_dir_all(&t).unwrap();
    }

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
