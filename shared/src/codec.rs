//! The manifest envelope: a self-describing, versioned, checksummed frame around a
//! MessagePack payload.
//!
//! An image manifest is untrusted input: it may come from a store shared with other
//! users, be cut short by a dump that died, or be rotted on disk. So the envelope says
//! what it is before anything is parsed, and decoding is bounded and checked:
//!
//! ```text
//! offset  size  field
//!      0     8  magic  b"CKPTIMG\0"
//!      8     4  format version, u32 LE (image::FORMAT_VERSION)
//!     12     4  kind tag, 4 ASCII bytes (b"PROC" = process-tree image)
//!     16     8  payload length, u64 LE (at most MAX_PAYLOAD)
//!     24    32  BLAKE3 of the payload
//!     56     …  payload: MessagePack with field names (rmp_serde::to_vec_named)
//! ```
//!
//! Why this shape:
//! - **MessagePack with field names** rather than bincode or positional MessagePack:
//!   an old or new `ckpt inspect` can still read a manifest field by field, and adding
//!   an optional field does not shift every other one. The names cost a few percent of
//!   a manifest that is small next to the memory chunks it points to.
//! - **A checksum over the payload** rather than trusting the store: a flipped bit in
//!   a register blob would otherwise restore a process that crashes later, far from
//!   the cause. BLAKE3 is already what names the chunks, so it costs no new dependency.
//! - **An explicit length that must match exactly**: a truncated manifest (a dump that
//!   died while writing) and trailing garbage are both reported as such, instead of as
//!   a puzzling MessagePack error.
//! - **A generic kind tag**: job manifests and other records reuse the same envelope
//!   with their own tag, and a file of one kind is never decoded as another.
//!
//! Bounds: the payload is at most [`MAX_PAYLOAD`] bytes, it is decoded from a slice
//! (so no length prefix inside it can make the decoder read or reserve more than the
//! slice holds; serde's cautious size hint caps preallocation of sequences at 1 MiB),
//! and nesting is limited to [`MAX_DEPTH`] levels.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::image::{self, Image};

/// First 8 bytes of every envelope.
pub const MAGIC: [u8; 8] = *b"CKPTIMG\0";

/// Kind tag of a process-tree image manifest ([`Image`]).
pub const KIND_IMAGE: [u8; 4] = *b"PROC";

/// Size of the fixed header in front of the payload.
pub const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 32;

/// Largest payload accepted (and produced): 512 MiB. A manifest lists extents, not
/// memory, so even a very large tree stays far below this.
pub const MAX_PAYLOAD: u64 = 512 * 1024 * 1024;

/// Largest envelope accepted: header plus [`MAX_PAYLOAD`].
pub const MAX_ENVELOPE: u64 = HEADER_LEN as u64 + MAX_PAYLOAD;

/// Deepest nesting of MessagePack arrays and maps accepted. Real manifests nest about
/// ten levels; the cap keeps a hostile payload from exhausting the stack.
pub const MAX_DEPTH: usize = 128;

/// Errors of encoding or decoding a manifest envelope.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("not a ckpt image manifest (bad magic): is this the right file?")]
    NotAnImage,

    #[error(
        "image manifest is truncated: expected {expected} bytes, found {got} \
         (the dump did not complete, or the file was cut short when copied)"
    )]
    Truncated { expected: u64, got: u64 },

    #[error(
        "image manifest has {extra} unexpected bytes after its end: \
         the file was damaged or appended to"
    )]
    TrailingBytes { extra: u64 },

    #[error(
        "image format version {found} is not supported by this ckpt, which reads version \
         {supported}: use the ckpt release that wrote the image, or take a new checkpoint"
    )]
    Version { found: u32, supported: u32 },

    #[error(
        "manifest is of kind {found:?} but {expected:?} was expected: \
         it is another kind of ckpt file"
    )]
    Kind { found: String, expected: String },

    #[error("image architecture is {found} but this ckpt restores {supported} only")]
    Arch { found: String, supported: String },

    #[error(
        "image manifest payload of {len} bytes exceeds the limit of {max} bytes: \
         the file is corrupted or not a ckpt manifest"
    )]
    TooLarge { len: u64, max: u64 },

    #[error("image manifest is corrupted: checksum mismatch")]
    Checksum,

    #[error("image manifest is invalid: {0}")]
    Invalid(String),
    #[error("image manifest is corrupted: cannot decode its contents: {0}")]
    Decode(String),

    #[error("cannot encode manifest: {0}")]
    Encode(String),
}

