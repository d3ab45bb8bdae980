//! Test harness: spawn the real `portgate` binary on loopback, read its JSON
//! log lines as events, and talk to it with plain blocking sockets.
//!
//! Waiting is always for an event (a log line, a metric value, a socket
//! state) with a deadline, never a bare sleep. On a failed test the harness
//! prints the config and every log line the node wrote.

#![allow(dead_code)]

mod config;
pub mod control;

// Each test binary uses what it needs of the harness, as with dead_code above.
#[allow(unused_imports)]
pub use config::{toml_string, Config, Route, Test};

use std::fmt::Display;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_portgate");
/// Generous bound for anything that should happen "at once" on a loaded CI box.
pub const SOON: Duration = Duration::from_secs(10);

/// Whether this run is CI's: `CI` set to anything but empty, `0` or `false`
/// (CI services set `CI=true`; `.ci/run` does too).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// The one guard for a test that needs a peer from outside this repository
/// (a program, a kernel feature): `available` says whether it is here.
///
/// Here: true, and the test goes on. Missing under CI ([`in_ci`]): a panic
/// naming what is missing and how to install it, so CI cannot pass a test
/// that asserted nothing. Missing elsewhere: a `skipped: ...` line on stderr
/// and false; the test returns at once.
#[must_use = "return from the test when the peer is missing"]
pub fn require(what: &str, available: bool, install_hint: &str) -> bool {
    if available {
        return true;
    }
    let current = thread::current();
    let test = current.name().unwrap_or("this test");
    assert!(
        !in_ci(),
        "{test} needs {what}, which is missing; under CI that is a failure, not a skip ({install_hint})"
    );
    eprintln!("skipped: {test} needs {what}, which is missing ({install_hint})");
    false
}

/// `127.0.0.1:port`.
pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A block of `n` consecutive free loopback ports, reserved for this test
/// process.
///
/// nextest runs every test in its own process, and tests that reload
/// portgate release a port and bind it again later. A port that is merely
/// free at the moment could be handed to another test in between, so each
/// port is also claimed with an exclusive lock on a file named after it
/// (held until this process exits); other test processes skip locked ports.
pub fn free_ports(n: u16) -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    static CLAIMS: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("portgate-test-ports");
    std::fs::create_dir_all(&dir).expect("create the port claim directory");
    // Spread test processes over 20000-32000 (below the ephemeral range).
    let seed = (std::process::id() as u16).wrapping_mul(97) % 12000;
    'search: for _ in 0..1000 {
        let off = NEXT.fetch_add(n + 1, Ordering::Relaxed);
        let base = 20000 + (seed.wrapping_add(off)) % (12000 - n);
        let mut claims = Vec::with_capacity(n as usize);
        for p in base..base + n {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(p.to_string()))
                .expect("open a port claim file");
            if !try_lock(&file) || TcpListener::bind(("127.0.0.1", p)).is_err() {
                continue 'search;
            }
            claims.push(file);
        }
        CLAIMS.lock().unwrap().extend(claims);
        return base;
    }
    panic!("no block of {n} free ports");
}

