//! What the OCI and Docker specifications define, and nothing that does
//! I/O: content digests and chain IDs ([`digest`]), image references as
//! Docker and containerd normalize them ([`mod@reference`]), and indexes,
//! manifests and configs parsed and resolved to an [`image::Image`]
//! ([`image`]). Every other stage depends on this one.

pub mod digest;
pub mod image;
pub mod reference;
