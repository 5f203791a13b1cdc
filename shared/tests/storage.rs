//! One storage test suite, run against every backend through the one interface
//! [`ChunkBackend`]: the directory store ([`ChunkStore`]), and the object stores
//! `memory://`, `file://` and `s3://` against a real S3 server (s3s-fs, a separate process speaking HTTP with
//! SigV4), in the manner of object_store's shared `put_get_delete_list`.
//!
//! The S3 server is the one `scripts/s3-server.sh install` builds; each test that needs
//! it starts its own through [`ckpt_tests::s3::S3Server`], which kills it by PID even
//! when the test panics. When the server is not installed these tests fail (they do
//! not skip): CI installs it, and a missing server must not pass for a green S3
//! backend.

use std::time::{Duration, Instant};

use ckpt_shared::chunkfmt::{ChunkFmtError, CHUNK_HEADER_LEN, CODEC_RAW, CODEC_ZSTD};
use ckpt_shared::codec::{self, CodecError};
use ckpt_shared::image::ChunkRef;
use ckpt_shared::objstore::{
    BlockingStore, Drive, RetryPolicy, S3Config, StoreConfig, StoreUrl, STREAM_STEP,
};
use ckpt_shared::store::{ChunkBackend, ChunkStore, StoreError};
use object_store::{ObjectStoreExt, PutPayload};

use ckpt_tests::data::{noise, text};
use ckpt_tests::s3::{free_port, S3Server, ACCESS_KEY, BUCKET, SECRET_KEY};

// ---------------------------------------------------------------- data

fn get(store: &dyn ChunkBackend, c: &ChunkRef) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![0u8; c.len as usize];
    store.get_chunk(c, &mut out).map(|()| out)
}

fn put(store: &dyn ChunkBackend, data: &[u8], level: Option<i32>) -> (ChunkRef, u64) {
    let c = ChunkRef::of(data);
    let out = store.put_chunk(c, data, level).unwrap();
    assert_eq!(out.chunk, c);
    (c, out.stored_bytes)
}

/// A backend under test, and a way around it to its raw objects.
struct Under<'a> {
    store: &'a dyn ChunkBackend,
    raw: Raw<'a>,
}

enum Raw<'a> {
    /// Through `object_store` itself.
    Objects(&'a BlockingStore),
    /// The files of a directory store rooted here.
    Dir(std::path::PathBuf),
}

impl Raw<'_> {
    fn path(root: &std::path::Path, c: &ChunkRef) -> std::path::PathBuf {
        let hex = c.hex();
        root.join("chunks").join(&hex[..2]).join(&hex)
    }

    /// The raw object of a chunk, read around the backend.
    fn get(&self, c: &ChunkRef) -> Vec<u8> {
        match self {
            Raw::Objects(store) => {
                let b = store.backend();
                let key = b.chunk_key(&c.hex());
                store
                    .block_on(async { b.raw_store().get(&key).await?.bytes().await })
                    .unwrap()
                    .to_vec()
            }
            Raw::Dir(root) => std::fs::read(Self::path(root, c)).unwrap(),
        }
    }

    /// Replaces the raw object of a chunk, around the backend.
    fn put(&self, c: &ChunkRef, bytes: Vec<u8>) {
        match self {
            Raw::Objects(store) => {
                let b = store.backend();
                let key = b.chunk_key(&c.hex());
                store
                    .block_on(b.raw_store().put(&key, PutPayload::from(bytes)))
                    .unwrap();
            }
            Raw::Dir(root) => std::fs::write(Self::path(root, c), bytes).unwrap(),
        }
    }
}

/// What `get_chunk_with` handed on, as `(offset, bytes)`.
type Steps = Vec<(usize, Vec<u8>)>;

/// Reads `c` with `get_chunk_with`: its result, and what it handed on.
fn streamed(store: &dyn ChunkBackend, c: &ChunkRef) -> (Result<(), StoreError>, Steps) {
    let mut out = vec![0u8; c.len as usize];
    let mut steps = Vec::new();
    let r = store.get_chunk_with(c, &mut out, &mut |off, b| {
        steps.push((off, b.to_vec()));
        Ok(())
    });
    (r, steps)
}

