//! A resolver that never answers must not stall the node: sessions to a
//! `host:port` target time out on their own, other routes keep working, and
//! a reload still completes at once (name lookups are bounded, and the
//! reload does not share their threads).
//!
//! portgate runs in a mount namespace of its own (`unshare --mount`) whose
//! `/etc/resolv.conf` names a silent "DNS server": a UDP socket this test
//! binds on 127.0.0.99:53 that reads queries and never answers. No query
//! leaves loopback, and the host's resolv.conf is never touched.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

struct Node {
    child: Reaped,
    logs: Arc<LogBuf>,
    config: std::path::PathBuf,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

/// A silent DNS server on 127.0.0.99:53; counts the queries it swallows.
fn silent_dns() -> Option<Arc<AtomicUsize>> {
    let sock = UdpSocket::bind("127.0.0.99:53").ok()?;
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&seen);
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while sock.recv_from(&mut buf).is_ok() {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    Some(seen)
}

fn start(config: &str) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let resolv = dir.path().join("resolv.conf");
    // Each query waits 60 s for the answer that never comes.
    std::fs::write(&resolv, "nameserver 127.0.0.99\noptions timeout:30 attempts:2\n").unwrap();
    let path = dir.path().join("portgate.toml");
    let text = format!("{config}\n[admin]\nlisten = \"{admin}\"\n[log]\nformat = \"json\"\n");
    std::fs::write(&path, text).unwrap();
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg("mount --bind \"$1\" /etc/resolv.conf && exec \"$2\" run -c \"$3\"")
        .arg("sh")
        .arg(&resolv)
        .arg(BIN)
        .arg(&path)
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn unshare");
    let logs = LogBuf::capture(child.stderr.take().unwrap());
    logs.wait_from(0, |l| l.contains("portgate ready"), 1, SOON);
    Node { child: Reaped(child), logs, config: path, admin, _dir: dir }
}

fn unshare_works() -> bool {
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn a_hung_resolver_times_out_its_sessions_and_stalls_nothing_else() {
    if !require("a mount namespace (unshare --mount, as root)", unshare_works(), "run as root") {
        return;
    }
    let Some(queries) = silent_dns() else {
        assert!(!require("UDP 127.0.0.99:53 for a silent resolver", false, "run as root"));
        return;
    };
    let (named, echo_port) = (free_port(), free_port());
    let backend = echo_server();
    let config = format!(
        "[timeouts]\nconnect = \"1s\"\n[access]\nallow = [\"127.0.0.0/8\"]\n\
         [[route]]\nname = \"named\"\nport = {named}\ntarget = \"tenant-db.portgate-test:5432\"\n\
         [[route]]\nname = \"echo\"\nport = {echo_port}\ntarget = \"{backend}\"\n"
    );
    let node = start(&config);

    // More lookups than tokio's blocking pool has threads (512), all hung.
    let clients: Vec<_> = (0..600).map(|_| connect(addr(named))).collect();
    let deadline = Instant::now() + SOON;
    while queries.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "portgate never asked the resolver");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Other routes and the admin port are unaffected.
    let out = roundtrip(connect(addr(echo_port)), b"still here");
    assert_eq!(out, b"still here");
    assert_eq!(http_get(node.admin, "/healthz").0, 200);

    // A reload completes at once, while every lookup is still hung.
    let from = node.logs.len();
    let text = std::fs::read_to_string(&node.config).unwrap();
    std::fs::write(&node.config, text.replace("connect = \"1s\"", "connect = \"2s\"")).unwrap();
    // SAFETY: kill(2) on the child this test spawned (unshare exec'd sh, which exec'd portgate).
    assert_eq!(unsafe { libc::kill(node.child.0.id() as i32, libc::SIGHUP) }, 0);
    let started = Instant::now();
    let line = node.logs.wait_from(from, |l| l.contains("config reload"), 1, SOON);
    assert!(line.contains("\"message\":\"config reloaded\""), "{line}");
    assert!(started.elapsed() < Duration::from_secs(5), "the reload waited {:?}", started.elapsed());

    // The named route's sessions end with a timeout, each within its connect bound.
    for c in clients {
        expect_closed(c);
    }
    let failed = node.logs.wait_from(0, |l| l.contains("\"error_kind\":\"timeout\""), 600, SOON);
    assert!(failed.contains("name lookup timed out"), "{failed}");
}
