//! Side-by-side benchmark: direct connection, portgate, HAProxy (TCP mode,
//! with and without splice) and nginx (stream module), each
//! proxy pinned to CPU 0 with `taskset -c 0`, this process (load generator
//! and backends) pinned to CPU 1; then portgate alone with routes at scale.
//!
//! ```sh
//! cargo bench --bench compare                      # full run (~5-10 min)
//! cargo bench --bench compare -- --quick           # short run (~2 min)
//! cargo bench --bench compare -- --only bulk,latency --rounds 3
//! cargo bench --bench compare -- --only scale      # routes at scale (~3-4 min)
//! ```
//!
//! Flags: `--quick`; `--rounds N`; `--only LIST` where LIST is any of
//! `bulk,latency,connrate,idle,scale` (`reload` is an alias of `scale`);
//! `--contenders LIST` (any of
//! `direct,portgate,portgate-log,haproxy,haproxy-splice,nginx`;
//! `portgate-log` is portgate with session logging on at `info`, written to a
//! file; `haproxy-splice` is the haproxy contender with splice(2) on:
//! `option splice-auto`, forced with `splice-request`/`splice-response`);
//! `--idle-sessions N` (default 8000); `--secs S` (seconds per measurement);
//! `--scale-reloads N` (reloads per scale case, default 20).
//!
//! Ratios are portgate's median over the best median of the peers
//! (haproxy, haproxy-splice, nginx) that ran.
//!
//! The `scale` test (portgate only) runs two shapes: N routes on N ports
//! (one listener, so one descriptor, per route: N stays at or below 15,000
//! under a 20,000-descriptor limit), and N `via` routes on 50 ports with
//! `[proxy_protocol] mode = "required"`. See [`scale_test`].
//!
//! Every figure is the median of the rounds with the min-max spread; the
//! contenders are interleaved (A B C D A B C D ...). Only 127.0.0.0/8 is used.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{IntoRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_portgate");
const HAPROXY: &str = "/usr/sbin/haproxy";
const NGINX: &str = "/usr/sbin/nginx";
const NGINX_STREAM: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
/// Ports per contender: port 0 goes to the sink, 1..=100 to the echo server.
const SPREAD: u16 = 100;
const NPORTS: u16 = SPREAD + 1;
const MSG: usize = 64;
const CONNRATE_CLIENTS: usize = 32;

// ---------------------------------------------------------------- options

#[derive(Clone)]
struct Opts {
    quick: bool,
    rounds: usize,
    secs: f64,
    only: Vec<String>,
    contenders: Vec<Kind>,
    idle_n: usize,
    mem_rounds: usize,
    scale_reloads: usize,
}

fn parse_opts() -> Opts {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mut o = Opts {
        quick,
        rounds: if quick { 2 } else { 5 },
        secs: if quick { 0.7 } else { 2.0 },
        only: vec!["bulk".into(), "latency".into(), "connrate".into(), "idle".into(), "scale".into()],
        contenders: vec![
            Kind::Direct,
            Kind::Portgate,
            Kind::PortgateLog,
            Kind::Haproxy,
            Kind::HaproxySplice,
            Kind::Nginx,
        ],
        idle_n: if quick { 2000 } else { 8000 },
        mem_rounds: if quick { 1 } else { 3 },
        scale_reloads: SCALE_RELOADS,
    };
    let mut i = 0;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--rounds" => {
                o.rounds = val.parse().expect("--rounds N");
                o.mem_rounds = o.rounds.min(o.mem_rounds.max(1));
                i += 1;
            }
            "--secs" => {
                o.secs = val.parse().expect("--secs S");
                i += 1;
            }
            "--idle-sessions" => {
                o.idle_n = val.parse().expect("--idle-sessions N");
                i += 1;
            }
            "--only" => {
                o.only = val
                    .split(',')
                    .map(|s| match s.trim() {
                        "reload" => "scale".to_string(),
                        t => t.to_string(),
                    })
                    .collect();
                i += 1;
            }
            "--scale-reloads" => {
                o.scale_reloads = val.parse().expect("--scale-reloads N");
                i += 1;
            }
            "--contenders" => {
                o.contenders = val
                    .split(',')
                    .map(|s| match s.trim() {
                        "direct" => Kind::Direct,
                        "portgate" => Kind::Portgate,
                        "portgate-log" => Kind::PortgateLog,
                        "haproxy" => Kind::Haproxy,
                        "haproxy-splice" => Kind::HaproxySplice,
                        "nginx" => Kind::Nginx,
                        other => panic!("unknown contender {other}"),
                    })
                    .collect();
                i += 1;
            }
            _ => {} // `--bench` from cargo, `--quick`
        }
        i += 1;
    }
    o
}

// ---------------------------------------------------------------- system helpers

fn pin_self_to_cpu(cpu: usize) {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!("warning: cannot pin the load generator to CPU {cpu}");
        }
    }
}

fn raise_nofile() -> u64 {
    unsafe {
        let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        l.rlim_cur
    }
}

