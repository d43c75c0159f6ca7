//! `unlade gc`: removes what nothing references, and says what.

use std::path::Path;

use unlade::Cancel;

use super::{emit, open_existing, Result};

#[derive(clap::Args)]
pub struct Args {}

/// Prints one line per removed snapshot (`removed snapshot CHAIN`) and
/// blob (`removed blob DIGEST (SIZE bytes)`), one for the short links
/// when there were any, and the summary last (scripts read the last
/// line).
pub fn run(_: Args, root: &Path) -> Result {
    let r = open_existing(root)?.gc(&Cancel::new())?;
    let mut out: Vec<String> = r
        .snapshots
        .iter()
        .map(|c| format!("removed snapshot {c}"))
        .collect();
    out.extend(
        r.blobs
            .iter()
            .map(|(d, size)| format!("removed blob {d} ({size} bytes)")),
    );
    if r.links > 0 {
        out.push(format!(
            "removed {} short links (snapshots/l) of snapshots that are gone",
            r.links
        ));
    }
    let freed: u64 = r.blobs.iter().map(|(_, s)| s).sum();
    out.push(format!(
        "removed {} snapshots, {} blobs ({freed} bytes), {} links",
        r.snapshots.len(),
        r.blobs.len(),
        r.links
    ));
    emit(&out)
}
