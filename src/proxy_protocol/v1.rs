//! PROXY v1: the text header (`PROXY TCP4 src dst sport dport\r\n`).
//!
//! Pure parsing over bytes; see the parent module for the rules chosen.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::*;

/// `buf` starts with `"PROXY "`.
pub(super) fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let start = V1_PREFIX.len();
    let lf = window[start..].iter().position(|&b| b == b'\n').map(|i| i + start);

    match lf {
        Some(i) if window[i - 1] == b'\r' => {
            // window[start - 1] is the space, so the CR is at `start` or later.
            let body = &window[start..i - 1];
            match parse_v1_body(body, true)? {
                Some(header) => Ok(Some((header, i + 1))),
                None => Err(HeaderError::Malformed("v1: incomplete line")),
            }
        }
        Some(i) => {
            // Report a field error first if there is one before the LF, so the
            // result does not depend on how the bytes were split into reads.
            parse_v1_body(&window[start..i], false)?;
            Err(HeaderError::Malformed("v1: line ends with LF instead of CRLF"))
        }
        None => {
            let mut body = &window[start..];
            if let Some((&b'\r', rest)) = body.split_last() {
                body = rest; // may be the first half of the CRLF
            }
            parse_v1_body(body, false)?;
            if buf.len() >= V1_MAX_LEN {
                Err(HeaderError::TooLong)
            } else {
                Ok(None)
            }
        }
    }
}

#[derive(Clone, Copy)]
enum V1Proto {
    Tcp4,
    Tcp6,
}

/// Validate the text between `"PROXY "` and CRLF. With `complete == false`
/// the body may be cut anywhere; the last field is then checked only as a
/// prefix. Returns `Ok(None)` for a valid incomplete body.
fn parse_v1_body(body: &[u8], complete: bool) -> Result<Option<Header>, HeaderError> {
    let (proto, rest) = match body.iter().position(|&b| b == b' ') {
        Some(sp) => (&body[..sp], Some(&body[sp + 1..])),
        None => (body, None),
    };

    let proto_complete = rest.is_some() || complete;
    let proto = match proto {
        b"TCP4" if proto_complete => V1Proto::Tcp4,
        b"TCP6" if proto_complete => V1Proto::Tcp6,
        b"UNKNOWN" if proto_complete => {
            if rest.is_some_and(|r| r.contains(&b'\r')) {
                return Err(HeaderError::Malformed("v1: CR inside the line"));
            }
            return Ok(complete.then_some(Header {
                version: 1,
                command: Command::Proxy,
                source: None,
                destination: None,
                vpc_endpoint: None,
            }));
        }
        p if !proto_complete
            && [&b"TCP4"[..], b"TCP6", b"UNKNOWN"].iter().any(|known| known.starts_with(p)) =>
        {
            return Ok(None);
        }
        _ => return Err(HeaderError::Malformed("v1: protocol is not TCP4, TCP6 or UNKNOWN")),
    };

    let Some(rest) = rest else {
        // "TCP4" / "TCP6" followed directly by CRLF.
        return if complete { Err(HeaderError::Malformed("v1: missing fields")) } else { Ok(None) };
    };

    let count = rest.iter().filter(|&&b| b == b' ').count() + 1;
    let mut fields: [&[u8]; 4] = [&[]; 4];
    for (i, field) in rest.split(|&b| b == b' ').enumerate() {
        if i >= fields.len() {
            return Err(HeaderError::Malformed("v1: too many fields"));
        }
        let partial = !complete && i == count - 1;
        if field.is_empty() && !partial {
            return Err(HeaderError::Malformed(
                "v1: empty field (fields are separated by exactly one space)",
            ));
        }
        match i {
            0 | 1 => check_v1_addr(field, proto, i == 0, partial)?,
            _ => check_v1_port(field, i == 2, partial).map(|_| ())?,
        }
        fields[i] = field;
    }
    if !complete {
        return Ok(None);
    }
    if count < fields.len() {
        return Err(HeaderError::Malformed("v1: missing fields"));
    }

    let [src, dst, sport, dport] = fields;
    let src = v1_addr(src, proto, true)?;
    let dst = v1_addr(dst, proto, false)?;
    let sport = check_v1_port(sport, true, false)?;
    let dport = check_v1_port(dport, false, false)?;
    Ok(Some(Header {
        version: 1,
        command: Command::Proxy,
        source: Some(SocketAddr::new(src, sport)),
        destination: Some(SocketAddr::new(dst, dport)),
        vpc_endpoint: None,
    }))
}

