//! Protocol frames from a peer are untrusted: decoding one must only ever return.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ckpt_shared::proto::frame_len(data);
    let _ = ckpt_shared::proto::ToAgent::from_frame(data);
    let _ = ckpt_shared::proto::FromAgent::from_frame(data);
});
