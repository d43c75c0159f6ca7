//! containerd's own gRPC socket, as a client: what the CRI proxy forwards
//! to and where the blob hand-off writes ([`crate::containerd::handoff`]).

use std::path::PathBuf;

/// A channel to the unix socket `socket`: dialled when first used and
/// dialled again when lost, so that a server started before containerd
/// (as the unit orders it) reaches it once it is up.
pub(crate) fn channel(socket: PathBuf) -> tonic::transport::Channel {
    // The URI is not used to connect: the connector dials the socket.
    let endpoint = tonic::transport::Endpoint::from_static("http://containerd.sock")
        .connect_timeout(std::time::Duration::from_secs(10));
    endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
        let socket = socket.clone();
        async move {
            let s = tokio::net::UnixStream::connect(socket).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
        }
    }))
}
