//! `[proxy_protocol]`: whether a PROXY header is required, from which peers,
//! and how long to wait for it.
//!
//! Owns the rule that `required` needs a `trusted` list. It must not decide
//! what `via` and `endpoints` need; [`access`](super::access) and
//! [`routes`](super::routes) check those against the mode this returns.

use super::Ctx;
use crate::config::defaults::{DEFAULT_HEADER_TIMEOUT, DEFAULT_PROXY_MODE};
use crate::config::raw::RawProxyProtocol;
use crate::config::{ProxyMode, ProxyProtocol};

/// The validated `[proxy_protocol]` section; a bad mode falls back to the
/// default (off), a bad CIDR is left out.
pub(super) fn check(cx: &mut Ctx, pp: &RawProxyProtocol) -> ProxyProtocol {
    let mode = match &pp.mode {
        None => DEFAULT_PROXY_MODE,
        Some(s) => match s.get_ref().as_str() {
            "off" => ProxyMode::Off,
            "required" => ProxyMode::Required,
            other => {
                cx.err(
                    0,
                    s.span(),
                    format!("proxy_protocol.mode {other:?}: expected \"off\" or \"required\""),
                );
                DEFAULT_PROXY_MODE
            }
        },
    };
    let trusted = pp.trusted.as_ref().map(|l| cx.cidrs(0, "proxy_protocol.trusted", l)).unwrap_or_default();
    let mode_span = pp.mode.as_ref().map(|m| m.span());
    if mode == ProxyMode::Required && pp.trusted.as_ref().is_none_or(|l| l.get_ref().is_empty()) {
        cx.err(
            0,
            mode_span.clone().unwrap_or(0..0),
            "proxy_protocol.mode = \"required\" needs proxy_protocol.trusted: the NLB subnets allowed to send a header, like [\"10.0.0.0/16\"]",
        );
    }
    let header_timeout =
        cx.positive("proxy_protocol.header_timeout", &pp.header_timeout, DEFAULT_HEADER_TIMEOUT);
    ProxyProtocol { mode, trusted, header_timeout }
}
