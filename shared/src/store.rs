//! The content-addressed chunk store, on a local directory.
//!
//! ```text
//! DIR/manifest.ckpt                  the image manifest (crate::codec envelope)
//! DIR/chunks/<first 2 hex>/<64 hex>  one object per distinct chunk
//! ```
//!
//! A chunk object is what [`crate::chunkfmt`] encodes (a 12-byte header, then the
//! raw bytes or one zstd frame), named by the BLAKE3 of the uncompressed bytes; the
//! object stores of [`crate::objstore`] keep the very same objects under the same
//! keys.
//!
//! Durability, and why it is split the way it is:
//! - Each chunk is written to a temporary file in its final directory and renamed
//!   into place, so a reader never sees half an object under a real name (a crash can
//!   leave only temporaries, which [`ChunkStore::list_chunks`] ignores).
//! - Chunks are not fsynced as they are written: the writers would wait on the disk
//!   one chunk at a time. [`ChunkStore::sync`] fsyncs every chunk written since the
//!   last sync, and their directories, from many threads at once, so the file system
//!   batches them into a few journal commits. A `syncfs(2)` would be one call, but it
//!   also waits for every other writer's dirty data on the machine (measured here:
//!   150 ms for a store of 20 small files while a build ran, against 15 ms for the
//!   targeted fsyncs).
//! - The manifest is the commit point: written last, to a temporary that is fsynced in
//!   the same batch as the chunks not yet synced, renamed into place once that batch
//!   is done, and the directory fsynced: two rounds of commits, not four. Before it
//!   exists there is no image, only garbage.
//!
//! Every read is verified: header, length and BLAKE3 of the uncompressed bytes. A
//! store is shared with whoever can write to its directory, so nothing read from it is
//! trusted.
//!
//! Kernel contract: plain POSIX file I/O and fsync; no capability needed beyond write
//! access to the directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::chunkfmt::{
    self, is_chunk_name, ChunkFmtError, CHUNK_HEADER_LEN, CODEC_RAW, CODEC_ZSTD,
};
use crate::codec;
use crate::image::ChunkRef;

/// File name of the image manifest inside the store directory.
pub const MANIFEST_NAME: &str = "manifest.ckpt";
const MANIFEST_TMP_NAME: &str = "manifest.ckpt.tmp";
/// Directory of the chunk objects, in every store.
pub const CHUNKS_DIR: &str = "chunks";
/// Directory of the image manifests in a shared store.
pub const IMAGES_DIR: &str = "images";

/// Longest image name accepted (one path segment in every store).
pub const MAX_IMAGE_NAME: usize = 200;

/// How many bytes of a raw chunk [`ChunkBackend::get_chunk_with`] hashes and hands on
/// at a time: a multiple of the page size (the restore writes whole pages), well
/// inside a core's L2 cache, and long enough for BLAKE3's SIMD lanes and for few
/// system calls.
pub const STREAM_STEP: usize = 256 << 10;

/// Errors of a chunk store, a directory ([`ChunkStore`]) or an object store
/// ([`crate::objstore`]): one enum for both, so that callers handle "missing",
/// "corrupt" or "unreachable" once whatever the store. Each variant names the store
/// (its URL or directory), the operation and the object.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not a store URL {url:?}: use file:///path, s3://bucket/prefix or memory://")]
    NotAUrl { url: String },

    #[error("unsupported store URL scheme {scheme:?}: use file://, s3:// or memory://")]
    UnsupportedScheme { scheme: String },

    #[error("invalid store URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },

    #[error("cannot open store {store}: {reason}")]
    Config { store: String, reason: String },

    #[error("cannot open store {store}: {source}")]
    Open {
        store: String,
        #[source]
        source: Box<object_store::Error>,
    },

    #[error("cannot start the I/O runtime of store {store}: {source}")]
    Runtime {
        store: String,
        #[source]
        source: std::io::Error,
    },

    /// The file system of a directory store is full (ENOSPC, EDQUOT).
    #[error(
        "{op} {}: the store's file system is full ({source}). Free space there \
         (`ckpt-agent images gc --store file://...` deletes the chunks no image \
         references) or write the image to a store with room",
        path.display()
    )]
    NoSpace {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A system call on a directory store's file (the path names the store).
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// `cause` is the innermost error (say, "Connection refused"); `source` has the
    /// whole chain with the retries made.
    #[error(
        "store {store} is unreachable: {op} {key} failed after retries ({cause}); check \
         that the server is up and that the endpoint (AWS_ENDPOINT_URL) and network are \
         right, then run the command again"
    )]
    Unreachable {
        store: String,
        op: &'static str,
        key: String,
        cause: String,
        #[source]
        source: Box<object_store::Error>,
    },

    #[error(
        "store {store} refused {op} {key} ({source}): check the credentials \
         (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and their rights on the bucket"
    )]
    Denied {
        store: String,
        op: &'static str,
        key: String,
        #[source]
        source: Box<object_store::Error>,
    },

    #[error(
        "store {store} has no such bucket or directory ({op} {key}: {source}): create it, \
         or fix the store URL"
    )]
    NoBucket {
        store: String,
        op: &'static str,
        key: String,
        #[source]
        source: Box<object_store::Error>,
    },

    #[error("{op} {key} on store {store} failed: {source}")]
    Request {
        store: String,
        op: &'static str,
        key: String,
        #[source]
        source: Box<object_store::Error>,
    },

    #[error(
        "chunk {chunk} is missing from store {store}: the image cannot be restored from \
         this store"
    )]
    Missing { store: String, chunk: String },

    #[error(
        "chunk {chunk} in store {store} is corrupted ({reason}): the image cannot be \
         restored from this store"
    )]
    Corrupt {
        store: String,
        chunk: String,
        reason: String,
    },

    #[error(
        "no image {name:?} in store {store}: its manifest is missing (the dump did not complete?)"
    )]
    NoImage { store: String, name: String },

    /// A self-contained image directory without its manifest.
    #[error("no image at {}: {MANIFEST_NAME} is missing (the dump did not complete?)", dir.display())]
    NoImageDir { dir: PathBuf },

    /// `manifest` says which: "of image NAME in store S", or the path of a
    /// self-contained image's manifest.
    #[error(
        "manifest {manifest} is {len} bytes, more than the limit of {max}: it is not a \
         ckpt manifest"
    )]
    ManifestTooLarge {
        manifest: String,
        len: u64,
        max: u64,
    },

    #[error("chunk of {len} bytes is too large: a chunk holds at most 4 GiB")]
    ChunkTooLarge { len: usize },

    #[error(
        "{name:?} is not an image name: use 1 to {MAX_IMAGE_NAME} letters, digits, '.', \
         '_' or '-', not starting with '.'"
    )]
    BadImageName { name: String },

    #[error("{name:?} is not a chunk name (64 lowercase hex digits expected)")]
    BadChunkName { name: String },

    /// Bad input to a put or get (length, level, buffer): not the store's fault.
    #[error(transparent)]
    Format(#[from] ChunkFmtError),
}

