//! containerd `hosts.toml` parsing (`hosts::endpoints_from_str`, what
//! `hosts::endpoints` runs on the file it finds), for a few registries.
//!
//! Input: byte 0 chooses the registry (bits 0-1) and plain HTTP for the
//! default upstream (bit 2); the rest is the file's text.
//!
//! Properties:
//! - no panic; errors are errors and name the file;
//! - the endpoints are the mirrors (`mirror`, in the file's order) and
//!   then the upstream, last and alone in not being a mirror;
//! - every base is `http://` or `https://`, then the endpoint's (non-empty)
//!   authority, then the API path; every CA path is absolute (relative ones
//!   are taken from the file's directory).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use unlade::source::remote::hosts::endpoints_from_str;

const REGISTRIES: [&str; 4] = ["docker.io", "localhost:5000", "quay.io", "[::1]:5000"];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let registry = REGISTRIES[usize::from(sel & 3)];
    let path = Path::new("/etc/unlade/certs.d")
        .join(registry)
        .join("hosts.toml");
    let eps = match endpoints_from_str(text, &path, registry, sel & 4 != 0) {
        Ok(eps) => eps,
        Err(e) => {
            let m = e.to_string();
            assert!(m.contains("hosts.toml"), "error without the file: {m}");
            return;
        }
    };
    let (up, mirrors) = eps.split_last().expect("no endpoint at all");
    assert!(!up.mirror, "the upstream is a mirror");
    assert!(
        mirrors.iter().all(|e| e.mirror),
        "a mirror after the upstream"
    );
    for e in &eps {
        let rest = e
            .base
            .strip_prefix("https://")
            .or_else(|| e.base.strip_prefix("http://"))
            .unwrap_or_else(|| panic!("base {:?} is not http(s)", e.base));
        assert!(!e.authority.is_empty());
        assert!(
            rest.starts_with(&e.authority),
            "base {:?} vs authority {:?}",
            e.base,
            e.authority
        );
        assert!(e.ca.iter().all(|p| p.is_absolute()), "{:?}", e.ca);
    }
});
