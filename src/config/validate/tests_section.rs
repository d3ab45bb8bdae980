//! `[[test]]`: policy tests, in the main file and in included files.
//!
//! [`check`] validates each table's own fields like any other section;
//! [`run`] then evaluates every test with the admission decision that serves
//! connections (`config/policy.rs`) and reports each failure at its
//! `[[test]]` header, saying what happened instead. Because this runs
//! inside [`load`](crate::config::load), `check`, `run` and a reload refuse
//! a failing test alike.

use std::net::IpAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::SystemTime;

use toml::Spanned;

use super::{is_vpce, Ctx};
use crate::config::policy::{self, TESTABLE};
use crate::config::raw::RawTest;
use crate::config::{Expect, PolicyTest, Route};

/// A valid test with where it was written.
pub(super) struct Located {
    file: usize,
    /// The whole table: its start is the `[[test]]` header.
    table: Range<usize>,
    pub(super) test: PolicyTest,
}

/// Every test whose fields are valid, in file order; each problem reported.
pub(super) fn check(cx: &mut Ctx, raw: &[(usize, Spanned<RawTest>)]) -> Vec<Located> {
    raw.iter().filter_map(|(file, t)| test(cx, *file, t)).collect()
}

/// One test's fields; `None` when any is missing or bad (reported).
fn test(cx: &mut Ctx, file: usize, table: &Spanned<RawTest>) -> Option<Located> {
    let t = table.get_ref();
    let before = cx.problems.len();
    let missing = |cx: &mut Ctx, key: &str, example: &str| {
        cx.err(file, table.span(), format!("test has no {key}; add {key} = {example}"));
    };

    let port = match &t.port {
        None => {
            missing(cx, "port", "8022");
            None
        }
        Some(p) if !(1..=65535).contains(p.get_ref()) => {
            cx.err(file, p.span(), format!("test: port {} is not from 1 to 65535", p.get_ref()));
            None
        }
        Some(p) => u16::try_from(*p.get_ref()).ok(),
    };
    let client = match &t.client {
        None => {
            missing(cx, "client", "\"172.31.25.9\" (the client address, as a PROXY header gives it)");
            None
        }
        Some(c) => match c.get_ref().trim().parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                cx.err(
                    file,
                    c.span(),
                    format!("test: client {:?} is not an IP address; write one like \"172.31.25.9\" or \"2001:db8::9\" (no port)", c.get_ref()),
                );
                None
            }
        },
    };
    let endpoint = t.endpoint.as_ref().and_then(|e| {
        if is_vpce(e.get_ref()) {
            Some(e.get_ref().clone())
        } else {
            cx.err(
                file,
                e.span(),
                format!(
                    "test: endpoint {:?} is not a VPC endpoint id like \"vpce-0a1b2c3d4e5f67890\"",
                    e.get_ref()
                ),
            );
            None
        }
    });
    let at = t.at.as_ref().and_then(|a| cx.instant(file, "test: at", a));
    let expect = check_expect(cx, file, table, t);

    if cx.problems.len() != before {
        return None;
    }
    let test = PolicyTest { port: port?, client: client?, endpoint, at, expect: expect? };
    Some(Located { file, table: table.span(), test })
}

/// `expect`, with `route` only for `"admit"` and `reason` only for
/// `"reject"` (and one that a test can observe).
fn check_expect(cx: &mut Ctx, file: usize, table: &Spanned<RawTest>, t: &RawTest) -> Option<Expect> {
    let Some(e) = &t.expect else {
        cx.err(file, table.span(), "test has no expect; add expect = \"admit\" or expect = \"reject\"");
        return None;
    };
    match e.get_ref().trim() {
        "admit" => {
            if let Some(r) = &t.reason {
                cx.err(file, r.span(), "test: reason goes with expect = \"reject\"; an admitted connection has none (name the route with route = \"...\")");
            }
            Some(Expect::Admit { route: t.route.as_ref().map(|r| r.get_ref().clone()) })
        }
        "reject" => {
            if let Some(r) = &t.route {
                cx.err(file, r.span(), "test: route goes with expect = \"admit\"; for a refusal name the reason with reason = \"...\"");
            }
            let reason = t.reason.as_ref().and_then(|r| {
                let want = r.get_ref().trim();
                if TESTABLE.iter().any(|t| t.as_str() == want) {
                    Some(want.to_owned())
                } else {
                    let names: Vec<String> = TESTABLE.iter().map(|t| format!("{:?}", t.as_str())).collect();
                    cx.err(
                        file,
                        r.span(),
                        format!(
                            "test: reason {want:?} cannot be tested (tests leave the PROXY header, limits and audit aside); expected one of {}",
                            names.join(", ")
                        ),
                    );
                    None
                }
            });
            if t.reason.is_some() && reason.is_none() {
                return None;
            }
            Some(Expect::Reject { reason })
        }
        other => {
            cx.err(file, e.span(), format!("test: expect {other:?}: expected \"admit\" or \"reject\""));
            None
        }
    }
}

/// Evaluate every test against `routes`; each failure is a problem at its
/// `[[test]]` header.
pub(super) fn run(cx: &mut Ctx, tests: &[Located], routes: &[Arc<Route>], now: SystemTime) {
    if tests.is_empty() {
        return;
    }
    let keys = policy::keys_of(routes);
    for t in tests {
        if let Err(message) = policy::run_test(&keys, &t.test, now) {
            cx.err(t.file, t.table.clone(), message);
        }
    }
}