impl StoreError {
    /// A chunk-format error met in `store`: a corrupt object names the store too;
    /// bad input stays [`StoreError::Format`].
    pub fn from_format(store: &str, e: ChunkFmtError) -> StoreError {
        match e {
            ChunkFmtError::Corrupt { chunk, reason } => StoreError::Corrupt {
                store: store.to_string(),
                chunk,
                reason,
            },
            other => StoreError::Format(other),
        }
    }
}

/// Checks that `name` can name an image: one path segment in every store.
pub fn check_image_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IMAGE_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadImageName { name: name.into() })
    }
}

/// Where [`ChunkBackend::get_chunk_with`] hands a chunk's bytes on: `(offset,
/// bytes)`.
pub type ChunkSink<'a> = dyn FnMut(usize, &[u8]) -> Result<(), StoreError> + 'a;

/// What a chunk store does, whatever it is on: the one interface of the directory
/// store ([`ChunkStore`]) and of the object stores
/// ([`crate::objstore::BlockingStore`]), which [`crate::location::ImageStore`] holds
/// as a trait object instead of matching on the kind of store at every call, and
/// which one test suite (`shared/tests/storage.rs`) runs against every backend.
///
/// Synchronous: its callers are the agent's plain worker threads. The object
/// stores' async API stays available beside it for code with a runtime of its own
/// (the gc markers, the restore's many-requests fetch).
pub trait ChunkBackend: Send + Sync + std::fmt::Debug {
    /// How errors name this store: its URL (and endpoint), or its directory.
    fn display_name(&self) -> &str;

    /// Whether chunks go through an object-store client (over the network for S3):
    /// callers then keep more of them in flight.
    fn is_remote(&self) -> bool;

    /// Fails early, before anything is frozen, if the store cannot be reached.
    fn check(&self) -> Result<(), StoreError>;

    /// Stores `bytes` under `chunk` (computed by the caller with [`ChunkRef::of`]:
    /// the hash is trusted, the length checked), compressed with zstd at
    /// `zstd_level` when that makes it smaller. A chunk already in the store is not
    /// written again: `stored_bytes` is then 0.
    fn put_chunk(
        &self,
        chunk: ChunkRef,
        bytes: &[u8],
        zstd_level: Option<i32>,
    ) -> Result<PutOutcome, StoreError>;

    /// Reads `chunk` into `out` (exactly `chunk.len` bytes), handing the bytes on
    /// while they arrive: `sink(off, bytes)` gets `out[off..off + bytes.len()]`, in
    /// order, in steps of [`STREAM_STEP`] (the last one shorter), so the caller can
    /// write them out while they are still in the CPU's cache.
    ///
    /// **The bytes handed on are not verified yet**: only an `Ok` return says the
    /// whole chunk matched its BLAKE3. A compressed object is decoded and verified
    /// first, then handed on in one call. An error of the sink stops the read and
    /// is returned as it was.
    fn get_chunk_with(
        &self,
        chunk: &ChunkRef,
        out: &mut [u8],
        sink: &mut ChunkSink<'_>,
    ) -> Result<(), StoreError>;

    /// Reads and verifies `chunk` into `out` (exactly `chunk.len` bytes).
    fn get_chunk(&self, chunk: &ChunkRef, out: &mut [u8]) -> Result<(), StoreError> {
        self.get_chunk_with(chunk, out, &mut |_, _| Ok(()))
    }

    /// Whether an object for `chunk` exists (its content is not checked).
    fn has_chunk(&self, chunk: &ChunkRef) -> Result<bool, StoreError>;

    /// Names (64 hex digits) of every chunk in the store, sorted; other objects
    /// (temporaries, strangers) are skipped.
    fn list_chunks(&self) -> Result<Vec<String>, StoreError>;

    /// Deletes the chunk named `hex`; one that is not there is not an error.
    fn delete_chunk(&self, hex: &str) -> Result<(), StoreError>;

    /// Makes every chunk put so far durable (a directory store batches its fsyncs;
    /// an object store's put is durable when it returns).
    fn sync(&self) -> Result<(), StoreError>;

    /// Commits image `name`: every chunk put so far is made durable first, then the
    /// manifest is written whole, replacing an older one.
    fn put_manifest(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError>;

    /// Reads the manifest of image `name` (at most [`codec::MAX_ENVELOPE`] bytes; the
    /// bytes are not decoded here).
    fn get_manifest(&self, name: &str) -> Result<Vec<u8>, StoreError>;

    /// Names of the images that have a manifest, sorted.
    fn list_manifests(&self) -> Result<Vec<String>, StoreError>;
}

/// What [`ChunkBackend::put_chunk`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutOutcome {
    /// The chunk's identity (BLAKE3 and length of the uncompressed bytes).
    pub chunk: ChunkRef,
    /// Bytes written to the store, header included; 0 when the chunk was already
    /// there (dedup).
    pub stored_bytes: u64,
}

/// The operation of fsyncing one chunk file, in errors (and in `sync_with`'s list).
const FSYNC_CHUNK: &str = "fsync chunk";

