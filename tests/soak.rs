//! Bounded soak: thousands of concurrent sessions, connection churn with
//! random sizes and half-closes, and a reload every second; every byte is
//! verified, and the node's descriptors and memory come back to where they
//! were. `PORTGATE_SOAK_SECS` (default 15) sets the length of the main phase:
//! `PORTGATE_SOAK_SECS=600 cargo nextest run --test soak` for a long soak.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ROUTES: u16 = 10;
const IDLE_SESSIONS: usize = 2000;
const CHURN_WORKERS: usize = 32;
const MAX_SIZE: usize = 512 * 1024;

fn raise_nofile() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on a struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { continue };
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    a
}

/// xorshift: cheap deterministic randomness per worker.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One churn session: connect, send `size` bytes in random chunks (reading
/// the echo concurrently), half-close, read the rest, verify.
async fn churn_once(port: u16, size: usize, seed: u64) -> Result<(), String> {
    let data = pattern(size, seed);
    let s = TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| format!("connect: {e}"))?;
    let (mut r, mut w) = s.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        let mut rng = Rng(seed | 1);
        let mut off = 0;
        while off < sent.len() {
            let n = (1 + rng.below(64 * 1024) as usize).min(sent.len() - off);
            w.write_all(&sent[off..off + n]).await?;
            off += n;
        }
        w.shutdown().await
    });
    let mut back = Vec::with_capacity(size);
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut back))
        .await
        .map_err(|_| "read timed out".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    writer.await.map_err(|e| format!("writer: {e}"))?.map_err(|e| format!("write: {e}"))?;
    if back != data {
        return Err(format!("{} bytes sent, {} received, content differs", data.len(), back.len()));
    }
    Ok(())
}

fn config(base: u16, echo: SocketAddr, flip: bool) -> Config {
    let mut c = Config::loopback();
    for i in 0..ROUTES {
        c = c.route(&format!("r{i}"), base + i, echo);
    }
    // Routes that come and go with every reload.
    let extra = if flip { ROUTES..ROUTES + 3 } else { ROUTES + 3..ROUTES + 5 };
    for i in extra {
        c = c.route(&format!("x{i}"), base + i, echo);
    }
    c
}

/// Run one phase of load for `secs`; returns (sessions verified, errors).
async fn phase(pg: Arc<Portgate>, base: u16, echo: SocketAddr, secs: u64) -> (u64, Vec<String>) {
    // Thousands of established sessions, idle while the churn and reloads go on.
    let mut idle = Vec::with_capacity(IDLE_SESSIONS);
    for i in 0..IDLE_SESSIONS {
        let mut s = TcpStream::connect(("127.0.0.1", base + (i as u16 % ROUTES))).await.unwrap();
        s.write_all(&(i as u32).to_be_bytes()).await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(b, (i as u32).to_be_bytes());
        idle.push(s);
    }
    // The phase's time runs from here: opening the idle sessions may take
    // seconds on a loaded machine, and must not eat the churn's time.
    let deadline = Instant::now() + Duration::from_secs(secs);
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop_reloads = Arc::new(AtomicBool::new(false));
    // A reload every second, from a blocking thread (the harness is blocking).
    let reloader = {
        let (pg, stop) = (Arc::clone(&pg), Arc::clone(&stop_reloads));
        tokio::task::spawn_blocking(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) && n < 3600 {
                pg.write_config(config(base, echo, n % 2 == 0));
                let out = pg.reload();
                assert_eq!(out["message"], "config reloaded", "{out}");
                n += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            n
        })
    };
    let mut workers = Vec::new();
    for w in 0..CHURN_WORKERS {
        let (ok, errors) = (Arc::clone(&ok), Arc::clone(&errors));
        workers.push(tokio::spawn(async move {
            let mut rng = Rng(0x9e3779b97f4a7c15 ^ (w as u64 + 1));
            // Bounded by time and by count.
            for _ in 0..1_000_000u32 {
                if Instant::now() >= deadline {
                    break;
                }
                let port = base + rng.below(ROUTES as u64) as u16;
                // Mostly small, sometimes empty, sometimes large.
                let size = match rng.below(10) {
                    0 => 0,
                    1 => rng.below(MAX_SIZE as u64) as usize,
                    _ => rng.below(4096) as usize,
                };
                match churn_once(port, size, rng.next()).await {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => errors.lock().unwrap().push(format!("port {port}, {size} bytes: {e}")),
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    stop_reloads.store(true, Ordering::Relaxed);
    let reloads = reloader.await.unwrap();
    assert!(reloads >= 1 || secs < 2, "reloads happened during the phase");
    // The idle sessions survived every reload and still echo.
    for (i, s) in idle.iter_mut().enumerate() {
        s.write_all(&(i as u32).to_be_bytes()).await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap_or_else(|e| panic!("idle session {i} died: {e}"));
    }
    drop(idle);
    // End every phase on the same config, so the listener count compares.
    tokio::task::spawn_blocking(move || {
        pg.write_config(config(base, echo, false));
        assert_eq!(pg.reload()["message"], "config reloaded");
    })
    .await
    .unwrap();
    let errors = errors.lock().unwrap().clone();
    (ok.load(Ordering::Relaxed), errors)
}

fn wait_idle(pg: &Portgate) {
    let deadline = Instant::now() + SOON;
    loop {
        let m = pg.metrics();
        let active: f64 = m
            .lines()
            .filter(|l| l.starts_with("portgate_connections_active{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        if active == 0.0 {
            return;
        }
        assert!(Instant::now() < deadline, "{active} sessions still active");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn soak_sessions_churn_and_reloads() {
    raise_nofile();
    let secs: u64 = std::env::var("PORTGATE_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let base = free_ports(ROUTES + 5);
    let echo = rt.block_on(echo_server());
    // One malloc arena: freed memory is reused instead of spread over per-thread
    // arenas, so RSS compares between phases (a leak still shows).
    let pg = Arc::new(Portgate::start_with(config(base, echo, false), &[("MALLOC_ARENA_MAX", "1")]));
    let pid = pg.pid();

    // Warm-up phase: the same load, shorter; then the baseline.
    let (ok, errors) = rt.block_on(phase(Arc::clone(&pg), base, echo, 3));
    assert!(errors.is_empty(), "warm-up errors: {errors:#?}");
    assert!(ok > 0);
    wait_idle(&pg);
    let (fds0, rss0) = (open_fds(pid), proc_status_kib(pid, "VmRSS"));

    let (ok, errors) = rt.block_on(phase(Arc::clone(&pg), base, echo, secs));
    assert!(
        errors.is_empty(),
        "{} errors in {ok} sessions: {:#?}",
        errors.len(),
        &errors[..errors.len().min(20)]
    );
    wait_idle(&pg);
    let (fds1, rss1) = (open_fds(pid), proc_status_kib(pid, "VmRSS"));
    eprintln!(
        "soak: {ok} churn sessions verified in {secs}s; fds {fds0} -> {fds1}; RSS {rss0} -> {rss1} KiB"
    );
    // A leak persists; a scrape's connection closing a moment late does not.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut fds1 = fds1;
    while fds1 > fds0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        fds1 = open_fds(pid);
    }
    assert!(fds1 <= fds0, "descriptors back to baseline: {fds0} before, {fds1} after");
    assert!(rss1 <= rss0 + 4 * 1024, "RSS grew from {rss0} KiB to {rss1} KiB");
    // Nothing unexplained in the node's log either.
    let bad = pg.events(|v| v["level"] == "ERROR" || v["level"] == "WARN" || v["close"] == "error");
    assert!(bad.is_empty(), "errors or warnings logged: {bad:#?}");
}
