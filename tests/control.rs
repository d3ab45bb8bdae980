//! The control socket and `portgate reload`, end to end: the real binary,
//! its Unix socket, and hostile clients on it.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::control::{raw, request};
use common::*;

/// A config with one echo route per `(name, port)` and the control socket
/// next to the config file.
fn config(routes: &[(&str, u16)], echo: SocketAddr) -> String {
    let mut c = String::from(
        "[listen]\naddress = \"127.0.0.1\"\n[control]\nsocket = \"control.sock\"\n[access]\nallow = [\"127.0.0.0/8\"]\n",
    );
    for (name, port) in routes {
        c.push_str(&format!("[[route]]\nname = \"{name}\"\nport = {port}\ntarget = \"{echo}\"\n"));
    }
    c
}

fn socket_of(pg: &Portgate) -> std::path::PathBuf {
    pg.dir.path().join("control.sock")
}

/// `portgate reload -c CONFIG [extra...]`.
fn portgate_reload(config: &Path, extra: &[&str]) -> Output {
    Command::new(BIN)
        .arg("reload")
        .arg("-c")
        .arg(config)
        .args(extra)
        .env_remove("RUNTIME_DIRECTORY")
        .stdin(Stdio::null())
        .output()
        .expect("run portgate reload")
}

fn still_serves(port: u16) {
    assert_eq!(roundtrip(connect(addr(port)), b"ping"), b"ping", "route on {port} no longer echoes");
}

#[test]
fn reload_reports_success_and_every_located_error() {
    let echo = echo_server();
    let base = free_ports(3);
    let pg = Portgate::start(config(&[("a", base)], echo));
    let socket = socket_of(&pg);

    // `portgate reload`: exit 0 and a one-line summary.
    pg.write_config(config(&[("b", base + 1)], echo));
    let o = portgate_reload(&pg.config_path, &[]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "reload failed: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.contains("added b;") && stdout.contains("removed a;"), "{stdout}");
    still_serves(base + 1);

    // POST /reload by hand: the JSON answer.
    pg.write_config(config(&[("b", base + 1), ("c", base + 2)], echo));
    let (code, body) = request(&socket, "POST", "/reload");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["result"], "success");
    assert_eq!(v["added"], serde_json::json!(["c"]));
    assert_eq!(v["removed"], serde_json::json!([]));
    assert_eq!(v["changed"], serde_json::json!([]));
    assert_eq!(v["revoking"], 0);
    let hash = v["hash"].as_str().unwrap().to_owned();
    assert_eq!(hash.len(), 64);
    assert_eq!(pg.metric(&format!("portgate_config_info{{hash=\"{hash}\"}}")), Some(1.0));

    // Two problems: exit 1, each on its own line, located.
    let bad = config(&[("b", base + 1), ("c", base + 2)], echo)
        .replace("allow = [\"127.0.0.0/8\"]", "allow = [\"127.0.0.0/33\"]")
        + "[timeouts]\ndrain = \"soon\"\n";
    pg.write_config(&bad);
    let o = portgate_reload(&pg.config_path, &[]);
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    let located: Vec<&str> = stderr.lines().filter(|l| l.contains("portgate.toml:")).collect();
    assert_eq!(located.len(), 2, "{stderr}");
    for l in &located {
        let rest = l.split("portgate.toml:").nth(1).unwrap();
        let mut parts = rest.splitn(3, ':');
        let (line, col) = (parts.next().unwrap(), parts.next().unwrap());
        assert!(line.parse::<u32>().is_ok() && col.parse::<u32>().is_ok(), "not FILE:LINE:COL: {l}");
    }
    assert!(o.stdout.is_empty());
    let (code, body) = request(&socket, "POST", "/reload");
    assert_eq!(code, 422, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["result"], "failure");
    assert_eq!(v["errors"].as_array().unwrap().len(), 2, "{body}");
    // The old config still serves.
    still_serves(base + 1);
    still_serves(base + 2);
    assert_eq!(pg.metric(&format!("portgate_config_info{{hash=\"{hash}\"}}")), Some(1.0));

    // SIGHUP shares the same path and still works.
    pg.write_config(config(&[("b", base + 1)], echo));
    assert_eq!(pg.reload()["message"], "config reloaded");

    // A reload that moves the socket needs a restart.
    pg.write_config(config(&[("b", base + 1)], echo).replace("control.sock", "other.sock"));
    let o = portgate_reload(&pg.config_path, &["--socket", socket.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("needs a restart"), "{o:?}");
    still_serves(base + 1);
}

#[test]
fn reload_without_a_node_says_which_socket_it_tried() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    // Invalid apart from the one key the command line reads.
    std::fs::write(&cfg, "[listen]\naddress = 7\n[control]\nsocket = \"gone.sock\"\n").unwrap();
    let o = portgate_reload(&cfg, &[]);
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains(&dir.path().join("gone.sock").display().to_string()), "{stderr}");
}

