//! The fleet rig: three portgate nodes behind HAProxy in TCP mode, the
//! stand-in for the NLB, on a network of their own.
//!
//! ```text
//!  namespace "lan" (bridge br0, 10.251.0.1/24)            namespaces n1, n2, n3
//!  clients ──▶ HAProxy 127.0.0.1:8000-8004 ──send-proxy-v2──▶ 10.251.0.1{1,2,3}:8000-8004 portgate
//!              health checks: GET /readyz, PROXY v2 (check-send-proxy) ──▶ :14090 (admin)
//!  Prometheus 127.0.0.1:9090 ── scrapes 10.251.0.1N:14090, shipped alert rules
//!  targets (echo, PostgreSQL, RDP) on 10.251.0.1 ◀── every node dials them
//! ```
//!
//! Every node gets the same config file, byte for byte (listen 0.0.0.0, admin
//! 0.0.0.0:14090, the same targets), as a real fleet does: so the nodes'
//! `portgate_config_info` hashes agree, and differ only while a rollout is
//! under way. That is why the nodes live in network namespaces rather than on
//! one 127.0.0.x address each (the address would be part of the hash).
//! Namespaces are named `pgf-<pid>-<seq>-<tag>`, deleted by a Drop guard, and
//! ones left by a killed run are reaped by the next. The host's interfaces,
//! routes and firewall are never touched; all traffic stays inside them.
//!
//! Waiting is always for an observable state (a log line, HAProxy's server
//! state, a Prometheus answer) with a deadline.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::*;

/// The rig's network: the balancer's side is `.1`, node N is `.1N`.
pub const GW: Ipv4Addr = Ipv4Addr::new(10, 251, 0, 1);
/// The listener range, on the balancer and on every node (mirrored).
pub const FIRST_PORT: u16 = 8000;
pub const LAST_PORT: u16 = 8004;
/// The nodes' admin port: portgate's default port, on 0.0.0.0.
pub const ADMIN_PORT: u16 = 14090;
/// HAProxy's health checks: every 200 ms, down after 2 failures, up after 2
/// successes. A node that turns unready is out within about 0.4-0.6 s.
pub const CHECK_INTER_MS: u64 = 200;
pub const CHECK_FALL: u64 = 2;

const NS_PREFIX: &str = "pgf-";
const NETNS_DIR: &str = "/var/run/netns";

// ---------------------------------------------------------------------------
// Namespaces
// ---------------------------------------------------------------------------

/// Run a program; its stdout, or a one-line error.
pub fn run(prog: &str, args: &[&str]) -> Result<String, String> {
    let out =
        Command::new(prog).args(args).stdin(Stdio::null()).output().map_err(|e| format!("{prog}: {e}"))?;
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

fn enter_netns(path: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns(2) on a valid fd; it changes only this thread's namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
}

/// Delete namespaces of earlier runs whose process is gone.
fn reap_stale_namespaces() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(dir) = std::fs::read_dir(NETNS_DIR) else { return };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(NS_PREFIX) else { continue };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                // A node upgraded in place runs as the old process's child,
                // without the parent-death signal: a killed run leaves it.
                kill_netns_processes(&format!("{NETNS_DIR}/{name}"));
                let _ = run("ip", &["netns", "del", &name]);
            }
        }
    });
}

/// A network namespace owned by the test; deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Result<Netns, String> {
        reap_stale_namespaces();
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NS_PREFIX}{}-{seq}-{tag}", std::process::id());
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> String {
        format!("{NETNS_DIR}/{}", self.name)
    }

    pub fn ip(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Run `f` on a fresh thread inside this namespace and wait for it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        match self.spawn(f).join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    }

    /// Start `f` on a thread inside this namespace.
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
        let path = self.path();
        thread::spawn(move || {
            enter_netns(&path);
            f()
        })
    }

    /// Spawn `cmd` inside this namespace; it dies with the test process.
    pub fn spawn_command(&self, cmd: &mut Command) -> Child {
        let ns_file = File::open(self.path()).unwrap();
        let fd = ns_file.as_raw_fd();
        // SAFETY: only async-signal-safe syscalls between fork and exec; `fd`
        // stays open until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?} in {}: {e}", self.name));
        drop(ns_file);
        child
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("warning: could not delete namespace {}: {e}", self.name);
        }
    }
}