/// An object store under test, with raw access through `object_store`.
fn objects(store: &BlockingStore) -> Under<'_> {
    Under {
        store,
        raw: Raw::Objects(store),
    }
}

// ---------------------------------------------------------------- the suite

/// Everything a backend must do, run against each. `store` must be empty.
fn suite(under: &Under) {
    let store = under.store;
    let raw = &under.raw;
    let name = store.display_name().to_string();
    store.check().unwrap();

    // An empty store.
    assert_eq!(store.list_chunks().unwrap(), Vec::<String>::new());
    assert_eq!(store.list_manifests().unwrap(), Vec::<String>::new());
    assert!(!store.has_chunk(&ChunkRef::of(b"nothing")).unwrap());

    // Put and get, through every branch of the encoder.
    let cases: Vec<(Vec<u8>, Option<i32>, u8)> = vec![
        (noise(10_000, 1), None, CODEC_RAW),
        (text(1 << 20), Some(3), CODEC_ZSTD),
        (noise(64 * 1024, 7), Some(3), CODEC_RAW), // zstd does not pay: raw
        (vec![0u8; 4096], Some(1), CODEC_ZSTD),
        (Vec::new(), Some(3), CODEC_RAW),
    ];
    let mut names = Vec::new();
    for (data, level, codec) in &cases {
        let (c, stored) = put(store, data, *level);
        assert!(store.has_chunk(&c).unwrap());
        assert_eq!(get(store, &c).unwrap(), *data, "{name}: round trip");
        let object = raw.get(&c);
        assert_eq!(object.len() as u64, stored);
        assert_eq!(&object[..4], b"CKCH");
        assert_eq!(object[5], *codec, "{name}: codec of {} bytes", data.len());
        if *codec == CODEC_RAW {
            assert_eq!(stored, (CHUNK_HEADER_LEN + data.len()) as u64);
        } else {
            assert!(stored < data.len() as u64);
        }
        names.push(c.hex());
    }
    names.sort();

    // Dedup: a chunk already stored is not uploaded again, whatever the level.
    for (data, _, _) in &cases {
        for level in [None, Some(3)] {
            let (_, stored) = put(store, data, level);
            assert_eq!(stored, 0, "{name}: dedup");
        }
    }
    assert_eq!(store.list_chunks().unwrap(), names);

    // Bad input is refused before anything is sent.
    let c = ChunkRef::of(b"abc");
    assert!(matches!(
        store.put_chunk(c, b"ab", None),
        Err(StoreError::Format(ChunkFmtError::RefMismatch { .. }))
    ));
    assert!(matches!(
        store.put_chunk(c, b"abc", Some(1000)),
        Err(StoreError::Format(ChunkFmtError::ZstdLevel { .. }))
    ));
    let (c, _) = put(store, b"12345", None);
    names.push(c.hex());
    names.sort();
    assert!(matches!(
        store.get_chunk(&c, &mut [0u8; 4]),
        Err(StoreError::Format(ChunkFmtError::BufferSize {
            expected: 5,
            got: 4,
            ..
        }))
    ));

    // A flipped byte is Corrupt, naming the chunk and the store.
    for level in [None, Some(3)] {
        let data = text(20_000 + level.unwrap_or(0) as usize);
        let (c, _) = put(store, &data, level);
        names.push(c.hex());
        let mut object = raw.get(&c);
        let last = object.len() - 1;
        object[last] ^= 0x40;
        raw.put(&c, object);
        let err = get(store, &c).unwrap_err();
        match &err {
            StoreError::Corrupt {
                chunk, store: s, ..
            } => {
                assert_eq!(chunk, &c.hex());
                assert_eq!(s, &name);
            }
            other => panic!("{name} {level:?}: expected Corrupt, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("chunk {} in store {name} is corrupted (", c.hex())),
            "{msg}"
        );
        if level.is_none() {
            assert!(msg.contains("(checksum mismatch)"), "{msg}");
        }
    }
    names.sort();

    // An object longer than its chunk can be is refused without being decoded.
    let data = noise(3000, 9);
    let (c, _) = put(store, &data, None);
    names.push(c.hex());
    names.sort();
    let mut object = raw.get(&c);
    object.extend_from_slice(&[0u8; 100]);
    raw.put(&c, object);
    // (An object store refuses it from its size alone, before it is fetched; the
    // directory store reads the header first.)
    let why = match raw {
        Raw::Objects(_) => "more than the 3012",
        Raw::Dir(_) => "raw payload is 3100 bytes",
    };
    match get(store, &c) {
        Err(StoreError::Corrupt { chunk, reason, .. }) => {
            assert_eq!(chunk, c.hex());
            assert!(reason.contains(why), "{reason}");
        }
        other => panic!("{name}: expected Corrupt, got {other:?}"),
    }

    // List and delete.
    assert_eq!(store.list_chunks().unwrap(), names);
    let small = ChunkRef::of(b"12345");
    store.delete_chunk(&small.hex()).unwrap();
    store.delete_chunk(&small.hex()).unwrap(); // twice is fine
    names.retain(|n| *n != small.hex());
    assert_eq!(store.list_chunks().unwrap(), names);
    assert!(!store.has_chunk(&small).unwrap());
    match get(store, &small) {
        Err(StoreError::Missing { chunk, .. }) => assert_eq!(chunk, small.hex()),
        other => panic!("{name}: expected Missing, got {other:?}"),
    }
    assert!(matches!(
        store.delete_chunk("../../etc/passwd"),
        Err(StoreError::BadChunkName { .. })
    ));

    // A missing chunk is Missing, naming the chunk and the store.
    let absent = ChunkRef::of(b"never stored");
    let err = get(store, &absent).unwrap_err();
    match &err {
        StoreError::Missing { chunk, store: s } => {
            assert_eq!(chunk, &absent.hex());
            assert_eq!(s, &name);
        }
        other => panic!("{name}: expected Missing, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        format!(
            "chunk {} is missing from store {name}: the image cannot be restored from this store",
            absent.hex()
        )
    );

    stream_suite(under, &name);

    // Manifests: put, get, list, overwrite.
    let manifest = codec::encode(*b"TEST", &(1u32..500).collect::<Vec<_>>()).unwrap();
    store.put_manifest("job-1", &manifest).unwrap();
    store.put_manifest("job-2.step_0", b"second").unwrap();
    assert_eq!(store.get_manifest("job-1").unwrap(), manifest);
    assert_eq!(
        codec::decode::<Vec<u32>>(*b"TEST", &store.get_manifest("job-1").unwrap()).unwrap(),
        (1u32..500).collect::<Vec<_>>()
    );
    assert_eq!(store.list_manifests().unwrap(), ["job-1", "job-2.step_0"]);
    store.put_manifest("job-2.step_0", b"replaced").unwrap();
    assert_eq!(store.get_manifest("job-2.step_0").unwrap(), b"replaced");
    // Manifests and chunks do not see each other.
    assert_eq!(store.list_chunks().unwrap(), names);

    // A missing manifest names the image and the store.
    match store.get_manifest("nope") {
        Err(e @ StoreError::NoImage { .. }) => assert_eq!(
            e.to_string(),
            format!(
                "no image \"nope\" in store {name}: its manifest is missing (the dump did not \
                 complete?)"
            )
        ),
        other => panic!("{name}: expected NoImage, got {other:?}"),
    }
    for bad in ["", "../x", "a/b", ".hidden"] {
        assert!(matches!(
            store.put_manifest(bad, b"x"),
            Err(StoreError::BadImageName { .. })
        ));
    }

    // A truncated manifest comes back as stored; the codec refuses it.
    store
        .put_manifest("cut", &manifest[..manifest.len() - 10])
        .unwrap();
    let back = store.get_manifest("cut").unwrap();
    assert!(matches!(
        codec::decode::<Vec<u32>>(*b"TEST", &back),
        Err(CodecError::Truncated { .. })
    ));
}

/// `get_chunk_with`, which the restore uses: bytes handed on in order while they
/// arrive, the whole chunk verified before it returns `Ok`.
fn stream_suite(under: &Under, name: &str) {
    let (store, raw) = (under.store, &under.raw);
    // A raw chunk of 4 steps and a bit: handed on in steps, in order, then verified.
    let data = noise(4 * STREAM_STEP + 3 * 4096, 11);
    let (c, _) = put(store, &data, None);
    let (r, steps) = streamed(store, &c);
    r.unwrap();
    let offsets: Vec<usize> = steps.iter().map(|(o, _)| *o).collect();
    let lens: Vec<usize> = steps.iter().map(|(_, b)| b.len()).collect();
    assert_eq!(offsets, (0..5).map(|i| i * STREAM_STEP).collect::<Vec<_>>());
    assert_eq!(
        lens,
        [STREAM_STEP, STREAM_STEP, STREAM_STEP, STREAM_STEP, 3 * 4096]
    );
    let joined: Vec<u8> = steps.iter().flat_map(|(_, b)| b.iter().copied()).collect();
    assert_eq!(joined, data);

    // A compressed chunk is decoded and verified first, then handed on at once.
    let text_data = text(3 * STREAM_STEP);
    let (t, _) = put(store, &text_data, Some(3));
    let (r, steps) = streamed(store, &t);
    r.unwrap();
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0].0, 0);
    assert_eq!(steps[0].1, text_data);

    // A flipped byte in the last step: the earlier steps were handed on (the caller
    // must throw them away), and the read fails naming the chunk and the store.
    let good = raw.get(&c);
    let mut bad = good.clone();
    let last = bad.len() - 100;
    bad[last] ^= 0x40;
    raw.put(&c, bad);
    let (r, steps) = streamed(store, &c);
    assert_eq!(
        steps.len(),
        5,
        "{name}: every step is handed on before the check"
    );
    match r {
        Err(e @ StoreError::Corrupt { .. }) => assert!(
            e.to_string().contains(&c.hex()) && e.to_string().contains(name),
            "{name}: {e}"
        ),
        other => panic!("{name}: expected Corrupt, got {other:?}"),
    }
    // A damaged header is refused before any byte is handed on.
    let mut bad = good.clone();
    bad[0] ^= 0xff;
    raw.put(&c, bad);
    let (r, steps) = streamed(store, &c);
    assert!(
        matches!(r, Err(StoreError::Corrupt { .. })),
        "{name}: {r:?}"
    );
    assert!(
        steps.is_empty(),
        "{name}: bytes handed on after a bad header"
    );
    // A truncated object (one step short) does not pass either.
    raw.put(&c, good[..good.len() - STREAM_STEP].to_vec());
    let (r, _) = streamed(store, &c);
    assert!(
        matches!(r, Err(StoreError::Corrupt { .. })),
        "{name}: {r:?}"
    );
    raw.put(&c, good);
    assert_eq!(get(store, &c).unwrap(), data);

    // An error of the caller's stops the read and comes back as it was.
    let mut out = vec![0u8; c.len as usize];
    let mut calls = 0;
    let r = store.get_chunk_with(&c, &mut out, &mut |_, _| {
        calls += 1;
        if calls == 2 {
            Err(StoreError::BadImageName {
                name: "the sink failed".into(),
            })
        } else {
            Ok(())
        }
    });
    assert!(
        matches!(r, Err(StoreError::BadImageName { .. })),
        "{name}: {r:?}"
    );
    assert_eq!(calls, 2);
    store.delete_chunk(&c.hex()).unwrap();
    store.delete_chunk(&t.hex()).unwrap();
}

