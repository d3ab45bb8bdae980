//! Writes the PROXY header seed corpus, `fuzz/corpus/proxy_header/`, with the
//! crate's own encoders. Run from the repository root:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example seeds
//! ```
//!
//! The config seeds are copies of `tests/fixtures/` and the example config
//! (see `fuzz/README.md`).

use std::net::SocketAddr;
use std::path::Path;

use portgate::proxy_protocol::{encode_v1, encode_v2, encode_v2_with_crc, Command, PP2_TYPE_CRC32C};

const VPCE: &str = "vpce-0a1b2c3d4e5f67890";

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/proxy_header");
    std::fs::create_dir_all(&dir).unwrap();
    let v4 = Some((sa("10.0.1.2:40000"), sa("172.31.31.84:8022")));
    let v6 = Some((sa("[2001:db8::1]:40000"), sa("[2001:db8::84]:8022")));
    let ssh = b"SSH-2.0-OpenSSH_9.6\r\n";
    let http = b"GET /readyz HTTP/1.1\r\nHost: portgate\r\n\r\n";
    let with = |mut head: Vec<u8>, tail: &[u8]| {
        head.extend_from_slice(tail);
        head
    };

    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("v1_tcp4", with(encode_v1(v4), ssh)),
        ("v1_tcp6", with(encode_v1(v6), ssh)),
        ("v1_unknown", encode_v1(None)),
        (
            "v1_unknown_with_addresses",
            b"PROXY UNKNOWN ffff:f:f:f:f:f:f:f ffff:f:f:f:f:f:f:f 65535 65535\r\n".to_vec(),
        ),
        // Refused: v1 is strict (no leading zeros, ports up to 65535).
        ("v1_port_leading_zero", b"PROXY TCP4 10.0.1.2 172.31.31.84 040000 08022\r\n".to_vec()),
        ("v1_octet_leading_zero", b"PROXY TCP4 10.0.01.2 172.31.31.84 40000 8022\r\n".to_vec()),
        ("v1_port_65536", b"PROXY TCP4 10.0.1.2 172.31.31.84 65536 8022\r\n".to_vec()),
        ("v2_ipv4", with(encode_v2(Command::Proxy, v4, None, &[]), ssh)),
        ("v2_ipv6", encode_v2(Command::Proxy, v6, None, &[])),
        ("v2_ipv4_aws_vpce", with(encode_v2(Command::Proxy, v4, Some(VPCE), &[]), ssh)),
        (
            // As an NLB sends it behind PrivateLink, with other TLVs around
            // and a (correct) CRC32C TLV.
            "v2_ipv6_aws_vpce_other_tlvs",
            encode_v2_with_crc(
                Command::Proxy,
                v6,
                Some(VPCE),
                &[(0x04, &[0, 0, 0]), (0xEA, &[0x02, b'x']), (0x01, b"h2")],
            ),
        ),
        // CRC32C: right, wrong, of a bad length, twice.
        ("v2_ipv4_crc32c", with(encode_v2_with_crc(Command::Proxy, v4, None, &[]), ssh)),
        ("v2_ipv6_aws_vpce_crc32c", with(encode_v2_with_crc(Command::Proxy, v6, Some(VPCE), &[]), ssh)),
        ("v2_local_crc32c", encode_v2_with_crc(Command::Local, None, None, &[])),
        (
            "v2_ipv4_crc32c_wrong",
            with(wrong_crc(encode_v2_with_crc(Command::Proxy, v4, Some(VPCE), &[])), ssh),
        ),
        ("v2_ipv4_crc32c_length_5", encode_v2(Command::Proxy, v4, None, &[(PP2_TYPE_CRC32C, &[0; 5])])),
        ("v2_ipv4_crc32c_length_0", encode_v2(Command::Proxy, v4, None, &[(PP2_TYPE_CRC32C, &[])])),
        ("v2_ipv4_crc32c_twice", encode_v2_with_crc(Command::Proxy, v4, None, &[(PP2_TYPE_CRC32C, &[0; 4])])),
        ("v2_unspec_aws_vpce", encode_v2(Command::Proxy, None, Some(VPCE), &[])),
        // NLB health checks: LOCAL, with and without an address block.
        ("v2_local_no_addresses", encode_v2(Command::Local, None, None, &[])),
        ("v2_local_with_addresses", encode_v2(Command::Local, v4, None, &[])),
        ("v2_local_http_check", with(encode_v2(Command::Local, None, None, &[]), http)),
        // Only the first header counts: a second one is payload.
        (
            "v2_then_spoofed_v2",
            with(
                encode_v2(Command::Proxy, v4, Some(VPCE), &[]),
                &encode_v2(Command::Proxy, v6, Some("vpce-evil"), &[]),
            ),
        ),
    ];
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// A header from `encode_v2_with_crc` (its CRC32C TLV comes last) with the
/// checksum's last byte changed.
fn wrong_crc(mut header: Vec<u8>) -> Vec<u8> {
    *header.last_mut().unwrap() ^= 0x01;
    header
}