#[test]
fn the_socket_is_private_and_removed_at_exit() {
    let echo = echo_server();
    let base = free_ports(1);
    let mut pg = Portgate::start(config(&[("a", base)], echo));
    let socket = socket_of(&pg);
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    pg.signal(libc::SIGTERM);
    assert!(pg.wait_exit(SOON).success());
    assert!(!socket.exists(), "socket file left behind");
}

#[test]
fn a_stale_socket_is_replaced() {
    let echo = echo_server();
    let base = free_ports(1);
    let dir = tempfile::tempdir().unwrap();
    // A socket file nobody listens on, as a node killed hard leaves it.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let cfg = config(&[("a", base)], echo)
        .replace("\"control.sock\"", &format!("{:?}", stale.display().to_string()));
    let pg = Portgate::start(&cfg);
    let (code, _) = request(&stale, "POST", "/reload");
    assert_eq!(code, 200);
    still_serves(base);
    drop(pg);
}

#[test]
fn a_live_node_on_the_socket_makes_run_fail() {
    let echo = echo_server();
    let base = free_ports(1);
    let pg = Portgate::start(config(&[("a", base)], echo));
    let t0 = Instant::now();
    let o =
        Command::new(BIN).arg("run").arg("-c").arg(&pg.config_path).stdin(Stdio::null()).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(t0.elapsed() < SOON);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("already answers"), "{stderr}");
    // The first node is untouched, socket included.
    still_serves(base);
    assert_eq!(request(&socket_of(&pg), "POST", "/reload").0, 200);
}

#[test]
fn a_regular_file_or_a_missing_directory_is_refused() {
    let echo = echo_server();
    let base = free_ports(1);
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("portgate.toml");
    let admin = addr(free_port());
    std::fs::write(dir.path().join("control.sock"), "not a socket").unwrap();
    std::fs::write(&cfg_path, with_harness_sections(config(&[("a", base)], echo), admin)).unwrap();
    let run = || Command::new(BIN).arg("run").arg("-c").arg(&cfg_path).stdin(Stdio::null()).output().unwrap();
    let o = run();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not a socket"), "{o:?}");
    assert_eq!(std::fs::read_to_string(dir.path().join("control.sock")).unwrap(), "not a socket");
    // Nothing was bound: the route's port is free.
    assert!(std::net::TcpListener::bind(addr(base)).is_ok());

    let text = with_harness_sections(config(&[("a", base)], echo), admin)
        .replace("\"control.sock\"", "\"nodir/c.sock\"");
    std::fs::write(&cfg_path, text).unwrap();
    let o = run();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not exist"), "{o:?}");
    assert!(!dir.path().join("nodir").exists(), "the directory must not be created");
}

