//! Registry authentication: where credentials come from, and the
//! challenges registries answer a 401 with.
//!
//! Credentials for a registry are looked up in this order, the first that
//! has some winning:
//! 1. a [`Keyring`]: secrets a caller lends for the time of one pull (the
//!    snapshotter's CRI proxy lends the `auth` of kubelet's PullImage,
//!    which is how a pod's `imagePullSecrets` reach a node), kept in
//!    memory only;
//! 2. the Docker config's `credHelpers` entry for the registry, then its
//!    `credsStore`: a `docker-credential-NAME get` helper asked for them;
//! 3. its `auths` entry.
//!
//! A secret is sent only to the registry it was given for (and the mirrors
//! its `hosts.toml` lists), and to the token realm it names; never along a
//! redirect (the HTTP client drops `Authorization` on every redirect).
//! Challenges:
//! - `Basic realm=…`: user and password are sent with each request.
//! - `Bearer realm=…,service=…,scope=…`: a token is asked of `realm` (with
//!   user and password if there are any, an identity token by OAuth2's
//!   refresh grant, anonymously otherwise) for the repository's pull
//!   scope, and reused until it expires. A registry token (CRI's
//!   `registry_token`) is sent as the bearer token itself.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;

/// A user name and password (or identity token).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name sent with Basic auth or to the token realm.
    pub user: String,
    /// The password or token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, ***)", self.user)
    }
}

impl Credentials {
    /// The `Authorization` header value for Basic auth.
    pub fn basic(&self) -> String {
        let raw = format!("{}:{}", self.user, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// A registry secret, as it is sent.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// A user name and password: Basic auth, or Basic to a token realm.
    Password(Credentials),
    /// An OAuth2 refresh token (Docker's "identity token"), exchanged at a
    /// Bearer realm for an access token.
    IdentityToken(String),
    /// A bearer token for the registry itself, sent as it is.
    RegistryToken(String),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::Password(c) => write!(f, "{c:?}"),
            Secret::IdentityToken(_) => f.write_str("IdentityToken(***)"),
            Secret::RegistryToken(_) => f.write_str("RegistryToken(***)"),
        }
    }
}

/// The most secrets a [`Keyring`] holds at once: one per pull in flight
/// is what kubelet lends; past this, a lend is refused (the pull then goes
/// without, and the fast path falls back to containerd).
pub const MAX_LENT: usize = 4096;
/// The largest secret a [`Keyring`] takes (registry tokens are a few KiB),
/// so that it holds at most [`MAX_LENT`] of these.
pub const MAX_SECRET: usize = 64 << 10;

struct Loan {
    id: u64,
    registry: String,
    repository: String,
    /// The host the secret is for when its giver named one (CRI's
    /// `server_address`); endpoints of other hosts do not get it.
    server: Option<String>,
    secret: Secret,
}

/// Secrets lent for a while, in memory only: never written, never logged
/// (their `Debug` says which registry, not what). The snapshotter's CRI
/// proxy lends each PullImage's credentials for that image's registry and
/// repository while the pull runs; the fast path's pulls of that
/// repository find them here.
#[derive(Default)]
pub struct Keyring {
    loans: Mutex<(u64, Vec<Loan>)>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.loans.lock().unwrap_or_else(|p| p.into_inner());
        write!(f, "Keyring({} lent)", g.1.len())
    }
}

/// A secret in a [`Keyring`], taken back when this is dropped.
#[must_use = "the secret is taken back when this is dropped"]
pub struct Lent {
    ring: Arc<Keyring>,
    id: u64,
}

impl Drop for Lent {
    fn drop(&mut self) {
        let mut g = self.ring.loans.lock().unwrap_or_else(|p| p.into_inner());
        g.1.retain(|l| l.id != self.id);
    }
}

