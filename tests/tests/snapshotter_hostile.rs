//! `unlade snapshotter` against hostile and faulty clients and registries:
//! what a local client may send over the socket (oversized records, floods
//! of filters, names planted where the fast path looks), who else on the
//! host may reach the store, a second server on a live socket, a parent
//! removed while the fast path pulls. Each test talks to the real server
//! binary over its socket, as containerd or any gRPC client would.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use unlade_tests::containerd::Server;
use unlade_tests::registry::{demo_chains, demo_layers, demo_registry, Fault};
use unlade_tests::snapclient::{code, labels, Client};
use unlade_tests::*;

const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
const IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";

/// Held by every test here: several assert that calls answer within a
/// second or that a stop takes seconds, which other servers and floods
/// running beside them on a 2-CPU runner would make a race.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A committed snapshot `name` (no parent) holding file `f` with `text`,
/// made through the API as a client would.
fn commit_with_file(c: &Client, name: &str, f: &str, text: &str) {
    let key = format!("{name}-active");
    let m = c.prepare(&key, "", labels(&[])).expect("prepare");
    std::fs::write(Path::new(&m[0].source).join(f), text).expect("write");
    c.commit(name, &key, labels(&[])).expect("commit");
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Runs `sh -c script` as user nobody (uid and gid 65534, no groups).
fn as_nobody(script: &str) -> std::process::Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "sh",
            "-c",
        ])
        .arg(script)
        .output()
        .expect("setpriv")
}

