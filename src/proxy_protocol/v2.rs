//! PROXY v2: the binary header (signature, command, family, address
//! block, TLVs).
//!
//! Pure parsing over bytes; see the parent module for the rules chosen.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use super::*;

/// `buf` agrees with the v2 signature on its first `min(len, 12)` bytes.
pub(super) fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> {
    let Some(&ver_cmd) = buf.get(12) else {
        return Ok(None);
    };
    let version = ver_cmd >> 4;
    if version != 2 {
        return Err(HeaderError::BadVersion(version));
    }
    let command = match ver_cmd & 0x0F {
        0 => Command::Local,
        1 => Command::Proxy,
        other => return Err(HeaderError::BadCommand(other)),
    };

    let Some(&family) = buf.get(13) else {
        return Ok(None);
    };
    // Bytes of the address block the family needs (LOCAL ignores the family).
    let addr_len = match command {
        Command::Local => 0,
        Command::Proxy => match family {
            0x00 => 0,
            0x11 => 12,
            0x21 => 36,
            0x31 => 216,
            0x12 | 0x22 | 0x32 => return Err(HeaderError::NotTcp(family)),
            other => return Err(HeaderError::BadFamily(other)),
        },
    };

    let (Some(&hi), Some(&lo)) = (buf.get(14), buf.get(15)) else {
        return Ok(None);
    };
    let block_len = usize::from(u16::from_be_bytes([hi, lo]));
    let total = V2_PREAMBLE_LEN + block_len;
    if total > MAX_HEADER_LEN {
        return Err(HeaderError::V2TooLong(total));
    }
    if block_len < addr_len {
        return Err(HeaderError::Malformed("v2: length is shorter than the address family requires"));
    }
    let Some(bytes) = buf.get(..total) else {
        return Ok(None);
    };
    let block = &bytes[V2_PREAMBLE_LEN..];

    if command == Command::Local {
        let header = Header { version: 2, command, source: None, destination: None, vpc_endpoint: None };
        return Ok(Some((header, total)));
    }

    let Some(addrs) = block.get(..addr_len) else {
        return Err(HeaderError::Malformed("v2: short address block"));
    };
    let (source, destination) = match family {
        0x11 => {
            let (src, dst, sport, dport) = v2_addr_fields::<4>(addrs)?;
            (
                Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(src), sport))),
                Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(dst), dport))),
            )
        }
        0x21 => {
            let (src, dst, sport, dport) = v2_addr_fields::<16>(addrs)?;
            (
                Some(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(src), sport, 0, 0))),
                Some(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(dst), dport, 0, 0))),
            )
        }
        _ => (None, None), // AF_UNSPEC, AF_UNIX
    };

    let tlvs_at = V2_PREAMBLE_LEN + addr_len;
    check_crc32c(bytes, tlvs_at)?;
    let vpc_endpoint = vpc_endpoint(bytes, tlvs_at)?;
    let header = Header { version: 2, command, source, destination, vpc_endpoint };
    Ok(Some((header, total)))
}

/// Split a v2 address block of `2 * N + 4` bytes into its four fields.
fn v2_addr_fields<const N: usize>(addrs: &[u8]) -> Result<([u8; N], [u8; N], u16, u16), HeaderError> {
    let err = || HeaderError::Malformed("v2: short address block");
    let array = |from: usize| -> Result<[u8; N], HeaderError> {
        addrs.get(from..from + N).and_then(|s| <[u8; N]>::try_from(s).ok()).ok_or_else(err)
    };
    let port = |from: usize| -> Result<u16, HeaderError> {
        addrs
            .get(from..from + 2)
            .and_then(|s| <[u8; 2]>::try_from(s).ok())
            .map(u16::from_be_bytes)
            .ok_or_else(err)
    };
    Ok((array(0)?, array(N)?, port(2 * N)?, port(2 * N + 2)?))
}

/// One TLV: its type, the offset of its value in the header, and the value.
type Tlv<'a> = (u8, usize, &'a [u8]);

/// The TLVs of `header` from offset `at` to its end, in order; an `Err` (and
/// then nothing more) where one runs past the end.
fn walk(header: &[u8], mut at: usize) -> impl Iterator<Item = Result<Tlv<'_>, HeaderError>> {
    std::iter::from_fn(move || {
        let rest = header.get(at..).filter(|r| !r.is_empty())?;
        let value_at = at + 3;
        at = header.len(); // stop after this one unless it is whole
        let Some(&[kind, hi, lo]) = rest.first_chunk::<3>() else {
            return Some(Err(HeaderError::BadTlv("TLV header runs past the end of the header")));
        };
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        let Some(value) = rest.get(3..3 + len) else {
            return Some(Err(HeaderError::BadTlv("TLV value runs past the end of the header")));
        };
        at = value_at + len;
        Some(Ok((kind, value_at, value)))
    })
}

/// Check the framing of the TLVs of `header` (a whole v2 header) that start
/// at `tlvs_at`, then the CRC32C TLV if there is one: exactly one, 4 bytes,
/// holding the CRC32C of `header` with those 4 bytes taken as zero.
fn check_crc32c(header: &[u8], tlvs_at: usize) -> Result<(), HeaderError> {
    // Framing first: a TLV that runs past the end makes the rest moot.
    walk(header, tlvs_at).try_for_each(|tlv| tlv.map(drop))?;
    let mut crc = None;
    for (kind, at, value) in walk(header, tlvs_at).flatten() {
        if kind != PP2_TYPE_CRC32C {
            continue;
        }
        let Ok(&received) = <&[u8; PP2_CRC32C_LEN]>::try_from(value) else {
            return Err(HeaderError::Crc32cLength(value.len()));
        };
        if crc.is_some() {
            return Err(HeaderError::BadTlv("more than one CRC32C TLV (0x03)"));
        }
        crc = Some((at, u32::from_be_bytes(received)));
    }
    let Some((at, received)) = crc else {
        return Ok(());
    };
    // `walk` found the 4 value bytes at `at`, so both slices exist.
    let before = header.get(..at).unwrap_or_default();
    let after = header.get(at + PP2_CRC32C_LEN..).unwrap_or_default();
    let mut digest = CASTAGNOLI.digest();
    digest.update(before);
    digest.update(&[0; PP2_CRC32C_LEN]);
    digest.update(after);
    let computed = digest.finalize();
    if computed == received {
        Ok(())
    } else {
        Err(HeaderError::Crc32cMismatch { received, computed })
    }
}

/// The AWS VPC endpoint id among the TLVs of `header` from `tlvs_at`, if
/// present. Their framing has been checked ([`check_crc32c`]).
fn vpc_endpoint(header: &[u8], tlvs_at: usize) -> Result<Option<String>, HeaderError> {
    let mut vpc_endpoint = None;
    for (kind, _, value) in walk(header, tlvs_at).flatten() {
        if kind != PP2_TYPE_AWS {
            continue;
        }
        if let Some((&PP2_SUBTYPE_AWS_VPCE_ID, id)) = value.split_first() {
            if vpc_endpoint.is_some() {
                return Err(HeaderError::BadTlv("more than one AWS VPC endpoint id TLV"));
            }
            if id.is_empty() || !id.iter().all(u8::is_ascii_graphic) {
                return Err(HeaderError::BadVpcEndpoint);
            }
            // Graphic ASCII is valid UTF-8.
            vpc_endpoint = Some(String::from_utf8_lossy(id).into_owned());
        }
    }
    Ok(vpc_endpoint)
}
