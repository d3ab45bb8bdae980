//! Faults and the NLB idle timeout, end to end with the real binary.
//!
//! - a target whose SYNs vanish (nft drop) fails the client fast, other
//!   routes unaffected;
//! - a router that forgets idle flows (conntrack, as an NLB at 350 s) kills
//!   an idle session unless portgate's keepalive refreshes it; a flow cut
//!   for good is reaped by keepalive;
//! - on loopback: a target reset mid-stream reaches the client as a reset; a
//!   target that stops reading stalls the client (backpressure) while
//!   portgate's memory stays flat, and every byte arrives once it reads.
//!
//! The namespace tests build their own little networks: network namespaces
//! named `pgt-<pid>-<tag>` (deleted by a Drop guard, even on panic; ones left
//! by a killed run are reaped by the next), veth pairs created inside them,
//! nftables rules inside them, and addresses from 10.250.0.0/16 that exist
//! only there. The host's own interfaces, routes and firewall are never
//! touched. The loopback tests need nothing special.
//!
//! Sockets are put into a namespace by creating them on a thread that has
//! first `setns`-ed into it (setns affects only the calling thread; a socket
//! stays in the namespace it was created in, whichever thread uses it later).
//! portgate itself is spawned with a `pre_exec` setns, so its pid is the
//! process's and it reads its logs the way the common harness does.
//!
//! Waiting is for events with deadlines (log lines, metrics, conntrack
//! entries, nft counters), never a bare sleep racing the thing under test.

mod common;

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

// ---------------------------------------------------------------------------
// Namespaces
// ---------------------------------------------------------------------------

const NS_PREFIX: &str = "pgt-";
const NETNS_DIR: &str = "/var/run/netns";

/// Run a program; its stdout, or a one-line error.
fn run(prog: &str, args: &[&str]) -> Result<String, String> {
    run_stdin(prog, args, None)
}

fn run_stdin(prog: &str, args: &[&str], input: Option<&str>) -> Result<String, String> {
    let mut child = Command::new(prog)
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{prog}: {e}"))?;
    if let Some(text) = input {
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).map_err(|e| format!("{prog} stdin: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("{prog}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{prog} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Move the calling thread into the namespace at `path`.
fn enter_netns(path: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns(2) on a valid fd; it changes only this thread's namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
}

/// Run `f` on a fresh thread inside the namespace at `path`; panics propagate.
fn in_ns<T: Send + 'static>(path: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = path.to_string();
    match thread::spawn(move || {
        enter_netns(&path);
        f()
    })
    .join()
    {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// Delete namespaces left by earlier runs of this file whose process is gone
/// (a run killed by a timeout never ran its Drop guards).
fn reap_stale_namespaces() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(dir) = std::fs::read_dir(NETNS_DIR) else { return };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(NS_PREFIX) else { continue };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
            if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = run("ip", &["netns", "del", &name]);
            }
        }
    });
}

