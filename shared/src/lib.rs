//! Types shared by the ckpt agent and controller.
//!
//! - [`image`]: the checkpoint image model (processes, threads, mappings, descriptors).
//! - [`codec`]: the self-describing, versioned, checksummed MessagePack envelope around
//!   manifests, with bounded decoding.
//! - [`store`]: the content-addressed chunk store in a local directory, which
//!   `ckpt-agent dump`/`restore` use today.
//! - [`objstore`]: stores named by URL (`file://`, `s3://`, `memory://`) through
//!   `object_store`, with the same chunk object format ([`chunkfmt`]). Tested against
//!   a real S3 server; not yet wired into the agent's dump and restore.
//!
//! No I/O policy lives here beyond the stores themselves.

pub mod chunkfmt;
pub mod codec;
pub mod image;
pub mod objstore;
pub mod store;