fn v1_addr_error(proto: V1Proto, source: bool) -> HeaderError {
    HeaderError::Malformed(match (proto, source) {
        (V1Proto::Tcp4, true) => "v1: source address is not a valid TCP4 (IPv4) address",
        (V1Proto::Tcp4, false) => "v1: destination address is not a valid TCP4 (IPv4) address",
        (V1Proto::Tcp6, true) => "v1: source address is not a valid TCP6 (IPv6) address",
        (V1Proto::Tcp6, false) => "v1: destination address is not a valid TCP6 (IPv6) address",
    })
}

/// Check an address field; a `partial` one only for characters and length.
fn check_v1_addr(field: &[u8], proto: V1Proto, source: bool, partial: bool) -> Result<(), HeaderError> {
    if partial {
        let ok = match proto {
            V1Proto::Tcp4 => is_ipv4_prefix(field),
            // Longest textual IPv6 form: six groups plus an embedded IPv4.
            V1Proto::Tcp6 => {
                field.len() <= 45 && field.iter().all(|b| b.is_ascii_hexdigit() || *b == b':' || *b == b'.')
            }
        };
        if ok {
            Ok(())
        } else {
            Err(v1_addr_error(proto, source))
        }
    } else {
        v1_addr(field, proto, source).map(|_| ())
    }
}

/// Whether `field` can be the start of a dotted-quad IPv4 address: at most
/// four `.`-separated octets of 1 to 3 digits, each at most 255 and without a
/// leading zero (`0` itself is an octet); only the last may still be empty.
fn is_ipv4_prefix(field: &[u8]) -> bool {
    let count = field.iter().filter(|&&b| b == b'.').count() + 1;
    count <= 4
        && field.split(|&b| b == b'.').enumerate().all(|(i, octet)| {
            let last = i == count - 1;
            (!octet.is_empty() || last)
                && octet.len() <= 3
                && octet.iter().all(u8::is_ascii_digit)
                && !(octet.len() > 1 && octet[0] == b'0')
                && octet.iter().fold(0u32, |v, &b| v * 10 + u32::from(b - b'0')) <= 255
        })
}

fn v1_addr(field: &[u8], proto: V1Proto, source: bool) -> Result<IpAddr, HeaderError> {
    let err = || v1_addr_error(proto, source);
    let text = std::str::from_utf8(field).map_err(|_| err())?;
    // std's parsers are strict: `Ipv4Addr` refuses leading zeros ("01.2.3.4",
    // which some C parsers read as octal) and anything but four decimal
    // octets; `is_ipv4_prefix` keeps the partial check in step with it.
    match proto {
        V1Proto::Tcp4 => text.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| err()),
        V1Proto::Tcp6 => text.parse::<Ipv6Addr>().map(IpAddr::V6).map_err(|_| err()),
    }
}

/// A port is 1 to 5 ASCII digits without a leading zero (`0` itself is a
/// port) and with a value of at most 65535. A `partial` field may also be
/// empty. Returns the value (meaningless when partial).
fn check_v1_port(field: &[u8], source: bool, partial: bool) -> Result<u16, HeaderError> {
    let err = || {
        HeaderError::Malformed(if source {
            "v1: source port is not a decimal number from 0 to 65535 without leading zeros"
        } else {
            "v1: destination port is not a decimal number from 0 to 65535 without leading zeros"
        })
    };
    if field.len() > 5 || (field.is_empty() && !partial) || (field.len() > 1 && field[0] == b'0') {
        return Err(err());
    }
    let mut value: u32 = 0;
    for &b in field {
        if !b.is_ascii_digit() {
            return Err(err());
        }
        value = value * 10 + u32::from(b - b'0');
    }
    u16::try_from(value).map_err(|_| err())
}
