//! `[access]`: the admission rules routes inherit unless they set their own,
//! and the per-source limit.
//!
//! Owns the checks on the inherited values themselves (no empty `allow`,
//! `endpoints` only with PROXY mode). It must not apply them to routes;
//! [`routes`](super::routes) does that with the section this returns.

use super::Ctx;
use crate::config::defaults::{DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PER_SOURCE};
use crate::config::raw::RawAccess;
use crate::config::{Access, ProxyMode};

/// The validated `[access]` section. `mode` is the validated
/// `proxy_protocol.mode`: endpoint ids come from the PROXY v2 header.
pub(super) fn check(cx: &mut Ctx, acc: &RawAccess, mode: ProxyMode) -> Access {
    let allow = acc.allow.as_ref().map(|l| {
        if l.get_ref().is_empty() {
            cx.err(0, l.span(), "access.allow = [] would admit no one; list source CIDRs, or remove the key so routes must set their own");
        }
        cx.cidrs(0, "access.allow", l)
    });
    let endpoints =
        acc.endpoints.as_ref().map(|l| cx.endpoint_ids(0, "access.endpoints", l)).unwrap_or_default();
    if !endpoints.is_empty() && mode != ProxyMode::Required {
        let span = acc.endpoints.as_ref().map(|l| l.span()).unwrap_or(0..0);
        cx.err(0, span, "access.endpoints needs proxy_protocol.mode = \"required\": the endpoint id comes from the PROXY v2 header");
    }
    let max_connections = cx
        .count(0, "access.max_connections", &acc.max_connections, u32::MAX as i64)
        .unwrap_or(DEFAULT_MAX_CONNECTIONS);
    let max_per_source = cx
        .count(0, "access.max_per_source", &acc.max_per_source, u32::MAX as i64)
        .unwrap_or(DEFAULT_MAX_PER_SOURCE);
    Access { allow, endpoints, max_connections, max_per_source }
}
