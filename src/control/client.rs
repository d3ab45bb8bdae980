//! The command-line side of the control socket: `portgate reload`,
//! `portgate sessions`, `portgate close`.
//!
//! Finds the socket (`--socket`, else the config's `[control] socket`, read
//! alone so that the rest of the file may be invalid, else
//! `$RUNTIME_DIRECTORY/control.sock`, else `/run/portgate/control.sock`),
//! sends one request with hyper's HTTP/1.1 client and turns the answer into
//! a line for stdout or the lines for stderr. The node decides everything
//! else.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::UnixStream;

use crate::config::defaults::{default_control_socket, FALLBACK_CONTROL_SOCKET};

/// Longer than the node's own bound on one exchange.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(70);

/// The socket `portgate reload` talks to. `Err` when the config turns the
/// control socket off and nothing else names one.
pub fn find_socket(explicit: Option<&Path>, config: &Path) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    match socket_in_config(config) {
        Some(s) if s.trim() == "off" => Err(format!(
            "{} sets [control] socket = \"off\": that node serves no control socket (pass --socket PATH, or send SIGHUP)",
            config.display()
        )),
        Some(s) => {
            let dir = config.parent().unwrap_or(Path::new(""));
            Ok(dir.join(s.trim()))
        }
        None => Ok(default_control_socket().unwrap_or_else(|| PathBuf::from(FALLBACK_CONTROL_SOCKET))),
    }
}

#[derive(Deserialize)]
struct OnlyControl {
    control: Option<OnlySocket>,
}

#[derive(Deserialize)]
struct OnlySocket {
    socket: Option<String>,
}

/// `[control] socket` as written, if the file sets it. Every other key is
/// ignored; a file that is not even valid TOML is scanned line by line for
/// the key, so a broken config still reaches the node that reports it.
fn socket_in_config(config: &Path) -> Option<String> {
    let text = std::fs::read_to_string(config).ok()?;
    if let Ok(c) = toml::from_str::<OnlyControl>(&text) {
        return c.control?.socket;
    }
    let mut in_control = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_control = line.trim_start_matches('[').trim_end_matches(']').trim() == "control";
        } else if in_control && line.starts_with("socket") {
            if let Ok(t) = toml::from_str::<OnlySocket>(line) {
                return t.socket;
            }
        }
    }
    None
}

/// One request on `socket`, answered within [`CLIENT_TIMEOUT`]: (status,
/// body), or why there is no answer.
fn exchange(socket: &Path, method: Method, path: &str) -> Result<(u16, Bytes), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("portgate: cannot start the runtime: {e}"))?;
    let answer = rt.block_on(async {
        tokio::time::timeout(CLIENT_TIMEOUT, send(socket, method, path))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {}s", CLIENT_TIMEOUT.as_secs())))
    });
    answer.map_err(|e| format!("portgate: control socket {}: {e}", socket.display()))
}

/// `POST /reload` on `socket`: `Ok` is the one-line summary of an applied
/// reload, `Err` every line to print on stderr.
pub fn reload(socket: &Path) -> Result<String, Vec<String>> {
    let (status, body) = exchange(socket, Method::POST, "/reload").map_err(|e| vec![e])?;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let names = |key: &str| -> String {
        let list: Vec<&str> =
            json[key].as_array().map(|a| a.iter().filter_map(|v| v.as_str()).collect()).unwrap_or_default();
        if list.is_empty() {
            "-".to_owned()
        } else {
            list.join(",")
        }
    };
    match (status, json["result"].as_str()) {
        (200, Some("success")) => Ok(format!(
            "reloaded: added {}; removed {}; changed {}; revoking {}; hash {}",
            names("added"),
            names("removed"),
            names("changed"),
            json["revoking"].as_u64().unwrap_or(0),
            json["hash"].as_str().unwrap_or("?"),
        )),
        (_, Some("failure")) => {
            let mut errors: Vec<String> = json["errors"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            errors.push(format!(
                "portgate: reload failed; the node keeps serving its previous config ({status})"
            ));
            Err(errors)
        }
        _ => Err(vec![format!(
            "portgate: control socket {}: unexpected answer {status}: {}",
            socket.display(),
            String::from_utf8_lossy(&body).trim()
        )]),
    }
}

async fn send(socket: &Path, method: Method, path: &str) -> Result<(u16, Bytes), String> {
    let stream = UnixStream::connect(socket).await.map_err(|e| format!("cannot reach the node: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "portgate")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, body))
}

/// `POST /upgrade` on `socket`: `Ok` is the line to print once the new
/// process serves, `Err` every line to print on stderr.
pub fn upgrade(socket: &Path) -> Result<String, Vec<String>> {
    let (status, body) = exchange(socket, Method::POST, "/upgrade").map_err(|e| vec![e])?;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    match (status, json["result"].as_str()) {
        (200, Some("success")) => Ok(format!(
            "upgraded: pid {} serves, {} sessions taken over",
            json["pid"].as_u64().unwrap_or(0),
            json["sessions"].as_u64().unwrap_or(0)
        )),
        (_, Some("failure")) => {
            let mut lines: Vec<String> = json["errors"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str().map(|s| format!("portgate: {s}"))).collect())
                .unwrap_or_default();
            lines.push("portgate: upgrade failed; the running process keeps serving everything".into());
            Err(lines)
        }
        _ => Err(vec![format!(
            "portgate: control socket {}: unexpected answer {status}: {}",
            socket.display(),
            String::from_utf8_lossy(&body).trim()
        )]),
    }
}

/// The filters of `portgate sessions` and `portgate close`.
#[derive(Debug, Default, Clone)]
pub struct SessionFilter {
    pub route: Option<String>,
    pub tenant: Option<String>,
    pub client: Option<String>,
}

impl SessionFilter {
    /// `route=…&tenant=…&client=…`, percent-encoded; empty without filters.
    fn query(&self) -> String {
        let pairs = [("route", &self.route), ("tenant", &self.tenant), ("client", &self.client)];
        let parts: Vec<String> =
            pairs.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v)))).collect();
        parts.join("&")
    }

    /// How the filter reads in a message: `route=a tenant=t`.
    pub fn describe(&self) -> String {
        self.query().replace('&', " ")
    }
}

