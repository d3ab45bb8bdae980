//! PROXY protocol v1 (text) and v2 (binary) header parsing, after HAProxy's
//! `proxy-protocol.txt`.
//!
//! This module owns one thing: turning the first bytes a connection sent into
//! a typed [`Header`] (or a reason to reject the connection), plus encoders
//! for tests, benches and fuzzing. [`parse`] is incremental: call it with
//! everything received so far; it says "complete, `n` bytes", "valid prefix,
//! read more" or "can never become a header".
//!
//! It must not do I/O, hold state between calls, allocate in proportion to
//! attacker-chosen lengths (the only allocation is the VPC endpoint id, which
//! is bounded by [`MAX_HEADER_LEN`]), or panic on any input. Timeouts, the
//! `trusted` check and what a `LOCAL` header means for the connection belong
//! to the caller.
//!
//! Decisions where the HAProxy text leaves room:
//! - v1 is strict: `PROXY` SP proto SP src SP dst SP sport SP dport CRLF with
//!   single spaces, the CRLF within [`V1_MAX_LEN`] (107) bytes; ports are
//!   decimal 0 to 65535 without leading zeros (`0` itself is fine, `00080`
//!   is not) or signs; addresses must be of the announced family (`TCP4`
//!   takes only dotted-quad IPv4 whose octets are 0 to 255 without leading
//!   zeros, `TCP6` only IPv6). `PROXY UNKNOWN` may be followed by anything
//!   except CR/LF up to the CRLF; its addresses are ignored (both `None`).
//!   A bare LF, or a CR not followed by LF, is an error.
//! - v2 `LOCAL`: the family byte, address block and TLVs are skipped by the
//!   length field without being looked at (NLB health checks may send no
//!   address block at all), so a CRC32C TLV in a `LOCAL` header is not
//!   verified either, as in HAProxy. A `LOCAL` header only ever closes the
//!   connection without dialing.
//! - v2 `PROXY`: only TCP is accepted (UDP families are rejected); for
//!   `AF_UNSPEC` and `AF_UNIX` the addresses are `None`. The bytes after the
//!   family's address block (0 bytes for `AF_UNSPEC`) are parsed as TLVs for
//!   every family. Only AWS type 0xEA subtype 0x01 (VPC endpoint id) and the
//!   CRC32C TLV (type 0x03) are interpreted:
//!   - the endpoint id must be non-empty, graphic ASCII (0x21..=0x7E), and
//!     may appear at most once;
//!   - a CRC32C TLV must be 4 bytes long, may appear at most once, and must
//!     hold (big-endian) the CRC32C (Castagnoli, RFC 4960 appendix B) of the
//!     whole header, preamble to last TLV, with its own 4 value bytes taken as
//!     zero ([`HeaderError::Crc32cMismatch`], [`HeaderError::Crc32cLength`]).
//!     A header without one is accepted unchecked.
//!
//!   A header is judged in this order: TLV framing (lengths that run past
//!   the end), then the CRC32C TLV's length and count, then the checksum,
//!   then the endpoint id: once the checksum fails, nothing it covers is
//!   worth reporting on.
//! - v2 headers longer than [`MAX_HEADER_LEN`] are refused as soon as the
//!   length field arrives ([`HeaderError::V2TooLong`]).
//! - Errors are reported as early as possible, and feeding bytes one at a time
//!   yields the same result (header or error) as parsing the whole buffer.

mod encode;
mod v1;
mod v2;

pub use encode::{encode_v1, encode_v2, encode_v2_with_crc};

use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

/// Largest header accepted: v1 is at most 107 bytes ([`V1_MAX_LEN`]); a v2
/// header (16-byte preamble + address block + TLVs) longer than this is
/// rejected as [`HeaderError::V2TooLong`].
///
/// AWS NLB headers (IPv6 addresses plus the VPC endpoint TLV) stay well below
/// 200 bytes, so 4 KiB leaves room for other senders' TLVs (SSL, CRC32C, ...)
/// while bounding what a caller must buffer per connection before it can
/// decide: the v2 length field alone would allow 65,551 bytes.
pub const MAX_HEADER_LEN: usize = 4096;

/// Longest v1 header, CRLF included, per the HAProxy specification.
pub const V1_MAX_LEN: usize = 107;

/// The 12-byte signature every v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// v1 headers start with this (including the space).
const V1_PREFIX: &[u8; 6] = b"PROXY ";

/// v2 preamble: signature, version/command, family/protocol, length.
const V2_PREAMBLE_LEN: usize = 16;

/// AWS TLV carrying VPC endpoint information; subtype 0x01 is the endpoint id.
pub const PP2_TYPE_AWS: u8 = 0xEA;
/// Subtype of [`PP2_TYPE_AWS`] whose remaining value is the VPC endpoint id.
pub const PP2_SUBTYPE_AWS_VPCE_ID: u8 = 0x01;
/// TLV carrying the CRC32C of the whole v2 header (4 bytes, big-endian).
pub const PP2_TYPE_CRC32C: u8 = 0x03;
/// Length of a [`PP2_TYPE_CRC32C`] TLV's value.
const PP2_CRC32C_LEN: usize = 4;

/// CRC32C (Castagnoli; the catalogue calls it CRC-32/ISCSI: reflected
/// polynomial 0x1EDC6F41, init and final xor 0xFFFFFFFF), the checksum of
/// the v2 CRC32C TLV.
///
/// From the `crc` crate rather than hand-rolled or `crc32c`: it is the
/// widely used generic CRC crate (no `unsafe`, `#![forbid(unsafe_code)]`, no
/// build script, one dependency, `crc-catalog`, which only holds the
/// parameters), its 1 KiB table is built at compile time, and a header is at
/// most 4 KiB checked once per connection, so the SSE4.2 path of `crc32c` (a
/// build script and `unsafe` intrinsics) buys nothing here. The unit tests
/// check it against a known answer and a bit-by-bit reference.
const CASTAGNOLI: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// The v2 command. v1 headers are always [`Command::Proxy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// The connection was made by the proxy itself (e.g. a load balancer
    /// health check); addresses, if any, are meaningless.
    Local,
    /// The connection is relayed on behalf of the client in `source`.
    Proxy,
}

