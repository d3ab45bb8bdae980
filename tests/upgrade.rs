//! Upgrade in place, end to end: a node started from an installed copy of
//! the binary, a fresh copy installed over it, and `portgate upgrade` (or
//! SIGUSR2) while sessions idle, stream and connect; then every way the
//! upgrade can fail, each leaving the old process serving everything.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::control::{portgate_cmd, request_json};
use common::*;
use sha2::{Digest, Sha256};

/// Install a shell script at `dir/portgate` instead of the binary.
fn install_script(dir: &Path, body: &str) {
    let tmp = dir.join(".portgate.new");
    std::fs::write(&tmp, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, dir.join("portgate")).unwrap();
}

/// A node run from an installed copy, and every process that succeeded it
/// (killed at the end of the test).
struct Node {
    dir: tempfile::TempDir,
    config: PathBuf,
    socket: PathBuf,
    admin: SocketAddr,
    port: u16,
    first: Child,
    logs: Arc<LogBuf>,
    /// The pid serving now.
    pid: i32,
}

impl Drop for Node {
    fn drop(&mut self) {
        // SAFETY: kill(2) on processes this test started (or their successors).
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let _ = self.first.kill();
        let _ = self.first.wait();
        self.logs.dump_if_failing("upgrade test", &std::fs::read_to_string(&self.config).unwrap_or_default());
    }
}

fn config_text(port: u16, target: SocketAddr, admin: SocketAddr) -> String {
    format!(
        "[listen]\naddress = \"127.0.0.1\"\n[admin]\nlisten = \"{admin}\"\n[control]\nsocket = \"control.sock\"\n\
         [log]\nformat = \"json\"\n[access]\nallow = [\"127.0.0.0/8\"]\n\
         [[route]]\nname = \"echo\"\ntenant = \"t\"\nport = {port}\ntarget = \"{target}\"\n"
    )
}

impl Node {
    fn start(target: SocketAddr, env: &[(&str, &str)]) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let bin = install_binary(dir.path());
        let port = free_port();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = dir.path().join("portgate.toml");
        std::fs::write(&config, config_text(port, target, admin)).unwrap();
        let mut cmd = Command::new(&bin);
        cmd.arg("run")
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("RUNTIME_DIRECTORY");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut first = cmd.spawn().expect("spawn the installed portgate");
        let logs = LogBuf::capture(first.stderr.take().unwrap());
        let pid = first.id() as i32;
        let socket = dir.path().join("control.sock");
        let node = Node { dir, config, socket, admin, port, first, logs, pid };
        node.logs.wait_from(0, |l| l.contains("portgate ready"), 1, SOON);
        node
    }

    /// `portgate upgrade -c CONFIG`: (exit code, stdout, stderr).
    fn upgrade(&self) -> (Option<i32>, String, String) {
        let o = portgate_cmd(&["upgrade", "-c", self.config.to_str().unwrap()]);
        let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (o.status.code(), s(&o.stdout), s(&o.stderr))
    }

    /// Upgrade, expecting success; the new pid becomes the node's.
    fn upgrade_ok(&mut self) -> i32 {
        let from = self.logs.len();
        let (code, out, err) = self.upgrade();
        assert_eq!(code, Some(0), "upgrade failed: {out} {err}");
        let line = self.logs.wait_from(from, |l| l.contains("\"upgraded\""), 1, SOON);
        let handed = self.logs.wait_from(from, |l| l.contains("handed over to the new process"), 1, SOON);
        let pid = parse(&handed)["pid"].as_i64().unwrap() as i32;
        assert_ne!(pid, self.pid);
        // The old process is gone.
        let deadline = Instant::now() + SOON;
        // SAFETY: kill(pid, 0) probes a process this test started.
        while unsafe { libc::kill(self.pid, 0) } == 0 && !is_zombie(self.pid) {
            assert!(Instant::now() < deadline, "the old process {} did not exit", self.pid);
            thread::sleep(Duration::from_millis(10));
        }
        let _ = parse(&line);
        self.pid = pid;
        pid
    }

    fn sessions(&self) -> Vec<serde_json::Value> {
        request_json(&self.socket, "GET", "/sessions").as_array().unwrap().clone()
    }

    fn metric(&self, series: &str) -> Option<f64> {
        let (code, body) = http_get(self.admin, "/metrics");
        assert_eq!(code, 200);
        metric_value(&body, series)
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
        .unwrap_or(true)
}

