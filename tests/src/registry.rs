//! Real registries for the pull tests: Debian's `docker-registry` (the
//! CNCF distribution registry) on 127.0.0.1 with a temporary storage
//! directory, images pushed with skopeo, a token server the registry
//! trusts for the Bearer flow, and an HTTP proxy that counts requests and
//! injects faults (a cut stream, wrong bytes).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;

use crate::{sh, tmp};

/// A port nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// How the registry authenticates.
pub enum RegAuth {
    /// Anyone may pull and push.
    None,
    /// htpasswd Basic auth for (user, password).
    Basic(String, String),
    /// Bearer tokens from a [`TokenServer`] (which checks the password).
    Token(Arc<TokenServer>),
}

/// A running `docker-registry`; killed (by its PID) when dropped.
pub struct Registry {
    /// 127.0.0.1:PORT.
    pub addr: String,
    child: Child,
    /// Its storage, config and log.
    pub dir: tempfile::TempDir,
    creds: Option<(String, String)>,
}

/// A TLS certificate authority and a server certificate it signed for
/// 127.0.0.1 (made with `openssl`).
pub struct TestCa {
    /// The CA certificate (PEM), what a client must trust.
    pub ca: PathBuf,
    /// The server certificate (PEM).
    pub cert: PathBuf,
    /// The server key (PEM).
    pub key: PathBuf,
    _dir: tempfile::TempDir,
}

/// A fresh RSA key and a self-signed certificate for it, valid two days
/// (`openssl req -x509`): the test CA, and the token server's signing key.
fn self_signed(common_name: &str, key: &Path, cert: &Path) {
    sh(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .arg("-subj")
        .arg(format!("/CN={common_name}"))
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert));
}

