//! N concurrent pulls of one reference through one `Root`, as a runtime
//! serving N container starts at once would call the library; used by
//! `perf/pull.sh`. Prints the wall time, how many layers this process
//! applied and blobs it fetched (once each, whatever N is), and the top
//! chain ID.
//!
//! `cargo run --release --example concurrent_pull -- REF ROOT N [--plain-http]`

use std::time::Instant;

use unlade::source::remote::RemoteOptions;
use unlade::{Cancel, PullOptions, Reference, Root, RootOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (reference, root_dir, n, plain_http) = match args.as_slice() {
        [_, r, root, n] => (r, root, n, false),
        [_, r, root, n, flag] if flag == "--plain-http" => (r, root, n, true),
        _ => return Err("usage: concurrent_pull REF ROOT N [--plain-http]".into()),
    };
    let n: usize = n.parse()?;
    let started = Instant::now();
    let reference = Reference::parse(reference)?;
    let root = Root::open(root_dir.as_ref(), RootOptions::default())?;
    let opts = PullOptions {
        remote: RemoteOptions {
            plain_http,
            ..RemoteOptions::default()
        },
        platform: None,
        record_as: None,
        require_chain: None,
    };
    let pulls = std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|_| s.spawn(|| root.pull(&reference, &opts, None, &Cancel::new())))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("pull thread panicked"))
            .collect::<Result<Vec<_>, _>>()
    })?;
    let stats = root.stats();
    println!(
        "{n} pulls in {:.3}s: {} layers applied, {} blobs fetched",
        started.elapsed().as_secs_f64(),
        stats.layers_applied,
        stats.blobs_ingested
    );
    if let Some(top) = pulls.first().and_then(|p| p.unpacked.top_chain) {
        println!("{top}");
    }
    Ok(())
}
