//! Archive names → normalized relative paths.
//!
//! A name is split on `/`; empty and `.` components are dropped (so
//! `./etc//passwd` and `/etc/passwd` both become `etc/passwd`: leading
//! slashes are clamped into the target, as containerd and GNU tar do). A
//! `..` component is refused outright, as GNU tar refuses such members:
//! lexical clean-up of `..` is wrong when a component is a symlink, and no
//! image builder writes one. The empty result is the layer root.
//!
//! A normalized path may be at most [`MAX_PATH`] bytes: Linux's
//! `PATH_MAX`, past which no tool that names a file by its full path (a
//! shell, containerd's own applier) could reach it, and the bound that
//! keeps the memory and directory fds of one entry's walk small however
//! deep a PAX name nests.

use crate::layer::error::{ApplyError, ErrorKind};

/// Longest normalized entry or hard link target path, in bytes.
pub const MAX_PATH: usize = 4095;

/// Normalizes an archive name. Returns the path with single `/`
/// separators, `""` for the root itself.
pub fn normalize(name: &[u8]) -> Result<Vec<u8>, ApplyError> {
    if name.is_empty() {
        return Err(ApplyError::new(ErrorKind::UnsafePath("empty name".into())));
    }
    let mut out = Vec::with_capacity(name.len());
    for comp in name.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                return Err(ApplyError::new(ErrorKind::UnsafePath(format!(
                    "{:?} has a '..' component",
                    String::from_utf8_lossy(name)
                ))))
            }
            c => {
                if c.contains(&0) {
                    return Err(ApplyError::new(ErrorKind::UnsafePath(
                        "name contains a NUL byte".into(),
                    )));
                }
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
                if out.len() > MAX_PATH {
                    return Err(ApplyError::new(ErrorKind::Limit(format!(
                        "path longer than {MAX_PATH} bytes (PATH_MAX)"
                    ))));
                }
            }
        }
    }
    Ok(out)
}

/// Splits a normalized, non-root path into (parent, last component).
pub fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(normalize(b"./etc//passwd").unwrap(), b"etc/passwd");
        assert_eq!(normalize(b"/etc/passwd/").unwrap(), b"etc/passwd");
        assert_eq!(normalize(b"///").unwrap(), b"");
        assert_eq!(normalize(b".").unwrap(), b"");
        assert_eq!(normalize(b"./").unwrap(), b"");
        assert!(normalize(b"").is_err());
        assert!(normalize(b"..").is_err());
        assert!(normalize(b"a/../b").is_err());
        assert!(normalize(b"../../etc/passwd").is_err());
        assert!(normalize(b"a/b\0c").is_err());
        assert_eq!(normalize(b"a/..b/c..").unwrap(), b"a/..b/c..");
        assert_eq!(split(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(split(b"c"), (&b""[..], &b"c"[..]));
        let deep = "a/".repeat(MAX_PATH / 2) + "b";
        assert_eq!(normalize(deep.as_bytes()).unwrap().len(), MAX_PATH);
        let deeper = "a/".repeat(MAX_PATH / 2) + "bc";
        assert!(normalize(deeper.as_bytes()).is_err());
        // Empty components do not count.
        let slashes = "/".repeat(10_000) + "x";
        assert_eq!(normalize(slashes.as_bytes()).unwrap(), b"x");
    }
}
