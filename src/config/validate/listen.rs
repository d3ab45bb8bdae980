//! `[listen]`: the address and the optional NLB port range.
//!
//! Owns the port range syntax (`"8000-8049"`, `"8022"`, `8022`). It must not
//! check routes against the range; [`routes`](super::routes) does that with
//! the range this returns.

use std::net::IpAddr;

use super::Ctx;
use crate::config::defaults::DEFAULT_ADDRESS;
use crate::config::raw::{PortsValue, RawListen};
use crate::config::{Listen, PortRange};

/// The validated `[listen]` section; a bad value is reported and replaced
/// (the address by its default, the range by none).
pub(super) fn check(cx: &mut Ctx, raw: &RawListen) -> Listen {
    let address = match &raw.address {
        None => DEFAULT_ADDRESS,
        Some(s) => s.get_ref().trim().parse::<IpAddr>().unwrap_or_else(|_| {
            cx.err(0, s.span(), format!("listen.address {:?} is not an IP address; use \"0.0.0.0\", \"::\" or an address of this host", s.get_ref()));
            DEFAULT_ADDRESS
        }),
    };
    let ports = raw.ports.as_ref().and_then(|p| match parse_ports(p.get_ref()) {
        Ok(r) => Some(r),
        Err(e) => {
            cx.err(0, p.span(), format!("listen.ports: {e}; expected a range like \"8000-8049\""));
            None
        }
    });
    Listen { address, ports }
}

/// `listen.ports` as a range; `Err` says what is wrong with it.
fn parse_ports(v: &PortsValue) -> Result<PortRange, String> {
    let port = |s: &str| -> Result<u16, String> {
        match s.trim().parse::<u32>() {
            Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
            _ => Err(format!("{:?} is not a port from 1 to 65535", s.trim())),
        }
    };
    let range = match v {
        PortsValue::Number(n) => {
            let p = port(&n.to_string())?;
            PortRange { first: p, last: p }
        }
        PortsValue::Text(t) => match t.split_once('-') {
            Some((a, b)) => PortRange { first: port(a)?, last: port(b)? },
            None => {
                let p = port(t)?;
                PortRange { first: p, last: p }
            }
        },
    };
    if range.first > range.last {
        return Err(format!("range {}-{} runs backwards; write it low-high", range.first, range.last));
    }
    Ok(range)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_forms() {
        assert_eq!(
            parse_ports(&PortsValue::Text("8000-8049".into())),
            Ok(PortRange { first: 8000, last: 8049 })
        );
        assert_eq!(parse_ports(&PortsValue::Number(8022)), Ok(PortRange { first: 8022, last: 8022 }));
        assert!(parse_ports(&PortsValue::Text("8049-8000".into())).is_err());
        assert!(parse_ports(&PortsValue::Text("0-10".into())).is_err());
        assert!(parse_ports(&PortsValue::Number(70000)).is_err());
    }
}