/// Many threads on one store at once, half the chunks shared (dedup races).
fn concurrent(store: &dyn ChunkBackend) {
    std::thread::scope(|s| {
        for t in 0..4u64 {
            s.spawn(move || {
                for i in 0..20u64 {
                    let data = if i % 2 == 0 {
                        text(4096 + i as usize)
                    } else {
                        noise(4096, t * 1000 + i + 1)
                    };
                    let level = if t % 2 == 0 { Some(3) } else { None };
                    let (c, _) = put(store, &data, level);
                    assert_eq!(get(store, &c).unwrap(), data);
                }
            });
        }
    });
    // 10 shared + 4 * 10 private chunks.
    assert_eq!(store.list_chunks().unwrap().len(), 50);
}

// ---------------------------------------------------------------- memory and file

#[test]
fn memory_backend() {
    let store = BlockingStore::open("memory://", &StoreConfig::default()).unwrap();
    assert_eq!(store.backend().url(), &StoreUrl::Memory);
    suite(&objects(&store));
}

#[test]
fn memory_backend_concurrent() {
    concurrent(&BlockingStore::open("memory://", &StoreConfig::default()).unwrap());
}

/// A store driven by its callers' threads ([`Drive::Caller`], as the restore opens
/// it): the suite, and many threads at once taking turns at driving.
#[test]
fn memory_backend_driven_by_callers() {
    let config = StoreConfig {
        drive: Drive::Caller,
        ..StoreConfig::default()
    };
    suite(&objects(
        &BlockingStore::open("memory://", &config).unwrap(),
    ));
    concurrent(&BlockingStore::open("memory://", &config).unwrap());
}

