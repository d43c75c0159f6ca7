//! What a root keeps on disk, each part crash-safe on its own: blobs by
//! digest ([`content`]), overlay snapshots by chain ID and writable
//! snapshots by key ([`snapshot`]), image records by name ([`images`]),
//! and the helpers they share — private directories and temporary names
//! (`statedir`), durability ([`durable`]), file locks ([`lock`]).
//! Depends on [`crate::oci`] only.

pub mod content;
pub mod durable;
pub mod images;
pub mod lock;
pub mod snapshot;
pub(crate) mod statedir;

pub use statedir::StoreIoError;