fn echo(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    s.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got)?;
    assert_eq!(got, msg);
    Ok(())
}

/// A stream both ways through an echo target: paced 16 KiB chunks written
/// by one thread, read back and hashed by another. It writes at least
/// `min_total` bytes and goes on while `keep_going` is set (the upgrade
/// test clears it once the upgrade is done, so a slow machine cannot let
/// the stream end before the upgrade), at most [`STREAM_MAX`].
struct Stream {
    writer: thread::JoinHandle<[u8; 32]>,
    reader: thread::JoinHandle<[u8; 32]>,
    written: Arc<AtomicU64>,
    /// Whether the writer is done (it half-closed).
    ended: Arc<AtomicBool>,
}

/// The most a stream writes, whatever `keep_going` says (bounds the loop).
const STREAM_MAX: usize = 256 << 20;
const CHUNK: usize = 16 * 1024;

fn stream(port: u16, min_total: usize, seed: u64, keep_going: Arc<AtomicBool>) -> Stream {
    let s = connect(addr(port));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = s;
    let written = Arc::new(AtomicU64::new(0));
    let ended = Arc::new(AtomicBool::new(false));
    let (counter, done) = (Arc::clone(&written), Arc::clone(&ended));
    let writer = thread::spawn(move || {
        let mut h = Sha256::new();
        let mut sent = 0;
        let mut i = 0u64;
        while sent < STREAM_MAX && (sent < min_total || keep_going.load(Ordering::SeqCst)) {
            let chunk = pattern(CHUNK, seed.wrapping_mul(1_000_003).wrapping_add(i));
            i += 1;
            w.write_all(&chunk).expect("stream write");
            h.update(&chunk);
            sent += chunk.len();
            counter.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            thread::sleep(Duration::from_millis(2));
        }
        done.store(true, Ordering::SeqCst);
        w.shutdown(std::net::Shutdown::Write).unwrap();
        h.finalize().into()
    });
    let reader = thread::spawn(move || {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = r.read(&mut buf).expect("stream read");
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        h.finalize().into()
    });
    Stream { writer, reader, written, ended }
}

/// Connects (and exchanges a few bytes) in a loop until `stop`; counts
/// attempts and failures. Bounded: at most `max` connections.
fn connect_loop(port: u16, stop: Arc<AtomicBool>, max: usize) -> thread::JoinHandle<(usize, usize)> {
    thread::spawn(move || {
        let (mut tried, mut failed) = (0, 0);
        while !stop.load(Ordering::SeqCst) && tried < max {
            tried += 1;
            let ok = TcpStream::connect_timeout(&addr(port), SOON)
                .and_then(|s| {
                    s.set_read_timeout(Some(SOON))?;
                    try_roundtrip(s, b"ping")
                })
                .is_ok_and(|got| got == b"ping");
            if !ok {
                failed += 1;
            }
        }
        (tried, failed)
    })
}

/// client address → (id, started) of the listed sessions among `clients`.
fn listed(node: &Node, clients: &[String]) -> BTreeMap<String, (String, String)> {
    node.sessions()
        .iter()
        .filter(|s| clients.contains(&s["client"].as_str().unwrap_or("").to_owned()))
        .map(|s| {
            let client = s["client"].as_str().unwrap().to_owned();
            (client, (s["id"].as_str().unwrap().to_owned(), s["started"].as_str().unwrap().to_owned()))
        })
        .collect()
}