/// Names the temporaries of chunks being written (with the PID), across every
/// store of the process.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A content-addressed chunk store on a directory. `Send + Sync`: many threads may
/// put and get at once.
///
/// Two layouts: a self-contained image directory ([`open`](Self::open): its
/// manifest and its own `chunks/`), which holds one image and so ignores the image
/// name of [`ChunkBackend`]'s manifest calls; and a shared store
/// ([`open_shared`](Self::open_shared), [`open_named`](Self::open_named)), the layout
/// of [`crate::objstore`], whose images are `images/NAME/manifest.ckpt`.
#[derive(Debug)]
pub struct ChunkStore {
    /// How errors name the store: the image directory, or `file://ROOT`.
    name: String,
    /// The manifest's directory for the inherent manifest calls (the bound image).
    dir: PathBuf,
    chunks: PathBuf,
    /// `ROOT/images` of a shared store; `None` for a self-contained image.
    images: Option<PathBuf>,
    /// Chunks written since the last [`ChunkStore::sync`].
    unsynced: std::sync::Mutex<Vec<PathBuf>>,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| match source.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => StoreError::NoSpace {
            op,
            path: path.to_path_buf(),
            source,
        },
        _ => StoreError::Io {
            op,
            path: path.to_path_buf(),
            source,
        },
    }
}

impl ChunkStore {
    /// Opens (creating if needed) a self-contained image directory `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let chunks = dir.join(CHUNKS_DIR);
        fs::create_dir_all(&chunks).map_err(io_err("create chunk directory", &chunks))?;
        Ok(ChunkStore {
            name: dir.display().to_string(),
            dir: dir.to_path_buf(),
            chunks,
            images: None,
            unsynced: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Opens (creating its chunk directory if needed) the shared store at `root`,
    /// whose images are named in [`ChunkBackend`]'s manifest calls; [`dir`](Self::dir)
    /// is then `root`.
    pub fn open_shared(root: &Path) -> Result<Self, StoreError> {
        let mut store = Self::open_named_at(root, root.to_path_buf())?;
        store.dir = root.to_path_buf();
        Ok(store)
    }

    /// Opens image `name` in the shared store at `root`, in the layout of
    /// [`crate::objstore`]: chunks in `root/chunks/`, shared by every image of the
    /// store (a chunk already there is not written again), and the manifest in
    /// `root/images/<name>/`. The image's directory is made by
    /// [`put_manifest`](Self::put_manifest), so opening one to read it creates nothing
    /// but the chunk directory.
    pub fn open_named(root: &Path, name: &str) -> Result<Self, StoreError> {
        Self::open_named_at(root, root.join(IMAGES_DIR).join(name))
    }

    fn open_named_at(root: &Path, dir: PathBuf) -> Result<Self, StoreError> {
        let chunks = root.join(CHUNKS_DIR);
        fs::create_dir_all(&chunks).map_err(io_err("create chunk directory", &chunks))?;
        Ok(ChunkStore {
            name: format!("file://{}", root.display()),
            dir,
            chunks,
            images: Some(root.join(IMAGES_DIR)),
            unsynced: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// How errors name this store: the image directory, or `file://ROOT`.
    pub fn display_name(&self) -> &str {
        &self.name
    }

    fn corrupt(&self, chunk: &ChunkRef, reason: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            store: self.name.clone(),
            chunk: chunk.hex(),
            reason: reason.into(),
        }
    }

    fn fmt_err(&self, e: ChunkFmtError) -> StoreError {
        StoreError::from_format(&self.name, e)
    }

    /// The directory that holds the manifest.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the object for `hex` (a chunk name).
    fn object_path(&self, hex: &str) -> PathBuf {
        self.chunks.join(&hex[..2]).join(hex)
    }

    /// Stores `bytes`, compressed with zstd at `zstd_level` when that makes it smaller.
    pub fn put_chunk(
        &self,
        bytes: &[u8],
        zstd_level: Option<i32>,
    ) -> Result<PutOutcome, StoreError> {
        if u32::try_from(bytes.len()).is_err() {
            return Err(StoreError::ChunkTooLarge { len: bytes.len() });
        }
        self.put_chunk_with_ref(ChunkRef::of(bytes), bytes, zstd_level)
    }

    /// Stores `bytes` under `chunk`, which the caller already computed with
    /// [`ChunkRef::of`] (the hash is trusted, not recomputed; the length is checked).
    pub fn put_chunk_with_ref(
        &self,
        chunk: ChunkRef,
        bytes: &[u8],
        zstd_level: Option<i32>,
    ) -> Result<PutOutcome, StoreError> {
        if bytes.len() != chunk.len as usize {
            return Err(StoreError::Format(ChunkFmtError::RefMismatch {
                chunk: chunk.hex(),
                expected: chunk.len,
                got: bytes.len(),
            }));
        }
        if let Some(level) = zstd_level {
            chunkfmt::check_zstd_level(level)?;
        }
        let hex = chunk.hex();
        let path = self.object_path(&hex);
        if path.exists() {
            return Ok(PutOutcome {
                chunk,
                stored_bytes: 0,
            });
        }
        chunkfmt::encode_with(&chunk, bytes, zstd_level, |header, payload| {
            self.write_object(&path, &hex, header, payload)
        })
        .map_err(|e| self.fmt_err(e))?
        .map(|stored_bytes| PutOutcome {
            chunk,
            stored_bytes,
        })
    }

    /// Writes one object through a temporary and a rename; returns the bytes written.
    fn write_object(
        &self,
        path: &Path,
        hex: &str,
        header: &[u8; CHUNK_HEADER_LEN],
        payload: &[u8],
    ) -> Result<u64, StoreError> {
        let shard = self.chunks.join(&hex[..2]);
        // One counter for the whole process: several stores (one per rank of a job,
        // in the agent daemon) may write the same chunk into one pool at once.
        let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = shard.join(format!(".tmp.{hex}.{}.{seq}", std::process::id()));
        let mut file = match create_new(&tmp) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(&shard).map_err(io_err("create chunk directory", &shard))?;
                create_new(&tmp).map_err(io_err("create chunk temporary", &tmp))?
            }
            Err(e) => return Err(io_err("create chunk temporary", &tmp)(e)),
        };
        let written = file
            .write_all(header)
            .and_then(|()| file.write_all(payload));
        if written.is_ok() {
            // Start writeback now, without waiting for it: the disk works while we
            // read and hash the next chunks, and the fsync in `sync` finds little left.
            // SAFETY: sync_file_range on a descriptor we own; no memory is passed.
            unsafe {
                libc::sync_file_range(
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    0,
                    0,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
        drop(file);
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("write chunk temporary", &tmp)(e));
        }
        if let Err(e) = fs::rename(&tmp, path) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("rename chunk into place", path)(e));
        }
        self.unsynced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.to_path_buf());
        Ok((CHUNK_HEADER_LEN + payload.len()) as u64)
    }

