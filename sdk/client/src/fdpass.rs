//! File descriptors over the daemon's Unix socket (SCM_RIGHTS), in safe code (rustix).
//!
//! The daemon lends shared memory this way: a space's cache region (a sealed memfd, mapped
//! read-only by readers) with GETCHUNKCACHE_OK, and a lease's buffer (a memfd of the slot
//! size, writable by its holder) with STARTWRITE_OK when the buffer is new to the
//! connection. The descriptors ride on the first bytes of the reply frame; a reader that
//! reads those bytes with a plain `read` drops them (the kernel closes them), so a client
//! receives replies that may carry descriptors with [`recv_with_fds`].

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// Most descriptors sent with one reply.
pub const MAX_FDS: usize = 4;

/// Send (a prefix of) `bytes` with `fds` attached; returns how many bytes went out (the
/// caller writes the rest normally). Non-blocking sockets give `WouldBlock` as usual.
pub fn send_with_fds(
    socket: impl AsFd,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(std::io::Error::other("too many descriptors for one reply"));
    }
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(std::io::Error::other("descriptor buffer too small"));
    }
    let n = rustix::net::sendmsg(
        socket,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    Ok(n)
}

/// Receive up to `buf.len()` bytes and any descriptors attached to them (close-on-exec).
/// `Ok(0)` with no descriptors: the peer closed the connection.
pub fn recv_with_fds(
    socket: impl AsFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<usize> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = loop {
        match rustix::net::recvmsg(
            &socket,
            &mut [IoSliceMut::new(buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r?,
        }
    };
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(it) = m {
            fds.extend(it);
        }
    }
    Ok(got.bytes)
}

/// Whether the peer has closed the connection (a non-blocking peek: no byte is consumed).
/// A client calls this before trusting a cache hit, so that it never keeps reading the
/// region of a daemon that is gone (killed, restarted).
pub fn peer_closed(socket: impl AsFd) -> bool {
    let mut b = [0u8; 1];
    match rustix::net::recv(socket, &mut b[..], RecvFlags::PEEK | RecvFlags::DONTWAIT) {
        Ok((_, 0)) => true,
        Ok(_) => false,
        Err(e) => !(e == rustix::io::Errno::AGAIN || e == rustix::io::Errno::INTR),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_ride_on_the_first_bytes() {
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let f = tempfile::tempfile().unwrap();
        assert_eq!(send_with_fds(&a, b"head", &[f.as_fd()]).unwrap(), 4);
        (&a).write_all(b"tail").unwrap();
        let mut fds = Vec::new();
        let mut buf = [0u8; 4];
        assert_eq!(recv_with_fds(&b, &mut buf, &mut fds).unwrap(), 4);
        assert_eq!(&buf, b"head");
        assert_eq!(fds.len(), 1);
        let mut rest = [0u8; 4];
        b.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"tail");
        assert!(!peer_closed(&b));
        drop(a);
        assert!(peer_closed(&b));
    }
}