impl TestCa {
    /// A fresh CA and server certificate.
    pub fn new() -> TestCa {
        let dir = tmp();
        let p = |n: &str| dir.path().join(n);
        let s = |p: PathBuf| p.to_str().expect("utf8").to_string();
        self_signed("unlade test CA", &p("ca.key"), &p("ca.pem"));
        sh(Command::new("openssl").args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            &s(p("server.key")),
            "-out",
            &s(p("server.csr")),
        ]));
        std::fs::write(
            p("ext.cnf"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write ext");
        sh(Command::new("openssl").args([
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            &s(p("server.csr")),
            "-CA",
            &s(p("ca.pem")),
            "-CAkey",
            &s(p("ca.key")),
            "-CAcreateserial",
            "-extfile",
            &s(p("ext.cnf")),
            "-out",
            &s(p("server.pem")),
        ]));
        TestCa {
            ca: p("ca.pem"),
            cert: p("server.pem"),
            key: p("server.key"),
            _dir: dir,
        }
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// Starts a registry on a free port, waiting until it answers.
    pub fn start(auth: RegAuth) -> Registry {
        Self::start_with(auth, None)
    }

    /// Starts a registry serving HTTPS with `ca`'s server certificate.
    pub fn start_tls(auth: RegAuth, ca: &TestCa) -> Registry {
        Self::start_with(auth, Some(ca))
    }

    fn start_with(auth: RegAuth, tls: Option<&TestCa>) -> Registry {
        let dir = tmp();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let storage = dir.path().join("storage");
        let (auth_cfg, creds) = match &auth {
            RegAuth::None => (String::new(), None),
            RegAuth::Basic(u, p) => {
                let hp = dir.path().join("htpasswd");
                let out = sh(Command::new("htpasswd").args(["-Bbn", u, p]));
                std::fs::write(&hp, &out.stdout).expect("write htpasswd");
                (
                    format!(
                        "auth:\n  htpasswd:\n    realm: unlade-test\n    path: {}\n",
                        hp.display()
                    ),
                    Some((u.clone(), p.clone())),
                )
            }
            RegAuth::Token(t) => (
                format!(
                    "auth:\n  token:\n    realm: http://{}/token\n    service: unlade-registry\n    issuer: unlade-test-issuer\n    rootcertbundle: {}\n",
                    t.addr,
                    t.cert.display()
                ),
                Some((t.user.clone(), t.password.clone())),
            ),
        };
        let tls_cfg = tls.map_or(String::new(), |t| {
            format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                t.cert.display(),
                t.key.display()
            )
        });
        let cfg = dir.path().join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{tls_cfg}{auth_cfg}",
                storage.display()
            ),
        )
        .expect("write registry config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry (apt-get install docker-registry)");
        let r = Registry {
            addr,
            child,
            dir,
            creds,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&r.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "registry did not come up: {}",
                r.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Pushes `oci:LAYOUT:TAG` as `REPO:TAG` here with skopeo (`--all`:
    /// every platform of an index).
    pub fn push(&self, layout: &Path, tag: &str, repo_tag: &str) {
        let mut c = Command::new("skopeo");
        c.args(["copy", "--all", "-q", "--dest-tls-verify=false"]);
        if let Some((u, p)) = &self.creds {
            c.arg(format!("--dest-creds={u}:{p}"));
        }
        c.arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo_tag}", self.addr));
        sh(&mut c);
    }

    /// Where the registry keeps blob `digest` ("sha256:…").
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = &digest[7..];
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `perf/throttle.py` in front of a server on 127.0.0.1: each connection
/// capped at a rate, each request delayed (a network like a real one).
/// Killed, by PID, when dropped.
pub struct Throttle {
    /// 127.0.0.1:PORT.
    pub addr: String,
    child: Child,
}

impl Throttle {
    /// A throttle in front of `upstream` (127.0.0.1:PORT) capping each
    /// connection at `mb_per_s` (10^6 bytes), delaying each request by
    /// `latency_ms`.
    pub fn start(upstream: &str, mb_per_s: f64, latency_ms: u64) -> Throttle {
        let port = upstream.rsplit(':').next().expect("port");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../perf/throttle.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(port)
            .args(["--rate", &mb_per_s.to_string()])
            .args(["--latency", &latency_ms.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start perf/throttle.py");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read throttle.py's port");
        let port = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("throttle.py said {line:?}"));
        Throttle {
            addr: format!("127.0.0.1:{port}"),
            child,
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A token server for the registry's Bearer flow: checks Basic
/// credentials, grants what the scope asks, signs RS256 JWTs (with
/// `openssl`) carrying its certificate in `x5c`, which the registry
/// trusts. Counts the tokens it issued.
pub struct TokenServer {
    /// 127.0.0.1:PORT.
    pub addr: String,
    /// The certificate the registry trusts.
    pub cert: PathBuf,
    key: PathBuf,
    /// Expected user.
    pub user: String,
    /// Expected password.
    pub password: String,
    /// Tokens issued.
    pub issued: AtomicUsize,
    /// Requests refused (bad or missing credentials).
    pub refused: AtomicUsize,
    _dir: tempfile::TempDir,
}

impl TokenServer {
    /// Starts one for (user, password), serving until the process ends.
    pub fn start(user: &str, password: &str) -> Arc<TokenServer> {
        let dir = tmp();
        let key = dir.path().join("key.pem");
        let cert = dir.path().join("cert.pem");
        self_signed("unlade-test-token", &key, &cert);
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let t = Arc::new(TokenServer {
            addr: l.local_addr().expect("addr").to_string(),
            cert,
            key,
            user: user.into(),
            password: password.into(),
            issued: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            _dir: dir,
        });
        let t2 = t.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let t = t2.clone();
                std::thread::spawn(move || t.serve(s));
            }
        });
        t
    }

    fn serve(&self, mut s: TcpStream) {
        let Some((line, headers)) = read_head(&mut s) else {
            return;
        };
        let target = line.split(' ').nth(1).unwrap_or("");
        let mut query = target.split_once('?').map_or("", |(_, q)| q).to_string();
        let want = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", self.user, self.password))
        );
        // OAuth2's refresh grant (an identity token): a form POSTed.
        let refresh = if line.starts_with("POST ") {
            query = String::from_utf8_lossy(&BODY.with(|b| b.borrow().clone())).into_owned();
            let form: BTreeMap<String, String> = query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), crate::percent_decode(v, true)))
                .collect();
            form.get("grant_type").map(String::as_str) == Some("refresh_token")
                && form.get("refresh_token") == Some(&self.identity_token())
        } else {
            false
        };
        if !refresh && headers.get("authorization") != Some(&want) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            let _ = s.write_all(
                b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            return;
        }
        let mut access = Vec::new();
        for kv in query.split('&') {
            if let Some(v) = kv.strip_prefix("scope=") {
                let v = crate::percent_decode(v, true);
                let parts: Vec<&str> = v.splitn(3, ':').collect();
                if parts.len() == 3 {
                    access.push(serde_json::json!({
                        "type": parts[0], "name": parts[1],
                        "actions": parts[2].split(',').collect::<Vec<_>>(),
                    }));
                }
            }
        }
        let token = self.sign(access);
        self.issued.fetch_add(1, Ordering::SeqCst);
        // The refresh grant answers OAuth2's way.
        let key = if refresh { "access_token" } else { "token" };
        let body = serde_json::json!({key: token, "expires_in": 300}).to_string();
        let _ = s.write_all(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    }

    /// The identity token (an OAuth2 refresh token) it accepts in place
    /// of user and password.
    pub fn identity_token(&self) -> String {
        format!("refresh-{}", self.password)
    }

    fn sign(&self, access: Vec<serde_json::Value>) -> String {
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let pem = std::fs::read_to_string(&self.cert).expect("cert");
        let der_b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [der_b64]});
        let claims = serde_json::json!({
            "iss": "unlade-test-issuer", "sub": self.user, "aud": "unlade-registry",
            "exp": now + 300, "nbf": now - 10, "iat": now - 10,
            "jti": format!("{now}-{}", self.issued.load(Ordering::SeqCst)),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let mut c = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(&self.key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("openssl");
        c.stdin
            .take()
            .expect("stdin")
            .write_all(signing_input.as_bytes())
            .expect("write");
        let out = c.wait_with_output().expect("openssl dgst");
        assert!(out.status.success(), "openssl dgst failed");
        format!("{signing_input}.{}", b64(&out.stdout))
    }
}

/// Reads an HTTP request or response head: the first line and the
/// headers (names lowercased).
fn read_head(s: &mut TcpStream) -> Option<(String, BTreeMap<String, String>)> {
    let mut r = BufReader::new(s.try_clone().ok()?);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    if line.is_empty() {
        return None;
    }
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    // Whatever BufReader read ahead is the request's body: kept for the
    // callers that read one (the token server's POST).
    let n: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; n.min(1 << 20)];
    r.read_exact(&mut body).ok()?;
    BODY.with(|b| *b.borrow_mut() = body);
    Some((line.trim_end().to_string(), headers))
}