/// Encodes `value` as MessagePack (with field names) inside an envelope of `kind`.
pub fn encode<T: Serialize>(kind: [u8; 4], value: &T) -> Result<Vec<u8>, CodecError> {
    let payload = rmp_serde::to_vec_named(value).map_err(|e| CodecError::Encode(e.to_string()))?;
    frame(kind, &payload)
}

/// Decodes an envelope of `kind` holding a MessagePack `T`, checking the magic,
/// version, kind, exact length and checksum before any of the payload is parsed.
pub fn decode<T: DeserializeOwned>(kind: [u8; 4], bytes: &[u8]) -> Result<T, CodecError> {
    let payload = unframe(kind, bytes)?;
    decode_payload(payload)
}

/// Encodes a process-tree image manifest.
pub fn encode_image(image: &Image) -> Result<Vec<u8>, CodecError> {
    encode(KIND_IMAGE, image)
}

/// Decodes a process-tree image manifest, and refuses one whose own
/// `format_version` or `arch` this build cannot restore.
pub fn decode_image(bytes: &[u8]) -> Result<Image, CodecError> {
    let image: Image = decode(KIND_IMAGE, bytes)?;
    if image.format_version != image::FORMAT_VERSION {
        return Err(CodecError::Version {
            found: image.format_version,
            supported: image::FORMAT_VERSION,
        });
    }
    if image.arch != image::ARCH {
        return Err(CodecError::Arch {
            found: image.arch,
            supported: image::ARCH.to_string(),
        });
    }
    for e in image.extents() {
        e.check().map_err(CodecError::Invalid)?;
    }
    image.check_objects().map_err(CodecError::Invalid)?;
    Ok(image)
}

