//! Per-registry host settings in containerd's `hosts.toml` format: which
//! endpoints to try for a registry (mirrors first, then the upstream), over
//! HTTP or HTTPS, with which CA, which extra headers.
//!
//! `DIR/<registry>/hosts.toml` (e.g. `/etc/unlade/certs.d/docker.io/hosts.toml`,
//! `…/localhost:5000/hosts.toml`), else `DIR/_default/hosts.toml`:
//!
//! ```toml
//! server = "https://registry-1.docker.io"   # the upstream (default: https://<registry>)
//!
//! [host."http://127.0.0.1:5001"]             # tried first, in file order
//!   capabilities = ["pull", "resolve"]
//!   skip_verify = false
//!   ca = "mirror-ca.pem"                      # relative to this file's directory
//!   [host."http://127.0.0.1:5001".header]
//!     x-origin = "unlade"
//! ```
//!
//! As in containerd, a host's path is used as the API prefix with
//! `override_path = true`, and `/v2` is appended otherwise; mirrors get
//! `?ns=<registry>` so a shared cache can tell upstreams apart.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::source::SourceError;

/// One place to send registry requests to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `scheme://authority` plus the API prefix (ending in `/v2`).
    pub base: String,
    /// The `host[:port]` part, for credentials and tokens.
    pub authority: String,
    /// May fetch blobs and manifests by digest.
    pub pull: bool,
    /// May resolve tags.
    pub resolve: bool,
    /// Extra CA certificates (PEM files) to trust.
    pub ca: Vec<PathBuf>,
    /// Accept any certificate (a test or lab registry).
    pub skip_verify: bool,
    /// Headers added to every request.
    pub headers: Vec<(String, String)>,
    /// A mirror (not the upstream): requests carry `ns=<registry>`.
    pub mirror: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HostsFile {
    server: Option<String>,
    #[serde(flatten)]
    settings: Settings,
    #[serde(default)]
    host: toml::map::Map<String, toml::Value>,
}

#[derive(Deserialize, Default, Clone)]
struct Settings {
    capabilities: Option<Vec<String>>,
    ca: Option<OneOrMany>,
    client: Option<toml::Value>,
    skip_verify: Option<bool>,
    #[serde(default)]
    header: toml::map::Map<String, toml::Value>,
    override_path: Option<bool>,
}

#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

fn invalid(path: &Path, detail: impl std::fmt::Display) -> SourceError {
    SourceError::fatal(format!("{}: {detail}", path.display()))
}

/// The upstream a registry name stands for when no `server` is set.
fn default_server(registry: &str, plain_http: bool) -> String {
    use crate::oci::reference::{DOCKER_HUB, DOCKER_HUB_API};
    let host = if registry == DOCKER_HUB {
        DOCKER_HUB_API
    } else {
        registry
    };
    let scheme = if plain_http { "http" } else { "https" };
    format!("{scheme}://{host}")
}

/// The endpoints to try for `registry`, in order: the mirrors of its
/// `hosts.toml` (if any), then the upstream. `plain_http` makes the
/// default upstream `http://`.
pub fn endpoints(
    hosts_dir: Option<&Path>,
    registry: &str,
    plain_http: bool,
) -> Result<Vec<Endpoint>, SourceError> {
    let file = hosts_dir.and_then(|d| {
        [registry, "_default"]
            .iter()
            .map(|n| d.join(n).join("hosts.toml"))
            .find(|p| p.is_file())
    });
    let Some(path) = file else {
        return Ok(vec![endpoint(
            &default_server(registry, plain_http),
            &Settings::default(),
            false,
            Path::new("/"),
        )
        .map_err(|e| invalid(Path::new(registry), e))?]);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| invalid(&path, e))?;
    endpoints_from_str(&text, &path, registry, plain_http)
}

/// The endpoints the `hosts.toml` text `text` gives for `registry`:
/// [`endpoints`] once it has found and read the file. `path` is where the
/// text came from: it names the file in errors, and relative `ca` paths
/// are taken from its directory. Public so that the parser can be driven
/// without a file (the `hosts` fuzz target).
pub fn endpoints_from_str(
    text: &str,
    path: &Path,
    registry: &str,
    plain_http: bool,
) -> Result<Vec<Endpoint>, SourceError> {
    let parsed: HostsFile = toml::from_str(text).map_err(|e| invalid(path, e.message()))?;
    let dir = path.parent().unwrap_or(Path::new("/"));
    let mut out = Vec::new();
    for (url, v) in &parsed.host {
        let s: Settings = v.clone().try_into().map_err(|e: toml::de::Error| {
            invalid(path, format!("host {url:?}: {}", e.message()))
        })?;
        out.push(
            endpoint(url, &s, true, dir)
                .map_err(|e| invalid(path, format!("host {url:?}: {e}")))?,
        );
    }
    let server = parsed
        .server
        .clone()
        .unwrap_or_else(|| default_server(registry, plain_http));
    let up = endpoint(&server, &parsed.settings, false, dir)
        .map_err(|e| invalid(path, format!("server {server:?}: {e}")))?;
    out.push(up);
    Ok(out)
}

