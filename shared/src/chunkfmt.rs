//! The chunk object format as bytes in memory: encode a chunk into one object, and
//! decode and verify an object back into the chunk's bytes.
//!
//! This is the very format that [`crate::store::ChunkStore`] writes to its files (a
//! 12-byte header, then the raw bytes or one zstd frame; see [`crate::store`] for the
//! table), and it uses that module's constants. `ChunkStore` streams its objects
//! through files and keeps its encoder private, so the object-store backends
//! ([`crate::objstore`]), which hand whole objects to an HTTP client, need the same
//! encoding over a buffer. Two choices were weighed:
//! - make `ChunkStore` delegate to this module: the right end state, but `store.rs` is
//!   being worked on by others and its file path reads straight into the caller's
//!   buffer (no intermediate copy), which a buffer API cannot do for the raw codec;
//! - mirror the format here, byte for byte, and pin the two together with tests that
//!   decode each other's objects (below, `chunk_store_objects_decode` and
//!   `encoded_objects_read_back_through_chunk_store`). That is what this module does.
//!
//! Decoding checks, in order: size, magic, version, reserved bytes, stated length,
//! codec, payload size, zstd frame, decompressed size, BLAKE3. Nothing in an object is
//! trusted, and an error names the chunk with the same reasons `ChunkStore` gives.

use std::cell::RefCell;

use crate::image::ChunkRef;
use crate::store::{CHUNK_HEADER_LEN, CHUNK_MAGIC, CHUNK_VERSION, CODEC_RAW, CODEC_ZSTD};

/// Errors of encoding or decoding one chunk object.
#[derive(Debug, thiserror::Error)]
pub enum ChunkFmtError {
    #[error("chunk {chunk} is corrupted ({reason})")]
    Corrupt { chunk: String, reason: String },

    #[error("read buffer for chunk {chunk} is {got} bytes but the chunk is {expected} bytes")]
    BufferSize {
        chunk: String,
        expected: u32,
        got: usize,
    },

    #[error("chunk {chunk}: its reference says {expected} bytes but {got} were given")]
    RefMismatch {
        chunk: String,
        expected: u32,
        got: usize,
    },

    #[error(
        "zstd level {level} is out of range ({min}..={max}); pick a level in range or \
         turn compression off"
    )]
    ZstdLevel { level: i32, min: i32, max: i32 },

    #[error("zstd failed on chunk {chunk}: {reason}")]
    Zstd { chunk: String, reason: String },
}

fn corrupt(chunk: &ChunkRef, reason: impl Into<String>) -> ChunkFmtError {
    ChunkFmtError::Corrupt {
        chunk: chunk.hex(),
        reason: reason.into(),
    }
}

/// Per-thread zstd contexts, for the same reason as in `store.rs`: a compressor at a
/// high level allocates several MiB, more than compressing one chunk costs.
struct Compressor {
    level: i32,
    inner: zstd::bulk::Compressor<'static>,
}

