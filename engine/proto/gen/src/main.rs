//! Compiles the containerd APIs unlade speaks (engine/proto/containerd) with
//! protox (a protobuf compiler in Rust, so no protoc) and writes the prost
//! messages into engine/src/containerd/proto: the snapshots service with its
//! tonic server (unlade serves it), the content and leases services with
//! their tonic clients (unlade calls them to hand blobs to containerd).
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let protos = here.join("..");
    let out = here.join("../../src/containerd/proto");
    std::fs::create_dir_all(&out)?;
    let served = protox::compile(
        ["containerd/services/snapshots/v1/snapshots.proto"],
        [&protos],
    )?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .out_dir(&out)
        .compile_fds(served)?;
    let called = protox::compile(
        [
            "containerd/services/content/v1/content.proto",
            "containerd/services/leases/v1/leases.proto",
        ],
        [&protos],
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .build_transport(false)
        .out_dir(&out)
        .compile_fds(called)?;
    Ok(())
}
