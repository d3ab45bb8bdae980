//! Running as a fleet node: reload, revocation, drain, sd_notify, metrics.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// A session that has exchanged a byte (so it is admitted and forwarding).
fn open_session(port: u16) -> std::net::TcpStream {
    let mut s = connect(addr(port));
    s.write_all(b"1").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    s
}

fn still_echoes(s: &mut std::net::TcpStream) -> bool {
    if s.write_all(b"2").is_err() {
        return false;
    }
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(1))
}

#[test]
fn reload_adds_removes_and_retargets_routes() {
    let echo1 = echo_server();
    let echo2 = echo_server();
    let base = free_ports(3);
    let pg = Portgate::start(Config::loopback().route("a", base, echo1).route("b", base + 1, echo1));
    let mut long_lived = open_session(base);

    // Retarget a, remove b, add c.
    let graced = Config::loopback().set("timeouts", "revoke_grace", "200ms");
    pg.write_config(graced.route("a", base, echo2).route("c", base + 2, echo2));
    let outcome = pg.reload();
    assert_eq!(outcome["message"], "config reloaded");
    assert_eq!(outcome["added"], "c");
    assert_eq!(outcome["removed"], "b");
    assert_eq!(outcome["changed"], "a");
    // The removed port is closed by the time the reload reports success:
    // something else can listen there at once.
    let reuse = std::net::TcpListener::bind(addr(base + 1));
    assert!(reuse.is_ok(), "removed port still taken after the reload reported: {reuse:?}");
    drop(reuse);
    // The new port serves.
    assert_eq!(roundtrip(connect(addr(base + 2)), b"c"), b"c");
    // a's session keeps running (a changed target alone does not revoke).
    assert!(still_echoes(&mut long_lived));
    // New sessions on a go to the new target.
    assert_eq!(roundtrip(connect(addr(base)), b"new"), b"new");
    let ev = pg.wait_event("session closed", 2);
    assert_eq!(ev["target"], echo2.to_string());
    pg.wait_metric("portgate_routes", 2.0);
    pg.wait_metric(r#"portgate_config_reloads_total{result="success"}"#, 1.0);
}

#[test]
fn broken_config_changes_nothing() {
    let echo = echo_server();
    let port = free_port();
    let pg = Portgate::start(Config::loopback().route("a", port, echo));
    let hash_before =
        pg.metrics().lines().find(|l| l.starts_with("portgate_config_info{")).unwrap().to_string();
    pg.write_config("[listen]\naddress = \"127.0.0.1\"\nbogus_key = 1\n");
    let outcome = pg.reload();
    assert_eq!(outcome["message"], "config reload failed; still serving the previous config");
    assert!(outcome["reason"].as_str().unwrap().contains("portgate.toml:3:"), "{outcome}");
    assert_eq!(roundtrip(connect(addr(port)), b"still"), b"still");
    pg.wait_metric(r#"portgate_config_reloads_total{result="failure"}"#, 1.0);
    pg.wait_metric("portgate_config_last_reload_success", 0.0);
    let hash_after =
        pg.metrics().lines().find(|l| l.starts_with("portgate_config_info{")).unwrap().to_string();
    assert_eq!(hash_before, hash_after);
    // A reload that cannot bind a new port fails as a whole.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    pg.write_config(Config::loopback().route("a", port, echo).route("x", busy_port, echo));
    let outcome = pg.reload();
    assert!(outcome["reason"].as_str().unwrap().contains(&format!("port {busy_port}")), "{outcome}");
    pg.wait_metric("portgate_routes", 1.0);
    // And a good one afterwards succeeds and sets the gauge back.
    pg.write_config(Config::loopback().route("a", port, echo).route("b", free_port(), echo));
    assert_eq!(pg.reload()["message"], "config reloaded");
    pg.wait_metric("portgate_config_last_reload_success", 1.0);
    let hash_new = pg.metrics().lines().find(|l| l.starts_with("portgate_config_info{")).unwrap().to_string();
    assert_ne!(hash_before, hash_new);
    assert_eq!(pg.metrics().matches("portgate_config_info{").count(), 1, "old hash series is gone");
}

#[test]
fn twenty_reloads_refuse_no_connection_on_an_unchanged_port() {
    let echo = echo_server();
    let base = free_ports(21);
    let pg = Portgate::start(Config::loopback().route("steady", base, echo));
    let mut long_lived = open_session(base);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let client = {
        let (stop, ok) = (Arc::clone(&stop), Arc::clone(&ok));
        thread::spawn(move || {
            let mut failures = Vec::new();
            // Bounded: stops when told, or after 20000 connections.
            for i in 0..20000u32 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match std::net::TcpStream::connect_timeout(&addr(base), SOON) {
                    Ok(s) => {
                        s.set_read_timeout(Some(SOON)).unwrap();
                        if roundtrip(s, &i.to_be_bytes()) == i.to_be_bytes() {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failures.push(format!("{i}: wrong echo"));
                        }
                    }
                    Err(e) => failures.push(format!("{i}: {e}")),
                }
            }
            failures
        })
    };
    for i in 1..=20u16 {
        let mut cfg = Config::loopback().route("steady", base, echo);
        // Alternate adding and removing other routes (ports come and go).
        for j in 1..=(i % 5) {
            cfg = cfg.route(&format!("r{j}"), base + j, echo);
        }
        pg.write_config(&cfg);
        assert_eq!(pg.reload()["message"], "config reloaded", "reload {i}");
    }
    stop.store(true, Ordering::Relaxed);
    let failures = client.join().unwrap();
    assert!(failures.is_empty(), "failed connects during reloads: {failures:?}");
    assert!(ok.load(Ordering::Relaxed) > 0);
    assert!(still_echoes(&mut long_lived), "an established session survives reloads");
}

#[test]
fn revocation_closes_exactly_the_sessions_that_lost_access() {
    let echo = echo_server();
    let base = free_ports(3);
    let graced = Config::loopback().set("timeouts", "revoke_grace", "300ms").route("keep", base, echo);
    let cfg1 = graced
        .clone()
        .with(Route::new("narrowed", base + 1, echo).set("allow", ["127.0.0.0/8"]))
        .route("gone", base + 2, echo);
    let pg = Portgate::start(&cfg1);
    let mut keep = open_session(base);
    let mut narrowed_ok = {
        let mut s = connect_from("127.0.0.2", addr(base + 1));
        s.write_all(b"1").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        s
    };
    let mut narrowed_lost = {
        let mut s = connect_from("127.0.0.3", addr(base + 1));
        s.write_all(b"1").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        s
    };
    let mut gone = open_session(base + 2);

    let cfg2 = graced.with(Route::new("narrowed", base + 1, echo).set("allow", ["127.0.0.2/32"]));
    pg.write_config(&cfg2);
    let t0 = Instant::now();
    assert_eq!(pg.reload()["message"], "config reloaded");
    // Revoked ones see EOF after the grace period, not before.
    let mut b = [0u8; 1];
    assert_eq!(narrowed_lost.read(&mut b).unwrap(), 0);
    assert_eq!(gone.read(&mut b).unwrap_or(0), 0);
    assert!(t0.elapsed() >= Duration::from_millis(250), "revoked before revoke_grace: {:?}", t0.elapsed());
    pg.wait_log_n(|l| l.contains("\"close\":\"revoked\""), 2, SOON);
    // The others continue untouched.
    assert!(still_echoes(&mut keep));
    assert!(still_echoes(&mut narrowed_ok));
    let revoked = pg.events(|v| v["close"] == "revoked");
    let mut names: Vec<&str> = revoked.iter().map(|v| v["route"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["gone", "narrowed"]);
}

#[test]
fn sigterm_unready_then_drain_then_exit_zero() {
    let echo = echo_server();
    let port = free_port();
    let mut pg = Portgate::start(
        Config::loopback()
            .set("timeouts", "shutdown_delay", "400ms")
            .set("timeouts", "drain", "600ms")
            .route("a", port, echo),
    );
    assert_eq!(http_get(pg.admin, "/readyz").0, 200);
    let mut session = open_session(port);
    pg.signal(libc::SIGTERM);
    pg.wait_log(|l| l.contains("shutting down"), SOON);
    // During shutdown_delay: unready, but listeners still accept.
    assert_eq!(http_get(pg.admin, "/readyz").0, 503);
    assert_eq!(http_get(pg.admin, "/healthz").0, 200);
    assert_eq!(roundtrip(connect(addr(port)), b"late"), b"late");
    // Then listeners close; the open session keeps working during drain.
    pg.wait_log(|l| l.contains("listeners closed"), SOON);
    assert!(std::net::TcpStream::connect(addr(port)).is_err(), "listener closed");
    assert_eq!(http_get(pg.admin, "/readyz").0, 503, "admin lives until exit");
    assert!(still_echoes(&mut session));
    // At the drain's end the session is closed with FIN, and the process exits 0.
    let mut b = [0u8; 1];
    assert_eq!(session.read(&mut b).unwrap(), 0);
    let st = pg.wait_exit(SOON);
    assert_eq!(st.code(), Some(0));
    let ev = pg.events(|v| v["message"] == "session closed" && v["close"] == "shutdown");
    assert_eq!(ev.len(), 1);
}

#[test]
fn second_sigterm_ends_at_once() {
    let echo = echo_server();
    let port = free_port();
    let mut pg = Portgate::start(
        Config::loopback()
            .set("timeouts", "shutdown_delay", "60s")
            .set("timeouts", "drain", "60s")
            .route("a", port, echo),
    );
    let _session = open_session(port);
    pg.signal(libc::SIGTERM);
    pg.wait_log(|l| l.contains("shutting down"), SOON);
    let t0 = Instant::now();
    pg.signal(libc::SIGTERM);
    let st = pg.wait_exit(SOON);
    assert_eq!(st.code(), Some(0));
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn sd_notify_messages_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(SOON)).unwrap();
    let echo = echo_server();
    let port = free_port();
    let sp = sock_path.to_str().unwrap().to_string();
    let mut pg = Portgate::start_with(
        Config::loopback().route("a", port, echo),
        &[("NOTIFY_SOCKET", &sp), ("WATCHDOG_USEC", "200000")],
    );
    let recv = || {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("sd_notify message");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    // Skip watchdog pings and status refreshes when looking for state changes.
    let next_state = || loop {
        let m = recv();
        if ["READY=1", "RELOADING=1", "STOPPING=1"].iter().any(|s| m.contains(s)) {
            return m;
        }
    };
    let ready = next_state();
    assert!(ready.contains("READY=1"), "{ready}");
    assert!(ready.contains("STATUS=serving 1 route, 0 sessions"), "{ready}");
    pg.signal(libc::SIGHUP);
    let reloading = next_state();
    assert!(reloading.contains("RELOADING=1") && reloading.contains("MONOTONIC_USEC="), "{reloading}");
    assert!(next_state().contains("READY=1"));
    // A failed reload still ends with READY=1.
    pg.write_config("not toml at all [");
    pg.signal(libc::SIGHUP);
    let m = next_state();
    assert!(m.contains("RELOADING=1"), "{m}");
    assert!(next_state().contains("READY=1"));
    pg.signal(libc::SIGTERM);
    assert!(next_state().contains("STOPPING=1"));
    assert_eq!(pg.wait_exit(SOON).code(), Some(0));
}

#[test]
fn watchdog_pings_at_half_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(SOON)).unwrap();
    let sp = sock_path.to_str().unwrap().to_string();
    let _pg =
        Portgate::start_with(Config::loopback(), &[("NOTIFY_SOCKET", &sp), ("WATCHDOG_USEC", "200000")]);
    let mut pings = 0;
    let t0 = Instant::now();
    while pings < 5 {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("watchdog ping");
        if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
            pings += 1;
        }
    }
    // 5 pings at 100 ms take about 400-500 ms; far below 5 x 200 ms would mean spinning.
    assert!(t0.elapsed() >= Duration::from_millis(300), "pings too fast: {:?}", t0.elapsed());
}

