//! gc of a root with thousands of committed snapshots: everything no image
//! record and no writable snapshot references goes, children before their
//! parents, everything referenced stays, and the work grows with the
//! number of snapshots, not with its square. The work is counted, not
//! timed: [`Snapshotter::listed`] counts the snapshot directories (entry
//! and `parent` file) that listings read, and a gc that lists every
//! snapshot again for each one it removes reads millions here.

use std::collections::BTreeSet;

use unlade::store::images::ImageRecord;
use unlade::store::snapshot::Snapshotter;
use unlade::{Cancel, Digest, Root};
use unlade_tests::*;

/// Committed snapshots in all.
const SNAPSHOTS: usize = 4000;
/// Of which one stack this deep; the rest stand alone.
const STACK: usize = 1000;
/// Every this many single snapshots one is kept by a writable snapshot.
const KEEP_EVERY: usize = 100;

/// Commits an empty snapshot `chain` on `parent`.
fn commit(snaps: &Snapshotter, parent: Option<Digest>, chain: Digest) {
    let a = snaps.prepare(parent).unwrap();
    assert!(snaps.commit(a, &chain).unwrap());
}

#[test]
fn gc_of_thousands_of_snapshots_reads_each_a_few_times() {
    let dir = tmp();
    let root = Root::open(dir.path(), unlade_tests::root_options()).unwrap();
    let snaps = root.snapshots();
    let chain = |i: usize| Digest::of(format!("snapshot {i}").as_bytes());

    // The stack: the image's top is layer 4, a container stands on layer
    // 9, layers 10 and up are nobody's.
    let stack: Vec<Digest> = (0..STACK).map(chain).collect();
    for (k, c) in stack.iter().enumerate() {
        commit(snaps, k.checked_sub(1).map(|p| stack[p]), *c);
    }
    let mut keep: BTreeSet<Digest> = stack[..10].iter().copied().collect();
    root.images()
        .put(
            &ImageRecord {
                name: "image:kept".into(),
                manifest: Digest::of(b"manifest"),
                config: Digest::of(b"config"),
                platform: "linux/amd64".into(),
                layers: Vec::new(),
                top_chain: Some(stack[4]),
                created: 0,
            },
            false,
        )
        .unwrap();
    root.prepare_rw("on-the-stack", Some(&stack[9]), &Cancel::new())
        .unwrap();
    // The single ones: every hundredth under a container.
    for i in STACK..SNAPSHOTS {
        commit(snaps, None, chain(i));
        if i % KEEP_EVERY == 0 {
            root.prepare_rw(&format!("ctr-{i}"), Some(&chain(i)), &Cancel::new())
                .unwrap();
            keep.insert(chain(i));
        }
    }
    let all: BTreeSet<Digest> = snaps.list().unwrap().iter().map(|i| i.chain_id).collect();
    assert_eq!(all.len(), SNAPSHOTS);
    let writable = snaps.list_rw().unwrap().len();

    let before = snaps.listed();
    let report = root.gc(&Cancel::new()).unwrap();
    let read = snaps.listed() - before;

    let removed: BTreeSet<Digest> = report.snapshots.iter().copied().collect();
    assert_eq!(removed.len(), report.snapshots.len(), "each removed once");
    let doomed: BTreeSet<Digest> = all.difference(&keep).copied().collect();
    assert_eq!(removed, doomed, "gc removes exactly what nobody references");
    let left: BTreeSet<Digest> = snaps.list().unwrap().iter().map(|i| i.chain_id).collect();
    assert_eq!(left, keep, "gc keeps what is referenced");
    // Children before parents: a crash halfway leaves no snapshot whose
    // parent is gone.
    let at = |c: &Digest| report.snapshots.iter().position(|r| r == c).unwrap();
    for k in 10..STACK - 1 {
        assert!(
            at(&stack[k + 1]) < at(&stack[k]),
            "layer {k} before its child"
        );
    }
    // Linear: gc lists the snapshots a fixed number of times (a few), not
    // once per removal (that would be about 4000 × 4000 / 2 here).
    let bound = 4 * (SNAPSHOTS + writable) as u64;
    assert!(
        read <= bound,
        "gc of {SNAPSHOTS} snapshots ({} removed) read {read} snapshot directories; \
         a linear gc reads at most {bound}",
        removed.len()
    );
    // And a second gc finds nothing to do.
    assert!(root.gc(&Cancel::new()).unwrap().snapshots.is_empty());
}