    /// Reads `chunk` into `out` (which must be exactly `chunk.len` bytes), verifying its
    /// header, length and BLAKE3.
    pub fn get_chunk(&self, chunk: &ChunkRef, out: &mut [u8]) -> Result<(), StoreError> {
        self.read_chunk(chunk, out, &mut |_, _| Ok(()))
    }

    /// See [`ChunkBackend::get_chunk_with`]. A raw payload is read from the file
    /// straight into `out`, a step at a time, each step hashed and handed on.
    fn read_chunk(
        &self,
        chunk: &ChunkRef,
        out: &mut [u8],
        sink: &mut ChunkSink<'_>,
    ) -> Result<(), StoreError> {
        if out.len() != chunk.len as usize {
            return Err(StoreError::Format(ChunkFmtError::BufferSize {
                chunk: chunk.hex(),
                expected: chunk.len,
                got: out.len(),
            }));
        }
        let hex = chunk.hex();
        let path = self.object_path(&hex);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::Missing {
                    store: self.name.clone(),
                    chunk: hex,
                });
            }
            Err(e) => return Err(io_err("open chunk", &path)(e)),
        };
        let size = file.metadata().map_err(io_err("stat chunk", &path))?.len();
        if size < CHUNK_HEADER_LEN as u64 {
            return Err(self.corrupt(chunk, format!("object is only {size} bytes")));
        }
        let mut header = [0u8; CHUNK_HEADER_LEN];
        file.read_exact(&mut header)
            .map_err(io_err("read chunk", &path))?;
        let payload_len = size - CHUNK_HEADER_LEN as u64;
        let codec = chunkfmt::check_header(chunk, &header, payload_len)
            .map_err(|r| self.corrupt(chunk, r))?;
        match codec {
            CODEC_RAW => {
                let mut hasher = blake3::Hasher::new();
                for (i, step) in out.chunks_mut(STREAM_STEP).enumerate() {
                    self.read_exact_or_corrupt(&mut file, step, chunk, &path)?;
                    hasher.update(step);
                    sink(i * STREAM_STEP, step)?;
                }
                chunkfmt::check_hash(chunk, &hasher.finalize()).map_err(|e| self.fmt_err(e))
            }
            CODEC_ZSTD => {
                let mut compressed = vec![0u8; payload_len as usize];
                self.read_exact_or_corrupt(&mut file, &mut compressed, chunk, &path)?;
                chunkfmt::decompress_into(chunk, &compressed, out).map_err(|e| self.fmt_err(e))?;
                sink(0, out)
            }
            _ => unreachable!("check_header accepts only known codecs"),
        }
    }

    /// Reads exactly `buf.len()` bytes; a short read means the object changed under us.
    fn read_exact_or_corrupt(
        &self,
        file: &mut File,
        buf: &mut [u8],
        chunk: &ChunkRef,
        path: &Path,
    ) -> Result<(), StoreError> {
        match file.read_exact(buf) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(self.corrupt(chunk, "object is shorter than its header says"))
            }
            Err(e) => Err(io_err("read chunk", path)(e)),
        }
    }

    /// Whether an object for `chunk` exists (its content is not checked).
    pub fn has_chunk(&self, chunk: &ChunkRef) -> bool {
        self.object_path(&chunk.hex()).exists()
    }

    /// Names (64 hex digits) of every chunk object in the store, sorted. Temporaries
    /// and foreign files are skipped.
    pub fn list_chunks(&self) -> Result<Vec<String>, StoreError> {
        let mut names = Vec::new();
        let shards = fs::read_dir(&self.chunks).map_err(io_err("list chunks", &self.chunks))?;
        for shard in shards {
            let shard = shard.map_err(io_err("list chunks", &self.chunks))?;
            let shard_name = shard.file_name();
            let Some(prefix) = shard_name.to_str() else {
                continue;
            };
            if prefix.len() != 2 || !is_lower_hex(prefix) {
                continue;
            }
            let shard_path = shard.path();
            let entries = fs::read_dir(&shard_path).map_err(io_err("list chunks", &shard_path))?;
            for entry in entries {
                let entry = entry.map_err(io_err("list chunks", &shard_path))?;
                if let Some(name) = entry.file_name().to_str() {
                    if is_chunk_name(name) && name.starts_with(prefix) {
                        names.push(name.to_string());
                    }
                }
            }
        }
        names.sort_unstable();
        Ok(names)
    }

    /// Removes the chunk named `hex` (as [`list_chunks`](Self::list_chunks) gives it).
    /// Returns whether it existed.
    pub fn remove_chunk(&self, hex: &str) -> Result<bool, StoreError> {
        if !is_chunk_name(hex) {
            return Err(StoreError::BadChunkName {
                name: hex.to_string(),
            });
        }
        let path = self.object_path(hex);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("remove chunk", &path)(e)),
        }
    }

    /// Makes every chunk written since the last sync durable: fsyncs them and their
    /// directories from up to 16 threads at once (the journal batches concurrent
    /// fsyncs into one commit).
    pub fn sync(&self) -> Result<(), StoreError> {
        self.sync_with(&[])
    }

    /// [`sync`](Self::sync), with `extra` files fsynced in the same batch.
    fn sync_with(&self, extra: &[PathBuf]) -> Result<(), StoreError> {
        let files = std::mem::take(&mut *self.unsynced.lock().unwrap_or_else(|e| e.into_inner()));
        if files.is_empty() && extra.is_empty() {
            return Ok(());
        }
        let mut dirs: Vec<PathBuf> = files
            .iter()
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .collect();
        dirs.sort();
        dirs.dedup();
        if !files.is_empty() {
            dirs.push(self.chunks.clone());
        }
        // Files and directories in one batch: all of them must be durable before
        // the manifest is renamed into place, in no particular order between them.
        let all: Vec<(&Path, &'static str)> = files
            .iter()
            .map(|p| (p.as_path(), FSYNC_CHUNK))
            .chain(dirs.iter().map(|p| (p.as_path(), "fsync chunk directory")))
            .chain(extra.iter().map(|p| (p.as_path(), "fsync")))
            .collect();
        let next = AtomicU64::new(0);
        let threads = all.len().clamp(1, 16);
        let done = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| -> Result<(), StoreError> {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                            let Some(&(p, op)) = all.get(i) else {
                                return Ok(());
                            };
                            match File::open(p).and_then(|f| f.sync_all()) {
                                Ok(()) => {}
                                // A chunk deleted since it was written has nothing
                                // left to make durable (its directory still is).
                                Err(e)
                                    if op == FSYNC_CHUNK && e.kind() == io::ErrorKind::NotFound => {
                                }
                                Err(e) => return Err(io_err(op, p)(e)),
                            }
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        });
        if done.is_err() {
            // Keep them for the next attempt.
            self.unsynced
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(files);
        }
        done
    }

    /// Commits the image: writes the manifest to a temporary, fsyncs it together
    /// with the chunks not yet synced ([`sync`](Self::sync)), renames it to
    /// `manifest.ckpt` and fsyncs the directory. Once this returns, the image exists and survives a crash.
    pub fn put_manifest(&self, bytes: &[u8]) -> Result<(), StoreError> {
        self.write_manifest(&self.dir, bytes)
    }

    /// Reads the manifest (at most [`codec::MAX_ENVELOPE`] bytes).
    pub fn get_manifest(&self) -> Result<Vec<u8>, StoreError> {
        self.read_manifest(&self.dir, None)
    }

    /// The directory of image `name`'s manifest: the image directory itself for a
    /// self-contained one (which holds one image, whatever its name).
    fn manifest_dir(&self, name: &str) -> Result<PathBuf, StoreError> {
        check_image_name(name)?;
        Ok(match &self.images {
            Some(images) => images.join(name),
            None => self.dir.clone(),
        })
    }

    fn write_manifest(&self, dir: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        if !dir.is_dir() {
            // A new image of a shared store: its directory entry must be durable too.
            fs::create_dir_all(dir).map_err(io_err("create image directory", dir))?;
            for d in dir.ancestors().skip(1).take(2) {
                File::open(d)
                    .and_then(|f| f.sync_all())
                    .map_err(io_err("fsync image directory parent", d))?;
            }
        }
        let tmp = dir.join(MANIFEST_TMP_NAME);
        let path = dir.join(MANIFEST_NAME);
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err("create manifest temporary", &tmp))?;
        let written = file
            .write_all(bytes)
            .map_err(io_err("write manifest temporary", &tmp));
        drop(file);
        // The chunks, their directories and the temporary are made durable together;
        // only then is the manifest renamed into place: it is never durable before
        // the chunks it names. A failure leaves no temporary behind.
        if let Err(e) = written.and_then(|()| self.sync_with(std::slice::from_ref(&tmp))) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, &path).map_err(io_err("rename manifest into place", &path))?;
        let handle = File::open(dir).map_err(io_err("open store directory", dir))?;
        handle
            .sync_all()
            .map_err(io_err("fsync store directory", dir))?;
        Ok(())
    }

    /// Reads the manifest in `dir`; `name` is the image's in a shared store.
    fn read_manifest(&self, dir: &Path, name: Option<&str>) -> Result<Vec<u8>, StoreError> {
        let path = dir.join(MANIFEST_NAME);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(match (name, &self.images) {
                    (Some(name), Some(_)) => StoreError::NoImage {
                        store: self.name.clone(),
                        name: name.into(),
                    },
                    _ => StoreError::NoImageDir {
                        dir: dir.to_path_buf(),
                    },
                });
            }
            Err(e) => return Err(io_err("open manifest", &path)(e)),
        };
        let max = codec::MAX_ENVELOPE;
        let size = file
            .metadata()
            .map_err(io_err("stat manifest", &path))?
            .len();
        if size > max {
            return Err(StoreError::ManifestTooLarge {
                manifest: path.display().to_string(),
                len: size,
                max,
            });
        }
        // `take` guards against a file that grows after the stat.
        let mut bytes = Vec::with_capacity(size as usize);
        file.take(max + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err("read manifest", &path))?;
        if bytes.len() as u64 > max {
            return Err(StoreError::ManifestTooLarge {
                manifest: path.display().to_string(),
                len: bytes.len() as u64,
                max,
            });
        }
        Ok(bytes)
    }
}