fn clk_tck() -> f64 {
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// utime + stime of a process (all its threads), in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ut: f64 = f[11].parse().unwrap_or(0.0);
    let st: f64 = f[12].parse().unwrap_or(0.0);
    (ut + st) / clk_tck()
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Hold `/dev/cpu_dma_latency` at 0 while the guard lives.
/// (The file is only held, never read.)
struct DmaLatency(#[allow(dead_code)] Option<std::fs::File>);

fn hold_dma_latency() -> DmaLatency {
    match std::fs::OpenOptions::new().write(true).open("/dev/cpu_dma_latency") {
        Ok(mut f) => {
            let _ = f.write_all(&0i32.to_ne_bytes());
            DmaLatency(Some(f))
        }
        Err(e) => {
            eprintln!("note: cannot hold /dev/cpu_dma_latency at 0 ({e}); latency includes wake-ups");
            DmaLatency(None)
        }
    }
}

fn port_free(p: u16) -> bool {
    TcpListener::bind(("127.0.0.1", p)).is_ok()
}

/// A block of `n` consecutive free ports at or above `from`, below 20000
/// (the test suite uses 20000-32000; 32768+ is the ephemeral range).
fn free_block(from: u16, n: u16) -> u16 {
    let mut base = from;
    while base + n < 20000 {
        match (base..base + n).find(|&p| !port_free(p)) {
            Some(busy) => base = busy + 1,
            None => return base,
        }
    }
    panic!("no block of {n} free ports below 20000");
}

fn cmd_version(cmd: &str, args: &[&str]) -> String {
    match Command::new(cmd).args(args).output() {
        Ok(o) => {
            let t = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            t.lines().next().unwrap_or("").trim().to_string()
        }
        Err(_) => "not installed".into(),
    }
}

// ---------------------------------------------------------------- backends

/// Sink: reads and discards until EOF, then closes. One thread per connection.
fn start_sink(port: u16) {
    let l = TcpListener::bind(("127.0.0.1", port)).expect("bind sink");
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
}

/// Echo: one epoll thread serving every listener and connection
/// (level-triggered, non-blocking). Closes a connection at EOF.
fn start_echo(base: u16, n: u16) {
    let mut listeners = Vec::new();
    for p in base..base + n {
        let l = TcpListener::bind(("127.0.0.1", p)).expect("bind echo");
        l.set_nonblocking(true).unwrap();
        listeners.push(l.into_raw_fd());
    }
    thread::spawn(move || unsafe {
        let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
        const LFLAG: u64 = 1 << 40;
        for &fd in &listeners {
            let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: fd as u64 | LFLAG };
            libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev);
        }
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut buf = vec![0u8; 64 * 1024];
        let one: libc::c_int = 1;
        loop {
            let k = libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 1000);
            for ev in events.iter().take(k.max(0) as usize) {
                let data = ev.u64;
                if data & LFLAG != 0 {
                    let lfd = (data & !LFLAG) as RawFd;
                    loop {
                        let c = libc::accept4(
                            lfd,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                        );
                        if c < 0 {
                            break;
                        }
                        libc::setsockopt(
                            c,
                            libc::IPPROTO_TCP,
                            libc::TCP_NODELAY,
                            &one as *const _ as *const libc::c_void,
                            4,
                        );
                        let mut cev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: c as u64 };
                        libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, c, &mut cev);
                    }
                    continue;
                }
                let fd = data as RawFd;
                let r = libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len());
                if r > 0 {
                    let mut off = 0usize;
                    let mut spins = 0;
                    while off < r as usize && spins < 100_000 {
                        let w =
                            libc::write(fd, buf.as_ptr().add(off) as *const libc::c_void, r as usize - off);
                        if w > 0 {
                            off += w as usize;
                        } else if w < 0 && *libc::__errno_location() == libc::EAGAIN {
                            spins += 1;
                            thread::yield_now();
                        } else {
                            break;
                        }
                    }
                } else if r == 0 || *libc::__errno_location() != libc::EAGAIN {
                    libc::close(fd);
                }
            }
        }
    });
}

// ---------------------------------------------------------------- contenders

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Kind {
    Direct,
    Portgate,
    /// portgate with session logging on at `info` (the production setting),
    /// lines written to a file through the log queue.
    PortgateLog,
    Haproxy,
    /// HAProxy with splicing on (`option splice-auto`, forced with
    /// `splice-request` and `splice-response`), otherwise the same config.
    HaproxySplice,
    Nginx,
}

/// The peers portgate's ratio is taken against (the best of those that ran).
const PEERS: [Kind; 3] = [Kind::Haproxy, Kind::HaproxySplice, Kind::Nginx];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Portgate => "portgate",
            Kind::PortgateLog => "portgate-log",
            Kind::Haproxy => "haproxy",
            Kind::HaproxySplice => "haproxy-splice",
            Kind::Nginx => "nginx",
        }
    }
    fn installed(self) -> Result<(), String> {
        match self {
            Kind::Direct => Ok(()),
            Kind::Portgate | Kind::PortgateLog => {
                if Path::new(BIN).exists() {
                    Ok(())
                } else {
                    Err(format!("{BIN} missing"))
                }
            }
            Kind::Haproxy | Kind::HaproxySplice => {
                if Path::new(HAPROXY).exists() {
                    Ok(())
                } else {
                    Err("haproxy not installed (apt-get install haproxy)".into())
                }
            }
            Kind::Nginx => nginx_stream().map(|_| ()),
        }
    }
}

/// How the nginx contender gets its stream module: `Ok(Some(line))` when it
/// must be loaded (Debian builds it as a module, `libnginx-mod-stream`; the
/// bench runs nginx with its own `-c` config, so /etc/nginx/modules-enabled
/// does not apply), `Ok(None)` when this nginx has it built in.
fn nginx_stream() -> Result<Option<String>, String> {
    if !Path::new(NGINX).exists() {
        return Err("nginx not installed (apt-get install nginx-light libnginx-mod-stream)".into());
    }
    if Path::new(NGINX_STREAM).exists() {
        return Ok(Some(format!("load_module {NGINX_STREAM};\n")));
    }
    let out = Command::new(NGINX).arg("-V").output().map_err(|e| format!("nginx -V: {e}"))?;
    let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    if text.split_whitespace().any(|a| a == "--with-stream") {
        Ok(None)
    } else {
        Err("nginx stream module missing (apt-get install libnginx-mod-stream)".into())
    }
}

/// A running contender: where to connect, and which processes to account.
struct Proxy {
    kind: Kind,
    base: u16,
    child: Option<Child>,
    dir: PathBuf,
}