/// Whether this machine can build the rig: root, iproute2, a bridge and veth
/// pairs between namespaces.
fn probe_netns() -> Result<(), String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root".into());
    }
    run("ip", &["-V"]).map_err(|e| format!("iproute2 missing: {e}"))?;
    let a = Netns::new("probe-a")?;
    let b = Netns::new("probe-b")?;
    a.ip(&["link", "add", "br0", "type", "bridge"])?;
    a.ip(&["link", "add", "x0", "type", "veth", "peer", "name", "x1", "netns", &b.name])?;
    Ok(())
}

/// A program on PATH (or at an absolute path).
pub fn have_program(name: &str) -> bool {
    if name.starts_with('/') {
        return Path::new(name).is_file();
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).any(|d| d.join(name).is_file())
}

/// The rig's peers: namespaces, HAProxy, and what `extra` names.
pub fn have_rig(extra: &[(&str, &str)]) -> bool {
    let probe = probe_netns();
    let why = probe.as_ref().err().map_or("", String::as_str);
    if !require(
        &format!("network namespaces with a bridge ({why})"),
        probe.is_ok(),
        "run as root; apt-get install iproute2",
    ) {
        return false;
    }
    for (program, package) in [("haproxy", "haproxy")].iter().chain(extra) {
        if !require(program, have_program(program), &format!("apt-get install {package}")) {
            return false;
        }
    }
    true
}

/// The lan namespace with its bridge, and one namespace per node, each with
/// a veth on the bridge.
pub struct Lan {
    pub ns: Netns,
    pub nodes: Vec<Netns>,
}

impl Lan {
    pub fn new(n: usize) -> Lan {
        let ns = Netns::new("lan").unwrap();
        ns.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
        ns.ip(&["addr", "add", &format!("{GW}/24"), "dev", "br0"]).unwrap();
        ns.ip(&["link", "set", "br0", "up"]).unwrap();
        let mut nodes = Vec::new();
        for i in 1..=n {
            let node = Netns::new(&format!("n{i}")).unwrap();
            let lan_if = format!("v{i}");
            ns.ip(&["link", "add", &lan_if, "type", "veth", "peer", "name", "eth0", "netns", &node.name])
                .unwrap();
            ns.ip(&["link", "set", &lan_if, "master", "br0"]).unwrap();
            ns.ip(&["link", "set", &lan_if, "up"]).unwrap();
            node.ip(&["addr", "add", &format!("{}/24", node_ip(i)), "dev", "eth0"]).unwrap();
            node.ip(&["link", "set", "eth0", "up"]).unwrap();
            nodes.push(node);
        }
        Lan { ns, nodes }
    }
}

/// Node `i`'s address (1-based).
pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 251, 0, 10 + i as u8)
}

/// Which node an address belongs to.
pub fn node_of(ip: Ipv4Addr) -> Option<usize> {
    (1..=9).find(|&i| node_ip(i) == ip)
}

// ---------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------

/// An echo server on the lan that records, for every connection, the node
/// that dialed it (its peer address) and the token the client sent first
/// (the bytes up to the first newline).
pub struct Echo {
    pub addr: SocketAddr,
    /// token -> node
    seen: Arc<Mutex<HashMap<String, usize>>>,
    /// connections per node
    per_node: Arc<Mutex<HashMap<usize, u64>>>,
}

impl Echo {
    pub fn start(lan: &Lan, port: u16) -> Echo {
        let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let per_node: Arc<Mutex<HashMap<usize, u64>>> = Arc::default();
        let l = lan.ns.run(move || TcpListener::bind(SocketAddrV4::new(GW, port)).unwrap());
        let addr = l.local_addr().unwrap();
        let (seen2, per_node2) = (Arc::clone(&seen), Arc::clone(&per_node));
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let node = match s.peer_addr() {
                    Ok(SocketAddr::V4(a)) => node_of(*a.ip()).unwrap_or(0),
                    _ => 0,
                };
                *per_node2.lock().unwrap().entry(node).or_default() += 1;
                let seen = Arc::clone(&seen2);
                thread::spawn(move || echo_recording(s, node, &seen));
            }
        });
        Echo { addr, seen, per_node }
    }

    /// The node that carried the connection which sent `token`.
    pub fn node_of_token(&self, token: &str) -> Option<usize> {
        self.seen.lock().unwrap().get(token).copied()
    }

    /// Connections each node made to this target so far.
    pub fn connections_from(&self, node: usize) -> u64 {
        self.per_node.lock().unwrap().get(&node).copied().unwrap_or(0)
    }
}

