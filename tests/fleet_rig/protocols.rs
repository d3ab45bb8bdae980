//! Real protocols through the fleet, client and server both real programs:
//! PostgreSQL (`postgres` started here, `psql` running a query) and RDP
//! (FreeRDP's shadow server under Xvfb with NLA and a SAM file, the
//! `xfreerdp` client authenticating with `+auth-only`). Each has a negative
//! twin: a wrong password fails the same way direct and through the fleet,
//! so the positive run cannot pass by accident. The nodes' logs show the
//! balancer's PROXY v2 header at work: the admitted client is the one that
//! connected to HAProxy, the socket peer is HAProxy.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::rig::*;

const NODES: usize = 3;
const PG_PORT: u16 = FIRST_PORT + 1;
const RDP_PORT: u16 = FIRST_PORT + 2;

/// The node that logged a `session closed` on `route` with this client
/// shape, and the event.
fn session_event(nodes: &[Node], route: &str) -> Vec<serde_json::Value> {
    nodes.iter().flat_map(|n| n.events(|v| v["message"] == "session closed" && v["route"] == route)).collect()
}

/// Sessions on `route` came through the balancer with a PROXY v2 header:
/// the client (from the header) is the loopback client of the lan, the peer
/// HAProxy's address on the bridge.
fn assert_through_proxy_header(nodes: &[Node], route: &str, at_least: usize) {
    let deadline = Instant::now() + SOON;
    let events = loop {
        let ev = session_event(nodes, route);
        if ev.len() >= at_least {
            break ev;
        }
        assert!(Instant::now() < deadline, "{at_least} {route} sessions not logged; have {ev:?}");
        thread::sleep(Duration::from_millis(50));
    };
    for ev in &events {
        assert!(ev["client"].as_str().unwrap().starts_with("127.0.0.1:"), "{ev}");
        assert!(ev["peer"].as_str().unwrap().starts_with(&format!("{GW}:")), "{ev}");
    }
}

fn pg_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("postgres").is_file() && b.join("initdb").is_file())
        .collect();
    found.sort();
    found.pop()
}

fn out_text(o: &Output) -> String {
    format!("exit {:?}\nstdout: {}\nstderr: {}", o.status.code(), String::from_utf8_lossy(&o.stdout), {
        String::from_utf8_lossy(&o.stderr)
    })
}

/// A PostgreSQL server in the lan namespace on 10.251.0.1:5432, run as
/// `nobody` from a fresh initdb, password (SCRAM) authentication only.
struct Postgres {
    child: Child,
    _dir: tempfile::TempDir,
    log: Arc<LogBuf>,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log.dump_if_failing("postgres", "");
    }
}

const PG_USER: &str = "portgate_test";
const PG_PASSWORD: &str = "fleet-Secret-7";

