//! Image records: name → manifest, config, layers and top snapshot, under
//! `ROOT/images`. They are the roots of garbage collection: whatever no
//! record reaches (blobs, committed snapshots) `gc` may remove.
//!
//! One JSON file per name, named by the sha256 of the name (any reference
//! string is a safe file name that way), written to a private file and
//! renamed over the old record: readers see the old or the new record,
//! never half of one, and the last writer wins — as for containerd's image
//! store. The labels containerd keeps on content (`containerd.io/
//! uncompressed` on a layer blob, the snapshot GC reference on a config)
//! are fields here: each layer's diff ID and chain ID, and the top chain ID.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use crate::oci::digest::Digest;
use crate::store::statedir::io_err;

/// Why an image record operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImagesError {
    /// No record has that name.
    #[error("image {0:?} not found")]
    NotFound(String),
    /// A file-system operation failed.
    #[error(transparent)]
    Io(#[from] crate::store::statedir::StoreIoError),
}

/// How this store's I/O errors name it.
const STORE: &str = "images";

/// One layer of a recorded image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// The digest of the layer's blob, as the manifest lists it.
    pub digest: Digest,
    /// The blob's size in bytes, as the manifest lists it.
    pub size: u64,
    /// Its media type.
    pub media_type: String,
    /// Digest of its uncompressed tar.
    pub diff_id: Digest,
    /// The snapshot of the stack up to it.
    pub chain_id: Digest,
}

/// What unlade knows about an image it unpacked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The name it is known by (a reference, a tag).
    pub name: String,
    /// The manifest's digest.
    pub manifest: Digest,
    /// The config's digest.
    pub config: Digest,
    /// `os/arch[/variant]`.
    pub platform: String,
    /// Layers, bottom first.
    pub layers: Vec<LayerRecord>,
    /// The top snapshot (None for an image without layers).
    pub top_chain: Option<Digest>,
    /// Seconds since the epoch when recorded.
    pub created: u64,
}

/// The image records of one root.
#[derive(Debug)]
pub struct ImageStore {
    dir: PathBuf,
    fd: OwnedFd,
}

impl ImageStore {
    /// Opens (creating) `root/images`.
    pub fn open(root: &Path) -> Result<Self, ImagesError> {
        let dir = root.join("images");
        let fd =
            crate::store::statedir::open_dir(&dir).map_err(|e| io_err(STORE, "open", &dir, e))?;
        // Private files of writers that died before their rename.
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for ent in rd.flatten() {
                let name = ent.file_name();
                let name = name.to_string_lossy();
                if let Some(rest) = name.strip_prefix(".tmp-") {
                    let pid = rest.split('-').next().and_then(|p| p.parse::<i32>().ok());
                    if pid.is_some_and(|p| !process_alive(p)) {
                        let _ = std::fs::remove_file(ent.path());
                    }
                }
            }
        }
        Ok(ImageStore { dir, fd })
    }

    fn file_name(name: &str) -> String {
        format!("{}.json", Digest::of(name.as_bytes()).hex())
    }

    /// Records `rec`, replacing any record of the same name.
    pub fn put(&self, rec: &ImageRecord, sync: bool) -> Result<(), ImagesError> {
        let tmp = format!(".tmp-{}", crate::store::statedir::private_name());
        let tmp_path = self.dir.join(&tmp);
        let body = serde_json::to_vec_pretty(rec)
            .map_err(|e| io_err(STORE, "encode", &tmp_path, std::io::Error::other(e)))?;
        let mut f =
            std::fs::File::create(&tmp_path).map_err(|e| io_err(STORE, "write", &tmp_path, e))?;
        f.write_all(&body)
            .map_err(|e| io_err(STORE, "write", &tmp_path, e))?;
        if sync {
            f.sync_all()
                .map_err(|e| io_err(STORE, "sync", &tmp_path, e))?;
        }
        drop(f);
        let name = Self::file_name(&rec.name);
        if let Err(e) = rfs::renameat(&self.fd, tmp.as_str(), &self.fd, name.as_str()) {
            let _ = rfs::unlinkat(&self.fd, tmp.as_str(), AtFlags::empty());
            return Err(io_err(STORE, "publish", &self.dir.join(name), e.into()).into());
        }
        if sync {
            rfs::fsync(&self.fd).map_err(|e| io_err(STORE, "sync", &self.dir, e.into()))?;
        }
        Ok(())
    }

    /// The record named `name`.
    pub fn get(&self, name: &str) -> Result<ImageRecord, ImagesError> {
        let p = self.dir.join(Self::file_name(name));
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                io_err(
                    STORE,
                    "decode",
                    &p,
                    std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                )
                .into()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(ImagesError::NotFound(name.into()))
            }
            Err(e) => Err(io_err(STORE, "read", &p, e).into()),
        }
    }

    /// Every record, sorted by name. Unreadable files are skipped.
    pub fn list(&self) -> Result<Vec<ImageRecord>, ImagesError> {
        let mut out = Vec::new();
        for ent in std::fs::read_dir(&self.dir)
            .map_err(|e| io_err(STORE, "list", &self.dir, e))?
            .flatten()
        {
            if ent.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if let Ok(b) = std::fs::read(ent.path()) {
                if let Ok(r) = serde_json::from_slice::<ImageRecord>(&b) {
                    out.push(r);
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Removes the record named `name` (what it referenced stays until gc).
    pub fn remove(&self, name: &str) -> Result<(), ImagesError> {
        let f = Self::file_name(name);
        match rfs::unlinkat(&self.fd, f.as_str(), AtFlags::empty()) {
            Ok(()) => Ok(()),
            Err(Errno::NOENT) => Err(ImagesError::NotFound(name.into())),
            Err(e) => Err(io_err(STORE, "remove", &self.dir.join(f), e.into()).into()),
        }
    }
}

/// Whether process `pid` exists (a private name's writer, say).
pub fn process_alive(pid: i32) -> bool {
    rustix::process::Pid::from_raw(pid)
        .is_some_and(|p| rustix::process::test_kill_process(p) != Err(Errno::SRCH))
}
