//! criterion benchmarks of the gzip decoders one by one, decode only: one
//! thread, output discarded (each streamed block dropped as it comes, the
//! whole buffer dropped after the call). The decoders: ISA-L streaming
//! (the default of the streaming path), zlib-rs streaming (flate2), and
//! libdeflate whole-buffer (`gunzip_whole`, a 1 GiB anonymous map).
//!
//! Input: the gzip blobs of an OCI layout, real layers: the directory
//! `UNLADE_BENCH_LAYOUT` names, else `/tmp/unlade-images/golang` (what
//! `IMAGES=golang /work/shared/testimages/build.sh /tmp/unlade-images`
//! builds) if it is there, else a generated layer of a few thousand files
//! compressed by flate2 at level 6.
//!
//! Run: `cargo bench -p unlade-bench --bench decode`. The `gunzip`
//! example (`bench/examples/gunzip.rs`) is the same per decoder as a
//! command, for timing against `igzip -dc` and `pigz -dc`.

use std::hint::black_box;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use unlade::layer::decode::{self, GzipStreamer};
use unlade_tests::RawTar;

/// The gzip blobs (gzip magic, over 1 MiB) of the layout at `dir`.
fn gzip_blobs(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir.join("blobs/sha256")) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
    paths.sort();
    paths
        .into_iter()
        .filter_map(|p| {
            let mut magic = [0u8; 2];
            std::fs::File::open(&p).ok()?.read_exact(&mut magic).ok()?;
            let len = std::fs::metadata(&p).ok()?.len();
            (magic == [0x1f, 0x8b] && len > 1 << 20).then(|| std::fs::read(&p).ok())?
        })
        .collect()
}

/// A generated layer: 3000 files of compressible text, gzip level 6.
fn generated() -> Vec<u8> {
    let mut t = RawTar::default();
    for i in 0..3000usize {
        let len = 64 << (i % 12);
        let body: Vec<u8> = (0..len)
            .map(|k| b"layer overlay snapshot digest\n"[(k * 7 + i) % 30])
            .collect();
        t.file(&format!("usr/lib/file-{i:05}"), &body);
    }
    t.end();
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    e.write_all(&t.bytes()).unwrap();
    e.finish().unwrap()
}

fn stream(gz: &[u8], with: GzipStreamer) -> u64 {
    let mut n = 0u64;
    let done = decode::stream_gzip(gz, with, |b| {
        n += black_box(b.len()) as u64;
        true
    })
    .unwrap();
    assert!(done);
    n
}

fn benches(c: &mut Criterion) {
    let layout = std::env::var_os("UNLADE_BENCH_LAYOUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/unlade-images/golang"));
    let mut layers = gzip_blobs(&layout);
    let what = if layers.is_empty() {
        layers.push(generated());
        "generated layer".to_string()
    } else {
        format!("{} gzip layers of {}", layers.len(), layout.display())
    };
    let plain: u64 = layers.iter().map(|l| stream(l, GzipStreamer::Isal)).sum();
    let compressed: usize = layers.iter().map(Vec::len).sum();
    eprintln!("decode bench: {what}, {compressed} bytes inflating to {plain}");
    if !GzipStreamer::isal_built_in() {
        eprintln!("decode bench: built without libisal: \"isal streaming\" is zlib-rs");
    }

    let mut g = c.benchmark_group("gunzip");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(plain));
    g.bench_function("isal streaming", |b| {
        b.iter(|| {
            layers
                .iter()
                .map(|l| stream(l, GzipStreamer::Isal))
                .sum::<u64>()
        })
    });
    g.bench_function("zlib-rs streaming", |b| {
        b.iter(|| {
            layers
                .iter()
                .map(|l| stream(l, GzipStreamer::ZlibRs))
                .sum::<u64>()
        })
    });
    g.bench_function("libdeflate whole-buffer", |b| {
        b.iter(|| {
            layers
                .iter()
                .map(|l| black_box(decode::gunzip_whole(l, 1 << 30).unwrap().len()) as u64)
                .sum::<u64>()
        })
    });
    g.finish();
}

criterion_group!(all, benches);
criterion_main!(all);
