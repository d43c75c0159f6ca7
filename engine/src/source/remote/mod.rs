//! A client for one repository of an OCI distribution (Docker Registry
//! HTTP API v2) registry: resolve a tag to a manifest digest, fetch
//! manifests and blobs — through the mirrors of `hosts.toml` first, with
//! the registry's auth challenge answered.
//!
//! [`Remote`] is both the [`Documents`] that image resolution reads
//! (indexes, manifests, configs, each checked against its digest and
//! bounded in size) and the [`BlobSource`] the unpack pipeline downloads
//! layers from (`Range` requests resume a broken download).
//!
//! Requests make one attempt per endpoint; whoever drives them retries
//! (the fetcher for blobs, [`Remote::with_retry`] for documents), so a
//! mirror that is down costs one failed connection per request before the
//! next endpoint is asked.

pub mod auth;
pub mod hosts;
mod tls;

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cancel::Cancel;
use crate::oci::digest::Digest;
use crate::oci::image::{Documents, ImageError, MAX_JSON};
use crate::oci::reference::Reference;
use crate::source::{BlobSource, Ranged, Retry, SourceError, SourceErrorKind};

pub use hosts::Endpoint;

/// How to reach a registry.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Talk plain HTTP to the registry itself when no `hosts.toml` says
    /// otherwise (a local test registry).
    pub plain_http: bool,
    /// Where `<registry>/hosts.toml` files live (containerd's
    /// `certs.d` layout); `None`: no mirrors, defaults only.
    pub hosts_dir: Option<PathBuf>,
    /// The Docker config file with credentials; `None`: the default place
    /// (`$DOCKER_CONFIG/config.json`, `~/.docker/config.json`).
    pub docker_config: Option<PathBuf>,
    /// Secrets lent for a while (kubelet's, through the snapshotter's CRI
    /// proxy), looked up before the Docker config.
    pub keyring: Option<Arc<auth::Keyring>>,
    /// Retries of document requests (blob downloads use the root's).
    pub retry: Retry,
    /// Longest wait for a connection.
    pub connect_timeout: Duration,
    /// Longest silence while reading a response; also the window of the
    /// minimum-progress rule ([`crate::source::Stall`]) for documents and
    /// for what a resumed download skips.
    pub read_timeout: Duration,
    /// When every request must be done by, if anything bounds the whole
    /// operation (the containerd snapshotter's pull deadline): each request
    /// is given what is left as its overall timeout, headers and body
    /// included, so that no answer however slow keeps a thread past it.
    pub deadline: Option<Instant>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            plain_http: false,
            hosts_dir: Some(PathBuf::from("/etc/unlade/certs.d")),
            docker_config: None,
            keyring: None,
            retry: Retry::default(),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            deadline: None,
        }
    }
}

/// Counters of what a [`Remote`] asked and got.
#[derive(Debug, Default)]
pub struct RemoteStats {
    /// HTTP requests sent (token requests included).
    pub requests: AtomicU64,
    /// Response body bytes read from blob downloads.
    pub blob_bytes: AtomicU64,
}

/// A document's bytes and media type.
type Doc = (Arc<Vec<u8>>, String);

struct Auth {
    header: String,
    until: Option<Instant>,
}

/// One repository of one registry (see the module docs).
pub struct Remote {
    reference: Reference,
    endpoints: Vec<(Endpoint, ureq::Agent)>,
    docker_config: Option<PathBuf>,
    keyring: Option<Arc<auth::Keyring>>,
    auth: Mutex<HashMap<String, Auth>>,
    docs: Mutex<HashMap<Digest, Doc>>,
    retry: Retry,
    deadline: Option<Instant>,
    /// What this client did.
    pub stats: RemoteStats,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Remote({})", self.reference)
    }
}

/// What a request is for: which endpoints may serve it, and how large
/// its answer may be.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cap {
    /// A tag's digest (HEAD or GET of a manifest by tag).
    Resolve,
    /// A document by digest (manifest, index, config).
    Pull,
    /// A layer blob: an answer of any size, read by the fetcher.
    Blob,
}

const ACCEPT_ERR_BODY: u64 = 4096;

