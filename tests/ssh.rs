//! A real OpenSSH path through portgate: `sshd` on loopback, the client
//! configured by `portgate ssh-config`, a command, an `scp` copy compared by
//! content, and an idle session held across a reload; then the same with
//! PROXY v2, the test playing the NLB.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use portgate::proxy_protocol::{encode_v2, Command as PpCommand};

const SSHD: &str = "/usr/sbin/sshd";

fn have_openssh() -> bool {
    let ok = Path::new(SSHD).exists() && Command::new("ssh").arg("-V").output().is_ok();
    require("the OpenSSH client and server", ok, "apt-get install openssh-client openssh-server")
}

/// Who the test logs in as: the user running it.
fn login_user() -> String {
    std::env::var("USER").unwrap_or_else(|_| "root".into())
}

/// An sshd on 127.0.0.1 with its own host key and one authorized key.
struct Sshd {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keygen(path: &Path) {
    let st =
        Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(path).status().unwrap();
    assert!(st.success());
}

fn start_sshd(dir: &Path) -> Sshd {
    std::fs::create_dir_all("/run/sshd").ok(); // privilege separation directory
    keygen(&dir.join("host_key"));
    keygen(&dir.join("id_test"));
    std::fs::copy(dir.join("id_test.pub"), dir.join("authorized_keys")).unwrap();
    let port = free_port();
    let user = login_user();
    let cfg = dir.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nAllowUsers {user}\n\
             Subsystem sftp internal-sftp\nLogLevel VERBOSE\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(SSHD)
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sshd");
    // Ready when it says it listens.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("Server listening") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(SOON).expect("sshd did not start listening");
    Sshd { child, port, dir: dir.to_path_buf() }
}

/// `ssh`/`scp` with the generated config and a throwaway known_hosts.
fn ssh_cmd(tool: &str, conf: &Path, dir: &Path) -> Command {
    let mut c = Command::new(tool);
    c.arg("-F")
        .arg(conf)
        .arg("-o")
        .arg("BatchMode=yes")
        .arg("-o")
        .arg("StrictHostKeyChecking=accept-new")
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}/known_hosts", dir.display()))
        .arg("-o")
        .arg("ConnectTimeout=10");
    c
}

