//! The fast path's three steps on the store, each blocking: `begin`
//! (is the layer made already, is the name free, is the chain held),
//! `pull` (unlade's own pull of the image) and `finish` (the
//! snapshot published under containerd's name, its tree unlade's
//! committed chain). `FastPath` runs them in order; between
//! them the store's lock is not held, so a pull of minutes blocks no
//! other call.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::cancel::Cancel;
use crate::containerd::fast::Ask;
use crate::containerd::store::{
    holder, now_ns, CtrError, CtrStore, Kind, Locked, Record, PULL_RECORD,
};
use crate::pipeline::metrics::{Stage, StageTimes};
use crate::pipeline::pull::PullOptions;
use crate::root::Root;
use crate::store::statedir::private_name;

/// What [`begin`] found.
#[derive(Debug)]
pub(crate) enum Begun {
    /// The fast path made this snapshot already.
    Made,
    /// The name is another snapshot's: a plain Prepare.
    NameTaken,
    /// The layer below fell back to containerd for this image: so does
    /// this one.
    BelowFellBack,
    /// To be made: pull if needed, then [`finish`] (or drop).
    Pending(Pending),
}

/// An adoption under way: it owns its hold on the chain, released when it
/// is dropped — by [`finish`] once the snapshot holds the chain under its
/// own name, or wherever the adoption is given up (a failed pull, a
/// client gone while a thread was about to run a step).
pub(crate) struct Pending {
    hold: String,
    root: Arc<Root>,
    /// Whether unlade lacks the chain (the image is to be pulled).
    pub(crate) needs_pull: bool,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("hold", &self.hold)
            .field("needs_pull", &self.needs_pull)
            .finish()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let _ = self.root.release_snapshot(&self.hold);
    }
}

/// What one fast-path pull did, for the one log line the server writes.
#[derive(Debug, Clone, Default)]
pub struct PullStats {
    /// The image pulled.
    pub image: String,
    /// Its layers.
    pub layers: usize,
    /// Layers unlade had already.
    pub present: usize,
    /// Layers this pull applied.
    pub applied: usize,
    /// Layers another pull applied meanwhile (this one waited).
    pub by_another: usize,
    /// Blob bytes fetched.
    pub bytes: u64,
    /// How long it took.
    pub seconds: f64,
    /// Of which resolving the reference (documents included).
    pub resolve_seconds: f64,
    /// The per-layer stages of the layers this pull did itself, summed.
    pub stages: StageTimes,
}

impl PullStats {
    /// The pull's one summary event (`info`): image, layers, who did
    /// them, bytes, and seconds per stage.
    pub fn log(&self) {
        let s = |st| self.stages.get(st).as_secs_f64();
        tracing::info!(
            image = %self.image,
            layers = self.layers,
            present = self.present,
            applied = self.applied,
            by_another = self.by_another,
            bytes_fetched = self.bytes,
            seconds = self.seconds,
            resolve_seconds = self.resolve_seconds,
            fetch_seconds = s(Stage::Fetch),
            decode_seconds = s(Stage::Decode),
            apply_seconds = s(Stage::Apply),
            commit_seconds = s(Stage::Commit),
            "pulled for containerd"
        );
    }
}