impl Keyring {
    /// Lends `secret` for `repository` of `registry` (both as a parsed
    /// reference has them) until the returned [`Lent`] is dropped;
    /// `server`, if given, is the only host it may be sent to. `None` when
    /// [`MAX_LENT`] secrets are lent already, or the secret is over
    /// [`MAX_SECRET`] bytes.
    pub fn lend(
        self: &Arc<Self>,
        registry: &str,
        repository: &str,
        server: Option<&str>,
        secret: Secret,
    ) -> Option<Lent> {
        let size = match &secret {
            Secret::Password(c) => c.user.len() + c.password.len(),
            Secret::IdentityToken(t) | Secret::RegistryToken(t) => t.len(),
        };
        if size > MAX_SECRET {
            return None;
        }
        let mut g = self.loans.lock().unwrap_or_else(|p| p.into_inner());
        if g.1.len() >= MAX_LENT {
            return None;
        }
        g.0 += 1;
        let id = g.0;
        g.1.push(Loan {
            id,
            registry: registry.to_string(),
            repository: repository.to_string(),
            server: server.map(str::to_string),
            secret,
        });
        Some(Lent {
            ring: self.clone(),
            id,
        })
    }

    /// The secret most recently lent for `repository` of `registry`, to be
    /// sent to `host` (the registry or one of its mirrors).
    pub fn get(&self, registry: &str, repository: &str, host: &str) -> Option<Secret> {
        let g = self.loans.lock().unwrap_or_else(|p| p.into_inner());
        g.1.iter()
            .rev()
            .find(|l| {
                l.registry == registry
                    && l.repository == repository
                    && l.server.as_deref().is_none_or(|s| key_names(s, host))
            })
            .map(|l| l.secret.clone())
    }

    /// How many secrets are lent now.
    pub fn len(&self) -> usize {
        self.loans.lock().unwrap_or_else(|p| p.into_inner()).1.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// The Docker config file: `$DOCKER_CONFIG/config.json`, else
/// `~/.docker/config.json`.
pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// The key a Docker config `auths` entry is stored under, reduced to
/// `host[:port]` (entries may be URLs, `https://index.docker.io/v1/`).
pub(crate) fn auth_key_host(key: &str) -> &str {
    let k = key.split_once("://").map_or(key, |(_, r)| r);
    k.split('/').next().unwrap_or(k)
}

/// Credentials for `host` (a registry's `host[:port]`, or an endpoint's)
/// from the Docker config at `path`. A missing file means none; a file
/// that cannot be read or parsed is an error.
pub fn credentials_for(path: &std::path::Path, host: &str) -> Result<Option<Credentials>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    credentials_from_str(&text, path, host)
}

/// Whether a Docker config key (`host[:port]`, or a URL) names `host`;
/// Docker Hub's names are one.
fn key_names(key: &str, host: &str) -> bool {
    let hub = crate::oci::reference::DOCKER_HUB_NAMES;
    let h = auth_key_host(key);
    h == host || (hub.contains(&host) && hub.contains(&h))
}

/// A secret for `host` from the Docker config at `path`: its
/// `credHelpers` entry for the host, then its `credsStore` (each a
/// `docker-credential-NAME` program on `PATH`, see [`helper_get`]), then
/// its `auths`. A missing file means none; a file that cannot be read or
/// parsed, or a helper that fails (other than having nothing for the
/// host), is an error.
pub fn docker_secret(path: &std::path::Path, host: &str) -> Result<Option<Secret>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let cfg: DockerConfig =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let helper = cfg
        .cred_helpers
        .iter()
        .find(|(k, _)| key_names(k, host))
        .map(|(_, v)| v);
    for name in helper.into_iter().chain(cfg.creds_store.as_ref()) {
        if let Some(s) = helper_get(name, host, HELPER_TIMEOUT)
            .map_err(|e| format!("{}: credential helper {name:?}: {e}", path.display()))?
        {
            return Ok(Some(s));
        }
    }
    Ok(auths_entry(&cfg, path, host)?.map(Secret::Password))
}

/// How long a credential helper may take.
pub const HELPER_TIMEOUT: Duration = Duration::from_secs(10);
/// The most bytes read of a helper's answer.
const HELPER_MAX_OUTPUT: u64 = 64 << 10;

