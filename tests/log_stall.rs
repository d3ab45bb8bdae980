//! A log sink that stops reading must not stop the node (SPEC "Logging never
//! stops the node"): portgate's stderr is a pipe this test never reads
//! (shrunk to one page, so it fills after a few lines), as a stalled
//! journald or a blocked `| tee` would be. And the writer thread must not
//! take the CPU from a busy runtime worker each time it is woken.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::ChildStderr;
use std::time::{Duration, Instant};

use common::*;

/// A node whose stderr nobody reads.
struct Stalled {
    child: Reaped,
    stderr: Option<ChildStderr>,
    admin: SocketAddr,
    port: u16,
    _dir: tempfile::TempDir,
}

fn start_stalled(audit: &str, drain: &str) -> Stalled {
    let backend = echo_server();
    let port = free_port();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portgate.toml");
    let config = format!(
        "[admin]\nlisten = \"{admin}\"\n[log]\nformat = \"json\"\nqueue_lines = 64\naudit = \"{audit}\"\n\
         [timeouts]\ndrain = \"{drain}\"\n[access]\nallow = [\"127.0.0.0/8\"]\n\
         [[route]]\nname = \"echo\"\nport = {port}\ntarget = \"{backend}\"\n"
    );
    std::fs::write(&path, config).unwrap();
    let mut child = run_command(&path).spawn().expect("spawn portgate");
    let stderr = child.stderr.take().unwrap();
    // One page: the pipe is full after a dozen lines.
    // SAFETY: fcntl on a pipe descriptor this test owns.
    let rc = unsafe { libc::fcntl(stderr.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert!(rc >= 4096, "could not shrink the stderr pipe");
    let node = Stalled { child: Reaped(child), stderr: Some(stderr), admin, port, _dir: dir };
    let deadline = Instant::now() + SOON;
    while TcpStream::connect(admin).is_err() || TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "portgate did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    node
}

/// One short session through the node; `Ok` with what came back.
fn one_session(port: u16, i: usize) -> std::io::Result<Vec<u8>> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(SOON))?;
    try_roundtrip(s, format!("hello {i}").as_bytes())
}

/// An echo check on a session that stays open.
fn echo(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).expect("the established session stopped echoing");
    assert_eq!(got, msg);
}

fn metric(admin: SocketAddr, series: &str) -> f64 {
    let (code, body) = http_get(admin, "/metrics");
    assert_eq!(code, 200);
    metric_value(&body, series).unwrap_or_else(|| panic!("no series {series}"))
}

