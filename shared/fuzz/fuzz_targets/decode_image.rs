//! Fuzzes the image manifest decoder: a manifest is untrusted input (../shared/DESIGN.md,
//! Security), so no byte string may make it panic, hang or allocate without bound.
//!
//! Run: `cd shared/fuzz && cargo +nightly fuzz run decode_image`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(image) = ckpt_shared::codec::decode_image(data) {
        // Anything that decodes must encode again and decode to the same value.
        let bytes = ckpt_shared::codec::encode_image(&image).expect("re-encode");
        let again = ckpt_shared::codec::decode_image(&bytes).expect("re-decode");
        assert_eq!(image, again);
    }
});