thread_local! {
    /// The body of the request [`read_head`] read last on this thread.
    static BODY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A fault the proxy injects into the next matching response.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Forward this many body bytes of the next GET of a path containing
    /// the text, then drop the connection.
    CutAfter(String, usize),
    /// Flip a byte in the bodies of every GET of a path containing the
    /// text.
    Corrupt(String),
    /// Answer requests whose path contains the text with this status,
    /// this many times.
    Status(String, u16, usize),
    /// Forward this many body bytes of the next GET of a path containing
    /// the text, then hold the rest until [`Proxy::release`].
    Stall(String, usize),
    /// Take every request whose path contains the text and never answer
    /// (a registry that accepts connections and then says nothing), until
    /// the client hangs up.
    Hang(String),
    /// Forward the response head of every GET of a path containing the
    /// text at once, then its body one byte per this interval.
    Trickle(String, Duration),
    /// Answer every GET of a path containing the text with a 200 whose
    /// `Content-Length` is a terabyte and whose body is zeros for as long
    /// as the client reads.
    Endless(String),
    /// Take every request whose User-Agent contains the text and never
    /// answer: a registry silent to one client only (unlade), served to
    /// the others (containerd).
    HangAgent(String),
    /// Answer every GET of a path containing the text with a 307 to the
    /// same path at this base (`http://HOST:PORT`), as registries send
    /// blob downloads to a CDN.
    Redirect(String, String),
    /// Drop the `Range` header of every GET of a path containing the
    /// text: the registry answers 200 with the whole blob.
    IgnoreRange(String),
    /// Answer every GET of a path containing the text that asks for a
    /// closed range (`bytes=A-B`) with this status (416, 501).
    RangeStatus(String, u16),
    /// Shift the numbers of the `Content-Range` of every 206 answer to a
    /// GET of a path containing the text by one: other bytes than asked.
    ShiftContentRange(String),
    /// Answer every GET of a path containing the text whose closed range
    /// starts at this byte with this status.
    FailRange(String, u64, u16),
    /// Take the next GET of a path containing the text whose closed range
    /// starts at this byte and never answer, until the client hangs up.
    HangRange(String, u64),
}

