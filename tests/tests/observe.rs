//! What an operator sees of `unlade snapshotter` on a node, against the
//! real containerd (sid's 2.1, CRI pulling through the transfer service):
//!
//! - its Prometheus metrics (`--metrics-address 127.0.0.1:0`), scraped
//!   after a CRI pull through unlade's CRI proxy, agree with the pull: the
//!   bytes fetched are the layer blobs' sizes, one fast-path pull, every
//!   layer applied, fetched and timed per stage once, one forwarded
//!   PullImage answered OK; after a pull from a registry unlade cannot
//!   reach, one pull fell back, with its reason;
//! - its logs as JSON (`--log-format json`): one object a line, the pull's
//!   one summary event with the same numbers, the fallback's event with
//!   its reason;
//! - a client whose Prepare labels lie (a "layer" the manifest does not
//!   list, a manifest containerd does not have) gets no blob handed off:
//!   each refusal counted and logged, containerd's store unchanged;
//! - `--blobs discard`: the layer blobs go nowhere once containerd adopted
//!   their snapshots (unlade's store keeps none, containerd's has none);
//! - a containerd socket that refuses the hand-off or never answers it
//!   costs the hand-off only: pulls are answered as before, unlade keeps
//!   the blobs, the failures are counted and logged;
//! - the metrics endpoint holds up to a hostile scraper: a silent
//!   connection does not keep others from scraping, a request head past
//!   the limit is refused, any other path is 404.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use unlade_tests::containerd::{blobs_kept, write_plain_http_hosts, Containerd, Options, Version};
use unlade_tests::registry::{demo_chains, demo_layer_blobs, demo_manifest, demo_registry, Proxy};
use unlade_tests::snapclient::{code, labels, Client};
use unlade_tests::*;

/// The server's log as JSON objects, one a line; every line must be one.
fn events(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line: {l:?}: {e}")))
        .collect()
}

/// The events whose message is `message`.
fn named(log: &str, message: &str) -> Vec<serde_json::Value> {
    events(log)
        .into_iter()
        .filter(|e| e["fields"]["message"] == message)
        .collect()
}

/// One HTTP/1.1 request `head` to `addr`; the whole answer.
fn http(addr: &str, head: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics address");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    // A server that refuses a long head may close before it is all sent.
    let _ = s.write_all(head.as_bytes());
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// A scrape of `/metrics`: sample lines (no comments) by series.
fn scrape(addr: &str) -> std::collections::BTreeMap<String, f64> {
    let answer = http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: unlade\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("content-type: text/plain"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).expect("a body");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').expect("series value");
            (k.to_string(), v.parse().expect("a number"))
        })
        .collect()
}

