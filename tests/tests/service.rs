//! unlade as a node service: the systemd unit in contrib/ verifies, and
//! the snapshotter tells systemd it is ready (`Type=notify`) only once its
//! socket answers, which is what containerd, ordered after it, waits on.

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use unlade_tests::*;

/// contrib/unlade-snapshotter.service, with the binary this build made
/// where the unit says /usr/local/bin/unlade (verify checks that it
/// exists), passes `systemd-analyze verify` without a word.
#[test]
fn the_unit_verifies() {
    let work = tmp();
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/unlade-snapshotter.service");
    let text = std::fs::read_to_string(&unit).expect("read the unit");
    assert!(text.contains("ExecStart=/usr/local/bin/unlade "), "{text}");
    assert!(text.contains("Type=notify") && text.contains("Before=containerd.service"));
    let copy = work.path().join("unlade-snapshotter.service");
    std::fs::write(
        &copy,
        text.replace("/usr/local/bin/unlade", &bin().to_string_lossy()),
    )
    .expect("write");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze (apt-get install systemd)");
    let said = String::from_utf8_lossy(&out.stderr);
    let about_it: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("unlade-snapshotter.service"))
        .collect();
    assert!(out.status.success(), "{said}");
    assert!(about_it.is_empty(), "{about_it:?}");
}

/// With `NOTIFY_SOCKET` set (systemd's `Type=notify`), the snapshotter
/// sends `READY=1` once its socket accepts connections, and `STOPPING=1`
/// when it is asked to stop.
#[test]
fn systemd_hears_ready_once_the_socket_answers() {
    let work = tmp();
    let notify = work.path().join("notify");
    let manager = UnixDatagram::bind(&notify).expect("bind the notify socket");
    manager
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let sock = work.path().join("snap.sock");
    let mut child = Command::new(bin())
        .arg("--root")
        .arg(work.path().join("root"))
        .arg("snapshotter")
        .arg("--address")
        .arg(&sock)
        .env("NOTIFY_SOCKET", &notify)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start unlade snapshotter");
    let mut buf = [0u8; 256];
    let n = manager.recv(&mut buf).expect("READY=1 within a minute");
    assert_eq!(&buf[..n], b"READY=1");
    // By then the socket answers.
    UnixStream::connect(&sock).expect("the socket answers once READY=1 is sent");
    let pid = child.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    let n = manager.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(child.wait().expect("wait").success());
}
