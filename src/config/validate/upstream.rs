//! `[upstream]`: how targets are dialed; for now, the egress source pool.
//!
//! Owns the form of `source` (IP addresses, not empty, none twice). It must
//! not bind them: whether an address belongs to this host is known only on
//! the host that runs the config, so `run` and a reload check that, not
//! `check`.

use super::Ctx;
use crate::config::raw::RawUpstream;
use crate::config::Upstream;

/// The validated `[upstream]` section.
pub(super) fn check(cx: &mut Ctx, up: &RawUpstream) -> Upstream {
    let source = up.source.as_ref().and_then(|l| cx.sources(0, "upstream.source", l)).unwrap_or_default();
    Upstream { source }
}
