//! unlade: pull container images and unpack their layers into overlayfs
//! snapshots, fast and safely.
//!
//! The crate is a library first; the `unlade` binary is a thin command line
//! over it. See ARCHITECTURE.md for the parts and the data flow.
//!
//! - [`Root`] is what a runtime embeds: open a root directory, then
//!   [`Root::unpack`] images (from an OCI layout: [`Layout`], or any
//!   [`BlobSource`]) into committed overlay snapshots — each layer applied
//!   once however many threads and processes ask at the same time —,
//!   [`Root::mounts`] / [`Root::prepare_rw`] for the overlay mount of an
//!   image or of a container's writable snapshot, [`Root::gc`].
//! - Every operation blocks and takes a [`Cancel`] token;
//!   [`Root::unpack_task`] runs one on its own thread as a [`Task`], a
//!   `Future` that async code can `.await` and that cancels the work when
//!   dropped.
//! - [`apply_layer`] turns one layer blob (tar, gzip or zstd) into an
//!   overlay upper directory, with every file-system operation confined to
//!   the target by construction.
//!
//! ```no_run
//! use std::sync::Arc;
//! use unlade::{Cancel, Layout, Root, RootOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let root = Root::open("/var/lib/unlade".as_ref(), RootOptions::default())?;
//! let layout = Arc::new(Layout::open("assets/demo-image".as_ref())?);
//! let image = layout.resolve(Some("latest"), None)?;
//! let done = root.unpack(layout, &image, "demo:latest", &Cancel::new())?;
//! let top = done.top_chain.expect("the image has layers");
//! println!("{}", root.prepare_rw("ctr1", Some(&top), &Cancel::new())?
//!     .command_line("/run/ctr1/rootfs".as_ref()));
//! # Ok(())
//! # }
//! ```
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod apply;
pub mod cancel;
pub mod content;
pub mod decode;
pub mod digest;
pub mod durable;
pub mod error;
pub mod fetch;
pub mod flight;
pub mod fsops;
pub mod gc;
pub mod image;
pub mod images;
pub mod progress;
pub mod pull;
pub mod reference;
pub mod remote;
pub mod root;
pub mod snapshot;
pub mod source;
mod statedir;
mod sys;
pub mod tar;
pub mod task;
pub mod unpack;

pub use apply::{apply_layer, ApplyOptions, ApplyReport, LayerInput};
pub use cancel::Cancel;
pub use digest::Digest;
pub use error::{Error, ErrorKind};
pub use image::{Image, Layout, Platform};
pub use pull::{PullOptions, Pulled};
pub use reference::Reference;
pub use root::{Root, RootOptions, UnpackError};
pub use snapshot::Mount;
pub use task::Task;
pub use unpack::{BlobSource, Progress, ProgressEvent, Unpacked};
