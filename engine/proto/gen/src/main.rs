//! Compiles containerd's snapshots API (engine/proto/containerd) with protox
//! (a protobuf compiler in Rust, so no protoc) and writes the prost messages
//! and the tonic server into engine/src/containerd/proto.
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let protos = here.join("..");
    let out = here.join("../../src/containerd/proto");
    std::fs::create_dir_all(&out)?;
    let fds = protox::compile(
        ["containerd/services/snapshots/v1/snapshots.proto"],
        [&protos],
    )?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .out_dir(&out)
        .compile_fds(fds)?;
    Ok(())
}
