//! The content store: blobs appear whole and verified or not at all, and
//! many writers of one blob at once (threads and processes) all succeed
//! with exactly one publication and nothing left in the ingest area.

use std::fs;
use std::process::{Command, Stdio};

use unlade::store::content::{ContentError, ContentStore};
use unlade::Digest;
use unlade_tests::*;

fn content(root: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .arg("content")
        .args(args)
        .arg("--root")
        .arg(root)
        .output()
        .expect("run unlade")
}

#[test]
fn threads_ingesting_one_blob_publish_it_once() {
    let root = tmp();
    let data = noise(3 << 20, 11);
    let d = Digest::of(&data);
    let store = ContentStore::open(root.path(), false).unwrap();
    let published: Vec<bool> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..16)
            .map(|_| {
                s.spawn(|| {
                    store
                        .ingest(&d, &data[..], Some(data.len() as u64))
                        .unwrap()
                        .published
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(published.iter().filter(|p| **p).count(), 1, "{published:?}");
    assert!(fs::read(store.path(&d)).unwrap() == data);
    assert_eq!(
        fs::read_dir(root.path().join("content/ingest"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn processes_ingesting_one_blob_publish_it_once() {
    let root = tmp();
    let data = noise(8 << 20, 12);
    let d = sha256(&data);
    let src = write(root.path(), "blob", &data);
    let children: Vec<_> = (0..12)
        .map(|_| {
            Command::new(bin())
                .args(["content", "ingest", &d])
                .arg(&src)
                .arg("--root")
                .arg(root.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut published = 0;
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert_eq!(ok_diff_id(&out), d);
        if String::from_utf8_lossy(&out.stdout).contains("published") {
            published += 1;
        }
    }
    // Every process either published or found it there; exactly one
    // published (the others' copies were dropped).
    assert_eq!(published, 1);
    let ls = content(root.path(), &["ls"]);
    assert_eq!(
        String::from_utf8_lossy(&ls.stdout).trim(),
        format!("{d}\t{}", data.len())
    );
    assert_eq!(
        fs::read_dir(root.path().join("content/ingest"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn wrong_bytes_are_never_published() {
    let root = tmp();
    let store = ContentStore::open(root.path(), true).unwrap();
    let d = Digest::of(b"the right bytes");
    match store.ingest(&d, &b"the wrong bytes"[..], None) {
        Err(ContentError::DigestMismatch { expected, actual }) => {
            assert_eq!(expected, d);
            assert_eq!(actual, Digest::of(b"the wrong bytes"));
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert!(!store.contains(&d));
    // The CLI says so in one line and exits 1.
    let f = write(root.path(), "wrong", b"the wrong bytes");
    let out = Command::new(bin())
        .args(["content", "ingest", &d.to_string()])
        .arg(&f)
        .arg("--root")
        .arg(root.path())
        .output()
        .unwrap();
    let line = err_line(&out);
    assert!(
        line.contains(&d.to_string()) && line.contains("nothing kept"),
        "{line}"
    );
    assert_eq!(content(root.path(), &["ls"]).stdout, b"");
    // Removal.
    assert!(
        store
            .ingest(&Digest::of(b"x"), &b"x"[..], None)
            .unwrap()
            .published
    );
    let rm = content(root.path(), &["rm", &Digest::of(b"x").to_string()]);
    assert!(rm.status.success());
    let rm = content(root.path(), &["rm", &Digest::of(b"x").to_string()]);
    assert!(err_line(&rm).contains("not found"));
}
