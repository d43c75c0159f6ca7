//! Garbage collection: remove what no image record, no writable snapshot
//! and no hold references.
//!
//! Roots are the image records (their manifest, config and layer blobs,
//! and their top snapshot with everything below it), the writable
//! snapshots (their parent chains) and the holds (`snapshots/holds/`: the
//! chains containerd's snapshots are made of, with their parents). Everything else committed, and every
//! blob nobody lists, goes, and so do the short links (`snapshots/l/`)
//! whose snapshot is gone. Active snapshots are never touched: they
//! belong to running operations (and a crashed one's are cleaned when a
//! root is opened). gc holds `gc.lock` exclusively while it works, and
//! every operation that creates something unreferenced-until-done holds it
//! shared, so gc never takes a snapshot an unpack has just committed but
//! not yet recorded. Lock files of flights are removed while held, so a
//! process that opened one just before sees that it was removed and
//! retries (see `flight::FileLock`).

use std::collections::{BTreeSet, HashMap};

use crate::cancel::Cancel;
use crate::oci::digest::Digest;
use crate::pipeline::error::RootError;
use crate::pipeline::Context;
use crate::store::lock::FileLock;

/// What gc removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Committed snapshots removed.
    pub snapshots: Vec<Digest>,
    /// Blobs removed, with their sizes.
    pub blobs: Vec<(Digest, u64)>,
    /// Short links (`snapshots/l/`) removed because their snapshot is
    /// gone.
    pub links: usize,
}

impl Context {
    /// Removes unreferenced committed snapshots and blobs (see the module
    /// documentation). Waits for running unpacks to finish first.
    pub(crate) fn gc(&self, cancel: &Cancel) -> Result<GcReport, RootError> {
        let _gc = self.gc_lock(true, cancel)?;
        let snaps = &self.0.snapshots;
        let committed = snaps.list()?;
        let parent_of: HashMap<Digest, Option<Digest>> =
            committed.iter().map(|i| (i.chain_id, i.parent)).collect();
        let mut keep_chains = BTreeSet::new();
        let mut keep_blobs = BTreeSet::new();
        let mut tops = Vec::new();
        for rec in self.0.images.list()? {
            keep_blobs.insert(rec.manifest);
            keep_blobs.insert(rec.config);
            keep_blobs.extend(rec.layers.iter().map(|l| l.digest));
            tops.extend(rec.top_chain);
        }
        tops.extend(snaps.list_rw()?.into_iter().filter_map(|r| r.parent));
        tops.extend(snaps.list_holds()?.into_iter().map(|(_, chain)| chain));
        for top in tops {
            let mut cur = Some(top);
            while let Some(c) = cur {
                if !keep_chains.insert(c) {
                    break;
                }
                cur = parent_of.get(&c).copied().flatten();
            }
        }
        // One batch, children before parents, checked against one listing:
        // a removal each would list every snapshot again (O(n²)).
        let doomed: Vec<Digest> = committed
            .iter()
            .filter(|i| !keep_chains.contains(&i.chain_id))
            .map(|i| i.chain_id)
            .collect();
        let mut report = GcReport {
            snapshots: snaps.remove_all(&doomed, cancel)?,
            ..GcReport::default()
        };
        if report.snapshots.len() < doomed.len() {
            return Err(RootError::Cancelled);
        }
        // `remove` takes a snapshot's links with it; these are the ones
        // left by removals that did not finish.
        report.links = snaps.sweep_links()?;
        for (d, size) in self.0.content.list()? {
            if !keep_blobs.contains(&d) && self.0.content.remove(&d)? {
                report.blobs.push((d, size));
            }
        }
        self.remove_idle_locks();
        Ok(report)
    }

    /// Removes lock files nobody holds (they are re-created on demand).
    fn remove_idle_locks(&self) {
        let dir = self.0.dir.join("locks");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        for ent in rd.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            if let Ok(Some(_held)) = FileLock::try_acquire(&self.0.locks, &name) {
                let _ = std::fs::remove_file(ent.path());
            }
        }
    }
}
