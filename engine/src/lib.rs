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
//! - [`containerd`] (feature `snapshotter`, on by default) serves
//!   containerd's snapshots API on a unix socket, so that containerd (and
//!   Kubernetes through it) keeps its snapshots in an unlade root.
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
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

// The stages, in the order a blob flows through them; each depends only
// on the ones above it (checked by `tests/tests/layering.rs`).
pub mod cancel;
#[cfg(feature = "snapshotter")]
pub mod containerd;
pub mod layer;
pub mod oci;
pub mod pipeline;
pub mod report;
pub mod root;
pub mod source;
pub mod store;
// Every `unsafe` block of the crate: the syscalls and FFI the stages
// wrap. The one other is the call of the `unsafe fn` `sys::map_layer`
// (`layer::apply::map`), whose promise only the caller can keep.
#[allow(unsafe_code)]
mod sys;

pub use cancel::Cancel;
pub use layer::apply::{apply_layer, ApplyOptions, ApplyReport, LayerInput};
pub use layer::error::{ApplyError, ErrorKind};
pub use oci::digest::Digest;
pub use oci::image::{Image, Platform};
pub use oci::reference::Reference;
pub use pipeline::pull::{PullOptions, Pulled};
pub use pipeline::task::Task;
pub use pipeline::unpack::{Progress, ProgressEvent, Unpacked};
pub use report::error_chain;
pub use root::{Root, RootError, RootOptions};
pub use source::layout::Layout;
pub use source::BlobSource;
pub use store::snapshot::Mount;