impl ChunkBackend for ChunkStore {
    fn display_name(&self) -> &str {
        &self.name
    }

    fn is_remote(&self) -> bool {
        false
    }

    /// A directory that could be opened is there.
    fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn put_chunk(
        &self,
        chunk: ChunkRef,
        bytes: &[u8],
        zstd_level: Option<i32>,
    ) -> Result<PutOutcome, StoreError> {
        self.put_chunk_with_ref(chunk, bytes, zstd_level)
    }

    fn get_chunk_with(
        &self,
        chunk: &ChunkRef,
        out: &mut [u8],
        sink: &mut ChunkSink<'_>,
    ) -> Result<(), StoreError> {
        self.read_chunk(chunk, out, sink)
    }

    fn has_chunk(&self, chunk: &ChunkRef) -> Result<bool, StoreError> {
        Ok(ChunkStore::has_chunk(self, chunk))
    }

    fn list_chunks(&self) -> Result<Vec<String>, StoreError> {
        ChunkStore::list_chunks(self)
    }

    fn delete_chunk(&self, hex: &str) -> Result<(), StoreError> {
        self.remove_chunk(hex).map(|_| ())
    }

    fn sync(&self) -> Result<(), StoreError> {
        ChunkStore::sync(self)
    }

    fn put_manifest(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let dir = self.manifest_dir(name)?;
        self.write_manifest(&dir, bytes)
    }

    fn get_manifest(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        let dir = self.manifest_dir(name)?;
        self.read_manifest(&dir, Some(name))
    }

