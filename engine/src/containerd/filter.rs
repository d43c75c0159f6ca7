//! containerd's filter syntax, as List requests carry it: a request's
//! filters are alternatives, each a `,`-joined conjunction of selectors
//! `fieldpath [op value]`, with `op` one of `==` and `!=` and a bare
//! fieldpath meaning "present". Field paths are `name`, `parent`, `kind`
//! and `labels.<key>`; a key or value may be quoted with `"…"` (and `\`
//! escapes). containerd asks with filters like
//! `labels."containerd.io/snapshot.ref"==sha256:…,parent==default/3/…`
//! when it adopts a snapshot made for it. The regular-expression
//! operator `~=` is refused rather than matched wrongly.

use crate::containerd::store::{CtrError, Record};

/// The most filters one List may carry (containerd sends one or two).
pub const MAX_FILTERS: usize = 64;
/// The most bytes of all of one List's filters together.
pub const MAX_FILTER_BYTES: usize = 64 << 10;
/// The most selectors in all of one List's filters: each record is matched
/// against each.
pub const MAX_SELECTORS: usize = 256;

/// One selector.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Selector {
    path: Vec<String>,
    op: Option<(bool, String)>,
}

/// A parsed filter: any of its conjunctions matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter(Vec<Vec<Selector>>);

impl Filter {
    /// Parses a List request's filters (none: everything matches).
    /// More than [`MAX_FILTERS`] filters, or more than
    /// [`MAX_FILTER_BYTES`] in all, are refused before any is parsed:
    /// every record is matched against every filter.
    pub fn parse(filters: &[String]) -> Result<Filter, CtrError> {
        if filters.len() > MAX_FILTERS {
            return Err(CtrError::InvalidArgument(format!(
                "{} filters, more than {MAX_FILTERS}",
                filters.len()
            )));
        }
        let bytes: usize = filters.iter().map(String::len).sum();
        if bytes > MAX_FILTER_BYTES {
            return Err(CtrError::InvalidArgument(format!(
                "filters of {bytes} bytes, more than {MAX_FILTER_BYTES}"
            )));
        }
        let mut out = Vec::new();
        for f in filters {
            if f.trim().is_empty() {
                continue;
            }
            out.push(
                parse_one(f)
                    .map_err(|why| CtrError::InvalidArgument(format!("filter {f:?}: {why}")))?,
            );
        }
        let selectors: usize = out.iter().map(Vec::len).sum();
        if selectors > MAX_SELECTORS {
            return Err(CtrError::InvalidArgument(format!(
                "filters of {selectors} selectors, more than {MAX_SELECTORS}"
            )));
        }
        Ok(Filter(out))
    }

    /// Whether `r` matches.
    pub fn matches(&self, r: &Record) -> bool {
        self.0.is_empty() || self.0.iter().any(|all| all.iter().all(|s| s.matches(r)))
    }
}

impl Selector {
    fn matches(&self, r: &Record) -> bool {
        let field = match self.path.as_slice() {
            [f] if f == "name" => Some(r.name.as_str()),
            [f] if f == "parent" => Some(r.parent.as_str()).filter(|p| !p.is_empty()),
            [f] if f == "kind" => Some(r.kind.as_str()),
            [f, key] if f == "labels" => r.labels.get(key).map(String::as_str),
            _ => None,
        };
        match (&self.op, field) {
            (None, f) => f.is_some_and(|f| !f.is_empty()),
            (Some((true, v)), f) => f.unwrap_or("") == v,
            (Some((false, v)), f) => f.unwrap_or("") != v,
        }
    }
}

struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
}

impl Lexer<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn skip_space(&mut self) {
        while self.peek().is_some_and(|c| c == b' ' || c == b'\t') {
            self.i += 1;
        }
    }
    fn quoted(&mut self) -> Result<String, String> {
        // At the opening quote.
        self.i += 1;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err("unterminated quote".into()),
                Some(b'"') => {
                    self.i += 1;
                    break;
                }
                Some(b'\\') => {
                    let c = self
                        .s
                        .get(self.i + 1)
                        .copied()
                        .ok_or("unterminated quote")?;
                    out.push(match c {
                        b'n' => b'\n',
                        b't' => b'\t',
                        c => c,
                    });
                    self.i += 2;
                }
                Some(c) => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|_| "not UTF-8".to_string())
    }
    fn field(&mut self) -> Result<String, String> {
        if self.peek() == Some(b'"') {
            return self.quoted();
        }
        let start = self.i;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        {
            self.i += 1;
        }
        if start == self.i {
            return Err(format!("expected a field name at byte {start}"));
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }
    fn value(&mut self) -> Result<String, String> {
        self.skip_space();
        if self.peek() == Some(b'"') {
            return self.quoted();
        }
        let start = self.i;
        while self.peek().is_some_and(|c| c != b',') {
            self.i += 1;
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i])
            .trim()
            .to_string())
    }
}