#[test]
fn metrics_have_exact_counts_and_every_series_from_startup() {
    let echo = echo_server();
    let port = free_port();
    let pg = Portgate::start(Config::loopback().with(Route::new("m", port, echo).set("tenant", "acme")));
    let m = pg.metrics();
    for series in [
        r#"portgate_connections_accepted_total{route="m",tenant="acme"}"#,
        r#"portgate_connections_active{route="m",tenant="acme"}"#,
        r#"portgate_bytes_total{route="m",direction="to_target"}"#,
        r#"portgate_bytes_total{route="m",direction="to_client"}"#,
        r#"portgate_config_reloads_total{result="success"}"#,
        r#"portgate_config_reloads_total{result="failure"}"#,
        "portgate_health_checks_total",
    ] {
        assert_eq!(metric_value(&m, series), Some(0.0), "{series} must exist at 0 from startup");
    }
    assert_eq!(metric_value(&m, "portgate_config_last_reload_success"), Some(1.0));
    assert_eq!(metric_value(&m, "portgate_routes"), Some(1.0));
    assert_eq!(
        metric_value(&m, &format!("portgate_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"))),
        Some(1.0)
    );
    assert!(m.contains("portgate_config_info{hash=\""));
    for _ in 0..3 {
        assert_eq!(roundtrip(connect(addr(port)), &[1u8; 1000]), vec![1u8; 1000]);
    }
    pg.wait_metric(r#"portgate_connections_accepted_total{route="m",tenant="acme"}"#, 3.0);
    pg.wait_metric(r#"portgate_bytes_total{route="m",direction="to_target"}"#, 3000.0);
    pg.wait_metric(r#"portgate_bytes_total{route="m",direction="to_client"}"#, 3000.0);
    pg.wait_metric(r#"portgate_session_duration_seconds_count{route="m"}"#, 3.0);
    pg.wait_metric(r#"portgate_upstream_connect_duration_seconds_count{route="m"}"#, 3.0);
    pg.wait_metric(r#"portgate_connections_active{route="m",tenant="acme"}"#, 0.0);
}

#[test]
fn bytes_total_grows_while_a_session_is_open() {
    let echo = echo_server();
    let port = free_port();
    let pg = Portgate::start(Config::loopback().route("live", port, echo));
    let mut s = connect(addr(port));
    s.write_all(&[0u8; 5000]).unwrap();
    let mut back = [0u8; 5000];
    s.read_exact(&mut back).unwrap();
    pg.wait_metric(r#"portgate_bytes_total{route="live",direction="to_target"}"#, 5000.0);
    pg.wait_metric(r#"portgate_bytes_total{route="live",direction="to_client"}"#, 5000.0);
    drop(s);
}

/// `tool` from PATH, or `None` (after [`require`] said so) when it is missing.
fn need(tool: &str) -> Option<std::path::PathBuf> {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(tool))
        .find(|p| p.is_file());
    if require(tool, found.is_some(), "apt-get install prometheus") {
        found
    } else {
        None
    }
}

#[test]
fn promtool_accepts_the_exposition() {
    let Some(promtool) = need("promtool") else { return };
    let echo = echo_server();
    let port = free_port();
    let pg = Portgate::start(Config::loopback().route("p", port, echo));
    assert_eq!(roundtrip(connect(addr(port)), b"x"), b"x");
    pg.wait_metric(r#"portgate_connections_accepted_total{route="p",tenant="p"}"#, 1.0);
    let text = pg.metrics();
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // promtool exits non-zero for lint findings too; a parse error is what matters,
    // and lint findings must be empty as well.
    assert!(out.status.success(), "promtool check metrics:\n{report}\n---\n{text}");
}

#[test]
fn real_prometheus_scrapes_portgate() {
    let Some(prometheus) = need("prometheus") else { return };
    let echo = echo_server();
    let port = free_port();
    let pg = Portgate::start(Config::loopback().route("scraped", port, echo));
    assert_eq!(roundtrip(connect(addr(port)), b"x"), b"x");
    let dir = tempfile::tempdir().unwrap();
    let prom_port = free_port();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: portgate\n    static_configs:\n      - targets: ['{}']\n",
            pg.admin
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(prometheus)
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    let found = loop {
        if Instant::now() > deadline {
            break false;
        }
        if let Ok(s) = std::net::TcpStream::connect(addr(prom_port)) {
            drop(s);
            let (code, body) = http_get(
                addr(prom_port),
                "/api/v1/query?query=portgate_connections_accepted_total%7Broute%3D%22scraped%22%7D",
            );
            if code == 200 && body.contains("\"scraped\"") && body.contains("\"1\"]") {
                break true;
            }
            last = body;
        }
        thread::sleep(Duration::from_millis(250));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(found, "Prometheus never answered the query with accepted=1; last answer: {last}");
}

#[test]
fn a_thousand_reloads_leak_no_descriptors_or_memory() {
    let echo = echo_server();
    let base = free_ports(8);
    let a = Config::loopback().route("r0", base, echo).route("r1", base + 1, echo);
    let mut b = Config::loopback().route("r0", base, echo);
    for j in 2..8u16 {
        b = b.with(Route::new(&format!("r{j}"), base + j, echo).set("allow", ["127.0.0.1/32"]));
    }
    let pg = Portgate::start(&a);
    let mut session = open_session(base);
    let flip = |i: usize| {
        pg.write_config(if i % 2 == 0 { &b } else { &a });
        assert_eq!(pg.reload()["message"], "config reloaded", "reload {i}");
    };
    // Warm up allocator pools and lazily created state.
    for i in 0..100 {
        flip(i);
    }
    let (fds0, rss0) = (open_fds(pg.pid()), proc_status_kib(pg.pid(), "VmRSS"));
    for i in 100..1100 {
        flip(i);
    }
    let (fds1, rss1) = (open_fds(pg.pid()), proc_status_kib(pg.pid(), "VmRSS"));
    assert_eq!(fds1, fds0, "descriptors after 1000 reloads");
    assert!(rss1 <= rss0 + 2048, "RSS grew from {rss0} KiB to {rss1} KiB over 1000 reloads");
    assert!(still_echoes(&mut session), "the session on the unchanged route survived");
}

#[test]
fn config_hash_changes_when_and_only_when_the_config_does() {
    let echo = echo_server();
    let port = free_port();
    let pg = Portgate::start(Config::loopback().set("keepalive", "time", "60s").route("h", port, echo));
    let hash = || pg.metrics().lines().find(|l| l.starts_with("portgate_config_info{")).unwrap().to_string();
    let h0 = hash();
    // Same meaning, different form: comments, order, duration spelling.
    pg.write_config(format!(
        "[keepalive]\ntime = \"1m\"\n[access]\nallow = [ \"127.0.0.0/8\" ]\n[listen]\naddress = \"127.0.0.1\"\n\
         [[route]]\nname = \"h\"\nport = {port}\ntarget = \"{echo}\"\n# a comment\n"
    ));
    assert_eq!(pg.reload()["message"], "config reloaded");
    assert_eq!(hash(), h0, "a cosmetic change keeps the hash");
    pg.write_config(Config::loopback().set("keepalive", "time", "61s").route("h", port, echo));
    assert_eq!(pg.reload()["message"], "config reloaded");
    assert_ne!(hash(), h0, "a behavioural change changes the hash");
}

#[test]
fn admin_readyz_behind_a_proxy_header_as_nlb_health_check() {
    use portgate::proxy_protocol::{encode_v2, Command as PpCommand};
    let pg = Portgate::start(Config::loopback().proxy_required(&["127.0.0.1/32"]));
    let ask = |from: &str, prefix: &[u8]| {
        let mut s = connect_from(from, pg.admin);
        let mut req = prefix.to_vec();
        req.extend_from_slice(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(&req).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    // The NLB's HTTP check: LOCAL header (no address block), then the request.
    let local = encode_v2(PpCommand::Local, None, None, &[]);
    assert!(ask("127.0.0.1", &local).starts_with("HTTP/1.1 200"), "readyz behind LOCAL");
    pg.wait_metric("portgate_health_checks_total", 1.0);
    let proxy = encode_v2(
        PpCommand::Proxy,
        Some(("10.0.0.9:1".parse().unwrap(), "10.0.0.1:9090".parse().unwrap())),
        None,
        &[],
    );
    assert!(ask("127.0.0.1", &proxy).starts_with("HTTP/1.1 200"));
    // Plain HTTP still works; a header from an untrusted peer does not.
    assert!(ask("127.0.0.2", b"").starts_with("HTTP/1.1 200"));
    assert!(ask("127.0.0.2", &local).starts_with("HTTP/1.1 400"));
}