/// Connections to one host kept open between requests: enough for the
/// chunks of blobs split over connections, which ask one after another
/// on each (`RootOptions::max_connections`, 16 by default).
const MAX_IDLE_PER_HOST: usize = 32;

/// Hosts (`host:port`) that answered a ranged request badly (ignored it,
/// refused it, or named other bytes than asked): their blobs come over
/// one stream for as long as this process runs, without asking again.
static RANGES_REFUSED: Mutex<std::collections::BTreeSet<String>> =
    Mutex::new(std::collections::BTreeSet::new());

fn ranges_refused(authority: &str) -> bool {
    RANGES_REFUSED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(authority)
}

fn refuse_ranges(authority: &str) {
    RANGES_REFUSED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(authority.to_string());
}

/// Whether a `Content-Range` value (`bytes FIRST-LAST/TOTAL`) names
/// exactly `range` of a blob of `size` bytes (`TOTAL` may be `*`).
fn content_range_is(value: &str, range: &std::ops::Range<u64>, size: u64) -> bool {
    let Some(rest) = value.trim().strip_prefix("bytes ") else {
        return false;
    };
    let Some((span, total)) = rest.split_once('/') else {
        return false;
    };
    let Some((first, last)) = span.split_once('-') else {
        return false;
    };
    let total_ok = total == "*" || total.parse::<u64>().ok() == Some(size);
    first.parse::<u64>().ok() == Some(range.start)
        && last.parse::<u64>().ok() == range.end.checked_sub(1)
        && total_ok
}

impl Remote {
    /// A client for `reference`'s repository with the endpoints its
    /// registry's `hosts.toml` lists (or the registry itself).
    pub fn new(reference: &Reference, opts: &RemoteOptions) -> Result<Remote, SourceError> {
        let eps = hosts::endpoints(
            opts.hosts_dir.as_deref(),
            &reference.registry,
            opts.plain_http,
        )?;
        let mut endpoints = Vec::with_capacity(eps.len());
        for ep in eps {
            let mut b = ureq::AgentBuilder::new()
                .timeout_connect(opts.connect_timeout)
                .timeout_read(opts.read_timeout)
                .timeout_write(opts.read_timeout)
                .redirects(8)
                // A redirect may lead anywhere (a CDN, or another host
                // entirely): the registry's credentials never follow it.
                .redirect_auth_headers(ureq::RedirectAuthHeaders::Never)
                // A blob split over connections (pipeline::fetch) asks for
                // its chunks over as many kept-alive connections.
                .max_idle_connections_per_host(MAX_IDLE_PER_HOST)
                .user_agent(concat!("unlade/", env!("CARGO_PKG_VERSION")));
            if ep.base.starts_with("https://") {
                b = b.tls_config(tls::client_config(&ep)?);
            }
            endpoints.push((ep, b.build()));
        }
        Ok(Remote {
            reference: reference.clone(),
            endpoints,
            docker_config: opts.docker_config.clone().or_else(auth::docker_config_path),
            keyring: opts.keyring.clone(),
            auth: Mutex::new(HashMap::new()),
            docs: Mutex::new(HashMap::new()),
            retry: Retry {
                stall: crate::source::Stall {
                    window: opts.read_timeout,
                    ..opts.retry.stall
                },
                ..opts.retry
            },
            deadline: opts.deadline,
            stats: RemoteStats::default(),
        })
    }

