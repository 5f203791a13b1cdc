//! The chunk object format, in one place: its header, its encoding and its
//! decoding with verification. Both stores ([`crate::store::ChunkStore`] on a
//! directory, [`crate::objstore::ObjectStoreBackend`] on `object_store`) write and read
//! objects only through this module, so the two cannot drift apart.
//!
//! A chunk object is a 12-byte header and the payload:
//!
//! ```text
//! offset  size  field
//!      0     4  magic  b"CKCH"
//!      4     1  object version (1)
//!      5     1  codec: 0 = raw, 1 = zstd
//!      6     2  reserved, zero
//!      8     4  uncompressed length, u32 LE
//!     12     …  payload (raw bytes, or one zstd frame)
//! ```
//!
//! The name of an object is the BLAKE3 of the *uncompressed* bytes
//! ([`ChunkRef::of`]), so the compression level never changes a chunk's identity: the
//! same page dumped with zstd by one rank and raw by another is stored once.
//!
//! The encoder hands the header and the payload out separately ([`encode_with`])
//! rather than one buffer: the directory store writes them to its file as they are,
//! and a raw chunk (most of a dump's memory) is then never copied; [`encode`] joins
//! them for the object stores, which hand whole objects to an HTTP client. The
//! decoder is likewise split so that a reader can check the header as soon as it is
//! in and stream a raw payload into the caller's buffer ([`check_header`],
//! [`decompress_into`], [`check_hash`]); [`decode_into`] does all of it over one
//! buffer.
//!
//! Decoding checks, in order: size, magic, version, reserved bytes, stated length,
//! codec, payload size, zstd frame, decompressed size, BLAKE3. Nothing in an object is
//! trusted, and an error names the chunk.
//!
//! This module depends on nothing else of the store (only [`crate::image::ChunkRef`]),
//! so both stores can use it without an import cycle.

use std::cell::RefCell;

use crate::image::ChunkRef;

/// First 4 bytes of every chunk object.
pub const CHUNK_MAGIC: [u8; 4] = *b"CKCH";
/// Version of the chunk object format.
pub const CHUNK_VERSION: u8 = 1;
/// Codec byte: the payload is the raw bytes.
pub const CODEC_RAW: u8 = 0;
/// Codec byte: the payload is one zstd frame.
pub const CODEC_ZSTD: u8 = 1;
/// Size of the chunk object header.
pub const CHUNK_HEADER_LEN: usize = 12;

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

/// Per-thread zstd contexts: creating one costs an allocation of several MiB at high
/// levels, far more than compressing a 1 MiB chunk, so each worker thread keeps its
/// own, with the output buffer it compresses into (it only grows, so it is
/// zero-filled once).
struct Compressor {
    level: i32,
    inner: zstd::bulk::Compressor<'static>,
    buf: Vec<u8>,
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
/// otherwise. The hash is trusted; the length is checked.
pub fn encode(
    chunk: &ChunkRef,
    bytes: &[u8],
    zstd_level: Option<i32>,
) -> Result<Vec<u8>, ChunkFmtError> {
    encode_with(chunk, bytes, zstd_level, |header, payload| {
        let mut object = Vec::with_capacity(CHUNK_HEADER_LEN + payload.len());
        object.extend_from_slice(header);
        object.extend_from_slice(payload);
        object
    })
}

/// [`encode`] without joining the parts: `write(header, payload)` gets the header
/// and the payload (`bytes` themselves when raw, this thread's compression buffer
/// when zstd), and its result is returned. `write` must not encode a chunk itself
/// (the compression buffer is borrowed while it runs).
pub fn encode_with<R>(
    chunk: &ChunkRef,
    bytes: &[u8],
    zstd_level: Option<i32>,
    write: impl FnOnce(&[u8; CHUNK_HEADER_LEN], &[u8]) -> R,
) -> Result<R, ChunkFmtError> {
    if bytes.len() != chunk.len as usize {
        return Err(ChunkFmtError::RefMismatch {
            chunk: chunk.hex(),
            expected: chunk.len,
            got: bytes.len(),
        });
    }
    let level = match zstd_level {
        Some(level) if !bytes.is_empty() => {
            check_zstd_level(level)?;
            level
        }
        Some(level) => {
            check_zstd_level(level)?;
            return Ok(write(&header(CODEC_RAW, chunk.len), bytes));
        }
        None => return Ok(write(&header(CODEC_RAW, chunk.len), bytes)),
    };
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
                buf: Vec::new(),
            }),
        };
        // Only a strictly smaller result is worth the decompression at restore: an
        // output buffer one byte short of the input makes zstd fail on anything else,
        // and then the raw form is stored.
        let cap = bytes.len() - 1;
        if ctx.buf.len() < cap {
            ctx.buf.resize(cap, 0);
        }
        let Compressor { inner, buf, .. } = ctx;
        Ok(match inner.compress_to_buffer(bytes, &mut buf[..cap]) {
            Ok(n) => write(&header(CODEC_ZSTD, chunk.len), &buf[..n]),
            Err(_) => write(&header(CODEC_RAW, chunk.len), bytes),
        })
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
        CODEC_ZSTD => return decompress_into(chunk, payload, out),
        _ => unreachable!("check_header accepts only known codecs"),
    }
    check_hash(chunk, &blake3::hash(out))
}

/// Decompresses the zstd `payload` of `chunk` into `out` (exactly `chunk.len`
/// bytes) and verifies the BLAKE3 of the result.
pub fn decompress_into(
    chunk: &ChunkRef,
    payload: &[u8],
    out: &mut [u8],
) -> Result<(), ChunkFmtError> {
    let n = DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d =
            match &mut *slot {
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
    check_hash(chunk, &blake3::hash(out))
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
pub(crate) mod tests {
    use super::*;
    use ckpt_tests::data::{noise, text};

    /// The cases that reach every branch of the encoder: raw, zstd, zstd that does
    /// not pay (falls back to raw), empty, and a page of zeros.
    pub(crate) fn cases() -> Vec<(Vec<u8>, Option<i32>)> {
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
