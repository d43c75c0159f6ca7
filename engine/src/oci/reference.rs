//! Image references, parsed and normalized as Docker and containerd do:
//! `redis` → `docker.io/library/redis:latest`, `host:port/repo:tag`,
//! `repo@sha256:…`, `repo:tag@sha256:…` (the digest wins for fetching; the
//! tag is kept as a name).
//!
//! The grammar is distribution's `reference` package: a first component
//! is a registry host when it contains `.` or `:` or is `localhost`;
//! otherwise the registry is `docker.io`, and a one-component name gets
//! `library/` in front. Path components are lowercase alphanumerics joined
//! by `.`, `_`, `__` or runs of `-`; tags are `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`;
//! the whole name is at most 255 bytes. Only sha256 digests are accepted
//! (the only algorithm this engine verifies).

use std::fmt;

use crate::oci::digest::Digest;

/// The registry of unqualified names.
pub const DOCKER_HUB: &str = "docker.io";

/// The host that serves Docker Hub's registry API, where requests for
/// [`DOCKER_HUB`] go.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// Every name Docker Hub goes by: [`DOCKER_HUB`], the legacy index host
/// and [`DOCKER_HUB_API`]. References name it [`DOCKER_HUB`] whichever
/// they were written with.
pub const DOCKER_HUB_NAMES: [&str; 3] = [DOCKER_HUB, "index.docker.io", DOCKER_HUB_API];

/// Why a reference was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid reference {input:?}: {reason}")]
pub struct RefError {
    /// What was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// A normalized image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Registry host, with `:port` if given (`docker.io` for Docker Hub).
    pub registry: String,
    /// Repository path within the registry (`library/redis`).
    pub repository: String,
    /// The tag (`latest` when neither tag nor digest was given).
    pub tag: Option<String>,
    /// The manifest digest, when pinned.
    pub digest: Option<Digest>,
}

fn path_component_ok(c: &str) -> bool {
    // [a-z0-9]+ ( (\.|_|__|-+) [a-z0-9]+ )*
    let b = c.as_bytes();
    if b.is_empty() {
        return false;
    }
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    loop {
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        let sep = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == sep || i == b.len() {
            return false;
        }
    }
}

fn host_ok(h: &str) -> bool {
    let (host, port) = match h.rsplit_once(':') {
        Some((host, port)) if !host.contains(']') || host.ends_with(']') => (host, Some(port)),
        _ => (h, None),
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    if host.starts_with('[') {
        // An IPv6 literal.
        return host.ends_with(']')
            && host.len() > 2
            && host[1..host.len() - 1]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':');
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn tag_ok(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || x == b'_' || x == b'.' || x == b'-')
}

impl Reference {
    /// Parses and normalizes `s`.
    pub fn parse(s: &str) -> Result<Reference, RefError> {
        let err = |reason| RefError {
            input: s.to_string(),
            reason,
        };
        if s.is_empty() {
            return Err(err("empty"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                if !d.starts_with("sha256:") {
                    return Err(err("only sha256 digests are supported"));
                }
                let d = d
                    .parse::<Digest>()
                    .map_err(|_| err("digest is not sha256:<64 lowercase hex digits>"))?;
                (r, Some(d))
            }
            None => (s, None),
        };
        // A tag is after the last ':' that is not part of a host:port.
        let last_slash = rest.rfind('/');
        let (name, tag) = match rest.rfind(':') {
            Some(i) if last_slash.is_none_or(|sl| i > sl) => {
                (&rest[..i], Some(rest[i + 1..].to_string()))
            }
            _ => (rest, None),
        };
        if let Some(t) = &tag {
            if !tag_ok(t) {
                return Err(err("tag must match [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"));
            }
        }
        if name.is_empty() {
            return Err(err("no repository name"));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                if !host_ok(first) {
                    return Err(err("invalid registry host"));
                }
                let reg = if DOCKER_HUB_NAMES.contains(&first) {
                    DOCKER_HUB
                } else {
                    first
                };
                (reg.to_string(), path.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        if path.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(err("repository name must be lowercase"));
        }
        if !path.split('/').all(path_component_ok) {
            return Err(err(
                "repository path components are [a-z0-9]+ joined by '.', '_', '__' or '-'",
            ));
        }
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if registry.len() + 1 + repository.len() > 255 {
            return Err(err("name longer than 255 bytes"));
        }
        let tag = match (tag, digest) {
            (None, None) => Some("latest".to_string()),
            (t, _) => t,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The name without tag or digest: `docker.io/library/redis`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// What to ask the registry's manifest endpoint for: the digest when
    /// pinned, else the tag.
    pub fn object(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn normalizes_like_docker() {
        let cases = [
            ("redis", "docker.io/library/redis:latest"),
            ("redis:7", "docker.io/library/redis:7"),
            ("library/redis", "docker.io/library/redis:latest"),
            ("bitnami/redis:7.2", "docker.io/bitnami/redis:7.2"),
            ("docker.io/redis", "docker.io/library/redis:latest"),
            (
                "index.docker.io/library/redis",
                "docker.io/library/redis:latest",
            ),
            ("localhost/app", "localhost/app:latest"),
            ("localhost:5000/app:v1", "localhost:5000/app:v1"),
            ("127.0.0.1:5000/a/b/c:t", "127.0.0.1:5000/a/b/c:t"),
            ("ghcr.io/owner/img:1.0-rc_1", "ghcr.io/owner/img:1.0-rc_1"),
            ("[::1]:5000/app", "[::1]:5000/app:latest"),
            ("a_b__c/d.e", "docker.io/a_b__c/d.e:latest"),
            ("my-org/my---app", "docker.io/my-org/my---app:latest"),
        ];
        for (input, want) in cases {
            assert_eq!(
                Reference::parse(input).unwrap().to_string(),
                want,
                "{input}"
            );
        }
        let pinned = Reference::parse(&format!("redis@{D}")).unwrap();
        assert_eq!(pinned.tag, None);
        assert_eq!(pinned.object(), D);
        assert_eq!(pinned.to_string(), format!("docker.io/library/redis@{D}"));
        let both = Reference::parse(&format!("host:5000/r:7@{D}")).unwrap();
        assert_eq!(both.tag.as_deref(), Some("7"));
        assert_eq!(both.object(), D);
        assert_eq!(both.registry, "host:5000");
        assert_eq!(
            Reference::parse("registry-1.docker.io/redis")
                .unwrap()
                .to_string(),
            "docker.io/library/redis:latest"
        );
    }

    #[test]
    fn rejects_what_docker_rejects() {
        for bad in [
            "",
            "Redis",
            "docker.io/Library/redis",
            "redis:",
            "redis:-tag",
            "redis:ta/g",
            "a//b",
            "-a/b",
            "a-/b",
            "a/b.",
            "redis@sha256:abc",
            "redis@md5:00",
            "host:port/app",
            ":tag",
            "a..b/c",
            "a.b__c/d",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("a/{}", "b".repeat(260));
        assert!(Reference::parse(&long).is_err());
        let e = Reference::parse("Redis").unwrap_err().to_string();
        assert!(e.contains("lowercase"), "{e}");
    }
}