/// Wraps an already encoded payload in an envelope of `kind`.
fn frame(kind: [u8; 4], payload: &[u8]) -> Result<Vec<u8>, CodecError> {
    let len = payload.len() as u64;
    if len > MAX_PAYLOAD {
        return Err(CodecError::TooLarge {
            len,
            max: MAX_PAYLOAD,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&image::FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&kind);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(blake3::hash(payload).as_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Checks the envelope and returns its payload.
fn unframe(kind: [u8; 4], bytes: &[u8]) -> Result<&[u8], CodecError> {
    let got = bytes.len() as u64;
    if bytes.len() < MAGIC.len() {
        // A file cut inside the magic is a truncated manifest; anything else is not one.
        return if MAGIC.starts_with(bytes) && !bytes.is_empty() {
            Err(CodecError::Truncated {
                expected: HEADER_LEN as u64,
                got,
            })
        } else {
            Err(CodecError::NotAnImage)
        };
    }
    if bytes[..8] != MAGIC {
        return Err(CodecError::NotAnImage);
    }
    if bytes.len() < HEADER_LEN {
        return Err(CodecError::Truncated {
            expected: HEADER_LEN as u64,
            got,
        });
    }
    let (header, rest) = bytes.split_at(HEADER_LEN);
    let version = u32::from_le_bytes(le4(&header[8..12]));
    if version != image::FORMAT_VERSION {
        return Err(CodecError::Version {
            found: version,
            supported: image::FORMAT_VERSION,
        });
    }
    let found_kind = le4(&header[12..16]);
    if found_kind != kind {
        return Err(CodecError::Kind {
            found: String::from_utf8_lossy(&found_kind).into_owned(),
            expected: String::from_utf8_lossy(&kind).into_owned(),
        });
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&header[16..24]);
    let len = u64::from_le_bytes(len_bytes);
    if len > MAX_PAYLOAD {
        return Err(CodecError::TooLarge {
            len,
            max: MAX_PAYLOAD,
        });
    }
    let have = rest.len() as u64;
    if have < len {
        return Err(CodecError::Truncated {
            expected: HEADER_LEN as u64 + len,
            got,
        });
    }
    if have > len {
        return Err(CodecError::TrailingBytes { extra: have - len });
    }
    if blake3::hash(rest).as_bytes() != &header[24..56] {
        return Err(CodecError::Checksum);
    }
    Ok(rest)
}

/// Decodes a checked payload, requiring the value to use all of it.
fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    // A Cursor (rather than `from_slice`) lets us see where the value ended. Byte and
    // string fields are read through `Read::take(len).read_to_end`, which grows with the
    // bytes actually present, so a hostile length prefix costs nothing.
    let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(payload));
    de.set_max_depth(MAX_DEPTH);
    let value = T::deserialize(&mut de).map_err(|e| CodecError::Decode(e.to_string()))?;
    let used = de.position();
    if used != payload.len() as u64 {
        return Err(CodecError::Decode(format!(
            "{} bytes left over after the value",
            payload.len() as u64 - used
        )));
    }
    Ok(value)
}

fn le4(b: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    a
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::image::*;
    use serde::Deserialize;

    /// A small but complete image, with every kind of field filled.
    pub(crate) fn sample_image() -> Image {
        let chunk = ChunkRef::of(&[7u8; 0x2000]);
        Image {
            format_version: FORMAT_VERSION,
            arch: ARCH.to_string(),
            tool_version: "0.1.0".into(),
            created_unix: 1_700_000_000,
            host: HostFingerprint {
                kernel: "6.1.0".into(),
                hostname: "node1".into(),
                xcr0: 0x2e7,
                xsave_size: 2696,
                vdso_hash: [7; 32],
                vdso_size: 8192,
                vvar_size: 16384,
            },
            root_pid: 4121,
            processes: vec![Process {
                pid: 4121,
                ppid: 1,
                pgid: 4121,
                sid: 4000,
                threads: vec![Thread {
                    tid: 4121,
                    comm: "a.out".into(),
                    regs: vec![1; 216],
                    xsave: vec![2; 2696],
                    sigmask: 0,
                    pending: vec![SigInfo {
                        signo: 10,
                        raw: vec![3; 128],
                    }],
                    rseq: Some(Rseq {
                        abi_pointer: 0x7f00_0000_1000,
                        abi_size: 32,
                        flags: 0,
                        signature: 0x5305_3053,
                    }),
                    robust_list: (0x7f00_0000_2000, 24),
                    clear_child_tid: 0x7f00_0000_3000,
                    sigaltstack: SigAltStack::default(),
                }],
                mappings: vec![
                    Mapping {
                        start: 0x1000,
                        end: 0x3000,
                        prot: prot::READ | prot::WRITE,
                        shared: false,
                        kind: MappingKind::Anon {
                            name: Some("[heap]".into()),
                        },
                        vm_flags: vec!["rd".into(), "wr".into()],
                        data: vec![
                            Extent::whole(0x1000, chunk),
                            Extent {
                                addr: 0x2000,
                                chunk,
                                off: 0x1000,
                                len: 0x1000,
                            },
                        ],
                    },
                    Mapping {
                        start: 0x4000,
                        end: 0x5000,
                        prot: prot::READ | prot::EXEC,
                        shared: false,
                        kind: MappingKind::File {
                            path: "/bin/true".into(),
                            offset: 0,
                            check: 0,
                        },
                        vm_flags: vec![],
                        data: vec![],
                    },
                ],
                mm: MmFields {
                    auxv: vec![6, 4096, 0, 0],
                    exe: "/bin/true".into(),
                    ..MmFields::default()
                },
                fds: vec![Fd {
                    fd: 0,
                    cloexec: false,
                    file: 0,
                }],
                sigactions: vec![SigAction {
                    signo: 10,
                    handler: 0x401000,
                    flags: 0x0400_0000,
                    restorer: 0x402000,
                    mask: 0,
                }],
                shared_pending: vec![],
                itimers: [ITimer::default(); 3],
                posix_timers: vec![],
                rlimits: vec![(7, 1024, 4096)],
                cwd: "/home/u".into(),
                umask: 0o022,
                creds: Creds {
                    uid: [1000; 4],
                    gid: [1000; 4],
                    groups: vec![1000, 27],
                },
                stopped: false,
                personality: 0,
            }],
            files: vec![OpenFile {
                id: 0,
                flags: 2,
                kind: FileKind::Pipe {
                    pipe_id: 99,
                    read_end: true,
                    fifo_path: None,
                    buffered: b"queued".to_vec(),
                    capacity: 65536,
                },
            }],
            shmem: vec![SharedMemory {
                id: 0,
                size: 4096,
                data: vec![],
                backing: Default::default(),
            }],
            file_checks: vec![FileCheck {
                path: "/bin/true".into(),
                size: 1234,
                mtime_ns: -1_700_000_000_123_456_789,
                dev: 2049,
                ino: 77,
                hash: Some([9; 32]),
                written: true,
                mapped_exec: false,
            }],
            stats: DumpStats::default(),
        }
    }

    /// Frames a raw payload (for tests that hand-craft MessagePack).
    pub(crate) fn frame_raw(kind: [u8; 4], payload: &[u8]) -> Vec<u8> {
        frame(kind, payload).expect("payload within limits")
    }

    #[test]
    fn image_round_trip() {
        let img = sample_image();
        let bytes = encode_image(&img).unwrap();
        assert_eq!(&bytes[..8], &MAGIC);
        assert_eq!(&bytes[12..16], b"PROC");
        assert_eq!(decode_image(&bytes).unwrap(), img);
    }

    #[test]
    fn payload_is_self_describing() {
        // Field names are present, so a future reader can pick fields by name.
        let bytes = encode_image(&sample_image()).unwrap();
        let payload = &bytes[HEADER_LEN..];
        let needle = b"root_pid";
        assert!(payload.windows(needle.len()).any(|w| w == needle));
    }

    #[test]
    fn generic_kind_round_trip() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Job {
            id: u64,
            ranks: Vec<String>,
        }
        let job = Job {
            id: 7,
            ranks: vec!["a".into(), "b".into()],
        };
        let bytes = encode(*b"JOB_", &job).unwrap();
        assert_eq!(decode::<Job>(*b"JOB_", &bytes).unwrap(), job);
        match decode::<Job>(KIND_IMAGE, &bytes) {
            Err(CodecError::Kind { found, expected }) => {
                assert_eq!(found, "JOB_");
                assert_eq!(expected, "PROC");
            }
            other => panic!("expected Kind error, got {other:?}"),
        }
    }

    #[test]
    fn truncated() {
        let bytes = encode_image(&sample_image()).unwrap();
        let full = bytes.len() as u64;
        for cut in [bytes.len() - 1, HEADER_LEN + 1, HEADER_LEN, 40, 10, 3] {
            match decode_image(&bytes[..cut]) {
                Err(CodecError::Truncated { expected, got }) => {
                    assert_eq!(got, cut as u64);
                    if cut >= HEADER_LEN {
                        assert_eq!(expected, full);
                    } else {
                        assert_eq!(expected, HEADER_LEN as u64);
                    }
                }
                other => panic!("cut at {cut}: expected Truncated, got {other:?}"),
            }
        }
        let msg = decode_image(&bytes[..bytes.len() - 1])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("truncated"), "{msg}");
    }

    #[test]
    fn trailing_garbage() {
        let mut bytes = encode_image(&sample_image()).unwrap();
        bytes.extend_from_slice(b"xyz");
        assert!(matches!(
            decode_image(&bytes),
            Err(CodecError::TrailingBytes { extra: 3 })
        ));
    }

    #[test]
    fn bad_magic() {
        let mut bytes = encode_image(&sample_image()).unwrap();
        bytes[0] = b'X';
        assert!(matches!(decode_image(&bytes), Err(CodecError::NotAnImage)));
        assert!(matches!(decode_image(b""), Err(CodecError::NotAnImage)));
        assert!(matches!(
            decode_image(b"#!/bin/sh\necho hi\n"),
            Err(CodecError::NotAnImage)
        ));
    }

    #[test]
    fn wrong_envelope_version() {
        let mut bytes = encode_image(&sample_image()).unwrap();
        bytes[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let err = decode_image(&bytes).unwrap_err();
        match &err {
            CodecError::Version { found, supported } => {
                assert_eq!(*found, FORMAT_VERSION + 1);
                assert_eq!(*supported, FORMAT_VERSION);
            }
            other => panic!("expected Version, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("version {}", FORMAT_VERSION + 1)),
            "{msg}"
        );
        assert!(msg.contains("take a new checkpoint"), "{msg}");
    }

    #[test]
    fn wrong_image_version_and_arch() {
        let mut img = sample_image();
        img.format_version = FORMAT_VERSION + 5;
        let bytes = encode_image(&img).unwrap();
        assert!(matches!(
            decode_image(&bytes),
            Err(CodecError::Version { found, .. }) if found == FORMAT_VERSION + 5
        ));

        let mut img = sample_image();
        img.arch = "aarch64".into();
        let bytes = encode_image(&img).unwrap();
        let err = decode_image(&bytes).unwrap_err();
        assert!(matches!(err, CodecError::Arch { .. }));
        assert!(err.to_string().contains("aarch64"));
    }

    #[test]
    fn checksum_mismatch() {
        let mut bytes = encode_image(&sample_image()).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        let err = decode_image(&bytes).unwrap_err();
        assert!(matches!(err, CodecError::Checksum));
        assert_eq!(
            err.to_string(),
            "image manifest is corrupted: checksum mismatch"
        );

        // A flipped bit in the stored hash is caught the same way.
        let mut bytes = encode_image(&sample_image()).unwrap();
        bytes[30] ^= 0x80;
        assert!(matches!(decode_image(&bytes), Err(CodecError::Checksum)));
    }

    #[test]
    fn oversized_length_is_refused_before_reading() {
        let mut bytes = encode_image(&sample_image()).unwrap();
        bytes[16..24].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(
            decode_image(&bytes),
            Err(CodecError::TooLarge { .. })
        ));
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode_image(&bytes),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn bad_messagepack_is_decode_error() {
        // A valid envelope around a payload that is not an Image.
        let bytes = frame_raw(KIND_IMAGE, &[0xc1]); // 0xc1 is a reserved marker
        assert!(matches!(decode_image(&bytes), Err(CodecError::Decode(_))));
        let bytes = frame_raw(KIND_IMAGE, &rmp_serde::to_vec(&42u32).unwrap());
        assert!(matches!(decode_image(&bytes), Err(CodecError::Decode(_))));
        let bytes = frame_raw(KIND_IMAGE, &[]);
        assert!(matches!(decode_image(&bytes), Err(CodecError::Decode(_))));
    }

    #[test]
    fn leftover_payload_bytes_are_refused() {
        let mut payload = rmp_serde::to_vec_named(&sample_image()).unwrap();
        payload.push(0xc0); // a trailing nil, inside the checksummed payload
        let bytes = frame_raw(KIND_IMAGE, &payload);
        match decode_image(&bytes) {
            Err(CodecError::Decode(m)) => assert!(m.contains("left over"), "{m}"),
            other => panic!("expected Decode, got {other:?}"),
        }
    }

    #[test]
    fn deep_nesting_is_refused() {
        // 100k nested arrays: without a depth cap this would overflow the stack.
        let payload = vec![0x91u8; 100_000]; // fixarray of 1, repeated
        let bytes = frame_raw(*b"DEEP", &payload);
        assert!(matches!(
            decode::<serde::de::IgnoredAny>(*b"DEEP", &bytes),
            Err(CodecError::Decode(_))
        ));
    }

    #[test]
    fn mutated_payloads_never_panic() {
        // A poor man's fuzz run that needs no nightly toolchain: flip, insert and
        // delete bytes of a real payload, re-seal it so the checksum passes, and check
        // that decoding only ever returns. `shared/fuzz` does this properly.
        let good = rmp_serde::to_vec_named(&sample_image()).unwrap();
        for_each_mutation(&good, 3000, |p| {
            let _ = decode_image(&frame_raw(KIND_IMAGE, p));
        });
    }

    /// Calls `f` with `rounds` damaged copies of `good`: one to four bytes flipped,
    /// replaced, inserted or removed each (a fixed xorshift sequence, so a failure
    /// repeats).
    pub(crate) fn for_each_mutation(good: &[u8], rounds: usize, mut f: impl FnMut(&[u8])) {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..rounds {
            let mut p = good.to_vec();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % p.len();
                match next() % 4 {
                    0 => p[at] ^= 1 << (next() % 8),
                    1 => p[at] = next() as u8,
                    2 => p.insert(at, next() as u8),
                    _ => {
                        p.remove(at);
                    }
                }
            }
            f(&p);
        }
    }

    // --- allocation bound on hostile length prefixes --------------------------------

    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// Records, per thread, the largest single allocation made while armed, so a test
    /// can prove that a length prefix did not turn into a giant reservation.
    struct PeakAlloc;

    thread_local! {
        static ARMED: Cell<bool> = const { Cell::new(false) };
        static PEAK: Cell<usize> = const { Cell::new(0) };
    }

    fn note(size: usize) {
        // `try_with` so that allocations during thread teardown are ignored.
        let _ = ARMED.try_with(|armed| {
            if armed.get() {
                let _ = PEAK.try_with(|p| p.set(p.get().max(size)));
            }
        });
    }

    // SAFETY: every method forwards to the system allocator with the caller's own
    // arguments, so `System`'s guarantees carry over; `note` only touches const-
    // initialised thread locals, which never allocate.
    unsafe impl GlobalAlloc for PeakAlloc {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            // SAFETY: forwarded unchanged; the caller upholds `alloc_zeroed`'s contract.
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` came from `System` through this allocator with `layout`.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size);
            // SAFETY: `ptr` came from `System` through this allocator with `layout`;
            // the caller upholds `realloc`'s contract for `new_size`.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static GLOBAL: PeakAlloc = PeakAlloc;

    /// Runs `f` and returns the largest single allocation it made on this thread.
    fn peak_alloc_of(f: impl FnOnce()) -> usize {
        PEAK.with(|p| p.set(0));
        ARMED.with(|a| a.set(true));
        f();
        ARMED.with(|a| a.set(false));
        PEAK.with(|p| p.get())
    }

    /// MessagePack for a map of one entry: `key` => (marker `m` with 4-byte length).
    fn one_field(key: &str, marker: u8, len: u32) -> Vec<u8> {
        let mut p = vec![0x81, 0xa0 | key.len() as u8];
        p.extend_from_slice(key.as_bytes());
        p.push(marker);
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&[0x00; 16]); // a few elements' worth, then EOF
        p
    }

    const LIMIT: usize = 16 << 20; // no single allocation above 16 MiB

    #[test]
    fn peak_alloc_probe_sees_big_allocations() {
        // The probe itself works, so the bounds below mean something.
        let peak = peak_alloc_of(|| drop(std::hint::black_box(vec![1u8; 2 * LIMIT])));
        assert!(peak >= 2 * LIMIT, "probe saw only {peak} bytes");
    }

    #[test]
    fn hostile_array_length_does_not_allocate() {
        // An Image whose `processes` claims 4,294,967,295 entries.
        let bytes = frame_raw(KIND_IMAGE, &one_field("processes", 0xdd, u32::MAX));
        let t = std::time::Instant::now();
        let peak = peak_alloc_of(|| {
            assert!(matches!(decode_image(&bytes), Err(CodecError::Decode(_))));
        });
        assert!(peak < LIMIT, "decoder reserved {peak} bytes at once");
        assert!(t.elapsed() < std::time::Duration::from_secs(5));

        // A bare sequence of u64 claiming 4 billion elements.
        let mut p = vec![0xdd];
        p.extend_from_slice(&u32::MAX.to_be_bytes());
        p.extend_from_slice(&[0x01; 8]);
        let bytes = frame_raw(*b"SEQ_", &p);
        let peak = peak_alloc_of(|| {
            assert!(decode::<Vec<u64>>(*b"SEQ_", &bytes).is_err());
        });
        assert!(peak < LIMIT, "decoder reserved {peak} bytes at once");

        // A map claiming 4 billion entries.
        let mut p = vec![0xdf];
        p.extend_from_slice(&u32::MAX.to_be_bytes());
        p.extend_from_slice(&[0x01, 0x02]);
        let bytes = frame_raw(*b"MAP_", &p);
        let peak = peak_alloc_of(|| {
            assert!(decode::<std::collections::HashMap<u64, u64>>(*b"MAP_", &bytes).is_err());
        });
        assert!(peak < LIMIT, "decoder reserved {peak} bytes at once");
    }

    #[test]
    fn hostile_byte_and_string_lengths_do_not_allocate() {
        // `comm` (a String) and `regs` (serde_bytes) claiming 4 GiB, inside a Thread.
        for (key, marker) in [("comm", 0xdbu8), ("regs", 0xc6), ("comm", 0xc6)] {
            let bytes = frame_raw(*b"THRD", &one_field(key, marker, u32::MAX));
            let peak = peak_alloc_of(|| {
                assert!(decode::<Thread>(*b"THRD", &bytes).is_err());
            });
            assert!(peak < LIMIT, "{key}: decoder reserved {peak} bytes at once");
        }
    }

    #[test]
    fn an_extent_outside_its_chunk_or_not_whole_pages_is_refused() {
        for (off, len) in [(0x1000u32, 0x2000u32), (0x800, 0x1000), (0, 0x10)] {
            let mut img = sample_image();
            let e = &mut img.processes[0].mappings[0].data[1];
            e.off = off;
            e.len = len;
            let bytes = encode_image(&img).unwrap();
            let err = decode_image(&bytes).unwrap_err().to_string();
            assert!(err.contains("invalid"), "{off:#x}+{len:#x}: {err}");
        }
    }
}