    /// The reference this client serves.
    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    /// Runs `f` until it succeeds, fails for good, or has failed
    /// `retry.attempts` times with transient errors (waiting with back-off
    /// and `Retry-After` in between).
    pub fn with_retry<T>(
        &self,
        cancel: &Cancel,
        mut f: impl FnMut() -> Result<T, SourceError>,
    ) -> Result<T, SourceError> {
        let (mut n, mut stalls) = (0, 0);
        loop {
            match f() {
                Ok(v) => return Ok(v),
                Err(e) if e.kind == SourceErrorKind::Transient && n + 1 < self.retry.attempts => {
                    n += 1;
                    if !self.retry.wait(n, e.retry_after, cancel) {
                        return Err(e);
                    }
                }
                Err(e)
                    if e.kind == SourceErrorKind::Stalled
                        && stalls + 1 < self.retry.stall.attempts
                        && n + 1 < self.retry.attempts =>
                {
                    n += 1;
                    stalls += 1;
                    if !self.retry.wait(n, e.retry_after, cancel) {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Resolves the reference to its top manifest or index: digest and
    /// media type. A tag is asked with HEAD (the digest comes in
    /// `Docker-Content-Digest`), and with GET where HEAD does not say; a
    /// digest reference is fetched and checked.
    pub fn resolve(&self, cancel: &Cancel) -> Result<(Digest, String), SourceError> {
        if let Some(d) = self.reference.digest {
            let (_, mt) = self.with_retry(cancel, || self.document(&d, true))?;
            return Ok((d, mt));
        }
        let object = self.reference.object();
        let path = format!("/{}/manifests/{object}", self.reference.repository);
        let head = self.with_retry(cancel, || {
            let (resp, _) = self.request(Cap::Resolve, "HEAD", &path, &[])?;
            let d = resp
                .header("Docker-Content-Digest")
                .and_then(|h| h.trim().parse::<Digest>().ok());
            let mt = content_type(&resp);
            Ok(d.zip(mt))
        })?;
        if let Some((d, mt)) = head {
            if crate::oci::image::is_manifest_type(&mt) {
                return Ok((d, mt));
            }
        }
        // No usable HEAD answer: GET by tag and hash the body.
        let (d, mt) = self.with_retry(cancel, || {
            let (resp, ep) = self.request(Cap::Resolve, "GET", &path, &[])?;
            let ct = content_type(&resp);
            let header = resp
                .header("Docker-Content-Digest")
                .and_then(|h| h.trim().parse::<Digest>().ok());
            let body = self.read_bounded(resp, &ep.authority, &path)?;
            let d = Digest::of(&body);
            if header.is_some_and(|h| h != d) {
                return Err(SourceError::fatal(format!(
                    "{}{path}: body hashes to {d}, not the Docker-Content-Digest the registry sent",
                    ep.authority
                )));
            }
            let mt = media_type_of(&body, ct.as_deref())?;
            let (_, mt) = self.remember(d, body, mt);
            Ok((d, mt))
        })?;
        Ok((d, mt))
    }

    fn remember(&self, d: Digest, body: Vec<u8>, media_type: String) -> Doc {
        let doc = (Arc::new(body), media_type);
        self.docs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(d, doc.clone());
        doc
    }

    fn cached(&self, d: &Digest) -> Option<Doc> {
        self.docs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(d)
            .cloned()
    }

    /// Manifest or index `d` (`manifest`), or config blob `d`: its bytes,
    /// bounded and checked against `d`, and (for a manifest) its media
    /// type. Kept for the content store.
    fn document(&self, d: &Digest, manifest: bool) -> Result<Doc, SourceError> {
        if let Some(hit) = self.cached(d) {
            return Ok(hit);
        }
        let (section, what) = if manifest {
            ("manifests", "manifest")
        } else {
            ("blobs", "blob")
        };
        let path = format!("/{}/{section}/{d}", self.reference.repository);
        let (resp, ep) = self.request(Cap::Pull, "GET", &path, &[])?;
        let ct = content_type(&resp);
        let body = self.read_bounded(resp, &ep.authority, &path)?;
        let actual = Digest::of(&body);
        if actual != *d {
            return Err(SourceError::fatal(format!(
                "{}{path}: {what} hashes to {actual}, not {d}",
                ep.authority
            )));
        }
        let mt = if manifest {
            media_type_of(&body, ct.as_deref())?
        } else {
            String::new()
        };
        Ok(self.remember(*d, body, mt))
    }

    /// Sends one request to the first endpoint (with capability `cap`)
    /// that answers it successfully; mirrors that fail are skipped. The
    /// error is the last endpoint's (the upstream's).
    fn request(
        &self,
        cap: Cap,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
    ) -> Result<(ureq::Response, &Endpoint), SourceError> {
        let mut last = None;
        for (ep, agent) in &self.endpoints {
            let allowed = match cap {
                Cap::Resolve => ep.resolve,
                Cap::Pull | Cap::Blob => ep.pull,
            };
            if !allowed {
                continue;
            }
            match self.request_one(ep, agent, method, path, headers, cap != Cap::Blob) {
                Ok(r) => return Ok((r, ep)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            SourceError::fatal(format!(
                "{}: no endpoint in hosts.toml may serve this request",
                self.reference.registry
            ))
        }))
    }

    fn request_one(
        &self,
        ep: &Endpoint,
        agent: &ureq::Agent,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        small: bool,
    ) -> Result<ureq::Response, SourceError> {
        let mut url = format!("{}{path}", ep.base);
        if ep.mirror {
            url.push_str("?ns=");
            url.push_str(&self.reference.registry);
        }
        let accept = crate::oci::image::manifest_types()
            .collect::<Vec<_>>()
            .join(", ");
        let mut answered_challenge = false;
        loop {
            let mut req = agent.request(method, &url).set("Accept", &accept);
            for (k, v) in &ep.headers {
                req = req.set(k, v);
            }
            for (k, v) in headers {
                req = req.set(k, v);
            }
            if let Some(h) = self.auth_header(&ep.authority) {
                req = req.set("Authorization", &h);
            }
            let what = format!("{} {method} {url}", ep.authority);
            req = self.bounded(req, &what, small)?;
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            match req.call() {
                Ok(r) => return Ok(r),
                Err(ureq::Error::Status(401, resp)) if !answered_challenge => {
                    let ch = resp.header("WWW-Authenticate").map(str::to_string);
                    let Some(ch) = ch else {
                        return Err(status_error(&what, 401, resp));
                    };
                    self.answer_challenge(ep, agent, &ch)?;
                    answered_challenge = true;
                }
                Err(ureq::Error::Status(code, resp)) => {
                    return Err(status_error(&what, code, resp))
                }
                Err(ureq::Error::Transport(t)) => {
                    let text = format!("{what}: {}", transport_text(&t, &url));
                    return Err(if is_read_timeout(&t) {
                        // Connected, asked, and no answer in the read
                        // timeout: a silent registry, not worth asking
                        // again and again.
                        SourceError::stalled(text)
                    } else {
                        SourceError::transient(text)
                    });
                }
            }
        }
    }

    fn auth_header(&self, authority: &str) -> Option<String> {
        let g = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        let a = g.get(authority)?;
        if a.until.is_some_and(|t| Instant::now() >= t) {
            return None;
        }
        Some(a.header.clone())
    }

    /// The secret for endpoint `ep` (see [`auth`] for the order): lent
    /// for this repository, else the Docker config's for the endpoint or
    /// for its registry (whose entry serves its mirrors too).
    fn secret(&self, ep: &Endpoint) -> Result<Option<auth::Secret>, SourceError> {
        let r = &self.reference;
        if let Some(s) = self
            .keyring
            .as_ref()
            .and_then(|k| k.get(&r.registry, &r.repository, &ep.authority))
        {
            return Ok(Some(s));
        }
        let Some(p) = &self.docker_config else {
            return Ok(None);
        };
        for host in [&ep.authority, &r.registry] {
            if let Some(s) = auth::docker_secret(p, host).map_err(SourceError::fatal)? {
                return Ok(Some(s));
            }
        }
        Ok(None)
    }

    /// Answers a 401's `WWW-Authenticate` challenge: Basic with the
    /// configured credentials, or a Bearer token from the realm.
    fn answer_challenge(
        &self,
        ep: &Endpoint,
        agent: &ureq::Agent,
        header: &str,
    ) -> Result<(), SourceError> {
        let denied = |m: String| SourceError::new(SourceErrorKind::Denied, m);
        let ch = auth::parse_challenge(header).ok_or_else(|| {
            SourceError::fatal(format!(
                "{}: unreadable WWW-Authenticate header {header:?}",
                ep.authority
            ))
        })?;
        let secret = self.secret(ep)?;
        let auth = match (ch.scheme.as_str(), secret) {
            ("basic", Some(auth::Secret::Password(c))) => Auth {
                header: c.basic(),
                until: None,
            },
            ("basic", Some(_)) => {
                return Err(denied(format!(
                    "{}: authentication required (Basic), and the credentials given for it are a token, not a user and password",
                    ep.authority
                )))
            }
            ("basic", None) => {
                return Err(denied(format!(
                    "{}: authentication required (Basic) and no credentials were given for it \
                     (kubelet's pull secret, the Docker config's credHelpers, credsStore or auths)",
                    ep.authority
                )))
            }
            ("bearer", Some(auth::Secret::RegistryToken(t))) => Auth {
                header: format!("Bearer {t}"),
                until: None,
            },
            ("bearer", creds) => {
                let realm = ch.params.get("realm").ok_or_else(|| {
                    SourceError::fatal(format!(
                        "{}: Bearer challenge without a realm",
                        ep.authority
                    ))
                })?;
                let scope = format!("repository:{}:pull", self.reference.repository);
                let service = ch.params.get("service").map(String::as_str);
                let what = format!("token from {realm}");
                let answer = match &creds {
                    // OAuth2's refresh grant: the identity token is
                    // exchanged for an access token.
                    Some(auth::Secret::IdentityToken(t)) => {
                        let req = self.bounded(agent.post(realm), &what, true)?;
                        let mut form = vec![
                            ("grant_type", "refresh_token"),
                            ("refresh_token", t.as_str()),
                            ("client_id", "unlade"),
                            ("scope", scope.as_str()),
                        ];
                        if let Some(s) = service {
                            form.push(("service", s));
                        }
                        self.stats.requests.fetch_add(1, Ordering::Relaxed);
                        req.send_form(&form)
                    }
                    _ => {
                        let mut req = agent.get(realm).query("scope", &scope);
                        if let Some(s) = service {
                            req = req.query("service", s);
                        }
                        if let Some(auth::Secret::Password(c)) = &creds {
                            req = req.set("Authorization", &c.basic());
                        }
                        let req = self.bounded(req, &what, true)?;
                        self.stats.requests.fetch_add(1, Ordering::Relaxed);
                        req.call()
                    }
                };
                let resp = match answer {
                    Ok(r) => r,
                    Err(ureq::Error::Status(code, resp)) => {
                        let mut e = status_error(&what, code, resp);
                        if code == 401 || code == 403 {
                            e.kind = SourceErrorKind::Denied;
                        }
                        return Err(e);
                    }
                    Err(ureq::Error::Transport(t)) => {
                        return Err(SourceError::transient(format!(
                            "{what}: {}",
                            transport_text(&t, realm)
                        )))
                    }
                };
                let body = self.read_bounded(resp, realm, "")?;
                let t: auth::TokenResponse = serde_json::from_slice(&body)
                    .map_err(|e| SourceError::fatal(format!("{what}: {e}")))?;
                let token = t
                    .token
                    .or(t.access_token)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| SourceError::fatal(format!("{what}: no token in the answer")))?;
                Auth {
                    header: format!("Bearer {token}"),
                    until: Some(Instant::now() + token_reuse(t.expires_in)),
                }
            }
            other => {
                return Err(SourceError::fatal(format!(
                    "{}: unsupported auth scheme {other:?}",
                    ep.authority
                )))
            }
        };
        self.auth
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ep.authority.clone(), auth);
        Ok(())
    }
}

/// The response's media type, without parameters.
fn content_type(resp: &ureq::Response) -> Option<String> {
    resp.header("Content-Type")
        .map(|c| c.split(';').next().unwrap_or("").trim().to_string())
        .filter(|c| !c.is_empty())
}

/// A document's media type: its `mediaType` field, else a manifest type
/// from the `Content-Type`, else its shape.
fn media_type_of(body: &[u8], content_type: Option<&str>) -> Result<String, SourceError> {
    #[derive(serde::Deserialize)]
    struct Peek {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde::de::IgnoredAny>,
        layers: Option<serde::de::IgnoredAny>,
    }
    let p: Peek = serde_json::from_slice(body)
        .map_err(|e| SourceError::fatal(format!("manifest is not JSON: {e}")))?;
    if let Some(mt) = p
        .media_type
        .filter(|m| crate::oci::image::is_manifest_type(m))
    {
        return Ok(mt);
    }
    if let Some(ct) = content_type.filter(|c| crate::oci::image::is_manifest_type(c)) {
        return Ok(ct.to_string());
    }
    if p.manifests.is_some() {
        return Ok("application/vnd.oci.image.index.v1+json".into());
    }
    if p.layers.is_some() {
        return Ok("application/vnd.oci.image.manifest.v1+json".into());
    }
    Err(SourceError::fatal(
        "the registry's answer is neither an image index nor a manifest",
    ))
}

impl Remote {
    /// A document's body (a manifest, an index, a config, a token),
    /// bounded in size and held to the minimum-progress rule: a registry
    /// sending a manifest a byte at a time fails like a silent one.
    fn read_bounded(
        &self,
        resp: ureq::Response,
        host: &str,
        path: &str,
    ) -> Result<Vec<u8>, SourceError> {
        let mut r = resp.into_reader().take(MAX_JSON + 1);
        let mut body = Vec::new();
        let mut progress = crate::source::Progress::new(self.retry.stall, 0);
        let mut buf = [0u8; 16 << 10];
        loop {
            match progress.read(&mut r, &mut buf, body.len() as u64) {
                Ok(0) => break,
                Ok(n) => body.extend_from_slice(&buf[..n]),
                Err(mut e) => {
                    e.message = format!("{host}{path}: reading the answer: {}", e.message);
                    return Err(e);
                }
            }
        }
        if body.len() as u64 > MAX_JSON {
            return Err(SourceError::fatal(format!(
                "{host}{path}: document larger than {MAX_JSON} bytes"
            )));
        }
        Ok(body)
    }

    /// `req` with its overall timeout: a request whose answer is `small`
    /// (a document, a token, a HEAD) must be whole within the read
    /// timeout and what is left of [`RemoteOptions::deadline`], headers
    /// and body, so that a registry sending its answer a byte at a time
    /// holds it no longer. A blob's request gets none (its body may take
    /// minutes; the fetcher's minimum-progress rule judges it, and ureq's
    /// overall timeout would replace the read timeout that notices a
    /// silence). Past the deadline, no request is sent.
    fn bounded(
        &self,
        req: ureq::Request,
        what: &str,
        small: bool,
    ) -> Result<ureq::Request, SourceError> {
        let left = match self.deadline {
            None => None,
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => {
                    return Err(SourceError::fatal(format!(
                        "{what}: the operation's deadline passed"
                    )))
                }
            },
        };
        if !small {
            return Ok(req);
        }
        let whole = left.map_or(self.retry.stall.window, |l| l.min(self.retry.stall.window));
        Ok(req.timeout(whole))
    }
}

/// Whether a transport failure is the read timeout: the registry took
/// the request and then said nothing.
fn is_read_timeout(t: &ureq::Transport) -> bool {
    t.kind() == ureq::ErrorKind::Io
        && std::error::Error::source(t)
            .and_then(|e| e.downcast_ref::<std::io::Error>())
            .is_some_and(crate::source::is_timeout)
}

/// An HTTP error status as one line: the status, the registry's error
/// code and message, and what to do about it; 429 and 5xx are transient.
/// A transport failure (connect, TLS, a cut answer) in words: ureq's text
/// less the URL, which the caller's text names already (`url`), unless a
/// redirect made it another.
fn transport_text(t: &ureq::Transport, url: &str) -> String {
    let without_query = |u: &str| u.split('?').next().unwrap_or_default().to_string();
    let mut out = match t.url() {
        Some(u) if without_query(u.as_str()) != without_query(url) => format!("{u}: "),
        _ => String::new(),
    };
    out.push_str(&t.kind().to_string());
    if let Some(m) = t.message() {
        out.push_str(": ");
        out.push_str(m);
    }
    if let Some(e) = std::error::Error::source(t) {
        out.push_str(": ");
        out.push_str(&crate::report::error_chain(e));
    }
    out
}

fn status_error(what: &str, code: u16, resp: ureq::Response) -> SourceError {
    let retry_after = resp
        .header("Retry-After")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let mut body = String::new();
    let _ = resp
        .into_reader()
        .take(ACCEPT_ERR_BODY)
        .read_to_string(&mut body);
    let detail = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            let e = v.get("errors")?.get(0)?;
            Some(format!(
                " ({}: {})",
                e.get("code")?.as_str()?,
                e.get("message").and_then(|m| m.as_str()).unwrap_or("")
            ))
        })
        .unwrap_or_default();
    let (kind, what_now) = match code {
        401 => (
            SourceErrorKind::Denied,
            ": authentication failed; check the credentials (kubelet's pull secret, or the Docker config)",
        ),
        403 => (SourceErrorKind::Denied, ": access denied"),
        404 => (SourceErrorKind::NotFound, ": not found"),
        429 => (SourceErrorKind::Transient, ": too many requests"),
        500..=599 => (SourceErrorKind::Transient, ""),
        _ => (SourceErrorKind::Fatal, ""),
    };
    SourceError {
        kind,
        message: format!("{what}: HTTP {code}{what_now}{detail}"),
        retry_after,
        status: Some(code),
    }
}