fn echo_recording(mut s: TcpStream, node: usize, seen: &Mutex<HashMap<String, usize>>) {
    let mut buf = [0u8; 4096];
    let mut head = Vec::new();
    let mut recorded = false;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !recorded {
            head.extend_from_slice(&buf[..n]);
            if let Some(end) = head.iter().position(|&b| b == b'\n') {
                let token = String::from_utf8_lossy(&head[..end]).into_owned();
                // Recorded before the echo goes back, so a client that has its
                // echo can look the token up.
                seen.lock().unwrap().insert(token, node);
                recorded = true;
            }
        }
        if s.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

// ---------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------

/// The config every node shares, with `routes` (`name`, port, target) and
/// extra `[timeouts]`.
pub fn node_config(routes: &[(&str, u16, SocketAddr)], timeouts: &[(&str, &str)]) -> String {
    let mut c = Config::listen("0.0.0.0", &["127.0.0.0/8"])
        .set("listen", "ports", format!("{FIRST_PORT}-{LAST_PORT}"))
        .proxy_required(&[&format!("{GW}/32")]);
    for (k, v) in timeouts {
        c = c.set("timeouts", k, *v);
    }
    c = c
        .set("admin", "listen", format!("0.0.0.0:{ADMIN_PORT}"))
        .set("control", "socket", "control.sock")
        .set("log", "format", "json")
        .set("log", "level", "info");
    for (name, port, target) in routes {
        c = c.route(name, *port, target);
    }
    c.to_string()
}

/// Processes whose network namespace is the one mounted at `ns_path`.
pub fn pids_in_netns(ns_path: &str) -> Vec<i32> {
    let Ok(ns) = std::fs::metadata(ns_path) else { return Vec::new() };
    let Ok(proc_dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    proc_dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| (m.dev(), m.ino()) == (ns.dev(), ns.ino()))
        })
        .collect()
}

/// SIGKILL every process left in the namespace at `ns_path`, by pid.
fn kill_netns_processes(ns_path: &str) -> Vec<i32> {
    let pids = pids_in_netns(ns_path);
    for &pid in &pids {
        // SAFETY: kill(2) on a pid inside one of the rig's own namespaces.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    pids
}

/// Whether `pid` is gone or a zombie (dead, not yet reaped).
pub fn is_dead(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
        .unwrap_or(true)
}

/// Make this test process the reaper of its orphaned descendants. A node's
/// successor after an upgrade is a child of the old process; when that one
/// exits the successor is reparented to us (not to init), so the rig can
/// wait for it and no zombie or stray process outlives the test.
fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: prctl(2) with an integer argument; affects only this process.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER: {}", std::io::Error::last_os_error());
    });
}

/// What a successful `portgate upgrade` did on a node.
pub struct Upgraded {
    pub old_pid: i32,
    pub new_pid: i32,
    /// How long `portgate upgrade` took.
    pub took: Duration,
    /// The new process's `upgraded` log line.
    pub event: serde_json::Value,
}

/// One portgate node in its namespace, run from its own installed copy of
/// the binary (`dir/portgate`), as a real node runs from
/// `/usr/local/bin/portgate`. Its directory (binary, config, control socket)
/// outlives restarts and upgrades.
pub struct Node {
    pub idx: usize,
    ns_name: String,
    dir: tempfile::TempDir,
    pub config_path: PathBuf,
    /// Where the node was started from: what an upgrade runs.
    pub bin: PathBuf,
    /// The process the rig spawned (the first of this run).
    child: Option<Child>,
    /// The process serving now: the spawned one, or after an upgrade its
    /// successor (reparented to this test process, see `become_subreaper`).
    pid: i32,
    logs: Arc<LogBuf>,
    /// Logs of earlier runs (before a restart), for the dump on failure.
    old_logs: Vec<Arc<LogBuf>>,
}

impl Node {
    pub fn start(lan: &Lan, idx: usize, config: &str) -> Node {
        become_subreaper();
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("portgate.toml");
        std::fs::write(&config_path, config).unwrap();
        let bin = install_binary(dir.path());
        let ns = &lan.nodes[idx - 1];
        let mut node = Node {
            idx,
            ns_name: ns.name.clone(),
            dir,
            config_path,
            bin,
            child: None,
            pid: 0,
            logs: Arc::new(LogBuf::default()),
            old_logs: Vec::new(),
        };
        node.spawn(ns);
        node
    }