fn start_postgres(lan: &Lan, bin: &Path) -> Postgres {
    let dir = tempfile::tempdir().unwrap();
    // nobody must reach its data directory.
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let data = dir.path().join("data");
    let pwfile = dir.path().join("pw");
    std::fs::write(&pwfile, PG_PASSWORD).unwrap();
    run("chown", &["nobody", pwfile.to_str().unwrap()]).unwrap();
    std::fs::create_dir(&data).unwrap();
    run("chown", &["nobody", data.to_str().unwrap()]).unwrap();
    let initdb = Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(bin.join("initdb"))
        .arg("-D")
        .arg(&data)
        .args(["-U", PG_USER, "--auth=scram-sha-256", "--no-sync", "--pwfile"])
        .arg(&pwfile)
        .output()
        .unwrap();
    assert!(initdb.status.success(), "initdb: {}", out_text(&initdb));
    // Password logins from the rig's network only: the test's own direct
    // client (10.251.0.1) and the nodes (10.251.0.1N).
    std::fs::write(data.join("pg_hba.conf"), "host all all 10.251.0.0/24 scram-sha-256\n").unwrap();
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "nobody", "--"])
        .arg(bin.join("postgres"))
        .arg("-D")
        .arg(&data)
        .args(["-h", &GW.to_string(), "-p", "5432", "-k", ""])
        .args(["-c", "fsync=off", "-c", "listen_addresses=10.251.0.1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = lan.ns.spawn_command(&mut cmd);
    let log = LogBuf::capture(child.stderr.take().unwrap());
    log.wait_from(0, |l| l.contains("database system is ready to accept connections"), 1, SOON * 3);
    Postgres { child, _dir: dir, log }
}

/// `psql` in the lan namespace against `host:port`, as the test user.
fn psql(lan: &Lan, bin: &Path, to: SocketAddr, password: &str) -> Output {
    let psql = if bin.join("psql").is_file() { bin.join("psql") } else { PathBuf::from("psql") };
    let mut cmd = Command::new(psql);
    cmd.arg(format!("host={} port={} user={PG_USER} dbname=postgres connect_timeout=10", to.ip(), to.port()))
        .args(["-XAt", "-c", "select 'fleet says ' || 6*7"])
        .env("PGPASSWORD", password)
        .env_remove("PGSERVICE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    lan.ns.spawn_command(&mut cmd).wait_with_output().unwrap()
}

#[test]
fn postgres_query_through_the_fleet_with_proxy_v2() {
    let bin = pg_bin();
    if !require("the PostgreSQL server (initdb, postgres)", bin.is_some(), "apt-get install postgresql")
        || !have_rig(&[("psql", "postgresql-client"), ("runuser", "util-linux")])
    {
        return;
    }
    let bin = bin.unwrap();
    let lan = Lan::new(NODES);
    let pg = start_postgres(&lan, &bin);
    let server: SocketAddr = format!("{GW}:5432").parse().unwrap();
    let config = node_config(&[("pg", PG_PORT, server)], &[]);
    let nodes: Vec<Node> = (1..=NODES).map(|i| Node::start(&lan, i, &config)).collect();
    let _haproxy = Haproxy::start(&lan, NODES);

    // Direct, then through the fleet: the same query, the same answer.
    let direct = psql(&lan, &bin, server, PG_PASSWORD);
    assert!(direct.status.success(), "psql direct: {}", out_text(&direct));
    assert_eq!(String::from_utf8_lossy(&direct.stdout).trim(), "fleet says 42");
    // One query per node (round robin), so every node carries one.
    for _ in 0..NODES {
        let fleet = psql(&lan, &bin, balancer(PG_PORT), PG_PASSWORD);
        assert!(fleet.status.success(), "psql through the fleet: {}", out_text(&fleet));
        assert_eq!(String::from_utf8_lossy(&fleet.stdout).trim(), "fleet says 42");
    }
    assert_through_proxy_header(&nodes, "pg", NODES);

    // The negative twin: a wrong password fails the same way both ways.
    let auth_failed = format!("password authentication failed for user \"{PG_USER}\"");
    for (how, to) in [("direct", server), ("through the fleet", balancer(PG_PORT))] {
        let bad = psql(&lan, &bin, to, "wrong-password");
        assert_eq!(bad.status.code(), Some(2), "psql {how} with a wrong password: {}", out_text(&bad));
        assert!(String::from_utf8_lossy(&bad.stderr).contains(&auth_failed), "{how}: {}", out_text(&bad));
    }
    eprintln!(
        "fleet protocol PostgreSQL: {NODES} psql queries through the fleet answered like the direct one; \
         wrong password refused direct and through the fleet alike"
    );
    drop(pg);
}

// ---------------------------------------------------------------------------
// RDP
// ---------------------------------------------------------------------------

const RDP_USER: &str = "tester";
const RDP_PASSWORD: &str = "Rdp-Secret-9";

/// Xvfb (display chosen by Xvfb itself) and FreeRDP's shadow server on
/// 10.251.0.1:3389 with NLA forced and a SAM file from `winpr-hash`.
struct RdpServer {
    xvfb: Child,
    shadow: Child,
    display: String,
    dir: tempfile::TempDir,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for RdpServer {
    fn drop(&mut self) {
        let _ = self.shadow.kill();
        let _ = self.shadow.wait();
        let _ = self.xvfb.kill();
        let _ = self.xvfb.wait();
        if thread::panicking() {
            eprintln!("---- freerdp-shadow-cli ----");
            for l in self.log.lock().unwrap().iter() {
                eprintln!("{l}");
            }
        }
    }
}

impl RdpServer {
    fn start(lan: &Lan) -> RdpServer {
        let dir = tempfile::tempdir().unwrap();
        let sam = run("winpr-hash", &["-u", RDP_USER, "-p", RDP_PASSWORD, "-f", "sam"]).unwrap();
        let sam_path = dir.path().join("sam");
        std::fs::write(&sam_path, sam).unwrap();
        let mut cmd = Command::new("Xvfb");
        cmd.args(["-displayfd", "1", "-nolisten", "tcp", "-screen", "0", "640x480x24"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut xvfb = lan.ns.spawn_command(&mut cmd);
        let mut line = String::new();
        BufReader::new(xvfb.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let display = format!(":{}", line.trim());
        assert!(display.len() > 1, "Xvfb printed no display number");
        let mut cmd = Command::new("freerdp-shadow-cli");
        cmd.arg(format!("/bind-address:{GW}"))
            .arg("/port:3389")
            .args(["/sec:nla", "+auth"])
            .arg(format!("/sam-file:{}", sam_path.display()))
            .env("DISPLAY", &display)
            .env("HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut shadow = lan.ns.spawn_command(&mut cmd);
        let log = capture_output(&mut shadow);
        let server = RdpServer { xvfb, shadow, display, dir, log };
        // Listening once a TCP connect succeeds (the probe closes at once).
        let deadline = Instant::now() + SOON;
        while !lan.ns.run(|| std::net::TcpStream::connect((GW, 3389)).is_ok()) {
            assert!(Instant::now() < deadline, "freerdp-shadow-cli is not listening");
            thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// How many NLA authentications the server refused so far.
    fn auth_failures(&self) -> usize {
        self.log.lock().unwrap().iter().filter(|l| l.contains("client authentication failure")).count()
    }
}

/// `xfreerdp +auth-only` with NLA forced, in the lan namespace.
fn xfreerdp(lan: &Lan, server: &RdpServer, to: SocketAddr, password: &str) -> (Option<i32>, String) {
    let mut cmd = Command::new("xfreerdp");
    cmd.arg(format!("/v:{to}"))
        .arg(format!("/u:{RDP_USER}"))
        .arg(format!("/p:{password}"))
        .args(["/sec:nla", "+auth-only", "/cert:ignore", "/timeout:10000"])
        .env("DISPLAY", &server.display)
        .env("HOME", server.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = lan.ns.spawn_command(&mut cmd);
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

fn auth_only_status(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.split("Authentication only, exit status ").nth(1)).map(str::trim)
}

#[test]
fn rdp_nla_authentication_through_the_fleet_with_proxy_v2() {
    if !have_rig(&[
        ("Xvfb", "xvfb"),
        ("freerdp-shadow-cli", "freerdp2-shadow-x11"),
        ("xfreerdp", "freerdp2-x11"),
        ("winpr-hash", "winpr-utils"),
    ]) {
        return;
    }
    let lan = Lan::new(NODES);
    let server = RdpServer::start(&lan);
    let direct_addr: SocketAddr = format!("{GW}:3389").parse().unwrap();
    let config = node_config(&[("rdp", RDP_PORT, direct_addr)], &[]);
    let nodes: Vec<Node> = (1..=NODES).map(|i| Node::start(&lan, i, &config)).collect();
    let _haproxy = Haproxy::start(&lan, NODES);

    let (code, text) = xfreerdp(&lan, &server, direct_addr, RDP_PASSWORD);
    assert_eq!((code, auth_only_status(&text)), (Some(0), Some("0")), "xfreerdp direct:\n{text}");
    for _ in 0..NODES {
        let (code, text) = xfreerdp(&lan, &server, balancer(RDP_PORT), RDP_PASSWORD);
        assert_eq!(
            (code, auth_only_status(&text)),
            (Some(0), Some("0")),
            "xfreerdp through the fleet:\n{text}"
        );
    }
    assert_eq!(server.auth_failures(), 0);
    assert_through_proxy_header(&nodes, "rdp", NODES);

    // The negative twin: NLA refuses a wrong password, direct and through
    // the fleet alike, and the server logs each refusal.
    let (direct_code, direct_text) = xfreerdp(&lan, &server, direct_addr, "wrong-password");
    assert_eq!(auth_only_status(&direct_text), Some("1"), "xfreerdp direct, wrong password:\n{direct_text}");
    assert_ne!(direct_code, Some(0));
    let (fleet_code, fleet_text) = xfreerdp(&lan, &server, balancer(RDP_PORT), "wrong-password");
    assert_eq!(auth_only_status(&fleet_text), Some("1"), "through the fleet, wrong password:\n{fleet_text}");
    assert_eq!(fleet_code, direct_code, "a wrong password fails the same way direct and through the fleet");
    let deadline = Instant::now() + SOON;
    while server.auth_failures() < 2 {
        assert!(Instant::now() < deadline, "the server logged {} refusals, wanted 2", server.auth_failures());
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "fleet protocol RDP: NLA authentication (+auth-only) succeeded direct and {NODES} times through the \
         fleet; a wrong password was refused by the server direct and through the fleet alike (exit {direct_code:?})"
    );
}
