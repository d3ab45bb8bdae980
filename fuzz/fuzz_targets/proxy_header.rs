//! Arbitrary bytes as the first bytes of a connection.
//!
//! Beyond "never panics", every input must satisfy the parser's contract:
//! - a header's `consumed` is at most the input length and [`MAX_HEADER_LEN`];
//! - no decision needs more than `MAX_HEADER_LEN` bytes;
//! - incremental: every prefix shorter than the decision point is `Ok(None)`,
//!   the decision point gives the same verdict as the whole input, and any
//!   longer input gives that verdict too (so how the bytes were split into
//!   reads never matters);
//! - a parsed header is self-consistent and re-encodes (with and without a
//!   CRC32C TLV) to a header that parses back to the same fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portgate::proxy_protocol::{
    encode_v1, encode_v2, encode_v2_with_crc, parse, Command, Header, MAX_HEADER_LEN, V1_MAX_LEN,
};

fuzz_target!(|data: &[u8]| {
    let full = parse(data);
    if let Ok(Some((header, n))) = &full {
        check_header(data, header, *n);
    }
    if full == Ok(None) {
        assert!(data.len() < MAX_HEADER_LEN, "undecided after {} bytes", data.len());
    }

    // The decision point: the shortest prefix that is not `Ok(None)`.
    let decided_at = (0..=data.len()).find(|&k| parse(&data[..k]) != Ok(None));
    match decided_at {
        None => assert_eq!(full, Ok(None)),
        Some(k) => {
            assert_eq!(parse(&data[..k]), full, "verdict at byte {k} differs from the whole input");
            if let Ok(Some((_, n))) = &full {
                assert_eq!(*n, k, "a header is decided exactly when its last byte arrives");
            }
            // Longer inputs keep the verdict (checked at a few points: all of
            // them would make long inputs quadratic).
            for j in [k + 1, (k + data.len()) / 2, data.len().saturating_sub(1)] {
                if j > k && j <= data.len() {
                    assert_eq!(parse(&data[..j]), full, "verdict changed between byte {k} and {j}");
                }
            }
        }
    }
});

fn check_header(data: &[u8], h: &Header, n: usize) {
    assert!(n <= data.len() && n <= MAX_HEADER_LEN, "consumed {n} of {}", data.len());
    assert_eq!(h.source.is_some(), h.destination.is_some(), "{h:?}");
    if let (Some(s), Some(d)) = (h.source, h.destination) {
        assert_eq!(s.is_ipv4(), d.is_ipv4(), "mixed families in {h:?}");
    }
    // Only the header's own bytes decide it.
    assert_eq!(parse(&data[..n]), Ok(Some((h.clone(), n))));
    match h.version {
        1 => {
            assert!(n <= V1_MAX_LEN);
            assert_eq!(h.command, Command::Proxy);
            assert_eq!(h.vpc_endpoint, None);
            let again = encode_v1(h.source.zip(h.destination));
            assert_eq!(parse(&again), Ok(Some((h.clone(), again.len()))), "v1 re-encoding");
        }
        2 => {
            if h.command == Command::Local {
                assert_eq!((h.source, h.vpc_endpoint.as_deref()), (None, None), "{h:?}");
            }
            if let Some(id) = &h.vpc_endpoint {
                assert!(!id.is_empty() && id.bytes().all(|b| b.is_ascii_graphic()), "{id:?}");
            }
            for encode in [encode_v2, encode_v2_with_crc] {
                let again =
                    encode(h.command.clone(), h.source.zip(h.destination), h.vpc_endpoint.as_deref(), &[]);
                assert_eq!(parse(&again), Ok(Some((h.clone(), again.len()))), "v2 re-encoding");
            }
        }
        v => panic!("version {v}"),
    }
}