    fn spawn(&mut self, ns: &Netns) {
        let mut cmd = run_command_from(&self.bin, &self.config_path);
        let mut child = ns.spawn_command(&mut cmd);
        let logs = LogBuf::capture(child.stderr.take().unwrap());
        let old = std::mem::replace(&mut self.logs, logs);
        if old.len() > 0 {
            self.old_logs.push(old);
        }
        self.pid = child.id() as i32;
        self.child = Some(child);
        self.wait_log(|l| l.contains("portgate ready"), SOON);
    }

    /// Start the node again (after a kill or a drain), same config file.
    pub fn restart(&mut self, lan: &Lan) {
        assert!(self.try_reap(self.pid).is_some(), "node {} still runs", self.idx);
        self.spawn(&lan.nodes[self.idx - 1]);
    }

    /// The pid serving now.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the node's process (our child, or its successor).
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({sig}) node {}", self.idx);
    }

    /// Reap `pid` if it has exited: the spawned child through its handle,
    /// a successor (ours as the subreaper) with waitpid.
    fn try_reap(&mut self, pid: i32) -> Option<std::process::ExitStatus> {
        if let Some(child) = self.child.as_mut().filter(|c| c.id() as i32 == pid) {
            return child.try_wait().unwrap();
        }
        let mut status = 0;
        // SAFETY: waitpid(2) on one pid, without blocking.
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
            0 => None,
            p if p == pid => Some(std::process::ExitStatus::from_raw(status)),
            // Not our child (already reaped, or never reparented to us):
            // dead is all we can tell.
            _ => is_dead(pid).then(|| std::process::ExitStatus::from_raw(0)),
        }
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_reap(self.pid) {
                return st;
            }
            assert!(Instant::now() < deadline, "node {} did not exit within {timeout:?}", self.idx);
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn write_config(&self, config: &str) {
        // Atomically, as a config sync would: a temporary file, then rename.
        let tmp = self.dir.path().join(".portgate.toml.new");
        std::fs::write(&tmp, config).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }

    /// Install a fresh copy of the binary where the node was started from.
    pub fn install_binary(&self) {
        assert_eq!(install_binary(self.dir.path()), self.bin);
    }

    /// `portgate reload -c CONFIG`, over the node's control socket.
    pub fn reload(&self) -> std::process::Output {
        Command::new(BIN).arg("reload").arg("-c").arg(&self.config_path).output().unwrap()
    }

    /// `portgate upgrade -c CONFIG`, over the node's control socket (a Unix
    /// socket on the shared filesystem, so it runs from the test process,
    /// in no namespace of the node's). On exit 0, waits for the new
    /// process's `upgraded` line and the old one's `handed over` (which
    /// names the successor), and for the old process to exit; the successor
    /// is then the node's pid. Err with the command's output otherwise.
    pub fn upgrade(&mut self) -> Result<Upgraded, String> {
        let from = self.logs.len();
        let old_pid = self.pid;
        let t0 = Instant::now();
        let out = Command::new(BIN)
            .arg("upgrade")
            .arg("-c")
            .arg(&self.config_path)
            .env_remove("RUNTIME_DIRECTORY")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let took = t0.elapsed();
        if !out.status.success() {
            return Err(format!(
                "`portgate upgrade` on node {} exited {}: {}{}",
                self.idx,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let handed = self.logs.wait_from(from, |l| l.contains("handed over to the new process"), 1, SOON);
        let new_pid = parse(&handed)["pid"].as_i64().expect("handed over: pid") as i32;
        // From here on the successor is the node, whatever else fails.
        self.pid = new_pid;
        let event = parse(&self.logs.wait_from(from, |l| l.contains("\"upgraded\""), 1, SOON));
        let deadline = Instant::now() + SOON;
        while self.try_reap(old_pid).is_none() {
            assert!(Instant::now() < deadline, "node {}: the old process {old_pid} did not exit", self.idx);
            thread::sleep(Duration::from_millis(10));
        }
        Ok(Upgraded { old_pid, new_pid, took, event })
    }

    /// `GET /sessions` on the node's control socket.
    pub fn sessions(&self) -> Vec<serde_json::Value> {
        let socket = self.dir.path().join("control.sock");
        crate::common::control::request_json(&socket, "GET", "/sessions").as_array().unwrap().clone()
    }

    pub fn wait_log(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        self.logs.wait_from(0, pred, 1, timeout)
    }

    pub fn has_log(&self, pred: impl Fn(&str) -> bool) -> bool {
        self.logs.lines().iter().any(|l| pred(l))
    }

    pub fn events(&self, pred: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
        self.logs.events(pred)
    }

    pub fn admin(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(node_ip(self.idx), ADMIN_PORT))
    }

    /// The `hash` label of the node's `portgate_config_info`.
    pub fn config_hash(&self, lan: &Lan) -> String {
        let admin = self.admin();
        let (_, body) = lan.ns.run(move || http_get(admin, "/metrics"));
        let line = body.lines().find(|l| l.starts_with("portgate_config_info{")).expect("config_info");
        line.split('"').nth(1).unwrap().to_string()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // The process serving now (after an upgrade not the one spawned),
        // then the spawned one, each by pid and reaped.
        if self.try_reap(self.pid).is_none() {
            // SAFETY: kill(2) on the node's own process, not yet reaped.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let deadline = Instant::now() + SOON;
            while self.try_reap(self.pid).is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Anything else still in the node's namespace (a successor the rig
        // lost track of) is a rig bug: say so, and kill it by pid.
        let stray = kill_netns_processes(&format!("{NETNS_DIR}/{}", self.ns_name));
        if !stray.is_empty() {
            eprintln!("warning: node {}: killed stray processes {stray:?} in {}", self.idx, self.ns_name);
            for pid in stray {
                let deadline = Instant::now() + SOON;
                while self.try_reap(pid).is_none() && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(5));
                }
            }
        }
        if thread::panicking() {
            let config = std::fs::read_to_string(&self.config_path).unwrap_or_default();
            for old in &self.old_logs {
                old.dump_if_failing(&format!("node {} (earlier run) in {}", self.idx, self.ns_name), &config);
            }
            self.logs.dump_if_failing(&format!("node {} in {}", self.idx, self.ns_name), &config);
        }
    }
}

