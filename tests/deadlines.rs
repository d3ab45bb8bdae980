//! The clock's closes, end to end with the real binary: at a route's
//! `not_after` its running sessions (idle or moving data) are closed with
//! FIN on both sides and `close=expired`, and the next connection is
//! refused; a reload that moves `not_after` moves the close; `max_session`
//! (a route's own, the `[timeouts]` default, or `"off"`) closes with
//! `close=max_duration`, counted from `session opened`.
//!
//! The deadlines are a second or two ahead of the test's start, so each
//! test takes a few seconds. Every bound is checked against the wall clock
//! (the node judges windows by it too); "within a second" is the contract's
//! bound, and each wait gives the node a few seconds more before it fails,
//! so a late close is reported with how late it was.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

/// The contract's bound for a close at `not_after`.
const WITHIN: Duration = Duration::from_secs(1);
/// How much longer than a bound a wait lasts before it gives up.
const GRACE: Duration = Duration::from_secs(3);

fn now() -> SystemTime {
    SystemTime::now()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// `t`, to the millisecond, in RFC 3339 at `minutes` east of UTC; and the
/// instant that text names (what the node will read).
fn instant(t: SystemTime, minutes: i32) -> (String, SystemTime) {
    let offset = UtcOffset::from_whole_seconds(minutes * 60).unwrap();
    let t = OffsetDateTime::from(t);
    let t = t.replace_nanosecond(u32::from(t.millisecond()) * 1_000_000).unwrap();
    let text = t.to_offset(offset).format(&Rfc3339).unwrap();
    (text, SystemTime::from(t))
}

/// The `timestamp` of a log event.
fn logged_at(ev: &Value) -> SystemTime {
    let ts = ev["timestamp"].as_str().unwrap_or_else(|| panic!("no timestamp: {ev}"));
    SystemTime::from(OffsetDateTime::parse(ts, &Rfc3339).unwrap())
}

/// `b - a` in seconds, negative when `b` is earlier.
fn secs(a: SystemTime, b: SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// `t` is in `[from, from + within]`.
fn assert_between(who: &str, t: SystemTime, from: SystemTime, within: Duration) {
    let late = secs(from, t);
    eprintln!("{who}: closed {late:+.3} s after the deadline");
    assert!(
        (0.0..=within.as_secs_f64()).contains(&late),
        "{who}: closed {late:+.3} s after the deadline, wanted within [0, {within:?}]"
    );
}

/// A target the test holds: each connection the node makes is handed to
/// the test, which plays the server.
struct Target(TcpListener);

impl Target {
    fn new() -> Target {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        Target(l)
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.0.local_addr().unwrap()
    }

    /// The node's next connection, within [`SOON`].
    fn accept(&self) -> TcpStream {
        let deadline = Instant::now() + SOON;
        loop {
            match self.0.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(SOON)).unwrap();
                    return s;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    thread::sleep(ms(5));
                }
                Err(e) => panic!("the node did not dial the target within {SOON:?}: {e}"),
            }
        }
    }
}

/// `msg` from `a` arrives at `b`.
fn pass(a: &mut TcpStream, b: &mut TcpStream, msg: &[u8]) {
    a.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    b.read_exact(&mut got).expect("the session stopped forwarding");
    assert_eq!(got, msg);
}

/// A session through `port` to `target`, with a byte each way through it:
/// (the client's end, the target's end).
fn open(port: u16, target: &Target) -> (TcpStream, TcpStream) {
    let mut client = connect(addr(port));
    client.write_all(b"hello").unwrap();
    let mut server = target.accept();
    let mut b = [0u8; 5];
    server.read_exact(&mut b).unwrap();
    pass(&mut server, &mut client, b"olleh");
    (client, server)
}

/// The wall-clock instant `s` reads EOF, having read nothing before it;
/// fails on data, an error, or no EOF by `by`.
fn eof_by(s: &mut TcpStream, who: &str, by: SystemTime) -> SystemTime {
    let left = by.duration_since(now()).unwrap_or_default().max(ms(1));
    s.set_read_timeout(Some(left)).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => now(),
        Ok(n) => panic!("{who}: wanted EOF, got {n} bytes"),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("{who}: wanted EOF, still open when the wait ended")
        }
        Err(e) => panic!("{who}: wanted EOF, got {e}"),
    }
}

