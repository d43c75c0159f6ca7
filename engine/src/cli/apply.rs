//! `unlade apply LAYER DEST`: one layer blob into an overlay upper
//! directory.

use std::path::PathBuf;

use unlade::layer::decode::{parse_size, DecodeOptions, DecodeStrategy, DEFAULT_MEMORY_CAP};
use unlade::layer::fsops::pool::Pool;
use unlade::{apply_layer, ApplyError, ApplyOptions, Digest, LayerInput};

use super::{emit, warn, Result};

#[derive(clap::Args)]
pub struct Args {
    /// Layer blob, or `-` for standard input.
    layer: PathBuf,
    /// Target directory (created if missing).
    dest: PathBuf,
    /// Fail unless the uncompressed stream hashes to this.
    #[arg(long, value_name = "sha256:HEX")]
    diff_id: Option<String>,
    /// Largest layer decoded in one buffer (e.g. 512M, 2G); larger
    /// layers stream. Default 1G, or $UNLADE_MEMORY_CAP.
    #[arg(long, value_name = "BYTES")]
    memory_cap: Option<String>,
    /// Decoding path.
    #[arg(long, value_enum, default_value = "auto")]
    decode: DecodeStrategy,
    /// Print nothing but the diff ID.
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    write: super::WriteArgs,
}

pub fn run(a: Args) -> Result {
    let diff_id = a.diff_id.map(|d| d.parse::<Digest>()).transpose()?;
    let memory_cap = match a
        .memory_cap
        .or_else(|| std::env::var("UNLADE_MEMORY_CAP").ok())
    {
        Some(s) => parse_size(&s)?,
        None => DEFAULT_MEMORY_CAP,
    };
    let opts = ApplyOptions {
        decode: DecodeOptions {
            strategy: a.decode,
            memory_cap,
        },
        same_owner: None,
        diff_id,
        backend: a.write.options(),
        ..ApplyOptions::default()
    };
    // The layer is opened before DEST is created: a mistyped LAYER must
    // not leave an empty DEST behind.
    let name = a.layer.display().to_string();
    let input = if a.layer.as_os_str() == "-" {
        LayerInput::Stdin
    } else {
        let f = std::fs::File::open(&a.layer)
            .map_err(|e| ApplyError::fs("open layer", e).layer(&name))?;
        LayerInput::File(f)
    };
    let started = std::time::Instant::now();
    // The pool is started here rather than inside the apply, to say what
    // wrote the files.
    let kind = a.write.backend;
    let pool = Pool::new_for(a.write.options(), &a.dest)
        .map_err(|e| ApplyError::fs(format!("start the {kind} backend"), e).layer(&name))?;
    let opts = ApplyOptions {
        pool: Some(pool.clone()),
        ..opts
    };
    let r = apply_layer(input, &a.dest, &opts).map_err(|e| e.relabel(&name))?;
    warn(&r.warnings);
    let mut out = Vec::new();
    if !a.quiet {
        let secs = started.elapsed().as_secs_f64();
        out.push(format!(
            "applied {} entries ({} files, {} dirs, {} whiteouts), {} bytes uncompressed ({:?}, {}) in {:.3}s by {} {} worker{}",
            r.counts.entries,
            r.counts.files,
            r.counts.dirs,
            r.counts.whiteouts,
            r.uncompressed_bytes,
            r.compression,
            if r.whole_buffer { "whole-buffer" } else { "streaming" },
            secs,
            pool.threads(),
            pool.backend(),
            if pool.threads() == 1 { "" } else { "s" },
        ));
    }
    out.push(r.diff_id.to_string());
    emit(&out)
}
