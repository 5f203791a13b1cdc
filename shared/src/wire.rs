//! Frames of [`crate::proto`] on QUIC streams.
//!
//! A connection carries one bidirectional stream, opened by the agent; each side
//! writes frames (4-byte length, then the envelope) on its half. The length is
//! checked against [`MAX_FRAME`] before the body is read, so a peer that announces
//! a huge frame is refused without anything being allocated for it.

use crate::proto::{frame_len, FrameError, MAX_FRAME};

/// Errors of reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("connection: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("connection: {0}")]
    Write(#[from] quinn::WriteError),
}

/// Reads one whole frame (prefix included); `None` when the peer finished its
/// stream cleanly between frames.
pub async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Option<Vec<u8>>, WireError> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = frame_len(&prefix)?;
    debug_assert!(len <= MAX_FRAME);
    let mut buf = vec![0u8; 4 + len];
    buf[..4].copy_from_slice(&prefix);
    recv.read_exact(&mut buf[4..]).await?;
    Ok(Some(buf))
}

/// Writes one frame.
pub async fn write_frame(send: &mut quinn::SendStream, frame: &[u8]) -> Result<(), WireError> {
    send.write_all(frame).await?;
    Ok(())
}
