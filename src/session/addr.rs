//! Who a connection is: the socket peer, the admitted client, the endpoint.
//!
//! Newtypes keep the two addresses apart: behind an NLB the socket peer is
//! the NLB itself, and only the PROXY header says who the client is. This
//! module holds types only; it must not read sockets or decide admission.

use std::net::SocketAddr;

/// The socket peer: with an NLB in front, the NLB's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PeerAddr(pub(crate) SocketAddr);

/// The client as admitted: the PROXY header's source when a header was
/// accepted, else the socket peer. IPv4-mapped IPv6 is shown as IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClientAddr(pub(crate) SocketAddr);

/// What is known about a connection once its header (if any) is read.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    /// The listener port it arrived on (the routing key's first half).
    pub(crate) port: u16,
    pub(crate) peer: PeerAddr,
    pub(crate) client: ClientAddr,
    /// The VPC endpoint id from the AWS PROXY v2 TLV (the routing key's
    /// second half, and what `endpoints` allowlists check).
    pub(crate) endpoint: Option<String>,
}

impl ConnInfo {
    /// A connection without a PROXY header: the peer is the client.
    pub(crate) fn unheaded(port: u16, peer: PeerAddr) -> ConnInfo {
        ConnInfo { port, peer, client: ClientAddr(peer.0), endpoint: None }
    }
}

/// An address as portgate shows and matches it: IPv4-mapped IPv6 (from a
/// dual-stack listener) becomes plain IPv4.
pub(crate) fn canonical(sa: SocketAddr) -> SocketAddr {
    SocketAddr::new(sa.ip().to_canonical(), sa.port())
}