impl Proxy {
    fn start(kind: Kind, base: u16, backend: u16, workdir: &Path) -> Proxy {
        let dir = workdir.join(format!("{}-{base}", kind.name()));
        std::fs::create_dir_all(&dir).unwrap();
        let last = base + NPORTS - 1;
        let child = match kind {
            Kind::Direct => None,
            Kind::Portgate | Kind::PortgateLog => {
                let level = if kind == Kind::PortgateLog { "info" } else { "warn" };
                let mut c = String::new();
                writeln!(c, "[listen]\naddress = \"127.0.0.1\"\nports = \"{base}-{last}\"\n").unwrap();
                writeln!(c, "[access]\nallow = [\"127.0.0.0/8\"]\n").unwrap();
                writeln!(c, "[admin]\nlisten = \"off\"\n\n[log]\nlevel = \"{level}\"\n").unwrap();
                for i in 0..NPORTS {
                    writeln!(
                        c,
                        "[[route]]\nname = \"r{i}\"\nport = {}\ntarget = \"127.0.0.1:{}\"\n",
                        base + i,
                        backend + i
                    )
                    .unwrap();
                }
                let path = dir.join("portgate.toml");
                std::fs::write(&path, c).unwrap();
                let mut cmd = Command::new("taskset");
                cmd.args(["-c", "0", BIN, "run", "-c"]).arg(&path).env_remove("RUST_LOG");
                let stderr = if kind == Kind::PortgateLog {
                    // A real sink: every session line is written (as to the journal).
                    Stdio::from(std::fs::File::create(dir.join("portgate.log")).expect("create the log file"))
                } else {
                    Stdio::inherit()
                };
                Some(spawn_wait_with(cmd, base, stderr))
            }
            Kind::Haproxy | Kind::HaproxySplice => {
                // The same config; only splicing differs. `option splice-auto`
                // alone leaves it to HAProxy's heuristic, which on this loopback
                // setup never splices (strace of HAProxy 2.6 under bulk: no
                // splice(2) call, only recvfrom/sendto), so haproxy-splice also
                // forces it both ways: splice-auto plus splice-request and
                // splice-response.
                let splice = if kind == Kind::HaproxySplice {
                    "option splice-auto\n  option splice-request\n  option splice-response"
                } else {
                    "# option splice-auto   # off (HAProxy's default): see haproxy-splice"
                };
                // HAProxy sizes its descriptor limit as 2 x maxconn + 2 x maxpipes
                // (maxconn / 4 by default) + listeners, and refuses to start above
                // the hard limit (20,000 here): maxpipes 200 is far more than
                // bulk's 8 connections hold, and idle sessions hold none.
                let c = format!(
                    "global\n  nbthread 1\n  maxconn 9500\n  maxpipes 200\n\n\
                     defaults\n  mode tcp\n  maxconn 9500\n  timeout connect 5s\n  \
                     timeout client 1h\n  timeout server 1h\n  option clitcpka\n  option srvtcpka\n  \
                     {splice}\n\n\
                     frontend fe\n  bind 127.0.0.1:{base}-{last}\n  default_backend be\n\n\
                     backend be\n  server s1 127.0.0.1:+{off}\n",
                    off = backend - base
                );
                let path = dir.join("haproxy.cfg");
                std::fs::write(&path, c).unwrap();
                let mut cmd = Command::new("taskset");
                cmd.args(["-c", "0", HAPROXY, "-db", "-f"]).arg(&path);
                Some(spawn_wait(cmd, base))
            }
            Kind::Nginx => {
                let load = nginx_stream().expect("nginx checked by installed()").unwrap_or_default();
                let mut c = format!(
                    "{load}worker_processes 1;\ndaemon off;\n\
                     worker_rlimit_nofile 20000;\npid {}/nginx.pid;\nerror_log stderr warn;\n\
                     events {{ worker_connections 19000; }}\n\nstream {{\n",
                    dir.display()
                );
                for i in 0..NPORTS {
                    writeln!(
                        c,
                        "  server {{ listen 127.0.0.1:{} so_keepalive=on; proxy_socket_keepalive on; \
                         proxy_pass 127.0.0.1:{}; }}",
                        base + i,
                        backend + i
                    )
                    .unwrap();
                }
                c.push_str("}\n");
                let path = dir.join("nginx.conf");
                std::fs::write(&path, c).unwrap();
                let mut cmd = Command::new("taskset");
                cmd.args(["-c", "0", NGINX, "-e", "stderr", "-p"]).arg(&dir).arg("-c").arg(&path);
                Some(spawn_wait(cmd, base))
            }
        };
        Proxy { kind, base: if kind == Kind::Direct { backend } else { base }, child, dir }
    }

    /// Every process whose CPU and memory count: nginx's master and worker.
    fn pids(&self) -> Vec<u32> {
        let Some(c) = &self.child else { return vec![] };
        let mut v = vec![c.id()];
        if self.kind == Kind::Nginx {
            v.extend(children_of(c.id()));
        }
        v
    }

    fn cpu(&self) -> f64 {
        self.pids().iter().map(|&p| cpu_secs(p)).sum()
    }

    fn rss(&self) -> u64 {
        self.pids().iter().map(|&p| rss_kib(p)).sum()
    }

    fn sink(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.base))
    }

    fn echo(&self, i: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.base + 1 + (i % SPREAD)))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // nginx's worker too: killing the master alone would orphan it.
        for pid in self.pids().into_iter().rev() {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        if let Some(c) = &mut self.child {
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Spawn a proxy and wait until every port of its range accepts.
fn spawn_wait(cmd: Command, base: u16) -> Child {
    spawn_wait_with(cmd, base, Stdio::inherit())
}

fn spawn_wait_with(mut cmd: Command, base: u16, stderr: Stdio) -> Child {
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
    let mut child = cmd.spawn().expect("spawn proxy");
    let deadline = Instant::now() + Duration::from_secs(10);
    'ports: for p in base..base + NPORTS {
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("proxy exited at startup: {st}");
            }
            // A listener answers; close at once (counted by nobody).
            if TcpStream::connect(("127.0.0.1", p)).is_ok() {
                continue 'ports;
            }
            thread::sleep(Duration::from_millis(10));
        }
        panic!("proxy did not listen on {p} within 10 s");
    }
    // Let the probes' sessions end.
    thread::sleep(Duration::from_millis(200));
    child
}

// ---------------------------------------------------------------- measurements

