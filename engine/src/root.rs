//! An unlade root: the content store, the snapshotter, the image records
//! and the locks that let several processes share them. [`Root`] is what a
//! runtime embeds: open it once, share it between threads (it is a cheap
//! `Clone` over an `Arc`), and call [`Root::unpack`], [`Root::mounts`],
//! [`Root::prepare_rw`], [`Root::gc`] from wherever it likes.
//!
//! Every operation is blocking and cancellable through a [`Cancel`]
//! token; from async code run it with `spawn_blocking` and trip the token
//! when the request goes away. Layout of the root:
//!
//! ```text
//! ROOT/content/     blobs by digest (store::content)
//! ROOT/snapshots/   active, committed (by chain ID), rw, l (short links), trash (store::snapshot)
//! ROOT/images/      image records (store::images)
//! ROOT/locks/       one lock file per flight key (store::lock)
//! ROOT/gc.lock      shared by operations that create things, exclusive for gc
//! ```

use std::path::Path;
use std::sync::Arc;

use crate::cancel::Cancel;
use crate::oci::digest::Digest;
use crate::oci::image::Image;
use crate::oci::reference::Reference;
use crate::pipeline::gc::GcReport;
use crate::pipeline::pull::{PullOptions, Pulled};
use crate::pipeline::task::Task;
use crate::pipeline::unpack::{Progress, Unpacked};
use crate::pipeline::Context;
use crate::source::BlobSource;
use crate::store::content::ContentStore;
use crate::store::images::{ImageRecord, ImageStore};
use crate::store::snapshot::{Mount, Snapshotter};

pub use crate::pipeline::error::RootError;
pub use crate::pipeline::{RootOptions, Stats, StatsSnapshot};

/// An open unlade root. Clones share everything, flights included.
#[derive(Clone)]
pub struct Root(Context);

impl std::fmt::Debug for Root {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Root")
            .field("dir", &self.0.parts().dir)
            .finish()
    }
}

impl Root {
    /// Opens (creating) the root at `dir`, cleaning what crashed processes
    /// left behind (unheld active snapshots, trash, stale ingest files).
    pub fn open(dir: &Path, opts: RootOptions) -> Result<Root, RootError> {
        Context::open(dir, opts).map(Root)
    }

    /// Opens the root at `dir` as [`Root::open`] does, but only if it is
    /// one: a directory holding at least one of the stores a root is made
    /// of, `content/`, `snapshots/` or `images/` ([`Root::open`] makes all
    /// three; a store opened on its own, as [`ContentStore::open`] or
    /// [`Snapshotter::open`] do, makes its one). A path that is not (a
    /// typo, a root not made yet, an empty directory) is
    /// [`RootError::NoRoot`] and nothing is created, so that commands
    /// which only read or remove never leave an empty root behind; only
    /// those that add (unpack, pull, ingest) should create one. A root
    /// missing some parts has them made, as [`Root::open`] would.
    pub fn open_existing(dir: &Path, opts: RootOptions) -> Result<Root, RootError> {
        let is_dir = |p: &str| std::fs::metadata(dir.join(p)).is_ok_and(|m| m.is_dir());
        if !["content", "snapshots", "images"].into_iter().any(is_dir) {
            return Err(RootError::NoRoot {
                path: dir.to_path_buf(),
            });
        }
        Root::open(dir, opts)
    }

    /// The root directory.
    pub fn dir(&self) -> &Path {
        &self.0.parts().dir
    }

    /// The content store.
    pub fn content(&self) -> &ContentStore {
        &self.0.parts().content
    }

    /// The snapshotter.
    pub fn snapshots(&self) -> &Snapshotter {
        &self.0.parts().snapshots
    }

    /// The image records.
    pub fn images(&self) -> &ImageStore {
        &self.0.parts().images
    }

