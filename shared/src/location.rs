//! Where an image lives: what `--image` takes, and the one store interface that
//! dump, restore and inspect use whatever the kind of store.
//!
//! ```text
//! /var/tmp/img                  a self-contained image directory: manifest.ckpt and
//!                               chunks/ inside it (no sharing with other images)
//! file:///var/tmp/store/NAME    image NAME in a shared local store
//! s3://bucket/prefix/NAME       image NAME in a shared S3 store (prefix optional)
//! ```
//!
//! A URL's last path segment is the image name and the rest is the store (the layout
//! of [`crate::objstore`]: `chunks/` shared by every image of the store, so the same
//! pages across ranks and across checkpoints are stored once, and
//! `images/NAME/manifest.ckpt`). `file://` goes through [`ChunkStore`], which
//! batches its fsyncs; `s3://` through [`BlockingStore`]. `memory://` is refused
//! here: a store inside one process would vanish when the command exits.
//!
//! [`ImageStore`] holds whichever it is as one [`ChunkBackend`] and calls it without
//! asking which; the object store is kept beside it only for what has no directory
//! equivalent (the gc markers, and the restore's many-requests fetch).

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::gc::{self, GcError, Leases, Registration};
use crate::image::ChunkRef;
use crate::objstore::{self, BlockingStore, StoreConfig, StoreUrl};
use crate::store::{ChunkBackend, ChunkStore, PutOutcome, StoreError};

/// Errors of an image store, naming the store.
#[derive(Debug, thiserror::Error)]
pub enum ImageStoreError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Gc(#[from] GcError),
    #[error("invalid image location {location:?}: {reason}")]
    BadLocation { location: String, reason: String },
}

impl ImageStoreError {
    /// Whether the error says the store could not be reached (as opposed to bad
    /// data or bad input).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ImageStoreError::Store(StoreError::Unreachable { .. }))
    }
}

/// A parsed image location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A self-contained image directory.
    Dir(PathBuf),
    /// Image `name` in the shared store at `store`.
    Named { store: StoreUrl, name: String },
}

impl Location {
    /// Parses what `--image` was given: a URL (it has `://`) or a directory path.
    pub fn parse(s: &str) -> Result<Location, ImageStoreError> {
        let bad = |reason: &str| ImageStoreError::BadLocation {
            location: s.into(),
            reason: reason.into(),
        };
        let Some((scheme, rest)) = s.split_once("://") else {
            if s.is_empty() {
                return Err(bad("empty"));
            }
            return Ok(Location::Dir(PathBuf::from(s)));
        };
        if scheme == "memory" {
            return Err(bad(
                "memory:// stores live inside one process (unit tests); an image there would \
                 vanish when this command exits: use file:///path/NAME or s3://bucket/NAME",
            ));
        }
        let rest = rest.trim_end_matches('/');
        let Some((store, name)) = rest.rsplit_once('/') else {
            return Err(bad(&format!(
                "no image name: the last path segment names the image, as in \
                 {scheme}://{rest}/NAME"
            )));
        };
        if scheme == "s3" && store.is_empty() {
            return Err(bad("no bucket: s3://bucket/prefix/NAME"));
        }
        objstore::check_image_name(name)?;
        let store = StoreUrl::parse(&format!("{scheme}://{store}"))?;
        if let StoreUrl::File(p) = &store {
            if p == Path::new("/") {
                return Err(bad(
                    "a store directory is needed before the name: file:///path/NAME",
                ));
            }
        }
        Ok(Location::Named {
            store,
            name: name.into(),
        })
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Dir(p) => write!(f, "{}", p.display()),
            Location::Named { store, name } => write!(f, "{store}/{name}"),
        }
    }
}

