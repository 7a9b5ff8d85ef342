//! Frames of the daemon's local API (see `docs/protocol.md`):
//!
//! ```text
//! u32 BE  header length  (<= 1 MiB)
//! bytes   header: JSON
//! u64 BE  payload length (<= 256 MiB; 0 when there is none)
//! bytes   payload: raw bytes (components, chunk data), never re-encoded
//! ```
//!
//! Readers never allocate a declared length up front: header and payload buffers grow as
//! their bytes arrive (a peer that announces 256 MiB and sends nothing costs nothing). The
//! daemon checks the header's op before reading any payload (per-op limits, see
//! `docs/protocol.md`, "Limits"), with [`header_len`], [`payload_len`] and `read_bytes_async`.

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

/// Largest header accepted.
pub const MAX_HEADER: u32 = 1 << 20;
/// Largest payload accepted.
pub const MAX_PAYLOAD: u64 = 256 << 20;

/// Frame errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The peer closed the connection between frames.
    #[error("connection closed")]
    Closed,
    /// I/O failed mid-frame.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Header or payload over its limit.
    #[error("{what} of {size} bytes is over the limit of {limit}")]
    TooLarge {
        /// header or payload
        what: &'static str,
        /// Size announced.
        size: u64,
        /// Limit.
        limit: u64,
    },
    /// The header is not valid JSON of the expected shape.
    #[error("bad header: {0}")]
    BadHeader(String),
}

/// The frame head (lengths and header) for `header` and a payload of `payload_len` bytes.
pub fn head<T: Serialize>(header: &T, payload_len: usize) -> std::io::Result<Vec<u8>> {
    let h = serde_json::to_vec(header).map_err(std::io::Error::other)?;
    if h.len() > MAX_HEADER as usize || payload_len as u64 > MAX_PAYLOAD {
        return Err(std::io::Error::other("frame over the protocol's limits"));
    }
    let mut out = Vec::with_capacity(12 + h.len());
    out.extend_from_slice(&(h.len() as u32).to_be_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&(payload_len as u64).to_be_bytes());
    Ok(out)
}

/// Encode one frame.
pub fn encode<T: Serialize>(header: &T, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = head(header, payload.len())?;
    out.extend_from_slice(payload);
    Ok(out)
}

/// Write one frame (blocking).
pub fn write_frame<T: Serialize>(
    w: &mut impl Write,
    header: &T,
    payload: &[u8],
) -> std::io::Result<()> {
    w.write_all(&head(header, payload.len())?)?;
    w.write_all(payload)?;
    w.flush()
}

/// The header length announced by a frame's first 4 bytes, checked against its limit.
pub fn header_len(bytes: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(bytes);
    if len > MAX_HEADER {
        return Err(FrameError::TooLarge {
            what: "header",
            size: len as u64,
            limit: MAX_HEADER as u64,
        });
    }
    Ok(len as usize)
}

/// The payload length announced after the header, checked against its limit.
pub fn payload_len(bytes: [u8; 8]) -> Result<usize, FrameError> {
    let len = u64::from_be_bytes(bytes);
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge {
            what: "payload",
            size: len,
            limit: MAX_PAYLOAD,
        });
    }
    Ok(len as usize)
}

/// Parse a frame's JSON header.
pub fn decode_header<T: for<'de> Deserialize<'de>>(h: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(h).map_err(|e| FrameError::BadHeader(e.to_string()))
}

/// First allocation for a buffer of a declared length: what arrives beyond it grows the
/// buffer as it comes.
const FIRST_ALLOC: usize = 64 << 10;

/// Make room in `v` (which will hold `len` bytes, all read into it so far): its size
/// doubles as bytes arrive but never goes past `len` (a growing `Vec` would reach up to
/// twice the payload, twice what the daemon's byte budget counts). Each byte is zeroed once.
fn room(v: &mut Vec<u8>, len: usize) {
    let have = v.len();
    if have == v.capacity() {
        v.reserve_exact((len - have).min(have.max(FIRST_ALLOC)));
    }
    v.resize(v.capacity().min(len), 0);
}