/// Percent-encode everything but unreserved characters (RFC 3986).
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A JSON array answer (the listing and the bulk close), or the lines why not.
fn sessions_answer(socket: &Path, status: u16, body: &[u8]) -> Result<Vec<serde_json::Value>, String> {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
    match (status, json) {
        (200, serde_json::Value::Array(list)) => Ok(list),
        (_, j) if j["error"].is_string() => Err(format!("portgate: {}", j["error"].as_str().unwrap_or(""))),
        _ => Err(format!(
            "portgate: control socket {}: unexpected answer {status}: {}",
            socket.display(),
            String::from_utf8_lossy(body).trim()
        )),
    }
}

/// `GET /sessions` with `filter`.
pub fn sessions(socket: &Path, filter: &SessionFilter) -> Result<Vec<serde_json::Value>, String> {
    let q = filter.query();
    let path = if q.is_empty() { "/sessions".to_owned() } else { format!("/sessions?{q}") };
    let (status, body) = exchange(socket, Method::GET, &path)?;
    sessions_answer(socket, status, &body)
}

/// `DELETE /sessions?filter` (at least one filter).
pub fn close_matching(socket: &Path, filter: &SessionFilter) -> Result<Vec<serde_json::Value>, String> {
    let (status, body) = exchange(socket, Method::DELETE, &format!("/sessions?{}", filter.query()))?;
    sessions_answer(socket, status, &body)
}

/// `DELETE /sessions/ID`: `Ok(None)` when no such session runs.
pub fn close_id(socket: &Path, id: &str) -> Result<Option<serde_json::Value>, String> {
    let (status, body) = exchange(socket, Method::DELETE, &format!("/sessions/{}", encode(id)))?;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    match status {
        200 if json.is_object() => Ok(Some(json)),
        404 => Ok(None),
        _ => Err(format!(
            "portgate: control socket {}: unexpected answer {status}: {}",
            socket.display(),
            String::from_utf8_lossy(&body).trim()
        )),
    }
}

/// The table `portgate sessions` prints: one row per session, oldest first.
pub fn sessions_table(list: &[serde_json::Value]) -> String {
    let headers =
        ["ID", "ROUTE", "TENANT", "CLIENT", "ENDPOINT", "TARGET", "AGE", "TO_TARGET", "TO_CLIENT", "IDLE"];
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|e| {
            vec![
                s(&e["id"]),
                s(&e["route"]),
                s(&e["tenant"]),
                s(&e["client"]),
                s(&e["endpoint"]),
                s(&e["target"]),
                human_duration(n(&e["duration_ms"])),
                human_bytes(n(&e["bytes_to_target"])),
                human_bytes(n(&e["bytes_to_client"])),
                human_duration(n(&e["idle_ms"])),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (cell, w) in cells.iter().zip(&widths) {
            l.push_str(&format!("{cell:<w$}  "));
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&headers);
    for row in &rows {
        line(&row.iter().map(String::as_str).collect::<Vec<_>>());
    }
    out
}

/// `93s` → `1m33s`; `7384000` ms → `2h03m`.
fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// `1536` → `1.5KiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1}{}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_is_read_from_a_broken_config_too() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("p.toml");
        std::fs::write(&cfg, "[listen]\naddress = 7\n[control]\nsocket = \"c.sock\"\n").unwrap();
        assert_eq!(find_socket(None, &cfg).unwrap(), dir.path().join("c.sock"));
        std::fs::write(&cfg, "[listen\nbroken\n[control]\nsocket = \"/x/c.sock\"\n").unwrap();
        assert_eq!(find_socket(None, &cfg).unwrap(), PathBuf::from("/x/c.sock"));
        assert_eq!(find_socket(Some(Path::new("/y.sock")), &cfg).unwrap(), PathBuf::from("/y.sock"));
        std::fs::write(&cfg, "[control]\nsocket = \"off\"\n").unwrap();
        assert!(find_socket(None, &cfg).is_err());
    }

    #[test]
    fn table_cells_read_well() {
        assert_eq!(human_duration(0), "0s");
        assert_eq!(human_duration(93_000), "1m33s");
        assert_eq!(human_duration(7_384_000), "2h03m");
        assert_eq!(human_duration(90_000_000), "1d01h");
        assert_eq!(human_bytes(1023), "1023B");
        assert_eq!(human_bytes(1536), "1.5KiB");
        assert_eq!(human_bytes(3 << 30), "3.0GiB");
        let f = SessionFilter { route: Some("a b".into()), tenant: None, client: Some("[::1]:22".into()) };
        assert_eq!(f.query(), "route=a%20b&client=%5B::1%5D:22");
        let row = serde_json::json!({"id": "00ab", "route": "r", "tenant": "t", "client": "10.0.0.1:5",
            "endpoint": null, "target": "10.0.1.5:22", "duration_ms": 61_000, "bytes_to_target": 2048,
            "bytes_to_client": 5, "idle_ms": 1000});
        let t = sessions_table(&[row]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("ID    ROUTE  TENANT  CLIENT"), "{t}");
        assert!(
            lines[1].contains("10.0.0.1:5  -") && lines[1].contains("1m01s") && lines[1].contains("2.0KiB"),
            "{t}"
        );
    }
}