/// The first byte of a closed range header (`bytes=A-B`), if it is one.
fn closed_range_start(range: Option<&String>) -> Option<u64> {
    let (a, b) = range?.strip_prefix("bytes=")?.split_once('-')?;
    b.parse::<u64>().ok()?;
    a.parse().ok()
}

/// Reads a client's requests and answers none, until it hangs up: a
/// registry that took the request and went silent.
fn hold_until_hung_up(client: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    while matches!(client.read(&mut buf), Ok(n) if n > 0) {}
}

/// An injected error answer with `code`, with `Retry-After: 0` if
/// `retry_now` (so the client's back-off, not the server, paces it).
fn answer_status(client: &mut TcpStream, code: u16, retry_now: bool) {
    let retry = if retry_now { "Retry-After: 0\r\n" } else { "" };
    let _ = client.write_all(
        format!(
            "HTTP/1.1 {code} Injected\r\n{retry}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    );
}

/// A `Content-Range: bytes A-B/T` header line with A and B one more.
fn shifted_content_range(line: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(line);
    let Some((name, value)) = text.split_once(':') else {
        return line.to_vec();
    };
    let v = value.trim();
    let Some((span, total)) = v.strip_prefix("bytes ").and_then(|r| r.split_once('/')) else {
        return line.to_vec();
    };
    let Some((a, b)) = span.split_once('-') else {
        return line.to_vec();
    };
    let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) else {
        return line.to_vec();
    };
    format!("{name}: bytes {}-{}/{total}\r\n", a + 1, b + 1).into_bytes()
}

/// One request the proxy saw.
#[derive(Clone, Debug)]
pub struct Seen {
    /// e.g. "GET".
    pub method: String,
    /// The path and query.
    pub path: String,
    /// The Range header, if any.
    pub range: Option<String>,
}

/// An HTTP proxy in front of a registry (one request per connection):
/// records every request and injects [`Fault`]s. Runs until the process
/// ends.
pub struct Proxy {
    /// 127.0.0.1:PORT.
    pub addr: String,
    upstream: String,
    seen: Mutex<Vec<Seen>>,
    faults: Mutex<Vec<Fault>>,
    /// Refuse every connection (as if down) while set.
    pub down: AtomicBool,
    /// Set while a [`Fault::Stall`] holds a response.
    pub stalled: AtomicBool,
    released: AtomicBool,
    /// Blob GETs being answered now, and the most at once.
    blob_gets_now: AtomicUsize,
    /// The most blob GETs answered at once.
    pub most_blob_gets: AtomicUsize,
}

/// Counts a blob GET as being answered while it lives.
struct InFlight<'a>(&'a Proxy);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.blob_gets_now.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Proxy {
    /// Starts one forwarding to `upstream` (127.0.0.1:PORT).
    pub fn start(upstream: &str) -> Arc<Proxy> {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let p = Arc::new(Proxy {
            addr: l.local_addr().expect("addr").to_string(),
            upstream: upstream.to_string(),
            seen: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
            down: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            released: AtomicBool::new(false),
            blob_gets_now: AtomicUsize::new(0),
            most_blob_gets: AtomicUsize::new(0),
        });
        let p2 = p.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let p = p2.clone();
                std::thread::spawn(move || p.serve(s));
            }
        });
        p
    }

    /// Adds a fault.
    pub fn fault(&self, f: Fault) {
        self.faults.lock().expect("lock").push(f);
    }

    /// Lets a stalled response go on.
    pub fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    /// GET requests of blob `digest`.
    pub fn blob_gets(&self, digest: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == "GET" && s.path.contains(&format!("/blobs/{digest}")))
            .collect()
    }

    fn serve(&self, mut client: TcpStream) {
        if self.down.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        let Some((line, headers)) = read_head(&mut client) else {
            return;
        };
        let mut parts = line.split(' ');
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        self.seen.lock().expect("lock").push(Seen {
            method: method.clone(),
            path: path.clone(),
            range: headers.get("range").cloned(),
        });
        let _in_flight = (method == "GET" && path.contains("/blobs/")).then(|| {
            let now = self.blob_gets_now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_blob_gets.fetch_max(now, Ordering::SeqCst);
            InFlight(self)
        });
        let mut headers = headers;
        let closed = closed_range_start(headers.get("range"));
        let mut cut = None;
        let mut stall = None;
        let mut corrupt = false;
        let mut trickle = None;
        let mut shift = false;
        {
            let mut faults = self.faults.lock().expect("lock");
            let mut i = 0;
            while i < faults.len() {
                match &mut faults[i] {
                    Fault::HangAgent(text)
                        if headers
                            .get("user-agent")
                            .is_some_and(|a| a.contains(text.as_str())) =>
                    {
                        drop(faults);
                        hold_until_hung_up(&mut client);
                        return;
                    }
                    Fault::Hang(text) if path.contains(text.as_str()) => {
                        drop(faults);
                        hold_until_hung_up(&mut client);
                        return;
                    }
                    Fault::Endless(text) if method == "GET" && path.contains(text.as_str()) => {
                        drop(faults);
                        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1099511627776\r\nConnection: close\r\n\r\n";
                        if client.write_all(head.as_bytes()).is_err() {
                            return;
                        }
                        let zeros = vec![0u8; 64 << 10];
                        while client.write_all(&zeros).is_ok() {}
                        return;
                    }
                    Fault::Redirect(text, base)
                        if method == "GET" && path.contains(text.as_str()) =>
                    {
                        let to = format!("{base}{path}");
                        drop(faults);
                        let _ = client.write_all(
                            format!("HTTP/1.1 307 Temporary Redirect\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                                .as_bytes(),
                        );
                        return;
                    }
                    Fault::IgnoreRange(text) if method == "GET" && path.contains(text.as_str()) => {
                        headers.remove("range");
                    }
                    Fault::ShiftContentRange(text)
                        if method == "GET" && path.contains(text.as_str()) =>
                    {
                        shift = true;
                    }
                    Fault::RangeStatus(text, code)
                        if method == "GET" && path.contains(text.as_str()) && closed.is_some() =>
                    {
                        let code = *code;
                        drop(faults);
                        answer_status(&mut client, code, false);
                        return;
                    }
                    Fault::FailRange(text, at, code)
                        if method == "GET"
                            && path.contains(text.as_str())
                            && closed == Some(*at) =>
                    {
                        let code = *code;
                        drop(faults);
                        answer_status(&mut client, code, true);
                        return;
                    }
                    Fault::HangRange(text, at)
                        if method == "GET"
                            && path.contains(text.as_str())
                            && closed == Some(*at) =>
                    {
                        faults.remove(i);
                        drop(faults);
                        hold_until_hung_up(&mut client);
                        return;
                    }
                    Fault::Trickle(text, every)
                        if method == "GET" && path.contains(text.as_str()) =>
                    {
                        trickle = Some(*every);
                    }
                    Fault::Status(text, code, n) if path.contains(text.as_str()) => {
                        let code = *code;
                        *n -= 1;
                        if *n == 0 {
                            faults.remove(i);
                        }
                        answer_status(&mut client, code, true);
                        return;
                    }
                    Fault::CutAfter(text, n) if method == "GET" && path.contains(text.as_str()) => {
                        cut = Some(*n);
                        faults.remove(i);
                        continue;
                    }
                    Fault::Stall(text, n) if method == "GET" && path.contains(text.as_str()) => {
                        stall = Some(*n);
                        faults.remove(i);
                        continue;
                    }
                    Fault::Corrupt(text) if method == "GET" && path.contains(text.as_str()) => {
                        corrupt = true;
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        let Ok(mut up) = TcpStream::connect(&self.upstream) else {
            return;
        };
        let mut req = format!("{line}\r\n");
        for (k, v) in &headers {
            if k != "connection" {
                req.push_str(&format!("{k}: {v}\r\n"));
            }
        }
        req.push_str("Connection: close\r\n\r\n");
        if up.write_all(req.as_bytes()).is_err() {
            return;
        }
        // Relay the response head as is, then the body (with the fault).
        let mut ur = BufReader::new(up);
        let mut head = Vec::new();
        loop {
            let mut l = Vec::new();
            if ur.read_until(b'\n', &mut l).unwrap_or(0) == 0 {
                return;
            }
            if l == b"\r\n" || l == b"\n" {
                head.extend_from_slice(&l);
                break;
            }
            if shift && l.to_ascii_lowercase().starts_with(b"content-range:") {
                l = shifted_content_range(&l);
            }
            head.extend_from_slice(&l);
        }
        if client.write_all(&head).is_err() {
            return;
        }
        if let Some(every) = trickle {
            let mut one = [0u8; 1];
            while matches!(ur.read(&mut one), Ok(1)) {
                if client.write_all(&one).is_err() || client.flush().is_err() {
                    return;
                }
                std::thread::sleep(every);
            }
            return;
        }
        let mut sent = 0usize;
        let mut buf = vec![0u8; 64 << 10];
        let mut flipped = false;
        loop {
            let n = match ur.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut chunk = &mut buf[..n];
            if let Some(limit) = cut {
                if sent + chunk.len() >= limit {
                    let keep = limit - sent;
                    let _ = client.write_all(&chunk[..keep]);
                    let _ = client.flush();
                    let _ = client.shutdown(Shutdown::Both);
                    return;
                }
            }
            if let Some(limit) = stall.filter(|&l| sent + chunk.len() >= l) {
                let keep = limit - sent;
                if client.write_all(&chunk[..keep]).is_err() {
                    return;
                }
                let _ = client.flush();
                self.stalled.store(true, Ordering::SeqCst);
                while !self.released.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                self.stalled.store(false, Ordering::SeqCst);
                stall = None;
                sent += keep;
                if client.write_all(&chunk[keep..]).is_err() {
                    return;
                }
                sent += chunk.len() - keep;
                continue;
            }
            if corrupt && !flipped && !chunk.is_empty() {
                let mid = chunk.len() / 2;
                chunk[mid] ^= 0xff;
                flipped = true;
            }
            sent += chunk.len();
            chunk = &mut chunk[..];
            if client.write_all(chunk).is_err() {
                return;
            }
        }
        let _ = client.shutdown(Shutdown::Write);
    }
}

// The bundled demo image (assets/demo-image), as the snapshotter and pull
// tests use it through a registry.

/// The demo image's OCI layout.
pub fn demo_layout() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/demo-image")
}

/// A registry holding the demo image as `demo:latest`, behind a proxy
/// that counts requests and injects faults.
pub fn demo_registry() -> (Registry, Arc<Proxy>) {
    let reg = Registry::start(RegAuth::None);
    reg.push(&demo_layout(), "latest", "demo:latest");
    let proxy = Proxy::start(&reg.addr);
    (reg, proxy)
}

impl Registry {
    /// How many GETs of the demo image's blob `digest` the registry's log
    /// shows from clients whose user agent contains `agent`
    /// (`containerd/`, `unlade/`).
    pub fn demo_blob_gets_by(&self, digest: &str, agent: &str) -> usize {
        let get = format!("GET /v2/demo/blobs/{digest}");
        self.log()
            .lines()
            .filter(|l| l.contains(&get) && l.contains(agent))
            .count()
    }
}

/// The layer digests, bottom first, of the demo image as the registry
/// holds it (skopeo's push writes its own manifest).
pub fn demo_layers(reg: &Registry) -> Vec<String> {
    demo_layer_blobs(reg).into_iter().map(|l| l.0).collect()
}

/// The demo image's manifest as `reg` serves it, byte for byte (its
/// digest is the one containerd records).
pub fn demo_manifest(reg: &Registry) -> Vec<u8> {
    sh(Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{}/demo:latest", reg.addr)))
    .stdout
}

/// The demo image's layer blobs in `reg`, bottom first: (digest, size).
pub fn demo_layer_blobs(reg: &Registry) -> Vec<(String, u64)> {
    let man: serde_json::Value = serde_json::from_slice(&demo_manifest(reg)).expect("manifest");
    man["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().expect("digest").to_string(),
                l["size"].as_u64().expect("size"),
            )
        })
        .collect()
}

/// The demo image's layer chain IDs, bottom first, from its config
/// (computed here, not by the engine).
pub fn demo_chains() -> Vec<String> {
    let read = |p: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(&p).expect("read")).expect("JSON")
    };
    let blob = |d: &serde_json::Value| {
        demo_layout()
            .join("blobs/sha256")
            .join(&d.as_str().expect("digest")[7..])
    };
    let index = read(demo_layout().join("index.json"));
    let manifest = read(blob(&index["manifests"][0]["digest"]));
    let config = read(blob(&manifest["config"]["digest"]));
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .expect("diff_ids")
        .iter()
        .map(|d| d.as_str().expect("diff_id").to_string())
        .collect();
    crate::chain_ids_of(&diff_ids)
}