/// A location travels (in the protocol, in job manifests) as the text it was
/// parsed from, and is parsed again, once, where it is read: the wire and the
/// stored formats are the same strings as before, and a receiver holds a typed
/// value or a clear error, never a string to split.
impl serde::Serialize for Location {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Location {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Location::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A store URL travels as its text, like [`Location`].
impl serde::Serialize for StoreUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for StoreUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        StoreUrl::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// One image in a store: put and get its chunks, commit and read its manifest.
/// `Send + Sync`.
#[derive(Debug)]
pub struct ImageStore {
    location: Location,
    /// The image's name in its store (a self-contained directory ignores it).
    name: String,
    /// Where the chunks and the manifest go.
    backend: Arc<dyn ChunkBackend>,
    /// The shared store seen through `object_store`, for the markers of
    /// [`crate::gc`] and for [`fetch_each`](Self::fetch_each): the backend itself
    /// when that is an object store, a second view of the directory for a local
    /// shared store, `None` for a self-contained directory.
    objects: Option<Arc<BlockingStore>>,
    /// The chunks this handle put that were not in the store before: what
    /// [`discard_written`](Self::discard_written) removes when the image fails.
    written: std::sync::Mutex<Vec<String>>,
}

/// The name a self-contained image directory's one image is given (it is not
/// used: such a store holds one image).
const DIR_IMAGE: &str = "image";

impl ImageStore {
    /// Opens the image at `location`. A local store's directories are created; a
    /// remote store is not contacted (see [`check`](Self::check)).
    pub fn open(location: &Location, config: &StoreConfig) -> Result<Self, ImageStoreError> {
        let (backend, objects, name): (Arc<dyn ChunkBackend>, _, _) = match location {
            Location::Dir(dir) => (Arc::new(ChunkStore::open(dir)?), None, DIR_IMAGE.into()),
            Location::Named {
                store: url @ StoreUrl::File(root),
                name,
            } => (
                Arc::new(ChunkStore::open_named(root, name)?),
                Some(Arc::new(BlockingStore::open(&url.to_string(), config)?)),
                name.clone(),
            ),
            Location::Named { store, name } => {
                let store = Arc::new(BlockingStore::open(&store.to_string(), config)?);
                (store.clone(), Some(store), name.clone())
            }
        };
        Ok(ImageStore {
            location: location.clone(),
            name,
            backend,
            objects,
            written: Default::default(),
        })
    }

    /// Image `name` in an already open remote store (tests use `memory://` this way).
    pub fn in_store(store: BlockingStore, name: &str) -> Result<Self, ImageStoreError> {
        objstore::check_image_name(name)?;
        let store = Arc::new(store);
        Ok(ImageStore {
            location: Location::Named {
                store: store.backend().url().clone(),
                name: name.into(),
            },
            name: name.into(),
            backend: store.clone(),
            objects: Some(store),
            written: Default::default(),
        })
    }

    /// Where the image is.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// How errors name the store: its URL (and endpoint), or its directory.
    pub fn display_name(&self) -> &str {
        self.backend.display_name()
    }

    /// Whether chunks travel over the network: callers then keep more of them in
    /// flight.
    pub fn is_remote(&self) -> bool {
        self.backend.is_remote()
    }

    /// Fails early, before anything is frozen, if the store cannot be reached.
    pub fn check(&self) -> Result<(), ImageStoreError> {
        Ok(self.backend.check()?)
    }

    /// Stores `bytes` under `chunk` (see [`ChunkBackend::put_chunk`]); a chunk
    /// already in the store costs nothing (`stored_bytes` 0).
    pub fn put_chunk(
        &self,
        chunk: ChunkRef,
        bytes: &[u8],
        zstd_level: Option<i32>,
    ) -> Result<PutOutcome, ImageStoreError> {
        let out = self.backend.put_chunk(chunk, bytes, zstd_level)?;
        if out.stored_bytes > 0 {
            self.written
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(chunk.hex());
        }
        Ok(out)
    }

    /// The image failed before its manifest was written: removes the chunks this
    /// handle wrote, so that a failed dump (one that filled the disk, say) leaves
    /// nothing behind. In a self-contained directory they are deleted at once; in a
    /// shared store only under the gc protocol ([`gc::discard`]: a chunk another
    /// image references or another checkpoint in progress may reuse stays; `reg`
    /// is this checkpoint's own registration). Returns how many were deleted, or
    /// `None` when another checkpoint in progress left them all to the next gc.
    pub fn discard_written(
        &self,
        reg: Option<&Registration>,
        leases: &Leases,
    ) -> Result<Option<usize>, ImageStoreError> {
        let chunks = std::mem::take(&mut *self.written.lock().unwrap_or_else(|e| e.into_inner()));
        match (&self.location, self.shared()) {
            (Location::Named { .. }, Some(store)) => {
                Ok(store.block_on(gc::discard(store.backend(), leases, reg, &chunks))?)
            }
            // A manifest written after all (a failure after its rename): keep.
            _ if self.exists()? => Ok(Some(0)),
            _ => {
                for c in &chunks {
                    self.backend.delete_chunk(c)?;
                }
                Ok(Some(chunks.len()))
            }
        }
    }

