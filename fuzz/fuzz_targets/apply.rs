//! Drives the whole applier (detection, decoding, tar parsing, applying)
//! with arbitrary bytes into a fresh directory, and checks the one promise
//! that must hold for any input: nothing next to DEST changes.
#![no_main]

use std::fs;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use unlade::layer::decode::{DecodeOptions, DecodeStrategy};
use unlade::{apply_layer, ApplyOptions, LayerInput};

fn world() -> &'static PathBuf {
    static W: OnceLock<PathBuf> = OnceLock::new();
    W.get_or_init(|| {
        let w = std::env::temp_dir().join(format!("unlade-fuzz-{}", std::process::id()));
        let _ = fs::remove_dir_all(&w);
        fs::create_dir_all(w.join("outside")).unwrap();
        fs::write(w.join("outside/victim"), b"original").unwrap();
        w
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let dest = w.join("dest");
    let layer = w.join("layer");
    fs::write(&layer, data).unwrap();
    for strategy in [DecodeStrategy::WholeBuffer, DecodeStrategy::Streaming] {
        let opts = ApplyOptions {
            decode: DecodeOptions {
                strategy,
                memory_cap: 64 << 20,
            },
            ..ApplyOptions::default()
        };
        // Errors are fine; what matters is what they cannot do.
        let _ = apply_layer(LayerInput::Path(layer.clone()), &dest, &opts);
        assert_eq!(fs::read(w.join("outside/victim")).unwrap(), b"original");
        let mut names: Vec<_> = fs::read_dir(w)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["dest", "layer", "outside"]);
        assert_eq!(fs::read_dir(w.join("outside")).unwrap().count(), 1);
        // Make everything removable again (0000 directories are fine for
        // root; immutable flags are not something a layer can set).
        fs::remove_dir_all(&dest).unwrap();
    }
});
