//! Image reference parsing and normalization (`Reference::parse`).
//!
//! Properties, for any string:
//! - no panic;
//! - a parsed reference is normalized: its registry and repository are
//!   non-empty, it has a tag or a digest, the name is at most 255 bytes,
//!   and `object()` is the digest when pinned, else the tag;
//! - normalization is idempotent: the `Display` form parses again, to the
//!   same reference, whose `Display` form is the same string; so does the
//!   name alone (`name()`), to the same registry and repository.
#![no_main]

use libfuzzer_sys::fuzz_target;
use unlade::Reference;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let r = match Reference::parse(s) {
        Ok(r) => r,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert!(!r.registry.is_empty() && !r.repository.is_empty(), "{r:?}");
    assert!(r.tag.is_some() || r.digest.is_some(), "{r:?}");
    assert!(r.name().len() <= 255, "{r:?}");
    match (&r.digest, &r.tag) {
        (Some(d), _) => assert_eq!(r.object(), d.to_string()),
        (None, Some(t)) => assert_eq!(&r.object(), t),
        (None, None) => unreachable!(),
    }

    let shown = r.to_string();
    let again = Reference::parse(&shown)
        .unwrap_or_else(|e| panic!("{s:?} parsed as {shown:?}, which does not parse: {e}"));
    assert_eq!(again, r, "{s:?} -> {shown:?}");
    assert_eq!(again.to_string(), shown, "{s:?}");

    let name = Reference::parse(&r.name())
        .unwrap_or_else(|e| panic!("name {:?} of {s:?} does not parse: {e}", r.name()));
    assert_eq!(
        (&name.registry, &name.repository),
        (&r.registry, &r.repository)
    );
});