    /// Reads and verifies `chunk` into `out` (exactly `chunk.len` bytes).
    pub fn get_chunk(&self, chunk: &ChunkRef, out: &mut [u8]) -> Result<(), ImageStoreError> {
        Ok(self.backend.get_chunk(chunk, out)?)
    }

    /// The object store behind a remote image (the one [`fetch_each`] drives).
    ///
    /// [`fetch_each`]: Self::fetch_each
    fn remote(&self) -> Option<&BlockingStore> {
        self.objects.as_deref().filter(|_| self.backend.is_remote())
    }

    /// For a remote store: fetches and verifies `chunks` with `concurrency` requests
    /// in flight, all driven from the calling thread (no thread per request, whose
    /// wake-ups would cost more than the work on a small node), and hands their bytes
    /// to `sink(index, offset, bytes)` as they arrive, a step at a time (see
    /// [`ObjectStoreBackend::get_chunk_with`]). Returns `None` for a local store: the
    /// caller reads those from its own threads.
    ///
    /// **`sink` sees bytes before their chunk is verified**: only `Some(Ok(()))`
    /// says that every chunk matched its BLAKE3. On an error, whatever the sink
    /// wrote must be thrown away.
    ///
    /// [`ObjectStoreBackend::get_chunk_with`]: crate::objstore::ObjectStoreBackend::get_chunk_with
    pub fn fetch_each<E: From<ImageStoreError>>(
        &self,
        chunks: &[ChunkRef],
        concurrency: usize,
        sink: impl FnMut(usize, usize, &[u8]) -> Result<(), E>,
    ) -> Option<Result<(), E>> {
        use futures_util::StreamExt;
        let store = self.remote()?;
        let backend = store.backend();
        // Buffers go back to a pool after use: a fresh 4 MiB buffer per chunk would
        // be mapped and faulted in every time.
        let pool = RefCell::new(Vec::<Vec<u8>>::new());
        // The requests run interleaved on this one thread, never at the same instant,
        // so they can share the sink.
        let sink = RefCell::new(sink);
        Some(store.block_on(async {
            let mut results = futures_util::stream::iter(chunks.iter().enumerate())
                .map(|(i, c)| {
                    let mut buf = pool.borrow_mut().pop().unwrap_or_default();
                    let sink = &sink;
                    async move {
                        buf.resize(c.len as usize, 0);
                        let r = backend
                            .get_chunk_with(c, &mut buf, |off, bytes| {
                                (sink.borrow_mut())(i, off, bytes).map_err(Fetch::Sink)
                            })
                            .await;
                        (buf, r)
                    }
                })
                .buffer_unordered(concurrency.max(1));
            while let Some((buf, r)) = results.next().await {
                match r {
                    Ok(()) => pool.borrow_mut().push(buf),
                    Err(Fetch::Sink(e)) => return Err(e),
                    Err(Fetch::Store(e)) => return Err(E::from(ImageStoreError::from(e))),
                }
            }
            Ok(())
        }))
    }

    /// Whether the store has an object for `chunk` (its content is not checked).
    pub fn has_chunk(&self, chunk: &ChunkRef) -> Result<bool, ImageStoreError> {
        Ok(self.backend.has_chunk(chunk)?)
    }

    /// Commits the image: every chunk put so far is made durable first, then the
    /// manifest is written. Before this returns there is no image.
    pub fn put_manifest(&self, bytes: &[u8]) -> Result<(), ImageStoreError> {
        Ok(self.backend.put_manifest(&self.name, bytes)?)
    }

    /// Makes every chunk put so far durable (a local store batches its fsyncs; a
    /// remote put is durable when it returns). [`put_manifest`](Self::put_manifest)
    /// does this itself; calling it first only separates the two in timings.
    pub fn sync(&self) -> Result<(), ImageStoreError> {
        Ok(self.backend.sync()?)
    }

