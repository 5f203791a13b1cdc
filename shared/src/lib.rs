//! Types shared by the ckpt agent and controller.
//!
//! - [`image`]: the checkpoint image model (processes, threads, mappings, descriptors).
//! - [`codec`]: the self-describing, versioned, checksummed MessagePack envelope around
//!   manifests, with bounded decoding.
//! - [`chunkfmt`]: the chunk object format (header, encoding, verified decoding),
//!   the one place both stores write and read it.
//! - [`store`]: the one chunk-store interface ([`store::ChunkBackend`], with one
//!   error enum, [`store::StoreError`]) and the content-addressed chunk store in a
//!   local directory.
//! - [`objstore`]: stores named by URL (`file://`, `s3://`, `memory://`) through
//!   `object_store`, with the same chunk object format and the same interface; one
//!   storage suite runs over every backend, S3 against a real server.
//! - [`location`]: what `--image` takes (a directory, `file:///store/NAME`,
//!   `s3://bucket/prefix/NAME`) and [`location::ImageStore`], the one interface the
//!   agent's dump, restore and inspect use on any of them.
//!
//! - [`proto`]: the messages of the controller–agent barrier and their bounded
//!   frames.
//! - [`gc`]: deleting images and unreferenced chunks beside checkpoints in progress.
//! - [`awsconfig`]: the AWS shared config and credentials files (profiles) and CA
//!   bundles, for [`objstore::S3Config`].
//! - [`report`]: an error and its causes on one line, each cause once.
//! - [`stdout`]: the binaries' answers on standard output ([`out!`], [`outln!`]),
//!   where a reader that went away (`| head`) ends the command with exit 0.
//!
//! No I/O policy lives here beyond the stores themselves, and no configuration is
//! read from the environment: callers pass a lookup
//! ([`objstore::StoreConfig::from_vars`]).

pub mod awsconfig;
pub mod catalog;
pub mod chunkfmt;
pub mod codec;
pub mod gc;
pub mod image;
pub mod location;
pub mod objstore;
pub mod proto;
pub mod report;
pub mod stdout;
pub mod store;
pub mod tls;
pub mod wire;
