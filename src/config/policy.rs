//! What a config's rules decide for one connection, as pure functions: which
//! route takes it, and whether that route admits it (source, endpoint,
//! window). Also the `[[test]]` tables that assert those decisions.
//!
//! This is the one place the decision is written. Live admission
//! (`session/admission.rs`, through the route table in `routes.rs`) and the
//! `[[test]]` evaluator that [`load`](super::load) runs both call
//! [`decide`], so a test cannot pass while a real connection would be
//! treated otherwise. Limits (`max_connections`, `max_per_source`) and
//! `[log] audit` depend on what runs, not on the config alone: the live path
//! checks them after this, and tests leave them aside.
//!
//! Pure: no clock (the caller passes `now`), no sockets, no counting.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use super::Route;
use crate::reason::Reject;

/// What the decision looks at: the connection as admission sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conn<'a> {
    /// The listener port.
    pub(crate) port: u16,
    /// The admitted client address (the PROXY header's source, else the
    /// socket peer).
    pub(crate) client: IpAddr,
    /// The VPC endpoint id from the PROXY v2 header, if any.
    pub(crate) endpoint: Option<&'a str>,
}

/// The `(port, via)` routing key -> `T` (a route, or a route with its
/// runtime state). Immutable once built.
///
/// Two flat arrays, no hash table: a large config is mostly this, and the
/// accept path does two binary searches (port, then endpoint) instead of
/// hashing. Each route's `via` is read from the route itself, not copied.
#[derive(Debug, Clone)]
pub(crate) struct RouteKeys<T> {
    /// Sorted by `(port, via)`: a port's routes are adjacent, its route
    /// without `via` (if any) first, then the others by endpoint id.
    routes: Box<[T]>,
    /// Every port that has a route, ascending, with the index in `routes`
    /// of its first route; its routes end where the next port's begin.
    ports: Box<[(u16, u32)]>,
}

impl<T> Default for RouteKeys<T> {
    fn default() -> Self {
        RouteKeys { routes: Box::default(), ports: Box::default() }
    }
}

impl<T: AsRef<Route>> RouteKeys<T> {
    /// The keys of `routes`, in any order; validation has made keys unique.
    pub(crate) fn new(mut routes: Vec<T>) -> Self {
        // Configs come sorted by key: then this only checks.
        if !routes.is_sorted_by(|a, b| key(a) <= key(b)) {
            routes.sort_by(|a, b| key(a).cmp(&key(b)));
        }
        let mut ports: Vec<(u16, u32)> = Vec::new();
        for (i, t) in routes.iter().enumerate() {
            let port = t.as_ref().port;
            if ports.last().is_none_or(|(p, _)| *p != port) {
                let i = u32::try_from(i).expect("fewer than 4 billion routes");
                ports.push((port, i));
            }
        }
        RouteKeys { routes: routes.into_boxed_slice(), ports: ports.into_boxed_slice() }
    }

    /// Every route, sorted by `(port, via)`.
    pub(crate) fn routes(&self) -> &[T] {
        &self.routes
    }

    /// The routes on `port`, sorted by `via` (the one without first).
    fn on_port(&self, port: u16) -> &[T] {
        let Ok(i) = self.ports.binary_search_by_key(&port, |(p, _)| *p) else { return &[] };
        let start = self.ports[i].1 as usize;
        let end = self.ports.get(i + 1).map_or(self.routes.len(), |(_, s)| *s as usize);
        &self.routes[start..end]
    }

    /// The route for a connection on `port` that came through `endpoint`:
    /// the route with `via = endpoint` wins, else the port's route without
    /// `via`.
    pub(crate) fn lookup(&self, port: u16, endpoint: Option<&str>) -> Option<&T> {
        let on_port = self.on_port(port);
        if let Some(ep) = endpoint {
            if let Ok(i) = on_port.binary_search_by(|t| t.as_ref().via.as_deref().cmp(&Some(ep))) {
                return Some(&on_port[i]);
            }
        }
        on_port.first().filter(|t| t.as_ref().via.is_none())
    }
}

/// A route's routing key, as [`RouteKeys`] orders them.
fn key<T: AsRef<Route>>(t: &T) -> (u16, Option<&str>) {
    let r = t.as_ref();
    (r.port, r.via.as_deref())
}

/// Why [`decide`] refused: the reason, and the route when one was found.
pub(crate) struct Refused<'a, T> {
    pub(crate) route: Option<&'a T>,
    pub(crate) reason: Reject,
}

/// Route lookup, then the route's rules, in the contract's order:
/// `no_route`, `source_not_allowed`, `endpoint_not_allowed`,
/// `outside_window`. The first failure decides.
pub(crate) fn decide<'a, T: AsRef<Route>>(
    keys: &'a RouteKeys<T>,
    conn: &Conn<'_>,
    now: SystemTime,
) -> Result<&'a T, Refused<'a, T>> {
    let Some(entry) = keys.lookup(conn.port, conn.endpoint) else {
        return Err(Refused { route: None, reason: Reject::NoRoute });
    };
    match admits(entry.as_ref(), conn.client, conn.endpoint, now) {
        Ok(()) => Ok(entry),
        Err(reason) => Err(Refused { route: Some(entry), reason }),
    }
}