/// Non-blocking exclusive flock(2); released when the process exits.
fn try_lock(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function borrows.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

pub fn free_port() -> u16 {
    free_ports(1)
}

/// A child's stderr, line by line, as it arrives; waited on with a deadline.
#[derive(Default)]
pub struct LogBuf {
    lines: Mutex<Vec<String>>,
    cv: Condvar,
}

impl LogBuf {
    /// Collect `stderr` from a thread until it closes (then a final
    /// `<stderr closed>` line).
    pub fn capture(stderr: std::process::ChildStderr) -> Arc<LogBuf> {
        let logs = Arc::new(LogBuf::default());
        let sink = Arc::clone(&logs);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lines.lock().unwrap().push(line);
                sink.cv.notify_all();
            }
            sink.lines.lock().unwrap().push("<stderr closed>".into());
            sink.cv.notify_all();
        });
        logs
    }

    /// On a failing (panicking) test, print the config (from `source`) and
    /// every line; otherwise nothing.
    pub fn dump_if_failing(&self, source: &str, config: &str) {
        if !thread::panicking() {
            return;
        }
        eprintln!("---- portgate config ({source}) ----");
        eprintln!("{config}");
        eprintln!("---- portgate log ----");
        for l in self.lines.lock().unwrap().iter() {
            eprintln!("{l}");
        }
        eprintln!("---- end ----");
    }

    pub fn len(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// JSON lines matching `pred`.
    pub fn events(&self, pred: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
        self.lines().iter().filter_map(|l| serde_json::from_str(l).ok()).filter(|v| pred(v)).collect()
    }

    /// Wait until `n` lines from index `from` on satisfy `pred`; returns the
    /// n-th. Each line is looked at once, however long the wait (a soak
    /// writes hundreds of thousands).
    pub fn wait_from(&self, from: usize, pred: impl Fn(&str) -> bool, n: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lock().unwrap();
        let (mut next, mut hits) = (from, 0);
        loop {
            while next < lines.len() {
                if pred(&lines[next]) {
                    hits += 1;
                    if hits == n {
                        return lines[next].clone();
                    }
                }
                next += 1;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || lines.last().map(|l| l == "<stderr closed>").unwrap_or(false) {
                drop(lines);
                panic!("log line not seen within {timeout:?} (wanted {n})");
            }
            lines = self.cv.wait_timeout(lines, left).unwrap().0;
        }
    }
}

/// A running portgate process.
pub struct Portgate {
    child: Child,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    logs: Arc<LogBuf>,
    pub admin: SocketAddr,
    config_text: Mutex<String>,
}

/// Fill in the `[admin]` and `[log]` sections the harness relies on.
pub fn with_harness_sections(config: impl Display, admin: SocketAddr) -> String {
    let mut c = config.to_string();
    if !c.contains("[admin]") {
        c.push_str(&format!("\n[admin]\nlisten = \"{admin}\"\n"));
    }
    if !c.contains("[log]") {
        c.push_str("\n[log]\nformat = \"json\"\nlevel = \"info\"\n");
    }
    c
}

/// `portgate run -c config_path`, its stderr piped (for [`LogBuf::capture`]),
/// and none of this shell's RUST_LOG or NOTIFY_SOCKET.
/// A child process that is killed and reaped when the test ends, even on a
/// panic (for tests that spawn portgate their own way).
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run_command(config_path: &std::path::Path) -> Command {
    run_command_from(std::path::Path::new(BIN), config_path)
}

/// [`run_command`] with the binary at `bin` (an installed copy, for tests
/// that upgrade in place).
pub fn run_command_from(bin: &std::path::Path, config_path: &std::path::Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .arg("-c")
        .arg(config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET");
    cmd
}

impl Portgate {
    /// Write `config` (text or a [`Config`]; admin and JSON log sections
    /// added if missing), start the binary and wait until it is ready.
    pub fn start(config: impl Display) -> Portgate {
        Self::start_with(config, &[])
    }

    pub fn start_with(config: impl Display, env: &[(&str, &str)]) -> Portgate {
        let pg = Self::spawn(config, env);
        pg.wait_log(|l| l.contains("portgate ready"), SOON);
        pg
    }

    /// Spawn without waiting for readiness.
    pub fn spawn(config: impl Display, env: &[(&str, &str)]) -> Portgate {
        let dir = tempfile::tempdir().expect("tempdir");
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let text = with_harness_sections(config, admin);
        let config_path = dir.path().join("portgate.toml");
        std::fs::write(&config_path, &text).unwrap();
        let mut cmd = run_command(&config_path);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn portgate");
        let logs = LogBuf::capture(child.stderr.take().unwrap());
        Portgate { child, dir, config_path, logs, admin, config_text: Mutex::new(text) }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Replace the config file (harness sections added as at start).
    pub fn write_config(&self, config: impl Display) {
        let text = with_harness_sections(config, self.admin);
        std::fs::write(&self.config_path, &text).unwrap();
        *self.config_text.lock().unwrap() = text;
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({sig})");
    }

    /// SIGHUP, then wait for the reload's outcome line; returns it.
    pub fn reload(&self) -> serde_json::Value {
        let from = self.logs.len();
        self.signal(libc::SIGHUP);
        // Lines before the signal cannot hold its outcome.
        parse(&self.logs.wait_from(from, is_reload_outcome, 1, SOON))
    }

    pub fn count_logs(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.logs.lines.lock().unwrap().iter().filter(|l| pred(l)).count()
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lines()
    }

    /// JSON log events matching `pred`.
    pub fn events(&self, pred: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
        self.logs.events(pred)
    }

    /// Wait until a log line satisfies `pred`; returns it.
    pub fn wait_log(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        self.wait_log_n(pred, 1, timeout)
    }

    /// Wait until `n` log lines satisfy `pred`; returns the n-th.
    pub fn wait_log_n(&self, pred: impl Fn(&str) -> bool, n: usize, timeout: Duration) -> String {
        self.logs.wait_from(0, pred, n, timeout)
    }

    /// Wait for the n-th JSON event with `message` and return it.
    pub fn wait_event(&self, message: &str, n: usize) -> serde_json::Value {
        let m = format!("\"message\":\"{message}\"");
        parse(&self.wait_log_n(|l| l.contains(&m), n, SOON))
    }

    pub fn metrics(&self) -> String {
        let (code, body) = http_get(self.admin, "/metrics");
        assert_eq!(code, 200);
        body
    }

    /// The value of one series, e.g. `portgate_connections_accepted_total{route="a",tenant="a"}`.
    /// Labels may be given in any order.
    pub fn metric(&self, series: &str) -> Option<f64> {
        metric_value(&self.metrics(), series)
    }

    /// Wait until `series` has value `want`.
    pub fn wait_metric(&self, series: &str, want: f64) {
        let deadline = Instant::now() + SOON;
        loop {
            let v = self.metric(series);
            if v == Some(want) {
                return;
            }
            if Instant::now() > deadline {
                panic!("{series} = {v:?}, wanted {want}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                panic!("portgate did not exit within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn is_reload_outcome(l: &str) -> bool {
    l.contains("\"message\":\"config reloaded\"")
        || l.contains("\"message\":\"config reload failed; still serving the previous config\"")
}

pub fn parse(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"))
}

impl Drop for Portgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let config = self.config_text.lock().unwrap();
        self.logs.dump_if_failing(&self.config_path.display().to_string(), &config);
    }
}

/// Parse one series' value out of a Prometheus exposition.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    let (name, labels) = split_series(series);
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (s, v) = line.rsplit_once(' ')?;
        let (n, l) = split_series(s);
        if n == name && l == labels {
            return v.parse().ok();
        }
    }
    None
}

fn split_series(s: &str) -> (String, Vec<String>) {
    match s.split_once('{') {
        None => (s.to_string(), vec![]),
        Some((n, rest)) => {
            let inner = rest.trim_end_matches('}');
            let mut labels: Vec<String> = inner
                .split("\",")
                .map(|p| p.trim_end_matches('"').to_string())
                .filter(|p| !p.is_empty())
                .collect();
            labels.sort();
            (n.to_string(), labels)
        }
    }
}

/// One-shot HTTP GET; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, SOON).expect("connect admin");
    s.set_read_timeout(Some(SOON)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

/// An echo server on `addr` (port 0 for any): every connection is echoed
/// until EOF, then half-closed back.
pub fn echo_server_on(addr: &str) -> SocketAddr {
    let l = TcpListener::bind(addr).unwrap();
    let a = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
                let _ = s.shutdown(Shutdown::Write);
            });
        }
    });
    a
}

