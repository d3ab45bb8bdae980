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
/// `extra_tlvs` in order. No checksum: see [`encode_v2_with_crc`].
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
    encode(command, addrs, vpc_endpoint, extra_tlvs, false)
}

/// [`encode_v2`], plus a CRC32C TLV ([`PP2_TYPE_CRC32C`]) as the last TLV,
/// holding the checksum of the whole header as `proxy-protocol.txt` says (so
/// the header's last 4 bytes are the checksum, big-endian). A CRC32C TLV in
/// `extra_tlvs` would be a second one, which [`parse`](super::parse)
/// refuses.
///
/// # Panics
///
/// As [`encode_v2`].
pub fn encode_v2_with_crc(
    command: Command,
    addrs: Option<(SocketAddr, SocketAddr)>,
    vpc_endpoint: Option<&str>,
    extra_tlvs: &[(u8, &[u8])],
) -> Vec<u8> {
    encode(command, addrs, vpc_endpoint, extra_tlvs, true)
}

fn encode(
    command: Command,
    addrs: Option<(SocketAddr, SocketAddr)>,
    vpc_endpoint: Option<&str>,
    extra_tlvs: &[(u8, &[u8])],
    crc: bool,
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
    if crc {
        // Zero for now: the checksum covers these bytes as zeros.
        tlv(PP2_TYPE_CRC32C, &[&[0; PP2_CRC32C_LEN]]);
    }

    let len = u16::try_from(block.len()).expect("PROXY v2 block longer than 65535 bytes");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&block);
    if crc {
        let sum = CASTAGNOLI.checksum(&out);
        let at = out.len() - PP2_CRC32C_LEN;
        out[at..].copy_from_slice(&sum.to_be_bytes());
    }
    out
}