fn generate_ssh_config(pg: &Portgate, sshd: &Sshd) -> PathBuf {
    let out = sshd.dir.join("portgate_ssh.conf");
    let user = login_user();
    let o = Command::new(BIN)
        .args(["ssh-config", "-c"])
        .arg(&pg.config_path)
        .args(["--host", "127.0.0.1", "--user", &user, "--identity-file"])
        .arg(sshd.dir.join("id_test"))
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

fn sha(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn ssh_command_scp_and_idle_session_across_reload() {
    if !have_openssh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sshd = start_sshd(dir.path());
    let port = free_port();
    let config = Config::loopback().with(
        Route::new("tenant-a-web1", port, addr(sshd.port))
            .set("tenant", "tenant-a")
            .set("ssh_user", login_user()),
    );
    let pg = Portgate::start(&config);
    let conf = generate_ssh_config(&pg, &sshd);

    // A command.
    let o = ssh_cmd("ssh", &conf, dir.path())
        .arg("tenant-a-web1")
        .arg("echo hello-through-portgate")
        .output()
        .unwrap();
    assert!(o.status.success(), "ssh failed: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "hello-through-portgate");

    // A file copy, compared by content.
    let src = dir.path().join("payload.bin");
    std::fs::write(&src, pattern(3 << 20, 42)).unwrap();
    let dst = dir.path().join("copied.bin");
    let o = ssh_cmd("scp", &conf, dir.path())
        .arg("-q")
        .arg(&src)
        .arg(format!("tenant-a-web1:{}", dst.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "scp failed: {}", String::from_utf8_lossy(&o.stderr));
    assert!(sha(&src) == sha(&dst), "copied file differs");

    // An interactive session, idle across a reload.
    let mut child = ssh_cmd("ssh", &conf, dir.path())
        .arg("-T")
        .arg("tenant-a-web1")
        .arg("echo ready; read line; echo got-$line")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    pg.write_config(config.route("other", free_port(), addr(9)));
    assert_eq!(pg.reload()["message"], "config reloaded");
    // Stay idle a moment longer, then use the session.
    let idle_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < idle_until {
        assert!(child.try_wait().unwrap().is_none(), "ssh session ended while idle");
        thread::sleep(Duration::from_millis(100));
    }
    writeln!(child.stdin.as_mut().unwrap(), "after-reload").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "got-after-reload");
    assert!(child.wait().unwrap().success());
    pg.wait_log_n(|l| l.contains("\"message\":\"session closed\""), 3, SOON);
    let ev = pg.events(|v| v["message"] == "session closed" && v["route"] == "tenant-a-web1");
    assert_eq!(ev.len(), 3, "one session line per ssh/scp connection");
    assert!(ev.iter().any(|e| e["bytes_to_target"].as_u64().unwrap() > 3 << 20), "scp bytes counted");
}

/// The test's NLB: accepts on a port, prefixes each connection with a PROXY v2
/// header carrying the AWS VPC endpoint TLV, and relays both ways.
fn fake_nlb(upstream: SocketAddr, endpoint: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut client) = c else { continue };
            let peer = client.peer_addr().unwrap();
            thread::spawn(move || {
                let Ok(mut up) = TcpStream::connect(upstream) else { return };
                let src: SocketAddr = format!("10.20.30.40:{}", peer.port()).parse().unwrap();
                let dst: SocketAddr = "10.0.0.10:8022".parse().unwrap();
                let header = encode_v2(PpCommand::Proxy, Some((src, dst)), Some(endpoint), &[]);
                // Like the NLB: the header goes out with the client's first bytes.
                let mut first = vec![0u8; 4096];
                let n = client.read(&mut first).unwrap_or(0);
                let mut msg = header;
                msg.extend_from_slice(&first[..n]);
                if up.write_all(&msg).is_err() {
                    return;
                }
                let (mut cr, mut uw) = (client.try_clone().unwrap(), up.try_clone().unwrap());
                let t = thread::spawn(move || {
                    let _ = std::io::copy(&mut cr, &mut uw);
                    let _ = uw.shutdown(std::net::Shutdown::Write);
                });
                let _ = std::io::copy(&mut up, &mut client);
                let _ = client.shutdown(std::net::Shutdown::Write);
                let _ = t.join();
            });
        }
    });
    a
}

#[test]
fn ssh_through_a_proxy_v2_hop_with_endpoint_tlv() {
    if !have_openssh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sshd = start_sshd(dir.path());
    let port = free_port();
    let pg = Portgate::start(
        Config::loopback().proxy_required(&["127.0.0.1/32"]).allow(&["10.20.0.0/16"]).with(
            Route::new("via-endpoint", port, addr(sshd.port))
                .set("via", "vpce-0a1b2c3d4e5f67890")
                .set("endpoints", ["vpce-0a1b2c3d4e5f67890"])
                .set("ssh_user", login_user()),
        ),
    );
    let nlb = fake_nlb(addr(port), "vpce-0a1b2c3d4e5f67890");
    // The generated config points at portgate's port; the client goes through the NLB's.
    let conf = generate_ssh_config(&pg, &sshd);
    let text = std::fs::read_to_string(&conf)
        .unwrap()
        .replace(&format!("Port {port}"), &format!("Port {}", nlb.port()));
    std::fs::write(&conf, text).unwrap();
    let o = ssh_cmd("ssh", &conf, dir.path()).arg("via-endpoint").arg("echo via-nlb").output().unwrap();
    assert!(o.status.success(), "ssh through the PROXY hop failed: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "via-nlb");
    let ev = pg.wait_event("session closed", 1);
    assert_eq!(ev["route"], "via-endpoint");
    assert_eq!(ev["endpoint"], "vpce-0a1b2c3d4e5f67890");
    assert!(ev["client"].as_str().unwrap().starts_with("10.20.30.40:"), "{ev}");
}
