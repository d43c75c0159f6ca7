//! Decode-only gzip throughput of one decoder on the calling thread, the
//! output discarded: what `perf`/`hyperfine` compare against the `igzip
//! -dc` and `pigz -dc` command lines on real layers.
//!
//! `cargo run --release -p unlade-bench --example gunzip -- DECODER FILE...`
//! with DECODER one of `isal` (the streaming path's default), `zlib-rs`
//! (flate2 streaming), `libdeflate` (whole-buffer, 1 GiB cap). Prints the
//! uncompressed bytes.

use std::fs::File;
use std::hint::black_box;

use unlade::layer::decode::{self, GzipStreamer};

fn main() {
    let mut args = std::env::args().skip(1);
    let decoder = args.next().unwrap_or_default();
    let files: Vec<String> = args.collect();
    if files.is_empty() {
        eprintln!("usage: gunzip isal|zlib-rs|libdeflate FILE...");
        std::process::exit(2);
    }
    if decoder == "isal" && !GzipStreamer::isal_built_in() {
        eprintln!("built without libisal: isal would be zlib-rs");
        std::process::exit(2);
    }
    let mut total = 0u64;
    for f in &files {
        total += match decoder.as_str() {
            "isal" | "zlib-rs" => {
                let with = if decoder == "isal" {
                    GzipStreamer::Isal
                } else {
                    GzipStreamer::ZlibRs
                };
                let mut n = 0u64;
                let input = File::open(f).expect("open");
                let done = decode::stream_gzip(input, with, |b| {
                    n += black_box(b.len()) as u64;
                    true
                })
                .unwrap_or_else(|e| panic!("{f}: {e}"));
                assert!(done);
                n
            }
            "libdeflate" => {
                let input = std::fs::read(f).expect("read");
                let w = decode::gunzip_whole(&input, 1 << 30).expect("whole-buffer decode");
                black_box(w.len()) as u64
            }
            other => {
                eprintln!("unknown decoder {other:?}");
                std::process::exit(2);
            }
        };
    }
    println!("{total}");
}