fn value(m: &std::collections::BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no {series} in {m:#?}"))
}

/// containerd `version` with unlade on `root` as its snapshotter, unlade
/// reaching the registries `plain` over plain HTTP by a hosts.toml in
/// `dir` (containerd too) and started with `args`.
fn start(
    version: Version,
    dir: &Path,
    root: &Path,
    plain: &[&Proxy],
    args: &[&str],
    cri_proxy: bool,
) -> Containerd {
    let hosts = dir.join(format!("unlade-hosts-{}", plain[0].addr.replace(':', "_")));
    write_plain_http_hosts(&hosts, &plain[0].addr);
    let mut server_args = vec![
        "--hosts-dir".to_string(),
        hosts.to_str().expect("utf8").into(),
    ];
    server_args.extend(args.iter().map(|a| a.to_string()));
    Containerd::start_version(
        version,
        root,
        &Options {
            server_args,
            plain_http: plain.iter().map(|p| p.addr.clone()).collect(),
            containerd_root: None,
            cri_proxy,
        },
    )
}

/// The layer blobs of `layers` that unlade's store at `root` holds.
fn kept(root: &Path, layers: &[(String, u64)]) -> usize {
    blobs_kept(root, layers.iter().map(|l| l.0.as_str()))
}

#[test]
fn metrics_and_logs_tell_what_a_pull_did() {
    let version = Version::V2_1Transfer;
    let (reg, proxy) = demo_registry();
    let t = tmp();
    // Another image (its own layers), at an address of the same registry
    // that only containerd reaches (its hosts.toml says plain HTTP;
    // unlade tries HTTPS): a fallback.
    let other = t.path().join("other");
    image_layout(&other, &[("latest", &[&many_files(50, 512, 9, MT_GZ)])]);
    reg.push(&other, "latest", "other:latest");
    let far = Proxy::start(&reg.addr);
    let root = t.path().join("root");
    let c = start(
        version,
        t.path(),
        &root,
        &[&proxy, &far],
        &["--metrics-address", "127.0.0.1:0", "--log-format", "json"],
        true,
    );
    wait_until(
        || !named(&c.unlade.log(), "serving metrics").is_empty(),
        || c.unlade.log(),
    );
    let serving = named(&c.unlade.log(), "serving metrics");
    assert_eq!(serving.len(), 1, "{}", c.unlade.log());
    let addr = serving[0]["fields"]["address"]
        .as_str()
        .expect("address")
        .to_string();
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );

    // Before any pull: nothing fetched, the store read.
    let m = scrape(&addr);
    assert_eq!(value(&m, "unlade_fetched_bytes_total"), 0.0);
    assert!(value(&m, "unlade_root_filesystem_bytes{state=\"size\"}") > 0.0);

    // A CRI pull through unlade's proxy, as kubelet would send it.
    let reference = format!("{}/demo:latest", proxy.addr);
    let out = c.cri_pull_on(&c.cri_proxy(), &reference, None);
    assert!(out.status.success(), "{out:?}\n{}", c.unlade.log());
    let layers = demo_layer_blobs(&reg);
    let n = layers.len() as f64;
    let blob_bytes: u64 = layers.iter().map(|l| l.1).sum();

    let m = scrape(&addr);
    assert_eq!(
        value(&m, "unlade_fetched_bytes_total"),
        blob_bytes as f64,
        "{m:#?}"
    );
    assert_eq!(value(&m, "unlade_blobs_fetched_total"), n);
    assert_eq!(value(&m, "unlade_layers_applied_total"), n);
    assert!(value(&m, "unlade_written_bytes_total") > 0.0);
    assert_eq!(
        value(
            &m,
            "unlade_fast_path_pulls_total{outcome=\"fast_path\",reason=\"none\",error=\"none\"}"
        ),
        1.0
    );
    assert_eq!(
        value(&m, "unlade_fast_path_prepares_total{outcome=\"adopted\"}"),
        n
    );
    for stage in ["fetch", "decode", "apply", "commit"] {
        assert_eq!(
            value(
                &m,
                &format!("unlade_layer_stage_seconds_count{{stage=\"{stage}\"}}")
            ),
            n,
            "{stage}"
        );
    }
    assert!(value(&m, "unlade_layer_stage_seconds_sum{stage=\"apply\"}") > 0.0);
    assert_eq!(
        value(
            &m,
            "unlade_cri_calls_total{method=\"PullImage\",code=\"OK\"}"
        ),
        1.0
    );
    assert_eq!(value(&m, "unlade_committed_layers"), n);
    assert_eq!(value(&m, "unlade_snapshots{kind=\"committed\"}"), n);
    assert!(!m
        .keys()
        .any(|k| k.starts_with("unlade_range_fallbacks_total")));
    // One pull: nobody else's work to wait for.
    assert!(
        !m.keys().any(|k| k.starts_with("unlade_dedup_joins_total")),
        "{m:#?}"
    );

    // The blobs go to containerd after the pull was answered: counted.
    wait_until(
        || {
            let m = scrape(&addr);
            let handed = m.get("unlade_blob_handoffs_total{result=\"handed_off\"}") == Some(&n);
            // Removed from unlade's store once no unpack runs.
            let removed = m
                .get("unlade_content_bytes")
                .is_some_and(|b| *b < blob_bytes as f64);
            handed && removed
        },
        || format!("{:#?}", scrape(&addr)),
    );
    let m = scrape(&addr);
    assert_eq!(
        value(&m, "unlade_blob_handoffs_total{result=\"handed_off\"}"),
        n,
        "{m:#?}"
    );
    assert_eq!(
        value(&m, "unlade_handed_off_bytes_total"),
        blob_bytes as f64
    );
    assert!(value(&m, "unlade_content_bytes") < blob_bytes as f64);

    // A client that lies in a Prepare's labels, on unlade's own socket:
    // the layer exists, so the Prepare is adopted as before, but what the
    // labels name is not handed off. A "layer" that the manifest does not
    // list as one (its config), and a manifest containerd does not have:
    // each refused, counted and logged with what and why; containerd's
    // store as it was.
    let raw = demo_manifest(&reg);
    let manifest = sha256(&raw);
    let doc: serde_json::Value = serde_json::from_slice(&raw).expect("manifest");
    let config = doc["config"]["digest"]
        .as_str()
        .expect("config")
        .to_string();
    let bogus = sha256(b"no such manifest");
    let content_before = c.ctr_ok(&["-n", "k8s.io", "content", "ls", "-q"]);
    let client = Client::connect(&c.unlade.sock);
    let chains = demo_chains();
    for (i, (layer, man)) in [(&config, &manifest), (&layers[0].0, &bogus)]
        .into_iter()
        .enumerate()
    {
        let e = client
            .prepare(
                &format!("k8s.io/{}/extract-lie", 9000 + i),
                "",
                labels(&[
                    ("containerd.io/snapshot.ref", &chains[0]),
                    ("containerd.io/snapshot/cri.image-ref", &reference),
                    ("containerd.io/snapshot/cri.manifest-digest", man),
                    ("containerd.io/snapshot/cri.layer-digest", layer),
                ]),
            )
            .expect_err("the layer exists");
        assert_eq!(e.code, code::ALREADY_EXISTS, "{e:?}");
    }
    let failed = "unlade_blob_handoffs_total{result=\"failed\"}";
    wait_until(
        || scrape(&addr).get(failed) == Some(&2.0),
        || format!("{:#?}\n{}", scrape(&addr), c.unlade.log()),
    );
    let refusals = named(
        &c.unlade.log(),
        "blob not handed to containerd; unlade keeps it",
    );
    let whys: Vec<&str> = refusals
        .iter()
        .map(|e| e["fields"]["why"].as_str().expect("why"))
        .collect();
    assert_eq!(
        whys,
        [
            format!("manifest {manifest} does not reference {config}"),
            format!("containerd has no manifest {bogus} in k8s.io"),
        ],
        "{refusals:?}"
    );
    let m = scrape(&addr);
    assert_eq!(
        value(&m, "unlade_blob_handoffs_total{result=\"handed_off\"}"),
        n
    );
    assert_eq!(
        c.ctr_ok(&["-n", "k8s.io", "content", "ls", "-q"]),
        content_before
    );

    // The pull's one summary event says the same.
    let log = c.unlade.log();
    let pulled = named(&log, "pulled for containerd");
    assert_eq!(pulled.len(), 1, "{log}");
    let f = &pulled[0]["fields"];
    assert_eq!(pulled[0]["level"], "INFO");
    // The reference, pinned to the manifest CRI asked for.
    assert!(
        f["image"]
            .as_str()
            .is_some_and(|i| i.starts_with(&format!("{reference}@sha256:"))),
        "{f}"
    );
    assert_eq!(f["layers"], layers.len());
    assert_eq!(f["applied"], layers.len());
    assert_eq!(f["by_another"], 0);
    assert_eq!(f["bytes_fetched"], blob_bytes);
    for k in [
        "seconds",
        "resolve_seconds",
        "fetch_seconds",
        "apply_seconds",
    ] {
        assert!(f[k].as_f64().is_some_and(|s| s > 0.0), "{k}: {f}");
    }

    // A registry unlade cannot reach: containerd pulls, one fallback.
    let unreachable = format!("{}/other:latest", far.addr);
    let out = c.cri_pull_on(&c.sock, &unreachable, None);
    assert!(out.status.success(), "{out:?}\n{}", c.unlade.log());
    let m = scrape(&addr);
    let fell: Vec<(&String, &f64)> = m
        .iter()
        .filter(|(k, _)| {
            k.starts_with(
                "unlade_fast_path_pulls_total{outcome=\"fallback\",reason=\"pull_failed\"",
            )
        })
        .collect();
    assert_eq!(fell.len(), 1, "{m:#?}");
    assert_eq!(*fell[0].1, 1.0);
    assert!(!fell[0].0.contains("error=\"none\""), "{}", fell[0].0);
    let log = c.unlade.log();
    let back = named(&log, "falls back to containerd");
    assert!(!back.is_empty(), "{log}");
    assert_eq!(back[0]["level"], "WARN");
    assert_eq!(back[0]["fields"]["reason"], "pull_failed");
    assert!(
        back[0]["fields"]["image"]
            .as_str()
            .is_some_and(|i| i.starts_with(&unreachable)),
        "{}",
        back[0]
    );

    // A huge request head is refused at once; another path is 404.
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: unlade\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(64 << 10)
    );
    let t1 = std::time::Instant::now();
    let answer = http(&addr, &huge);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    assert!(t1.elapsed() < Duration::from_secs(5), "{:?}", t1.elapsed());
    let answer = http(
        &addr,
        "GET /other HTTP/1.1\r\nHost: unlade\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    // Scrapers that connect and say nothing, more than may be served at
    // once, hold their connections until the read timeout (10 s), not the
    // endpoint: a scrape behind them is answered.
    let silent: Vec<TcpStream> = (0..12)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    let t2 = std::time::Instant::now();
    assert!(scrape(&addr).contains_key("unlade_fetched_bytes_total"));
    assert!(t2.elapsed() < Duration::from_secs(20), "{:?}", t2.elapsed());
    drop(silent);
    // Every line of the log was one JSON object.
    assert!(events(&c.unlade.log()).len() >= 4);
}