/// Read exactly `len` bytes (blocking) into a buffer that grows as they arrive.
pub fn read_bytes(r: &mut impl Read, len: usize) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::with_capacity(len.min(FIRST_ALLOC));
    let mut filled = 0;
    while filled < len {
        if filled == v.len() {
            room(&mut v, len);
        }
        match r.read(&mut v[filled..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(v)
}

/// Read one frame (blocking).
pub fn read_frame<T: for<'de> Deserialize<'de>>(
    r: &mut impl Read,
) -> Result<(T, Vec<u8>), FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let h = read_bytes(r, header_len(len)?)?;
    let mut plen = [0u8; 8];
    r.read_exact(&mut plen)?;
    let p = read_bytes(r, payload_len(plen)?)?;
    Ok((decode_header(&h)?, p))
}

/// Read exactly `len` bytes (async) into a buffer that grows as they arrive.
#[cfg(feature = "tokio")]
pub async fn read_bytes_async(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    len: usize,
) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut v = Vec::with_capacity(len.min(FIRST_ALLOC));
    let mut filled = 0;
    while filled < len {
        if filled == v.len() {
            room(&mut v, len);
        }
        match r.read(&mut v[filled..]).await {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(v)
}

/// Whether a failed send may have been answered: the daemon refused the connection or the
/// request (an error frame) and closed before it read what was sent.
fn may_have_answer(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
    )
}

/// Send a request and read its reply (blocking). When the send fails because the daemon
/// closed the connection, the reply it sent before closing (a refusal by a limit, see
/// `docs/protocol.md`) is read and returned rather than the bare send error.
pub fn exchange<T: for<'de> Deserialize<'de>, H: Serialize>(
    w: &mut impl Write,
    r: &mut impl Read,
    header: &H,
    payload: &[u8],
) -> Result<(T, Vec<u8>), FrameError> {
    match write_frame(w, header, payload) {
        Ok(()) => read_frame(r),
        Err(e) if may_have_answer(&e) => read_frame(r).map_err(|_| FrameError::Io(e)),
        Err(e) => Err(FrameError::Io(e)),
    }
}

/// Send a request and read its reply (async; see [`exchange`]).
#[cfg(feature = "tokio")]
pub async fn exchange_async<T: for<'de> Deserialize<'de>, H: Serialize>(
    s: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin),
    header: &H,
    payload: &[u8],
) -> Result<(T, Vec<u8>), FrameError> {
    match write_frame_async(s, header, payload).await {
        Ok(()) => read_frame_async(s).await,
        Err(e) if may_have_answer(&e) => read_frame_async(s).await.map_err(|_| FrameError::Io(e)),
        Err(e) => Err(FrameError::Io(e)),
    }
}

/// Read one frame (async).
#[cfg(feature = "tokio")]
pub async fn read_frame_async<T: for<'de> Deserialize<'de>>(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<(T, Vec<u8>), FrameError> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let h = read_bytes_async(r, header_len(len)?).await?;
    let mut plen = [0u8; 8];
    r.read_exact(&mut plen).await?;
    let p = read_bytes_async(r, payload_len(plen)?).await?;
    Ok((decode_header(&h)?, p))
}

/// Write one frame (async): head and payload without copying the payload.
#[cfg(feature = "tokio")]
pub async fn write_frame_async<T: Serialize>(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    header: &T,
    payload: &[u8],
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    w.write_all(&head(header, payload.len())?).await?;
    w.write_all(payload).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out at most 1000 bytes per read (like a socket).
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.0.len()).min(1000);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_payload_buffer_never_grows_past_the_payload() {
        for len in [0, 1, 999, FIRST_ALLOC, FIRST_ALLOC + 1, (5 << 20) + 1] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let v = read_bytes(&mut Trickle(&data), len).unwrap();
            assert_eq!(v, data);
            assert!(
                v.capacity() <= len.max(FIRST_ALLOC.min(len)) + 64,
                "{len} bytes in a buffer of {}",
                v.capacity()
            );
        }
        // a peer that stops short is an error, and costs what it sent
        let err = read_bytes(&mut Trickle(&[1; 10]), 1 << 20).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[cfg(feature = "tokio")]
    #[test]
    fn the_async_reader_grows_the_same_way() {
        let len = (3 << 20) + 7;
        let data: Vec<u8> = (0..len).map(|i| (i % 13) as u8).collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let v = rt.block_on(read_bytes_async(&mut &data[..], len)).unwrap();
        assert_eq!(v, data);
        assert!(v.capacity() <= len + 64, "{}", v.capacity());
    }
}
