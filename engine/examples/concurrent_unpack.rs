//! N concurrent unpacks of one image through one `Root`, as a runtime
//! serving N container starts at once would call the library; used by
//! `perf/unpack.sh`. Prints the wall time, and how many layers this
//! process applied and blobs it imported (once each, whatever N is).
//!
//! `cargo run --release --example concurrent_unpack -- LAYOUT[:TAG] ROOT N`

use std::sync::Arc;
use std::time::Instant;

use unlade::{Cancel, Layout, Root, RootOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, layout_ref, root_dir, n] = args.as_slice() else {
        return Err("usage: concurrent_unpack LAYOUT[:TAG] ROOT N".into());
    };
    let (dir, tag) = match layout_ref.rsplit_once(':') {
        Some((d, t)) if !std::path::Path::new(layout_ref).is_dir() => (d, Some(t)),
        _ => (layout_ref.as_str(), None),
    };
    let n: usize = n.parse()?;
    let started = Instant::now();
    let layout = Arc::new(Layout::open(dir.as_ref())?);
    let image = layout.resolve(tag, None)?;
    let root = Root::open(root_dir.as_ref(), RootOptions::default())?;
    let tops = std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|_| s.spawn(|| root.unpack(layout.clone(), &image, layout_ref, &Cancel::new())))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("unpack thread panicked"))
            .collect::<Result<Vec<_>, _>>()
    })?;
    let stats = root.stats();
    println!(
        "{n} unpacks in {:.3}s: {} layers applied, {} blobs imported",
        started.elapsed().as_secs_f64(),
        stats.layers_applied,
        stats.blobs_ingested
    );
    if let Some(top) = tops.first().and_then(|u| u.top_chain) {
        println!("{top}");
    }
    Ok(())
}
