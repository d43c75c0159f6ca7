//! Registry authentication: credentials from the Docker config file, and
//! the challenges registries answer a 401 with.
//!
//! - `Basic realm=…`: the credentials are sent with each request.
//! - `Bearer realm=…,service=…,scope=…`: a token is asked of `realm` (with
//!   the credentials if there are any, anonymously otherwise) for the
//!   repository's pull scope, and reused until it expires.

use std::collections::BTreeMap;
use std::path::PathBuf;

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

#[derive(Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
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
fn auth_key_host(key: &str) -> &str {
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

/// Credentials for `host` from the Docker config text `text`:
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
    let hub = crate::oci::reference::DOCKER_HUB_NAMES;
    let wanted = |k: &str| {
        let h = auth_key_host(k);
        h == host || (hub.contains(&host) && hub.contains(&h))
    };
    let Some(entry) = cfg.auths.iter().find(|(k, _)| wanted(k)).map(|(_, v)| v) else {
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
    let raw = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|e| format!("{}: auths.{host}.auth: {e}", path.display()))?;
    let raw = String::from_utf8(raw)
        .map_err(|_| format!("{}: auths.{host}.auth is not UTF-8", path.display()))?;
    let (user, password) = raw
        .split_once(':')
        .ok_or_else(|| format!("{}: auths.{host}.auth is not user:password", path.display()))?;
    Ok(Some(Credentials {
        user: user.to_string(),
        password: password.to_string(),
    }))
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
