//! How the crate's errors read as text.
//!
//! Every error of this crate follows one convention (the Rust API
//! guidelines'): its `Display` says only what its own level knows — the
//! layer, the entry and offset, the path, the operation — and the error
//! it wraps is only its [`source`](std::error::Error::source), never
//! repeated in its text. A variant that adds nothing is transparent (its
//! text and source are the inner error's). The whole story is the chain:
//! [`error_chain`] joins it into the one line a user sees.

use std::error::Error;

/// `e` and every error under it (its `source()` chain), joined with
/// `": "` into one line: e.g. `layer sha256:…: entry "etc/passwd" at
/// offset 512: create file: Permission denied (os error 13)`. Newlines
/// that a level's text holds (a decoder's message) become spaces.
pub fn error_chain(e: &(dyn Error + 'static)) -> String {
    let mut out = String::new();
    let mut next = Some(e);
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text.replace('\n', " "));
        }
        next = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer {0}")]
    struct Outer(&'static str, #[source] std::io::Error);

    #[test]
    fn joins_each_level_once() {
        let e = Outer("x", std::io::Error::other("inner\ntext"));
        assert_eq!(error_chain(&e), "outer x: inner text");
    }
}
