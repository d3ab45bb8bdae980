//! A `/metrics` scrape must not freeze the sessions (SPEC "Metrics at
//! scale", issue 15): rendering thousands of routes' series takes a while,
//! and it must not happen on a runtime worker, where every session queued
//! on that worker would wait for it. The node runs on one CPU (so the
//! runtime has one worker, as on a 1-vCPU instance), with enough `via`
//! routes that a render takes a noticeable time, and a session echoes one
//! byte at a time while the main thread scrapes.

mod common;

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// `via` routes on one port: enough series that a render takes a visible
/// time even in a release build.
const ROUTES: usize = 8_000;

fn vpce(i: usize) -> String {
    format!("vpce-0{:016x}", (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Echo one byte at a time until `stop`; each round trip's time is kept.
fn echo_loop(mut s: TcpStream, stop: Arc<AtomicBool>, rtts: Arc<Mutex<Vec<(Instant, Duration)>>>) {
    let mut b = [0u8; 1];
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        s.write_all(b"x").expect("the session broke");
        s.read_exact(&mut b).expect("the session stopped echoing");
        assert_eq!(&b, b"x");
        rtts.lock().unwrap().push((t, t.elapsed()));
    }
}

#[test]
fn a_scrape_does_not_stop_the_sessions_on_a_one_worker_node() {
    let backend = echo_server();
    let via_port = free_port();
    let port = free_port();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut config = format!(
        "[admin]\nlisten = \"{admin}\"\n[log]\nformat = \"json\"\nlevel = \"warn\"\n\
         [proxy_protocol]\nmode = \"required\"\ntrusted = [\"127.0.0.0/8\"]\n\
         [access]\nallow = [\"127.0.0.0/8\"]\n\
         [[route]]\nname = \"probe\"\nport = {port}\ntarget = \"{backend}\"\n"
    );
    for i in 0..ROUTES {
        writeln!(
            config,
            "[[route]]\nname = \"tenant-{i}\"\nport = {via_port}\nvia = \"{}\"\ntarget = \"{backend}\"",
            vpce(i)
        )
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portgate.toml");
    std::fs::write(&path, config).unwrap();

    let mut cmd = run_command(&path);
    // SAFETY: only sched_setaffinity(2), async-signal-safe, between fork
    // and exec.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn portgate");
    let logs = LogBuf::capture(child.stderr.take().unwrap());
    let _child = Reaped(child);
    let deadline = Instant::now() + SOON;
    while TcpStream::connect(admin).is_err() {
        assert!(Instant::now() < deadline, "portgate did not start listening: {:?}", logs.lines());
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut s = connect(addr(port));
    let sport = s.local_addr().unwrap().port();
    write!(s, "PROXY TCP4 127.0.0.1 127.0.0.1 {sport} {port}\r\n").unwrap();
    s.write_all(b"y").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).expect("no echo through the probe route");

    let stop = Arc::new(AtomicBool::new(false));
    let rtts = Arc::new(Mutex::new(Vec::new()));
    let echo = {
        let (stop, rtts) = (Arc::clone(&stop), Arc::clone(&rtts));
        std::thread::spawn(move || echo_loop(s, stop, rtts))
    };

    let mut scrapes = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let (code, body) = http_get(admin, "/metrics");
        let took = t.elapsed();
        assert_eq!(code, 200);
        assert!(body.contains("route=\"tenant-7999\""), "the scrape is missing routes");
        scrapes.push((t, took));
    }
    stop.store(true, Ordering::Relaxed);
    echo.join().expect("the echo thread failed");

    let rtts = rtts.lock().unwrap();
    let shortest = scrapes.iter().map(|(_, d)| *d).min().unwrap();
    // Round trips that started while a scrape was in flight.
    let during: Vec<Duration> = rtts
        .iter()
        .filter(|(t, _)| scrapes.iter().any(|(s, d)| *t >= *s && *t < *s + *d))
        .map(|(_, d)| *d)
        .collect();
    let slowest = during.iter().max().copied().unwrap_or_default();
    eprintln!(
        "scrapes {:?}; {} round trips during them, slowest {slowest:?}",
        scrapes.iter().map(|(_, d)| *d).collect::<Vec<_>>(),
        during.len()
    );
    assert!(during.len() >= 10, "too few round trips during the scrapes to tell: {}", during.len());
    // A frozen worker holds the session for the whole render, which is most
    // of a scrape; a free one answers in scheduler time.
    assert!(
        slowest < shortest / 3,
        "a session waited {slowest:?} for a scrape that took {shortest:?}: the render holds the runtime"
    );
}
