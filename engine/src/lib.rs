//! unlade: pull container images and unpack their layers into overlayfs
//! snapshots, fast and safely.
//!
//! The crate is a library first; the `unlade` binary is a thin command line
//! over it. See ARCHITECTURE.md for the parts and the data flow. What is
//! here so far is the layer applier: [`apply::apply_layer`] turns one layer
//! blob (tar, gzip or zstd) into an overlay upper directory, with every
//! file-system operation confined to the target by construction.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod apply;
pub mod cancel;
pub mod content;
pub mod decode;
pub mod digest;
pub mod error;
pub mod flight;
pub mod fsops;
pub mod gc;
pub mod image;
pub mod images;
pub mod root;
pub mod snapshot;
pub mod source;
mod statedir;
mod sys;
pub mod tar;
pub mod unpack;

pub use apply::{apply_layer, ApplyOptions, ApplyReport, LayerInput};
pub use digest::Digest;
pub use error::{Error, ErrorKind};