/// A route's rules for a client: source, endpoint, then the window at `now`.
/// Also what a running session is re-judged by after a reload.
pub(crate) fn admits(
    route: &Route,
    client: IpAddr,
    endpoint: Option<&str>,
    now: SystemTime,
) -> Result<(), Reject> {
    let client = client.to_canonical();
    if !route.allow.iter().any(|net| net.contains(&client)) {
        return Err(Reject::SourceNotAllowed);
    }
    if !route.endpoints.is_empty() {
        match endpoint {
            Some(ep) if route.endpoints.iter().any(|e| e == ep) => {}
            _ => return Err(Reject::EndpointNotAllowed),
        }
    }
    in_window(route, now)
}

/// Whether `now` lies in the route's `[not_before, not_after)` window:
/// half-open, so `not_before` itself admits and `not_after` refuses.
pub(crate) fn in_window(route: &Route, now: SystemTime) -> Result<(), Reject> {
    let early = route.not_before.is_some_and(|t| now < t);
    let late = route.not_after.is_some_and(|t| now >= t);
    if early || late {
        Err(Reject::OutsideWindow)
    } else {
        Ok(())
    }
}

/// The reasons a `[[test]]` may expect: those [`decide`] gives. `limit`,
/// `audit_unavailable` and `proxy_header` depend on what runs or on the
/// bytes on the wire, which a test does not have.
pub(crate) const TESTABLE: [Reject; 4] =
    [Reject::NoRoute, Reject::SourceNotAllowed, Reject::EndpointNotAllowed, Reject::OutsideWindow];

/// One `[[test]]`: a connection, and what admission must decide for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyTest {
    /// The listener port the connection arrives on.
    pub port: u16,
    /// The admitted client address, as from a PROXY header.
    pub client: IpAddr,
    /// The VPC endpoint it came through, if any.
    pub endpoint: Option<String>,
    /// When to judge the windows; `None` = whenever the config is loaded.
    pub at: Option<SystemTime>,
    /// The decision the test asserts.
    pub expect: Expect,
}

/// What a `[[test]]` asserts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Admitted, by this route when one is named.
    Admit { route: Option<String> },
    /// Refused, for this reason (one of [`TESTABLE`]'s) when one is named.
    Reject { reason: Option<String> },
}

/// Run `test` against `keys` (built from the config's routes) at `at`, or
/// at `now` when the test names no time. `Err` is the problem's message:
/// what the test expected and what happened instead.
pub(crate) fn run_test(
    keys: &RouteKeys<Arc<Route>>,
    test: &PolicyTest,
    now: SystemTime,
) -> Result<(), String> {
    let conn = Conn { port: test.port, client: test.client, endpoint: test.endpoint.as_deref() };
    let got = decide(keys, &conn, test.at.unwrap_or(now));
    let pass = match (&test.expect, &got) {
        (Expect::Admit { route }, Ok(r)) => route.as_ref().is_none_or(|name| *name == r.name),
        (Expect::Reject { reason }, Err(refused)) => {
            reason.as_ref().is_none_or(|want| want == refused.reason.as_str())
        }
        _ => false,
    };
    if pass {
        return Ok(());
    }
    let expected = match &test.expect {
        Expect::Admit { route: Some(r) } => format!("admit by route {r:?}"),
        Expect::Admit { route: None } => "admit".to_owned(),
        Expect::Reject { reason: Some(why) } => format!("reject: {why}"),
        Expect::Reject { reason: None } => "reject".to_owned(),
    };
    let actual = match &got {
        Ok(r) => format!("admit by route {:?}", r.name),
        Err(refused) => format!("reject: {}", refused.reason),
    };
    Err(format!("test expects {expected}, got {actual}"))
}

/// The routing keys of `routes`, for [`run_test`].
pub(crate) fn keys_of(routes: &[Arc<Route>]) -> RouteKeys<Arc<Route>> {
    RouteKeys::new(routes.to_vec())
}