/// `--blobs discard` (containerd's `discard_unpacked_layers`): once
/// containerd adopted the snapshots, unlade removes the layer blobs and
/// hands them to no one; the image runs, `ctr images check` calls it
/// incomplete.
#[test]
fn discarded_blobs_go_nowhere() {
    let (reg, proxy) = demo_registry();
    let t = tmp();
    let root = t.path().join("root");
    let c = start(
        Version::V1_6,
        t.path(),
        &root,
        &[&proxy],
        &["--blobs", "discard"],
        false,
    );
    let reference = format!("{}/demo:latest", proxy.addr);
    c.cri_pull_ok(&reference, 1);
    let layers = demo_layer_blobs(&reg);
    wait_until(|| kept(&root, &layers) == 0, || c.unlade.log());
    let check = c.ctr_ok(&["-n", "k8s.io", "images", "check"]);
    let line = check
        .lines()
        .find(|l| l.starts_with(&reference))
        .unwrap_or_else(|| panic!("{reference} not in\n{check}"));
    assert!(line.contains("incomplete"), "{check}");
    let content = c.ctr_ok(&["-n", "k8s.io", "content", "ls", "-q"]);
    for l in &layers {
        assert!(!content.lines().any(|d| d == l.0), "{}: {content}", l.0);
    }
    let out = c.ctr_ok(&[
        "-n",
        "k8s.io",
        "run",
        "--rm",
        "--snapshotter",
        "unlade",
        &reference,
        "discarded",
        "hello",
    ]);
    assert_eq!(out.trim(), "Hello, world!");
}

