//! The forwarding core, end to end: the real binary on loopback.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use portgate::proxy_protocol::{encode_v1, encode_v2, encode_v2_with_crc, Command};

#[test]
fn routes_several_ports_byte_exact_in_parallel() {
    let echo_a = echo_server();
    let echo_b = echo_server();
    let base = free_ports(2);
    let pg = Portgate::start(Config::loopback().route("a", base, echo_a).route("b", base + 1, echo_b));
    // 4 parallel sessions per route, 3 MiB each way, distinct data.
    let mut handles = Vec::new();
    for i in 0..8u64 {
        let port = base + (i % 2) as u16;
        handles.push(thread::spawn(move || {
            let data = pattern(3 << 20, i);
            let back = roundtrip(connect(addr(port)), &data);
            assert_eq!(back.len(), data.len(), "session {i}: length");
            assert!(back == data, "session {i}: bytes differ");
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    pg.wait_metric(r#"portgate_connections_accepted_total{route="a",tenant="a"}"#, 4.0);
    pg.wait_metric(r#"portgate_bytes_total{route="a",direction="to_target"}"#, (4 * (3u64 << 20)) as f64);
    pg.wait_metric(r#"portgate_bytes_total{route="b",direction="to_client"}"#, (4 * (3u64 << 20)) as f64);
    // One session-end line per session, with the contract's fields.
    pg.wait_log_n(|l| l.contains("\"message\":\"session closed\""), 8, SOON);
    let ev = &pg.events(|v| v["message"] == "session closed" && v["route"] == "a")[0];
    for field in [
        "route",
        "tenant",
        "port",
        "client",
        "peer",
        "endpoint",
        "target",
        "bytes_to_target",
        "bytes_to_client",
        "duration_ms",
        "close",
        "timestamp",
        "level",
    ] {
        assert!(ev.get(field).is_some(), "session line lacks {field}: {ev}");
    }
    assert_eq!(ev["target"], echo_a.to_string());
    assert_eq!(ev["close"], "client_closed");
    assert!(ev.get("error").is_none(), "no error field on a clean close: {ev}");
    assert_eq!(ev["bytes_to_target"], 3u64 << 20);
}

#[test]
fn unmapped_port_in_range_is_refused_with_no_route() {
    let echo = echo_server();
    let base = free_ports(3);
    let pg = Portgate::start(
        Config::loopback().set("listen", "ports", format!("{base}-{}", base + 2)).route("a", base, echo),
    );
    let mut s = connect(addr(base + 2));
    s.write_all(b"hello").unwrap();
    expect_closed(s);
    let ev = pg.wait_event("connection rejected", 1);
    assert_eq!(ev["reason"], "no_route");
    assert_eq!(ev["route"], "");
    assert_eq!(ev["port"], base + 2);
    pg.wait_metric(r#"portgate_connections_rejected_total{route="",reason="no_route"}"#, 1.0);
    // A probe (connect, close without a byte) is a health check, not a rejection.
    drop(connect(addr(base + 1)));
    pg.wait_metric("portgate_health_checks_total", 1.0);
    assert_eq!(pg.metric(r#"portgate_connections_rejected_total{route="",reason="no_route"}"#), Some(1.0));
    // The mapped port still works.
    assert_eq!(roundtrip(connect(addr(base)), b"ping"), b"ping");
}

#[test]
fn allow_and_deny_by_source_with_route_rules_replacing_access() {
    let echo = echo_server();
    let base = free_ports(2);
    let pg = Portgate::start(
        Config::loopback()
            .allow(&["127.0.0.2/32"])
            .route("inherits", base, echo)
            .with(Route::new("own-rule", base + 1, echo).set("allow", ["127.0.0.3/32"])),
    );
    // [access] admits .2 on the inheriting route, refuses .3.
    assert_eq!(roundtrip(connect_from("127.0.0.2", addr(base)), b"x"), b"x");
    let mut s = connect_from("127.0.0.3", addr(base));
    s.write_all(b"x").unwrap();
    expect_closed(s);
    // The route's own rule replaces [access]: .3 in, .2 out.
    assert_eq!(roundtrip(connect_from("127.0.0.3", addr(base + 1)), b"y"), b"y");
    let mut s = connect_from("127.0.0.2", addr(base + 1));
    s.write_all(b"y").unwrap();
    expect_closed(s);
    pg.wait_metric(
        r#"portgate_connections_rejected_total{route="inherits",reason="source_not_allowed"}"#,
        1.0,
    );
    pg.wait_metric(
        r#"portgate_connections_rejected_total{route="own-rule",reason="source_not_allowed"}"#,
        1.0,
    );
    let ev = pg.events(|v| v["message"] == "connection rejected" && v["route"] == "inherits");
    assert!(ev[0]["client"].as_str().unwrap().starts_with("127.0.0.3:"), "{}", ev[0]);
}

#[test]
fn max_connections_limits_a_route() {
    let echo = echo_server();
    let port = free_port();
    let pg =
        Portgate::start(Config::loopback().with(Route::new("one", port, echo).set("max_connections", 1)));
    let mut first = connect(addr(port));
    first.write_all(b"a").unwrap();
    let mut b = [0u8; 1];
    first.read_exact(&mut b).unwrap();
    let mut second = connect(addr(port));
    second.write_all(b"b").unwrap();
    expect_closed(second);
    pg.wait_metric(r#"portgate_connections_rejected_total{route="one",reason="limit"}"#, 1.0);
    pg.wait_metric(r#"portgate_connections_active{route="one",tenant="one"}"#, 1.0);
    drop(first);
    pg.wait_metric(r#"portgate_connections_active{route="one",tenant="one"}"#, 0.0);
    assert_eq!(roundtrip(connect(addr(port)), b"c"), b"c");
}

#[test]
fn half_close_passes_both_ways() {
    // Target: reads until EOF, then answers and closes.
    let t = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = t.local_addr().unwrap();
    thread::spawn(move || {
        for s in t.incoming() {
            let mut s = s.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            s.write_all(format!("got {} bytes", got.len()).as_bytes()).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
        }
    });
    let port = free_port();
    let config = Config::loopback().route("hc", port, target);
    let pg = Portgate::start(&config);
    // Client half-closes; target sees EOF and still answers over the open half.
    let mut s = connect(addr(port));
    s.write_all(&[7u8; 1000]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert_eq!(out, "got 1000 bytes");
    let ev = pg.wait_event("session closed", 1);
    assert_eq!(ev["close"], "client_closed");

    // The other way: target half-closes first, the client keeps sending.
    let t2 = TcpListener::bind("127.0.0.1:0").unwrap();
    let target2 = t2.local_addr().unwrap();
    thread::spawn(move || {
        let (mut s, _) = t2.accept().unwrap();
        s.write_all(b"banner").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"after-eof");
    });
    let port2 = free_port();
    pg.write_config(config.route("hc2", port2, target2));
    assert_eq!(pg.reload()["message"], "config reloaded");
    let mut s = connect(addr(port2));
    let mut banner = [0u8; 6];
    s.read_exact(&mut banner).unwrap();
    assert_eq!(&banner, b"banner");
    let mut rest = [0u8; 1];
    assert_eq!(s.read(&mut rest).unwrap(), 0, "target's FIN passed on");
    s.write_all(b"after-eof").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let ev = pg.wait_event("session closed", 2);
    assert_eq!(ev["close"], "target_closed");
    assert_eq!(ev["bytes_to_target"], 9);
    assert_eq!(ev["bytes_to_client"], 6);
}

#[test]
fn reset_is_passed_on_as_reset() {
    let t = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = t.local_addr().unwrap();
    thread::spawn(move || {
        let (s, _) = t.accept().unwrap();
        let mut r = s.try_clone().unwrap();
        let mut b = [0u8; 4];
        r.read_exact(&mut b).unwrap();
        // Reset: linger 0 then close.
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
        drop(r);
        drop(s);
    });
    let port = free_port();
    let pg = Portgate::start(Config::loopback().route("rst", port, target));
    let mut s = connect(addr(port));
    s.write_all(b"boom").unwrap();
    let mut b = [0u8; 8];
    let err = s.read(&mut b).expect_err("the client must see a reset, not EOF");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    let ev = pg.wait_event("session closed", 1);
    assert_eq!(ev["close"], "target_closed");
}

#[test]
fn refused_target_closes_client_promptly_and_other_routes_work() {
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }; // closed again: connecting is refused
    let echo = echo_server();
    let base = free_ports(2);
    let pg = Portgate::start(Config::loopback().route("dead", base, dead).route("alive", base + 1, echo));
    let started = Instant::now();
    let mut s = connect(addr(base));
    s.write_all(b"hi").unwrap();
    expect_closed(s);
    assert!(started.elapsed() < Duration::from_secs(2), "closed within 2 s");
    let ev = pg.wait_event("session closed", 1);
    assert_eq!(ev["close"], "error");
    assert_eq!(ev["error_kind"], "refused");
    assert!(ev["error"].as_str().unwrap().contains("refused"), "{ev}");
    assert_eq!(ev["route"], "dead");
    pg.wait_metric(r#"portgate_upstream_connect_errors_total{route="dead",kind="refused"}"#, 1.0);
    // accepted counts admission, not dial success.
    assert_eq!(pg.metric(r#"portgate_connections_accepted_total{route="dead",tenant="dead"}"#), Some(1.0));
    assert_eq!(roundtrip(connect(addr(base + 1)), b"still fine"), b"still fine");
}

#[test]
fn idle_timeout_closes_with_fin() {
    let echo = echo_server();
    let port = free_port();
    let pg = Portgate::start(Config::loopback().set("timeouts", "idle", "300ms").route("idle", port, echo));
    let mut s = connect(addr(port));
    s.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    let t0 = Instant::now();
    assert_eq!(s.read(&mut b).unwrap(), 0, "EOF after the idle timeout");
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(250), "not before the timeout: {waited:?}");
    let ev = pg.wait_event("session closed", 1);
    assert_eq!(ev["close"], "idle_timeout");
}

// ---- PROXY protocol ----

/// PROXY headers required from 127.0.0.1, sources from 10/8 and 2001:db8::/32
/// admitted, and one route "plain" on `port`.
fn proxy_config(port: u16, echo: SocketAddr) -> Config {
    Config::loopback()
        .proxy_required(&["127.0.0.1/32"])
        .set("proxy_protocol", "header_timeout", "500ms")
        .allow(&["10.0.0.0/8", "2001:db8::/32"])
        .route("plain", port, echo)
}

fn v2_from(src: &str, dst: &str, endpoint: Option<&str>) -> Vec<u8> {
    encode_v2(Command::Proxy, Some((src.parse().unwrap(), dst.parse().unwrap())), endpoint, &[])
}

#[test]
fn proxy_v1_v2_ipv4_ipv6_and_second_header_is_payload() {
    let echo = echo_server();
    let port = free_port();
    let pg = Portgate::start(proxy_config(port, echo));
    // v1, IPv4
    let mut msg = encode_v1(Some(("10.1.2.3:5000".parse().unwrap(), "10.0.0.1:22".parse().unwrap())));
    msg.extend_from_slice(b"hello v1");
    assert_eq!(roundtrip(connect(addr(port)), &msg), b"hello v1");
    // v2, IPv6, with a second header behind the first: forwarded as payload.
    let mut msg = v2_from("[2001:db8::7]:4000", "[2001:db8::1]:22", None);
    let second = v2_from("10.9.9.9:1", "10.0.0.1:22", None);
    msg.extend_from_slice(&second);
    msg.extend_from_slice(b"tail");
    let mut want = second.clone();
    want.extend_from_slice(b"tail");
    assert_eq!(roundtrip(connect(addr(port)), &msg), want);
    pg.wait_log_n(|l| l.contains("\"message\":\"session closed\""), 2, SOON);
    let evs = pg.events(|v| v["message"] == "session closed");
    let clients: Vec<&str> = evs.iter().map(|e| e["client"].as_str().unwrap()).collect();
    assert!(clients.contains(&"10.1.2.3:5000"), "{clients:?}");
    assert!(clients.contains(&"[2001:db8::7]:4000"), "{clients:?}");
    // The two sessions end in either order; judge the v1 one by its client.
    let v1 = evs.iter().find(|e| e["client"] == "10.1.2.3:5000").unwrap();
    assert!(v1["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    // Header bytes are not counted.
    assert_eq!(v1["bytes_to_target"], 8);
}

#[test]
fn proxy_source_decides_allow() {
    let echo = echo_server();
    let port = free_port();
    let pg = Portgate::start(proxy_config(port, echo));
    let mut msg = v2_from("192.168.1.1:5000", "10.0.0.1:22", None);
    msg.extend_from_slice(b"x");
    let mut s = connect(addr(port));
    s.write_all(&msg).unwrap();
    expect_closed(s);
    let ev = pg.wait_event("connection rejected", 1);
    assert_eq!(ev["reason"], "source_not_allowed");
    assert_eq!(ev["client"], "192.168.1.1:5000");
}

#[test]
fn aws_endpoint_tlv_drives_via_and_endpoints() {
    let echo_plain = echo_server();
    let echo_via = echo_server();
    let port = free_port();
    let port2 = free_port();
    let pg = Portgate::start(
        proxy_config(port, echo_plain)
            .with(Route::new("via-e1", port, echo_via).set("via", "vpce-0a1b2c3d4e5f67890"))
            .with(Route::new("only-e2", port2, echo_via).set("endpoints", ["vpce-22222222222222222"])),
    );
    // Through endpoint e1: the via route wins.
    let mut m = v2_from("10.1.1.1:1000", "10.0.0.1:22", Some("vpce-0a1b2c3d4e5f67890"));
    m.extend_from_slice(b"e1");
    assert_eq!(roundtrip(connect(addr(port)), &m), b"e1");
    let ev = pg.wait_event("session closed", 1);
    assert_eq!(ev["route"], "via-e1");
    assert_eq!(ev["endpoint"], "vpce-0a1b2c3d4e5f67890");
    // Another endpoint: the port's plain route.
    let mut m = v2_from("10.1.1.1:1001", "10.0.0.1:22", Some("vpce-99999999999999999"));
    m.extend_from_slice(b"e9");
    assert_eq!(roundtrip(connect(addr(port)), &m), b"e9");
    let ev = pg.wait_event("session closed", 2);
    assert_eq!(ev["route"], "plain");
    // endpoints allowlist: e2 in, e1 out, none out.
    let mut m = v2_from("10.1.1.1:1002", "10.0.0.1:22", Some("vpce-22222222222222222"));
    m.extend_from_slice(b"ok");
    assert_eq!(roundtrip(connect(addr(port2)), &m), b"ok");
    for ep in [Some("vpce-0a1b2c3d4e5f67890"), None] {
        let mut m = v2_from("10.1.1.1:1003", "10.0.0.1:22", ep);
        m.extend_from_slice(b"no");
        let mut s = connect(addr(port2));
        s.write_all(&m).unwrap();
        expect_closed(s);
    }
    pg.wait_metric(
        r#"portgate_connections_rejected_total{route="only-e2",reason="endpoint_not_allowed"}"#,
        2.0,
    );
}

#[test]
fn proxy_header_failures_are_rejected_without_dialing() {
    // A target that counts its connections.
    let t = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = t.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    thread::spawn(move || {
        for _ in t.incoming() {
            let _ = tx.send(());
        }
    });
    let port = free_port();
    let pg = Portgate::start(proxy_config(port, target));
    // Missing header: plain bytes.
    let mut s = connect(addr(port));
    s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
    expect_closed(s);
    // Slow header: half a header, then silence past header_timeout (500ms).
    let mut s = connect(addr(port));
    let h = v2_from("10.1.1.1:1", "10.0.0.1:22", None);
    s.write_all(&h[..10]).unwrap();
    let t0 = Instant::now();
    expect_closed(s);
    assert!(t0.elapsed() >= Duration::from_millis(400), "cut at header_timeout, not before");
    // Garbage that starts like a v2 signature.
    let mut s = connect(addr(port));
    s.write_all(b"\r\n\r\n\x00\r\nQUIT\n\x99\x11\x00\x0c").unwrap();
    expect_closed(s);
    pg.wait_metric(r#"portgate_connections_rejected_total{route="",reason="proxy_header"}"#, 3.0);
    // LOCAL: a health check, closed without dialing.
    let mut s = connect(addr(port));
    s.write_all(&encode_v2(Command::Local, None, None, &[])).unwrap();
    expect_closed(s);
    pg.wait_metric("portgate_health_checks_total", 1.0);
    // Probe: connect and close, no bytes: a health check too, no rejection.
    drop(connect(addr(port)));
    pg.wait_metric("portgate_health_checks_total", 2.0);
    assert_eq!(
        pg.metric(r#"portgate_connections_rejected_total{route="",reason="proxy_header"}"#),
        Some(3.0)
    );
    assert!(rx.try_recv().is_err(), "no connection may reach the target");
}

#[test]
fn proxy_v2_crc32c_is_verified() {
    // A target that counts its connections and echoes.
    let t = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = t.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    thread::spawn(move || {
        for s in t.incoming().flatten() {
            let _ = tx.send(());
            thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let mut w = s;
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(Shutdown::Write);
            });
        }
    });
    let port = free_port();
    let pg = Portgate::start(proxy_config(port, target));
    let addrs = Some(("10.1.2.3:5000".parse().unwrap(), "10.0.0.1:22".parse().unwrap()));
    let endpoint = Some("vpce-0a1b2c3d4e5f67890");
    let good = encode_v2_with_crc(Command::Proxy, addrs, endpoint, &[]);

    // A wrong checksum (the last byte of the CRC32C TLV, which comes last).
    let mut bad = good.clone();
    *bad.last_mut().unwrap() ^= 0x5A;
    bad.extend_from_slice(b"never forwarded");
    let mut s = connect(addr(port));
    s.write_all(&bad).unwrap();
    expect_closed(s);
    let ev = pg.wait_event("connection rejected", 1);
    assert_eq!(ev["reason"], "proxy_header", "{ev}");
    assert_eq!(ev["route"], "", "{ev}");
    let detail = ev["detail"].as_str().unwrap();
    assert!(detail.contains("checksum mismatch") && detail.contains("CRC32C"), "{ev}");

    // A CRC32C TLV of 5 bytes.
    let mut s = connect(addr(port));
    s.write_all(&encode_v2(Command::Proxy, addrs, endpoint, &[(0x03, &[0; 5])])).unwrap();
    expect_closed(s);
    let ev = pg.wait_event("connection rejected", 2);
    assert_eq!(ev["reason"], "proxy_header", "{ev}");
    assert!(ev["detail"].as_str().unwrap().contains("CRC32C TLV (0x03) has a bad length"), "{ev}");
    pg.wait_metric(r#"portgate_connections_rejected_total{route="",reason="proxy_header"}"#, 2.0);
    assert!(rx.try_recv().is_err(), "a refused header must not reach the target");

    // The right checksum: forwarded, with the header's client and endpoint.
    let mut msg = good.clone();
    msg.extend_from_slice(b"checksummed");
    assert_eq!(roundtrip(connect(addr(port)), &msg), b"checksummed");
    let ev = pg.wait_event("session closed", 1);
    assert_eq!(ev["client"], "10.1.2.3:5000", "{ev}");
    assert_eq!(ev["endpoint"], "vpce-0a1b2c3d4e5f67890", "{ev}");
    assert_eq!(ev["bytes_to_target"], 11, "{ev}");
    assert!(rx.try_recv().is_ok(), "the good header reached the target");
    assert_eq!(
        pg.metric(r#"portgate_connections_rejected_total{route="",reason="proxy_header"}"#),
        Some(2.0)
    );
}

#[test]
fn untrusted_peer_header_is_rejected() {
    let echo = echo_server();
    let port = free_port();
    // Trusted is 127.0.0.1 only; connect from 127.0.0.5.
    let pg = Portgate::start(proxy_config(port, echo));
    let mut m = v2_from("10.1.1.1:1000", "10.0.0.1:22", None);
    m.extend_from_slice(b"spoof");
    let mut s = connect_from("127.0.0.5", addr(port));
    s.write_all(&m).unwrap();
    expect_closed(s);
    let ev = pg.wait_event("connection rejected", 1);
    assert_eq!(ev["reason"], "proxy_header");
    assert!(ev["client"].as_str().unwrap().starts_with("127.0.0.5:"), "spoofed source not believed: {ev}");
    // Untrusted LOCAL is a rejection too, not a health check.
    let mut s = connect_from("127.0.0.5", addr(port));
    s.write_all(&encode_v2(Command::Local, None, None, &[])).unwrap();
    expect_closed(s);
    pg.wait_metric(r#"portgate_connections_rejected_total{route="",reason="proxy_header"}"#, 2.0);
    assert_eq!(pg.metric("portgate_health_checks_total"), Some(0.0));
}

#[test]
fn ipv6_listener_and_target() {
    let have_v6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    if !require("an IPv6 loopback (::1)", have_v6, "enable IPv6: sysctl net.ipv6.conf.lo.disable_ipv6=0") {
        return;
    }
    let echo = echo_server_on("[::1]:0");
    let port = free_port();
    let _pg = Portgate::start(Config::listen("::", &["::1/128", "127.0.0.0/8"]).route("v6", port, echo));
    // Dual stack: both an IPv6 and an IPv4 client get through.
    let s6 = std::net::TcpStream::connect_timeout(&format!("[::1]:{port}").parse().unwrap(), SOON).unwrap();
    assert_eq!(roundtrip(s6, b"six"), b"six");
    assert_eq!(roundtrip(connect(addr(port)), b"four"), b"four");
}

#[test]
fn text_log_format_has_the_fields() {
    let echo = echo_server();
    let port = free_port();
    let pg = Portgate::start(Config::loopback().set("log", "format", "text").route("txt", port, echo));
    assert_eq!(roundtrip(connect(addr(port)), b"abc"), b"abc");
    let line = pg.wait_log(|l| l.contains("session closed"), SOON);
    for f in ["route=txt", "close=client_closed", "bytes_to_target=3", &format!("target={echo}")] {
        assert!(line.contains(f), "{f} missing in: {line}");
    }
    assert!(!line.contains("portgate::"), "module path must not be printed: {line}");
}

/// Splits a logfmt line's `key=value` pairs (values bare or quoted with
/// `\"` and `\\` escapes); the line's head (time, level, message) is what
/// comes before the first pair.
fn logfmt_pairs(line: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = line;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].rsplit(' ').next().unwrap_or("").to_string();
        let after = &rest[eq + 1..];
        let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => v.extend(chars.next().map(|(_, c)| c)),
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            (v, &quoted[end..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        pairs.push((key, value));
        rest = tail;
    }
    pairs
}

#[test]
fn text_log_values_with_spaces_or_quotes_are_quoted_so_the_line_parses() {
    let echo = echo_server();
    let port = free_port();
    let tenant = r#"acme "blue" = prod"#;
    let pg = Portgate::start(
        Config::loopback()
            .set("log", "format", "text")
            .with(Route::new("txt", port, echo).set("tenant", tenant)),
    );
    assert_eq!(roundtrip(connect(addr(port)), b"abc"), b"abc");
    let line = pg.wait_log(|l| l.contains("session closed"), SOON);
    assert!(line.contains(" INFO session closed "), "{line}");
    let pairs = logfmt_pairs(&line);
    let get = |k: &str| pairs.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    assert_eq!(get("tenant"), Some(tenant), "{line}");
    assert_eq!(get("route"), Some("txt"), "{line}");
    assert_eq!(get("close"), Some("client_closed"), "{line}");
    assert_eq!(get("bytes_to_client"), Some("3"), "{line}");
    let keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
    for k in ["id", "port", "client", "peer", "endpoint", "target", "bytes_to_target", "duration_ms"] {
        assert!(keys.contains(&k), "{k} missing in: {line}");
    }
}

/// `ss` lines for established sockets matching `filter`.
fn ss(filter: &str) -> String {
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established", filter])
        .output()
        .expect("ss (iproute2)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn keepalive_is_armed_on_both_sockets_of_a_session() {
    let echo = echo_server();
    let port = free_port();
    let _pg = Portgate::start(
        Config::loopback()
            .set("keepalive", "time", "37s")
            .set("keepalive", "interval", "5s")
            .set("keepalive", "retries", 3)
            .route("ka", port, echo),
    );
    let mut s = connect(addr(port));
    s.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    // portgate's client-side socket: local port = the listener port.
    let client_side = ss(&format!("( sport = :{port} )"));
    // portgate's target-side socket: remote port = the echo target's port.
    let target_side = ss(&format!("( dport = :{} )", echo.port()));
    for (side, text) in [("client", &client_side), ("target", &target_side)] {
        assert!(text.contains("timer:(keepalive,3"), "{side} socket has no keepalive timer near 37s: {text}");
    }
}