/// A parsed PROXY protocol header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 1 or 2.
    pub version: u8,
    /// v1 is always `Proxy` (v1 `UNKNOWN` is `Proxy` with both addresses `None`).
    pub command: Command,
    /// The original client. `None` for `LOCAL`, v1 `UNKNOWN`, v2 `AF_UNSPEC`
    /// and `AF_UNIX`: the socket peer is then the client.
    pub source: Option<SocketAddr>,
    /// The address the client connected to; `None` exactly when `source` is.
    pub destination: Option<SocketAddr>,
    /// AWS TLV 0xEA subtype 0x01: the VPC endpoint id the connection came
    /// through, e.g. `vpce-0a1b2c3d4e5f67890`. Always `None` for v1 and `LOCAL`.
    pub vpc_endpoint: Option<String>,
}

/// Why the bytes received can never become a valid header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Neither a v1 (`PROXY `) nor a v2 signature.
    #[error("connection did not start with a PROXY protocol header")]
    NotProxy,
    /// v1 line without CRLF within [`V1_MAX_LEN`] bytes.
    #[error("PROXY v1 header too long: no CRLF within {V1_MAX_LEN} bytes")]
    TooLong,
    /// v2 header (preamble included) whose length field makes it longer
    /// than [`MAX_HEADER_LEN`]; the value is the announced total length.
    #[error("PROXY v2 header too long: {0} bytes announced, at most {MAX_HEADER_LEN} accepted")]
    V2TooLong(usize),
    /// v2 version nibble other than 2.
    #[error("PROXY v2 header has unsupported version {0} (expected 2)")]
    BadVersion(u8),
    /// v2 command nibble other than 0 (LOCAL) or 1 (PROXY).
    #[error("PROXY v2 header has unknown command {0} (expected 0 LOCAL or 1 PROXY)")]
    BadCommand(u8),
    /// v2 family/protocol byte that the specification does not define.
    #[error("PROXY v2 header has invalid address family/protocol byte {0:#04x}")]
    BadFamily(u8),
    /// v2 `PROXY` header for a UDP (datagram) connection.
    #[error("PROXY v2 header announces a UDP connection (family byte {0:#04x}); only TCP is supported")]
    NotTcp(u8),
    /// Syntax error (v1) or inconsistent structure (v2); the text says which.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    /// A v2 TLV that is truncated or not allowed; the text says which.
    #[error("malformed PROXY v2 TLV: {0}")]
    BadTlv(&'static str),
    /// The AWS VPC endpoint id TLV is empty or not graphic ASCII.
    #[error("AWS VPC endpoint id TLV (0xEA/0x01) is empty or not printable ASCII")]
    BadVpcEndpoint,
    /// The v2 CRC32C TLV's value is not the header's checksum.
    #[error(
        "PROXY v2 header checksum mismatch: CRC32C TLV (0x03) holds {received:#010x}, \
         the header's CRC32C is {computed:#010x}"
    )]
    Crc32cMismatch {
        /// The value the TLV carries.
        received: u32,
        /// The checksum of the bytes received (TLV value taken as zero).
        computed: u32,
    },
    /// A v2 CRC32C TLV whose value is not 4 bytes long; the value is its length.
    #[error("PROXY v2 CRC32C TLV (0x03) has a bad length: {0} bytes, expected 4")]
    Crc32cLength(usize),
}

/// Parse the start of `buf`.
///
/// - `Ok(None)`: the bytes so far are a valid prefix of a header; read more
///   (the caller enforces a timeout, and at most [`MAX_HEADER_LEN`] bytes are
///   ever needed).
/// - `Ok(Some((header, consumed)))`: a complete header of `consumed` bytes
///   (`consumed <= buf.len()`); bytes after it are payload, even if they are
///   another header.
/// - `Err(_)`: can never become a valid header; reject now. Errors are
///   detected as soon as the offending byte is in `buf`.
pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> {
    match buf.first() {
        None => Ok(None),
        Some(b'P') => {
            check_prefix(buf, V1_PREFIX)?;
            if buf.len() < V1_PREFIX.len() {
                return Ok(None);
            }
            v1::parse(buf)
        }
        Some(b'\r') => {
            check_prefix(buf, &V2_SIGNATURE)?;
            v2::parse(buf)
        }
        Some(_) => Err(HeaderError::NotProxy),
    }
}

