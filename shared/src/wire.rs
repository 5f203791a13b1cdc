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

/// Socket buffer size asked for the UDP sockets of QUIC endpoints.
pub const UDP_BUFFER: usize = 8 << 20;

/// A UDP socket bound to `addr` with [`UDP_BUFFER`]-byte send and receive buffers,
/// for a QUIC endpoint. The controller's one socket serves every agent: a barrier
/// step sends a datagram to each of them at once and their answers arrive
/// together, and with the default buffer (about 200 KiB) a thousand agents overflow
/// it; each lost datagram then waits for QUIC's loss timers (measured: a 1,000-agent
/// barrier took seconds instead of milliseconds). As root the limit of
/// `net.core.rmem_max` is passed over (`SO_RCVBUFFORCE`); otherwise the kernel
/// caps the size there.
pub fn udp_socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use std::os::fd::AsRawFd;
    let s = std::net::UdpSocket::bind(addr)?;
    let fd = s.as_raw_fd();
    let size = UDP_BUFFER as libc::c_int;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        let set = |opt| {
            // SAFETY: setsockopt on our own socket with a pointer to a live c_int and
            // its size.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        if set(force) != 0 {
            set(plain);
        }
    }
    Ok(s)
}

/// A QUIC endpoint on [`udp_socket`]`(addr)`: a server if `server` is given. Must
/// be called inside a Tokio runtime.
pub fn endpoint(
    addr: std::net::SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        udp_socket(addr)?,
        std::sync::Arc::new(quinn::TokioRuntime),
    )
}