/// Counts a download's bytes.
struct Counted<R> {
    inner: R,
    remote: Arc<Remote>,
}

impl Counted<Box<dyn Read + Send + Sync + 'static>> {
    /// A blob response's body, counted into `remote`'s statistics.
    fn boxed(resp: ureq::Response, remote: &Arc<Remote>) -> Box<dyn Read + Send> {
        Box::new(Counted {
            inner: resp.into_reader(),
            remote: remote.clone(),
        })
    }
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.remote
            .stats
            .blob_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl Documents for Remote {
    fn document(&self, d: &Digest, config: bool) -> Result<Vec<u8>, ImageError> {
        let cancel = Cancel::new();
        self.with_retry(&cancel, || self.document(d, !config))
            .map(|(b, _)| b.as_ref().clone())
            .map_err(|e| ImageError::Source(Box::new(e)))
    }
}

/// A blob source over an `Arc<Remote>` (it counts bytes into the remote).
#[derive(Debug, Clone)]
pub struct RemoteBlobs(pub Arc<Remote>);

impl BlobSource for RemoteBlobs {
    fn open(
        &self,
        d: &Digest,
        offset: u64,
        _cancel: &Cancel,
    ) -> Result<Box<dyn Read + Send>, SourceError> {
        let remote = &self.0;
        if let Some((b, _)) = remote.cached(d) {
            let mut c = std::io::Cursor::new(b.as_ref().clone());
            c.set_position(offset);
            return Ok(Box::new(c));
        }
        let path = format!("/{}/blobs/{d}", remote.reference.repository);
        let range = [("Range", format!("bytes={offset}-"))];
        let headers: &[(&str, String)] = if offset > 0 { &range } else { &[] };
        let (resp, ep) = remote.request(Cap::Blob, "GET", &path, headers)?;
        let partial = resp.status() == 206;
        let mut r = Counted::boxed(resp, remote);
        if offset > 0 && !partial {
            // The server ignored the Range: skip what we have, held to the
            // minimum-progress rule like the rest of the body.
            let mut progress = crate::source::Progress::new(remote.retry.stall, 0);
            let mut skipped = 0u64;
            let mut buf = vec![0u8; 64 << 10];
            while skipped < offset {
                let want = buf.len().min((offset - skipped) as usize);
                match progress.read(&mut r, &mut buf[..want], skipped) {
                    Ok(0) => break,
                    Ok(n) => skipped += n as u64,
                    Err(mut e) => {
                        e.message = format!(
                            "{}{path}: skipping to byte {offset}: {}",
                            ep.authority, e.message
                        );
                        return Err(e);
                    }
                }
            }
            if skipped < offset {
                return Err(SourceError::transient(format!(
                    "{}{path}: blob shorter than {offset} bytes",
                    ep.authority
                )));
            }
        }
        Ok(r)
    }