/// `Err(NotProxy)` unless `buf` and `expected` agree on their common length.
fn check_prefix(buf: &[u8], expected: &[u8]) -> Result<(), HeaderError> {
    let n = buf.len().min(expected.len());
    if buf[..n] == expected[..n] {
        Ok(())
    } else {
        Err(HeaderError::NotProxy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn hdr(version: u8, command: Command, addrs: Option<(&str, &str)>, vpc: Option<&str>) -> Header {
        Header {
            version,
            command,
            source: addrs.map(|(s, _)| sa(s)),
            destination: addrs.map(|(_, d)| sa(d)),
            vpc_endpoint: vpc.map(str::to_owned),
        }
    }

    /// Feed `bytes` one byte at a time until `parse` decides.
    fn feed(bytes: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> {
        for n in 0..=bytes.len() {
            match parse(&bytes[..n]) {
                Ok(None) => continue,
                decided => return decided,
            }
        }
        Ok(None)
    }

    /// The properties every input must satisfy, whatever its verdict.
    fn check_consistency(bytes: &[u8]) {
        let full = parse(bytes);
        assert_eq!(feed(bytes), full, "byte-by-byte differs for {bytes:?}");
        if let Ok(Some((_, n))) = &full {
            assert!(*n <= bytes.len());
            for k in 0..*n {
                assert_eq!(parse(&bytes[..k]), Ok(None), "prefix {k} of {bytes:?}");
            }
        }
    }

    fn ok(bytes: &[u8], expected: Header) {
        check_consistency(bytes);
        assert_eq!(parse(bytes), Ok(Some((expected, bytes.len()))), "{bytes:?}");
    }

    fn err(bytes: &[u8], expected: HeaderError) {
        check_consistency(bytes);
        assert_eq!(parse(bytes), Err(expected), "{:?}", String::from_utf8_lossy(bytes));
    }

    fn malformed(bytes: &[u8]) {
        check_consistency(bytes);
        assert!(
            matches!(parse(bytes), Err(HeaderError::Malformed(_))),
            "{:?} => {:?}",
            String::from_utf8_lossy(bytes),
            parse(bytes)
        );
    }

    const VPCE: &str = "vpce-0a1b2c3d4e5f67890";

    #[test]
    fn v1_valid() {
        let v4 = Some(("192.168.0.1:56324", "10.0.0.5:443"));
        ok(b"PROXY TCP4 192.168.0.1 10.0.0.5 56324 443\r\n", hdr(1, Command::Proxy, v4, None));
        ok(
            b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\n",
            hdr(1, Command::Proxy, Some(("[2001:db8::1]:65535", "[::1]:0")), None),
        );
        ok(
            b"PROXY TCP6 ::ffff:10.1.2.3 fe80::a:b 1 2\r\n",
            hdr(1, Command::Proxy, Some(("[::ffff:10.1.2.3]:1", "[fe80::a:b]:2")), None),
        );
        ok(b"PROXY UNKNOWN\r\n", hdr(1, Command::Proxy, None, None));
        ok(
            b"PROXY UNKNOWN ffff:f:f:f:f:f:f:f ffff:f:f:f:f:f:f:f 65535 65535\r\n",
            hdr(1, Command::Proxy, None, None),
        );
        ok(b"PROXY UNKNOWN \x00junk  x\r\n", hdr(1, Command::Proxy, None, None));
        // Zero itself is a port and an octet; zeros inside a number are fine.
        ok(
            b"PROXY TCP4 0.0.0.0 10.100.0.200 0 10080\r\n",
            hdr(1, Command::Proxy, Some(("0.0.0.0:0", "10.100.0.200:10080")), None),
        );
        // IPv6 groups may have leading zeros (RFC 4291 text form).
        ok(
            b"PROXY TCP6 2001:0db8::0001 ::1 1 2\r\n",
            hdr(1, Command::Proxy, Some(("[2001:db8::1]:1", "[::1]:2")), None),
        );
        // UNKNOWN ignores the rest of the line, leading zeros and all.
        ok(b"PROXY UNKNOWN 01.2.3.4 5.6.7.8 00080 65536\r\n", hdr(1, Command::Proxy, None, None));
        // Longest legal line: exactly 107 bytes.
        let line = format!("PROXY TCP6 {0} {0} 65535 65535\r\n", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff");
        assert_eq!(line.len(), V1_MAX_LEN - 3);
        ok(
            line.as_bytes(),
            hdr(
                1,
                Command::Proxy,
                Some((
                    "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
                    "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
                )),
                None,
            ),
        );
        let unknown =
            format!("PROXY UNKNOWN {0} {0} 65535 65535\r\n", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff");
        assert_eq!(unknown.len(), V1_MAX_LEN);
        ok(unknown.as_bytes(), hdr(1, Command::Proxy, None, None));
    }

    #[test]
    fn v1_invalid() {
        let cases: &[&[u8]] = &[
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 000080 2\r\n",
            // Leading zeros in ports, even with a value in range.
            b"PROXY TCP4 1.2.3.4 5.6.7.8 00080 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 02\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 00 0\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 0 00\r\n",
            b"PROXY TCP6 ::1 ::2 022 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
            b"PROXY TCP6 ::1 ::2 65536 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
            b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
            b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r2\r\n",
            b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
            // Leading zeros in IPv4 octets, source or destination.
            b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.02.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.00 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 005.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.08 1 2\r\n",
            b"PROXY TCP6 ::ffff:1.2.3.04 ::1 1 2\r\n",
            // Double spaces anywhere.
            b"PROXY TCP4 1.2.3.4 5.6.7.8  1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1  2\r\n",
            b"PROXY TCP6  ::1 ::2 1 2\r\n",
            b"PROXY  UNKNOWN\r\n",
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP6 ::1 1.2.3.4 1 2\r\n",
            b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
            b"PROXY TCP6 ::g ::1 1 2\r\n",
            b"PROXY TCP4\r\n",
            b"PROXY TCP4 \r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UNKNOWNX\r\n",
            b"PROXY UNKNOWN\n",
            b"PROXY UNKNOWN x\ry\r\n",
            b"PROXY \r\n",
            b"PROXY UNKNOWN\rX",
        ];
        for case in cases {
            malformed(case);
        }
    }

    #[test]
    fn v1_early_rejection() {
        // Decided before any CRLF arrives.
        for bytes in [
            &b"PROXY X"[..],
            b"PROXY TCP4 1.2.3.4a",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 123456",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 70000",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ",
            b"PROXY TCP4  ",
            // Leading zeros, caught at the digit after the zero.
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 00",
            b"PROXY TCP4 01",
            b"PROXY TCP4 1.2.00",
            b"PROXY TCP4 1.2.3.4 09",
            b"PROXY TCP4 1.2.3.256",
            b"PROXY TCP4 1.2.3.4.",
            b"PROXY TCP4 1..",
        ] {
            malformed(bytes);
        }
        for bytes in [&b"XPROXY"[..], b"PROXX", b"GET / HTTP/1.1\r\n", b"proxy ", b"\x16\x03\x01"] {
            err(bytes, HeaderError::NotProxy);
        }
        // No CRLF within 107 bytes.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX_LEN, b'x');
        err(&long, HeaderError::TooLong);
        long.extend_from_slice(b"\r\n");
        err(&long, HeaderError::TooLong);
        // CRLF ending at byte 108.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX_LEN - 1, b'x');
        long.extend_from_slice(b"\r\n");
        err(&long, HeaderError::TooLong);
        // Valid prefixes stay undecided.
        for bytes in [
            &b""[..],
            b"P",
            b"PROXY",
            b"PROXY ",
            b"PROXY T",
            b"PROXY UNK",
            b"PROXY TCP6 ",
            b"PROXY TCP6 ::",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 6553",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 0",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 0 0",
            b"PROXY TCP4 0",
            b"PROXY TCP4 0.",
            b"PROXY TCP4 0.0.0.0 25",
        ] {
            assert_eq!(parse(bytes), Ok(None), "{bytes:?}");
        }
    }

    fn v2_raw(ver_cmd: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut v = V2_SIGNATURE.to_vec();
        v.push(ver_cmd);
        v.push(family);
        v.extend_from_slice(&(block.len() as u16).to_be_bytes());
        v.extend_from_slice(block);
        v
    }

    fn v4_block() -> Vec<u8> {
        let mut b = vec![10, 0, 1, 2, 172, 31, 31, 84];
        b.extend_from_slice(&40000u16.to_be_bytes());
        b.extend_from_slice(&8022u16.to_be_bytes());
        b
    }

    fn aws_tlv(id: &[u8]) -> Vec<u8> {
        let mut t = vec![0xEA];
        t.extend_from_slice(&(id.len() as u16 + 1).to_be_bytes());
        t.push(0x01);
        t.extend_from_slice(id);
        t
    }

    #[test]
    fn v2_valid() {
        let v4 = Some(("10.0.1.2:40000", "172.31.31.84:8022"));
        ok(&v2_raw(0x21, 0x11, &v4_block()), hdr(2, Command::Proxy, v4, None));

        let mut block = v4_block();
        block.extend_from_slice(&aws_tlv(VPCE.as_bytes()));
        ok(&v2_raw(0x21, 0x11, &block), hdr(2, Command::Proxy, v4, Some(VPCE)));

        // Other TLVs (NOOP, ALPN, SSL, AWS with another subtype, empty AWS)
        // are skipped around the endpoint id.
        let mut block = v4_block();
        block.extend_from_slice(&[0x04, 0, 3, 0, 0, 0]); // NOOP
        block.extend_from_slice(&[0x01, 0, 2, b'h', b'2']); // ALPN
        block.extend_from_slice(&[0xEA, 0, 3, 0x02, b'x', 0xFF]); // AWS, other subtype
        block.extend_from_slice(&[0xEA, 0, 0]); // AWS, no subtype
        block.extend_from_slice(&aws_tlv(VPCE.as_bytes()));
        block.extend_from_slice(&[0x20, 0, 5, 1, 0, 0, 0, 0]); // SSL
        block.extend_from_slice(&[0x30, 0, 0]); // NETNS, empty
        ok(&v2_raw(0x21, 0x11, &block), hdr(2, Command::Proxy, v4, Some(VPCE)));

        let mut block = vec![0x20, 0x01, 0x0d, 0xb8];
        block.extend_from_slice(&[0; 11]);
        block.push(1);
        block.extend_from_slice(&[0; 15]);
        block.push(2);
        block.extend_from_slice(&[0xFF, 0xFF, 0, 22]);
        ok(
            &v2_raw(0x21, 0x21, &block),
            hdr(2, Command::Proxy, Some(("[2001:db8::1]:65535", "[::2]:22")), None),
        );

        // PROXY with AF_UNSPEC or AF_UNIX: no addresses; TLVs still read.
        ok(&v2_raw(0x21, 0x00, &[]), hdr(2, Command::Proxy, None, None));
        ok(&v2_raw(0x21, 0x00, &aws_tlv(VPCE.as_bytes())), hdr(2, Command::Proxy, None, Some(VPCE)));
        let mut unix = vec![b'/'; 216];
        unix.extend_from_slice(&[0x04, 0, 0]);
        ok(&v2_raw(0x21, 0x31, &unix), hdr(2, Command::Proxy, None, None));
    }

    #[test]
    fn v2_local() {
        let local = hdr(2, Command::Local, None, None);
        // NLB HTTP health check: no address block.
        ok(&v2_raw(0x20, 0x00, &[]), local.clone());
        ok(&v2_raw(0x20, 0x11, &[]), local.clone());
        ok(&v2_raw(0x20, 0x11, &v4_block()), local.clone());
        // Family, address block and TLVs are not looked at.
        ok(&v2_raw(0x20, 0x12, &[1, 2, 3]), local.clone());
        ok(&v2_raw(0x20, 0xFF, &[0xEA, 0xFF, 0xFF]), local.clone());
        let mut block = v4_block();
        block.extend_from_slice(&aws_tlv(b"bad id"));
        ok(&v2_raw(0x20, 0x11, &block), local);
    }

    #[test]
    fn v2_invalid() {
        let v4 = v4_block();
        err(&v2_raw(0x11, 0x11, &v4), HeaderError::BadVersion(1));
        err(&v2_raw(0x31, 0x11, &v4), HeaderError::BadVersion(3));
        err(&v2_raw(0x22, 0x11, &v4), HeaderError::BadCommand(2));
        err(&v2_raw(0x2F, 0x11, &v4), HeaderError::BadCommand(15));
        for fam in [0x12, 0x22, 0x32] {
            err(&v2_raw(0x21, fam, &v4), HeaderError::NotTcp(fam));
        }
        for fam in [0x01, 0x10, 0x13, 0x41, 0xFF, 0x02] {
            err(&v2_raw(0x21, fam, &v4), HeaderError::BadFamily(fam));
        }
        // Address block shorter than the family needs.
        malformed(&v2_raw(0x21, 0x11, &v4[..11]));
        malformed(&v2_raw(0x21, 0x21, &[0; 35]));
        malformed(&v2_raw(0x21, 0x31, &[0; 215]));
        // TLVs running past the end.
        for tail in [&[0xEA][..], &[0x04, 0], &[0x04, 0, 1], &[0xEA, 0, 30, 1, b'v']] {
            let mut block = v4.clone();
            block.extend_from_slice(tail);
            let bytes = v2_raw(0x21, 0x11, &block);
            check_consistency(&bytes);
            assert!(matches!(parse(&bytes), Err(HeaderError::BadTlv(_))), "{tail:?}");
        }
        // Bad endpoint ids.
        for id in [&b""[..], b"vpce 123", b"vpce-\x00", b"vpce-\xc3\xa9", b"\x7f"] {
            let mut block = v4.clone();
            block.extend_from_slice(&aws_tlv(id));
            err(&v2_raw(0x21, 0x11, &block), HeaderError::BadVpcEndpoint);
        }
        // Two endpoint ids.
        let mut block = v4.clone();
        block.extend_from_slice(&aws_tlv(VPCE.as_bytes()));
        block.extend_from_slice(&aws_tlv(VPCE.as_bytes()));
        let bytes = v2_raw(0x21, 0x11, &block);
        check_consistency(&bytes);
        assert!(matches!(parse(&bytes), Err(HeaderError::BadTlv(_))));
        // Signature mismatch.
        err(b"\r\n\r\n\0\r\nQUIX", HeaderError::NotProxy);
        err(b"\r\r", HeaderError::NotProxy);
    }

    #[test]
    fn v2_too_long_decided_at_preamble() {
        let mut preamble = V2_SIGNATURE.to_vec();
        preamble.extend_from_slice(&[0x21, 0x11]);
        let max_block = (MAX_HEADER_LEN - V2_PREAMBLE_LEN) as u16;
        let mut over = preamble.clone();
        over.extend_from_slice(&(max_block + 1).to_be_bytes());
        assert_eq!(parse(&over), Err(HeaderError::V2TooLong(MAX_HEADER_LEN + 1)));
        let mut huge = preamble.clone();
        huge.extend_from_slice(&[0xFF, 0xFF]);
        assert_eq!(parse(&huge), Err(HeaderError::V2TooLong(16 + 65535)));
        // LOCAL too.
        huge[12] = 0x20;
        assert_eq!(parse(&huge), Err(HeaderError::V2TooLong(16 + 65535)));
        // The whole header too, with a valid CRC32C at the end: decided at
        // the length field, so all prefixes agree.
        let pad = vec![0u8; MAX_HEADER_LEN];
        let bytes = encode_v2_with_crc(Command::Proxy, None, None, &[(0x04, &pad[..4071])]);
        assert_eq!(bytes.len(), MAX_HEADER_LEN + 1);
        err(&bytes, HeaderError::V2TooLong(MAX_HEADER_LEN + 1));
        assert_eq!(
            HeaderError::V2TooLong(4097).to_string(),
            "PROXY v2 header too long: 4097 bytes announced, at most 4096 accepted"
        );
        // Exactly MAX_HEADER_LEN is fine.
        let mut block = v4_block();
        let pad = usize::from(max_block) - block.len() - 3;
        block.extend_from_slice(&[0x04]);
        block.extend_from_slice(&(pad as u16).to_be_bytes());
        block.resize(usize::from(max_block), 0);
        let bytes = v2_raw(0x21, 0x11, &block);
        assert_eq!(bytes.len(), MAX_HEADER_LEN);
        assert!(matches!(parse(&bytes), Ok(Some((_, MAX_HEADER_LEN)))));
        assert_eq!(parse(&bytes[..MAX_HEADER_LEN - 1]), Ok(None));
    }

    #[test]
    fn only_first_header_counts() {
        let first =
            encode_v2(Command::Proxy, Some((sa("10.0.0.1:1000"), sa("10.0.0.2:22"))), Some(VPCE), &[]);
        let second =
            encode_v2(Command::Proxy, Some((sa("6.6.6.6:1"), sa("6.6.6.7:2"))), Some("vpce-evil"), &[]);
        let mut bytes = first.clone();
        bytes.extend_from_slice(&second);
        bytes.extend_from_slice(b"SSH-2.0-OpenSSH_9.6\r\n");
        let (h, n) = parse(&bytes).unwrap().unwrap();
        assert_eq!(n, first.len());
        assert_eq!(h.source, Some(sa("10.0.0.1:1000")));
        assert_eq!(h.vpc_endpoint.as_deref(), Some(VPCE));

        let v1 = b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\n";
        let mut bytes = v1.to_vec();
        bytes.extend_from_slice(b"PROXY TCP4 3.3.3.3 4.4.4.4 3 4\r\n");
        let (h, n) = parse(&bytes).unwrap().unwrap();
        assert_eq!(n, v1.len());
        assert_eq!(h.source, Some(sa("1.1.1.1:1")));
        // Payload right after a v1 header, without waiting for more.
        let mut bytes = v1.to_vec();
        bytes.push(0);
        assert_eq!(parse(&bytes).unwrap().unwrap().1, v1.len());
    }

    #[test]
    fn encoders() {
        assert_eq!(encode_v1(None), b"PROXY UNKNOWN\r\n");
        assert_eq!(encode_v1(Some((sa("1.2.3.4:5"), sa("[::1]:6")))), b"PROXY UNKNOWN\r\n");
        assert_eq!(
            encode_v1(Some((sa("1.2.3.4:5"), sa("5.6.7.8:6")))),
            b"PROXY TCP4 1.2.3.4 5.6.7.8 5 6\r\n"
        );
        let mixed = encode_v2(Command::Proxy, Some((sa("1.2.3.4:5"), sa("[::1]:6"))), None, &[]);
        assert_eq!(mixed, v2_raw(0x21, 0x00, &[]));
        let local = encode_v2(Command::Local, None, None, &[]);
        assert_eq!(local, v2_raw(0x20, 0x00, &[]));
    }

    #[test]
    fn error_messages_are_readable() {
        assert_eq!(
            HeaderError::NotProxy.to_string(),
            "connection did not start with a PROXY protocol header"
        );
        assert_eq!(
            HeaderError::BadFamily(0x41).to_string(),
            "PROXY v2 header has invalid address family/protocol byte 0x41"
        );
        assert_eq!(HeaderError::TooLong.to_string(), "PROXY v1 header too long: no CRLF within 107 bytes");
        assert!(HeaderError::V2TooLong(5000).to_string().contains("4096"));
        assert_eq!(
            HeaderError::Crc32cMismatch { received: 0x01020304, computed: 0xE3069283 }.to_string(),
            "PROXY v2 header checksum mismatch: CRC32C TLV (0x03) holds 0x01020304, \
             the header's CRC32C is 0xe3069283"
        );
        assert_eq!(
            HeaderError::Crc32cLength(5).to_string(),
            "PROXY v2 CRC32C TLV (0x03) has a bad length: 5 bytes, expected 4"
        );
    }

    // ---- CRC32C (PP2_TYPE_CRC32C) ----

    /// CRC32C bit by bit (reflected polynomial 0x82F63B78, RFC 4960 appendix
    /// B), written apart from the crate used by the parser and encoder.
    fn crc32c_reference(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
            }
        }
        !crc
    }

    /// A v2 header whose TLVs are `before`, a CRC32C TLV holding `crc` (or,
    /// for `None`, the right checksum by [`crc32c_reference`]), then `after`.
    fn v2_crc(
        ver_cmd: u8,
        family: u8,
        addrs: &[u8],
        before: &[u8],
        after: &[u8],
        crc: Option<u32>,
    ) -> Vec<u8> {
        let mut block = addrs.to_vec();
        block.extend_from_slice(before);
        block.extend_from_slice(&[PP2_TYPE_CRC32C, 0, 4, 0, 0, 0, 0]);
        let at = V2_PREAMBLE_LEN + block.len() - 4;
        block.extend_from_slice(after);
        let mut bytes = v2_raw(ver_cmd, family, &block);
        let sum = crc.unwrap_or_else(|| crc32c_reference(&bytes));
        bytes[at..at + 4].copy_from_slice(&sum.to_be_bytes());
        bytes
    }

    fn v6_block() -> Vec<u8> {
        let mut b = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).octets().to_vec();
        b.extend_from_slice(&Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x84).octets());
        b.extend_from_slice(&40000u16.to_be_bytes());
        b.extend_from_slice(&8022u16.to_be_bytes());
        b
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn crc32c_known_answers() {
        // The catalogue's check value, and RFC 3720 appendix B.4's vectors.
        let vectors: &[(&[u8], u32)] = &[
            (b"123456789", 0xE306_9283),
            (b"", 0),
            (&[0; 32], 0x8A91_36AA),
            (&[0xFF; 32], 0x62A8_AB43),
            (&core::array::from_fn::<u8, 32, _>(|i| i as u8), 0x46DD_794E),
            (&core::array::from_fn::<u8, 32, _>(|i| 31 - i as u8), 0x113F_DB5C),
        ];
        for &(bytes, want) in vectors {
            assert_eq!(CASTAGNOLI.checksum(bytes), want, "{bytes:?}");
            assert_eq!(crc32c_reference(bytes), want, "reference, {bytes:?}");
        }
        // The two agree on headers, too.
        let header = encode_v2(Command::Proxy, Some((sa("10.0.1.2:40000"), sa("[::1]:1"))), Some(VPCE), &[]);
        assert_eq!(CASTAGNOLI.checksum(&header), crc32c_reference(&header));
    }

    #[test]
    fn v2_crc32c_independent_vectors() {
        // Checksummed by a third implementation (Python's `crcmod`,
        // "crc-32c"): NLB-like IPv6 with the CRC32C TLV first, then the
        // endpoint id; and IPv4 with only the CRC32C TLV.
        let nlb = hex("0d0a0d0a000d0a515549540a2121004520010db800000000000000000000000120010db8000000000000\
             0000000000849c401f5603000400000000ea001701767063652d3061316232633364346535663637383930");
        let mut sealed = nlb.clone();
        sealed[55..59].copy_from_slice(&0x8C32_F89Fu32.to_be_bytes());
        let v6 = Some(("[2001:db8::1]:40000", "[2001:db8::84]:8022"));
        ok(&sealed, hdr(2, Command::Proxy, v6, Some(VPCE)));
        assert_eq!(sealed, v2_crc(0x21, 0x21, &v6_block(), &[], &aws_tlv(VPCE.as_bytes()), None));
        // As sent, with the checksum still zero: refused.
        err(&nlb, HeaderError::Crc32cMismatch { received: 0, computed: 0x8C32_F89F });

        let mut v4 = hex("0d0a0d0a000d0a515549540a211100130a000102ac1f1f549c401f5603000400000000");
        v4[31..35].copy_from_slice(&0x58E2_43C2u32.to_be_bytes());
        ok(&v4, hdr(2, Command::Proxy, Some(("10.0.1.2:40000", "172.31.31.84:8022")), None));
        // The encoder writes that same header (its CRC32C TLV comes last).
        let enc = encode_v2_with_crc(
            Command::Proxy,
            Some((sa("10.0.1.2:40000"), sa("172.31.31.84:8022"))),
            None,
            &[],
        );
        assert_eq!(enc, v4);
    }

    #[test]
    fn v2_crc32c_correct_is_accepted() {
        let v4 = Some(("10.0.1.2:40000", "172.31.31.84:8022"));
        let v6 = Some(("[2001:db8::1]:40000", "[2001:db8::84]:8022"));
        let vpce = aws_tlv(VPCE.as_bytes());
        let noop = [0x04, 0, 2, 0xAB, 0xCD];
        let cases: Vec<(Vec<u8>, Header)> = vec![
            // Built by hand, checksummed by the reference, CRC32C TLV anywhere.
            (v2_crc(0x21, 0x11, &v4_block(), &[], &[], None), hdr(2, Command::Proxy, v4, None)),
            (v2_crc(0x21, 0x11, &v4_block(), &vpce, &[], None), hdr(2, Command::Proxy, v4, Some(VPCE))),
            (v2_crc(0x21, 0x11, &v4_block(), &noop, &vpce, None), hdr(2, Command::Proxy, v4, Some(VPCE))),
            (v2_crc(0x21, 0x21, &v6_block(), &[], &[], None), hdr(2, Command::Proxy, v6, None)),
            (v2_crc(0x21, 0x21, &v6_block(), &vpce, &noop, None), hdr(2, Command::Proxy, v6, Some(VPCE))),
            (v2_crc(0x21, 0x00, &[], &[], &vpce, None), hdr(2, Command::Proxy, None, Some(VPCE))),
            (v2_crc(0x21, 0x31, &[b'/'; 216], &[], &[], None), hdr(2, Command::Proxy, None, None)),
            (v2_crc(0x20, 0x00, &[], &[], &[], None), hdr(2, Command::Local, None, None)),
            (v2_crc(0x20, 0x11, &v4_block(), &[], &[], None), hdr(2, Command::Local, None, None)),
            // From the encoder.
            (
                encode_v2_with_crc(Command::Proxy, v4.map(|(s, d)| (sa(s), sa(d))), None, &[]),
                hdr(2, Command::Proxy, v4, None),
            ),
            (
                encode_v2_with_crc(
                    Command::Proxy,
                    v6.map(|(s, d)| (sa(s), sa(d))),
                    Some(VPCE),
                    &[(0x01, b"h2")],
                ),
                hdr(2, Command::Proxy, v6, Some(VPCE)),
            ),
            (encode_v2_with_crc(Command::Local, None, None, &[]), hdr(2, Command::Local, None, None)),
        ];
        for (bytes, want) in cases {
            ok(&bytes, want);
        }
        // The encoder's checksum is the reference's over the zeroed header.
        let enc = encode_v2_with_crc(Command::Proxy, v6.map(|(s, d)| (sa(s), sa(d))), Some(VPCE), &[]);
        let (head, sum) = enc.split_at(enc.len() - 4);
        assert_eq!(&head[head.len() - 3..], &[PP2_TYPE_CRC32C, 0, 4]);
        assert_eq!(sum, crc32c_reference(&[head, &[0; 4]].concat()).to_be_bytes());
    }

    #[test]
    fn v2_crc32c_wrong_is_refused() {
        let vpce = aws_tlv(VPCE.as_bytes());
        let good = v2_crc(0x21, 0x11, &v4_block(), &vpce, &[], None);
        let at = good.len() - 4;
        let right = u32::from_be_bytes(good[at..].try_into().unwrap());
        // Checksum off by one bit, zero, all ones, byte-swapped.
        for received in [right ^ 1, right ^ 0x8000_0000, 0, !0, right.swap_bytes()] {
            let mut bytes = good.clone();
            bytes[at..].copy_from_slice(&received.to_be_bytes());
            err(&bytes, HeaderError::Crc32cMismatch { received, computed: right });
        }
        // A byte changed in the addresses or in the endpoint id.
        for i in [16, 27, V2_PREAMBLE_LEN + 12 + 4, V2_PREAMBLE_LEN + 12 + 10] {
            let mut bytes = good.clone();
            bytes[i] ^= 0x01;
            let computed = crc32c_reference(&[&bytes[..at], &[0; 4][..]].concat());
            err(&bytes, HeaderError::Crc32cMismatch { received: right, computed });
        }
        // IPv6 and AF_UNSPEC, with a checksum for other bytes.
        let v6 = v2_crc(0x21, 0x21, &v6_block(), &[], &[], Some(0xE306_9283));
        check_consistency(&v6);
        assert!(matches!(parse(&v6), Err(HeaderError::Crc32cMismatch { received: 0xE306_9283, .. })));
        let unspec = v2_crc(0x21, 0x00, &[], &vpce, &[], Some(0));
        check_consistency(&unspec);
        assert!(matches!(parse(&unspec), Err(HeaderError::Crc32cMismatch { received: 0, .. })));
        // The checksum is judged before the endpoint id it covers.
        let bad_id = v2_crc(0x21, 0x11, &v4_block(), &aws_tlv(b"bad id"), &[], None);
        err(&bad_id, HeaderError::BadVpcEndpoint);
        let mut bytes = bad_id.clone();
        let n = bytes.len();
        bytes[n - 1] ^= 0xFF;
        check_consistency(&bytes);
        assert!(matches!(parse(&bytes), Err(HeaderError::Crc32cMismatch { .. })));
    }

    #[test]
    fn v2_crc32c_bad_length_or_count_is_refused() {
        for len in [0usize, 1, 3, 5, 8, 300] {
            let mut block = v4_block();
            block.push(PP2_TYPE_CRC32C);
            block.extend_from_slice(&(len as u16).to_be_bytes());
            block.resize(block.len() + len, 0);
            block.extend_from_slice(&aws_tlv(VPCE.as_bytes()));
            err(&v2_raw(0x21, 0x11, &block), HeaderError::Crc32cLength(len));
            // Whatever the value, even one that would be a right checksum.
            let mut bytes = v2_raw(0x21, 0x11, &block);
            let sum = crc32c_reference(&bytes);
            let at = V2_PREAMBLE_LEN + 12 + 3;
            let n = len.min(4);
            bytes[at..at + n].copy_from_slice(&sum.to_be_bytes()[..n]);
            err(&bytes, HeaderError::Crc32cLength(len));
        }
        // A second CRC32C TLV, whatever the values.
        let good = v2_crc(0x21, 0x11, &v4_block(), &[], &[], None);
        for second in [[0x03, 0, 4, 0, 0, 0, 0], [0x03, 0, 4, 1, 2, 3, 4]] {
            let mut block = good[V2_PREAMBLE_LEN..].to_vec();
            block.extend_from_slice(&second);
            let bytes = v2_raw(0x21, 0x11, &block);
            err(&bytes, HeaderError::BadTlv("more than one CRC32C TLV (0x03)"));
        }
        let two = v2_crc(0x21, 0x11, &v4_block(), &[0x03, 0, 4, 9, 9, 9, 9], &[], None);
        err(&two, HeaderError::BadTlv("more than one CRC32C TLV (0x03)"));
        // A bad second one is reported for its length.
        let two = v2_crc(0x21, 0x11, &v4_block(), &[], &[0x03, 0, 5, 0, 0, 0, 0, 0], None);
        err(&two, HeaderError::Crc32cLength(5));
        // TLV framing comes first: a CRC32C TLV running past the end.
        let mut block = v4_block();
        block.extend_from_slice(&[0x03, 0, 4, 0, 0]);
        err(&v2_raw(0x21, 0x11, &block), HeaderError::BadTlv("TLV value runs past the end of the header"));
        let mut block = v4_block();
        block.extend_from_slice(&[0x03, 0, 5, 0, 0, 0, 0, 0, 0xEA]);
        err(&v2_raw(0x21, 0x11, &block), HeaderError::BadTlv("TLV header runs past the end of the header"));
    }

    #[test]
    fn v2_crc32c_catches_any_flipped_bit_after_the_preamble() {
        // Every single-bit change to the address block or the TLVs of an
        // NLB-like header is refused, except in the CRC32C TLV's type byte:
        // that makes it another TLV type, and a header without a checksum is
        // accepted unchecked (as in HAProxy; the protocol cannot tell).
        let good = encode_v2_with_crc(
            Command::Proxy,
            Some((sa("[2001:db8::1]:40000"), sa("[2001:db8::84]:8022"))),
            Some(VPCE),
            &[],
        );
        let crc_type = good.len() - 7;
        assert_eq!(good[crc_type], PP2_TYPE_CRC32C);
        for i in V2_PREAMBLE_LEN..good.len() {
            for bit in 0..8 {
                let mut bytes = good.clone();
                bytes[i] ^= 1 << bit;
                let got = parse(&bytes);
                if i == crc_type {
                    assert!(matches!(got, Ok(Some(_))), "byte {i} bit {bit}: {got:?}");
                } else {
                    assert!(got.is_err(), "byte {i} bit {bit}: {got:?}");
                }
            }
        }
    }

    #[test]
    fn v2_local_crc32c_is_not_verified() {
        // LOCAL skips everything after the preamble unread (as HAProxy does):
        // a wrong or malformed CRC32C TLV does not matter.
        let local = hdr(2, Command::Local, None, None);
        ok(&v2_crc(0x20, 0x11, &v4_block(), &[], &[], Some(0xDEAD_BEEF)), local.clone());
        ok(&v2_raw(0x20, 0x00, &[0x03, 0, 1, 0]), local.clone());
        ok(&v2_raw(0x20, 0x00, &[0x03, 0, 4, 1, 2, 3, 4, 0x03, 0, 4, 1, 2, 3, 4]), local);
    }

    fn arb_pair() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>(), any::<[u8; 4]>(), any::<u16>()).prop_map(|(s, sp, d, dp)| {
                (SocketAddr::from((Ipv4Addr::from(s), sp)), SocketAddr::from((Ipv4Addr::from(d), dp)))
            }),
            (any::<[u8; 16]>(), any::<u16>(), any::<[u8; 16]>(), any::<u16>()).prop_map(|(s, sp, d, dp)| {
                (SocketAddr::from((Ipv6Addr::from(s), sp)), SocketAddr::from((Ipv6Addr::from(d), dp)))
            }),
        ]
    }

    fn arb_vpce() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(
            proptest::collection::vec(proptest::sample::select(b"0123456789abcdef".to_vec()), 17)
                .prop_map(|hex| format!("vpce-{}", String::from_utf8(hex).unwrap())),
        )
    }

    fn arb_tlvs() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
        proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..40)), 0..6)
            .prop_map(|tlvs| {
                tlvs.into_iter()
                    .map(|(kind, mut value)| {
                        // Keep the endpoint id TLV unique: other AWS subtypes only.
                        if kind == PP2_TYPE_AWS && value.first() == Some(&PP2_SUBTYPE_AWS_VPCE_ID) {
                            value[0] = 0x02;
                        }
                        // A checksum only from `encode_v2_with_crc`.
                        let kind = if kind == PP2_TYPE_CRC32C { 0x04 } else { kind };
                        (kind, value)
                    })
                    .collect()
            })
    }

    /// Byte strings that look enough like headers to get past the signature.
    fn arb_near_header() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..600),
            (
                proptest::sample::select(vec![
                    &b"PROXY "[..],
                    b"PROXY TCP4 ",
                    b"PROXY TCP6 ",
                    b"PROXY UNKNOWN",
                ]),
                proptest::collection::vec(
                    proptest::sample::select(b"0123456789abcdef.: \r\nTCPUNKOW".to_vec()),
                    0..120,
                ),
            )
                .prop_map(|(head, tail)| [head, &tail].concat()),
            (any::<u8>(), any::<u8>(), 0u16..600, proptest::collection::vec(any::<u8>(), 0..600),).prop_map(
                |(vc, fam, len, rest)| {
                    let mut v = V2_SIGNATURE.to_vec();
                    v.extend_from_slice(&[vc, fam]);
                    v.extend_from_slice(&len.to_be_bytes());
                    v.extend_from_slice(&rest);
                    v
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in arb_near_header()) {
            if let Ok(Some((_, n))) = parse(&bytes) {
                prop_assert!(n <= bytes.len());
            }
            check_consistency(&bytes);
        }

        #[test]
        fn v2_round_trip(
            proxy in any::<bool>(),
            addrs in proptest::option::of(arb_pair()),
            vpce in arb_vpce(),
            tlvs in arb_tlvs(),
            crc in any::<bool>(),
            payload in proptest::collection::vec(any::<u8>(), 0..20),
        ) {
            let command = if proxy { Command::Proxy } else { Command::Local };
            let tlv_refs: Vec<(u8, &[u8])> = tlvs.iter().map(|(k, v)| (*k, &v[..])).collect();
            let encode = if crc { encode_v2_with_crc } else { encode_v2 };
            let encoded = encode(command.clone(), addrs, vpce.as_deref(), &tlv_refs);
            let expected = if proxy {
                Header {
                    version: 2,
                    command,
                    source: addrs.map(|a| a.0),
                    destination: addrs.map(|a| a.1),
                    vpc_endpoint: vpce,
                }
            } else {
                hdr(2, Command::Local, None, None)
            };
            let mut bytes = encoded.clone();
            bytes.extend_from_slice(&payload);
            prop_assert_eq!(parse(&bytes), Ok(Some((expected, encoded.len()))));
            for k in 0..encoded.len() {
                prop_assert_eq!(parse(&encoded[..k]), Ok(None));
            }
        }

        #[test]
        fn v1_round_trip(
            addrs in proptest::option::of(arb_pair()),
            payload in proptest::collection::vec(any::<u8>(), 0..20),
        ) {
            let encoded = encode_v1(addrs);
            prop_assert!(encoded.len() <= V1_MAX_LEN);
            let expected = Header {
                version: 1,
                command: Command::Proxy,
                source: addrs.map(|a| a.0),
                destination: addrs.map(|a| a.1),
                vpc_endpoint: None,
            };
            let mut bytes = encoded.clone();
            bytes.extend_from_slice(&payload);
            prop_assert_eq!(parse(&bytes), Ok(Some((expected, encoded.len()))));
            for k in 0..encoded.len() {
                prop_assert_eq!(parse(&encoded[..k]), Ok(None));
            }
        }
    }
}