#[test]
fn an_upgrade_cuts_nothing_and_loses_no_byte() {
    let target = echo_server();
    let notify_dir = tempfile::tempdir().unwrap();
    let notify_path = notify_dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(SOON)).unwrap();
    let mut node = Node::start(target, &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())]);

    // 20 idle sessions that have echoed once, 4 streams both ways.
    let mut idle: Vec<TcpStream> = (0..20)
        .map(|i| {
            let mut s = connect(addr(node.port));
            echo(&mut s, format!("idle {i}").as_bytes()).unwrap();
            s
        })
        .collect();
    let keep_going = Arc::new(AtomicBool::new(true));
    let streams: Vec<Stream> =
        (0..4).map(|i| stream(node.port, 1 << 20, 100 + i, Arc::clone(&keep_going))).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let looper = connect_loop(node.port, Arc::clone(&stop), 100_000);
    // Every stream is under way before the upgrade.
    let deadline = Instant::now() + SOON;
    while streams.iter().any(|s| s.written.load(Ordering::SeqCst) < 256 * 1024) {
        assert!(Instant::now() < deadline, "the streams did not start");
        thread::sleep(Duration::from_millis(5));
    }
    let clients: Vec<String> = idle.iter().map(|s| s.local_addr().unwrap().to_string()).collect();
    let before = listed(&node, &clients);
    assert_eq!(before.len(), 20);
    let old_pid = node.pid;

    // A fresh copy is installed over the running one, then the upgrade.
    install_binary(node.dir.path());
    let from = node.logs.len();
    let new_pid = node.upgrade_ok();
    let ended_at_upgrade: Vec<bool> = streams.iter().map(|s| s.ended.load(Ordering::SeqCst)).collect();
    let written_at_upgrade: Vec<u64> = streams.iter().map(|s| s.written.load(Ordering::SeqCst)).collect();
    // Each stream carries on for another 1 MiB through the new process, then ends.
    let goal: Vec<u64> = written_at_upgrade.iter().map(|w| w + (1 << 20)).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while streams.iter().zip(&goal).any(|(s, g)| s.written.load(Ordering::SeqCst) < *g) {
        assert!(Instant::now() < deadline, "the streams stalled after the upgrade");
        thread::sleep(Duration::from_millis(5));
    }
    keep_going.store(false, Ordering::SeqCst);
    let upgraded = parse(&node.logs.wait_from(from, |l| l.contains("\"upgraded\""), 1, SOON));
    assert!(upgraded["sessions"].as_u64().unwrap() >= 24, "{upgraded}");
    assert_eq!(upgraded["from_version"], upgraded["to_version"]);

    // systemd hears MAINPID= from the old process, then READY=1 from the new.
    let mut got = String::new();
    let deadline = Instant::now() + SOON;
    while !(got.contains(&format!("MAINPID={new_pid}")) && got.contains("READY=1")) {
        assert!(Instant::now() < deadline, "no MAINPID/READY: {got:?}");
        let mut buf = [0u8; 4096];
        if let Ok(n) = notify.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            // The old process's READY at startup came before; keep what follows MAINPID.
            if msg.contains("MAINPID=") || got.contains("MAINPID=") {
                got.push_str(&msg);
                got.push('\n');
            }
        }
    }
    let mainpid_at = got.find("MAINPID=").unwrap();
    assert!(got[mainpid_at..].contains("READY=1"), "READY=1 must follow MAINPID=: {got:?}");
    assert_ne!(new_pid, old_pid);

    // Every idle session still echoes, and is the same session.
    for (i, s) in idle.iter_mut().enumerate() {
        echo(s, format!("after {i}").as_bytes()).expect("an idle session was cut by the upgrade");
    }
    assert_eq!(listed(&node, &clients), before, "the session list changed across the upgrade");

    // Every stream arrives byte-exact.
    for (i, s) in streams.into_iter().enumerate() {
        assert!(!ended_at_upgrade[i], "stream {i} had ended before the upgrade");
        let sent = s.writer.join().expect("a stream's writer failed");
        let got = s.reader.join().expect("a stream's reader failed");
        assert_eq!(got, sent, "stream {i} is not byte-exact across the upgrade");
    }
    stop.store(true, Ordering::SeqCst);
    let (tried, failed) = looper.join().unwrap();
    eprintln!("upgrade under load: {tried} connections attempted, {failed} failed; 24 long sessions carried");
    assert_eq!(failed, 0, "{failed} of {tried} connections failed across the upgrade");
    assert!(tried > 0);
    assert_eq!(node.metric(r#"portgate_upgrades_total{result="success"}"#), Some(1.0));
    // The old process's sessions did not end: no closed line for them.
    let closed_idle = node
        .logs
        .events(|v| v["message"] == "session closed")
        .iter()
        .filter(|v| clients.iter().any(|c| v["client"] == c.as_str()))
        .count();
    assert_eq!(closed_idle, 0);
}

/// An upgrade that fails leaves the old process serving everything: the
/// idle sessions echo, the stream is byte-exact, new connections work, and
/// `portgate upgrade` says why with exit 1.
fn fails_safely(node: &mut Node, break_it: impl FnOnce(&Node), says: &str) {
    let mut idle: Vec<TcpStream> = (0..3)
        .map(|i| {
            let mut s = connect(addr(node.port));
            echo(&mut s, format!("idle {i}").as_bytes()).unwrap();
            s
        })
        .collect();
    let s = stream(node.port, 2 << 20, 7, Arc::new(AtomicBool::new(false)));
    let pid = node.pid;
    break_it(node);
    let started = Instant::now();
    let (code, out, err) = node.upgrade();
    assert_eq!(code, Some(1), "the upgrade should fail ({says}): {out} {err}");
    assert!(err.contains(says), "stderr does not say {says:?}: {err}");
    assert!(started.elapsed() < Duration::from_secs(15), "the failure took {:?}", started.elapsed());
    node.logs.wait_from(0, |l| l.contains("\"upgrade failed\""), 1, SOON);
    // SAFETY: kill(pid, 0) probes the process this test started.
    assert_eq!(unsafe { libc::kill(pid, 0) }, 0, "the old process is gone");
    for (i, c) in idle.iter_mut().enumerate() {
        echo(c, format!("still {i}").as_bytes()).expect("an idle session was cut by a failed upgrade");
    }
    let sent = s.writer.join().unwrap();
    assert_eq!(s.reader.join().unwrap(), sent, "the stream is not byte-exact after a failed upgrade");
    assert_eq!(roundtrip(connect(addr(node.port)), b"new"), b"new");
    assert_eq!(node.metric(r#"portgate_upgrades_total{result="failure"}"#), Some(1.0));
    assert_eq!(node.sessions().len(), 3);
}

#[test]
fn an_invalid_config_leaves_the_old_process_serving() {
    let mut node = Node::start(echo_server(), &[]);
    fails_safely(
        &mut node,
        |n| {
            let text = std::fs::read_to_string(&n.config).unwrap();
            std::fs::write(
                &n.config,
                text.replace("allow = [\"127.0.0.0/8\"]", "allow = [\"127.0.0.0/33\"]"),
            )
            .unwrap();
        },
        "exited",
    );
    assert!(
        node.logs.lines().iter().any(|l| l.contains("portgate.toml:")),
        "the new process did not say why"
    );
}

#[test]
fn a_binary_that_does_not_start_leaves_the_old_process_serving() {
    let mut node = Node::start(echo_server(), &[]);
    fails_safely(&mut node, |n| install_script(n.dir.path(), "exit 3"), "exited");
}

#[test]
fn a_binary_that_cannot_read_the_handover_leaves_the_old_process_serving() {
    // The successor inherits this; it claims to read only version 2.
    let mut node = Node::start(echo_server(), &[("PORTGATE_HANDOVER_VERSIONS", "2")]);
    fails_safely(&mut node, |n| drop(install_binary(n.dir.path())), "reads handover versions [2]");
}

#[test]
fn a_successor_that_dies_after_taking_the_sessions_gives_them_back() {
    let mut node = Node::start(echo_server(), &[]);
    // A fake successor: a valid Hello (version 1), then it reads what it is
    // sent and dies before answering Adopted, after the sessions were frozen
    // and sent.
    let hello = r"printf 'PGUP\000\001\001\000\001\000\001\000\005fake1' >&0";
    fails_safely(&mut node, |n| install_script(n.dir.path(), &format!("{hello}\nsleep 1\nexit 1")), "exited");
    assert!(
        node.logs.lines().iter().any(|l| l.contains("upgrade failed") && l.contains("closed")),
        "the failure was not the channel closing after the handover started"
    );
}

#[test]
fn a_successor_that_never_answers_is_killed_after_10_s() {
    let mut node = Node::start(echo_server(), &[]);
    fails_safely(&mut node, |n| install_script(n.dir.path(), "exec sleep 60"), "no answer");
}

#[test]
fn fifty_upgrades_under_traffic_leak_nothing() {
    let target = echo_server();
    let mut node = Node::start(target, &[]);
    let mut idle: Vec<TcpStream> = (0..5)
        .map(|i| {
            let mut s = connect(addr(node.port));
            echo(&mut s, format!("idle {i}").as_bytes()).unwrap();
            s
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let looper = connect_loop(node.port, Arc::clone(&stop), 1_000_000);
    // After one upgrade the process is in its steady shape.
    node.upgrade_ok();
    let fds_first = open_fds(node.pid);
    let rss_first = proc_status_kib(node.pid, "VmRSS");
    let upgrades = AtomicUsize::new(1);
    for _ in 0..49 {
        node.upgrade_ok();
        upgrades.fetch_add(1, Ordering::SeqCst);
    }
    for (i, s) in idle.iter_mut().enumerate() {
        echo(s, format!("after 50 {i}").as_bytes()).expect("an idle session was cut");
    }
    stop.store(true, Ordering::SeqCst);
    let (tried, failed) = looper.join().unwrap();
    let fds_last = open_fds(node.pid);
    let rss_last = proc_status_kib(node.pid, "VmRSS");
    eprintln!(
        "{} upgrades: {tried} connections, {failed} failed; fds {fds_first} -> {fds_last}; RSS {rss_first} -> {rss_last} KiB",
        upgrades.load(Ordering::SeqCst)
    );
    assert_eq!(failed, 0, "{failed} of {tried} connections failed across 50 upgrades");
    assert!(fds_last <= fds_first + 4, "descriptors grew from {fds_first} to {fds_last} over 50 upgrades");
    assert!(rss_last < rss_first + 8 * 1024, "RSS grew from {rss_first} to {rss_last} KiB over 50 upgrades");
    let ids: std::collections::HashSet<String> =
        node.sessions().iter().filter_map(|s| s["id"].as_str().map(str::to_owned)).collect();
    assert!(ids.len() >= 5);
}

/// The balancer's health check must never see the node unready across an
/// upgrade: the new process answers `/readyz` (on the inherited admin
/// socket) only as ready.
#[test]
fn readyz_answers_200_throughout_upgrades() {
    let mut node = Node::start(echo_server(), &[]);
    // Sessions to carry make the new process's start longer.
    let _idle: Vec<TcpStream> = (0..50)
        .map(|i| {
            let mut s = connect(addr(node.port));
            echo(&mut s, format!("idle {i}").as_bytes()).unwrap();
            s
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (flag, admin) = (Arc::clone(&stop), node.admin);
    let poller = thread::spawn(move || {
        let (mut polls, mut bad) = (0u64, Vec::new());
        while !flag.load(Ordering::SeqCst) && polls < 1_000_000 {
            polls += 1;
            let (code, body) = http_get(admin, "/readyz");
            if code != 200 {
                bad.push(format!("{code} {}", body.trim()));
            }
        }
        (polls, bad)
    });
    for _ in 0..10 {
        node.upgrade_ok();
    }
    stop.store(true, Ordering::SeqCst);
    let (polls, bad) = poller.join().unwrap();
    eprintln!("10 upgrades: /readyz answered {polls} times, {} not 200", bad.len());
    assert!(bad.is_empty(), "/readyz not 200 across an upgrade: {bad:?}");
}
