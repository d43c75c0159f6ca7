//! Registry authentication parsers: `WWW-Authenticate` challenges
//! (`auth::parse_challenge`), Bearer token server answers
//! (`auth::TokenResponse`, as serde_json reads it in the engine), and
//! credential lookup in a Docker `config.json` (`auth::credentials_from_str`,
//! what `auth::credentials_for` runs on the file).
//!
//! Input: byte 0 chooses the parser (0 mod 3: challenge, 1: token answer,
//! 2: Docker config, whose first line is the host looked up and the rest
//! the file's text); the rest is its input.
//!
//! Properties:
//! - no panic; errors are errors;
//! - a parsed challenge has a non-empty, lowercase scheme without
//!   whitespace and lowercase parameter names, and writing it back as
//!   `scheme name="value", …` (values quoted and escaped) parses to the
//!   same challenge;
//! - a token answer that parses as an object has the `token`,
//!   `access_token` and `expires_in` that serde_json's untyped `Value`
//!   reads in it;
//! - credentials found give a Basic header that decodes to `user:password`.
#![no_main]

use std::path::Path;

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use unlade::source::remote::auth::{credentials_from_str, parse_challenge, Challenge, TokenResponse};

fn write_back(c: &Challenge) -> String {
    let params: Vec<String> = c
        .params
        .iter()
        .map(|(k, v)| {
            let v = v.replace('\\', "\\\\").replace('"', "\\\"");
            format!("{k}=\"{v}\"")
        })
        .collect();
    if params.is_empty() {
        c.scheme.clone()
    } else {
        format!("{} {}", c.scheme, params.join(", "))
    }
}

fn challenge(s: &str) {
    let Some(c) = parse_challenge(s) else {
        return;
    };
    assert!(!c.scheme.is_empty());
    assert!(!c.scheme.contains(char::is_whitespace), "{:?}", c.scheme);
    assert_eq!(c.scheme, c.scheme.to_ascii_lowercase());
    for k in c.params.keys() {
        assert_eq!(k, &k.to_ascii_lowercase());
    }
    let back = write_back(&c);
    assert_eq!(
        parse_challenge(&back).as_ref(),
        Some(&c),
        "{s:?} parsed, written back as {back:?}"
    );
}

fn token(b: &[u8]) {
    let Ok(t) = serde_json::from_slice::<TokenResponse>(b) else {
        return;
    };
    // A typed parse skips unknown fields without checking their strings
    // (harmlessly: the engine never looks at them); invalid UTF-8 is
    // replaced first, but not every bad escape can be.
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&String::from_utf8_lossy(b)) else {
        return;
    };
    if !v.is_object() {
        // serde also reads a struct from an array of its fields in order
        // (`["token"]`): lenient, and nothing to compare by name.
        return;
    }
    assert_eq!(t.token.as_deref(), v.get("token").and_then(|x| x.as_str()));
    assert_eq!(
        t.access_token.as_deref(),
        v.get("access_token").and_then(|x| x.as_str())
    );
    assert_eq!(t.expires_in, v.get("expires_in").and_then(|x| x.as_u64()));
}

fn docker_config(s: &str) {
    let (host, text) = s.split_once('\n').unwrap_or((s, ""));
    let path = Path::new("/root/.docker/config.json");
    match credentials_from_str(text, path, host) {
        Ok(Some(c)) => {
            let b = c.basic();
            let enc = b.strip_prefix("Basic ").expect("Basic header");
            let raw = base64::engine::general_purpose::STANDARD
                .decode(enc)
                .expect("Basic header is base64");
            assert_eq!(raw, format!("{}:{}", c.user, c.password).into_bytes());
        }
        Ok(None) => {}
        Err(e) => assert!(e.contains("config.json"), "error without the file: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 3 {
        0 => challenge(&String::from_utf8_lossy(rest)),
        1 => token(rest),
        _ => {
            if let Ok(s) = std::str::from_utf8(rest) {
                docker_config(s);
            }
        }
    }
});