pub fn echo_server() -> SocketAddr {
    echo_server_on("127.0.0.1:0")
}

/// Connect from a given local address (127.0.0.x) to `to`.
pub fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    sock.bind(&local.into()).unwrap();
    sock.connect_timeout(&to.into(), SOON).unwrap();
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(SOON)).unwrap();
    s
}

pub fn connect(to: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&to, SOON).unwrap();
    s.set_read_timeout(Some(SOON)).unwrap();
    s
}

/// Like [`roundtrip`], but an I/O error is returned, not a panic.
pub fn try_roundtrip(mut s: TcpStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut w = s.try_clone()?;
    let payload = data.to_vec();
    let writer = thread::spawn(move || -> std::io::Result<()> {
        w.write_all(&payload)?;
        w.shutdown(Shutdown::Write)
    });
    let mut out = Vec::new();
    let read = s.read_to_end(&mut out);
    let wrote = writer.join().unwrap_or_else(|_| Err(std::io::Error::other("writer panicked")));
    read?;
    wrote?;
    Ok(out)
}

/// Write `data`, half-close, and read everything back.
pub fn roundtrip(mut s: TcpStream, data: &[u8]) -> Vec<u8> {
    let mut w = s.try_clone().unwrap();
    let payload = data.to_vec();
    let writer = thread::spawn(move || {
        w.write_all(&payload).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    writer.join().unwrap();
    out
}

/// Expect the peer to close the connection without sending a byte
/// (EOF or reset) within SOON.
pub fn expect_closed(mut s: TcpStream) {
    s.set_read_timeout(Some(SOON)).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => {}
        Ok(n) => panic!("expected close, got {n} bytes: {:?}", String::from_utf8_lossy(&b[..n])),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected close, got error {e}"),
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// One kB-valued field of /proc/PID/status (`VmRSS`, `VmHWM`), in KiB.
pub fn proc_status_kib(pid: i32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{key} not in /proc/{pid}/status"))
}

/// How many descriptors process `pid` has open.
pub fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// Install the test's `portgate` binary at `dir/portgate` as `install(1)`
/// does: a new file renamed into place, so a running process keeps its old
/// inode and the next upgrade finds the new one.
pub fn install_binary(dir: &std::path::Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let tmp = dir.join(".portgate.new");
    std::fs::copy(BIN, &tmp).expect("copy the binary");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.join("portgate");
    std::fs::rename(&tmp, &path).unwrap();
    path
}
