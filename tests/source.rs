//! Egress source addresses, end to end: the target sees the pool's
//! addresses (127.0.0.21-23: all of 127/8 is bindable on Linux loopback),
//! one per client (the PROXY header's address, whatever its port), spread
//! over clients; a route's own `source` replaces the pool; an address this
//! host does not have (192.0.2.1, a documentation address: binding it fails,
//! nothing is sent) stops `run` and is refused by a reload, by name.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::thread;

use common::*;
use portgate::proxy_protocol::{encode_v2, Command as ProxyCommand};

const POOL: [&str; 3] = ["127.0.0.21", "127.0.0.22", "127.0.0.23"];

/// A target that answers each connection with the IP it came from, then
/// closes.
fn who_am_i_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let peer = s.peer_addr().map(|p| p.ip().to_string()).unwrap_or_default();
            let _ = s.write_all(peer.as_bytes());
            let _ = s.shutdown(Shutdown::Write);
        }
    });
    a
}

/// Connect to `port` as `client` (a PROXY v2 header) and return the source
/// address the target saw.
fn seen_from(port: u16, client: &str) -> String {
    let mut s = connect(addr(port));
    let dst: SocketAddr = "10.0.0.1:22".parse().unwrap();
    s.write_all(&encode_v2(ProxyCommand::Proxy, Some((client.parse().unwrap(), dst)), None, &[])).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn pooled(port: u16, own: u16, target: SocketAddr) -> Config {
    Config::loopback()
        .proxy_required(&["127.0.0.1/32"])
        .allow(&["10.0.0.0/8"])
        .set("upstream", "source", POOL)
        .route("pooled", port, target)
        .with(Route::new("own", own, target).set("source", ["127.0.0.24"]))
}

#[test]
fn targets_see_one_pool_address_per_client_spread_over_clients() {
    let target = who_am_i_server();
    let base = free_ports(2);
    let pg = Portgate::start(pooled(base, base + 1, target));
    let mut by_client: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..16 {
        let ip = format!("10.0.0.{}", 10 + i);
        let first = seen_from(base, &format!("{ip}:40000"));
        assert!(POOL.contains(&first.as_str()), "{ip} came from {first:?}, outside the pool");
        // The same client from another port: the same source.
        for port in [40001, 51234] {
            assert_eq!(seen_from(base, &format!("{ip}:{port}")), first, "{ip} moved");
        }
        by_client.insert(ip, first);
    }
    let used: BTreeSet<&String> = by_client.values().collect();
    assert!(used.len() >= 2, "16 clients all came from one address: {by_client:?}");
    // A route's own source replaces the pool.
    assert_eq!(seen_from(base + 1, "10.0.0.10:40000"), "127.0.0.24");

    // After a restart, every client maps to the same address again.
    drop(pg);
    let _pg = Portgate::start(pooled(base, base + 1, target));
    for (ip, first) in &by_client {
        assert_eq!(&seen_from(base, &format!("{ip}:40002")), first, "{ip} moved across a restart");
    }
}

#[test]
fn a_source_this_host_lacks_stops_run_and_is_refused_by_a_reload() {
    let target = echo_server();
    let port = free_port();
    let bad =
        Config::loopback().set("upstream", "source", ["127.0.0.21", "192.0.2.1"]).route("r", port, target);
    // check checks the form only: valid.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portgate.toml");
    std::fs::write(&path, bad.to_string()).unwrap();
    let o = Command::new(BIN).arg("check").arg("-c").arg(&path).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    // run refuses to start, naming the address, and binds nothing.
    let o = run_command(&path).stderr(Stdio::piped()).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot dial from source address 192.0.2.1"), "{stderr}");
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("nothing left listening");

    // A running node refuses the reload, and serves on.
    let good = Config::loopback().route("r", port, target);
    let pg = Portgate::start(&good);
    pg.write_config(&bad);
    let outcome = pg.reload();
    assert_eq!(outcome["message"], "config reload failed; still serving the previous config");
    let reason = outcome["reason"].as_str().unwrap();
    assert!(reason.starts_with("cannot dial from source address 192.0.2.1: "), "{reason}");
    assert!(reason.ends_with("the old config keeps serving"), "{reason}");
    assert_eq!(roundtrip(connect(addr(port)), b"on"), b"on");
}