#[test]
fn a_stalled_log_sink_drops_lines_and_the_node_keeps_serving() {
    let mut node = start_stalled("best_effort", "30s");
    let mut long = connect(addr(node.port));
    echo(&mut long, b"before");

    // Far more session lines than one page of pipe and 64 queued lines.
    for i in 0..400 {
        let got = one_session(node.port, i).expect("a session failed while the log sink stalls");
        assert_eq!(got, format!("hello {i}").as_bytes());
    }
    let dropped = metric(node.admin, "portgate_log_lines_dropped_total");
    assert!(dropped > 0.0, "no line was dropped: the test did not stall the sink");
    assert_eq!(http_get(node.admin, "/healthz").0, 200);
    echo(&mut long, b"during");

    // The sink recovers: the warning comes, with the count.
    let logs = LogBuf::capture(node.stderr.take().unwrap());
    // A line queued after the drops makes the writer emit the warning before
    // it. Lines queued while the writer still works off its backlog are
    // dropped too, so sessions go on until one line gets in.
    let deadline = Instant::now() + SOON;
    let mut i = 1000;
    while !logs.lines().iter().any(|l| l.contains("log lines dropped")) {
        assert!(Instant::now() < deadline, "no `log lines dropped` warning after the sink recovered");
        one_session(node.port, i).unwrap();
        i += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let line = logs.wait_from(0, |l| l.contains("log lines dropped"), 1, SOON);
    let v = parse(&line);
    assert_eq!(v["level"], "WARN");
    assert!(v["dropped"].as_u64().unwrap_or(0) > 0, "{line}");
}

#[test]
fn audit_required_refuses_new_connections_while_lines_cannot_be_recorded() {
    let mut node = start_stalled("required", "30s");
    let mut long = connect(addr(node.port));
    echo(&mut long, b"before");

    let mut refused = 0;
    for i in 0..600 {
        match one_session(node.port, i) {
            Ok(got) if got == format!("hello {i}").as_bytes() => {}
            _ => refused += 1,
        }
        if refused >= 5 {
            break;
        }
    }
    assert!(refused >= 5, "no connection was refused with the log queue full");
    let series = r#"portgate_connections_rejected_total{route="echo",reason="audit_unavailable"}"#;
    assert!(metric(node.admin, series) >= 5.0);
    // Running sessions are untouched.
    echo(&mut long, b"during");

    // Once the sink drains, admission resumes.
    let _logs = LogBuf::capture(node.stderr.take().unwrap());
    let deadline = Instant::now() + SOON;
    let mut i = 10_000;
    loop {
        if matches!(one_session(node.port, i), Ok(got) if got == format!("hello {i}").as_bytes()) {
            break;
        }
        assert!(Instant::now() < deadline, "admission did not resume after the sink drained");
        i += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_drains_and_exits_on_time_with_a_stalled_sink() {
    let mut node = start_stalled("best_effort", "1s");
    let mut long = connect(addr(node.port));
    echo(&mut long, b"before");
    for i in 0..300 {
        one_session(node.port, i).unwrap();
    }
    assert!(metric(node.admin, "portgate_log_lines_dropped_total") > 0.0);
    let start = Instant::now();
    // SAFETY: kill(2) on the child this test spawned.
    assert_eq!(unsafe { libc::kill(node.child.0.id() as i32, libc::SIGTERM) }, 0);
    let deadline = start + Duration::from_secs(2); // drain + a second
    let status = loop {
        if let Some(s) = node.child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "portgate did not exit within drain + 1 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    // The long session was closed with FIN at the end of the drain.
    let mut b = [0u8; 8];
    assert!(matches!(long.read(&mut b), Ok(0) | Err(_)));
}

/// The scheduling policy (field 41 of `/proc/PID/task/TID/stat`) of each of
/// `pid`'s threads, by thread name.
fn thread_policies(pid: i32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let (Ok(comm), Ok(stat)) =
            (std::fs::read_to_string(dir.join("comm")), std::fs::read_to_string(dir.join("stat")))
        else {
            continue; // the thread ended between the listing and the read
        };
        // Fields after the `(comm)` one start at field 3.
        let after = &stat[stat.rfind(')').unwrap() + 1..];
        let policy = after.split_whitespace().nth(41 - 3).unwrap().parse().unwrap();
        out.push((comm.trim().to_string(), policy));
    }
    out
}

#[test]
fn the_log_writer_runs_sched_batch_so_waking_it_does_not_preempt_a_worker() {
    const SCHED_OTHER: u32 = 0;
    const SCHED_BATCH: u32 = 3;
    let pg = Portgate::start(Config::loopback());
    let threads = thread_policies(pg.pid());
    let writer: Vec<_> = threads.iter().filter(|(name, _)| name == "portgate-log").collect();
    assert_eq!(writer.len(), 1, "one log writer thread expected: {threads:?}");
    assert_eq!(writer[0].1, SCHED_BATCH, "{threads:?}");
    // The runtime's workers keep the normal policy: sessions are served
    // as they always were.
    assert!(threads.iter().any(|(name, p)| name != "portgate-log" && *p == SCHED_OTHER), "{threads:?}");
    assert!(threads.iter().all(|(name, p)| name == "portgate-log" || *p == SCHED_OTHER), "{threads:?}");
}