    fn open_range(
        &self,
        d: &Digest,
        range: std::ops::Range<u64>,
        size: u64,
        _cancel: &Cancel,
    ) -> Result<Ranged, SourceError> {
        let remote = &self.0;
        if let Some((b, _)) = remote.cached(d) {
            let part = b
                .get(range.start as usize..range.end as usize)
                .map(<[u8]>::to_vec)
                .unwrap_or_default();
            return Ok(Ranged::Part(Box::new(std::io::Cursor::new(part))));
        }
        // The endpoint that serves blobs when nothing is down.
        let first = remote.endpoints.iter().map(|(e, _)| e).find(|e| e.pull);
        if let Some(ep) = first.filter(|e| ranges_refused(&e.authority)) {
            return Ok(Ranged::Refused(format!(
                "{} answered a range request badly before",
                ep.authority
            )));
        }
        let path = format!("/{}/blobs/{d}", remote.reference.repository);
        let asked = format!("bytes={}-{}", range.start, range.end.saturating_sub(1));
        let (resp, ep) = match remote.request(Cap::Blob, "GET", &path, &[("Range", asked.clone())])
        {
            Ok(r) => r,
            Err(e) if matches!(e.status, Some(416 | 501)) => {
                let why = format!(
                    "{}: {asked} refused: {}",
                    first.map_or("", |e| &e.authority),
                    e.message
                );
                if let Some(ep) = first {
                    refuse_ranges(&ep.authority);
                }
                return Ok(Ranged::Refused(why));
            }
            Err(e) => return Err(e),
        };
        match resp.status() {
            206 => {
                let cr = resp.header("Content-Range").unwrap_or("").to_string();
                if content_range_is(&cr, &range, size) {
                    return Ok(Ranged::Part(Counted::boxed(resp, remote)));
                }
                refuse_ranges(&ep.authority);
                Ok(Ranged::Refused(format!(
                    "{}{path}: asked {asked}, got Content-Range {cr:?}",
                    ep.authority
                )))
            }
            _ => {
                refuse_ranges(&ep.authority);
                Ok(Ranged::Whole(Counted::boxed(resp, remote)))
            }
        }
    }