/// What is under the name `ask.target`, under the lock: `Made` for the
/// fast path's own snapshot of that chain on `parent`; `NameTaken` for
/// anything else (a client may commit its own files under any name: those
/// are never answered as the layer); `None` if free.
fn existing(
    store: &CtrStore,
    parent: &str,
    ask: &Ask,
    l: &Locked,
) -> Result<Option<Begun>, CtrError> {
    let chain = ask.chain.to_string();
    match store.get(&ask.target, Some(l)) {
        Ok(r)
            if r.kind == Kind::Committed
                && r.parent == parent
                && r.chain.as_deref() == Some(chain.as_str()) =>
        {
            Ok(Some(Begun::Made))
        }
        Ok(_) | Err(CtrError::Record { .. }) => Ok(Some(Begun::NameTaken)),
        Err(CtrError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Step 1: whether committed snapshot `ask.target` on `parent` exists
/// already as the fast path's own (`Made`), is taken by another snapshot
/// (`NameTaken`), sits on a layer that fell back for this image
/// (`BelowFellBack`), or is to be made: then unlade's chain is held under
/// a hold of this adoption's own, so that gc keeps it from the moment it
/// is seen (or committed by the pull) until the snapshot holds it.
pub(crate) fn begin(store: &CtrStore, parent: &str, ask: &Ask) -> Result<Begun, CtrError> {
    {
        let l = store.lock()?;
        if let Some(found) = existing(store, parent, ask, &l)? {
            return Ok(found);
        }
        let below = store.check_parent(parent, &l)?;
        if below.is_some_and(|b| b.fallback.as_deref() == Some(ask.image().as_str())) {
            return Ok(Begun::BelowFellBack);
        }
    }
    let root = store.root();
    let hold = format!("containerd-adopt-{}", private_name());
    root.hold_snapshot(&hold, &ask.chain)
        .map_err(|e| CtrError::Root {
            op: "hold",
            name: ask.target.clone(),
            source: Box::new(e),
        })?;
    let needs_pull = root.snapshots().stat(&ask.chain).is_err();
    Ok(Begun::Pending(Pending {
        hold,
        root: root.clone(),
        needs_pull,
    }))
}

/// Step 2: unlade's pull of `ask.reference` (shared with every other pull
/// of it in flight), only if the image has `ask.chain`
/// ([`crate::pipeline::error::RootError::NotInImage`] otherwise, before
/// anything is fetched), recorded under a private name that is dropped
/// once every layer's chain is held for the Prepares containerd sends
/// next. Blocks; stops soon after `cancel` trips; no registry request
/// outlives `deadline`.
pub(crate) fn pull(
    store: &CtrStore,
    opts: &PullOptions,
    ask: &Ask,
    deadline: Option<std::time::Instant>,
    cancel: &Cancel,
) -> Result<PullStats, CtrError> {
    let root = store.root();
    let image = ask.image();
    if root.snapshots().stat(&ask.chain).is_ok() {
        return Ok(PullStats {
            image,
            ..Default::default()
        });
    }
    let record = format!("{PULL_RECORD}{}", private_name());
    let mut opts = PullOptions {
        record_as: Some(record.clone()),
        require_chain: Some(ask.chain),
        ..opts.clone()
    };
    opts.remote.deadline = deadline;
    let t = std::time::Instant::now();
    let pulled = root
        .pull(&ask.reference, &opts, None, cancel)
        .map_err(|e| CtrError::Root {
            op: "pull",
            name: image.clone(),
            source: Box::new(e),
        })?;
    for c in &pulled.unpacked.chain_ids {
        let _ = root.hold_snapshot(&holder(&c.to_string()), c);
    }
    let _ = root.remove_image(&record);
    let count = |r: crate::pipeline::flight::Role| {
        pulled.unpacked.roles.iter().filter(|x| x.1 == r).count()
    };
    Ok(PullStats {
        image,
        layers: pulled.unpacked.chain_ids.len(),
        present: pulled.unpacked.already,
        applied: count(crate::pipeline::flight::Role::Led)
            + count(crate::pipeline::flight::Role::TookOver),
        by_another: count(crate::pipeline::flight::Role::Waited),
        bytes: pulled.bytes_fetched,
        seconds: t.elapsed().as_secs_f64(),
        resolve_seconds: pulled.resolve_time.as_secs_f64(),
        stages: pulled.unpacked.stages,
    })
}

/// Step 3: commits snapshot `ask.target` on `parent` with `labels`, its
/// tree unlade's committed snapshot of the chain. `Made` when it is
/// there (made now, or by another Prepare meanwhile); `NameTaken` when
/// the name was taken meanwhile by a snapshot the fast path did not make.
/// The parent is checked again under the lock: one removed while the
/// pull ran is `NotFound`, never a child without its parent.
pub(crate) fn finish(
    store: &CtrStore,
    parent: &str,
    labels: &BTreeMap<String, String>,
    ask: &Ask,
    pending: Pending,
) -> Result<Begun, CtrError> {
    let now = now_ns();
    // Its usage is measured when containerd first asks (see
    // `CtrStore::usage`), not here on the pull's way.
    let rec = Record {
        name: ask.target.clone(),
        parent: parent.to_string(),
        kind: Kind::Committed,
        created_ns: now,
        updated_ns: now,
        labels: labels.clone(),
        usage: None,
        chain: Some(ask.chain.to_string()),
        fallback: None,
    };
    let root = store.root();
    let made = {
        let l = store.lock()?;
        match existing(store, parent, ask, &l)? {
            Some(found) => Ok(found),
            // The parent again, under the lock where the child is
            // published: it may have gone while the pull ran.
            None => store.check_parent(parent, &l).and_then(|_| {
                // The snapshot's own hold, taken where it appears.
                root.hold_snapshot(&holder(&ask.target), &ask.chain)
                    .map_err(|e| CtrError::Root {
                        op: "hold",
                        name: ask.target.clone(),
                        source: Box::new(e),
                    })?;
                match store.publish(&rec, &[], &l) {
                    Ok(()) => Ok(Begun::Made),
                    Err(e) => {
                        let _ = root.release_snapshot(&holder(&ask.target));
                        match e {
                            // A directory under the name's hash whose record
                            // does not read (a damaged store): not the fast
                            // path's to answer; a plain Prepare is.
                            CtrError::AlreadyExists(_) => Ok(Begun::NameTaken),
                            e => Err(e),
                        }
                    }
                }
            }),
        }
    };
    // The snapshot, if made, holds the chain under its own name now.
    drop(pending);
    made
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::containerd::fast::tests::labels;
    use crate::containerd::fast::{CRI_IMAGE_REF, SNAPSHOT_REF};

    const CHAIN: &str = "sha256:0cd1e14e771ce6425a7a5227ebf59dba76fbb9c417a3176bfde96b64001f803a";

    fn store() -> (tempfile::TempDir, CtrStore) {
        let t = tempfile::tempdir().unwrap();
        let root = Arc::new(Root::open(t.path(), crate::root::RootOptions::default()).unwrap());
        (t, CtrStore::open(root).unwrap())
    }

    fn ask(image: &str) -> Ask {
        Ask::of(&labels(&[(SNAPSHOT_REF, CHAIN), (CRI_IMAGE_REF, image)])).unwrap()
    }

    fn holds(s: &CtrStore) -> usize {
        s.root().snapshots().list_holds().unwrap().len()
    }

    /// An adoption's hold is released wherever the adoption is dropped
    /// (a client gone between steps).
    #[test]
    fn an_adoption_dropped_anywhere_releases_its_hold() {
        let (_t, s) = store();
        let Begun::Pending(p) = begin(&s, "", &ask("127.0.0.1:1/demo:latest")).unwrap() else {
            panic!("pending");
        };
        assert!(p.needs_pull);
        assert_eq!(holds(&s), 1);
        drop(p);
        assert_eq!(holds(&s), 0);
    }

    /// A snapshot a client committed under the chain's name is never the
    /// answer: the name is taken, nothing is held; once it is gone the
    /// fast path pulls (and here fails: nothing listens on port 1), and
    /// its hold goes with the failure.
    #[test]
    fn a_planted_snapshot_is_never_adopted() {
        let (_t, s) = store();
        s.create("act", "", BTreeMap::new(), false).unwrap();
        s.commit(CHAIN, "act", BTreeMap::new()).unwrap();
        let a = ask("127.0.0.1:1/demo:latest");
        assert!(matches!(begin(&s, "", &a).unwrap(), Begun::NameTaken));
        assert_eq!(holds(&s), 0);
        s.remove(CHAIN).unwrap();
        let Begun::Pending(p) = begin(&s, "", &a).unwrap() else {
            panic!("pending");
        };
        let opts = PullOptions::default();
        assert!(matches!(
            pull(&s, &opts, &a, None, &Cancel::new()),
            Err(CtrError::Root { op: "pull", .. })
        ));
        drop(p);
        assert_eq!(holds(&s), 0);
    }

    /// A layer that fell back for an image marks the snapshot containerd
    /// commits from it, and a Prepare on top of that for the same image
    /// falls back without a pull; another image's Prepare on it tries.
    #[test]
    fn above_a_fallen_back_layer_the_same_image_falls_back() {
        let (_t, s) = store();
        let a = ask("127.0.0.1:1/demo:latest");
        s.create_fallen_back("extract-1", "", BTreeMap::new(), &a.image())
            .unwrap();
        s.commit("below", "extract-1", BTreeMap::new()).unwrap();
        assert_eq!(s.stat("below").unwrap().fallback, Some(a.image()));
        assert!(matches!(
            begin(&s, "below", &a).unwrap(),
            Begun::BelowFellBack
        ));
        let other = ask("127.0.0.1:1/other:latest");
        assert!(matches!(
            begin(&s, "below", &other).unwrap(),
            Begun::Pending(_)
        ));
        assert_eq!(holds(&s), 0);
    }
}