#[test]
fn file_backend() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store"); // created by open
    let url = format!("file://{}", root.display());
    let store = BlockingStore::open(&url, &StoreConfig::default()).unwrap();
    assert_eq!(store.backend().display_name(), url);
    suite(&objects(&store));
    assert!(root.join("images/job-1/manifest.ckpt").is_file());
}

#[test]
fn file_backend_concurrent() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    concurrent(&BlockingStore::open(&url, &StoreConfig::default()).unwrap());
}

/// The directory store, in the shared layout (`chunks/`, `images/NAME/`) that
/// `file://` images use: the same suite as every object store.
#[test]
fn directory_backend() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store"); // created by open
    let store = ChunkStore::open_shared(&root).unwrap();
    assert_eq!(store.display_name(), format!("file://{}", root.display()));
    suite(&Under {
        store: &store,
        raw: Raw::Dir(root.clone()),
    });
    assert!(root.join("images/job-1/manifest.ckpt").is_file());
    store.sync().unwrap();
}

#[test]
fn directory_backend_concurrent() {
    let dir = tempfile::tempdir().unwrap();
    concurrent(&ChunkStore::open_shared(dir.path()).unwrap());
}

/// A directory written by `ChunkStore` is a `file://` store with the same chunks, and
/// the other way round: one object format, one layout.
#[test]
fn file_backend_shares_chunks_with_chunk_store() {
    let dir = tempfile::tempdir().unwrap();
    let local = ChunkStore::open(dir.path()).unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = BlockingStore::open(&url, &StoreConfig::default()).unwrap();

    let a = text(100_000);
    let by_local = local.put_chunk(&a, Some(3)).unwrap();
    assert!(store.has_chunk(&by_local.chunk).unwrap());
    assert_eq!(get(&store, &by_local.chunk).unwrap(), a);
    assert_eq!(put(&store, &a, None).1, 0, "dedup across the two");

    let b = noise(5000, 4);
    let (c, _) = put(&store, &b, Some(3));
    assert!(local.has_chunk(&c));
    let mut out = vec![0u8; b.len()];
    local.get_chunk(&c, &mut out).unwrap();
    assert_eq!(out, b);
    assert_eq!(local.put_chunk(&b, None).unwrap().stored_bytes, 0);

    let mut want = vec![by_local.chunk.hex(), c.hex()];
    want.sort();
    assert_eq!(store.list_chunks().unwrap(), want);
    assert_eq!(local.list_chunks().unwrap(), want);
}

