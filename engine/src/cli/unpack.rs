//! `unlade unpack LAYOUT[:TAG]`: an image of an OCI layout into committed
//! snapshots. Creates the root if needed. Interruptible (SIGINT, SIGTERM:
//! see [`super::signals`]).

use std::path::Path;
use std::sync::Arc;

use unlade::pipeline::flight::Role;
use unlade::root::{Root, RootOptions};
use unlade::source::layout::{Layout, LayoutRef};
use unlade::store::durable::Durability;

use super::{emit, signals, warn, ImageArgs, Result};

#[derive(clap::Args)]
pub struct Args {
    /// The layout directory, optionally with `:TAG` (the
    /// org.opencontainers.image.ref.name annotation).
    layout: String,
    #[command(flatten)]
    image: ImageArgs,
    /// Record the image under this name (default: LAYOUT:TAG, or the
    /// layout with the manifest digest).
    #[arg(long)]
    name: Option<String>,
    /// Make every file of every snapshot durable before its commit,
    /// and the commit itself (also blobs and the image record).
    #[arg(long)]
    sync: bool,
    /// How --sync syncs: `written` (the files and directories each
    /// layer wrote) or `syncfs` (the whole file system per layer).
    #[arg(long, value_enum, default_value = "written", requires = "sync")]
    sync_mode: Durability,
}

pub fn run(a: Args, root: &Path) -> Result {
    let started = std::time::Instant::now();
    let lref = LayoutRef::parse(&a.layout);
    let platform = a.image.platform()?;
    let layout = Layout::open(&lref.dir)?;
    let image = layout.resolve(lref.tag.as_deref(), platform.as_ref())?;
    let mut opts = RootOptions {
        durability: if a.sync {
            a.sync_mode
        } else {
            Durability::None
        },
        ..RootOptions::default()
    };
    a.image.apply_to(&mut opts);
    let interrupts = signals::watch()?;
    let root = Root::open(root, opts)?;
    let name = a.name.unwrap_or_else(|| lref.image_name(&image.manifest));
    let r = root
        .unpack(Arc::new(layout), &image, &name, interrupts.cancel())
        .map_err(|e| interrupts.explain(e))?;
    warn(&r.warnings);
    let stats = root.stats();
    let mut out = Vec::new();
    if !a.image.quiet {
        for (chain, role) in &r.roles {
            let how = match role {
                Role::Led => "applied",
                Role::TookOver => "applied (took over)",
                Role::Waited => "done by another",
                _ => "done",
            };
            out.push(format!("layer {chain}: {how}"));
        }
        out.push(format!(
            "unpacked {name}: {} layers, {} committed before, {} applied here, {} blobs imported, in {:.3}s",
            r.chain_ids.len(),
            r.already,
            stats.layers_applied,
            stats.blobs_ingested,
            started.elapsed().as_secs_f64()
        ));
    }
    match r.top_chain {
        Some(c) => out.push(c.to_string()),
        None => return Err(format!("image {name} has no layers: nothing to mount").into()),
    }
    emit(&out)
}