/// What a `docker-credential-*` helper answers to `get`.
#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// Asks credential helper `docker-credential-NAME` (found on `PATH`) for
/// `host`'s secret by Docker's protocol: `get`, the server on stdin, a
/// JSON object `{"Username", "Secret"}` on stdout; the user name
/// `<token>` means the secret is an identity token. `None` when the helper
/// has nothing for the host ("credentials not found") or is not installed.
/// Bounded: `timeout` (then the helper and its process group are killed),
/// 64 KiB of answer.
/// `NAME` is letters, digits, `-`, `_` and `.` only, so that a config
/// cannot name a program by path.
pub fn helper_get(name: &str, host: &str, timeout: Duration) -> Result<Option<Secret>, String> {
    if name.is_empty()
        || name.starts_with('.')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err("not a helper name (letters, digits, '-', '_', '.')".into());
    }
    let hub = crate::oci::reference::DOCKER_HUB_NAMES;
    // Docker Hub's credentials are stored under its v1 index URL.
    let server = if hub.contains(&host) {
        "https://index.docker.io/v1/"
    } else {
        host
    };
    let program = format!("docker-credential-{name}");
    // Its own process group: a helper that leaves a child behind (an
    // agent it starts) is stopped with it on a timeout.
    use std::os::unix::process::CommandExt;
    let mut child = match std::process::Command::new(&program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        // Not installed: it has nothing for anyone (Docker would fail
        // every pull, anonymous ones included; a node should not).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("run {program}: {e}")),
    };
    if let Some(mut i) = child.stdin.take() {
        // A helper that exits without reading is judged by its exit.
        let _ = i.write_all(server.as_bytes());
    }
    // Its output, read on threads of their own and handed over by
    // channel, so that a pipe some other process keeps open (its child)
    // cannot hold this up past the deadline.
    let read = |r: Option<Box<dyn Read + Send>>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(r) = r {
                let _ = r.take(HELPER_MAX_OUTPUT).read_to_end(&mut v);
            }
            let _ = tx.send(v);
        });
        rx
    };
    let out = read(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = read(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let deadline = std::time::Instant::now() + timeout;
    let stop = |child: &mut std::process::Child| {
        if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = child.kill();
        let _ = child.wait();
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Ok(None) => {
                stop(&mut child);
                return Err(format!(
                    "{program} get: no answer in {} s",
                    timeout.as_secs()
                ));
            }
            Err(e) => {
                stop(&mut child);
                return Err(format!("{program} get: {e}"));
            }
        }
    };
    let left = || {
        deadline
            .saturating_duration_since(std::time::Instant::now())
            .max(Duration::from_millis(100))
    };
    let out = out.recv_timeout(left()).unwrap_or_default();
    let err = err.recv_timeout(left()).unwrap_or_default();
    if !status.success() {
        let said = String::from_utf8_lossy(if out.is_empty() { &err } else { &out })
            .trim()
            .chars()
            .take(200)
            .collect::<String>();
        if said.to_ascii_lowercase().contains("credentials not found") {
            return Ok(None);
        }
        return Err(format!("{program} get: {status}: {said}"));
    }
    let a: HelperAnswer = serde_json::from_slice(&out)
        .map_err(|e| format!("{program} get: unreadable answer: {e}"))?;
    if a.secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(if a.username == "<token>" {
        Secret::IdentityToken(a.secret)
    } else {
        Secret::Password(Credentials {
            user: a.username,
            password: a.secret,
        })
    }))
}

/// Credentials for `host` from the Docker config text `text`'s `auths`:
/// [`credentials_for`] once it has read the file at `path` (which only
/// names it in errors). Public so that the parser can be driven without a
/// file (the `auth` fuzz target).
pub fn credentials_from_str(
    text: &str,
    path: &std::path::Path,
    host: &str,
) -> Result<Option<Credentials>, String> {
    let cfg: DockerConfig =
        serde_json::from_str(text).map_err(|e| format!("{}: {e}", path.display()))?;
    auths_entry(&cfg, path, host)
}

fn auths_entry(
    cfg: &DockerConfig,
    path: &std::path::Path,
    host: &str,
) -> Result<Option<Credentials>, String> {
    let Some(entry) = cfg
        .auths
        .iter()
        .find(|(k, _)| key_names(k, host))
        .map(|(_, v)| v)
    else {
        return Ok(None);
    };
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(Some(Credentials {
            user: u.clone(),
            password: p.clone(),
        }));
    }
    let Some(auth) = &entry.auth else {
        return Ok(None);
    };
    decode_auth(auth)
        .map(Some)
        .map_err(|why| format!("{}: auths.{host}.auth{why}", path.display()))
}

