//! containerd's own snapshotter conformance suite (`snapshots/testsuite`
//! of containerd 1.6.20, from Debian's golang-github-containerd-containerd-dev)
//! against `unlade snapshotter`, through containerd's proxy client, as a
//! `[proxy_plugins]` snapshotter is used: every case passes (the suite
//! skips `Rename` itself, on every snapshotter). See
//! `tests/conformance/run.sh`.

use std::path::Path;
use std::process::Command;

use unlade_tests::*;

#[test]
fn containerd_snapshotter_suite_passes_whole() {
    let t = tmp();
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(here.join("conformance/run.sh"))
        .arg(t.path())
        .arg(bin())
        // Go's build cache, kept between runs.
        .env(
            "GOCACHE",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("gocache"),
        )
        .output()
        .expect("run tests/conformance/run.sh");
    let text = String::from_utf8_lossy(&out.stdout);
    let log = std::fs::read_to_string(t.path().join("test.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "{text}\n{}\n--- log (tail):\n{}",
        String::from_utf8_lossy(&out.stderr),
        &log[log.len().saturating_sub(8000)..]
    );
    let verdict = |v: &str| text.lines().filter(|l| l.starts_with(v)).count();
    assert_eq!(verdict("FAIL "), 0, "{text}");
    // The suite's 21 cases: all but the one it skips itself pass.
    assert_eq!(verdict("PASS "), 20, "{text}");
    assert!(text.lines().any(|l| l.starts_with("SKIP Rename")), "{text}");
}
