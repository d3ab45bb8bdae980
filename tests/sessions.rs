//! Who is connected, and cutting a session off: session ids, the `session
//! opened` line, `GET/DELETE /sessions` on the control socket, and
//! `portgate sessions` / `portgate close`, end to end with the real binary.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::control::{portgate_cmd, request, request_json};
use common::*;
use serde_json::Value;

/// A node with its control socket next to its config.
fn start(config: Config) -> (Portgate, PathBuf) {
    let pg = Portgate::start(config.set("control", "socket", "control.sock"));
    let socket = pg.dir.path().join("control.sock");
    (pg, socket)
}

/// Exchange `msg` with an echo target through `s`.
fn echo(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).expect("the session stopped echoing");
    assert_eq!(got, msg);
}

/// A session that has exchanged a byte, so its target answered and it is
/// listed; returns it with its id.
fn open(socket: &std::path::Path, port: u16, from: &str) -> (TcpStream, String) {
    let mut s = connect_from(from, addr(port));
    echo(&mut s, b"1");
    let local = s.local_addr().unwrap().to_string();
    let list = request_json(socket, "GET", &format!("/sessions?client={local}"));
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    let id = list[0]["id"].as_str().unwrap().to_owned();
    (s, id)
}

/// The one listed session, once its `field` reads `want` (within [`SOON`]).
/// A peer can read bytes a few instructions before the forwarder counts
/// them (the write wakes the reader, which may run first), so a count read
/// right after the peer's read can be one write behind.
fn listed_once(socket: &std::path::Path, field: &str, want: u64) -> Value {
    let deadline = Instant::now() + SOON;
    loop {
        let list = request_json(socket, "GET", "/sessions");
        assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
        let e = list[0].clone();
        if e[field] == want {
            return e;
        }
        assert!(Instant::now() < deadline, "{field} stayed at {} (want {want}): {e}", e[field]);
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn ids(v: &Value) -> HashSet<String> {
    v.as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect()
}

/// `2026-12-02T15:56:15.273591Z` as microseconds since the Unix epoch.
fn rfc3339_micros(ts: &str) -> i64 {
    let (date, time) = ts.trim_end_matches('Z').split_once('T').unwrap();
    let d: Vec<i64> = date.split('-').map(|x| x.parse().unwrap()).collect();
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms.split(':').map(|x| x.parse().unwrap()).collect();
    let micros: i64 = format!("{frac:0<6}")[..6].parse().unwrap();
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 { (d[0] - 1, d[1] + 9) } else { (d[0], d[1] - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2]) * 1_000_000) + micros
}

fn now_micros() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as i64
}