// ---------------------------------------------------------------------------
// HAProxy, the NLB's stand-in
// ---------------------------------------------------------------------------

pub struct Haproxy {
    child: Child,
    _dir: tempfile::TempDir,
    sock: PathBuf,
    pub config: String,
    stderr: Arc<LogBuf>,
}

impl Haproxy {
    /// HAProxy in the lan namespace, bound to 127.0.0.1:FIRST_PORT-LAST_PORT;
    /// waits until every node is UP.
    pub fn start(lan: &Lan, nodes: usize) -> Haproxy {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("admin.sock");
        let mut servers = String::new();
        for i in 1..=nodes {
            // No port: the connection goes to the port the client connected
            // to, so the listener range is mirrored.
            servers.push_str(&format!("    server node{i} {}\n", node_ip(i)));
        }
        let config = format!(
            "global\n\
             \x20   maxconn 4000\n\
             \x20   stats socket {sock} mode 600 level admin\n\
             defaults\n\
             \x20   mode tcp\n\
             \x20   timeout connect 2s\n\
             \x20   timeout client 10m\n\
             \x20   timeout server 10m\n\
             \x20   timeout check 1s\n\
             \x20   retries 2\n\
             \x20   option redispatch\n\
             frontend nlb\n\
             \x20   bind 127.0.0.1:{FIRST_PORT}-{LAST_PORT}\n\
             \x20   default_backend fleet\n\
             backend fleet\n\
             \x20   balance roundrobin\n\
             \x20   option httpchk\n\
             \x20   http-check send meth GET uri /readyz\n\
             \x20   http-check expect status 200\n\
             \x20   default-server check inter {CHECK_INTER_MS}ms fall {CHECK_FALL} rise 2 port {ADMIN_PORT} \
             check-send-proxy send-proxy-v2 proxy-v2-options crc32c\n\
             {servers}",
            sock = sock.display()
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, &config).unwrap();
        let mut cmd = Command::new("haproxy");
        cmd.arg("-db").arg("-f").arg(&path).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = lan.ns.spawn_command(&mut cmd);
        let stderr = LogBuf::capture(child.stderr.take().unwrap());
        let h = Haproxy { child, _dir: dir, sock, config, stderr };
        for i in 1..=nodes {
            h.wait_state(i, true, SOON);
        }
        h
    }