// ---------------------------------------------------------------- the S3 server

fn server_config(server: &S3Server) -> StoreConfig {
    s3_config(&server.endpoint())
}

/// Credentials of the test server, and retries short enough for tests.
fn s3_config(endpoint: &str) -> StoreConfig {
    StoreConfig {
        s3: S3Config {
            endpoint: Some(endpoint.into()),
            region: Some("us-east-1".into()),
            access_key_id: Some(ACCESS_KEY.into()),
            secret_access_key: Some(SECRET_KEY.into()),
            allow_http: None,
            instance_role: false,
            ..S3Config::default()
        },
        retry: RetryPolicy {
            max_retries: 3,
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
            retry_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(20),
        },
        drive: Drive::Threads,
    }
}

// ---------------------------------------------------------------- S3

#[test]
fn s3_backend() {
    let server = S3Server::start();
    let url = format!("s3://{BUCKET}/suite/run-1");
    let store = BlockingStore::open(&url, &server_config(&server)).unwrap();
    assert_eq!(
        store.backend().display_name(),
        format!("{url} (endpoint {})", server.endpoint())
    );
    suite(&objects(&store));

    // The layout in the bucket, as the server stores it.
    let objects = server.bucket_dir().join("suite/run-1");
    assert!(objects.join("images/job-1/manifest.ckpt").is_file());
    let first = &store.list_chunks().unwrap()[0];
    assert!(objects
        .join("chunks")
        .join(&first[..2])
        .join(first)
        .is_file());

    // Another prefix in the same bucket is another store.
    let other = BlockingStore::open(
        &format!("s3://{BUCKET}/suite/run-2"),
        &server_config(&server),
    )
    .unwrap();
    assert_eq!(other.list_chunks().unwrap(), Vec::<String>::new());
    assert_eq!(other.list_manifests().unwrap(), Vec::<String>::new());
}

