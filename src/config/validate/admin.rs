//! `[admin]`: where the metrics and health endpoints listen, if anywhere.
//!
//! Owns the `IP:port` / `"off"` syntax and the rule that the admin port
//! must not be one the route listeners take. It must not bind anything; the
//! node binds what this returns.

use std::net::SocketAddr;
use std::sync::Arc;

use super::Ctx;
use crate::config::defaults::DEFAULT_ADMIN_LISTEN;
use crate::config::raw::RawAdmin;
use crate::config::{Admin, Listen, Route};

/// The validated `[admin]` section; a bad address turns the listener off
/// (the config is refused anyway).
pub(super) fn check(cx: &mut Ctx, raw: &RawAdmin) -> Admin {
    let listen = match &raw.listen {
        None => Some(DEFAULT_ADMIN_LISTEN),
        Some(s) if s.get_ref().trim() == "off" => None,
        Some(s) => match s.get_ref().trim().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                cx.err(
                    0,
                    s.span(),
                    format!(
                        "admin.listen {:?}: expected IP:port like \"127.0.0.1:14090\", or \"off\"",
                        s.get_ref()
                    ),
                );
                None
            }
        },
    };
    Admin { listen }
}

/// The admin listener must not take a port that portgate listens on for
/// routes (the default included). Runs after the routes, whose ports it
/// needs when there is no `listen.ports` range.
pub(super) fn check_port_clash(
    cx: &mut Ctx,
    raw: &RawAdmin,
    admin: &Admin,
    listen: &Listen,
    routes: &[Arc<Route>],
) {
    let Some(a) = admin.listen else { return };
    let span = raw.listen.as_ref().map(|s| s.span()).unwrap_or(0..0);
    let overlaps = a.ip() == listen.address || a.ip().is_unspecified() || listen.address.is_unspecified();
    let taken = match listen.ports {
        Some(r) => r.contains(a.port()),
        None => routes.iter().any(|r| r.port == a.port()),
    };
    if overlaps && taken && a.port() != 0 {
        let default = if raw.listen.is_none() { " (the default)" } else { "" };
        cx.err(
            0,
            span,
            format!(
                "admin.listen {a}{default} uses port {} that portgate also listens on for routes; set [admin] listen to a port outside them",
                a.port()
            ),
        );
    }
}