#[test]
fn ids_are_unique_and_every_session_is_on_record_from_its_first_byte() {
    let echo_addr = echo_server();
    let port = free_port();
    let (pg, _socket) = start(Config::loopback().route("echo", port, echo_addr));

    // The opened line is written before the first byte moves: its timestamp
    // is earlier than the echo the client receives.
    let mut s = connect(addr(port));
    echo(&mut s, b"x");
    let echoed_at = now_micros();
    let opened = pg.wait_event("session opened", 1);
    for key in ["id", "route", "tenant", "port", "client", "peer", "endpoint", "target"] {
        assert!(!opened[key].is_null(), "session opened has no {key}: {opened}");
    }
    assert_eq!(opened["client"], s.local_addr().unwrap().to_string());
    let opened_at = rfc3339_micros(opened["timestamp"].as_str().unwrap());
    assert!(opened_at <= echoed_at, "opened at {opened_at}, but the echo arrived at {echoed_at}");
    drop(s);
    let closed = pg.wait_event("session closed", 1);
    assert_eq!(closed["id"], opened["id"]);

    // Thousands of sessions: every id is unique, well formed, and the same
    // on a session's opened and closed lines.
    const N: usize = 2000;
    for i in 0..N {
        let msg = format!("{i}");
        assert_eq!(roundtrip(connect(addr(port)), msg.as_bytes()), msg.as_bytes());
    }
    pg.wait_log_n(|l| l.contains("\"session closed\""), N + 1, SOON);
    let opened: Vec<String> = pg
        .events(|v| v["message"] == "session opened")
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    let closed: HashSet<String> = pg
        .events(|v| v["message"] == "session closed")
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(opened.len(), N + 1);
    let unique: HashSet<&String> = opened.iter().collect();
    assert_eq!(unique.len(), N + 1, "an id was given twice");
    assert_eq!(closed.len(), N + 1);
    for id in &opened {
        assert!(closed.contains(id), "session {id} opened but never closed");
        assert!((8..=32).contains(&id.len()), "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'), "{id}");
        assert!(id.as_bytes()[0].is_ascii_alphanumeric(), "{id}");
    }
    let series = r#"portgate_sessions_closed_total{route="echo",close="client_closed"}"#;
    pg.wait_metric(series, (N + 1) as f64);
}

#[test]
fn the_listing_is_live_while_a_session_runs() {
    let echo_addr = echo_server();
    let port = free_port();
    let (_pg, socket) = start(Config::loopback().with(Route::new("db", port, echo_addr).set("tenant", "b")));
    let mut s = connect(addr(port));

    // 1 MiB each way, and the session still open.
    let mib = pattern(1 << 20, 7);
    let mut w = s.try_clone().unwrap();
    let data = mib.clone();
    let writer = std::thread::spawn(move || w.write_all(&data).unwrap());
    let mut back = vec![0u8; mib.len()];
    s.read_exact(&mut back).unwrap();
    writer.join().unwrap();
    assert_eq!(back, mib);
    let quiet_since = Instant::now();

    let e = &listed_once(&socket, "bytes_to_client", 1 << 20);
    assert_eq!(e["bytes_to_target"], 1 << 20, "{e}");
    assert_eq!(e["route"], "db");
    assert_eq!(e["tenant"], "b");
    assert_eq!(e["port"], port);
    assert_eq!(e["client"], s.local_addr().unwrap().to_string());
    assert_eq!(e["peer"], s.local_addr().unwrap().to_string());
    assert_eq!(e["endpoint"], Value::Null);
    assert_eq!(e["target"], echo_addr.to_string());
    let started = rfc3339_micros(e["started"].as_str().unwrap());
    assert!(started <= now_micros() && started > now_micros() - 60_000_000, "{e}");

    // Idle time grows while nothing moves, and resets when something does.
    let deadline = Instant::now() + SOON;
    let idle = loop {
        let asked_at = quiet_since.elapsed();
        let e = request_json(&socket, "GET", "/sessions")[0].clone();
        let idle = e["idle_ms"].as_u64().unwrap();
        assert!(idle + 1 >= asked_at.as_millis() as u64, "idle_ms {idle} but quiet for {asked_at:?}");
        assert!(idle <= e["duration_ms"].as_u64().unwrap(), "{e}");
        if idle >= 300 {
            break idle;
        }
        assert!(Instant::now() < deadline, "idle_ms stayed at {idle}");
        std::thread::sleep(Duration::from_millis(50));
    };
    echo(&mut s, b"more");
    let e = request_json(&socket, "GET", "/sessions")[0].clone();
    assert!(e["idle_ms"].as_u64().unwrap() < idle, "{e}");
    assert_eq!(e["bytes_to_target"], (1 << 20) + 4);

    // A session and what GET /sessions/ID says of it agree.
    let id = e["id"].as_str().unwrap();
    let one = request_json(&socket, "GET", &format!("/sessions/{id}"));
    assert_eq!(one["id"], id);
    let (code, _) = request(&socket, "GET", "/sessions/0000000000000000");
    assert_eq!(code, 404);
}

/// A target whose side of each session the test holds.
struct HeldTarget {
    listener: TcpListener,
}

impl HeldTarget {
    fn new() -> HeldTarget {
        HeldTarget { listener: TcpListener::bind("127.0.0.1:0").unwrap() }
    }
    fn addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap()
    }
    fn accept(&self) -> TcpStream {
        let (s, _) = self.listener.accept().unwrap();
        s.set_read_timeout(Some(SOON)).unwrap();
        s
    }
}

/// `s` reads EOF (not an error, not data) within one second.
fn eof_within_a_second(s: &mut TcpStream, who: &str) {
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => {}
        other => panic!("{who}: wanted EOF within 1 s, got {other:?}"),
    }
}

