//! The crate's modules depend on each other one way. Reads the sources of
//! the library (not the binary), collects every path a module names
//! (`crate::…`, `super::…`, `self::…`, in `use` trees and in code), and
//! checks two rules:
//!
//! 1. The stages (top-level modules) only depend on stages before them in
//!    [`STAGES`]: a blob flows `oci` → `source` → `store` → `layer` →
//!    `pipeline` → `root`, and nothing downstream is named upstream.
//! 2. At every level, sibling modules have no import cycle (a child may use
//!    its parent's items and the parent its child's: that is ownership,
//!    not a cycle).
//!
//! Crate-root re-exports (`crate::Digest`) are for users: inside the crate
//! a module names the module that defines what it uses, so that the
//! dependency is seen here. Test modules (`#[cfg(test)] mod tests`, at the
//! end of a file) are not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The stages in dependency order; each may use those before it.
const STAGES: &[&[&str]] = &[
    &["sys", "cancel", "report"],
    &["oci"],
    &["source"],
    &["store"],
    &["layer"],
    &["pipeline"],
    &["root"],
    &["containerd"],
];

fn stage_rank(top: &str) -> Option<usize> {
    STAGES.iter().position(|s| s.contains(&top))
}

/// `a/b/mod.rs` → `a::b`, `a/b.rs` → `a::b`, `lib.rs` → ``.
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without comments, string literals and its trailing
/// test module.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i += 2;
            while i + 1 < b.len() && !b[i..].starts_with(b"*/") {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' && (i == 0 || b[i - 1] != b'\'') {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Expands a `use` tree (`a::{b, c::{d, e}}`) into its paths.
fn expand(tree: &str) -> Vec<String> {
    let tree: String = tree.split_whitespace().collect();
    fn go(prefix: &str, t: &str, out: &mut Vec<String>) {
        if let Some(open) = t.find('{') {
            let head = &t[..open];
            let inner = &t[open + 1..t.rfind('}').unwrap()];
            let mut depth = 0;
            let mut start = 0;
            let bytes = inner.as_bytes();
            for (i, &c) in bytes.iter().enumerate() {
                match c {
                    b'{' => depth += 1,
                    b'}' => depth -= 1,
                    b',' if depth == 0 => {
                        go(&format!("{prefix}{head}"), &inner[start..i], out);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            go(&format!("{prefix}{head}"), &inner[start..], out);
        } else if !t.is_empty() {
            let t = t.split(" as ").next().unwrap();
            out.push(format!("{prefix}{t}"));
        }
    }
    let mut out = Vec::new();
    go("", &tree, &mut out);
    out
}

/// Every path the code names that starts with `crate`, `super` or `self`.
fn named_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    // `use` trees (which may hold braces), then the code without them.
    let mut rest = code;
    let mut plain = String::with_capacity(code.len());
    while let Some(i) = rest.find("use ") {
        let before = rest[..i].chars().last();
        plain.push_str(&rest[..i + 4]);
        rest = &rest[i + 4..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(end) = rest.find(';') else { break };
        let tree = &rest[..end];
        if tree.starts_with("crate::") || tree.starts_with("super::") || tree.starts_with("self::")
        {
            out.extend(expand(tree));
            rest = &rest[end..];
        }
    }
    plain.push_str(rest);
    let code = plain.as_str();
    let b = code.as_bytes();
    for start in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start) {
            let i = from + i;
            from = i + start.len();
            if i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] == b':') {
                continue;
            }
            let mut j = i;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b':') {
                j += 1;
            }
            out.push(code[i..j].trim_end_matches(':').to_string());
        }
    }
    out
}

#[test]
fn stages_depend_one_way_and_modules_have_no_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut modules: BTreeMap<Vec<String>, String> = BTreeMap::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        // The binary and its own modules are not the library.
        if rel == Path::new("main.rs") || rel.starts_with("cli") {
            continue;
        }
        modules.insert(module_of(rel), std::fs::read_to_string(f).unwrap());
    }
    assert!(modules.len() > 20, "found only {} modules", modules.len());
    let (edges, faults) = check(&modules);
    assert!(
        edges > 40,
        "found only {edges} dependencies: is the parser blind?"
    );
    assert!(faults.is_empty(), "{}", faults.join("\n"));
}

