//! Types shared by the ckpt agent and controller.
//!
//! - [`image`]: the checkpoint image model (processes, threads, mappings, descriptors).
//! - [`codec`]: the self-describing, versioned, checksummed MessagePack envelope around
//!   manifests, with bounded decoding.
//! - [`store`]: the content-addressed chunk store (a directory for now; S3 comes later
//!   behind the same interface).
//!
//! No I/O policy lives here beyond the chunk store itself.

pub mod codec;
pub mod image;
pub mod store;