/// `s` stays open, with nothing to read, until `until`.
fn quiet_until(s: &mut TcpStream, who: &str, until: SystemTime) {
    while let Ok(left) = until.duration_since(now()) {
        s.set_read_timeout(Some(left.max(ms(1)))).unwrap();
        let mut b = [0u8; 64];
        match s.read(&mut b) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            other => panic!("{who}: wanted the session to stay open, got {other:?}"),
        }
    }
}

/// The `session opened` event of each of `n` sessions, by route name (one
/// session per route).
fn opened_by_route(pg: &Portgate, n: usize) -> std::collections::HashMap<String, Value> {
    pg.wait_event("session opened", n);
    pg.events(|v| v["message"] == "session opened")
        .into_iter()
        .map(|v| (v["route"].as_str().unwrap().to_owned(), v))
        .collect()
}

fn closed_total(route: &str, close: &str) -> String {
    format!("portgate_sessions_closed_total{{route=\"{route}\",close=\"{close}\"}}")
}

/// Send a byte (so the node does not take it for a probe), then expect the
/// connection to be closed without an answer.
fn refused(mut s: TcpStream) {
    s.write_all(b"SSH-2.0-test\r\n").unwrap();
    expect_closed(s);
}

/// What one end of a streaming session saw.
struct Stream {
    /// When it read EOF, or the error it got instead.
    eof: Result<SystemTime, String>,
    /// Bytes it read.
    read: u64,
    /// When it last read data.
    last_data: Option<SystemTime>,
}

/// Read `s` to EOF; with `echo`, write back what arrives (until writing
/// fails: the node may reset the direction it no longer reads).
fn read_to_eof(mut s: TcpStream, echo: bool, by: SystemTime) -> Stream {
    let mut out = Stream { eof: Err(String::new()), read: 0, last_data: None };
    let mut writing = echo;
    let mut buf = vec![0u8; 16 << 10];
    out.eof = loop {
        let Ok(left) = by.duration_since(now()) else {
            break Err("no EOF by the deadline".into());
        };
        s.set_read_timeout(Some(left.max(ms(1)))).unwrap();
        match s.read(&mut buf) {
            Ok(0) => break Ok(now()),
            Ok(n) => {
                out.read += n as u64;
                out.last_data = Some(now());
                if writing && s.write_all(&buf[..n]).is_err() {
                    writing = false;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => break Err(e.to_string()),
        }
    };
    out
}

#[test]
fn at_not_after_an_idle_and_a_streaming_session_close_with_fin_on_both_sides() {
    let target = Target::new();
    let other_target = Target::new();
    let base = free_ports(2);
    let (port, other) = (base, base + 1);
    // Written at -05:30.
    let (text, end) = instant(now() + ms(2000), -330);
    let pg = Portgate::start(
        Config::loopback()
            .with(Route::new("grant", port, target.addr()).set("not_after", text))
            .with(Route::new("other", other, other_target.addr())),
    );
    let series = closed_total("grant", "expired");
    assert_eq!(pg.metric(&series), Some(0.0));

    let (mut idle, mut idle_target) = open(port, &target);
    // A session on a route without a window, on the same node.
    let (mut bystander, mut bystander_target) = open(other, &other_target);
    let (streaming, streaming_target) = open(port, &target);
    let by = end + WITHIN + GRACE;
    // The target echoes; the client writes 4 KiB every 2 ms and reads the
    // echoes, until the session ends (or well past the deadline).
    let echo = thread::spawn(move || read_to_eof(streaming_target, true, by));
    let mut w = streaming.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let chunk = pattern(4096, 1);
        let mut wrote = 0u64;
        while now() < by && w.write_all(&chunk).is_ok() {
            wrote += chunk.len() as u64;
            thread::sleep(ms(2));
        }
        wrote
    });
    let reader = thread::spawn(move || read_to_eof(streaming, false, by));
    assert!(now() < end, "the sessions opened only after not_after (a slow machine?); nothing tested");

    let idle_eof = eof_by(&mut idle, "idle client", by);
    let idle_target_eof = eof_by(&mut idle_target, "idle session's target", by);
    let client = reader.join().unwrap();
    let server = echo.join().unwrap();
    let wrote = writer.join().unwrap();
    let client_eof = client.eof.unwrap_or_else(|e| panic!("streaming client: wanted EOF, got {e}"));
    let server_eof = server.eof.unwrap_or_else(|e| panic!("streaming session's target: wanted EOF, got {e}"));
    assert_between("idle client", idle_eof, end, WITHIN);
    assert_between("idle session's target", idle_target_eof, end, WITHIN);
    assert_between("streaming client", client_eof, end, WITHIN);
    assert_between("streaming session's target", server_eof, end, WITHIN);
    // It was streaming when the window ended, and what came back was echoed.
    let last = client.last_data.expect("the streaming client read no echo");
    assert!(secs(last, end) < 0.5, "the last echo arrived {:.3} s before not_after", secs(last, end));
    assert!(client.read <= server.read && server.read <= wrote, "{} {} {wrote}", client.read, server.read);

    pg.wait_log_n(|l| l.contains("\"message\":\"session closed\""), 2, SOON);
    let closed = pg.events(|v| v["message"] == "session closed");
    assert_eq!(closed.len(), 2, "{closed:?}");
    for ev in &closed {
        assert_eq!(ev["route"], "grant", "{ev}");
        assert_eq!(ev["close"], "expired", "{ev}");
    }
    pg.wait_metric(&series, 2.0);
    assert_eq!(pg.metric(&closed_total("other", "expired")), Some(0.0));

    // The route without a window still forwards.
    pass(&mut bystander, &mut bystander_target, b"still here");
    pass(&mut bystander_target, &mut bystander, b"so am I");

    // After not_after the route refuses.
    refused(connect(addr(port)));
    let line = pg.wait_log(|l| l.contains("\"message\":\"connection rejected\""), SOON);
    let ev = parse(&line);
    assert_eq!(ev["route"], "grant", "{ev}");
    assert_eq!(ev["reason"], "outside_window", "{ev}");
    pg.wait_metric("portgate_connections_rejected_total{route=\"grant\",reason=\"outside_window\"}", 1.0);
}

