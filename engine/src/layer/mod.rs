//! One layer blob turned into an overlay upper directory: the bytes are
//! decompressed ([`decode`]) into a stream of blocks ([`stream`]), parsed
//! as tar ([`tar`]), and each entry applied ([`apply`]) through a
//! file-system backend ([`fsops`]) confined to the target. [`error`] is
//! the one error of all of it, naming the layer, entry and offset.
//! Depends on [`crate::oci`] (digests) only: a layer knows nothing of
//! roots, stores or sources.

pub mod apply;
pub mod decode;
pub mod error;
pub mod fsops;
pub mod stream;
pub mod tar;