thread_local! {
    static COMPRESSOR: RefCell<Option<Compressor>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Checks that `level` is a zstd level this build accepts.
pub fn check_zstd_level(level: i32) -> Result<(), ChunkFmtError> {
    let range = zstd::compression_level_range();
    if range.contains(&level) {
        Ok(())
    } else {
        Err(ChunkFmtError::ZstdLevel {
            level,
            min: *range.start(),
            max: *range.end(),
        })
    }
}

/// The 12-byte header of an object holding a chunk of `len` bytes with `codec`.
pub fn header(codec: u8, len: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut header = [0u8; CHUNK_HEADER_LEN];
    header[..4].copy_from_slice(&CHUNK_MAGIC);
    header[4] = CHUNK_VERSION;
    header[5] = codec;
    header[8..12].copy_from_slice(&len.to_le_bytes());
    header
}

/// Encodes `bytes` (whose identity the caller computed: `chunk`) as one object,
/// compressed with zstd at `zstd_level` when that makes it strictly smaller, raw
/// otherwise, exactly as [`crate::store::ChunkStore::put_chunk`] does. The hash is
/// trusted; the length is checked.
pub fn encode(
    chunk: &ChunkRef,
    bytes: &[u8],
    zstd_level: Option<i32>,
) -> Result<Vec<u8>, ChunkFmtError> {
    if bytes.len() != chunk.len as usize {
        return Err(ChunkFmtError::RefMismatch {
            chunk: chunk.hex(),
            expected: chunk.len,
            got: bytes.len(),
        });
    }
    if let Some(level) = zstd_level {
        check_zstd_level(level)?;
        if !bytes.is_empty() {
            if let Some(object) = encode_zstd(chunk, bytes, level)? {
                return Ok(object);
            }
        }
    }
    let mut object = Vec::with_capacity(CHUNK_HEADER_LEN + bytes.len());
    object.extend_from_slice(&header(CODEC_RAW, chunk.len));
    object.extend_from_slice(bytes);
    Ok(object)
}

/// The zstd object, or `None` when compression would not make it smaller.
fn encode_zstd(
    chunk: &ChunkRef,
    bytes: &[u8],
    level: i32,
) -> Result<Option<Vec<u8>>, ChunkFmtError> {
    let zstd_err = |e: std::io::Error| ChunkFmtError::Zstd {
        chunk: chunk.hex(),
        reason: e.to_string(),
    };
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let ctx = match &mut *slot {
            Some(ctx) => {
                if ctx.level != level {
                    ctx.inner.set_compression_level(level).map_err(zstd_err)?;
                    ctx.level = level;
                }
                ctx
            }
            None => slot.insert(Compressor {
                level,
                inner: zstd::bulk::Compressor::new(level).map_err(zstd_err)?,
            }),
        };
        // One byte short of the input: zstd fails rather than produce anything that is
        // not strictly smaller, and then the raw form is stored (as in store.rs).
        let cap = bytes.len() - 1;
        let mut object = vec![0u8; CHUNK_HEADER_LEN + cap];
        match ctx
            .inner
            .compress_to_buffer(bytes, &mut object[CHUNK_HEADER_LEN..])
        {
            Ok(n) => {
                object.truncate(CHUNK_HEADER_LEN + n);
                object[..CHUNK_HEADER_LEN].copy_from_slice(&header(CODEC_ZSTD, chunk.len));
                Ok(Some(object))
            }
            Err(_) => Ok(None),
        }
    })
}

/// The largest object a chunk of `len` bytes can be stored as (the raw form): a
/// larger object is corrupt, and a reader need not fetch it to know.
pub fn max_object_len(len: u32) -> u64 {
    CHUNK_HEADER_LEN as u64 + u64::from(len)
}

/// Checks the 12-byte header of an object for `chunk`, followed by `payload_len`
/// bytes: magic, version, reserved bytes, stated length, and a payload size that fits
/// the codec. Returns the codec; `Err` is why the object is corrupt. The one place
/// that knows the header, for [`decode_into`] and for the directory store, which
/// reads the payload straight into the caller's buffer.
pub fn check_header(chunk: &ChunkRef, header: &[u8], payload_len: u64) -> Result<u8, String> {
    if header.len() != CHUNK_HEADER_LEN {
        return Err(format!("header is {} bytes", header.len()));
    }
    if header[..4] != CHUNK_MAGIC {
        return Err("bad magic".into());
    }
    if header[4] != CHUNK_VERSION {
        return Err(format!(
            "object version {} (this ckpt reads version {CHUNK_VERSION})",
            header[4]
        ));
    }
    if header[6..8] != [0, 0] {
        return Err("reserved header bytes are not zero".into());
    }
    let stated = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if stated != chunk.len {
        return Err(format!("length is {stated} bytes, expected {}", chunk.len));
    }
    match header[5] {
        CODEC_RAW if payload_len != u64::from(chunk.len) => Err(format!(
            "raw payload is {payload_len} bytes, expected {}",
            chunk.len
        )),
        // Only smaller-than-raw payloads are ever stored compressed.
        CODEC_ZSTD if payload_len >= u64::from(chunk.len) => Err(format!(
            "compressed payload is {payload_len} bytes, not smaller than {}",
            chunk.len
        )),
        c @ (CODEC_RAW | CODEC_ZSTD) => Ok(c),
        other => Err(format!("unknown codec {other}")),
    }
}