    /// A self-contained image directory lists no names: its one image has none.
    fn list_manifests(&self) -> Result<Vec<String>, StoreError> {
        let Some(images) = &self.images else {
            return Ok(Vec::new());
        };
        let entries = match fs::read_dir(images) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list images", images)(e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("list images", images))?;
            if let Some(name) = entry.file_name().to_str() {
                if check_image_name(name).is_ok() && entry.path().join(MANIFEST_NAME).is_file() {
                    names.push(name.to_string());
                }
            }
        }
        names.sort_unstable();
        Ok(names)
    }
}

fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).create_new(true).open(path)
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunkfmt::CHUNK_VERSION;

    #[test]
    fn two_stores_of_one_pool_write_the_same_chunks_at_once() {
        // The agent daemon dumps several ranks of a job at once, each with a store
        // of its own over one pool, and identical ranks have identical chunks.
        let d = tempfile::tempdir().unwrap();
        let chunks: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i; 4096]).collect();
        std::thread::scope(|s| {
            for name in ["r0", "r1", "r2"] {
                let st = ChunkStore::open_named(d.path(), name).unwrap();
                let chunks = &chunks;
                s.spawn(move || {
                    for c in chunks {
                        st.put_chunk(c, None).unwrap();
                    }
                });
            }
        });
        let st = ChunkStore::open_named(d.path(), "check").unwrap();
        assert_eq!(st.list_chunks().unwrap().len(), chunks.len());
    }
    use crate::codec::{self, CodecError};
    use ckpt_tests::data::{noise, text};

    fn store() -> (tempfile::TempDir, ChunkStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        (dir, store)
    }

    fn object_bytes(store: &ChunkStore, c: &ChunkRef) -> Vec<u8> {
        fs::read(store.object_path(&c.hex())).unwrap()
    }

    fn get(store: &ChunkStore, c: &ChunkRef) -> Result<Vec<u8>, StoreError> {
        let mut out = vec![0u8; c.len as usize];
        store.get_chunk(c, &mut out).map(|()| out)
    }

    #[test]
    fn is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<ChunkStore>();
    }

    #[test]
    fn chunk_names_are_blake3_hex() {
        // BLAKE3 of the empty input, a published test vector.
        assert_eq!(
            ChunkRef::of(b"").hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn open_creates_layout() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("a/b");
        let store = ChunkStore::open(&root).unwrap();
        assert!(root.join("chunks").is_dir());
        assert_eq!(store.dir(), root);
        // Opening again is fine.
        ChunkStore::open(&root).unwrap();
    }

    #[test]
    fn raw_round_trip() {
        let (_d, store) = store();
        let data = noise(10_000, 1);
        let put = store.put_chunk(&data, None).unwrap();
        assert_eq!(put.chunk, ChunkRef::of(&data));
        assert_eq!(put.stored_bytes, (CHUNK_HEADER_LEN + data.len()) as u64);
        let hex = put.chunk.hex();
        let path = store.dir().join("chunks").join(&hex[..2]).join(&hex);
        assert!(path.is_file());
        let obj = fs::read(&path).unwrap();
        assert_eq!(&obj[..4], b"CKCH");
        assert_eq!(obj[4], CHUNK_VERSION);
        assert_eq!(obj[5], CODEC_RAW);
        assert_eq!(&obj[6..8], &[0, 0]);
        assert_eq!(&obj[8..12], &(data.len() as u32).to_le_bytes());
        assert!(store.has_chunk(&put.chunk));
        assert_eq!(get(&store, &put.chunk).unwrap(), data);
    }

    #[test]
    fn zstd_round_trip() {
        let (_d, store) = store();
        let data = text(1 << 20);
        let put = store.put_chunk(&data, Some(3)).unwrap();
        assert_eq!(
            put.chunk,
            ChunkRef::of(&data),
            "identity ignores compression"
        );
        assert!(
            put.stored_bytes < data.len() as u64 / 10,
            "{}",
            put.stored_bytes
        );
        assert_eq!(object_bytes(&store, &put.chunk)[5], CODEC_ZSTD);
        assert_eq!(get(&store, &put.chunk).unwrap(), data);

        // Another level on the same thread (the cached context is re-levelled).
        let data2 = text(5000);
        let put2 = store.put_chunk(&data2, Some(19)).unwrap();
        assert_eq!(get(&store, &put2.chunk).unwrap(), data2);
        // A page of zeros, the common case.
        let zeros = vec![0u8; 4096];
        let put3 = store.put_chunk(&zeros, Some(1)).unwrap();
        assert_eq!(get(&store, &put3.chunk).unwrap(), zeros);
    }

    #[test]
    fn incompressible_falls_back_to_raw() {
        let (_d, store) = store();
        let data = noise(64 * 1024, 7);
        let put = store.put_chunk(&data, Some(3)).unwrap();
        assert_eq!(object_bytes(&store, &put.chunk)[5], CODEC_RAW);
        assert_eq!(put.stored_bytes, (CHUNK_HEADER_LEN + data.len()) as u64);
        assert_eq!(get(&store, &put.chunk).unwrap(), data);
        // Tiny inputs never shrink either.
        let put = store.put_chunk(b"x", Some(3)).unwrap();
        assert_eq!(object_bytes(&store, &put.chunk)[5], CODEC_RAW);
        assert_eq!(get(&store, &put.chunk).unwrap(), b"x");
    }

    #[test]
    fn empty_chunk() {
        let (_d, store) = store();
        let put = store.put_chunk(b"", Some(3)).unwrap();
        assert_eq!(put.chunk.len, 0);
        assert_eq!(get(&store, &put.chunk).unwrap(), b"");
    }

    #[test]
    fn dedup() {
        let (_d, store) = store();
        let data = text(8192);
        let first = store.put_chunk(&data, Some(3)).unwrap();
        assert!(first.stored_bytes > 0);
        let second = store.put_chunk(&data, None).unwrap();
        assert_eq!(second.chunk, first.chunk);
        assert_eq!(second.stored_bytes, 0);
        let third = store
            .put_chunk_with_ref(first.chunk, &data, Some(3))
            .unwrap();
        assert_eq!(third.stored_bytes, 0);
        assert_eq!(store.list_chunks().unwrap(), vec![first.chunk.hex()]);
    }

    #[test]
    fn put_with_ref() {
        let (_d, store) = store();
        let data = text(3000);
        let c = ChunkRef::of(&data);
        let put = store.put_chunk_with_ref(c, &data, None).unwrap();
        assert_eq!(put.chunk, c);
        assert_eq!(get(&store, &c).unwrap(), data);
        assert!(matches!(
            store.put_chunk_with_ref(c, &data[..10], None),
            Err(StoreError::Format(ChunkFmtError::RefMismatch { .. }))
        ));
    }

    #[test]
    fn bad_zstd_level() {
        let (_d, store) = store();
        assert!(matches!(
            store.put_chunk(b"abc", Some(1000)),
            Err(StoreError::Format(ChunkFmtError::ZstdLevel {
                level: 1000,
                ..
            }))
        ));
    }

    #[test]
    fn flipped_byte_is_corrupt_naming_the_chunk() {
        for level in [None, Some(3)] {
            let (_d, store) = store();
            let data = text(20_000);
            let put = store.put_chunk(&data, level).unwrap();
            let path = store.object_path(&put.chunk.hex());
            let mut obj = fs::read(&path).unwrap();
            let last = obj.len() - 1;
            obj[last] ^= 0x40;
            fs::write(&path, &obj).unwrap();
            let err = get(&store, &put.chunk).unwrap_err();
            match &err {
                StoreError::Corrupt { chunk, .. } => assert_eq!(chunk, &put.chunk.hex()),
                other => panic!("{level:?}: expected Corrupt, got {other:?}"),
            }
            let msg = err.to_string();
            assert!(msg.starts_with(&format!(
                "chunk {} in store {} is corrupted (",
                put.chunk.hex(),
                store.display_name()
            )));
            assert!(msg.ends_with("the image cannot be restored from this store"));
            if level.is_none() {
                assert!(msg.contains("(checksum mismatch)"), "{msg}");
            }
        }
    }

    #[test]
    fn damaged_headers_are_corrupt() {
        let (_d, store) = store();
        let data = text(5000);
        let put = store.put_chunk(&data, None).unwrap();
        let path = store.object_path(&put.chunk.hex());
        let good = fs::read(&path).unwrap();
        type Damage = fn(&mut Vec<u8>);
        let cases: Vec<(Damage, &str)> = vec![
            (|o| o[0] = b'X', "bad magic"),
            (|o| o[4] = 9, "object version 9"),
            (|o| o[5] = 7, "unknown codec 7"),
            (|o| o[6] = 1, "reserved"),
            (|o| o[8] ^= 1, "length is"),
            (|o| o.truncate(100), "raw payload is 88 bytes"),
            (|o| o.truncate(5), "only 5 bytes"),
            (|o| o.push(0), "raw payload is 5001 bytes"),
            (|o| o[5] = CODEC_ZSTD, "not smaller"),
            (
                |o| {
                    o[5] = CODEC_ZSTD;
                    o.truncate(200);
                },
                "zstd",
            ),
        ];
        for (damage, want) in cases {
            let mut obj = good.clone();
            damage(&mut obj);
            fs::write(&path, &obj).unwrap();
            match get(&store, &put.chunk) {
                Err(StoreError::Corrupt { chunk, reason, .. }) => {
                    assert_eq!(chunk, put.chunk.hex());
                    assert!(reason.contains(want), "want {want:?}, got {reason:?}");
                }
                other => panic!("want Corrupt({want}), got {other:?}"),
            }
        }
    }

    #[test]
    fn zstd_frame_of_other_content_is_corrupt() {
        // A valid zstd frame of the right length but the wrong bytes.
        let (_d, store) = store();
        let a = text(4000);
        let mut b = a.clone();
        b[0] = b'T';
        let pa = store.put_chunk(&a, Some(3)).unwrap();
        let pb = store.put_chunk(&b, Some(3)).unwrap();
        fs::copy(
            store.object_path(&pb.chunk.hex()),
            store.object_path(&pa.chunk.hex()),
        )
        .unwrap();
        match get(&store, &pa.chunk) {
            Err(StoreError::Corrupt { reason, .. }) => assert_eq!(reason, "checksum mismatch"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn deleted_chunk_is_missing() {
        let (_d, store) = store();
        let put = store.put_chunk(b"some bytes", None).unwrap();
        assert!(store.remove_chunk(&put.chunk.hex()).unwrap());
        assert!(!store.remove_chunk(&put.chunk.hex()).unwrap());
        assert!(!store.has_chunk(&put.chunk));
        let err = get(&store, &put.chunk).unwrap_err();
        match &err {
            StoreError::Missing { chunk, store: s } => {
                assert_eq!(chunk, &put.chunk.hex());
                assert_eq!(s, store.display_name());
            }
            other => panic!("expected Missing, got {other:?}"),
        }
        assert!(err.to_string().contains(&put.chunk.hex()));
    }

    #[test]
    fn wrong_buffer_size() {
        let (_d, store) = store();
        let put = store.put_chunk(b"12345", None).unwrap();
        let mut out = [0u8; 4];
        assert!(matches!(
            store.get_chunk(&put.chunk, &mut out),
            Err(StoreError::Format(ChunkFmtError::BufferSize {
                expected: 5,
                got: 4,
                ..
            }))
        ));
    }

    #[test]
    fn list_and_remove() {
        let (_d, store) = store();
        let mut want: Vec<String> = (0..20u64)
            .map(|i| {
                store
                    .put_chunk(&noise(100, i + 1), None)
                    .unwrap()
                    .chunk
                    .hex()
            })
            .collect();
        want.sort();
        // Leftover temporaries and strangers are not chunks.
        let shard = store.dir().join("chunks").join(&want[0][..2]);
        fs::write(shard.join(format!(".tmp.{}.1.2", want[0])), b"x").unwrap();
        fs::write(shard.join("README"), b"x").unwrap();
        fs::create_dir_all(store.dir().join("chunks/zz")).unwrap();
        assert_eq!(store.list_chunks().unwrap(), want);
        assert!(store.remove_chunk(&want[3]).unwrap());
        want.remove(3);
        assert_eq!(store.list_chunks().unwrap(), want);
        assert!(matches!(
            store.remove_chunk("../../etc/passwd"),
            Err(StoreError::BadChunkName { .. })
        ));
    }

    #[test]
    fn manifest_round_trip_and_commit() {
        let (_d, store) = store();
        let img = codec::tests::sample_image();
        let bytes = codec::encode_image(&img).unwrap();
        store.put_manifest(&bytes).unwrap();
        assert!(!store.dir().join("manifest.ckpt.tmp").exists());
        let back = store.get_manifest().unwrap();
        assert_eq!(back, bytes);
        assert_eq!(codec::decode_image(&back).unwrap(), img);
        // Overwriting replaces it whole.
        store.put_manifest(b"second").unwrap();
        assert_eq!(store.get_manifest().unwrap(), b"second");
    }

    #[test]
    fn missing_manifest() {
        let (d, store) = store();
        let err = store.get_manifest().unwrap_err();
        assert!(matches!(err, StoreError::NoImageDir { .. }));
        assert_eq!(
            err.to_string(),
            format!(
                "no image at {}: manifest.ckpt is missing (the dump did not complete?)",
                d.path().display()
            )
        );
    }

    #[test]
    fn truncated_manifest() {
        let (_d, store) = store();
        let bytes = codec::encode_image(&codec::tests::sample_image()).unwrap();
        fs::write(store.dir().join(MANIFEST_NAME), &bytes[..bytes.len() - 10]).unwrap();
        let back = store.get_manifest().unwrap();
        assert!(matches!(
            codec::decode_image(&back),
            Err(CodecError::Truncated { .. })
        ));
    }

    #[test]
    fn oversized_manifest_is_refused_without_reading() {
        let (_d, store) = store();
        let f = File::create(store.dir().join(MANIFEST_NAME)).unwrap();
        f.set_len(codec::MAX_ENVELOPE + 1).unwrap(); // sparse
        assert!(matches!(
            store.get_manifest(),
            Err(StoreError::ManifestTooLarge { .. })
        ));
    }

    /// A chunk removed before the sync that would have made it durable does not
    /// fail that sync (nor the commit after it). It used to: the sync fsynced a
    /// file that was gone.
    #[test]
    fn sync_after_a_removed_chunk() {
        let (_d, store) = store();
        let put = store.put_chunk(b"gone before the sync", None).unwrap();
        store.put_chunk(b"kept", None).unwrap();
        assert!(store.remove_chunk(&put.chunk.hex()).unwrap());
        store.sync().unwrap();
        store.put_manifest(b"m").unwrap();
    }

    #[test]
    fn sync_works() {
        let (_d, store) = store();
        store.put_chunk(b"abc", None).unwrap();
        store.sync().unwrap();
    }

    #[test]
    fn concurrent_puts_and_gets() {
        let (_d, store) = store();
        let store = &store;
        std::thread::scope(|s| {
            for t in 0..4u64 {
                s.spawn(move || {
                    for i in 0..50u64 {
                        // Half the chunks are shared between threads (dedup races).
                        let data = if i % 2 == 0 {
                            text(4096 + i as usize)
                        } else {
                            noise(4096, t * 1000 + i + 1)
                        };
                        let level = if t % 2 == 0 { Some(3) } else { None };
                        let put = store.put_chunk(&data, level).unwrap();
                        assert_eq!(get(store, &put.chunk).unwrap(), data);
                    }
                });
            }
        });
        // 25 shared + 4 * 25 private chunks.
        assert_eq!(store.list_chunks().unwrap().len(), 125);
    }

    // The directory store writes and reads through `chunkfmt`: its files are
    // exactly the objects `encode` makes, and `decode_into` reads them alike.
    use crate::chunkfmt::{decode_into, encode, tests::cases};

    fn object_path(store: &ChunkStore, c: &ChunkRef) -> PathBuf {
        let hex = c.hex();
        store.object_path(&hex)
    }

    #[test]
    fn chunk_store_objects_decode() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        for (data, level) in cases() {
            let put = store.put_chunk(&data, level).unwrap();
            let object = std::fs::read(object_path(&store, &put.chunk)).unwrap();
            // Same bytes, not just the same content: the two encoders agree exactly.
            assert_eq!(
                encode(&put.chunk, &data, level).unwrap(),
                object,
                "{level:?}"
            );
            let mut out = vec![0u8; data.len()];
            decode_into(&put.chunk, &object, &mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    #[test]
    fn encoded_objects_read_back_through_chunk_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        for (data, level) in cases() {
            let chunk = ChunkRef::of(&data);
            let object = encode(&chunk, &data, level).unwrap();
            let path = object_path(&store, &chunk);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &object).unwrap();
            assert!(store.has_chunk(&chunk));
            let mut out = vec![0u8; data.len()];
            store.get_chunk(&chunk, &mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    /// Every damage `store.rs`'s own test applies is reported with the same reason
    /// by both decoders.
    #[test]
    fn damage_is_reported_like_chunk_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        let data = text(5000);
        let put = store.put_chunk(&data, None).unwrap();
        let path = object_path(&store, &put.chunk);
        let good = std::fs::read(&path).unwrap();
        type Damage = fn(&mut Vec<u8>);
        let cases: Vec<Damage> = vec![
            |o| o[0] = b'X',
            |o| o[4] = 9,
            |o| o[5] = 7,
            |o| o[6] = 1,
            |o| o[8] ^= 1,
            |o| o.truncate(100),
            |o| o.truncate(5),
            |o| o.push(0),
            |o| o[5] = CODEC_ZSTD,
            |o| {
                o[5] = CODEC_ZSTD;
                o.truncate(200);
            },
            |o| {
                let last = o.len() - 1;
                o[last] ^= 0x40;
            },
        ];
        for damage in cases {
            let mut obj = good.clone();
            damage(&mut obj);
            std::fs::write(&path, &obj).unwrap();
            let mut out = vec![0u8; data.len()];
            let theirs = match store.get_chunk(&put.chunk, &mut out) {
                Err(StoreError::Corrupt { reason, .. }) => reason,
                other => panic!("ChunkStore: expected Corrupt, got {other:?}"),
            };
            let ours = match decode_into(&put.chunk, &obj, &mut out) {
                Err(ChunkFmtError::Corrupt { chunk, reason }) => {
                    assert_eq!(chunk, put.chunk.hex());
                    reason
                }
                other => panic!("chunkfmt: expected Corrupt, got {other:?}"),
            };
            assert_eq!(ours, theirs);
        }
    }
}