    fn describe(&self) -> String {
        format!("registry {}", self.0.reference.name())
    }
}

#[cfg(test)]
mod range_tests {
    use super::*;

    #[test]
    fn a_content_range_must_name_the_bytes_asked() {
        let r = 100..200;
        assert!(content_range_is("bytes 100-199/1000", &r, 1000));
        assert!(content_range_is("bytes 100-199/*", &r, 1000));
        for wrong in [
            "bytes 100-198/1000",
            "bytes 101-199/1000",
            "bytes 100-199/999",
            "bytes 100-199",
            "100-199/1000",
            "bytes x-199/1000",
            "",
        ] {
            assert!(!content_range_is(wrong, &r, 1000), "{wrong}");
        }
    }
}

/// How long a token is reused: until a little before the deadline the
/// registry gave (`expires_in`, 60 s when absent), at least 9 s; a lifetime
/// past a day is taken as a day, so a huge `expires_in` can overflow
/// neither the arithmetic nor the clock.
fn token_reuse(expires_in: Option<u64>) -> Duration {
    let life = expires_in.unwrap_or(60).clamp(10, 86_400);
    Duration::from_secs(life - life / 10)
}

#[cfg(test)]
mod token_tests {
    use super::*;

    #[test]
    fn token_reuse_is_bounded() {
        assert_eq!(token_reuse(None), Duration::from_secs(54));
        assert_eq!(token_reuse(Some(0)), Duration::from_secs(9));
        assert_eq!(token_reuse(Some(u64::MAX)), Duration::from_secs(77_760));
        // Found in review beside the fuzz campaign: `life * 9 / 10` overflowed.
        let _ = Instant::now() + token_reuse(Some(3_000_000_000_000_000_000));
    }
}

#[cfg(test)]
mod transport_tests {
    use super::*;

    #[test]
    fn a_refused_connection_names_its_url_once() {
        // Port 1 on loopback: nothing listens, the kernel refuses at once.
        let url = "http://127.0.0.1:1/v2/";
        let Err(ureq::Error::Transport(t)) = ureq::get(url).call() else {
            panic!("a request to a closed port succeeded");
        };
        let text = transport_text(&t, url);
        assert!(!text.contains("127.0.0.1"), "{text}");
        assert!(text.starts_with("Connection Failed"), "{text}");
        // A URL other than the one asked for (a redirect) is kept.
        let text = transport_text(&t, "http://elsewhere/v2/");
        assert!(text.starts_with(url), "{text}");
    }
}