#[test]
fn a_reload_moving_not_after_later_moves_the_close() {
    let target = Target::new();
    let port = free_port();
    let route = |not_after: String| Route::new("grant", port, target.addr()).set("not_after", not_after);
    // Written at +09:00, then at Z.
    let (text, first) = instant(now() + ms(2000), 9 * 60);
    let (later_text, later) = instant(first + ms(1500), 0);
    let pg = Portgate::start(Config::loopback().with(route(text)));
    let (mut client, mut server) = open(port, &target);

    pg.write_config(Config::loopback().with(route(later_text)));
    assert_eq!(pg.reload()["message"], "config reloaded");
    assert!(now() < first, "the reload came after the first not_after (a slow machine?); nothing tested");

    // The old instant passes, and the contract's second after it: still open.
    quiet_until(&mut client, "client", first + WITHIN);
    pass(&mut client, &mut server, b"past the old end");
    pass(&mut server, &mut client, b"and back");
    // Closed at the new one.
    let by = later + WITHIN + GRACE;
    assert_between("client", eof_by(&mut client, "client", by), later, WITHIN);
    assert_between("target", eof_by(&mut server, "target", by), later, WITHIN);
    let closed = pg.wait_event("session closed", 1);
    assert_eq!(closed["close"], "expired", "{closed}");
    pg.wait_metric(&closed_total("grant", "expired"), 1.0);
    assert_eq!(pg.metric(&closed_total("grant", "revoked")), Some(0.0));
}

#[test]
fn a_reload_moving_not_after_earlier_closes_at_the_earlier_instant() {
    let target = Target::new();
    let port = free_port();
    let route = |not_after: String| Route::new("grant", port, target.addr()).set("not_after", not_after);
    let (text, _) = instant(now() + Duration::from_secs(3600), 0);
    let pg = Portgate::start(Config::loopback().with(route(text)));
    let (mut client, mut server) = open(port, &target);

    // Written at -05:30: still in the future, far before the old end.
    let (earlier_text, earlier) = instant(now() + ms(1500), -330);
    pg.write_config(Config::loopback().with(route(earlier_text)));
    assert_eq!(pg.reload()["message"], "config reloaded");
    assert!(now() < earlier, "the reload came after the new not_after (a slow machine?); nothing tested");

    let by = earlier + WITHIN + GRACE;
    assert_between("client", eof_by(&mut client, "client", by), earlier, WITHIN);
    assert_between("target", eof_by(&mut server, "target", by), earlier, WITHIN);
    let closed = pg.wait_event("session closed", 1);
    assert_eq!(closed["close"], "expired", "{closed}");
    pg.wait_metric(&closed_total("grant", "expired"), 1.0);
    assert_eq!(pg.metric(&closed_total("grant", "revoked")), Some(0.0));
}