/// Started under umask 000 (a carelessly written unit), the server still
/// keeps the root, every store directory and the socket private; an
/// unprivileged user reaches none of it: not the records, not a
/// snapshot's files, not the socket.
#[test]
fn an_unprivileged_user_reaches_nothing() {
    let _serial = serial();
    let t = tmp();
    // Traversable down to the root, so that the root's own mode is what
    // stops a user.
    let base = t.path().join("base");
    std::fs::create_dir(&base).unwrap();
    sh(Command::new("chmod").arg("0755").arg(t.path()).arg(&base));
    let root = base.join("root");
    let sock = base.join("run/unlade/snapshotter.sock");
    let mut s = Server::start_in_umask(&root, &sock, &["--no-fast-path"], 0o000);
    let c = Client::connect(&sock);
    commit_with_file(&c, "secret-layer", "secret", "only root reads this");
    c.prepare("work", "secret-layer", labels(&[]))
        .expect("prepare");
    let fs_dir = root
        .join("containerd/snapshots")
        .join(hash32("secret-layer"))
        .join("fs");
    assert!(fs_dir.join("secret").exists());

    assert_eq!(mode(&root), 0o700);
    for d in [
        "containerd",
        "containerd/snapshots",
        "snapshots",
        "content",
        "images",
    ] {
        assert_eq!(mode(&root.join(d)), 0o700, "{d}");
    }
    assert_eq!(mode(&sock), 0o600);
    assert_eq!(mode(sock.parent().unwrap()), 0o711);
    assert_eq!(mode(&base.join("run")), 0o711);

    // The control: nobody can reach the directory above the root.
    let ok = as_nobody(&format!("ls {}", base.display()));
    assert!(ok.status.success(), "{ok:?}");
    for attempt in [
        format!("ls {}", root.display()),
        format!("ls {}", root.join("containerd/snapshots").display()),
        format!("cat {}", fs_dir.join("secret").display()),
        format!("ls {}", root.join("snapshots/committed").display()),
        format!(
            "/usr/bin/python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); s.connect(\"{}\")'",
            sock.display()
        ),
    ] {
        let out = as_nobody(&attempt);
        assert!(
            !out.status.success(),
            "as nobody, `{attempt}` worked: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert!(s.terminate().success());
}

/// The first 32 hex digits of SHA-256 of `name`: a snapshot's directory.
fn hash32(name: &str) -> String {
    sha256(name.as_bytes())[7..39].to_string()
}

/// A second server on a live socket stops before it creates anything (its
/// root included) and never says it is serving; the first keeps serving.
#[test]
fn a_second_server_on_a_live_socket_makes_nothing() {
    let _serial = serial();
    let t = tmp();
    let sock = t.path().join("s.sock");
    let first = Server::start(&t.path().join("root"), &sock);
    let other = t.path().join("other-root");
    let out = Command::new(bin())
        .arg("--root")
        .arg(&other)
        .arg("snapshotter")
        .arg("--address")
        .arg(&sock)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");
    assert!(!err.contains("serving"), "{err}");
    assert!(!other.exists(), "the second server made its root");
    let c = Client::connect(&first.sock);
    c.prepare("k", "", labels(&[]))
        .expect("the first still serves");
}

/// What one request may carry is bounded before it costs anything:
/// messages over the decoding limit, millions of filters, labels whose
/// record would not read back, update masks of thousands of paths. Each is
/// refused with one clear status, and the server answers the next call.
#[test]
fn oversized_requests_are_refused_and_the_server_goes_on() {
    let _serial = serial();
    let t = tmp();
    let s = Server::start(&t.path().join("root"), &t.path().join("s.sock"));
    let c = Client::connect(&s.sock);
    commit_with_file(&c, "base", "f", "x");

    // 3 MiB of labels: over the message limit, refused from its length.
    let huge: std::collections::HashMap<String, String> = (0..768)
        .map(|i| (format!("k{i}"), "v".repeat(4000)))
        .collect();
    let e = c.prepare("huge", "", huge).expect_err("3 MiB Prepare");
    assert_ne!(e.code, -1, "a status, not a dropped connection: {e:?}");

    // 256 labels of 4,096 control characters pass each label's check,
    // but their record would be 6 MB: refused, and List still works.
    let ctl: std::collections::HashMap<String, String> = (0..256)
        .map(|i| {
            let k = format!("k{i:03}");
            let v = "\u{1}".repeat(4096 - k.len());
            (k, v)
        })
        .collect();
    let e = c
        .prepare("ctl", "base", ctl.clone())
        .expect_err("record too big");
    assert_eq!(e.code, code::INVALID_ARGUMENT, "{e:?}");
    c.prepare("act", "base", labels(&[])).expect("prepare");
    let e = c
        .update("act", ctl.clone(), vec![])
        .expect_err("update too big");
    assert_eq!(e.code, code::INVALID_ARGUMENT, "{e:?}");
    let e = c.commit("done", "act", ctl).expect_err("commit too big");
    assert_eq!(e.code, code::INVALID_ARGUMENT, "{e:?}");
    let names: Vec<String> = c
        .list(&[])
        .expect("list")
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    c.remove("act").expect("remove");

    // Half a million one-byte filters (1.5 MB): refused at once.
    let t0 = Instant::now();
    let e = c
        .list(&vec!["a".to_string(); 500_000])
        .expect_err("too many filters");
    assert_eq!(e.code, code::INVALID_ARGUMENT, "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());

    let paths: Vec<String> = (0..10_000).map(|i| format!("labels.k{i}")).collect();
    let e = c.update("base", labels(&[]), paths).expect_err("mask");
    assert_eq!(e.code, code::INVALID_ARGUMENT, "{e:?}");

    assert_eq!(c.stat("base").expect("stat").name, "base");
}

fn fast_server(dir: &Path) -> Server {
    let none = dir.join("no-hosts");
    Server::start_with(
        &dir.join("root"),
        &dir.join("s.sock"),
        &["--plain-http", "--hosts-dir", none.to_str().unwrap()],
    )
}

/// The fast path adopts only snapshots it made itself, for the chain it
/// made them for: a snapshot a client committed under the chain's name,
/// with its own files, is never answered as that layer (the Prepare goes
/// on as a plain one), and the layer's tree is unlade's pull of it.
#[test]
fn the_fast_path_adopts_only_its_own_snapshots() {
    let _serial = serial();
    let (_reg, proxy) = demo_registry();
    let t = tmp();
    let s = fast_server(t.path());
    let c = Client::connect(&s.sock);
    let chains = demo_chains();
    let image = format!("{}/demo:latest", proxy.addr);
    commit_with_file(&c, &chains[0], "planted", "not the image's");
    let ask = labels(&[(SNAPSHOT_REF, &chains[0]), (IMAGE_REF, &image)]);
    let m = c
        .prepare("extract-0", "", ask.clone())
        .expect("a plain Prepare");
    assert!(
        !Path::new(&m[0].source).join("planted").exists(),
        "a fresh active snapshot"
    );
    c.remove("extract-0").expect("remove");
    c.remove(&chains[0]).expect("remove the planted one");
    // Now the fast path makes the layer: its tree is the image's.
    let e = c.prepare("extract-0", "", ask).expect_err("adopted");
    assert_eq!(e.code, code::ALREADY_EXISTS, "{e:?}\n{}", s.log());
    let v = c.view("v", &chains[0]).expect("view");
    let tree = Path::new(&v[0].source);
    assert!(tree.join("bin").exists(), "{}", tree.display());
    assert!(!tree.join("planted").exists());
    // Its usage, measured when first asked (not while the pull waited),
    // then kept in its record.
    let (bytes, inodes) = c.usage(&chains[0]).expect("usage");
    assert!(
        bytes > 4096 && inodes > 10,
        "{bytes} bytes, {inodes} inodes"
    );
    assert_eq!(c.usage(&chains[0]).expect("usage"), (bytes, inodes));
    let rec = std::fs::read_to_string(
        t.path()
            .join("root/containerd/snapshots")
            .join(hash32(&chains[0]))
            .join("info.json"),
    )
    .expect("record");
    assert!(rec.contains(&format!("\"inodes\":{inodes}")), "{rec}");
}

/// A parent removed while the fast path pulls the layer above it: the
/// pull's snapshot is not published on a parent that is gone (NotFound),
/// and nothing names the removed parent.
#[test]
fn a_parent_removed_during_a_fast_path_pull_is_not_adopted_onto() {
    let _serial = serial();
    let (reg, proxy) = demo_registry();
    let t = tmp();
    let s = fast_server(t.path());
    let c = Client::connect(&s.sock);
    let chains = demo_chains();
    let image = format!("{}/demo:latest", proxy.addr);
    commit_with_file(&c, "parent", "f", "x");
    // Held after the first 100 kB of the base layer.
    proxy.fault(Fault::Stall(demo_layers(&reg)[0].clone(), 100_000));
    let sock = s.sock.clone();
    let target = chains[0].clone();
    let pending = std::thread::spawn(move || {
        let c2 = Client::connect(&sock);
        c2.prepare(
            "extract",
            "parent",
            labels(&[(SNAPSHOT_REF, &target), (IMAGE_REF, &image)]),
        )
    });
    let t0 = Instant::now();
    while !proxy.stalled.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(t0.elapsed() < Duration::from_secs(60), "no stall");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.remove("parent").expect("no child yet");
    proxy.release();
    let e = pending.join().unwrap().expect_err("parent gone");
    assert_eq!(e.code, code::NOT_FOUND, "{e:?}");
    let names: Vec<String> = c
        .list(&[])
        .expect("list")
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

// A hostile registry: silent, trickling, lying about sizes. The fast
// path's pulls run apart from the store's calls, within their limits, and
// a stall ends them: the Prepares fall back to containerd (plain Prepares,
// mounts returned), never fail; other calls answer within a second
// meanwhile.

fn fast_server_with(dir: &Path, extra: &[&str]) -> Server {
    let none = dir.join("no-hosts");
    let mut args = vec!["--plain-http", "--hosts-dir", none.to_str().unwrap()];
    args.extend_from_slice(extra);
    Server::start_with(&dir.join("root"), &dir.join("s.sock"), &args)
}

/// What a Prepare in the background answered: how long it took, and its
/// mounts' count or its error.
type Answer = (Duration, Result<usize, unlade_tests::snapclient::Status>);

/// Runs `n` fast-path Prepares (key `{tag}-{i}`) of `image`'s chain
/// `chain` on connections of their own, in the background.
fn pending_prepares(
    sock: &Path,
    n: usize,
    tag: &str,
    image: &str,
    chain: &str,
) -> Vec<std::thread::JoinHandle<Answer>> {
    (0..n)
        .map(|i| {
            let (sock, image, chain) = (sock.to_path_buf(), image.to_string(), chain.to_string());
            let key = format!("{tag}-{i}");
            std::thread::spawn(move || {
                let c = Client::connect(&sock);
                let t0 = Instant::now();
                let r = c
                    .prepare(
                        &key,
                        "",
                        labels(&[(SNAPSHOT_REF, &chain), (IMAGE_REF, &image)]),
                    )
                    .map(|m| m.len());
                (t0.elapsed(), r)
            })
        })
        .collect()
}

/// Stat, List, a plain Prepare, Commit and Remove on `c`, each answered
/// within a second, `rounds` times.
fn other_calls_answer_within_a_second(c: &Client, rounds: usize, tag: &str) {
    let limit = Duration::from_secs(1);
    for i in 0..rounds {
        let t0 = Instant::now();
        c.stat("base").expect("stat");
        c.list(&[]).expect("list");
        let key = format!("{tag}-plain-{i}");
        c.prepare(&key, "base", labels(&[])).expect("prepare");
        c.commit(&format!("{key}-c"), &key, labels(&[]))
            .expect("commit");
        c.remove(&format!("{key}-c")).expect("remove");
        let took = t0.elapsed();
        assert!(took < limit * 5, "five calls took {took:?}");
        let t1 = Instant::now();
        c.stat("base").expect("stat");
        assert!(t1.elapsed() < limit, "a Stat took {:?}", t1.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A registry that accepts connections and never answers: twenty CRI
/// Prepares naming it (one pull, shared) hold no thread the store needs,
/// so other calls answer within a second; once the registry has been
/// silent for the stall timeout they fall back together (plain Prepares
/// with mounts, for containerd to fetch the layer itself), after one pull.
/// Six more images on it wait for its two slots while a healthy
/// registry's image is pulled at once.
#[test]
fn a_silent_registry_stalls_nothing_else() {
    let _serial = serial();
    let (_reg, healthy) = demo_registry();
    let (_reg2, silent) = demo_registry();
    silent.fault(Fault::Hang("/v2/".into()));
    let t = tmp();
    let s = fast_server_with(
        t.path(),
        &["--stall-timeout", "4", "--max-pulls-per-registry", "2"],
    );
    let c = Client::connect(&s.sock);
    commit_with_file(&c, "base", "f", "x");
    let chains = demo_chains();
    let silent_image = format!("{}/demo:latest", silent.addr);
    // A chain no pull here makes (the healthy registry's image would make
    // the demo image's, and the silent one's Prepares would then adopt it).
    let unmade = format!("sha256:{}", &sha256(b"not made by the healthy pull")[7..]);
    let twenty = pending_prepares(&s.sock, 20, "same", &silent_image, &unmade);
    // Six other images of the silent registry (tags it would have).
    let six: Vec<_> = (0..6)
        .flat_map(|i| {
            pending_prepares(
                &s.sock,
                1,
                &format!("other{i}"),
                &format!("{}/demo:v{i}", silent.addr),
                &unmade,
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    other_calls_answer_within_a_second(&c, 10, "during");
    // The healthy registry's image, meanwhile: pulled at once, not after
    // the silent registry's stall timeout.
    let t0 = Instant::now();
    let e = c
        .prepare(
            "healthy",
            "",
            labels(&[
                (SNAPSHOT_REF, &chains[0]),
                (IMAGE_REF, &format!("{}/demo:latest", healthy.addr)),
            ]),
        )
        .expect_err("adopted");
    assert_eq!(e.code, code::ALREADY_EXISTS, "{e:?}\n{}", s.log());
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "the healthy pull waited for the silent registry: {:?}",
        t0.elapsed()
    );
    for h in twenty {
        let (took, r) = h.join().unwrap();
        let mounts = r.expect("the silent registry's layer falls back to containerd");
        assert_eq!(mounts, 1);
        assert!(took < Duration::from_secs(20), "{took:?}");
    }
    for h in six {
        let (_, r) = h.join().unwrap();
        // Queued behind the silent registry's two slots, then fallen back.
        assert_eq!(r.expect("fallen back"), 1);
    }
    // One pull for the twenty (a document request tried twice by the stall
    // rule at most), and one line for each Prepare naming image, layer
    // and reason.
    let manifest_gets = silent
        .seen()
        .iter()
        .filter(|r| r.path.contains("/manifests/latest"))
        .count();
    assert!(
        manifest_gets <= 2,
        "{manifest_gets} requests of the manifest"
    );
    let log = s.log();
    let fell = log
        .lines()
        .filter(|l| l.contains(&silent_image) && l.contains("falls back to containerd"))
        .collect::<Vec<_>>();
    assert_eq!(fell.len(), 20, "{log}");
    assert!(fell.iter().all(|l| l.contains(&unmade)), "{log}");
}

/// SIGTERM with twenty Prepares waiting on a silent registry (whose stall
/// timeout is far off): the server stops within seconds, exit 0, the
/// Prepares answered, the socket gone, nothing half-made in the root.
#[test]
fn sigterm_stops_the_server_whatever_is_in_flight() {
    let _serial = serial();
    let (_reg, silent) = demo_registry();
    silent.fault(Fault::Hang("/v2/".into()));
    let t = tmp();
    let mut s = fast_server_with(t.path(), &["--stall-timeout", "600"]);
    let chains = demo_chains();
    let pending = pending_prepares(
        &s.sock,
        20,
        "p",
        &format!("{}/demo:latest", silent.addr),
        &chains[0],
    );
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    let st = s.terminate();
    let took = t0.elapsed();
    assert!(st.success(), "{st:?}\n{}", s.log());
    assert!(took < Duration::from_secs(4), "stopped in {took:?}");
    // Answered: fallen back to a plain Prepare while the server still
    // served, or cut off by its stop.
    let fell_back = pending
        .into_iter()
        .map(|h| h.join().unwrap().1)
        .filter(|r| r.is_ok())
        .count();
    assert!(!s.sock.exists());
    let root = t.path().join("root");
    let count = |p: &str| std::fs::read_dir(root.join(p)).map_or(0, |d| d.count());
    // Nothing but the plain snapshots of the Prepares that fell back.
    assert!(count("containerd/snapshots") <= fell_back, "{fell_back}");
    assert_eq!(count("containerd/tmp"), 0);
    assert_eq!(count("snapshots/committed"), 0);
    let holds: Vec<String> = std::fs::read_dir(root.join("snapshots/holds"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(holds.is_empty(), "{holds:?}");
}

/// A registry that trickles a blob (a byte every 200 ms: it never goes
/// silent long enough for a read to time out) ends the pull by the
/// minimum-progress rule within the stall timeout, instead of holding it
/// for as long as it likes; one that sends a terabyte of zeros for a
/// 6 MB layer ends it at once, without filling the disk. The Prepares fall
/// back to containerd, the log saying why; nothing of either layer is
/// committed or left in the ingest directory, and other calls answer
/// meanwhile.
#[test]
fn a_trickling_or_lying_registry_fails_the_pull() {
    let _serial = serial();
    for fault in ["trickle", "endless"] {
        let (reg, proxy) = demo_registry();
        let blob = demo_layers(&reg)[0].clone();
        proxy.fault(match fault {
            "trickle" => Fault::Trickle(blob.clone(), Duration::from_millis(200)),
            _ => Fault::Endless(blob.clone()),
        });
        let t = tmp();
        let s = fast_server_with(t.path(), &["--stall-timeout", "3"]);
        let c = Client::connect(&s.sock);
        commit_with_file(&c, "base", "f", "x");
        let chains = demo_chains();
        let t0 = Instant::now();
        let pending = pending_prepares(
            &s.sock,
            3,
            fault,
            &format!("{}/demo:latest", proxy.addr),
            &chains[0],
        );
        other_calls_answer_within_a_second(&c, 5, fault);
        for h in pending {
            let (_, r) = h.join().unwrap();
            assert_eq!(r.expect(fault), 1, "{fault}");
        }
        // The trickle is the stall rule's; the terabyte fails on the
        // descriptor's size or on its first bytes, whichever the pull
        // meets first.
        let log = s.log();
        let fell = log
            .lines()
            .filter(|l| l.contains("falls back to containerd"))
            .collect::<Vec<_>>();
        assert_eq!(fell.len(), 3, "{fault}: {log}");
        if fault == "trickle" {
            assert!(fell.iter().all(|l| l.contains("less than")), "{log}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{fault}: {:?}",
            t0.elapsed()
        );
        let root = t.path().join("root");
        assert!(
            std::fs::read_dir(root.join("snapshots/committed"))
                .unwrap()
                .next()
                .is_none(),
            "{fault}: a layer was committed"
        );
        assert!(
            std::fs::read_dir(root.join("content/ingest"))
                .unwrap()
                .next()
                .is_none(),
            "{fault}: ingest files left"
        );
    }
}

/// A Prepare whose client goes away (containerd cancelled, or died)
/// while the fast path pulls: nobody else waits for that pull, so it is
/// cancelled and its adoption's hold released, within a second or two.
#[test]
fn a_client_going_away_cancels_its_pull() {
    let _serial = serial();
    let (_reg, silent) = demo_registry();
    silent.fault(Fault::Hang("/v2/".into()));
    let t = tmp();
    let s = fast_server_with(t.path(), &["--stall-timeout", "600"]);
    let chains = demo_chains();
    {
        let c = Client::connect(&s.sock);
        let image = format!("{}/demo:latest", silent.addr);
        let r = c.within(
            Duration::from_secs(1),
            c.conn
                .call::<unlade_tests::snapclient::pb::PrepareSnapshotResponse>(
                    "Prepare",
                    &unlade_tests::snapclient::pb::PrepareSnapshotRequest {
                        snapshotter: "unlade".into(),
                        key: "gone".into(),
                        parent: String::new(),
                        labels: labels(&[(SNAPSHOT_REF, &chains[0]), (IMAGE_REF, &image)]),
                    },
                ),
        );
        assert!(r.is_err(), "still pulling");
        // The client's runtime and connection go here.
    }
    let t0 = Instant::now();
    while !s.log().contains("no Prepare waits for it") {
        assert!(t0.elapsed() < Duration::from_secs(5), "{}", s.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let holds = t.path().join("root/snapshots/holds");
    while std::fs::read_dir(&holds).unwrap().next().is_some() {
        assert!(t0.elapsed() < Duration::from_secs(5), "hold left");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// Hostile clients: a flood of calls, a slow client that never finishes
// its request, clients that disconnect with calls in flight.

/// An HTTP/2 client that opens a Stat call and sends two of the five
/// bytes of its message, then nothing: a request that never completes.
fn half_a_request(sock: &Path) -> std::os::unix::net::UnixStream {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    let frame = |ty: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = Vec::new();
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        f.push(ty);
        f.push(flags);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let path = b"/containerd.services.snapshots.v1.Snapshots/Stat";
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    block.push(0x04); // :path, literal, name indexed
    block.push(path.len() as u8);
    block.extend_from_slice(path);
    block.extend_from_slice(&[0x01, 9]);
    block.extend_from_slice(b"localhost");
    block.extend_from_slice(&[0x0f, 0x10, 16]); // content-type
    block.extend_from_slice(b"application/grpc");
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    s.write_all(&frame(4, 0, 0, &[])).unwrap();
    s.write_all(&frame(1, 0x4, 1, &block)).unwrap();
    s.write_all(&frame(0, 0, 1, &[0, 0])).unwrap();
    s
}

/// One client process floods the server with a thousand calls in flight
/// on one connection; a connection keeps a request half-sent; another
/// sends hundreds of Prepares and disconnects at once. Meanwhile another
/// client process's calls (this test's) each answer within a second;
/// afterwards the store holds only what completed calls made; SIGTERM
/// stops the server within its grace although the half-sent request is
/// still open.
#[test]
fn hostile_clients_leave_the_others_answered() {
    let _serial = serial();
    let t = tmp();
    let mut s = Server::start_with(
        &t.path().join("root"),
        &t.path().join("s.sock"),
        &["--no-fast-path"],
    );
    let c = Client::connect(&s.sock);
    commit_with_file(&c, "base", "f", "x");

    // The flood, from another process (clients are told apart by their
    // process): 1,000 calls in flight on one connection, for 4 s.
    let flood = Command::new("/usr/bin/python3")
        .arg(tools_dir().join("flood.py"))
        .arg(&s.sock)
        .args(["base", "4", "1000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("flood.py");
    let _slow = half_a_request(&s.sock);
    // The disconnecting client: 300 Prepares, then gone.
    {
        let d = Client::connect(&s.sock);
        let conn = d.conn.clone();
        d.rt.block_on(async move {
            for i in 0..300 {
                let conn = conn.clone();
                tokio::spawn(async move {
                    use prost::Message;
                    let req = unlade_tests::snapclient::pb::PrepareSnapshotRequest {
                        snapshotter: "unlade".into(),
                        key: format!("gone-{i}"),
                        parent: "base".into(),
                        labels: Default::default(),
                    };
                    let _ = conn.call_raw("Prepare", req.encode_to_vec()).await;
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        });
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut worst = Duration::ZERO;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let t0 = Instant::now();
        c.stat("base").expect("stat");
        c.list(&["name==base".into()]).expect("list");
        worst = worst.max(t0.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = flood.wait_with_output().expect("flood.py");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ok: usize = text
        .split_whitespace()
        .next()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    assert!(ok > 0, "the flood's calls ran too: {text}");
    eprintln!("flood: {text}; the slowest Stat and List of another client: {worst:?}");
    assert!(
        worst < Duration::from_secs(1),
        "a Stat and a List took {worst:?}"
    );

    // What the completed calls made, and nothing half-made.
    let names: Vec<String> = c.list(&[]).unwrap().into_iter().map(|i| i.name).collect();
    assert!(
        names.iter().all(|n| n == "base" || n.starts_with("gone-")),
        "{names:?}"
    );
    let root = t.path().join("root");
    assert_eq!(
        std::fs::read_dir(root.join("containerd/tmp"))
            .unwrap()
            .count(),
        0
    );

    let t0 = Instant::now();
    let st = s.terminate();
    assert!(st.success(), "{st:?}");
    assert!(
        t0.elapsed() < unlade::containerd::STOP_GRACE + Duration::from_secs(2),
        "{:?}",
        t0.elapsed()
    );
}

/// A current gRPC C-core client (Python grpcio) that sends the socket's
/// path as `:authority`, as grpcio ≥ 1.8x does for `unix:` targets, is
/// served like any other (h2 alone resets such streams).
#[test]
fn a_client_sending_the_socket_path_as_authority_is_served() {
    let _serial = serial();
    let t = tmp();
    let s = Server::start_with(
        &t.path().join("root"),
        &t.path().join("s.sock"),
        &["--no-fast-path"],
    );
    let c = Client::connect(&s.sock);
    commit_with_file(&c, "base", "f", "x");
    let script = r#"
import grpc, sys
sock = sys.argv[1]
def field(n, p): return bytes([n << 3 | 2, len(p)]) + p
for authority in [sock, "unix:" + sock, "%2Frun%2Fx.sock", None]:
    opts = [("grpc.default_authority", authority)] if authority else []
    ch = grpc.insecure_channel("unix://" + sock, options=opts)
    stat = ch.unary_unary("/containerd.services.snapshots.v1.Snapshots/Stat")
    resp = stat(field(1, b"unlade") + field(2, b"base"), timeout=10)
    assert b"base" in resp, resp
    try:
        stat(field(1, b"unlade") + field(2, b"missing"), timeout=10)
        sys.exit("a missing snapshot was found")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, (authority, e.code(), e.details())
print("ok")
"#;
    let out = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .arg(&s.sock)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Labels naming an image that has no layer of the chain they name: the
/// image is resolved and left, no layer is fetched or applied, no hold
/// stays, and the Prepare goes on as a plain one (containerd unpacks the
/// layer itself).
#[test]
fn labels_naming_an_image_without_the_chain_pull_nothing() {
    let _serial = serial();
    let (reg, proxy) = demo_registry();
    let t = tmp();
    let s = fast_server(t.path());
    let c = Client::connect(&s.sock);
    let bogus = format!("sha256:{}", &sha256(b"no such layer")[7..]);
    let m = c
        .prepare(
            "extract",
            "",
            labels(&[
                (SNAPSHOT_REF, &bogus),
                (IMAGE_REF, &format!("{}/demo:latest", proxy.addr)),
            ]),
        )
        .expect("a plain Prepare");
    assert_eq!(m[0].r#type, "bind");
    assert!(
        proxy.blob_gets(&demo_layers(&reg)[0]).is_empty(),
        "{:?}",
        proxy.seen()
    );
    let root = t.path().join("root");
    assert!(std::fs::read_dir(root.join("snapshots/committed"))
        .unwrap()
        .next()
        .is_none());
    assert!(std::fs::read_dir(root.join("snapshots/holds"))
        .unwrap()
        .next()
        .is_none());
    assert!(s.log().contains("has no layer of chain"), "{}", s.log());
}

/// unlade's CRI proxy, containerd not there: each call answers at once
/// (`Unavailable`), a request over 4 MiB is refused from its length, a
/// method of another service is `Unimplemented`, and the proxy goes on
/// answering; its socket is 0600.
#[test]
fn the_cri_proxy_bounds_its_calls_and_goes_on() {
    use std::os::unix::fs::PermissionsExt;
    let _serial = serial();
    let t = tmp();
    let proxy = t.path().join("cri.sock");
    let s = Server::start_with(
        &t.path().join("root"),
        &t.path().join("s.sock"),
        &[
            "--cri-listen",
            proxy.to_str().expect("utf8"),
            "--cri-upstream",
            t.path().join("no-containerd.sock").to_str().expect("utf8"),
        ],
    );
    let mode = std::fs::metadata(&proxy)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let c = Client::connect(&proxy);
    let call = |path: &str, body: Vec<u8>| {
        let t0 = Instant::now();
        let r = c.within(Duration::from_secs(20), c.conn.call_path(path, body));
        (t0.elapsed(), r)
    };
    let fsinfo = "/runtime.v1.ImageService/ImageFsInfo";
    for _ in 0..2 {
        let (took, r) = call(fsinfo, Vec::new());
        let e = r.expect_err("no containerd");
        assert_eq!(e.code, code::UNAVAILABLE, "{e:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        // A PullImage of 5 MiB: refused from its length.
        let (_, r) = call("/runtime.v1.ImageService/PullImage", vec![0x0a; 5 << 20]);
        let e = r.expect_err("too large");
        assert!(e.code == 8 || e.code == 11, "{e:?}");
        // Not the image service: not forwarded.
        let (_, r) = call("/runtime.v1.RuntimeService/Version", Vec::new());
        assert_eq!(r.expect_err("unimplemented").code, 12);
    }
    let (_, r) = call("/runtime.v1alpha2.ImageService/ImageFsInfo", Vec::new());
    assert_eq!(r.expect_err("no containerd").code, code::UNAVAILABLE);
    assert!(s.log().lines().count() <= 3, "{}", s.log());
}