    /// What this process did so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.0.stats()
    }

    /// The root's counters and per-layer stage histograms (bytes fetched
    /// and written, deduplication joins, retries, range fallbacks; see
    /// [`crate::pipeline::metrics`]), to register in a Prometheus registry
    /// with [`Stats::register`].
    pub fn metrics(&self) -> &Stats {
        &self.0.parts().stats
    }

    /// Unpacks `image` (resolved from `source`) into committed snapshots
    /// and records it as `name`. Safe to call from many threads and many
    /// processes at once for the same or overlapping images: each layer is
    /// applied once, and the others wait for it.
    pub fn unpack(
        &self,
        source: Arc<dyn BlobSource>,
        image: &Image,
        name: &str,
        cancel: &Cancel,
    ) -> Result<Unpacked, RootError> {
        self.0.unpack_observed(source, image, name, None, cancel)
    }

    /// [`Root::unpack`], telling `progress` what each layer goes through.
    pub fn unpack_observed(
        &self,
        source: Arc<dyn BlobSource>,
        image: &Image,
        name: &str,
        progress: Option<Arc<dyn Progress>>,
        cancel: &Cancel,
    ) -> Result<Unpacked, RootError> {
        self.0
            .unpack_observed(source, image, name, progress, cancel)
    }

    /// Pulls `reference` from its registry into committed snapshots and
    /// records it under its normalized name. Safe beside other pulls and
    /// unpacks of the same or overlapping images, in this process and
    /// others: each blob is downloaded once and each layer applied once;
    /// concurrent pulls of one reference in this process also share one
    /// resolution (so `requests` and `bytes_fetched` count that shared
    /// client's work).
    pub fn pull(
        &self,
        reference: &Reference,
        opts: &PullOptions,
        progress: Option<Arc<dyn Progress>>,
        cancel: &Cancel,
    ) -> Result<Pulled, RootError> {
        self.0.pull(reference, opts, progress, cancel)
    }

    /// Removes unreferenced committed snapshots and blobs (see
    /// [`crate::pipeline::gc`]). Waits for running unpacks to finish first.
    pub fn gc(&self, cancel: &Cancel) -> Result<GcReport, RootError> {
        self.0.gc(cancel)
    }

    /// How to mount committed snapshot `chain` read-only (see
    /// [`Snapshotter::mounts`]: the mount of a chain of more than about 35
    /// layers is relative to [`Mount::cwd`]). Holds `gc.lock` shared while
    /// it makes the short links such a mount names, so that gc, which
    /// removes the links of snapshots that are gone, never runs beside.
    pub fn mounts(&self, chain: &Digest) -> Result<Mount, RootError> {
        let _gc = self.0.gc_lock(false, &Cancel::new())?;
        Ok(self.0.parts().snapshots.mounts(chain)?)
    }

    /// Removes committed snapshot `chain`, which no other snapshot may
    /// stack on, with its short links (holding `gc.lock` shared, as link
    /// removal requires).
    pub fn remove_snapshot(&self, chain: &Digest) -> Result<(), RootError> {
        let _gc = self.0.gc_lock(false, &Cancel::new())?;
        Ok(self.0.parts().snapshots.remove(chain)?)
    }

    /// Creates writable snapshot `key` on top of committed snapshot
    /// `parent` (a container's rootfs) and says how to mount it. It stays
    /// until [`Root::remove_rw`], and keeps its parents from gc.
    pub fn prepare_rw(
        &self,
        key: &str,
        parent: Option<&Digest>,
        cancel: &Cancel,
    ) -> Result<Mount, RootError> {
        let _gc = self.0.gc_lock(false, cancel)?;
        Ok(self.0.parts().snapshots.create_rw(key, parent)?)
    }

    /// Keeps committed snapshot `chain` and its parents from gc for
    /// `holder` until [`Root::release_snapshot`] (see
    /// [`Snapshotter::hold`]): for users of a chain that are not images
    /// or writable snapshots of this root, such as containerd's snapshots.
    /// Holds `gc.lock` shared, so a gc running now finishes first and the
    /// next one sees the hold.
    pub fn hold_snapshot(&self, holder: &str, chain: &Digest) -> Result<(), RootError> {
        let _gc = self.0.gc_lock(false, &Cancel::new())?;
        Ok(self.0.parts().snapshots.hold(holder, chain)?)
    }

    /// Ends `holder`'s hold; the next gc may remove the chain.
    pub fn release_snapshot(&self, holder: &str) -> Result<(), RootError> {
        Ok(self.0.parts().snapshots.release(holder)?)
    }

    /// Removes writable snapshot `key` (unmount it first), holding
    /// `gc.lock` shared as every removal does, so that a gc never reads a
    /// half-removed one.
    pub fn remove_rw(&self, key: &str) -> Result<(), RootError> {
        let _gc = self.0.gc_lock(false, &Cancel::new())?;
        Ok(self.0.parts().snapshots.remove_rw(key)?)
    }

    /// Removes blob `digest` from the content store; `false` if it was not
    /// there. Holds `gc.lock` shared, like the other removals: beside a gc
    /// (which lists and removes blobs itself) it waits for the gc to end.
    /// Nothing checks that no image uses the blob: a snapshot already
    /// applied from it stays, a later unpack that needs it fetches it again.
    pub fn remove_blob(&self, digest: &Digest) -> Result<bool, RootError> {
        let _gc = self.0.gc_lock(false, &Cancel::new())?;
        Ok(self.0.parts().content.remove(digest)?)
    }

    /// Removes the blobs `digests` from the content store once nothing is
    /// being made in the root by any process (no unpack, writable snapshot
    /// or mount under way): it takes `gc.lock` exclusively, as gc does, so
    /// that no pull beside it is about to read a blob it removes. Waits
    /// for that until `cancel` trips ([`RootError::Cancelled`]). Returns
    /// how many of them were there.
    pub fn remove_blobs_when_idle(
        &self,
        digests: &[Digest],
        cancel: &Cancel,
    ) -> Result<usize, RootError> {
        let _gc = self.0.gc_lock(true, cancel)?;
        let mut removed = 0;
        for d in digests {
            if self.0.parts().content.remove(d)? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// [`Root::unpack`] on its own thread: a [`Task`] to `.await` or
    /// [`Task::wait`] for; dropping it cancels the unpack.
    pub fn unpack_task(
        &self,
        source: Arc<dyn crate::source::BlobSource>,
        image: Image,
        name: String,
    ) -> Task<Result<Unpacked, RootError>> {
        let root = self.clone();
        crate::pipeline::task::spawn(move |cancel| root.unpack(source, &image, &name, cancel))
    }

    /// [`Root::gc`] on its own thread, as a [`Task`].
    pub fn gc_task(&self) -> Task<Result<GcReport, RootError>> {
        let root = self.clone();
        crate::pipeline::task::spawn(move |cancel| root.gc(cancel))
    }

    /// Image records, sorted by name.
    pub fn list_images(&self) -> Result<Vec<ImageRecord>, RootError> {
        Ok(self.0.parts().images.list()?)
    }

    /// Forgets image `name`; [`Root::gc`] then removes what only it used.
    pub fn remove_image(&self, name: &str) -> Result<(), RootError> {
        Ok(self.0.parts().images.remove(name)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("unlade-root-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn open_existing_creates_nothing_where_no_root_is() {
        let base = scratch("noroot");
        let deep = base.join("deep/root");
        match Root::open_existing(&deep, RootOptions::default()) {
            Err(RootError::NoRoot { path }) => assert_eq!(path, deep),
            other => panic!("expected NoRoot, got {other:?}"),
        }
        assert!(!base.exists(), "open_existing created {}", base.display());
        // An empty directory is no root either, and stays empty.
        std::fs::create_dir_all(&base).unwrap();
        let e = Root::open_existing(&base, RootOptions::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("no unlade root at {}", base.display())
        );
        assert_eq!(std::fs::read_dir(&base).unwrap().count(), 0);
        // A file named like a store does not make a root either.
        std::fs::write(base.join("content"), b"").unwrap();
        assert!(matches!(
            Root::open_existing(&base, RootOptions::default()),
            Err(RootError::NoRoot { .. })
        ));
        std::fs::remove_file(base.join("content")).unwrap();
        // One store is enough (a root made by a store of its own); the
        // open makes the rest.
        Snapshotter::open(&base).unwrap();
        Root::open_existing(&base, RootOptions::default()).unwrap();
        assert!(base.join("content").is_dir());
        let root = Root::open(&base, RootOptions::default()).unwrap();
        let d = Digest::of(b"blob");
        root.content().ingest(&d, &b"blob"[..], None).unwrap();
        let again = Root::open_existing(&base, RootOptions::default()).unwrap();
        assert!(again.remove_blob(&d).unwrap());
        assert!(!again.remove_blob(&d).unwrap());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
