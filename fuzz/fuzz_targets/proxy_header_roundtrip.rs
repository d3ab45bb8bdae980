//! Structured: build a header from arbitrary fields, encode it with the
//! crate's encoders (v2 with or without a CRC32C TLV, the checksum right or
//! changed), parse it back (followed by arbitrary payload) and compare with
//! what the header should parse to. Every proper prefix of the encoding must
//! be `Ok(None)`.
#![no_main]

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use portgate::proxy_protocol::{
    encode_v1, encode_v2, encode_v2_with_crc, parse, Command, Header, HeaderError, MAX_HEADER_LEN,
    PP2_SUBTYPE_AWS_VPCE_ID, PP2_TYPE_AWS, PP2_TYPE_CRC32C,
};

/// Longest TLV value generated: eight of them can pass `MAX_HEADER_LEN`
/// (so `TooLong` is exercised) but never the 65535 bytes `encode_v2` can
/// express.
const MAX_TLV_VALUE: usize = 700;
const MAX_TLVS: usize = 8;
/// Longest VPC endpoint id generated.
const MAX_VPCE: usize = 300;

#[derive(Debug, Arbitrary)]
enum Addrs {
    None,
    V4([u8; 4], u16, [u8; 4], u16),
    V6([u8; 16], u16, [u8; 16], u16),
    /// Mixed families: encoded as v1 `UNKNOWN` / v2 `AF_UNSPEC`.
    Mixed([u8; 4], u16, [u8; 16], u16),
}

impl Addrs {
    fn pair(&self) -> Option<(SocketAddr, SocketAddr)> {
        match *self {
            Addrs::None => None,
            Addrs::V4(s, sp, d, dp) => {
                Some((SocketAddr::from((Ipv4Addr::from(s), sp)), SocketAddr::from((Ipv4Addr::from(d), dp))))
            }
            Addrs::V6(s, sp, d, dp) => {
                Some((SocketAddr::from((Ipv6Addr::from(s), sp)), SocketAddr::from((Ipv6Addr::from(d), dp))))
            }
            Addrs::Mixed(s, sp, d, dp) => {
                Some((SocketAddr::from((Ipv4Addr::from(s), sp)), SocketAddr::from((Ipv6Addr::from(d), dp))))
            }
        }
    }

    /// The pair a parser reports: mixed families are not representable.
    fn parsed(&self) -> Option<(SocketAddr, SocketAddr)> {
        match self {
            Addrs::Mixed(..) => None,
            _ => self.pair(),
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Input {
    v2: bool,
    proxy: bool,
    addrs: Addrs,
    /// Arbitrary text, so invalid endpoint ids (empty, spaces, non-ASCII)
    /// come up too.
    vpce: Option<String>,
    tlvs: Vec<(u8, Vec<u8>)>,
    /// v2: `None` for no CRC32C TLV; `Some(x)`: one, with the right checksum
    /// xor `x` (so `Some(0)` is right).
    crc: Option<u32>,
    payload: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let Input { v2, proxy, addrs, mut vpce, mut tlvs, crc, payload } = input;

    let (encoded, expected) = if v2 {
        if let Some(id) = &mut vpce {
            truncate_chars(id, MAX_VPCE);
        }
        tlvs.truncate(MAX_TLVS);
        for (kind, value) in &mut tlvs {
            value.truncate(MAX_TLV_VALUE);
            // Keep the endpoint id TLV unique: other AWS subtypes only.
            if *kind == PP2_TYPE_AWS && value.first() == Some(&PP2_SUBTYPE_AWS_VPCE_ID) {
                value[0] = 0x02;
            }
            // The only CRC32C TLV is the one `crc` asks for.
            if *kind == PP2_TYPE_CRC32C {
                *kind = 0x04;
            }
        }
        let tlv_refs: Vec<(u8, &[u8])> = tlvs.iter().map(|(k, v)| (*k, &v[..])).collect();
        let command = if proxy { Command::Proxy } else { Command::Local };
        let mut encoded = match crc {
            None => encode_v2(command.clone(), addrs.pair(), vpce.as_deref(), &tlv_refs),
            Some(_) => encode_v2_with_crc(command.clone(), addrs.pair(), vpce.as_deref(), &tlv_refs),
        };
        // The CRC32C TLV comes last: its value is the last 4 bytes.
        let mismatch = crc.filter(|&x| x != 0).map(|x| {
            let at = encoded.len() - 4;
            let computed = u32::from_be_bytes(encoded[at..].try_into().unwrap());
            let received = computed ^ x;
            encoded[at..].copy_from_slice(&received.to_be_bytes());
            HeaderError::Crc32cMismatch { received, computed }
        });
        let expected = if encoded.len() > MAX_HEADER_LEN {
            Err(HeaderError::V2TooLong(encoded.len()))
        } else if !proxy {
            // LOCAL: everything after the preamble is skipped unread.
            Ok(Header { version: 2, command, source: None, destination: None, vpc_endpoint: None })
        } else if let Some(e) = mismatch {
            // Judged before the endpoint id it covers.
            Err(e)
        } else if vpce.as_deref().is_some_and(|id| id.is_empty() || !id.bytes().all(|b| b.is_ascii_graphic()))
        {
            Err(HeaderError::BadVpcEndpoint)
        } else {
            let pair = addrs.parsed();
            Ok(Header {
                version: 2,
                command,
                source: pair.map(|p| p.0),
                destination: pair.map(|p| p.1),
                vpc_endpoint: vpce,
            })
        };
        (encoded, expected)
    } else {
        let pair = addrs.parsed();
        let expected = Header {
            version: 1,
            command: Command::Proxy,
            source: pair.map(|p| p.0),
            destination: pair.map(|p| p.1),
            vpc_endpoint: None,
        };
        (encode_v1(addrs.pair()), Ok(expected))
    };

    let mut bytes = encoded.clone();
    bytes.extend_from_slice(&payload);
    match expected {
        Ok(header) => {
            assert_eq!(parse(&bytes), Ok(Some((header, encoded.len()))), "{encoded:?}");
            for k in 0..encoded.len() {
                assert_eq!(parse(&encoded[..k]), Ok(None), "prefix {k} of {encoded:?}");
            }
        }
        Err(e) => assert_eq!(parse(&bytes), Err(e), "{encoded:?}"),
    }
});

fn truncate_chars(s: &mut String, max: usize) {
    if let Some((i, _)) = s.char_indices().nth(max) {
        s.truncate(i);
    }
}