/// The dependencies found between modules, and what breaks the rules.
fn check(modules: &BTreeMap<Vec<String>, String>) -> (usize, Vec<String>) {
    let resolve = |from: &[String], path: &str| -> Option<Vec<String>> {
        let mut segs: Vec<&str> = path.split("::").collect();
        let mut base: Vec<String> = match segs[0] {
            "crate" => Vec::new(),
            "self" => from.to_vec(),
            "super" => {
                let mut b = from.to_vec();
                while segs.first() == Some(&"super") {
                    b.pop();
                    segs.remove(0);
                }
                segs.insert(0, "super");
                b
            }
            _ => return None,
        };
        for s in &segs[1..] {
            let mut next = base.clone();
            next.push(s.to_string());
            if modules.contains_key(&next) {
                base = next;
            } else {
                break;
            }
        }
        Some(base)
    };
    let mut faults = Vec::new();
    let mut edges: BTreeSet<(Vec<String>, Vec<String>)> = BTreeSet::new();
    for (m, text) in modules {
        for p in named_paths(&code(text)) {
            let Some(t) = resolve(m, &p) else { continue };
            if t.is_empty() && !m.is_empty() && p.starts_with("crate::") && p != "crate" {
                faults.push(format!(
                    "{}: names the crate-root re-export `{p}`; name its module",
                    m.join("::")
                ));
                continue;
            }
            if &t != m {
                edges.insert((m.clone(), t));
            }
        }
    }
    // Rule 1: stages one way.
    for (a, b) in &edges {
        let (Some(ta), Some(tb)) = (a.first(), b.first()) else {
            continue;
        };
        if ta == tb {
            continue;
        }
        match (stage_rank(ta), stage_rank(tb)) {
            (Some(ra), Some(rb)) if rb < ra => {}
            (Some(_), Some(_)) => faults.push(format!(
                "{} uses {}: stage {ta} may not depend on stage {tb}",
                a.join("::"),
                b.join("::")
            )),
            _ => faults.push(format!(
                "{} uses {}: a top-level module missing from STAGES",
                a.join("::"),
                b.join("::")
            )),
        }
    }
    // Rule 2: no cycle among siblings, at every level.
    let mut sibling: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (a, b) in &edges {
        let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
        if common == a.len() || common == b.len() {
            continue; // parent and child
        }
        let sa = a[..=common].to_vec();
        let sb = b[..=common].to_vec();
        sibling.entry(sa).or_default().insert(sb);
    }
    fn visit(
        n: &Vec<String>,
        g: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<Vec<String>, u8>,
        stack: &mut Vec<Vec<String>>,
        faults: &mut Vec<String>,
    ) {
        match state.get(n) {
            Some(2) => return,
            Some(1) => {
                let at = stack.iter().position(|x| x == n).unwrap();
                let cycle: Vec<String> = stack[at..]
                    .iter()
                    .chain(std::iter::once(n))
                    .map(|m| m.join("::"))
                    .collect();
                faults.push(format!("import cycle: {}", cycle.join(" → ")));
                return;
            }
            _ => {}
        }
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in g.get(n).into_iter().flatten() {
            visit(m, g, state, stack, faults);
        }
        stack.pop();
        state.insert(n.clone(), 2);
    }
    let mut state = BTreeMap::new();
    for n in sibling.keys() {
        visit(n, &sibling, &mut state, &mut Vec::new(), &mut faults);
    }
    (edges.len(), faults)
}

#[test]
fn the_checker_sees_cycles_and_stage_faults() {
    // The checker on its own, so that a blind parser cannot pass the real
    // check by seeing nothing.
    let paths = named_paths(&code(
        "use crate::store::{content::ContentStore, snapshot::{self, Mount}};\n\
         // use crate::pipeline::Nope;\n\
         fn f() { let s = \"crate::root\"; super::x::y(); crate::oci::digest::Digest::of(b\"\"); }\n",
    ));
    assert_eq!(
        paths,
        [
            "crate::store::content::ContentStore",
            "crate::store::snapshot::self",
            "crate::store::snapshot::Mount",
            "crate::oci::digest::Digest::of",
            "super::x::y",
        ]
    );
    let m = |path: &str, text: &str| {
        let key: Vec<String> = path.split("::").map(String::from).collect();
        (key, text.to_string())
    };
    let modules: BTreeMap<Vec<String>, String> = [
        m("oci", "pub mod a; pub mod b;"),
        m("oci::a", "use super::b::B; pub struct A;"),
        m("oci::b", "fn f(_: crate::oci::a::A) {} pub struct B;"),
        m("store", "use crate::pipeline::P; fn g(_: crate::Digest) {}"),
        m("pipeline", "use crate::store::S; pub struct P;"),
        m("layer", "use crate::oci::a::A; use crate::store::S;"),
    ]
    .into_iter()
    .collect();
    let (_, faults) = check(&modules);
    let want = [
        "store: names the crate-root re-export `crate::Digest`; name its module",
        "store uses pipeline: stage store may not depend on stage pipeline",
        "import cycle: store → pipeline → store",
        "import cycle: oci::a → oci::b → oci::a",
    ];
    assert_eq!(faults, want, "layer → store is allowed, the rest is not");
}
