//! criterion benchmarks: decoding (libdeflate whole-buffer vs ISA-L and
//! zlib-rs streaming, zstd streaming), hashing, whole applies of generated
//! layers (a few thousand mixed-size files; many small files), and the write
//! stage per backend and number of workers (group `backend`).
//!
//! Run: `cargo bench -p unlade-bench`. Ratios between these are what to
//! read; absolute numbers depend on the machine and its page cache.

use std::hint::black_box;
use std::io::Write;
use std::path::Path;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use unlade::layer::decode::{self, Compression, DecodeOptions, DecodeStrategy, GzipStreamer};
use unlade::layer::fsops::pool::Pool;
use unlade::layer::fsops::{BackendKind, BackendOptions};
use unlade::{apply_layer, ApplyOptions, LayerInput};
use unlade_tests::{noise, RawTar};

/// Text-like, compressible file content (about 3:1 with gzip -6).
fn text(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "layer",
        "image",
        "overlay",
        "snapshot",
        "digest",
        "sha256",
        "container",
        "runtime",
        "file",
        "directory",
        "0x7f45",
        "ELF",
        "libc.so.6",
        "GLIBC_2.34",
        "\n",
        "  ",
        "{",
        "}",
        "return",
        "static",
    ];
    let r = noise(len, seed);
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        let b = r[i % r.len()];
        if b < 40 {
            out.push(b.wrapping_mul(7));
        } else {
            out.extend_from_slice(WORDS[(b as usize) % WORDS.len()].as_bytes());
            out.push(b' ');
        }
        i += 1;
    }
    out.truncate(len);
    out
}

/// A layer of `files` files in 50 directories, sizes from 64 B to 256 KiB.
fn layer(files: usize, max: usize) -> Vec<u8> {
    let mut t = RawTar::default();
    for d in 0..50 {
        t.dir(&format!("usr/lib/d{d:02}"));
    }
    let sizes = noise(files * 2, 99);
    for i in 0..files {
        let exp = 6 + (sizes[2 * i] as usize % 13);
        let len = ((1usize << exp) + sizes[2 * i + 1] as usize * 31).min(max);
        t.file(
            &format!("usr/lib/d{:02}/file-{i:05}.so", i % 50),
            &text(len, i as u64),
        );
    }
    t.end();
    t.bytes()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Streams `input` through the decoder thread into a consumer, the way an
/// apply does, without the hashing (measured on its own below).
fn drain_stream(input: &[u8], comp: Compression) -> usize {
    let (tx, rx) = crossbeam_channel::bounded(decode::STREAM_QUEUE);
    std::thread::scope(|s| {
        let h = s.spawn(move || decode::stream(input, comp, |b| tx.send(b).is_ok()));
        let n: usize = rx.iter().map(|b| black_box(b.len())).sum();
        assert!(h.join().unwrap().unwrap());
        n
    })
}

/// [`drain_stream`] for gzip with a chosen inflater.
fn drain_gzip(input: &[u8], with: GzipStreamer) -> usize {
    let (tx, rx) = crossbeam_channel::bounded(decode::STREAM_QUEUE);
    std::thread::scope(|s| {
        let h = s.spawn(move || decode::stream_gzip(input, with, |b| tx.send(b).is_ok()));
        let n: usize = rx.iter().map(|b| black_box(b.len())).sum();
        assert!(h.join().unwrap().unwrap());
        n
    })
}

fn benches(c: &mut Criterion) {
    let tar = layer(3000, 256 << 10);
    let gz = gzip(&tar);
    let zst = zstd::encode_all(&tar[..], 3).unwrap();

    let mut g = c.benchmark_group("decode");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(tar.len() as u64));
    g.bench_function("gzip libdeflate whole-buffer", |b| {
        b.iter(|| black_box(decode::gunzip_whole(&gz, 1 << 30).unwrap().len()))
    });
    g.bench_function("gzip isal streaming", |b| {
        b.iter(|| drain_stream(&gz, Compression::Gzip))
    });
    g.bench_function("gzip zlib-rs streaming", |b| {
        b.iter(|| drain_gzip(&gz, GzipStreamer::ZlibRs))
    });
    g.bench_function("zstd streaming", |b| {
        b.iter(|| drain_stream(&zst, Compression::Zstd))
    });
    g.bench_function("plain streaming", |b| {
        b.iter(|| drain_stream(&tar, Compression::Plain))
    });
    g.finish();

    let mut g = c.benchmark_group("hash");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(tar.len() as u64));
    g.bench_function("sha256", |b| {
        b.iter(|| decode::hash_whole(black_box(&tar), |_| {}))
    });
    g.finish();

    // Applies go to tmpfs where there is one: on ext4 the removal between
    // iterations makes the next iteration's creates scan recently freed
    // inodes, which measures ext4, not unlade. UNLADE_BENCH_DIR overrides.
    let base = std::env::var_os("UNLADE_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            let shm = Path::new("/dev/shm");
            if shm.is_dir() {
                shm.to_path_buf()
            } else {
                std::env::temp_dir()
            }
        });
    let work = tempfile::tempdir_in(base).unwrap();
    let many = layer(20_000, 2048);
    let files = [
        ("mixed.tar", &tar),
        ("mixed.tar.gz", &gz),
        ("mixed.tar.zst", &zst),
        ("small-files.tar.gz", &gzip(&many)),
    ];
    let mut g = c.benchmark_group("apply");
    g.sample_size(10);
    for (name, data) in files {
        let p = work.path().join(name);
        std::fs::write(&p, data).unwrap();
        for strategy in [DecodeStrategy::WholeBuffer, DecodeStrategy::Streaming] {
            if name.ends_with(".zst") && strategy == DecodeStrategy::Auto {
                continue;
            }
            let opts = ApplyOptions {
                decode: DecodeOptions {
                    strategy,
                    ..DecodeOptions::default()
                },
                ..ApplyOptions::default()
            };
            let dest = work.path().join("dest");
            g.bench_function(format!("{name} {strategy:?}"), |b| {
                b.iter_batched(
                    || {
                        let _ = std::fs::remove_dir_all(&dest);
                    },
                    |_| apply_layer(LayerInput::Path(p.clone()), Path::new(&dest), &opts).unwrap(),
                    BatchSize::PerIteration,
                )
            });
        }
    }
    g.finish();

    // The write stage per backend and worker count, on plain layers (no
    // decoding in the way): one pool per configuration, as a root has.
    let mut g = c.benchmark_group("backend");
    g.sample_size(10);
    let cpus = unlade::layer::fsops::pool::default_threads();
    for (name, data) in [("mixed.tar", &tar), ("small-files.tar", &many)] {
        let p = work.path().join(name);
        std::fs::write(&p, data).unwrap();
        for kind in [BackendKind::Syscalls, BackendKind::Uring] {
            for threads in [1, cpus] {
                let pool = match Pool::new(BackendOptions {
                    kind,
                    threads: Some(threads),
                }) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("skipped {kind} backend: {e}");
                        continue;
                    }
                };
                let opts = ApplyOptions {
                    pool: Some(pool),
                    ..ApplyOptions::default()
                };
                let dest = work.path().join("dest");
                g.bench_function(format!("{name} {kind} x{threads}"), |b| {
                    b.iter_batched(
                        || {
                            let _ = std::fs::remove_dir_all(&dest);
                        },
                        |_| {
                            apply_layer(LayerInput::Path(p.clone()), Path::new(&dest), &opts)
                                .unwrap()
                        },
                        BatchSize::PerIteration,
                    )
                });
            }
        }
    }
    g.finish();
}

criterion_group!(all, benches);
criterion_main!(all);