#[test]
fn an_operator_close_is_a_fin_on_both_sides_logged_as_operator() {
    let target = HeldTarget::new();
    let port = free_port();
    let (pg, socket) = start(Config::loopback().route("ssh", port, target.addr()));
    let series = r#"portgate_sessions_closed_total{route="ssh",close="operator"}"#;
    assert_eq!(pg.metric(series), Some(0.0));
    for close in ["client_closed", "target_closed", "idle_timeout", "revoked", "shutdown", "error", "expired"]
    {
        let s = format!("portgate_sessions_closed_total{{route=\"ssh\",close=\"{close}\"}}");
        assert_eq!(pg.metric(&s), Some(0.0), "{s} not there from startup");
    }

    let mut client = connect(addr(port));
    client.write_all(b"hello").unwrap();
    let mut server = target.accept();
    let mut b = [0u8; 5];
    server.read_exact(&mut b).unwrap();
    let id = listed_once(&socket, "bytes_to_target", 5)["id"].as_str().unwrap().to_owned();

    let closed = request_json(&socket, "DELETE", &format!("/sessions/{id}"));
    assert_eq!(closed["id"], id.as_str());
    assert_eq!(closed["bytes_to_target"], 5);
    eof_within_a_second(&mut client, "client");
    eof_within_a_second(&mut server, "target");
    let line = pg.wait_event("session closed", 1);
    assert_eq!(line["id"], id.as_str());
    assert_eq!(line["close"], "operator");
    pg.wait_metric(series, 1.0);
    assert_eq!(request_json(&socket, "GET", "/sessions"), serde_json::json!([]));
    let (code, body) = request(&socket, "DELETE", &format!("/sessions/{id}"));
    assert_eq!(code, 404, "{body}");

    // `portgate close ID` does the same from the command line.
    let mut client = connect(addr(port));
    client.write_all(b"x").unwrap();
    let mut server = target.accept();
    server.read_exact(&mut b[..1]).unwrap();
    let id = request_json(&socket, "GET", "/sessions")[0]["id"].as_str().unwrap().to_owned();
    let cfg = pg.config_path.to_str().unwrap();
    let o = portgate_cmd(&["close", "-c", cfg, &id]);
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains(&id), "{o:?}");
    eof_within_a_second(&mut client, "client");
    eof_within_a_second(&mut server, "target");
    pg.wait_metric(series, 2.0);

    // An unknown id: exit 1, said on stderr.
    let o = portgate_cmd(&["close", "-c", cfg, &id]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("no running session"), "{o:?}");
}