/// The hand-off's containerd is gone (no socket), then silent (a socket
/// that accepts and never answers): the CRI pull is answered as quickly as
/// ever, the blobs stay in unlade's store, and a refused hand-off is
/// counted and logged; the server stops at once all the same.
#[test]
fn a_containerd_gone_or_silent_costs_the_hand_off_only() {
    let (reg, proxy) = demo_registry();
    let t = tmp();
    let layers = demo_layer_blobs(&reg);
    let silent = t.path().join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&silent).expect("bind");
    // Accepts, and holds every connection without a byte.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming().flatten() {
            held.push(c);
        }
    });
    for (case, socket) in [
        ("gone", t.path().join("no-containerd.sock")),
        ("silent", silent.clone()),
    ] {
        let root = t.path().join(format!("root-{case}"));
        let mut c = start(
            Version::V1_6,
            t.path(),
            &root,
            &[&proxy],
            &[
                "--containerd-address",
                socket.to_str().expect("utf8"),
                "--metrics-address",
                "127.0.0.1:0",
            ],
            false,
        );
        let reference = format!("{}/demo:latest", proxy.addr);
        let t0 = std::time::Instant::now();
        c.cri_pull_ok(&reference, 1);
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{case}: the pull waited for the hand-off"
        );
        if case == "gone" {
            // Refused at once: counted, logged, the blobs kept.
            let addr = c
                .unlade
                .log()
                .lines()
                .find_map(|l| {
                    l.split_once("serving metrics address=")
                        .map(|(_, a)| a.trim().to_string())
                })
                .expect("the metrics address");
            let failed = "unlade_blob_handoffs_total{result=\"failed\"}";
            wait_until(
                || scrape(&addr).get(failed) == Some(&(layers.len() as f64)),
                || format!("{:#?}\n{}", scrape(&addr), c.unlade.log()),
            );
            let log = c.unlade.log();
            assert_eq!(
                log.lines()
                    .filter(|l| l.contains("blob not handed to containerd; unlade keeps it"))
                    .count(),
                layers.len(),
                "{log}"
            );
        }
        assert_eq!(
            kept(&root, &layers),
            layers.len(),
            "{case}: {}",
            c.unlade.log()
        );
        let t2 = std::time::Instant::now();
        let st = c.unlade.terminate();
        assert!(st.success(), "{case}: {st:?}");
        assert!(
            t2.elapsed() < Duration::from_secs(10),
            "{case}: stopping waited for the hand-off"
        );
    }
}