/// Decodes `object` into `out` (exactly `chunk.len` bytes), verifying its header,
/// length and BLAKE3 against `chunk`.
pub fn decode_into(chunk: &ChunkRef, object: &[u8], out: &mut [u8]) -> Result<(), ChunkFmtError> {
    if out.len() != chunk.len as usize {
        return Err(ChunkFmtError::BufferSize {
            chunk: chunk.hex(),
            expected: chunk.len,
            got: out.len(),
        });
    }
    let size = object.len();
    if size < CHUNK_HEADER_LEN {
        return Err(corrupt(chunk, format!("object is only {size} bytes")));
    }
    let (header, payload) = object.split_at(CHUNK_HEADER_LEN);
    let codec = check_header(chunk, header, payload.len() as u64).map_err(|r| corrupt(chunk, r))?;
    match codec {
        CODEC_RAW => out.copy_from_slice(payload),
        CODEC_ZSTD => {
            let n = DECOMPRESSOR.with(|cell| {
                let mut slot = cell.borrow_mut();
                let d = match &mut *slot {
                    Some(d) => d,
                    None => slot.insert(zstd::bulk::Decompressor::new().map_err(|e| {
                        ChunkFmtError::Zstd {
                            chunk: chunk.hex(),
                            reason: e.to_string(),
                        }
                    })?),
                };
                d.decompress_to_buffer(payload, out)
                    .map_err(|e| corrupt(chunk, format!("zstd: {e}")))
            })?;
            if n != out.len() {
                return Err(corrupt(
                    chunk,
                    format!("decompressed to {n} bytes, expected {}", chunk.len),
                ));
            }
        }
        _ => unreachable!("check_header accepts only known codecs"),
    }
    if blake3::hash(out).as_bytes() != &chunk.hash {
        return Err(corrupt(chunk, "checksum mismatch"));
    }
    Ok(())
}

/// Checks the header of an object whose payload is as long as `chunk`: it must say
/// raw (a compressed payload is always shorter than the bytes it holds).
pub fn check_raw_header(
    chunk: &ChunkRef,
    header: &[u8; CHUNK_HEADER_LEN],
) -> Result<(), ChunkFmtError> {
    let codec = check_header(chunk, header, u64::from(chunk.len)).map_err(|r| corrupt(chunk, r))?;
    if codec != CODEC_RAW {
        return Err(corrupt(
            chunk,
            "a compressed payload as long as the raw bytes".to_string(),
        ));
    }
    Ok(())
}

/// Checks the BLAKE3 of a chunk's bytes, hashed by the caller as they arrived.
pub fn check_hash(chunk: &ChunkRef, hash: &blake3::Hash) -> Result<(), ChunkFmtError> {
    if hash.as_bytes() != &chunk.hash {
        return Err(corrupt(chunk, "checksum mismatch"));
    }
    Ok(())
}

/// Whether `s` is a chunk name: 64 lowercase hex digits.
pub fn is_chunk_name(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ChunkStore, StoreError};
    use ckpt_tests::data::{noise, text};

    /// The cases that reach every branch of the encoder: raw, zstd, zstd that does
    /// not pay (falls back to raw), empty, and a page of zeros.
    fn cases() -> Vec<(Vec<u8>, Option<i32>)> {
        vec![
            (noise(10_000, 1), None),
            (text(1 << 20), Some(3)),
            (text(5000), Some(19)),
            (noise(64 * 1024, 7), Some(3)),
            (b"x".to_vec(), Some(3)),
            (Vec::new(), Some(3)),
            (Vec::new(), None),
            (vec![0u8; 4096], Some(1)),
        ]
    }

    fn object_path(store: &ChunkStore, c: &ChunkRef) -> std::path::PathBuf {
        let hex = c.hex();
        store.dir().join("chunks").join(&hex[..2]).join(&hex)
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

    #[test]
    fn compression_only_when_smaller() {
        let data = text(8192);
        let c = ChunkRef::of(&data);
        let z = encode(&c, &data, Some(3)).unwrap();
        assert_eq!(z[5], CODEC_ZSTD);
        assert!(z.len() < data.len() / 10);
        let n = noise(8192, 3);
        let r = encode(&ChunkRef::of(&n), &n, Some(3)).unwrap();
        assert_eq!(r[5], CODEC_RAW);
        assert_eq!(r.len() as u64, max_object_len(8192));
    }

    #[test]
    fn encode_checks_its_inputs() {
        let c = ChunkRef::of(b"abc");
        assert!(matches!(
            encode(&c, b"ab", None),
            Err(ChunkFmtError::RefMismatch {
                expected: 3,
                got: 2,
                ..
            })
        ));
        assert!(matches!(
            encode(&c, b"abc", Some(1000)),
            Err(ChunkFmtError::ZstdLevel { level: 1000, .. })
        ));
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

    #[test]
    fn wrong_buffer_size() {
        let c = ChunkRef::of(b"12345");
        let obj = encode(&c, b"12345", None).unwrap();
        let mut out = [0u8; 4];
        assert!(matches!(
            decode_into(&c, &obj, &mut out),
            Err(ChunkFmtError::BufferSize {
                expected: 5,
                got: 4,
                ..
            })
        ));
    }

    #[test]
    fn chunk_names() {
        assert!(is_chunk_name(&ChunkRef::of(b"").hex()));
        assert!(!is_chunk_name("../../etc/passwd"));
        assert!(!is_chunk_name(&"A".repeat(64)));
        assert!(!is_chunk_name(&"a".repeat(63)));
    }
}