    /// One command on the stats socket.
    pub fn command(&self, cmd: &str) -> String {
        let deadline = Instant::now() + SOON;
        let mut s = loop {
            match UnixStream::connect(&self.sock) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("HAProxy stats socket {}: {e}", self.sock.display()),
            }
        };
        s.set_read_timeout(Some(SOON)).unwrap();
        s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// Whether HAProxy sees node `i` as UP (operational state 2, "running").
    pub fn is_up(&self, i: usize) -> bool {
        let state = self.command("show servers state fleet");
        let name = format!("node{i}");
        state
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.get(3) == Some(&name.as_str()))
            .and_then(|f| f.get(5).map(|s| *s == "2"))
            .unwrap_or(false)
    }

    /// Node `i`'s row of `show stat`, by column name (`status`, `chkfail`:
    /// checks failed while it was up, `chkdown`: UP to DOWN transitions).
    pub fn server_stat(&self, i: usize) -> HashMap<String, String> {
        let csv = self.command("show stat");
        let mut lines = csv.lines();
        let header: Vec<&str> =
            lines.next().and_then(|h| h.strip_prefix("# ")).expect("show stat header").split(',').collect();
        let name = format!("node{i}");
        let row: Vec<&str> = lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|f| f.first() == Some(&"fleet") && f.get(1) == Some(&name.as_str()))
            .unwrap_or_else(|| panic!("no {name} in show stat:\n{csv}"));
        header.iter().zip(row).map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// Wait until node `i` is UP (`up`) or DOWN; returns how long it took.
    pub fn wait_state(&self, i: usize, up: bool, timeout: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            if self.is_up(i) == up {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < timeout,
                "HAProxy did not see node{i} {} within {timeout:?}:\n{}",
                if up { "UP" } else { "DOWN" },
                self.command("show servers state fleet")
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("---- haproxy config ----\n{}\n---- haproxy stderr ----", self.config);
            for l in self.stderr.lines() {
                eprintln!("{l}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Prometheus
// ---------------------------------------------------------------------------

/// HTTP/1.0 GET (no chunked answers), from the calling thread's namespace.
pub fn http10_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, SOON).ok()?;
    s.set_read_timeout(Some(SOON)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((code, body))
}

/// The shipped alert rules with every `for:` hold time set to 0s: the
/// expressions, labels and annotations are the shipped ones, only the wait
/// before firing (5-10 minutes in production) is cut so a test can see it.
pub fn alert_rules_for_test() -> String {
    let shipped = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/alerts.yml"))
        .expect("config/alerts.yml");
    let mut out = String::new();
    let mut cut = 0;
    for line in shipped.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("for: ") {
            let indent = &line[..line.len() - trimmed.len()];
            out.push_str(&format!("{indent}for: 0s\n"));
            cut += 1;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(cut >= 6, "expected a `for:` per alert in config/alerts.yml, found {cut}");
    out
}

pub struct Prometheus {
    child: Child,
    _dir: tempfile::TempDir,
    lan_path: String,
    pub addr: SocketAddr,
    stderr: Arc<LogBuf>,
}

impl Prometheus {
    /// A Prometheus server in the lan namespace on 127.0.0.1:9090 (its own
    /// default port, which portgate no longer takes), scraping every node's
    /// admin port each second with the shipped alert rules.
    pub fn start(lan: &Lan, nodes: usize) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("alerts.yml");
        std::fs::write(&rules, alert_rules_for_test()).unwrap();
        let targets: Vec<String> = (1..=nodes).map(|i| format!("'{}:{ADMIN_PORT}'", node_ip(i))).collect();
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: portgate\n    static_configs:\n      - targets: [{}]\n",
                rules.display(),
                targets.join(", ")
            ),
        )
        .unwrap();
        let addr: SocketAddr = "127.0.0.1:9090".parse().unwrap();
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = lan.ns.spawn_command(&mut cmd);
        let stderr = LogBuf::capture(child.stderr.take().unwrap());
        let p = Prometheus { child, _dir: dir, lan_path: lan.ns.path(), addr, stderr };
        // Ready, and every node scraped once.
        p.wait_until("every node scraped", Duration::from_secs(60), |p| {
            p.query_value("count(up{job=\"portgate\"} == 1)") == Some(nodes as f64)
        });
        p
    }

    fn get(&self, path: &str) -> Option<serde_json::Value> {
        let (addr, path, ns) = (self.addr, path.to_string(), self.lan_path.clone());
        let (code, body) = thread::spawn(move || {
            enter_netns(&ns);
            http10_get(addr, &path)
        })
        .join()
        .unwrap()?;
        if code != 200 {
            return None;
        }
        serde_json::from_str(&body).ok()
    }

    /// An instant query's single value, if it has exactly one.
    pub fn query_value(&self, q: &str) -> Option<f64> {
        let v = self.get(&format!("/api/v1/query?query={}", urlencode(q)))?;
        let result = v["data"]["result"].as_array()?;
        if result.len() != 1 {
            return None;
        }
        result[0]["value"][1].as_str()?.parse().ok()
    }

    /// An instant query's whole result: (labels, value) per series.
    pub fn query(&self, q: &str) -> Vec<(serde_json::Value, f64)> {
        let Some(v) = self.get(&format!("/api/v1/query?query={}", urlencode(q))) else { return Vec::new() };
        v["data"]["result"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter_map(|x| Some((x["metric"].clone(), x["value"][1].as_str()?.parse().ok()?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Active alerts: (alertname, state, labels).
    pub fn alerts(&self) -> Vec<(String, String, serde_json::Value)> {
        let Some(v) = self.get("/api/v1/alerts") else { return Vec::new() };
        v["data"]["alerts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| {
                        (
                            x["labels"]["alertname"].as_str().unwrap_or("").to_string(),
                            x["state"].as_str().unwrap_or("").to_string(),
                            x["labels"].clone(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether `name` fires, with labels matching `labels` (a subset).
    pub fn firing(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.alerts().iter().any(|(n, state, l)| {
            n == name && state == "firing" && labels.iter().all(|(k, v)| l[*k].as_str() == Some(*v))
        })
    }

    pub fn wait_until(&self, what: &str, timeout: Duration, pred: impl Fn(&Prometheus) -> bool) -> Duration {
        let t0 = Instant::now();
        loop {
            if pred(self) {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < timeout,
                "Prometheus: {what} not seen within {timeout:?}; alerts: {:?}",
                { self.alerts().iter().map(|(n, s, _)| format!("{n}={s}")).collect::<Vec<_>>() }
            );
            thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("---- prometheus stderr (last 30 lines) ----");
            let lines = self.stderr.lines();
            for l in lines.iter().skip(lines.len().saturating_sub(30)) {
                eprintln!("{l}");
            }
        }
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// The balancer's address for listener `port` (inside the lan namespace).
pub fn balancer(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Clients opening connections through the balancer the whole time: each
/// thread connects, sends a token line, half-closes and expects its echo.
/// Bounded: at most `MAX_PER_THREAD` connections a thread and two minutes,
/// and it stops when told.
pub struct Load {
    stop: Arc<AtomicBool>,
    attempted: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<(Instant, String)>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

const MAX_PER_THREAD: u64 = 30_000;

impl Load {
    pub fn start(lan: &Lan, port: u16, threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let attempted = Arc::new(AtomicU64::new(0));
        let failures: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let handles = (0..threads)
            .map(|t| {
                let (stop, attempted, failures) =
                    (Arc::clone(&stop), Arc::clone(&attempted), Arc::clone(&failures));
                lan.ns.spawn(move || {
                    let started = Instant::now();
                    for i in 0..MAX_PER_THREAD {
                        if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(120) {
                            break;
                        }
                        attempted.fetch_add(1, Ordering::Relaxed);
                        let token = format!("churn-{t}-{i}\n");
                        if let Err(e) = one_echo(balancer(port), token.as_bytes()) {
                            failures.lock().unwrap().push((Instant::now(), format!("{}: {e}", token.trim())));
                        }
                        // Pacing (a few hundred connections a second in all),
                        // not synchronisation.
                        thread::sleep(Duration::from_millis(3));
                    }
                })
            })
            .collect();
        Load { stop, attempted, failures, threads: handles }
    }

    pub fn attempted(&self) -> u64 {
        self.attempted.load(Ordering::Relaxed)
    }

    /// Wait until `n` more connections have been attempted (the load is
    /// flowing).
    pub fn wait_progress(&self, n: u64) {
        let target = self.attempted() + n;
        let deadline = Instant::now() + SOON;
        while self.attempted() < target {
            assert!(Instant::now() < deadline, "the client load stalled at {} connections", self.attempted());
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stop; (attempted, failures with when they happened).
    pub fn stop(self) -> (u64, Vec<(Instant, String)>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let failures = std::mem::take(&mut *self.failures.lock().unwrap());
        (self.attempted.load(Ordering::Relaxed), failures)
    }
}

/// Connect, send `data`, half-close, read everything back; it must be `data`.
pub fn one_echo(to: SocketAddr, data: &[u8]) -> Result<(), String> {
    let s = TcpStream::connect_timeout(&to, SOON).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(SOON)).unwrap();
    let back = try_roundtrip(s, data).map_err(|e| format!("io: {e}"))?;
    if back != data {
        return Err(format!("echo {:?}", String::from_utf8_lossy(&back)));
    }
    Ok(())
}

/// `GET /readyz` on a node's admin port from the lan namespace (where
/// HAProxy's checks come from) every 10 ms until stopped.
pub struct ReadyWatch {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<(u64, Vec<String>)>,
}

impl ReadyWatch {
    pub fn start(lan: &Lan, admin: SocketAddr) -> ReadyWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = lan.ns.spawn(move || {
            let (mut polls, mut bad) = (0, Vec::new());
            let t0 = Instant::now();
            while !flag.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(120) {
                polls += 1;
                match http10_get(admin, "/readyz") {
                    Some((200, _)) => {}
                    other => bad.push(format!("at {:.3}s: {other:?}", t0.elapsed().as_secs_f64())),
                }
                thread::sleep(Duration::from_millis(10));
            }
            (polls, bad)
        });
        ReadyWatch { stop, thread }
    }

    /// Stop; (answers, every one that was not 200).
    pub fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// A long session through the balancer: opened with a token line, kept open.
pub struct LongSession {
    pub token: String,
    pub node: usize,
    stream: TcpStream,
}

impl LongSession {
    /// The client address, as the node sees it (HAProxy's PROXY header
    /// carries it) and lists it in `GET /sessions`.
    pub fn client(&self) -> String {
        self.stream.local_addr().unwrap().to_string()
    }

    /// Whether the session still carries bytes both ways.
    pub fn alive(&mut self) -> bool {
        if self.stream.write_all(b".").is_err() {
            return false;
        }
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(1))
    }

    /// Wait until the session is closed from the far side (EOF or reset);
    /// false if it is still open after `timeout`.
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut b = [0u8; 16];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            match self.stream.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }
}

/// Open `n` long sessions through the balancer on `port`, each identified by
/// the node the echo target saw it come from.
pub fn open_long_sessions(lan: &Lan, port: u16, echo: &Echo, n: usize) -> Vec<LongSession> {
    (0..n)
        .map(|k| {
            let token = format!("long-{k}");
            let line = format!("{token}\n");
            let mut stream = lan.ns.run(move || {
                let s = TcpStream::connect_timeout(&balancer(port), SOON).unwrap();
                s.set_read_timeout(Some(SOON)).unwrap();
                s
            });
            stream.write_all(line.as_bytes()).unwrap();
            let mut back = vec![0u8; line.len()];
            stream.read_exact(&mut back).unwrap();
            assert_eq!(back, line.as_bytes());
            let node = echo.node_of_token(&token).expect("the echo target saw the token");
            LongSession { token, node, stream }
        })
        .collect()
}

/// Lines of a child's stdout and stderr, collected into one list by two
/// threads.
pub fn capture_output(child: &mut Child) -> Arc<Mutex<Vec<String>>> {
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    fn pump(r: impl Read + Send + 'static, sink: Arc<Mutex<Vec<String>>>) {
        thread::spawn(move || {
            for l in BufReader::new(r).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
    }
    pump(child.stdout.take().unwrap(), Arc::clone(&lines));
    pump(child.stderr.take().unwrap(), Arc::clone(&lines));
    lines
}

/// The figures a scenario prints (and the note quotes).
pub fn report(scenario: &str, attempted: u64, failed: usize, long: usize, cut: usize, extra: &str) {
    eprintln!(
        "fleet scenario {scenario}: connections attempted {attempted}, failed {failed}; \
         long sessions {long}, cut {cut}{}{extra}",
        if extra.is_empty() { "" } else { "; " }
    );
}
