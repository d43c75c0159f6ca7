//! SIGINT and SIGTERM during `unlade unpack`, sent while a layer is being
//! applied: the command stops promptly, exits 130 / 143 with one stderr
//! line, commits nothing of the interrupted layer, leaves no active
//! snapshot and no ingest file, and the next run completes the image.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};
use unlade_tests::*;

fn entries(dir: &Path) -> Vec<String> {
    match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("{}: {e}", dir.display()),
    }
}

/// Whether some active snapshot of `root` has files of directory `dir`
/// of the layer written: its apply is under way.
fn mid_apply(root: &Path, dir: &str) -> bool {
    entries(&root.join("snapshots/active"))
        .iter()
        .any(|id| entries(&root.join("snapshots/active").join(id).join("fs").join(dir)).len() >= 20)
}

fn interrupted_unpack_commits_nothing_and_reruns(sig: Signal, code: i32, name: &str) {
    let w = tmp();
    let base = many_files(50, 256, 1, MT_TAR);
    let big = many_files(40_000, 256, 2, MT_GZ);
    let layout = w.path().join("layout");
    let chains = image_layout(&layout, &[("t", &[&base, &big])]).remove(0);
    let root = w.path().join("root");
    let layout_ref = format!("{}:t", layout.display());

    let mut child = Command::new(bin())
        .arg("unpack")
        .arg(&layout_ref)
        .arg("--root")
        .arg(&root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn unlade");
    // Until the big layer's files are being written (polled: no sleep
    // decides it).
    let started = Instant::now();
    while !mid_apply(&root, "s2-d0") {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("unlade ended before the apply was caught: {st}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no apply started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let sent = Instant::now();
    kill_process(Pid::from_child(&child), sig).expect("kill");
    let out = child.wait_with_output().expect("wait unlade");
    let took = sent.elapsed();

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{name}: status {}, stderr {stderr:?}",
        out.status
    );
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [format!(
            "unlade: interrupted ({name}): nothing half-done was committed"
        )],
        "{name}: stderr"
    );
    assert!(
        took < Duration::from_secs(20),
        "{name}: took {took:?} to stop"
    );
    // The interrupted layer was not committed (the base may have been:
    // it was whole), nothing is being applied, no blob is half-written,
    // and no image was recorded.
    let committed = entries(&root.join("snapshots/committed"));
    assert!(
        !committed.contains(&chains[1][7..].to_string()),
        "{name}: the interrupted layer was committed"
    );
    for c in &committed {
        assert_eq!(c, &chains[0][7..], "{name}: unexpected snapshot");
    }
    assert_eq!(
        entries(&root.join("snapshots/active")),
        Vec::<String>::new(),
        "{name}: active leftovers"
    );
    assert_eq!(
        entries(&root.join("content/ingest")),
        Vec::<String>::new(),
        "{name}: ingest leftovers"
    );
    assert_eq!(
        entries(&root.join("images")),
        Vec::<String>::new(),
        "{name}: image recorded"
    );

    // The next run completes the image.
    let again = unpack(&layout_ref, &root, &[]);
    assert_eq!(last_line(&again), chains[1], "{name}: rerun");
    assert!(String::from_utf8_lossy(&again.stderr).is_empty());
    let mut committed = entries(&root.join("snapshots/committed"));
    committed.sort();
    let mut want: Vec<String> = chains.iter().map(|c| c[7..].to_string()).collect();
    want.sort();
    assert_eq!(committed, want, "{name}: after the rerun");
    assert_eq!(
        entries(&root.join("snapshots/active")),
        Vec::<String>::new()
    );
}

#[test]
fn sigint_mid_apply_exits_130_and_the_next_run_completes() {
    interrupted_unpack_commits_nothing_and_reruns(Signal::INT, 130, "SIGINT");
}

#[test]
fn sigterm_mid_apply_exits_143_and_the_next_run_completes() {
    interrupted_unpack_commits_nothing_and_reruns(Signal::TERM, 143, "SIGTERM");
}