#[test]
fn s3_backend_at_bucket_root() {
    let server = S3Server::start();
    let store = BlockingStore::open(&format!("s3://{BUCKET}"), &server_config(&server)).unwrap();
    suite(&objects(&store));
}

#[test]
fn s3_backend_concurrent() {
    let server = S3Server::start();
    let store = BlockingStore::open(&format!("s3://{BUCKET}/c"), &server_config(&server)).unwrap();
    concurrent(&store);
}

/// Over HTTP, with no runtime thread of the store's own: the calling threads drive
/// the connections, taking turns.
#[test]
fn s3_backend_driven_by_callers() {
    let server = S3Server::start();
    let config = StoreConfig {
        drive: Drive::Caller,
        ..server_config(&server)
    };
    suite(&objects(
        &BlockingStore::open(&format!("s3://{BUCKET}/d"), &config).unwrap(),
    ));
    concurrent(&BlockingStore::open(&format!("s3://{BUCKET}/e"), &config).unwrap());
}

#[test]
fn s3_wrong_credentials_are_denied() {
    let server = S3Server::start();
    let mut config = server_config(&server);
    config.s3.secret_access_key = Some("wrong".into());
    let store = BlockingStore::open(&format!("s3://{BUCKET}/x"), &config).unwrap();
    let err = store
        .put_chunk(ChunkRef::of(b"abc"), b"abc", None)
        .unwrap_err();
    assert!(matches!(err, StoreError::Denied { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("s3://{BUCKET}/x")), "{msg}");
    assert!(msg.contains("AWS_SECRET_ACCESS_KEY"), "{msg}");
}

/// A missing bucket is reported as such; `check` finds it before anything is
/// written. (s3s-fs, unlike S3, answers a get in a missing bucket with NoSuchKey and
/// creates the bucket's directory on the first put, so those are not tested here.)
#[test]
fn s3_missing_bucket() {
    let server = S3Server::start();
    let store = BlockingStore::open("s3://no-such-bucket/x", &server_config(&server)).unwrap();
    for err in [
        store.check().unwrap_err(),
        store.list_chunks().unwrap_err(),
        store.list_manifests().unwrap_err(),
    ] {
        assert!(matches!(err, StoreError::NoBucket { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("s3://no-such-bucket/x"), "{msg}");
        assert!(msg.contains("create it, or fix the store URL"), "{msg}");
    }
}

fn assert_unreachable(err: StoreError, url: &str, endpoint: &str) {
    assert!(matches!(err, StoreError::Unreachable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("store {url} (endpoint {endpoint}) is unreachable")),
        "{msg}"
    );
    assert!(msg.contains("(Connection refused"), "{msg}");
    assert!(msg.contains("then run the command again"), "{msg}");
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(
        source.contains("after 3 retries"),
        "retried first: {source}"
    );
}

/// Nothing listens on the endpoint: every operation fails, after its retries, within a
/// bounded time, with an error that names the store and says what to do.
#[test]
fn s3_store_down_fails_in_bounded_time() {
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let url = "s3://ckpt/down";
    let store = BlockingStore::open(url, &s3_config(&endpoint)).unwrap();
    let start = Instant::now();
    assert_unreachable(store.check().unwrap_err(), url, &endpoint);
    let c = ChunkRef::of(b"abc");
    assert_unreachable(
        store.put_chunk(c, b"abc", None).unwrap_err(),
        url,
        &endpoint,
    );
    assert_unreachable(get(&store, &c).unwrap_err(), url, &endpoint);
    assert_unreachable(store.get_manifest("job").unwrap_err(), url, &endpoint);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(30), "took {took:?}");
    // Each call backed off (50 ms, then about 100 and 200) before it gave up.
    assert!(took >= Duration::from_millis(4 * 100), "took {took:?}");
}

/// The server goes away under a store in use: the next operation says so.
#[test]
fn s3_server_stopping_is_reported() {
    let server = S3Server::start();
    let endpoint = server.endpoint();
    let url = format!("s3://{BUCKET}/gone");
    let store = BlockingStore::open(&url, &server_config(&server)).unwrap();
    let (c, _) = put(&store, b"before", None);
    drop(server);
    let start = Instant::now();
    assert_unreachable(get(&store, &c).unwrap_err(), &url, &endpoint);
    assert!(start.elapsed() < Duration::from_secs(30));
}

/// The AWS CLI's way, end to end: the keys from a named profile of a credentials
/// file, the endpoint from its `s3 =` block in a config file, nothing but the
/// profile's name and the files in the environment.
#[test]
fn s3_backend_with_a_profile_of_the_shared_files() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    let config = dir.path().join("config");
    std::fs::write(
        &creds,
        format!(
            "# the test server's keys\n[ckpt]\naws_access_key_id = {ACCESS_KEY}\n\
             aws_secret_access_key = {SECRET_KEY}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        &config,
        format!(
            "[profile ckpt]\nregion = us-east-1\ns3 =\n  endpoint_url = {}\n",
            server.endpoint()
        ),
    )
    .unwrap();
    let vars = |k: &str| match k {
        "AWS_PROFILE" => Some("ckpt".to_string()),
        "AWS_SHARED_CREDENTIALS_FILE" => Some(creds.display().to_string()),
        "AWS_CONFIG_FILE" => Some(config.display().to_string()),
        _ => None,
    };
    let config = StoreConfig::from_vars(vars);
    let store = BlockingStore::open(&format!("s3://{BUCKET}/profile"), &config).unwrap();
    let c = ChunkRef::of(b"from a profile");
    store.put_chunk(c, b"from a profile", None).unwrap();
    assert_eq!(get(&store, &c).unwrap(), b"from a profile");

    // The same profile with a wrong secret is denied: the keys really are the
    // profile's.
    std::fs::write(
        &creds,
        format!("[ckpt]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = wrong\n"),
    )
    .unwrap();
    let mut config = StoreConfig::from_vars(vars);
    config.retry.retry_timeout = Duration::from_secs(1);
    let store = BlockingStore::open(&format!("s3://{BUCKET}/profile"), &config).unwrap();
    let err = store.has_chunk(&c).unwrap_err();
    assert!(matches!(err, StoreError::Denied { .. }), "{err:?}");
}