    /// Whether the image is committed (its manifest exists).
    pub fn exists(&self) -> Result<bool, ImageStoreError> {
        match self.get_manifest() {
            Ok(_) => Ok(true),
            Err(ImageStoreError::Store(
                StoreError::NoImage { .. } | StoreError::NoImageDir { .. },
            )) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The shared store, for the markers of [`crate::gc`]; `None` for a
    /// self-contained directory (nothing else uses its chunks).
    fn shared(&self) -> Option<&BlockingStore> {
        self.objects.as_deref()
    }

    /// Registers a checkpoint of this image in a shared store before any chunk is
    /// looked at, waiting for a running gc (see [`crate::gc`]); `None` for a
    /// self-contained directory.
    pub fn begin_checkpoint(
        &self,
        leases: &Leases,
    ) -> Result<Option<Registration>, ImageStoreError> {
        let Some(store) = self.shared() else {
            return Ok(None);
        };
        let Location::Named { name, .. } = &self.location else {
            return Ok(None);
        };
        Ok(Some(store.block_on(gc::begin_checkpoint(
            store.backend(),
            name,
            leases,
        ))?))
    }

    /// Just before the commit: the registration still holds (see [`crate::gc`]).
    pub fn check_checkpoint(&self, reg: &Registration) -> Result<(), ImageStoreError> {
        match self.shared() {
            Some(store) => Ok(store.block_on(gc::check_checkpoint(store.backend(), reg))?),
            None => Ok(()),
        }
    }

    /// The checkpoint is over, committed or not: its marker goes.
    pub fn end_checkpoint(&self, reg: &Registration) -> Result<(), ImageStoreError> {
        match self.shared() {
            Some(store) => Ok(store.block_on(gc::end_checkpoint(store.backend(), reg))?),
            None => Ok(()),
        }
    }

    /// Reads the manifest's bytes (bounded; decode them with [`crate::codec`]).
    pub fn get_manifest(&self) -> Result<Vec<u8>, ImageStoreError> {
        Ok(self.backend.get_manifest(&self.name)?)
    }
}

/// Why one chunk of [`ImageStore::fetch_each`] stopped: the store, or the sink.
enum Fetch<E> {
    Store(StoreError),
    Sink(E),
}

impl<E> From<StoreError> for Fetch<E> {
    fn from(e: StoreError) -> Self {
        Fetch::Store(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_travel_as_their_text_and_come_back_typed() {
        for text in [
            "s3://ckpt/site/job-17.r3",
            "file:///scratch/store/a",
            "/scratch/ckpt/job1",
        ] {
            let loc = Location::parse(text).unwrap();
            let bytes = rmp_serde::to_vec_named(&loc).unwrap();
            // The same bytes as the string itself: stored job manifests still read.
            assert_eq!(bytes, rmp_serde::to_vec_named(text).unwrap());
            assert_eq!(rmp_serde::from_slice::<Location>(&bytes).unwrap(), loc);
        }
        let url = StoreUrl::parse("s3://ckpt/site").unwrap();
        let bytes = rmp_serde::to_vec_named(&url).unwrap();
        assert_eq!(rmp_serde::from_slice::<StoreUrl>(&bytes).unwrap(), url);
        let bad = rmp_serde::to_vec_named("ftp://x/y").unwrap();
        assert!(rmp_serde::from_slice::<StoreUrl>(&bad).is_err());
    }

    #[test]
    fn locations_parse_into_store_and_name() {
        assert_eq!(
            Location::parse("/var/tmp/img").unwrap(),
            Location::Dir("/var/tmp/img".into())
        );
        assert_eq!(
            Location::parse("file:///var/tmp/store/job-1").unwrap(),
            Location::Named {
                store: StoreUrl::File("/var/tmp/store".into()),
                name: "job-1".into()
            }
        );
        assert_eq!(
            Location::parse("s3://bucket/a/b/ck.3/").unwrap(),
            Location::Named {
                store: StoreUrl::S3 {
                    bucket: "bucket".into(),
                    prefix: "a/b".into()
                },
                name: "ck.3".into()
            }
        );
        assert_eq!(
            Location::parse("s3://bucket/ck").unwrap(),
            Location::Named {
                store: StoreUrl::S3 {
                    bucket: "bucket".into(),
                    prefix: String::new()
                },
                name: "ck".into()
            }
        );
    }

    #[test]
    fn bad_locations_say_what_is_expected() {
        for (loc, says) in [
            ("s3://bucket", "no image name"),
            ("s3:///name", "no bucket"),
            ("memory://x", "vanish"),
            ("file:///name", "store directory"),
            ("ftp://host/x", "unsupported store URL scheme"),
            ("s3://bucket/../x", ". or .."),
            ("s3://bucket/.hidden", "not an image name"),
            ("", "empty"),
        ] {
            let e = Location::parse(loc).unwrap_err().to_string();
            assert!(e.contains(says), "{loc}: {e}");
        }
    }

    /// The restore's read: many chunks in flight on one thread, each handed on in
    /// order while it arrives, and a damaged one failing the whole fetch.
    #[test]
    fn fetch_each_hands_on_every_byte_and_fails_on_a_damaged_chunk() {
        use object_store::ObjectStoreExt;
        let store = BlockingStore::open(
            "memory://",
            &StoreConfig {
                drive: objstore::Drive::Caller,
                ..StoreConfig::default()
            },
        )
        .unwrap();
        let img = ImageStore::in_store(store, "img").unwrap();
        let step = objstore::STREAM_STEP;
        let datas: Vec<Vec<u8>> = (0..7u8)
            .map(|i| {
                let len = (i as usize % 3) * step + 4096 * (i as usize + 1);
                (0..len)
                    .map(|b| (b * 31 + i as usize) as u8 ^ (b >> 12) as u8)
                    .collect()
            })
            .collect();
        let chunks: Vec<ChunkRef> = datas.iter().map(|d| ChunkRef::of(d)).collect();
        for (c, d) in chunks.iter().zip(&datas) {
            img.put_chunk(*c, d, None).unwrap();
        }
        let mut got: Vec<Vec<u8>> = datas.iter().map(|d| vec![0; d.len()]).collect();
        let mut next: Vec<usize> = vec![0; datas.len()];
        img.fetch_each(&chunks, 3, |i, off, b| -> Result<(), ImageStoreError> {
            assert_eq!(off, next[i], "chunk {i} handed on out of order");
            got[i][off..off + b.len()].copy_from_slice(b);
            next[i] += b.len();
            Ok(())
        })
        .expect("remote")
        .unwrap();
        assert_eq!(got, datas);

        // One byte of one chunk flipped in the store: the fetch fails, naming it.
        let store = img.remote().expect("remote");
        let b = store.backend();
        let key = b.chunk_key(&chunks[4].hex());
        let mut raw = store
            .block_on(async { b.raw_store().get(&key).await?.bytes().await })
            .unwrap()
            .to_vec();
        let n = raw.len();
        raw[n - 1] ^= 1;
        store.block_on(b.raw_store().put(&key, raw.into())).unwrap();
        let r = img
            .fetch_each(&chunks, 3, |_, _, _| -> Result<(), ImageStoreError> {
                Ok(())
            })
            .expect("remote");
        let e = r.unwrap_err().to_string();
        assert!(e.contains(&chunks[4].hex()) && e.contains("corrupt"), "{e}");

        // A sink's own error stops the fetch and comes back as it was.
        let r = img
            .fetch_each(&chunks, 3, |_, _, _| -> Result<(), ImageStoreError> {
                Err(ImageStoreError::Store(StoreError::BadImageName {
                    name: "sink".into(),
                }))
            })
            .expect("remote");
        assert!(r.unwrap_err().to_string().contains("sink"));
    }

    #[test]
    fn named_images_in_a_local_store_share_their_chunks() {
        let root = std::env::temp_dir().join(format!("ckpt-loc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let cfg = StoreConfig::default();
        let url = format!("file://{}", root.display());
        let a = ImageStore::open(&Location::parse(&format!("{url}/a")).unwrap(), &cfg).unwrap();
        let b = ImageStore::open(&Location::parse(&format!("{url}/b")).unwrap(), &cfg).unwrap();
        let data = vec![7u8; 8192];
        let c = ChunkRef::of(&data);
        assert!(a.put_chunk(c, &data, None).unwrap().stored_bytes > 0);
        assert_eq!(b.put_chunk(c, &data, None).unwrap().stored_bytes, 0);
        assert!(matches!(
            b.get_manifest(),
            Err(ImageStoreError::Store(StoreError::NoImage { .. }))
        ));
        a.put_manifest(b"manifest a").unwrap();
        b.put_manifest(b"manifest b").unwrap();
        assert_eq!(a.get_manifest().unwrap(), b"manifest a");
        assert!(root.join("images/b/manifest.ckpt").is_file());
        let mut out = vec![0u8; 8192];
        b.get_chunk(&c, &mut out).unwrap();
        assert_eq!(out, data);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