/// A network namespace owned by this test; deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Result<Netns, String> {
        reap_stale_namespaces();
        // Unique per process and per call: tests of one process (plain `cargo
        // test` runs them as threads) never collide.
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NS_PREFIX}{}-{seq}-{tag}", std::process::id());
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn path(&self) -> String {
        format!("{NETNS_DIR}/{}", self.name)
    }

    fn ip(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Load an nft script inside the namespace.
    fn nft_script(&self, script: &str) -> Result<(), String> {
        run_stdin("ip", &["netns", "exec", &self.name, "nft", "-f", "-"], Some(script)).map(drop)
    }

    fn nft(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["netns", "exec", self.name.as_str(), "nft"];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// The packet count of the (single) `counter` in an nft chain.
    fn nft_counter(&self, family: &str, table: &str, chain: &str) -> u64 {
        let text = self.nft(&["list", "chain", family, table, chain]).unwrap();
        let after = text.split("counter packets ").nth(1).unwrap_or_else(|| panic!("no counter in {text}"));
        after.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// Set a per-namespace sysctl (`net/ipv4/ip_forward` style) and read it back.
    fn sysctl(&self, key: &str, value: &str) -> Result<(), String> {
        let (key, value) = (key.to_string(), value.to_string());
        in_ns(&self.path(), move || {
            let p = format!("/proc/sys/{key}");
            std::fs::write(&p, &value).map_err(|e| format!("write {p}: {e}"))?;
            let back = std::fs::read_to_string(&p).map_err(|e| format!("read {p}: {e}"))?;
            if back.trim() != value {
                return Err(format!("{p} reads {:?} after writing {value:?}", back.trim()));
            }
            Ok(())
        })
    }

    /// Run `f` on a thread inside this namespace and wait for it.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_ns(&self.path(), f)
    }

    /// Start `f` on a thread inside this namespace.
    fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
        let path = self.path();
        thread::spawn(move || {
            enter_netns(&path);
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("warning: could not delete namespace {}: {e}", self.name);
        }
    }
}

/// A veth pair from `a` (interface `a_if`, address `a_addr`) to `b`.
fn veth(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) {
    a.ip(&["link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name]).unwrap();
    a.ip(&["addr", "add", a_addr, "dev", a_if]).unwrap();
    b.ip(&["addr", "add", b_addr, "dev", b_if]).unwrap();
    a.ip(&["link", "set", a_if, "up"]).unwrap();
    b.ip(&["link", "set", b_if, "up"]).unwrap();
}

/// Can this machine run the namespace tests? Tries what they need in a
/// throwaway namespace: veth, nft with conntrack, the conntrack sysctls.
fn probe_netns() -> Result<(), String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root".into());
    }
    run("ip", &["-V"]).map_err(|e| format!("iproute2 missing: {e}"))?;
    run("nft", &["--version"]).map_err(|e| format!("nftables missing: {e}"))?;
    let a = Netns::new("probe-a")?;
    let b = Netns::new("probe-b")?;
    a.ip(&["link", "add", "x0", "type", "veth", "peer", "name", "x1", "netns", &b.name])?;
    a.nft_script(
        "table inet probe {\n  chain f {\n    type filter hook forward priority 0; policy accept;\n    ct state established accept\n  }\n}\n",
    )?;
    a.sysctl("net/netfilter/nf_conntrack_tcp_loose", "0")?;
    a.sysctl("net/netfilter/nf_conntrack_tcp_timeout_established", "3")?;
    Ok(())
}

/// True to go ahead; false (after [`require`] said why) to skip. Under CI a
/// missing capability is a failure.
fn have_netns() -> bool {
    let probe = probe_netns();
    let why = probe.as_ref().err().map_or("", String::as_str);
    require(
        &format!("network namespaces with nftables ({why})"),
        probe.is_ok(),
        "run as root; apt-get install iproute2 nftables",
    )
}

// ---------------------------------------------------------------------------
// portgate inside a namespace
// ---------------------------------------------------------------------------

/// A portgate process running inside a namespace. Its admin listener is on
/// that namespace's loopback, so metrics are fetched from a thread there.
struct NsPortgate {
    child: Child,
    ns_path: String,
    admin: SocketAddr,
    config: String,
    logs: Arc<LogBuf>,
    _dir: tempfile::TempDir,
}

impl NsPortgate {
    /// Start portgate in `ns` with `config` plus the harness's sections (admin
    /// on the namespace's 127.0.0.1:`admin_port`, JSON logs); wait until ready.
    fn start(ns: &Netns, admin_port: u16, config: impl std::fmt::Display) -> NsPortgate {
        let admin = addr(admin_port);
        let config = with_harness_sections(config, admin);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("portgate.toml");
        std::fs::write(&path, &config).unwrap();
        let ns_file = File::open(ns.path()).unwrap();
        let fd = ns_file.as_raw_fd();
        let mut cmd = run_command(&path);
        // SAFETY: only async-signal-safe syscalls between fork and exec; `fd`
        // stays open until after spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Die with the test thread even if the test is killed.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn portgate in namespace");
        drop(ns_file);
        let logs = LogBuf::capture(child.stderr.take().unwrap());
        let pg = NsPortgate { child, ns_path: ns.path(), admin, config, logs, _dir: dir };
        pg.wait_line(|l| l.contains("portgate ready"), 1, SOON);
        pg
    }

    /// Wait for the n-th log line satisfying `pred`.
    fn wait_line(&self, pred: impl Fn(&str) -> bool, n: usize, timeout: Duration) -> String {
        self.logs.wait_from(0, pred, n, timeout)
    }

    /// JSON events satisfying `pred`.
    fn events(&self, pred: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
        self.logs.events(pred)
    }

    /// Wait until `n` "session closed" events for `route` are logged; return them.
    fn wait_sessions_closed(&self, route: &str, n: usize) -> Vec<serde_json::Value> {
        let r = format!("\"route\":\"{route}\"");
        self.wait_line(|l| l.contains("\"message\":\"session closed\"") && l.contains(&r), n, SOON);
        self.events(|v| v["message"] == "session closed" && v["route"] == route)
    }

    fn metric(&self, series: &str) -> Option<f64> {
        let admin = self.admin;
        let (code, body) = in_ns(&self.ns_path, move || http_get(admin, "/metrics"));
        assert_eq!(code, 200, "GET /metrics");
        metric_value(&body, series)
    }

    fn wait_metric(&self, series: &str, want: f64) {
        let deadline = Instant::now() + SOON;
        loop {
            let v = self.metric(series);
            if v == Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "{series} = {v:?}, wanted {want}");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for NsPortgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.logs.dump_if_failing(&format!("in {}", self.ns_path), &self.config);
    }
}

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

/// One kB-valued field of /proc/PID/status (VmRSS, VmHWM), in bytes.
fn proc_status_bytes(pid: i32, key: &str) -> u64 {
    proc_status_kib(pid, key) * 1024
}

/// A deterministic byte stream, addressable by offset: a writer and a reader
/// that only share the offset agree on every byte, so order, loss and
/// duplication all show.
fn stream_bytes(offset: u64, buf: &mut [u8]) {
    let mut cached = (u64::MAX, 0u64);
    for (i, b) in buf.iter_mut().enumerate() {
        let pos = offset + i as u64;
        let w = pos / 8;
        if cached.0 != w {
            // splitmix64
            let mut z = w.wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            cached = (w, z ^ (z >> 31));
        }
        *b = (cached.1 >> ((pos % 8) * 8)) as u8;
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Send `msg` and read the same bytes back.
fn echo_once(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

// ---------------------------------------------------------------------------
// 1. SYN black hole
// ---------------------------------------------------------------------------

/// One client connection to the black-holed route, as the client saw it.
struct HoleClient {
    connected: Instant,
    closed: Option<Instant>,
    how: &'static str,
}

#[test]
fn syn_black_hole_closes_the_client_promptly_and_other_routes_keep_working() {
    if !have_netns() {
        return;
    }
    // portgate + clients in "p"; the target host 10.250.1.2 in "t", where an
    // nft rule drops every SYN to port 22 (no RST, no ICMP: a black hole).
    let p = Netns::new("hole-p").unwrap();
    let t = Netns::new("hole-t").unwrap();
    veth(&p, "p0", "10.250.1.1/24", &t, "t0", "10.250.1.2/24");
    t.nft_script(
        "table inet pgt {\n  chain input {\n    type filter hook input priority 0; policy accept;\n    tcp dport 22 counter drop\n  }\n}\n",
    )
    .unwrap();
    // A live echo on the same host, another port.
    let live_target = t.run(|| echo_server_on("10.250.1.2:0"));
    let config = Config::loopback()
        .set("timeouts", "connect", "500ms")
        .route("hole", 8001, "10.250.1.2:22")
        .route("live", 8002, live_target);
    let pg = NsPortgate::start(&p, 9090, config);

    // Keep black-hole dials pending the whole time the live route is used: a
    // new hole client every 50 ms (each stays pending >= 500 ms) until the
    // live work is done (bounded in count and time).
    let holes: Arc<Mutex<Vec<HoleClient>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let generator = {
        let (holes, done) = (Arc::clone(&holes), Arc::clone(&done));
        p.spawn(move || {
            let started = Instant::now();
            let mut readers = Vec::new();
            for i in 0..120 {
                if done.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(8) {
                    break;
                }
                let mut s = TcpStream::connect_timeout(&addr(8001), SOON).unwrap();
                let connected = Instant::now();
                let idx = {
                    let mut h = holes.lock().unwrap();
                    h.push(HoleClient { connected, closed: None, how: "" });
                    h.len() - 1
                };
                // An SSH client speaks first.
                s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
                let holes = Arc::clone(&holes);
                readers.push(thread::spawn(move || {
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut b = [0u8; 64];
                    let how = match s.read(&mut b) {
                        Ok(0) => "eof",
                        Ok(_) => "data",
                        Err(e) if e.kind() == ErrorKind::ConnectionReset => "reset",
                        Err(e) if is_timeout(&e) => "still open after 5s",
                        Err(_) => "other error",
                    };
                    let mut h = holes.lock().unwrap();
                    h[idx].closed = Some(Instant::now());
                    h[idx].how = how;
                }));
                if i < 119 {
                    thread::sleep(Duration::from_millis(50));
                }
            }
            for r in readers {
                r.join().unwrap();
            }
        })
    };

    // Wait until two hole dials are pending, then use the live route.
    let deadline = Instant::now() + SOON;
    while holes.lock().unwrap().iter().filter(|h| h.closed.is_none()).count() < 2 {
        assert!(Instant::now() < deadline, "hole clients never connected");
        thread::sleep(Duration::from_millis(10));
    }
    let live: Vec<(Instant, Instant)> = p.run(|| {
        (0..5u64)
            .map(|i| {
                let start = Instant::now();
                let data = pattern(64 << 10, i);
                let back = roundtrip(connect(addr(8002)), &data);
                assert!(back == data, "live session {i}: bytes differ");
                (start, Instant::now())
            })
            .collect()
    });
    done.store(true, Ordering::SeqCst);
    generator.join().unwrap();

    let holes = holes.lock().unwrap();
    let n = holes.len();
    assert!(n >= 2, "{n} hole clients");
    for (i, h) in holes.iter().enumerate() {
        let closed = h.closed.expect("reader finished");
        let took = closed - h.connected;
        assert!(matches!(h.how, "eof" | "reset"), "hole client {i}: {}", h.how);
        // portgate's dial started after the client's connect returned, and
        // it gives up at connect = 500ms; the client must hear of it at once.
        assert!(
            took >= Duration::from_millis(490),
            "hole client {i} closed after {took:?}, before the timeout"
        );
        assert!(took < Duration::from_secs(2), "hole client {i} closed only after {took:?}");
    }
    // The live route worked while black-hole dials were pending.
    let pending_at = |x: Instant| holes.iter().any(|h| h.connected <= x && h.closed.is_some_and(|c| c >= x));
    for (i, (s, e)) in live.iter().enumerate() {
        assert!(
            pending_at(*s) && pending_at(*e),
            "live session {i} did not overlap a pending black-hole dial"
        );
    }
    let resets = holes.iter().filter(|h| h.how == "reset").count();
    eprintln!(
        "black hole: {n} clients ({resets} saw a reset, the rest EOF), closed after {:?}..{:?}; \
         live sessions took up to {:?}",
        holes.iter().map(|h| h.closed.unwrap() - h.connected).min().unwrap(),
        holes.iter().map(|h| h.closed.unwrap() - h.connected).max().unwrap(),
        live.iter().map(|(s, e)| *e - *s).max().unwrap()
    );

    // One close=error line per hole client, classified as a timeout.
    let evs = pg.wait_sessions_closed("hole", n);
    assert_eq!(evs.len(), n);
    for ev in &evs {
        assert_eq!(ev["close"], "error", "{ev}");
        assert_eq!(ev["error_kind"], "timeout", "{ev}");
        assert_eq!(ev["target"], "10.250.1.2:22", "{ev}");
        assert_eq!(ev["bytes_to_target"], 0, "{ev}");
    }
    pg.wait_metric(r#"portgate_upstream_connect_errors_total{route="hole",kind="timeout"}"#, n as f64);
    pg.wait_metric(r#"portgate_connections_accepted_total{route="hole",tenant="hole"}"#, n as f64);
    pg.wait_metric(r#"portgate_connections_accepted_total{route="live",tenant="live"}"#, 5.0);
    for kind in ["refused", "unreachable", "other"] {
        let s = format!(r#"portgate_upstream_connect_errors_total{{route="hole",kind="{kind}"}}"#);
        assert_eq!(pg.metric(&s).unwrap_or(0.0), 0.0, "{s}");
    }
    for kind in ["refused", "timeout", "unreachable", "other"] {
        let s = format!(r#"portgate_upstream_connect_errors_total{{route="live",kind="{kind}"}}"#);
        assert_eq!(pg.metric(&s).unwrap_or(0.0), 0.0, "{s}");
    }
    let live_closed = pg.wait_sessions_closed("live", 5);
    assert!(live_closed.iter().all(|e| e["close"] == "client_closed"), "{live_closed:?}");
    // The SYNs really went into the hole (dropped, not refused).
    let dropped = t.nft_counter("inet", "pgt", "input");
    assert!(dropped >= n as u64, "nft dropped {dropped} SYNs for {n} dials");
}

// ---------------------------------------------------------------------------
// 2. The NLB idle timeout, simulated
// ---------------------------------------------------------------------------

/// The router's established-flow timeout, in seconds (an NLB's is 350).
const FLOW_TIMEOUT_S: u64 = 3;

/// Stateful forwarding as an NLB does it: a flow exists from its SYN on; a
/// packet of a flow the router has forgotten is dropped (and counted).
const ROUTER_RULES: &str = r#"
table inet pgt {
    chain forward {
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        ct state new tcp flags & (syn | ack | fin | rst) == syn accept
        counter drop
    }
}
"#;

/// Is the router tracking the flow from the client port `sport` to `dport`?
fn router_tracks(table: &str, sport: u16, dport: u16) -> bool {
    let key = format!("sport={sport} dport={dport} ");
    table.lines().any(|l| l.contains(" tcp ") && l.contains(&key))
}

/// client 10.250.10.2 -- 10.250.10.1 router 10.250.20.1 -- 10.250.20.2 portgate host,
/// the router forwarding statefully ([`ROUTER_RULES`]) and forgetting a flow
/// that is idle for [`FLOW_TIMEOUT_S`].
fn nlb_path(tag: &str) -> (Netns, Netns, Netns) {
    let c = Netns::new(&format!("{tag}-c")).unwrap();
    let r = Netns::new(&format!("{tag}-r")).unwrap();
    let p = Netns::new(&format!("{tag}-p")).unwrap();
    veth(&c, "c0", "10.250.10.2/24", &r, "r0", "10.250.10.1/24");
    veth(&r, "r1", "10.250.20.1/24", &p, "p0", "10.250.20.2/24");
    c.ip(&["route", "add", "default", "via", "10.250.10.1"]).unwrap();
    p.ip(&["route", "add", "10.250.10.0/24", "via", "10.250.20.1"]).unwrap();
    r.sysctl("net/ipv4/ip_forward", "1").unwrap();
    r.nft_script(ROUTER_RULES).unwrap();
    // A mid-stream packet never creates a flow; an established flow idle for
    // longer than T is forgotten.
    r.sysctl("net/netfilter/nf_conntrack_tcp_loose", "0").unwrap();
    r.sysctl("net/netfilter/nf_conntrack_tcp_timeout_established", &FLOW_TIMEOUT_S.to_string()).unwrap();
    (c, r, p)
}

#[test]
fn nlb_idle_timeout_kills_an_idle_flow_unless_keepalive_refreshes_it() {
    if !have_netns() {
        return;
    }
    let (c, r, p) = nlb_path("idle");
    // The target: an echo on the portgate host's loopback.
    let echo = p.run(|| echo_server_on("127.0.0.1:0"));
    // keepalive is (time, interval, idle_timeout_limit).
    let config = |port: u16, name: &str, (time, interval, limit): (&str, &str, &str)| {
        Config::listen("10.250.20.2", &["10.250.10.2/32"])
            .set("keepalive", "time", time)
            .set("keepalive", "interval", interval)
            .set("keepalive", "idle_timeout_limit", limit)
            .route(name, port, echo)
    };
    // (a) keepalive far above T, as with the defaults behind a 350 s NLB.
    let pg_a = NsPortgate::start(&p, 9090, config(8000, "slow-keepalive", ("60s", "15s", "350s")));
    // (b) keepalive below T.
    let pg_b = NsPortgate::start(&p, 9091, config(8001, "fast-keepalive", ("1s", "1s", "3s")));

    // Both sessions, from the client namespace through the router.
    let (mut a, mut b) = c
        .run(|| (connect("10.250.20.2:8000".parse().unwrap()), connect("10.250.20.2:8001".parse().unwrap())));
    echo_once(&mut a, b"hello a");
    echo_once(&mut b, b"hello b");
    let idle_since = Instant::now();
    let (a_port, b_port) = (a.local_addr().unwrap().port(), b.local_addr().unwrap().port());
    let conntrack = || r.run(|| std::fs::read_to_string("/proc/thread-self/net/nf_conntrack").unwrap());
    let table = conntrack();
    assert!(router_tracks(&table, a_port, 8000) && router_tracks(&table, b_port, 8001), "{table}");

    // Idle. Wait for the router to forget (a)'s flow; (b)'s must stay, kept
    // fresh by portgate's keepalive probes on its client-side socket.
    let deadline = idle_since + Duration::from_secs(FLOW_TIMEOUT_S * 5);
    let forgotten_after = loop {
        let table = conntrack();
        assert!(router_tracks(&table, b_port, 8001), "router forgot the keepalive session: {table}");
        if !router_tracks(&table, a_port, 8000) {
            break idle_since.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "router still tracks the idle flow after {:?}",
            idle_since.elapsed()
        );
        thread::sleep(Duration::from_millis(100));
    };
    assert!(
        forgotten_after >= Duration::from_secs(FLOW_TIMEOUT_S - 1),
        "flow forgotten after {forgotten_after:?}, before the router's timeout"
    );
    // Stay idle for ~2T in all, watching (b)'s flow stay tracked throughout.
    while idle_since.elapsed() < Duration::from_secs(2 * FLOW_TIMEOUT_S) {
        let table = conntrack();
        assert!(router_tracks(&table, b_port, 8001), "router forgot the keepalive session: {table}");
        thread::sleep(Duration::from_millis(250));
    }
    // Neither session ended on portgate's side.
    assert!(pg_a.events(|v| v["message"] == "session closed").is_empty());
    assert!(pg_b.events(|v| v["message"] == "session closed").is_empty());

    // (a): the client's data goes into the void.
    let drops_before = r.nft_counter("inet", "pgt", "forward");
    a.write_all(b"ping a").unwrap();
    let deadline = Instant::now() + SOON;
    while r.nft_counter("inet", "pgt", "forward") == drops_before {
        assert!(Instant::now() < deadline, "the router never dropped the write of the forgotten flow");
        thread::sleep(Duration::from_millis(50));
    }
    // (b): an identical idle session still works.
    echo_once(&mut b, b"ping b");
    a.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 16];
    match a.read(&mut buf) {
        Err(e) if is_timeout(&e) => {}
        Err(e) => eprintln!("(a) read error instead of an answer: {e}"),
        Ok(n) => panic!("the forgotten flow answered {n} bytes: {:?}", &buf[..n]),
    }
    // portgate never saw (a)'s bytes; it saw all of (b)'s.
    assert_eq!(
        pg_a.metric(r#"portgate_bytes_total{route="slow-keepalive",direction="to_target"}"#),
        Some(7.0)
    );
    pg_b.wait_metric(r#"portgate_bytes_total{route="fast-keepalive",direction="to_target"}"#, 13.0);
    eprintln!(
        "idle timeout: router forgot the flow without keepalive after {forgotten_after:?}; \
         with keepalive the flow lived through {:?} idle",
        Duration::from_secs(2 * FLOW_TIMEOUT_S)
    );
}

/// What became of a session whose client flow the router silently cut.
struct DeadFlow {
    /// From the cut to portgate's session-end line, if it came in time.
    closed_after: Option<Duration>,
    event: Option<serde_json::Value>,
    /// What the target's read saw once portgate gave up.
    target_saw: Option<std::io::Result<usize>>,
}

/// Establish a session through the router, then drop every packet of its
/// flow there (the client host vanished, or the NLB lost the flow). With
/// `target_sends`, the target then sends data towards the dead client, so
/// portgate's client socket has unacknowledged data instead of being idle.
fn cut_flow(tag: &str, target_sends: bool, wait: Duration) -> DeadFlow {
    let (c, r, p) = nlb_path(tag);
    let l = p.run(|| TcpListener::bind("127.0.0.1:0").unwrap());
    let target = l.local_addr().unwrap();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (saw_tx, saw_rx) = mpsc::channel();
    thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"hi").unwrap();
        if go_rx.recv_timeout(SOON).is_err() {
            return;
        }
        if target_sends {
            s.write_all(b"output for a client that is gone").unwrap();
        }
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut b = [0u8; 16];
        let _ = saw_tx.send(s.read(&mut b));
    });
    let pg = NsPortgate::start(
        &p,
        9090,
        Config::listen("10.250.20.2", &["10.250.10.2/32"])
            .set("keepalive", "time", "1s")
            .set("keepalive", "interval", "1s")
            .set("keepalive", "retries", 2)
            .set("keepalive", "idle_timeout_limit", "3s")
            .route("d", 8000, target),
    );
    let mut s = c.run(|| connect("10.250.20.2:8000".parse().unwrap()));
    let mut hi = [0u8; 2];
    s.read_exact(&mut hi).unwrap();
    let port = s.local_addr().unwrap().port().to_string();
    for dir in ["sport", "dport"] {
        r.nft(&["insert", "rule", "inet", "pgt", "forward", "tcp", dir, &port, "drop"]).unwrap();
    }
    let cut = Instant::now();
    go_tx.send(()).unwrap();
    let deadline = cut + wait;
    let closed = loop {
        if let Some(ev) = pg.events(|v| v["message"] == "session closed").pop() {
            break Some((cut.elapsed(), ev));
        }
        if Instant::now() > deadline {
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let target_saw = closed.as_ref().map(|_| saw_rx.recv_timeout(SOON).expect("target read returned"));
    if closed.is_some() {
        pg.wait_metric(r#"portgate_connections_active{route="d",tenant="d"}"#, 0.0);
    }
    let (closed_after, event) = closed.map(|(d, e)| (Some(d), Some(e))).unwrap_or((None, None));
    DeadFlow { closed_after, event, target_saw }
}

/// keepalive time 1s + 2 unanswered probes 1s apart.
const KEEPALIVE_GIVES_UP: Duration = Duration::from_secs(3);

#[test]
fn a_dead_idle_flow_is_reaped_by_keepalive() {
    if !have_netns() {
        return;
    }
    let d = cut_flow("dead", false, Duration::from_secs(10));
    let after = d.closed_after.expect("portgate did not end the session of a dead idle flow within 10 s");
    eprintln!("dead idle flow: session ended {after:?} after the cut");
    let ev = d.event.unwrap();
    assert_eq!(ev["close"], "error", "{ev}");
    assert!(ev["error"].as_str().unwrap().contains("timed out"), "{ev}");
    // Not before keepalive had its say, and not much after.
    assert!(after >= KEEPALIVE_GIVES_UP - Duration::from_millis(500), "ended after only {after:?}: {ev}");
    // The failure is passed on to the target as a reset.
    match d.target_saw.unwrap() {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("target saw {other:?}, not a reset"),
    }
}

/// A session whose client vanished while portgate still had data for it is
/// not idle, so keepalive never probes; without TCP_USER_TIMEOUT the kernel
/// retransmits for ~15 minutes (tcp_retries2) before portgate hears of it,
/// holding the route's connection slot and two descriptors all that time.
#[test]
fn a_dead_flow_with_unacknowledged_data_is_reaped_in_keepalive_time() {
    if !have_netns() {
        return;
    }
    let d = cut_flow("busy", true, Duration::from_secs(10));
    let after = d
        .closed_after
        .expect("portgate did not end the session of a dead flow with pending data within 10 s");
    eprintln!("dead busy flow: session ended {after:?} after the cut");
    assert_eq!(d.event.unwrap()["close"], "error");
}

// ---------------------------------------------------------------------------
// 3. Loopback faults
// ---------------------------------------------------------------------------

#[test]
fn target_reset_mid_stream_reaches_the_client_as_a_reset() {
    // The target greets, reads exactly 1000 bytes, then resets (SO_LINGER 0).
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(SOON)).unwrap();
        s.write_all(b"hello").unwrap();
        let mut got = vec![0u8; 1000];
        s.read_exact(&mut got).unwrap();
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
        drop(s);
        tx.send(got).unwrap();
    });
    let port = free_port();
    let pg = Portgate::start(Config::loopback().route("r", port, target));

    let mut c = connect(addr(port));
    let mut hello = [0u8; 5];
    c.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, b"hello");
    let data = pattern(1000, 7);
    c.write_all(&data).unwrap();
    assert!(rx.recv_timeout(SOON).unwrap() == data, "target got other bytes");
    let mut b = [0u8; 16];
    match c.read(&mut b) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Ok(0) => panic!("client saw a FIN, not the target's reset"),
        other => panic!("client saw {other:?}, not the target's reset"),
    }
    let ev = pg.wait_event("session closed", 1);
    assert_eq!(ev["close"], "target_closed", "{ev}");
    assert_eq!(ev["bytes_to_target"], 1000, "{ev}");
    assert_eq!(ev["bytes_to_client"], 5, "{ev}");
}

#[test]
fn target_that_stops_reading_gets_backpressure_not_buffering() {
    const MAX_WRITE: u64 = 200 << 20;
    const RSS_GROWTH_LIMIT: u64 = 64 << 20;
    const AFTER_RELEASE: u64 = 8 << 20;

    // The target accepts, then reads nothing until told to; then it checks
    // every byte against the stream and counts them.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = l.local_addr().unwrap();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let reader = thread::spawn(move || -> (u64, Option<u64>) {
        let (mut s, _) = l.accept().unwrap();
        go_rx.recv_timeout(Duration::from_secs(30)).expect("release signal");
        s.set_read_timeout(Some(SOON)).unwrap();
        let mut buf = vec![0u8; 256 << 10];
        let mut want = vec![0u8; 256 << 10];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf).expect("target read");
            if n == 0 {
                return (total, None);
            }
            stream_bytes(total, &mut want[..n]);
            if buf[..n] != want[..n] {
                let i = buf[..n].iter().zip(&want[..n]).position(|(a, b)| a != b).unwrap();
                return (total, Some(total + i as u64));
            }
            total += n as u64;
        }
    });
    let port = free_port();
    let pg = Portgate::start(Config::loopback().route("r", port, target));
    let pid = pg.pid();
    let rss_start = proc_status_bytes(pid, "VmRSS");

    // Write until the writes stall for a full second (backpressure reached
    // the client), for at most 5 s or 200 MiB.
    let mut c = connect(addr(port));
    c.set_write_timeout(Some(Duration::from_millis(250))).unwrap();
    let mut buf = vec![0u8; 256 << 10];
    let mut off = buf.len();
    let mut sent = 0u64;
    let mut rss_max = rss_start;
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let stalled = loop {
        if sent >= MAX_WRITE || started.elapsed() > Duration::from_secs(5) {
            break false;
        }
        if off == buf.len() {
            stream_bytes(sent, &mut buf);
            off = 0;
        }
        match c.write(&buf[off..]) {
            Ok(0) => panic!("write returned 0"),
            Ok(n) => {
                off += n;
                sent += n as u64;
                last_progress = Instant::now();
            }
            Err(e) if is_timeout(&e) => {
                rss_max = rss_max.max(proc_status_bytes(pid, "VmRSS"));
                if last_progress.elapsed() >= Duration::from_secs(1) {
                    break true;
                }
            }
            Err(e) => panic!("client write: {e}"),
        }
    };
    let stall_after = started.elapsed();
    let hwm = proc_status_bytes(pid, "VmHWM");
    let forwarded = pg.metric(r#"portgate_bytes_total{route="r",direction="to_target"}"#).unwrap();
    eprintln!(
        "backpressure: client stalled after {} KiB in {stall_after:?}; portgate forwarded {} KiB; \
         RSS {} KiB at start, {} KiB max sampled, {} KiB high-water mark",
        sent >> 10,
        forwarded as u64 >> 10,
        rss_start >> 10,
        rss_max >> 10,
        hwm >> 10
    );
    assert!(stalled, "the client wrote {} MiB in {stall_after:?} without stalling", sent >> 20);
    assert!(
        hwm.saturating_sub(rss_start) < RSS_GROWTH_LIMIT,
        "portgate grew by {} KiB while the target did not read",
        hwm.saturating_sub(rss_start) >> 10
    );
    assert!(forwarded as u64 <= sent);

    // Release the target: the rest flows, every byte in order.
    go_tx.send(()).unwrap();
    c.set_write_timeout(Some(SOON)).unwrap();
    let total = sent + AFTER_RELEASE;
    while sent < total {
        if off == buf.len() {
            stream_bytes(sent, &mut buf);
            off = 0;
        }
        let end = buf.len().min(off + (total - sent) as usize);
        let n = c.write(&buf[off..end]).expect("client write after release");
        assert!(n > 0);
        off += n;
        sent += n as u64;
    }
    c.shutdown(Shutdown::Write).unwrap();
    let (received, mismatch) = reader.join().unwrap();
    assert_eq!(mismatch, None, "target saw a wrong byte");
    assert_eq!(received, total, "target got {received} of {total} bytes");
    // The target then closes; the client sees EOF.
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let ev = pg.wait_event("session closed", 1);
    assert_eq!(ev["bytes_to_target"], total, "{ev}");
    assert_eq!(ev["close"], "client_closed", "{ev}");
}
