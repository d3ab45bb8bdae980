//! Encoders for both versions, for tests, benches and fuzzing (portgate
//! itself never sends a header).

use std::net::SocketAddr;

use super::*;

/// Encode a v1 header. `None`, or addresses of different families, give
/// `PROXY UNKNOWN\r\n`. IPv6 flow info and scope ids are not representable
/// and are dropped.
pub fn encode_v1(addrs: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    let line = match addrs {
        Some((SocketAddr::V4(s), SocketAddr::V4(d))) => {
            format!("PROXY TCP4 {} {} {} {}\r\n", s.ip(), d.ip(), s.port(), d.port())
        }
        Some((SocketAddr::V6(s), SocketAddr::V6(d))) => {
            format!("PROXY TCP6 {} {} {} {}\r\n", s.ip(), d.ip(), s.port(), d.port())
        }
        _ => "PROXY UNKNOWN\r\n".to_owned(),
    };
    line.into_bytes()
}

/// Encode a v2 header: TCP over IPv4 or IPv6 for `Some` addresses of one
/// family, `AF_UNSPEC` with no address block for `None` or mixed families.
/// The addresses are written for `LOCAL` too when given. The VPC endpoint id
/// (written verbatim, unvalidated) comes first as TLV 0xEA/0x01, followed by
/// `extra_tlvs` in order.
///
/// # Panics
///
/// If a TLV value is longer than 65535 bytes or the block after the 16-byte
/// preamble is (the format cannot express it); callers pass test data.
pub fn encode_v2(
    command: Command,
    addrs: Option<(SocketAddr, SocketAddr)>,
    vpc_endpoint: Option<&str>,
    extra_tlvs: &[(u8, &[u8])],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(V2_PREAMBLE_LEN + 36 + 64);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(
        0x20 | match command {
            Command::Local => 0,
            Command::Proxy => 1,
        },
    );
    let mut block = Vec::new();
    let family = match addrs {
        Some((SocketAddr::V4(s), SocketAddr::V4(d))) => {
            block.extend_from_slice(&s.ip().octets());
            block.extend_from_slice(&d.ip().octets());
            block.extend_from_slice(&s.port().to_be_bytes());
            block.extend_from_slice(&d.port().to_be_bytes());
            0x11
        }
        Some((SocketAddr::V6(s), SocketAddr::V6(d))) => {
            block.extend_from_slice(&s.ip().octets());
            block.extend_from_slice(&d.ip().octets());
            block.extend_from_slice(&s.port().to_be_bytes());
            block.extend_from_slice(&d.port().to_be_bytes());
            0x21
        }
        _ => 0x00,
    };
    out.push(family);

    let mut tlv = |kind: u8, parts: &[&[u8]]| {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let len = u16::try_from(len).expect("PROXY v2 TLV value longer than 65535 bytes");
        block.push(kind);
        block.extend_from_slice(&len.to_be_bytes());
        for part in parts {
            block.extend_from_slice(part);
        }
    };
    if let Some(id) = vpc_endpoint {
        tlv(PP2_TYPE_AWS, &[&[PP2_SUBTYPE_AWS_VPCE_ID], id.as_bytes()]);
    }
    for (kind, value) in extra_tlvs {
        tlv(*kind, &[value]);
    }

    let len = u16::try_from(block.len()).expect("PROXY v2 block longer than 65535 bytes");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&block);
    out
}