/// Routes of `cfg` whose access window has ended by `now` (`not_after <=
/// now`): stale grants, which `check` warns about. They are valid, and
/// refuse every connection.
pub fn ended_windows(cfg: &super::Config, now: SystemTime) -> Vec<&Route> {
    cfg.routes.iter().filter(|r| r.not_after.is_some_and(|t| t <= now)).map(|r| r.as_ref()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::test_route as route;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    #[test]
    fn admits_checks_source_then_endpoint_then_window() {
        let mut r = route("a", 1, None, &["10.0.0.0/8"], &["vpce-1"]);
        r.not_before = Some(T0 + Duration::from_secs(100));
        r.not_after = Some(T0 + Duration::from_secs(200));
        let open = T0 + Duration::from_secs(150);
        assert_eq!(admits(&r, ip("10.1.2.3"), Some("vpce-1"), open), Ok(()));
        assert_eq!(admits(&r, ip("11.1.2.3"), Some("vpce-2"), T0), Err(Reject::SourceNotAllowed));
        assert_eq!(admits(&r, ip("10.1.2.3"), Some("vpce-2"), T0), Err(Reject::EndpointNotAllowed));
        assert_eq!(admits(&r, ip("10.1.2.3"), None, open), Err(Reject::EndpointNotAllowed));
        assert_eq!(admits(&r, ip("10.1.2.3"), Some("vpce-1"), T0), Err(Reject::OutsideWindow));
        // A dual-stack listener shows IPv4 clients as IPv4-mapped IPv6.
        assert_eq!(admits(&r, ip("::ffff:10.1.2.3"), Some("vpce-1"), open), Ok(()));
        let v6 = route("b", 1, None, &["2001:db8::/32"], &[]);
        assert_eq!(admits(&v6, ip("2001:db8::1"), None, T0), Ok(()));
        assert_eq!(admits(&v6, ip("10.1.2.3"), None, T0), Err(Reject::SourceNotAllowed));
    }

    #[test]
    fn windows_are_half_open() {
        let mut r = route("a", 1, None, &["0.0.0.0/0"], &[]);
        let (nb, na) = (T0 + Duration::from_secs(100), T0 + Duration::from_secs(200));
        r.not_before = Some(nb);
        r.not_after = Some(na);
        assert_eq!(in_window(&r, nb - Duration::from_nanos(1)), Err(Reject::OutsideWindow));
        assert_eq!(in_window(&r, nb), Ok(()));
        assert_eq!(in_window(&r, na - Duration::from_nanos(1)), Ok(()));
        assert_eq!(in_window(&r, na), Err(Reject::OutsideWindow));
        r.not_before = None;
        assert_eq!(in_window(&r, T0), Ok(()), "no not_before: open since forever");
        r.not_after = None;
        assert_eq!(in_window(&r, T0 + Duration::from_secs(1 << 40)), Ok(()));
    }

    #[test]
    fn via_route_wins_over_port_route() {
        let routes: Vec<Arc<Route>> = vec![
            Arc::new(route("plain", 8022, None, &["0.0.0.0/0"], &[])),
            Arc::new(route("through-e1", 8022, Some("vpce-e1"), &["0.0.0.0/0"], &[])),
            Arc::new(route("only-via", 8023, Some("vpce-e1"), &["0.0.0.0/0"], &[])),
        ];
        let t = keys_of(&routes);
        let name = |p, e| t.lookup(p, e).map(|r| r.name.clone());
        assert_eq!(name(8022, Some("vpce-e1")).as_deref(), Some("through-e1"));
        assert_eq!(name(8022, Some("vpce-e2")).as_deref(), Some("plain"));
        assert_eq!(name(8022, None).as_deref(), Some("plain"));
        assert_eq!(name(8023, Some("vpce-e1")).as_deref(), Some("only-via"));
        assert_eq!(name(8023, None), None);
        assert_eq!(name(9999, None), None);
    }

    #[test]
    fn a_failing_test_says_what_happened_instead() {
        let routes = vec![Arc::new(route("web", 8022, None, &["10.0.0.0/8"], &[]))];
        let keys = keys_of(&routes);
        let t = |port, client: &str, expect| PolicyTest {
            port,
            client: ip(client),
            endpoint: None,
            at: None,
            expect,
        };
        let admit = |r: Option<&str>| Expect::Admit { route: r.map(Into::into) };
        let reject = |r: Option<&str>| Expect::Reject { reason: r.map(Into::into) };
        assert_eq!(run_test(&keys, &t(8022, "10.0.0.1", admit(Some("web"))), T0), Ok(()));
        assert_eq!(run_test(&keys, &t(8022, "10.0.0.1", admit(None)), T0), Ok(()));
        assert_eq!(run_test(&keys, &t(8022, "11.0.0.1", reject(Some("source_not_allowed"))), T0), Ok(()));
        assert_eq!(run_test(&keys, &t(9, "10.0.0.1", reject(None)), T0), Ok(()));
        let fail = |test| run_test(&keys, &test, T0).unwrap_err();
        assert_eq!(
            fail(t(8022, "11.0.0.1", admit(Some("web")))),
            "test expects admit by route \"web\", got reject: source_not_allowed"
        );
        assert_eq!(
            fail(t(8022, "10.0.0.1", admit(Some("db")))),
            "test expects admit by route \"db\", got admit by route \"web\""
        );
        assert_eq!(fail(t(9, "10.0.0.1", admit(None))), "test expects admit, got reject: no_route");
        assert_eq!(
            fail(t(8022, "10.0.0.1", reject(None))),
            "test expects reject, got admit by route \"web\""
        );
        assert_eq!(
            fail(t(8022, "11.0.0.1", reject(Some("outside_window")))),
            "test expects reject: outside_window, got reject: source_not_allowed"
        );
    }
}