#[derive(Default, Clone)]
struct Sample(HashMap<&'static str, f64>);

/// Release the load threads waiting on `barrier`, let them run for `secs`,
/// stop and join them; after `settle`, return (elapsed seconds, proxy CPU
/// seconds spent meanwhile).
fn timed_run(
    p: &Proxy,
    barrier: &Barrier,
    stop: &AtomicBool,
    threads: Vec<thread::JoinHandle<()>>,
    secs: f64,
    settle: Duration,
) -> (f64, f64) {
    let cpu0 = p.cpu();
    barrier.wait();
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for h in threads {
        h.join().unwrap();
    }
    let el = t0.elapsed().as_secs_f64();
    thread::sleep(settle);
    (el, p.cpu() - cpu0)
}

fn bulk(p: &Proxy, conns: usize, secs: f64) -> Sample {
    let barrier = Arc::new(Barrier::new(conns + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let mut hs = Vec::new();
    for _ in 0..conns {
        let (barrier, stop, total) = (barrier.clone(), stop.clone(), total.clone());
        let addr = p.sink();
        hs.push(thread::spawn(move || {
            let mut s = TcpStream::connect(addr).expect("bulk connect");
            let buf = vec![0x5au8; 256 * 1024];
            barrier.wait();
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match s.write(&buf) {
                    Ok(n) => sent += n as u64,
                    Err(e) => panic!("bulk write: {e}"),
                }
            }
            s.shutdown(Shutdown::Write).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut b = [0u8; 16];
            // The sink closes after it has read everything.
            let _ = s.read(&mut b);
            total.fetch_add(sent, Ordering::Relaxed);
        }));
    }
    let (el, cpu) = timed_run(p, &barrier, &stop, hs, secs, Duration::ZERO);
    let bytes = total.load(Ordering::Relaxed) as f64;
    let mut s = Sample::default();
    s.0.insert("gbps", bytes * 8.0 / el / 1e9);
    if p.child.is_some() {
        s.0.insert("cpu_ms_per_gb", cpu * 1000.0 / (bytes / 1e9));
    }
    s
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i]
}

fn latency(p: &Proxy, secs: f64) -> Sample {
    let _dma = hold_dma_latency();
    let mut s = TcpStream::connect(p.echo(0)).expect("latency connect");
    s.set_nodelay(true).unwrap();
    let msg = [7u8; MSG];
    let mut back = [0u8; MSG];
    let mut rtt = |s: &mut TcpStream| {
        s.write_all(&msg).unwrap();
        s.read_exact(&mut back).unwrap();
    };
    for _ in 0..2000 {
        rtt(&mut s);
    }
    let mut v = Vec::with_capacity(200_000);
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end && v.len() < 500_000 {
        let t = Instant::now();
        rtt(&mut s);
        v.push(t.elapsed().as_nanos() as f64 / 1000.0);
    }
    let mut out = Sample::default();
    out.0.insert("p50_us", percentile(&mut v, 0.5));
    out.0.insert("p99_us", percentile(&mut v, 0.99));
    out
}

fn connrate(p: &Proxy, ports: u16, secs: f64) -> Sample {
    let barrier = Arc::new(Barrier::new(CONNRATE_CLIENTS + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let lat = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(AtomicU64::new(0));
    let first_err = Arc::new(Mutex::new(None::<String>));
    let addrs: Vec<SocketAddr> = (0..ports).map(|i| p.echo(i)).collect();
    let mut hs = Vec::new();
    for c in 0..CONNRATE_CLIENTS {
        let (barrier, stop, lat, errors, first_err) =
            (barrier.clone(), stop.clone(), lat.clone(), errors.clone(), first_err.clone());
        let addrs = addrs.clone();
        hs.push(thread::spawn(move || {
            let mut mine = Vec::with_capacity(100_000);
            let msg = [9u8; MSG];
            let mut back = [0u8; MSG];
            let mut k = c;
            barrier.wait();
            while !stop.load(Ordering::Relaxed) {
                let addr = addrs[k % addrs.len()];
                k += CONNRATE_CLIENTS;
                let t = Instant::now();
                let r = (|| -> std::io::Result<()> {
                    let mut s = TcpStream::connect(addr)?;
                    s.set_read_timeout(Some(Duration::from_secs(5)))?;
                    s.write_all(&msg)?;
                    s.read_exact(&mut back)?;
                    Ok(())
                })();
                match r {
                    Ok(()) => mine.push(t.elapsed().as_nanos() as f64 / 1000.0),
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_err.lock().unwrap().get_or_insert_with(|| e.to_string());
                    }
                }
            }
            lat.lock().unwrap().extend(mine);
        }));
    }
    // Give the proxy time to finish closing (it counts toward its CPU).
    let (el, cpu) = timed_run(p, &barrier, &stop, hs, secs, Duration::from_millis(100));
    let mut v = std::mem::take(&mut *lat.lock().unwrap());
    let n = v.len() as f64;
    let errs = errors.load(Ordering::Relaxed);
    if let Some(e) = first_err.lock().unwrap().as_ref() {
        eprintln!("  {} connrate/{ports}: {errs} errors, first: {e}", p.kind.name());
    }
    let mut s = Sample::default();
    s.0.insert("conn_s", n / el);
    s.0.insert("p99_us", percentile(&mut v, 0.99));
    s.0.insert("errors", errs as f64);
    if p.child.is_some() {
        s.0.insert("cpu_us_per_conn", cpu * 1e6 / n);
    }
    s
}

/// Open `n` sessions through the proxy (one byte each way, then idle) and
/// report the RSS growth per session.
fn idle_memory(p: &Proxy, n: usize) -> Sample {
    let before = p.rss();
    let mut held = Vec::with_capacity(n);
    let mut fails = 0;
    let t0 = Instant::now();
    for i in 0..n {
        let r = (|| -> std::io::Result<TcpStream> {
            let mut s = TcpStream::connect(p.echo(i as u16))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"x")?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            Ok(s)
        })();
        match r {
            Ok(s) => held.push(s),
            Err(e) => {
                fails += 1;
                if fails == 1 {
                    eprintln!("  {} idle: session {i} failed: {e}", p.kind.name());
                }
            }
        }
    }
    let open_s = t0.elapsed().as_secs_f64();
    thread::sleep(Duration::from_millis(500));
    let after = p.rss();
    drop(held);
    let mut s = Sample::default();
    let ok = (n - fails) as f64;
    s.0.insert("kib_per_session", (after as f64 - before as f64) / ok.max(1.0));
    s.0.insert("errors", fails as f64);
    s.0.insert("open_s", open_s);
    s
}

// ---------------------------------------------------------------- scale

/// Ports of the `via` shape: the PrivateLink node, many tenants' endpoints
/// on a few ports.
const VIA_PORTS: u16 = 50;
/// The most routes the ports shape may have: each route is a listener, so a
/// descriptor, and a process may hold 20,000 (the admin server, sessions
/// and the runtime need the rest).
const MAX_PORT_ROUTES: usize = 15_000;
/// Reloads per scale case; the last RSS figure is taken after them.
const SCALE_RELOADS: usize = 20;
/// The scale test stops starting reloads after this long (each case still
/// runs one), so that it stays within about four minutes.
const SCALE_RELOAD_BUDGET: Duration = Duration::from_secs(200);
/// The prober's pause between connections: about 1,000 a second, which
/// sees a refusal window of a millisecond and keeps the sockets left in
/// TIME_WAIT (client and portgate sides) far below the ephemeral range.
const PROBE_GAP: Duration = Duration::from_millis(1);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// N routes on N ports, no PROXY protocol.
    Ports,
    /// N `via` routes on [`VIA_PORTS`] ports, PROXY protocol v2 required.
    Via,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Ports => "N routes on N ports",
            Shape::Via => "N via routes on 50 ports",
        }
    }

    fn ports(self, n: usize) -> u16 {
        match self {
            Shape::Ports => u16::try_from(n.max(1)).expect("ports shape: N fits a port range"),
            Shape::Via => VIA_PORTS,
        }
    }
}

