//! `GET /sessions` and `DELETE /sessions`: list and close running sessions
//! (SPEC.md "Control socket").
//!
//! The filters (`route`, `tenant`, `client`) are parsed here into a
//! [`Filter`]; the sessions come from the node's registry, and a close is a
//! close request on each selected entry (`close=operator`), which the
//! session carries out by itself within milliseconds (FIN to both sides,
//! then its `session closed` line).

use std::net::{IpAddr, SocketAddr};

use hyper::StatusCode;
use serde_json::{json, Value};

use crate::node::registry::{Entry, Registry, SessionId};
use crate::reason::CloseReason;

/// Which sessions a request selects; every given field must match.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Filter {
    route: Option<String>,
    tenant: Option<String>,
    client: Option<ClientMatch>,
}

/// `?client=`: an IP (any port) or one exact `IP:port`.
#[derive(Debug, PartialEq, Eq)]
enum ClientMatch {
    Ip(IpAddr),
    Addr(SocketAddr),
}

impl Filter {
    /// Parse a query string (`route=a&client=10.0.0.1`). Unknown or repeated
    /// keys and bad addresses are errors, worded for the operator.
    pub(crate) fn parse(query: Option<&str>) -> Result<Filter, String> {
        let mut f = Filter::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value).ok_or_else(|| format!("{key}: bad percent-encoding"))?;
            if value.is_empty() {
                return Err(format!("{key}: empty value"));
            }
            let repeated = match key {
                "route" => f.route.replace(value).is_some(),
                "tenant" => f.tenant.replace(value).is_some(),
                "client" => {
                    let m = parse_client(&value)?;
                    f.client.replace(m).is_some()
                }
                other => {
                    return Err(format!(
                        "unknown filter {other:?}: the filters are route=, tenant= and client="
                    ))
                }
            };
            if repeated {
                return Err(format!("{key} given twice"));
            }
        }
        Ok(f)
    }

    /// Whether no field is set (`DELETE /sessions` refuses that).
    pub(crate) fn is_empty(&self) -> bool {
        *self == Filter::default()
    }

    pub(crate) fn matches(&self, e: &Entry) -> bool {
        self.route.as_ref().is_none_or(|r| *r == e.route.name)
            && self.tenant.as_ref().is_none_or(|t| *t == e.route.tenant)
            && match self.client {
                None => true,
                Some(ClientMatch::Ip(ip)) => e.info.client.0.ip() == ip,
                Some(ClientMatch::Addr(a)) => e.info.client.0 == a,
            }
    }
}

fn parse_client(s: &str) -> Result<ClientMatch, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(ClientMatch::Addr(SocketAddr::new(a.ip().to_canonical(), a.port())));
    }
    if let Ok(ip) = s.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        return Ok(ClientMatch::Ip(ip.to_canonical()));
    }
    Err(format!("client: {s:?} is neither an IP address nor IP:port"))
}

/// Decode `%XX` escapes (RFC 3986; `+` is kept as it is). `None` for a
/// broken escape or a result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// One session as the listing shows it.
pub(crate) fn to_json(e: &Entry) -> Value {
    let live = e.live();
    let started = std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.started_unix_ms());
    json!({
        "id": e.id.to_string(),
        "route": e.route.name,
        "tenant": e.route.tenant,
        "port": e.info.port,
        "client": e.info.client.0.to_string(),
        "peer": e.info.peer.0.to_string(),
        "endpoint": e.info.endpoint,
        "target": e.route.target.to_string(),
        "started": humantime::format_rfc3339_millis(started).to_string(),
        "duration_ms": live.duration.as_millis() as u64,
        "bytes_to_target": live.to_target,
        "bytes_to_client": live.to_client,
        "idle_ms": live.idle.as_millis() as u64,
    })
}

/// An answer: status and JSON body.
pub(crate) type Answer = (StatusCode, Value);

fn error(code: StatusCode, message: String) -> Answer {
    (code, json!({ "error": message }))
}

/// `GET /sessions?…`
pub(crate) fn list(registry: &Registry, query: Option<&str>) -> Answer {
    match Filter::parse(query) {
        Ok(f) => (StatusCode::OK, registry.select(|e| f.matches(e)).iter().map(|e| to_json(e)).collect()),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

/// `DELETE /sessions?…`: at least one filter.
pub(crate) fn close_matching(registry: &Registry, query: Option<&str>) -> Answer {
    let f =
        match Filter::parse(query) {
            Ok(f) if f.is_empty() => return error(
                StatusCode::BAD_REQUEST,
                "DELETE /sessions needs a filter (route=, tenant= or client=), or use DELETE /sessions/ID"
                    .into(),
            ),
            Ok(f) => f,
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        };
    let closed = registry.close(|e| f.matches(e), CloseReason::Operator);
    (StatusCode::OK, closed.iter().map(|e| to_json(e)).collect())
}

/// `GET /sessions/ID`, or with `close` `DELETE /sessions/ID`.
pub(crate) fn one(registry: &Registry, id: &str, close: bool) -> Answer {
    let Some(entry) = SessionId::parse(id).and_then(|id| registry.get(id)) else {
        return error(StatusCode::NOT_FOUND, format!("no running session {id:?}"));
    };
    if close {
        entry.request_close(CloseReason::Operator);
    }
    (StatusCode::OK, to_json(&entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_and_refuse_clearly() {
        let f = Filter::parse(Some("route=a&tenant=t%2D1&client=10.0.0.1")).unwrap();
        assert_eq!(f.route.as_deref(), Some("a"));
        assert_eq!(f.tenant.as_deref(), Some("t-1"));
        assert_eq!(f.client, Some(ClientMatch::Ip("10.0.0.1".parse().unwrap())));
        let f = Filter::parse(Some("client=%5B::ffff:10.0.0.1%5D:22")).unwrap();
        assert_eq!(f.client, Some(ClientMatch::Addr("10.0.0.1:22".parse().unwrap())));
        let f = Filter::parse(Some("client=::1")).unwrap();
        assert_eq!(f.client, Some(ClientMatch::Ip("::1".parse().unwrap())));
        assert!(Filter::parse(None).unwrap().is_empty());
        assert!(Filter::parse(Some("")).unwrap().is_empty());
        for (q, says) in [
            ("user=x", "unknown filter"),
            ("route=a&route=b", "twice"),
            ("client=nope", "neither"),
            ("route=", "empty"),
            ("route=%zz", "percent"),
            ("route=%C3", "percent"),
        ] {
            let e = Filter::parse(Some(q)).unwrap_err();
            assert!(e.contains(says), "{q}: {e}");
        }
    }
}