/// User and password from an `auth` value: base64 of `user:password`,
/// as the Docker config and CRI's `AuthConfig.auth` carry them. The error
/// says what is wrong, to follow the value's name (`: …`, ` is not …`).
pub fn decode_auth(auth: &str) -> Result<Credentials, String> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|e| format!(": {e}"))?;
    let raw = String::from_utf8(raw).map_err(|_| " is not UTF-8".to_string())?;
    let (user, password) = raw
        .split_once(':')
        .ok_or_else(|| " is not user:password".to_string())?;
    Ok(Credentials {
        user: user.to_string(),
        password: password.to_string(),
    })
}

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// `basic` or `bearer` (lowercased).
    pub scheme: String,
    /// Its parameters (names lowercased).
    pub params: BTreeMap<String, String>,
}

/// Parses `WWW-Authenticate: Bearer realm="…",service="…",scope="…"`
/// (quoted strings with `\` escapes, or tokens). Only the first challenge
/// is read; registries send one.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, mut rest) = match header.find(char::is_whitespace) {
        Some(i) => (&header[..i], header[i..].trim_start()),
        None => (header, ""),
    };
    if scheme.is_empty() {
        return None;
    }
    let mut params = BTreeMap::new();
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let name = rest[..eq].trim().to_ascii_lowercase();
        rest = rest[eq + 1..].trim_start();
        let value;
        if let Some(r) = rest.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = r.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => {
                        end = Some(i);
                        break;
                    }
                    c => v.push(c),
                }
            }
            let end = end?;
            value = v;
            rest = r[end + 1..].trim_start();
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        params.insert(name, value);
        rest = rest
            .trim_start()
            .strip_prefix(',')
            .unwrap_or(rest)
            .trim_start();
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

/// A token server's answer.
#[derive(Deserialize)]
pub struct TokenResponse {
    /// The token (Docker's name).
    #[serde(default)]
    pub token: Option<String>,
    /// The token (OAuth2's name).
    #[serde(default)]
    pub access_token: Option<String>,
    /// Lifetime in seconds (60 when absent, as the spec says).
    #[serde(default)]
    pub expires_in: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/redis:pull""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["service"], "registry.docker.io");
        assert_eq!(c.params["scope"], "repository:library/redis:pull");
        let c = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.params["realm"], "Registry Realm");
        let c = parse_challenge(r#"Bearer realm=x, error="a \"b\"", scope=s"#).unwrap();
        assert_eq!(c.params["realm"], "x");
        assert_eq!(c.params["error"], "a \"b\"");
        assert_eq!(c.params["scope"], "s");
        assert!(parse_challenge("Bearer realm=\"unterminated").is_none());
        assert!(parse_challenge("").is_none());
    }

    #[test]
    fn docker_config() {
        let d = std::env::temp_dir().join(format!("unlade-dockercfg-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("config.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3cr:et");
        std::fs::write(
            &p,
            format!(
                r#"{{"auths": {{"https://index.docker.io/v1/": {{"auth": "{b64}"}},
                   "127.0.0.1:5000": {{"username": "bob", "password": "pw"}}}}}}"#
            ),
        )
        .unwrap();
        let c = credentials_for(&p, "docker.io").unwrap().unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("alice", "s3cr:et"));
        assert_eq!(c.basic(), format!("Basic {b64}"));
        let c = credentials_for(&p, "127.0.0.1:5000").unwrap().unwrap();
        assert_eq!(c.user, "bob");
        assert!(credentials_for(&p, "quay.io").unwrap().is_none());
        assert!(credentials_for(&d.join("none.json"), "quay.io")
            .unwrap()
            .is_none());
        std::fs::write(&p, "{").unwrap();
        assert!(credentials_for(&p, "quay.io").is_err());
        std::fs::remove_dir_all(&d).unwrap();
        assert!(!format!("{c:?}").contains("pw"));
    }
}
