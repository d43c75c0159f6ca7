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

/// `--config FILE`: the daemon's settings from the file, a flag on the
/// command line over it; a bad key stops the start with one line naming
/// it, before anything is made.
#[test]
fn the_config_file_sets_what_flags_do_not() {
    let work = tmp();
    let from_file = work.path().join("from-file.sock");
    let from_flag = work.path().join("from-flag.sock");
    let root = work.path().join("root-from-file");
    let config = work.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "root = {:?}\naddress = {:?}\nmax_pulls = 3\nchunk_size = \"8M\"\n\
             metrics_address = \"127.0.0.1:0\"\nlog_format = \"json\"\nlog_level = \"info\"\n",
            root.to_str().expect("utf8"),
            from_file.to_str().expect("utf8")
        ),
    )
    .expect("write config");
    let serve = |extra: &[&str]| {
        Command::new(bin())
            .arg("snapshotter")
            .arg("--config")
            .arg(&config)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start unlade snapshotter")
    };
    let wait_for = |sock: &Path| {
        let t0 = std::time::Instant::now();
        while UnixStream::connect(sock).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{sock:?} never answered"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // The file's root, address, metrics and log format.
    let mut c = serve(&[]);
    wait_for(&from_file);
    assert!(root.join("containerd").is_dir(), "the file's root");
    c.kill().expect("kill");
    let out = c.wait_with_output().expect("wait");
    let log = String::from_utf8_lossy(&out.stderr);
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["fields"]["message"] == "serving metrics"
                && e["fields"]["address"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("127.0.0.1:"))),
        "{log}"
    );
    // A flag wins.
    let mut c = serve(&["--address", from_flag.to_str().expect("utf8")]);
    wait_for(&from_flag);
    c.kill().expect("kill");
    c.wait().expect("wait");

    std::fs::write(&config, "max_pulls = 3\nmax_pull = 4\n").expect("write");
    let out = serve(&[]).wait_with_output().expect("wait");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("unlade: error: config ")
            && lines[0].contains("line 2")
            && lines[0].contains("max_pull"),
        "{err}"
    );
    std::fs::write(&config, "stall_timeout = 0\n").expect("write");
    let out = serve(&[]).wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("`stall_timeout` = 0"),
        "{err}"
    );
}