fn parse_one(f: &str) -> Result<Vec<Selector>, String> {
    let mut lx = Lexer {
        s: f.as_bytes(),
        i: 0,
    };
    let mut out = Vec::new();
    loop {
        lx.skip_space();
        let mut path = vec![lx.field()?];
        while lx.peek() == Some(b'.') {
            lx.i += 1;
            path.push(lx.field()?);
        }
        lx.skip_space();
        let rest = &lx.s[lx.i..];
        let op = if rest.starts_with(b"==") {
            lx.i += 2;
            Some((true, lx.value()?))
        } else if rest.starts_with(b"!=") {
            lx.i += 2;
            Some((false, lx.value()?))
        } else if rest.starts_with(b"~=") {
            return Err("the operator ~= is not supported".into());
        } else {
            None
        };
        out.push(Selector { path, op });
        lx.skip_space();
        match lx.peek() {
            None => return Ok(out),
            Some(b',') => lx.i += 1,
            Some(c) => return Err(format!("unexpected {:?} at byte {}", c as char, lx.i)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::containerd::store::Kind;

    fn rec() -> Record {
        Record {
            name: "default/4/sha256:ab".into(),
            parent: "default/3/sha256:cd".into(),
            kind: Kind::Committed,
            created_ns: 0,
            updated_ns: 0,
            labels: [(
                "containerd.io/snapshot.ref".to_string(),
                "sha256:ab".to_string(),
            )]
            .into_iter()
            .collect(),
            usage: None,
            chain: None,
            fallback: None,
        }
    }

    fn m(filters: &[&str]) -> bool {
        let f: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
        Filter::parse(&f).unwrap().matches(&rec())
    }

    #[test]
    fn containerd_adoption_filter_matches_label_and_parent() {
        assert!(m(&[
            r#"labels."containerd.io/snapshot.ref"==sha256:ab,parent=="default/3/sha256:cd""#
        ]));
        assert!(!m(&[
            r#"labels."containerd.io/snapshot.ref"==sha256:ab,parent==default/9/x"#
        ]));
        assert!(!m(&[r#"labels."containerd.io/snapshot.ref"==sha256:zz"#]));
    }

    #[test]
    fn alternatives_presence_and_inequality() {
        assert!(m(&[]));
        assert!(m(&["kind==view", "kind==committed"]));
        assert!(!m(&["kind==view"]));
        assert!(m(&[r#"labels."containerd.io/snapshot.ref""#]));
        assert!(!m(&["labels.other"]));
        assert!(m(&["name!=x"]));
        assert!(!m(&["nosuchfield==1"]));
    }

    #[test]
    fn malformed_filters_are_refused() {
        for bad in [
            r#"labels."open"#,
            "name~=a.*",
            "==x",
            "name==a junk,",
            "name=a",
        ] {
            let r = Filter::parse(&[bad.to_string()]);
            assert!(
                matches!(r, Err(CtrError::InvalidArgument(_))),
                "{bad}: {r:?}"
            );
        }
    }

    /// One List's filters are bounded in count, bytes and selectors
    /// before any is parsed or matched (5 million one-byte filters took
    /// 34 s and 1.8 GiB).
    #[test]
    fn filters_are_bounded() {
        let refused =
            |f: Vec<String>| matches!(Filter::parse(&f), Err(CtrError::InvalidArgument(_)));
        assert!(refused(vec!["name".to_string(); 5_000_000]));
        assert!(refused(vec!["name".to_string(); MAX_FILTERS + 1]));
        assert!(refused(vec![format!(
            "name=={}",
            "x".repeat(MAX_FILTER_BYTES)
        )]));
        assert!(refused(vec![vec!["kind"; MAX_SELECTORS + 1].join(",")]));
        let ok: Vec<String> = vec!["kind==committed".to_string(); MAX_FILTERS];
        assert!(Filter::parse(&ok).is_ok());
    }
}