fn endpoint(url: &str, s: &Settings, mirror: bool, dir: &Path) -> Result<Endpoint, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| "not a URL (http:// or https://)".to_string())?;
    if scheme != "http" && scheme != "https" {
        return Err(format!("scheme {scheme:?} is not http or https"));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return Err("no host".into());
    }
    if s.client.is_some() {
        return Err("client certificates are not supported yet".into());
    }
    let base = if s.override_path.unwrap_or(false) {
        format!("{scheme}://{authority}{path}")
    } else {
        format!("{scheme}://{authority}{path}/v2")
    };
    let caps = s
        .capabilities
        .clone()
        .unwrap_or_else(|| vec!["pull".into(), "resolve".into()]);
    for c in &caps {
        if !["pull", "resolve", "push"].contains(&c.as_str()) {
            return Err(format!("unknown capability {c:?}"));
        }
    }
    let ca = match &s.ca {
        None => vec![],
        Some(OneOrMany::One(p)) => vec![dir.join(p)],
        Some(OneOrMany::Many(v)) => v.iter().map(|p| dir.join(p)).collect(),
    };
    let mut headers = Vec::new();
    for (k, v) in &s.header {
        match v {
            toml::Value::String(x) => headers.push((k.clone(), x.clone())),
            toml::Value::Array(xs) => {
                for x in xs {
                    let x = x
                        .as_str()
                        .ok_or_else(|| format!("header {k:?}: values must be strings"))?;
                    headers.push((k.clone(), x.to_string()));
                }
            }
            _ => return Err(format!("header {k:?}: values must be strings")),
        }
    }
    Ok(Endpoint {
        base,
        authority: authority.to_string(),
        pull: caps.iter().any(|c| c == "pull"),
        resolve: caps.iter().any(|c| c == "resolve"),
        ca,
        skip_verify: s.skip_verify.unwrap_or(false),
        headers,
        mirror,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(name: &str, registry: &str, text: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("unlade-hosts-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join(registry)).unwrap();
        std::fs::write(d.join(registry).join("hosts.toml"), text).unwrap();
        d
    }

    #[test]
    fn defaults_without_a_file() {
        let e = endpoints(None, "docker.io", false).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].base, "https://registry-1.docker.io/v2");
        assert!(e[0].pull && e[0].resolve && !e[0].mirror);
        let e = endpoints(Some(Path::new("/nonexistent")), "localhost:5000", true).unwrap();
        assert_eq!(e[0].base, "http://localhost:5000/v2");
        assert_eq!(e[0].authority, "localhost:5000");
    }

    #[test]
    fn mirrors_in_order_then_the_server() {
        let d = dir_with(
            "order",
            "docker.io",
            r#"
server = "https://registry-1.docker.io"
[host."http://127.0.0.1:9/cache"]
  capabilities = ["pull"]
[host."https://mirror.example:5000"]
  ca = ["a.pem", "/abs/b.pem"]
  skip_verify = true
  override_path = true
  [host."https://mirror.example:5000".header]
    x-one = "1"
    x-many = ["a", "b"]
"#,
        );
        let e = endpoints(Some(&d), "docker.io", false).unwrap();
        let bases: Vec<_> = e.iter().map(|e| e.base.as_str()).collect();
        assert_eq!(
            bases,
            [
                "http://127.0.0.1:9/cache/v2",
                "https://mirror.example:5000",
                "https://registry-1.docker.io/v2"
            ]
        );
        assert!(e[0].pull && !e[0].resolve && e[0].mirror);
        assert_eq!(
            e[1].ca,
            [d.join("docker.io/a.pem"), PathBuf::from("/abs/b.pem")]
        );
        assert!(e[1].skip_verify);
        assert_eq!(e[1].headers.len(), 3);
        assert!(!e[2].mirror);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn default_file_and_bad_files() {
        let d = dir_with("default", "_default", "[host.\"http://10.0.0.1:5000\"]\n");
        let e = endpoints(Some(&d), "quay.io", false).unwrap();
        assert_eq!(e[0].base, "http://10.0.0.1:5000/v2");
        assert_eq!(e[1].base, "https://quay.io/v2");
        std::fs::write(d.join("_default/hosts.toml"), "server = 3\n").unwrap();
        let err = endpoints(Some(&d), "quay.io", false).unwrap_err();
        assert!(err.message.contains("hosts.toml"), "{err}");
        std::fs::write(d.join("_default/hosts.toml"), "[host.\"ftp://x\"]\n").unwrap();
        assert!(endpoints(Some(&d), "quay.io", false).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
