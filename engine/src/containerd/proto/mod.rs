//! containerd's snapshots API as prost messages and a tonic server, and
//! the parts of its content and leases APIs unlade calls as tonic clients,
//! generated from `engine/proto/containerd` by `engine/proto/gen`
//! (`cd engine/proto/gen && cargo run && cargo fmt --all`) and checked in, so that building
//! unlade needs no protobuf compiler.
// The comments come from containerd's .proto files as written there
// ("<namespace>/<sequence>/<key>" reads as HTML to rustdoc).
#![allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    rustdoc::invalid_html_tags
)]

/// `containerd.types`: the Mount message.
pub mod types {
    include!("containerd.types.rs");
}

/// `containerd.services.snapshots.v1`: the Snapshots service.
pub mod services {
    /// The snapshots service.
    pub mod snapshots {
        /// Version 1, what containerd 1.6 and later speak.
        pub mod v1 {
            include!("containerd.services.snapshots.v1.rs");
        }
    }

    /// The content service: Info and Write, for the blob hand-off.
    pub mod content {
        /// Version 1, what containerd 1.6 and later speak.
        pub mod v1 {
            include!("containerd.services.content.v1.rs");
        }
    }

    /// The leases service: Create and Delete, for the blob hand-off.
    pub mod leases {
        /// Version 1, what containerd 1.6 and later speak.
        pub mod v1 {
            include!("containerd.services.leases.v1.rs");
        }
    }
}