#[test]
fn max_session_closes_with_max_duration_a_routes_own_the_default_and_off() {
    let (own_target, default_target, off_target) = (Target::new(), Target::new(), Target::new());
    let base = free_ports(3);
    let (own, default, off) = (base, base + 1, base + 2);
    let default_max = ms(1000);
    let own_max = ms(2500);
    let cfg = Config::loopback()
        .set("timeouts", "max_session", "1s")
        .with(Route::new("own", own, own_target.addr()).set("max_session", "2500ms"))
        .with(Route::new("default", default, default_target.addr()))
        .with(Route::new("off", off, off_target.addr()).set("max_session", "off"));
    let pg = Portgate::start(cfg);
    let (mut own_c, mut own_t) = open(own, &own_target);
    let (mut default_c, mut default_t) = open(default, &default_target);
    let (mut off_c, mut off_t) = open(off, &off_target);
    let opened = opened_by_route(&pg, 3);
    let opened_at = |route: &str| logged_at(&opened[route]);
    // The contract's bound here: closed within 1.5 s of reaching max_session.
    let within = ms(1500);

    // The default (1 s) closes the route that sets none; the route's own
    // (2.5 s) replaces it.
    for (route, max, client, server) in
        [("default", default_max, &mut default_c, &mut default_t), ("own", own_max, &mut own_c, &mut own_t)]
    {
        let due = opened_at(route) + max;
        let by = due + within + GRACE;
        assert_between(&format!("{route}: client"), eof_by(client, "client", by), due, within);
        assert_between(&format!("{route}: target"), eof_by(server, "target", by), due, within);
        let line = pg.wait_log(
            |l| l.contains("\"message\":\"session closed\"") && l.contains(&format!("\"route\":\"{route}\"")),
            SOON,
        );
        let ev = parse(&line);
        assert_eq!(ev["close"], "max_duration", "{ev}");
        assert_eq!(ev["id"], opened[route]["id"], "{ev}");
        let lasted = ev["duration_ms"].as_u64().unwrap();
        assert!(lasted >= max.as_millis() as u64, "{route}: closed after {lasted} ms, before max_session");
        pg.wait_metric(&closed_total(route, "max_duration"), 1.0);
    }

    // "off" under the default: still forwarding a second past the default.
    let age = secs(opened_at("off"), now());
    assert!(age >= (default_max + WITHIN).as_secs_f64(), "only {age:.3} s old");
    pass(&mut off_c, &mut off_t, b"no limit");
    pass(&mut off_t, &mut off_c, b"none");
    assert_eq!(pg.metric(&closed_total("off", "max_duration")), Some(0.0));
    off_c.shutdown(Shutdown::Write).unwrap();
    eof_by(&mut off_t, "off: target", now() + SOON);
    drop(off_t);
    let closed = pg
        .wait_log(|l| l.contains("\"message\":\"session closed\"") && l.contains("\"route\":\"off\""), SOON);
    assert_eq!(parse(&closed)["close"], "client_closed", "{closed}");
}

/// SPEC, "Windows and reload": a reload that moves a route's window so that
/// a running session is outside it revokes that session after
/// `revoke_grace` (`close=revoked`). Moving `not_after` into the past is
/// such a move: the deadline keeper, which the reload pokes, must leave the
/// session to the revocation (a window counts as ending only if it ended
/// while the config serving now was serving).
#[test]
fn a_reload_moving_not_after_into_the_past_revokes_after_revoke_grace() {
    let target = Target::new();
    let port = free_port();
    let route = |not_after: String| Route::new("grant", port, target.addr()).set("not_after", not_after);
    let base = Config::loopback().set("timeouts", "revoke_grace", "1s");
    let (text, _) = instant(now() + Duration::from_secs(3600), 0);
    let pg = Portgate::start(base.clone().with(route(text)));
    let (mut client, mut server) = open(port, &target);

    let (past, _) = instant(now() - Duration::from_secs(60), 9 * 60);
    pg.write_config(base.with(route(past)));
    let reloaded = pg.reload();
    assert_eq!(reloaded["message"], "config reloaded");
    let closed = pg.wait_event("session closed", 1);
    assert_eq!(closed["close"], "revoked", "{closed}");
    let after = secs(logged_at(&reloaded), logged_at(&closed));
    assert!(after >= 1.0, "closed {after:.3} s after the reload, before revoke_grace");
    let by = now() + SOON;
    eof_by(&mut client, "client", by);
    eof_by(&mut server, "target", by);
}
