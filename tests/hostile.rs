//! Hostile clients and process-level faults: slowloris, floods from one
//! source, descriptor exhaustion, kill -9 and restart.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use portgate::proxy_protocol::{encode_v2, Command as PpCommand};

/// A target that counts the connections it receives and echoes them.
fn counting_echo() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&n);
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (a, n)
}

#[test]
fn slowloris_clients_are_cut_at_header_timeout_and_cost_no_target_connection() {
    let (target, dials) = counting_echo();
    let port = free_port();
    let pg = Portgate::start(
        Config::loopback()
            .proxy_required(&["127.0.0.1/32"])
            .set("proxy_protocol", "header_timeout", "700ms")
            .allow(&["10.0.0.0/8"])
            .route("r", port, target),
    );
    let header = encode_v2(
        PpCommand::Proxy,
        Some(("10.1.1.1:1".parse().unwrap(), "10.0.0.1:22".parse().unwrap())),
        None,
        &[],
    );
    // 50 slow clients, each one byte short of a header, dribbling.
    let slow: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut s = connect(addr(port));
            s.write_all(&header[..header.len() - 1]).unwrap();
            s
        })
        .collect();
    // Meanwhile a real client is served at once.
    let mut good = header.clone();
    good.extend_from_slice(b"legit");
    let t0 = Instant::now();
    assert_eq!(roundtrip(connect(addr(port)), &good), b"legit");
    assert!(t0.elapsed() < Duration::from_millis(600), "the slow clients delayed a good one");
    for s in slow {
        expect_closed(s);
    }
    pg.wait_metric(r#"portgate_connections_rejected_total{route="",reason="proxy_header"}"#, 50.0);
    assert_eq!(dials.load(Ordering::SeqCst), 1, "only the good client reached the target");
}

#[test]
fn one_flooding_source_cannot_starve_others() {
    let (target, _) = counting_echo();
    let port = free_port();
    let pg = Portgate::start(Config::loopback().set("access", "max_per_source", 2).route("r", port, target));
    let open = |from: &str| {
        let mut s = connect_from(from, addr(port));
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).map(|_| s)
    };
    let a1 = open("127.0.0.2").unwrap();
    let _a2 = open("127.0.0.2").unwrap();
    // The flood: more from the same source are refused...
    for _ in 0..5 {
        let mut s = connect_from("127.0.0.2", addr(port));
        s.write_all(b"x").unwrap();
        expect_closed(s);
    }
    // ...while another source is still served.
    let _other = open("127.0.0.3").expect("another source is served");
    pg.wait_metric(r#"portgate_connections_rejected_total{route="r",reason="limit"}"#, 5.0);
    // A slot frees when a session ends.
    drop(a1);
    pg.wait_metric(r#"portgate_connections_active{route="r",tenant="r"}"#, 2.0);
    assert!(open("127.0.0.2").is_ok(), "the freed slot is usable again");
}

#[test]
fn descriptor_exhaustion_is_survived_logged_once_and_recovered() {
    let echo = echo_server();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = dir.path().join("p.toml");
    let config = Config::loopback()
        .set("admin", "listen", addr(admin))
        .set("log", "format", "json")
        .route("r", port, echo)
        .to_string();
    std::fs::write(&cfg, &config).unwrap();
    /// Killed at the end; on a failure its config and log are printed.
    struct Node {
        child: std::process::Child,
        logs: Arc<LogBuf>,
        config: String,
    }
    impl Drop for Node {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.logs.dump_if_failing("under prlimit --nofile=128:128", &self.config);
        }
    }
    let mut child = Command::new("prlimit")
        .arg("--nofile=128:128")
        .arg(BIN)
        .arg("run")
        .arg("-c")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("prlimit (util-linux)");
    let logs = LogBuf::capture(child.stderr.take().unwrap());
    let mut node = Node { child, logs: Arc::clone(&logs), config };
    let wait_for = |pred: fn(&str) -> bool| logs.wait_from(0, pred, 1, SOON);
    wait_for(|l| l.contains("portgate ready"));
    // Far more sessions than 128 descriptors allow (two per session).
    let mut held = Vec::new();
    for _ in 0..150 {
        held.push(connect(addr(port)));
    }
    wait_for(|l| l.contains("out of file descriptors"));
    // Still alive, still answering its admin port? Descriptors are exhausted, so
    // only check the process is alive, then free descriptors.
    assert!(node.child.try_wait().unwrap().is_none(), "portgate died under descriptor exhaustion");
    drop(held);
    // Serves again as soon as descriptors free up.
    let deadline = Instant::now() + SOON;
    loop {
        let s = connect(addr(port));
        if roundtrip(s, b"back").as_slice() == b"back" {
            break;
        }
        assert!(Instant::now() < deadline, "portgate did not recover");
        thread::sleep(Duration::from_millis(50));
    }
    wait_for(|l| l.contains("accepting connections again"));
    let lines = logs.lines();
    let starved = lines.iter().filter(|l| l.contains("out of file descriptors")).count();
    assert_eq!(starved, 1, "logged once per exhaustion episode:\n{}", lines.join("\n"));
    drop(node);
}

#[test]
fn kill_9_and_restart_under_load() {
    let echo = echo_server();
    let port = free_port();
    let config = Config::loopback().route("r", port, echo);
    let first = Portgate::start(&config);
    let stop = Arc::new(AtomicBool::new(false));
    let ok_after = Arc::new(AtomicUsize::new(0));
    let restarted = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, ok_after, restarted) = (Arc::clone(&stop), Arc::clone(&ok_after), Arc::clone(&restarted));
        thread::spawn(move || {
            let mut bad_after_restart = 0;
            for i in 0..50_000u32 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let was_restarted = restarted.load(Ordering::SeqCst);
                let ok = TcpStream::connect_timeout(&addr(port), Duration::from_secs(2))
                    .ok()
                    .map(|s| {
                        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                        try_roundtrip(s, &i.to_be_bytes()).is_ok_and(|b| b == i.to_be_bytes())
                    })
                    .unwrap_or(false);
                if was_restarted {
                    if ok {
                        ok_after.fetch_add(1, Ordering::Relaxed);
                    } else {
                        bad_after_restart += 1;
                    }
                }
            }
            bad_after_restart
        })
    };
    // Let load run, then kill -9 mid-traffic.
    first.wait_log_n(|l| l.contains("session closed"), 20, SOON);
    first.signal(libc::SIGKILL);
    drop(first);
    // A new node binds the same ports at once (SO_REUSEADDR despite TIME_WAIT).
    let second = Portgate::start(&config);
    restarted.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + SOON;
    while ok_after.load(Ordering::Relaxed) < 20 && Instant::now() < deadline && !load.is_finished() {
        thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    let bad = load.join().unwrap();
    drop(second);
    assert_eq!(bad, 0, "connections failed after the restart was ready");
    assert!(ok_after.load(Ordering::Relaxed) >= 20);
}
