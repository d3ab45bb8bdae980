//! The handover channel: one `SOCK_SEQPACKET` Unix socket pair between a
//! node and the successor it starts (the successor's end is its standard
//! input), carrying [`wire`] messages with descriptors attached.
//!
//! Each send and receive is bounded by the caller's deadline; a peer that
//! goes away shows as [`ChannelError::Closed`].

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::net::{
    recvmsg, sendmsg, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use tokio::io::Interest;
use tokio::net::UnixDatagram;
use tokio::time::Instant;

use super::wire::{self, Message, WireError, MAX_MESSAGE};

/// Descriptors one message may carry at most (the kernel's SCM_MAX_FD is 253).
pub(crate) const MAX_FDS: usize = 64;

/// Why the channel failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChannelError {
    #[error("the other process closed the handover channel")]
    Closed,
    #[error("no answer on the handover channel in time")]
    Timeout,
    #[error("handover channel: {0}")]
    Io(#[from] io::Error),
    #[error("bad handover message: {0}")]
    Wire(#[from] WireError),
    #[error("a handover message came with {got} descriptors, {want} expected")]
    Fds { got: usize, want: usize },
}

/// One end of the channel. (tokio's datagram type serves the seqpacket
/// socket: its readiness is what this needs, and every send and receive
/// goes through `sendmsg`/`recvmsg` here.)
pub(crate) struct Channel {
    sock: UnixDatagram,
}

/// A new socket pair: (this process's end, the successor's end). The
/// successor's end is not close-on-exec-safe by itself; it is handed to the
/// child as its standard input, which exec keeps.
pub(crate) fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?)
}

impl Channel {
    /// Serve `fd` (either end of [`pair`]). Must run inside the runtime.
    pub(crate) fn new(fd: OwnedFd) -> io::Result<Channel> {
        rustix::io::ioctl_fionbio(&fd, true)?;
        Ok(Channel { sock: UnixDatagram::from_std(std::os::unix::net::UnixDatagram::from(fd))? })
    }

    /// Send `m` with `fds` attached (as many as `m` names).
    pub(crate) async fn send(
        &self,
        m: &Message,
        fds: &[BorrowedFd<'_>],
        by: Instant,
    ) -> Result<(), ChannelError> {
        let bytes = wire::encode(m);
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        tokio::time::timeout_at(by, async {
            loop {
                self.sock.writable().await?;
                let mut control = SendAncillaryBuffer::new(&mut space);
                if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
                    return Err(ChannelError::Fds { got: fds.len(), want: MAX_FDS });
                }
                let iov = [IoSlice::new(&bytes)];
                let sent = self.sock.try_io(Interest::WRITABLE, || {
                    Ok(sendmsg(&self.sock, &iov, &mut control, SendFlags::NOSIGNAL)?)
                });
                match sent {
                    Ok(_) => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err(ChannelError::Closed),
                    Err(e) => return Err(ChannelError::Io(e)),
                }
            }
        })
        .await
        .map_err(|_| ChannelError::Timeout)?
    }

    /// Receive one message and the descriptors that came with it; the count
    /// must be what the message names.
    pub(crate) async fn recv(&self, by: Instant) -> Result<(Message, Vec<OwnedFd>), ChannelError> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let (n, fds) = tokio::time::timeout_at(by, async {
            loop {
                self.sock.readable().await?;
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let mut iov = [IoSliceMut::new(&mut buf)];
                let got = self.sock.try_io(Interest::READABLE, || {
                    Ok(recvmsg(&self.sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?)
                });
                match got {
                    Ok(msg) => {
                        let mut fds = Vec::new();
                        for c in control.drain() {
                            if let RecvAncillaryMessage::ScmRights(r) = c {
                                fds.extend(r);
                            }
                        }
                        if msg.flags.contains(ReturnFlags::TRUNC) || msg.flags.contains(ReturnFlags::CTRUNC) {
                            return Err(ChannelError::Io(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "a handover message was cut short",
                            )));
                        }
                        if msg.bytes == 0 && fds.is_empty() {
                            return Err(ChannelError::Closed);
                        }
                        return Ok((msg.bytes, fds));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(ChannelError::Closed),
                    Err(e) => return Err(ChannelError::Io(e)),
                }
            }
        })
        .await
        .map_err(|_| ChannelError::Timeout)??;
        let m = wire::decode(&buf[..n])?;
        if fds.len() != m.fd_count() {
            return Err(ChannelError::Fds { got: fds.len(), want: m.fd_count() });
        }
        Ok((m, fds))
    }
}