struct ScaleCase {
    shape: Shape,
    n: usize,
    /// `[metrics] histograms = "node"`.
    node_histograms: bool,
    reloads: usize,
}

#[derive(Default)]
struct ScaleResult {
    startup_ms: f64,
    reload_ms: Vec<f64>,
    rss_start_kib: u64,
    rss_end_kib: u64,
    probes_ok: u64,
    probes_bad: u64,
    metrics_ms: Vec<f64>,
    metrics_bytes: usize,
}

/// Where a scale case listens and dials.
struct ScaleNet {
    base: u16,
    echo: u16,
    admin: u16,
}

/// Route `i`'s endpoint id: `vpce-` and 17 hex digits, unique per `i` (an
/// odd multiplier is a bijection on u64).
fn vpce(i: usize) -> String {
    format!("vpce-0{:016x}", (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// How many of the reloads `1..=variant` changed route `i`. Reload k
/// changes the routes with `i % 10 == k % 10` (target and tenant), so each
/// reload changes a tenth of them; route 0, the prober's, never changes.
fn generation(i: usize, variant: usize) -> usize {
    if i == 0 {
        return 0;
    }
    (1..=variant).filter(|k| k % 10 == i % 10).count()
}

fn scale_config(case: &ScaleCase, net: &ScaleNet, variant: usize) -> String {
    let nports = case.shape.ports(case.n);
    let mut c = String::with_capacity(case.n * 160 + 1024);
    let last = net.base + nports - 1;
    writeln!(c, "[listen]\naddress = \"127.0.0.1\"\nports = \"{}-{last}\"\n", net.base).unwrap();
    if case.shape == Shape::Via {
        writeln!(c, "[proxy_protocol]\nmode = \"required\"\ntrusted = [\"127.0.0.0/8\"]\n").unwrap();
    }
    writeln!(c, "[access]\nallow = [\"127.0.0.0/8\"]\n").unwrap();
    writeln!(c, "[admin]\nlisten = \"127.0.0.1:{}\"\n\n[log]\nlevel = \"info\"\n", net.admin).unwrap();
    if case.node_histograms {
        writeln!(c, "[metrics]\nhistograms = \"node\"\n").unwrap();
    }
    for i in 0..case.n {
        let g = generation(i, variant);
        let port = net.base + (i % nports as usize) as u16;
        let target = net.echo + (g % SPREAD as usize) as u16;
        writeln!(c, "[[route]]\nname = \"route-{i}\"\nport = {port}").unwrap();
        if case.shape == Shape::Via {
            writeln!(c, "via = \"{}\"", vpce(i)).unwrap();
        }
        writeln!(c, "target = \"127.0.0.1:{target}\"\ntenant = \"t{}-{g}\"\n", i % 100).unwrap();
    }
    c
}

/// A child that is killed (SIGKILL) and reaped when dropped, panics included.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sets the flag when dropped (stops a prober on every way out).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// portgate's stderr, line by line, with the instant each line arrived.
struct Lines {
    rx: mpsc::Receiver<(Instant, String)>,
    warned: usize,
}

impl Lines {
    fn new(stderr: std::process::ChildStderr) -> Lines {
        let (tx, rx) = mpsc::channel();
        // Ends at EOF, when portgate exits.
        thread::spawn(move || {
            for l in BufReader::new(stderr).lines() {
                let Ok(l) = l else { break };
                if tx.send((Instant::now(), l)).is_err() {
                    break;
                }
            }
        });
        Lines { rx, warned: 0 }
    }

    /// The arrival of the first line containing `needle`; an ERROR line, EOF
    /// or `within` passing first is an error.
    fn wait_for(&mut self, needle: &str, within: Duration) -> Result<Instant, String> {
        let deadline = Instant::now() + within;
        loop {
            match self.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok((t, l)) if l.contains(needle) => return Ok(t),
                Ok((_, l)) if l.contains("ERROR") => return Err(l),
                Ok((_, l)) => {
                    if l.contains("WARN") && self.warned < 3 {
                        self.warned += 1;
                        let cut: String = l.chars().take(300).collect();
                        eprintln!("    portgate: {cut}");
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!("no \"{needle}\" line within {} s", within.as_secs()))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(format!("portgate exited before \"{needle}\""))
                }
            }
        }
    }
}

/// `GET /metrics` on the admin port, read to the end: (milliseconds, bytes).
fn scrape(admin: u16) -> Result<(f64, usize), String> {
    let t = Instant::now();
    let r = (|| -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(("127.0.0.1", admin))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
        let mut body = Vec::new();
        s.read_to_end(&mut body)?;
        Ok(body)
    })();
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    match r {
        Ok(b) if b.starts_with(b"HTTP/1.1 200") => Ok((ms, b.len())),
        Ok(b) => Err(format!("/metrics: {}", String::from_utf8_lossy(&b[..b.len().min(80)]))),
        Err(e) => Err(format!("/metrics: {e}")),
    }
}

/// Connect, send `header` and 64 bytes, read the echo, close; every
/// [`PROBE_GAP`] until `stop`. Returns (ok, failed, first failure).
fn start_prober(
    addr: SocketAddr,
    header: Vec<u8>,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<(u64, u64, Option<String>)> {
    thread::spawn(move || {
        let (mut ok, mut bad, mut first) = (0u64, 0u64, None);
        let mut msg = header;
        msg.extend_from_slice(&[1u8; MSG]);
        while !stop.load(Ordering::Relaxed) {
            let r = (|| -> std::io::Result<()> {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(&msg)?;
                let mut b = [0u8; MSG];
                s.read_exact(&mut b)
            })();
            match r {
                Ok(()) => ok += 1,
                Err(e) => {
                    bad += 1;
                    first.get_or_insert_with(|| e.to_string());
                }
            }
            thread::sleep(PROBE_GAP);
        }
        (ok, bad, first)
    })
}

/// One scale case: start portgate (startup = spawn to the `portgate ready`
/// line), RSS, then `case.reloads` SIGHUP reloads (each to its `config
/// reloaded` line; no new one starts after `reloads_until`, but at least
/// one runs) with a prober running through a route that never changes, RSS
/// again, and last three scrapes of `/metrics`.
fn scale_case(
    case: &ScaleCase,
    echo: u16,
    dir: &Path,
    reloads_until: Instant,
) -> Result<ScaleResult, String> {
    let nports = case.shape.ports(case.n);
    let base = free_block(1100, nports);
    let net = ScaleNet { base, echo, admin: free_block(base + nports, 1) };
    let path = dir.join("portgate.toml");
    std::fs::write(&path, scale_config(case, &net, 0)).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let child = Command::new("taskset")
        .args(["-c", "0", BIN, "run", "-c"])
        .arg(&path)
        // The ready and reload lines only; no session lines.
        .env("RUST_LOG", "warn,portgate::node=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn portgate: {e}"))?;
    let mut child = Reaped(child);
    let mut lines = Lines::new(child.0.stderr.take().unwrap());
    let ready = lines.wait_for("portgate ready", Duration::from_secs(60))?;
    let pid = child.0.id();
    let mut r = ScaleResult { startup_ms: (ready - t0).as_secs_f64() * 1000.0, ..Default::default() };
    thread::sleep(Duration::from_millis(300));
    r.rss_start_kib = rss_kib(pid);

    let stop = Arc::new(AtomicBool::new(false));
    let _stop_guard = StopOnDrop(stop.clone());
    let addr = SocketAddr::from(([127, 0, 0, 1], base));
    let header = match case.shape {
        Shape::Ports => Vec::new(),
        Shape::Via => portgate::proxy_protocol::encode_v2(
            portgate::proxy_protocol::Command::Proxy,
            Some((SocketAddr::from(([127, 0, 0, 1], 40000)), addr)),
            Some(&vpce(0)),
            &[],
        ),
    };
    let probe = start_prober(addr, header, stop.clone());
    thread::sleep(Duration::from_millis(100));
    for v in 1..=case.reloads {
        if v > 1 && Instant::now() >= reloads_until {
            break;
        }
        std::fs::write(&path, scale_config(case, &net, v)).map_err(|e| e.to_string())?;
        let t1 = Instant::now();
        unsafe { libc::kill(pid as i32, libc::SIGHUP) };
        let done = lines.wait_for("config reloaded", Duration::from_secs(60))?;
        r.reload_ms.push((done - t1).as_secs_f64() * 1000.0);
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let (ok, bad, first) = probe.join().map_err(|_| "prober panicked".to_string())?;
    if let Some(e) = first {
        eprintln!("    prober: {bad} failed, first: {e}");
    }
    (r.probes_ok, r.probes_bad) = (ok, bad);
    thread::sleep(Duration::from_millis(500));
    r.rss_end_kib = rss_kib(pid);
    // Last: a render of 100+ MiB raises the RSS figures for good.
    for _ in 0..3 {
        let (ms, bytes) = scrape(net.admin)?;
        r.metrics_ms.push(ms);
        r.metrics_bytes = bytes;
    }
    drop(child);
    Ok(r)
}

/// Whether this portgate knows `[metrics] histograms = "node"`: `Err` with
/// what `portgate check` said when it does not.
fn node_histograms_supported(dir: &Path) -> Result<(), String> {
    let case = ScaleCase { shape: Shape::Via, n: 1, node_histograms: true, reloads: 0 };
    let net = ScaleNet { base: 1100, echo: 3000, admin: 1099 };
    let path = dir.join("check-node.toml");
    std::fs::write(&path, scale_config(&case, &net, 0)).map_err(|e| e.to_string())?;
    let out = Command::new(BIN).args(["check", "-c"]).arg(&path).output().map_err(|e| e.to_string())?;
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    Err(text.lines().find(|l| !l.trim().is_empty()).unwrap_or("rejected").trim().to_string())
}

/// Routes at scale, both shapes of issue 15, portgate alone: N routes on N
/// ports (N = 5k, 10k; at most [`MAX_PORT_ROUTES`], one descriptor per
/// listener) and N `via` routes on 50 ports (N = 5k, 10k, 20k, 50k), each
/// against its shape's empty node (one route), then the 50k `via` case
/// again with `[metrics] histograms = "node"` when this portgate knows the
/// key. Returns the markdown table.
fn scale_test(echo: u16, reloads: usize, workdir: &Path) -> String {
    let dir = workdir.join("scale");
    std::fs::create_dir_all(&dir).unwrap();
    let node = node_histograms_supported(&dir);
    let mut cases = Vec::new();
    for n in [1, 5_000, 10_000] {
        assert!(n <= MAX_PORT_ROUTES);
        cases.push(ScaleCase { shape: Shape::Ports, n, node_histograms: false, reloads });
    }
    for n in [1, 5_000, 10_000, 20_000, 50_000] {
        cases.push(ScaleCase { shape: Shape::Via, n, node_histograms: false, reloads });
    }
    match &node {
        Ok(()) => cases.push(ScaleCase { shape: Shape::Via, n: 50_000, node_histograms: true, reloads }),
        Err(why) => eprintln!("scale: [metrics] histograms = \"node\" skipped: portgate check says: {why}"),
    }

    let t_all = Instant::now();
    // Bounds the whole test: reloads stop (after at least one per case) once
    // this has passed.
    let reloads_until = t_all + SCALE_RELOAD_BUDGET;
    let mut md = String::new();
    writeln!(
        md,
        "| shape | N | startup (ms) [µs/route above empty] | reload median / max (ms) [µs/route] | \
         RSS after start (MiB) | KiB/route above empty | RSS after {reloads} reloads (% of after start) | \
         failed probes during reloads | /metrics median of 3 (ms, size) |"
    )
    .unwrap();
    writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |").unwrap();
    // The shape's empty node: (startup ms, reload median ms, RSS KiB).
    let mut empty: Option<(f64, f64, u64)> = None;
    for case in &cases {
        let label = format!(
            "{}{}",
            case.shape.name(),
            if case.node_histograms { ", histograms = \"node\"" } else { "" }
        );
        let t = Instant::now();
        eprintln!("scale: {label}, N = {} ...", case.n);
        let res = scale_case(case, echo, &dir, reloads_until);
        eprintln!("scale: {label}, N = {} done in {:.1} s", case.n, t.elapsed().as_secs_f64());
        let r = match res {
            Ok(r) => r,
            Err(e) => {
                eprintln!("scale: failed: {e}");
                writeln!(md, "| {label} | {} | failed: {} | | | | | | |", case.n, e.replace('|', "/"))
                    .unwrap();
                continue;
            }
        };
        let reload = stats(&r.reload_ms);
        let reload_med = reload.map_or(f64::NAN, |s| s.0);
        if case.n == 1 {
            empty = Some((r.startup_ms, reload_med, r.rss_start_kib));
        }
        let extra = (case.n - 1) as f64;
        let per_route = |x: f64, x0: f64| {
            if case.n == 1 {
                "empty".to_string()
            } else {
                format!("{:.1}", (x - x0) * 1000.0 / extra)
            }
        };
        let (e_start, e_reload, e_rss) = empty.unwrap_or((0.0, 0.0, 0));
        let kib_route = if case.n == 1 {
            "empty".to_string()
        } else {
            format!("{:.2}", (r.rss_start_kib as f64 - e_rss as f64) / extra)
        };
        let reload_cell = match reload {
            Some((m, _, hi)) => format!("{m:.0} / {hi:.0} [{}]", per_route(m, e_reload)),
            None => "–".into(),
        };
        let metrics = stats(&r.metrics_ms).map_or("–".into(), |s| {
            format!("{:.0} ({:.1} MiB)", s.0, r.metrics_bytes as f64 / 1024.0 / 1024.0)
        });
        let done = if r.reload_ms.len() < reloads {
            format!(" (after {}: time budget)", r.reload_ms.len())
        } else {
            String::new()
        };
        writeln!(
            md,
            "| {label} | {} | {:.0} [{}] | {reload_cell} | {:.1} | {kib_route} | {:.0}%{done} | {} of {} | {metrics} |",
            case.n,
            r.startup_ms,
            per_route(r.startup_ms, e_start),
            r.rss_start_kib as f64 / 1024.0,
            r.rss_end_kib as f64 * 100.0 / r.rss_start_kib.max(1) as f64,
            r.probes_bad,
            r.probes_ok + r.probes_bad,
        )
        .unwrap();
    }
    if let Err(why) = &node {
        writeln!(md, "\n`[metrics] histograms = \"node\"`: skipped, `portgate check` refuses it ({why}).")
            .unwrap();
    }
    writeln!(
        md,
        "\nScale test: {:.0} s. Targets (issue 15): startup and reload ≤ 250 ms at 10k and ≤ 1 s at 50k, \
         growing linearly; ≤ 2 KiB/route above the empty node (one route; per shape); RSS after {reloads} \
         reloads within 10% of after start; no failed probe during reloads (prober: about 1,000 \
         connections/s through a route no reload changes, with a PROXY v2 header carrying its endpoint id \
         for `via`); `/metrics` ≤ 500 ms at 50k routes with histograms = \"node\". Each reload changes a \
         tenth of the routes' targets and tenants. The ports shape stops at 10k: every route is a \
         listener, one descriptor each, and a process may hold 20,000 here (≤ {MAX_PORT_ROUTES}).",
        t_all.elapsed().as_secs_f64()
    )
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    md
}

// ---------------------------------------------------------------- report

#[derive(Clone, Copy, PartialEq)]
enum Better {
    Higher,
    Lower,
}

struct Row {
    label: String,
    key: &'static str,
    test: &'static str,
    better: Better,
    unit_fmt: fn(f64) -> String,
}

fn f1(x: f64) -> String {
    format!("{x:.1}")
}
fn f0(x: f64) -> String {
    format!("{x:.0}")
}
fn f2(x: f64) -> String {
    format!("{x:.2}")
}

fn stats(v: &[f64]) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let med = if s.len() % 2 == 1 { s[s.len() / 2] } else { (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0 };
    Some((med, s[0], s[s.len() - 1]))
}

fn main() {
    let opts = parse_opts();
    let on = |t: &str| opts.only.iter().any(|o| o == t);
    pin_self_to_cpu(1);
    let nofile = raise_nofile();
    let workdir = std::env::temp_dir().join(format!("portgate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).unwrap();

    // Backends: sink on `backend`, echo on backend+1 ..= backend+100.
    let backend = free_block(3000, NPORTS);
    start_sink(backend);
    start_echo(backend + 1, SPREAD);

    let mut kinds = Vec::new();
    for &k in &opts.contenders {
        match k.installed() {
            Ok(()) => kinds.push(k),
            Err(why) => println!("skipping {}: {why}", k.name()),
        }
    }
    let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
    eprintln!(
        "compare: contenders {names:?}, {} rounds x {:.1} s, NOFILE {nofile}, tests {:?}",
        opts.rounds, opts.secs, opts.only
    );

    // results[test/key][kind] = samples
    let mut results: HashMap<(String, &'static str), HashMap<Kind, Vec<f64>>> = HashMap::new();
    let mut record = |test: &str, k: Kind, s: &Sample| {
        for (key, v) in &s.0 {
            results.entry((test.to_string(), key)).or_default().entry(k).or_default().push(*v);
        }
    };

    let traffic = ["bulk", "latency", "connrate"].iter().any(|t| on(t));
    if traffic {
        let mut next = backend + NPORTS;
        let proxies: Vec<Proxy> = kinds
            .iter()
            .map(|&k| {
                let base = if k == Kind::Direct { 0 } else { free_block(next, NPORTS) };
                if k != Kind::Direct {
                    next = base + NPORTS;
                }
                Proxy::start(k, base, backend, &workdir)
            })
            .collect();
        for round in 0..opts.rounds {
            eprintln!("round {}/{}", round + 1, opts.rounds);
            if on("bulk") {
                for p in &proxies {
                    for conns in [1usize, 8] {
                        let s = bulk(p, conns, opts.secs);
                        eprintln!("  {:9} bulk x{conns}: {:?}", p.kind.name(), fmt_sample(&s));
                        record(&format!("bulk{conns}"), p.kind, &s);
                    }
                }
            }
            if on("latency") {
                for p in &proxies {
                    let s = latency(p, opts.secs);
                    eprintln!("  {:9} latency: {:?}", p.kind.name(), fmt_sample(&s));
                    record("latency", p.kind, &s);
                }
            }
            if on("connrate") {
                for p in &proxies {
                    for ports in [1u16, SPREAD] {
                        let s = connrate(p, ports, opts.secs);
                        eprintln!("  {:9} connrate/{ports}: {:?}", p.kind.name(), fmt_sample(&s));
                        record(&format!("connrate{ports}"), p.kind, &s);
                    }
                }
            }
        }
        drop(proxies);
    }

    if on("idle") {
        let base = free_block(backend + NPORTS, NPORTS);
        for round in 0..opts.mem_rounds {
            for &k in kinds.iter().filter(|&&k| k != Kind::Direct) {
                let p = Proxy::start(k, base, backend, &workdir);
                let s = idle_memory(&p, opts.idle_n);
                eprintln!("  {:9} idle round {}: {:?}", k.name(), round + 1, fmt_sample(&s));
                record("idle", k, &s);
                drop(p);
                // Let the closed sessions' sockets go before the next contender.
                thread::sleep(Duration::from_millis(300));
            }
        }
    }

    let mut scale = String::new();
    if on("scale") && kinds.contains(&Kind::Portgate) {
        scale = scale_test(backend + 1, opts.scale_reloads, &workdir);
    }
    let _ = std::fs::remove_dir_all(&workdir);

    // ------------------------------------------------------------ table
    let rows = vec![
        Row {
            label: "bulk, 1 conn (Gbit/s)".into(),
            key: "gbps",
            test: "bulk1",
            better: Better::Higher,
            unit_fmt: f1,
        },
        Row {
            label: "bulk, 1 conn: proxy CPU (ms/GB)".into(),
            key: "cpu_ms_per_gb",
            test: "bulk1",
            better: Better::Lower,
            unit_fmt: f0,
        },
        Row {
            label: "bulk, 8 conns (Gbit/s)".into(),
            key: "gbps",
            test: "bulk8",
            better: Better::Higher,
            unit_fmt: f1,
        },
        Row {
            label: "bulk, 8 conns: proxy CPU (ms/GB)".into(),
            key: "cpu_ms_per_gb",
            test: "bulk8",
            better: Better::Lower,
            unit_fmt: f0,
        },
        Row {
            label: "64 B round trip p50 (µs)".into(),
            key: "p50_us",
            test: "latency",
            better: Better::Lower,
            unit_fmt: f1,
        },
        Row {
            label: "64 B round trip p99 (µs)".into(),
            key: "p99_us",
            test: "latency",
            better: Better::Lower,
            unit_fmt: f1,
        },
        Row {
            label: "conn rate, 1 port (conn/s)".into(),
            key: "conn_s",
            test: "connrate1",
            better: Better::Higher,
            unit_fmt: f0,
        },
        Row {
            label: "conn rate, 1 port: p99 (µs)".into(),
            key: "p99_us",
            test: "connrate1",
            better: Better::Lower,
            unit_fmt: f0,
        },
        Row {
            label: "conn rate, 1 port: proxy CPU (µs/conn)".into(),
            key: "cpu_us_per_conn",
            test: "connrate1",
            better: Better::Lower,
            unit_fmt: f1,
        },
        Row {
            label: "conn rate, 1 port: errors".into(),
            key: "errors",
            test: "connrate1",
            better: Better::Lower,
            unit_fmt: f0,
        },
        Row {
            label: "conn rate, 100 ports (conn/s)".into(),
            key: "conn_s",
            test: "connrate100",
            better: Better::Higher,
            unit_fmt: f0,
        },
        Row {
            label: "conn rate, 100 ports: p99 (µs)".into(),
            key: "p99_us",
            test: "connrate100",
            better: Better::Lower,
            unit_fmt: f0,
        },
        Row {
            label: "conn rate, 100 ports: proxy CPU (µs/conn)".into(),
            key: "cpu_us_per_conn",
            test: "connrate100",
            better: Better::Lower,
            unit_fmt: f1,
        },
        Row {
            label: "conn rate, 100 ports: errors".into(),
            key: "errors",
            test: "connrate100",
            better: Better::Lower,
            unit_fmt: f0,
        },
        Row {
            label: format!("idle session memory, N={} (KiB/session)", opts.idle_n),
            key: "kib_per_session",
            test: "idle",
            better: Better::Lower,
            unit_fmt: f2,
        },
        Row {
            label: "idle sessions: failed opens".into(),
            key: "errors",
            test: "idle",
            better: Better::Lower,
            unit_fmt: f0,
        },
    ];
    let mut md = String::new();
    writeln!(md, "| metric | {} | portgate ÷ best peer |", names.join(" | ")).unwrap();
    writeln!(md, "| --- | {}--- |", "--- | ".repeat(names.len())).unwrap();
    let mut written = 0;
    for r in &rows {
        let Some(per) = results.get(&(r.test.to_string(), r.key)) else { continue };
        let mut cells = Vec::new();
        for k in &kinds {
            cells.push(match per.get(k).and_then(|v| stats(v)) {
                Some((m, lo, hi)) if per[k].len() > 1 => {
                    format!("{} ({}–{})", (r.unit_fmt)(m), (r.unit_fmt)(lo), (r.unit_fmt)(hi))
                }
                Some((m, _, _)) => (r.unit_fmt)(m),
                None => "–".into(),
            });
        }
        let med = |k: Kind| per.get(&k).and_then(|v| stats(v)).map(|s| s.0);
        let peers: Vec<f64> = PEERS.iter().filter_map(|&k| med(k)).collect();
        let best = match r.better {
            Better::Higher => peers.iter().cloned().fold(f64::NAN, f64::max),
            Better::Lower => peers.iter().cloned().fold(f64::NAN, f64::min),
        };
        let ratio = match med(Kind::Portgate) {
            Some(pg) if r.key == "errors" => {
                if pg == 0.0 {
                    "0 errors".into()
                } else {
                    format!("{pg} errors")
                }
            }
            Some(pg) if best.is_finite() && best != 0.0 => format!("{:.2}×", pg / best),
            _ => "–".into(),
        };
        writeln!(md, "| {} | {} | {} |", r.label, cells.join(" | "), ratio).unwrap();
        written += 1;
    }
    if written == 0 {
        md.clear();
    }
    let kernel = cmd_version("uname", &["-sr"]);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .unwrap_or_default();
    let ncpu = thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|kb| format!("{:.0} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_default();
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("PRETTY_NAME="))
        .map(|l| l.trim_start_matches("PRETTY_NAME=").trim_matches('"').to_string())
        .unwrap_or_default();
    let _ = ncpu;
    let ncpu_all = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    println!();
    println!(
        "Machine: {cpu}, {ncpu_all} CPUs, {mem}, {os}, {kernel}; proxies on CPU 0, load generator and backends on CPU 1"
    );
    println!(
        "Versions: portgate {} ({}), {}, {}",
        env!("CARGO_PKG_VERSION"),
        git_rev(),
        cmd_version(HAPROXY, &["-v"]),
        cmd_version(NGINX, &["-v"])
    );
    println!(
        "Run: {} rounds x {:.1} s per measurement{}; cells are median (min–max); ratio = portgate median ÷ best of haproxy/haproxy-splice/nginx",
        opts.rounds,
        opts.secs,
        if opts.quick { " (--quick)" } else { "" }
    );
    println!();
    print!("{md}");
    if !scale.is_empty() {
        println!();
        print!("{scale}");
    }
}

fn fmt_sample(s: &Sample) -> Vec<String> {
    let mut v: Vec<String> = s.0.iter().map(|(k, v)| format!("{k}={v:.1}")).collect();
    v.sort();
    v
}

fn git_rev() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
