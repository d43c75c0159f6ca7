//! systemd's readiness protocol (`sd_notify(3)`): a service of
//! `Type=notify` tells the manager it is ready by sending `READY=1` in a
//! datagram to `$NOTIFY_SOCKET`, so that units ordered after it
//! (containerd) start only once its socket answers. Without the variable
//! (not started by systemd) nothing is sent.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (`READY=1`, `STOPPING=1`) to the service manager, if
/// there is one. A failure is one warning line: the service runs either
/// way (systemd then times its start out, which says why).
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = path.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        // An abstract socket (Linux): "@name".
        Some(name) => <SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|a| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &a));
    if let Err(e) = sent {
        eprintln!(
            "unlade: warning: could not tell systemd {state} at NOTIFY_SOCKET={}: {e}",
            path.to_string_lossy()
        );
    }
}