#[test]
fn filters_select_exactly_and_bad_requests_are_refused() {
    let echo_addr = echo_server();
    let base = free_ports(3);
    let (pg, socket) = start(
        Config::loopback()
            .with(Route::new("a1", base, echo_addr).set("tenant", "a"))
            .with(Route::new("a2", base + 1, echo_addr).set("tenant", "a"))
            .with(Route::new("b1", base + 2, echo_addr).set("tenant", "b")),
    );
    // (route, client address) of six sessions.
    let plan = [
        (base, "127.0.0.11"),
        (base, "127.0.0.12"),
        (base + 1, "127.0.0.11"),
        (base + 2, "127.0.0.11"),
        (base + 2, "127.0.0.13"),
        (base + 2, "127.0.0.13"),
    ];
    let mut open_sessions: Vec<(TcpStream, String)> =
        plan.iter().map(|(port, from)| open(&socket, *port, from)).collect();
    let all_ids: Vec<String> = open_sessions.iter().map(|(_, id)| id.clone()).collect();
    let id = |i: usize| all_ids[i].clone();
    let set = |v: &[usize]| -> HashSet<String> { v.iter().map(|i| id(*i)).collect() };
    let get = |q: &str| ids(&request_json(&socket, "GET", &format!("/sessions{q}")));

    assert_eq!(get(""), set(&[0, 1, 2, 3, 4, 5]));
    assert_eq!(get("?route=a1"), set(&[0, 1]));
    assert_eq!(get("?tenant=a"), set(&[0, 1, 2]));
    assert_eq!(get("?tenant=b"), set(&[3, 4, 5]));
    assert_eq!(get("?client=127.0.0.11"), set(&[0, 2, 3]));
    assert_eq!(get("?client=127.0.0.11&tenant=a"), set(&[0, 2]));
    assert_eq!(get("?client=127.0.0.11&route=b1&tenant=b"), set(&[3]));
    assert_eq!(get("?route=a1&tenant=b"), set(&[]));
    let exact = open_sessions[4].0.local_addr().unwrap().to_string();
    assert_eq!(get(&format!("?client={exact}")), set(&[4]));
    assert_eq!(get("?route=nope"), set(&[]));

    for q in ["?user=x", "?route=a1&route=a2", "?client=not-an-ip", "?route="] {
        let (code, body) = request(&socket, "GET", &format!("/sessions{q}"));
        assert_eq!(code, 400, "{q}: {body}");
        assert!(body.contains("error"), "{q}: {body}");
    }
    let (code, body) = request(&socket, "DELETE", "/sessions");
    assert_eq!(code, 400, "{body}");
    let (code, body) = request(&socket, "PUT", "/sessions");
    assert_eq!(code, 405, "{body}");
    assert_eq!(request_json(&socket, "DELETE", "/sessions?route=nope"), serde_json::json!([]));
    // The TCP admin port never offers the verbs.
    assert_eq!(http_get(pg.admin, "/sessions").0, 404);

    // Close one client's sessions: exactly those end, the rest still echo.
    let closed = request_json(&socket, "DELETE", "/sessions?client=127.0.0.13");
    assert_eq!(ids(&closed), set(&[4, 5]));
    for i in [4, 5] {
        eof_within_a_second(&mut open_sessions[i].0, "a closed client");
    }
    for (i, (s, _)) in open_sessions.iter_mut().enumerate().take(4) {
        echo(s, format!("still {i}").as_bytes());
    }
    assert_eq!(get(""), set(&[0, 1, 2, 3]));

    // By tenant from the command line, with --socket winning over -c.
    let mut wrong = pg.config_path.clone();
    wrong.set_file_name("wrong.toml");
    std::fs::write(&wrong, "[control]\nsocket = \"nothing-here.sock\"\n").unwrap();
    let (cfg, sock) = (wrong.to_str().unwrap(), socket.to_str().unwrap());
    let o = portgate_cmd(&["sessions", "-c", cfg, "--socket", sock, "--tenant", "a", "--json"]);
    assert!(o.status.success(), "{o:?}");
    let listed: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ids(&listed), set(&[0, 1, 2]));
    let o = portgate_cmd(&["sessions", "-c", cfg]);
    assert_eq!(o.status.code(), Some(1), "the wrong config's socket answered: {o:?}");
    let o = portgate_cmd(&["sessions", "-c", pg.config_path.to_str().unwrap(), "--route", "a1"]);
    assert!(o.status.success(), "{o:?}");
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.starts_with("ID"), "{table}");
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(table.contains(&id(0)) && table.contains(&id(1)), "{table}");

    let o = portgate_cmd(&["close", "--socket", sock, "--tenant", "a"]);
    assert!(o.status.success(), "{o:?}");
    let said = String::from_utf8_lossy(&o.stdout);
    for i in [0, 1, 2] {
        assert!(said.contains(&id(i)), "{said}");
        eof_within_a_second(&mut open_sessions[i].0, "a closed client");
    }
    echo(&mut open_sessions[3].0, b"the last one");
    let o = portgate_cmd(&["close", "--socket", sock, "--route", "a1"]);
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("nothing closed"), "{o:?}");
    let series = r#"portgate_sessions_closed_total{route="b1",close="operator"}"#;
    pg.wait_metric(series, 2.0);
}

#[test]
fn a_failed_dial_and_a_reloaded_route_count_in_sessions_closed() {
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let base = free_ports(2);
    let (pg, socket) = start(Config::loopback().route("dead", base, dead));
    let mut s = connect(addr(base));
    s.write_all(b"x").unwrap();
    let line = pg.wait_event("session closed", 1);
    assert_eq!(line["close"], "error");
    let id = line["id"].as_str().unwrap();
    assert_eq!(id.len(), 16, "{line}");
    pg.wait_metric(r#"portgate_sessions_closed_total{route="dead",close="error"}"#, 1.0);
    assert_eq!(pg.count_logs(|l| l.contains("session opened")), 0, "a failed dial was opened");
    assert_eq!(request_json(&socket, "GET", "/sessions"), serde_json::json!([]));

    // A route added by reload has every close series at once.
    let echo_addr = echo_server();
    pg.write_config(
        Config::loopback().set("control", "socket", "control.sock").route("dead", base, dead).route(
            "new",
            base + 1,
            echo_addr,
        ),
    );
    assert_eq!(pg.reload()["message"], "config reloaded");
    for close in ["client_closed", "operator", "max_duration", "expired", "error", "shutdown"] {
        let series = format!("portgate_sessions_closed_total{{route=\"new\",close=\"{close}\"}}");
        assert_eq!(pg.metric(&series), Some(0.0), "{series}");
    }
}