#[test]
fn hostile_clients_get_4xx_or_time_out_and_the_node_keeps_serving() {
    let echo = echo_server();
    let base = free_ports(1);
    let pg = Portgate::start(config(&[("a", base)], echo));
    let socket = socket_of(&pg);

    // A client that connects and sends nothing holds the socket for a bounded time.
    let silent = UnixStream::connect(&socket).unwrap();
    let t0 = Instant::now();

    assert!(raw(&socket, b"garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
    let big_head = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "x".repeat(40_000));
    assert!(raw(&socket, big_head.as_bytes()).starts_with("HTTP/1.1 431"));
    let big_body = b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n";
    assert!(raw(&socket, big_body).starts_with("HTTP/1.1 413"));
    assert_eq!(request(&socket, "GET", "/reload").0, 405);
    assert_eq!(request(&socket, "GET", "/nope").0, 404);
    assert_eq!(request(&socket, "DELETE", "/").0, 404);

    // Meanwhile the node serves: admin, sessions, control.
    assert_eq!(http_get(pg.admin, "/healthz").0, 200);
    still_serves(base);
    assert_eq!(request(&socket, "POST", "/reload").0, 200);

    let mut silent = silent;
    silent.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = Vec::new();
    let _ = silent.read_to_end(&mut buf);
    let waited = t0.elapsed();
    assert!(waited < Duration::from_secs(12), "silent client held for {waited:?}");
    assert!(buf.is_empty() || String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 408"), "{buf:?}");
    still_serves(base);
}

#[test]
fn the_admin_port_does_not_offer_control_verbs() {
    let echo = echo_server();
    let base = free_ports(1);
    let pg = Portgate::start(config(&[("a", base)], echo));
    assert_eq!(http_get(pg.admin, "/reload").0, 404);
    let mut s = std::net::TcpStream::connect(pg.admin).unwrap();
    s.set_read_timeout(Some(SOON)).unwrap();
    s.write_all(b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    assert_eq!(pg.reload()["message"], "config reloaded", "SIGHUP still reloads");
}

#[test]
fn the_socket_serves_through_the_drain_and_refuses_reloads_then() {
    let echo = echo_server();
    let base = free_ports(1);
    let cfg = config(&[("a", base)], echo) + "[timeouts]\nshutdown_delay = \"3s\"\n";
    let mut pg = Portgate::start(&cfg);
    let socket = socket_of(&pg);
    pg.signal(libc::SIGTERM);
    pg.wait_log(|l| l.contains("shutting down"), SOON);
    let (code, body) = request(&socket, "POST", "/reload");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("shutting down"), "{body}");
    assert_eq!(request(&socket, "GET", "/nope").0, 404, "still served while draining");
    assert!(pg.wait_exit(SOON).success());
    assert!(!socket.exists());
}

#[test]
fn an_admin_client_that_never_finishes_its_request_is_cut_and_others_are_served() {
    let echo = echo_server();
    let base = free_ports(1);
    let pg = Portgate::start(config(&[("a", base)], echo));
    let mut slow = std::net::TcpStream::connect(pg.admin).unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").unwrap(); // never ends its head
    let t0 = Instant::now();
    // Others are served at once, on the admin port and on the routes.
    assert_eq!(http_get(pg.admin, "/healthz").0, 200);
    still_serves(base);
    slow.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    let waited = t0.elapsed();
    assert!(waited < Duration::from_secs(12), "the unfinished request was held for {waited:?}");
    assert!(buf.is_empty() || String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 408"), "{buf:?}");
}

#[test]
fn reload_counts_the_running_sessions_it_revokes() {
    let echo = echo_server();
    let base = free_ports(2);
    let pg = Portgate::start(config(&[("a", base), ("b", base + 1)], echo));
    let socket = socket_of(&pg);
    let echo_on = |s: &mut std::net::TcpStream| {
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
    };
    // Two running sessions on "a", one on "b".
    let mut a1 = connect(addr(base));
    let mut a2 = connect(addr(base));
    let mut b1 = connect(addr(base + 1));
    for s in [&mut a1, &mut a2, &mut b1] {
        echo_on(s);
    }
    // "a" now admits only 10/8: both of its sessions are revoked, "b"'s is not.
    let text = config(&[("b", base + 1)], echo)
        + &format!("[[route]]\nname = \"a\"\nport = {base}\ntarget = \"{echo}\"\nallow = [\"10.0.0.0/8\"]\n");
    pg.write_config(text);
    let (code, body) = request(&socket, "POST", "/reload");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["changed"], serde_json::json!(["a"]));
    assert_eq!(v["revoking"], 2, "{body}");
    // Ended sessions leave the registry: the same config again revokes none.
    drop((a1, a2));
    pg.wait_log_n(|l| l.contains("\"message\":\"session closed\""), 2, SOON);
    let (_, body) = request(&socket, "POST", "/reload");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["revoking"], 0, "{body}");
    echo_on(&mut b1);
}
