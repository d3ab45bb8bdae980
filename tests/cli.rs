//! The command line: exit codes, `check`, `routes`, `ssh-config` (checked by
//! the real OpenSSH client), and the shipped files (example config, unit).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{require, BIN};

fn portgate(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env_remove("RUST_LOG").output().expect("run portgate")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

const VALID: &str = r#"
[listen]
address = "127.0.0.1"
ports = "8000-8049"
[access]
allow = ["10.0.0.0/8"]
[[route]]
name = "web1"
port = 8022
target = "172.31.31.84:22"
tenant = "tenant-a"
ssh_user = "ec2-user"
[[route]]
name = "db1"
port = 8032
target = "172.31.31.85:5432"
tenant = "tenant-b"
[[route]]
name = "rdp1"
port = 8033
target = "[2001:db8::5]:3389"
tenant = "tenant-b"
allow = ["10.1.0.0/16", "2001:db8::/32"]
max_connections = 2
"#;

#[test]
fn version_help_and_usage_errors() {
    let o = portgate(&["--version"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(text(&o).0.contains(env!("CARGO_PKG_VERSION")));
    assert_eq!(portgate(&["--help"]).status.code(), Some(0));
    assert_eq!(portgate(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(portgate(&["check", "--bogus"]).status.code(), Some(2));
    assert_eq!(portgate(&["ssh-config"]).status.code(), Some(2), "--host is required");
}

#[test]
fn check_valid_prints_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "p.toml", VALID);
    let o = portgate(&["check", "-c", cfg.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(out.contains("OK"), "{out}");
    assert!(out.contains("3 on 3 ports, 2 tenants"), "{out}");
    assert!(out.contains("8000-8049 (50 bound)"), "{out}");
    assert!(out.contains("hash:"), "{out}");
}

#[test]
fn check_invalid_reports_every_problem_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "bad.toml",
        "[listen]\nports = \"8000-8049\"\n[access]\nallow = [\"10.0.0.0/33\"]\n[[route]]\nname = \"a\"\nport = 9000\ntarget = \"10.0.0.1:22\"\n[keepalive]\ntime = \"400s\"\n",
    );
    let o = portgate(&["check", "-c", cfg.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("bad.toml:4:"), "CIDR problem located on line 4: {err}");
    assert!(err.contains("bad.toml:7:"), "port outside the range located on line 7: {err}");
    assert!(err.contains("bad.toml:10:") || err.contains("400s"), "keepalive problem: {err}");
    assert!(err.lines().count() >= 3, "one line per problem: {err}");
}

#[test]
fn check_missing_file_fails_clearly() {
    let o = portgate(&["check", "-c", "/nonexistent/portgate.toml"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("/nonexistent/portgate.toml"), "{err}");
}

#[test]
fn run_with_invalid_config_exits_1_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let cfg = write(
        dir.path(),
        "bad.toml",
        &format!("[listen]\naddress = \"127.0.0.1\"\n[[route]]\nname = \"a\"\nport = {port}\ntarget = \"127.0.0.1:1\"\n"),
    );
    let o = portgate(&["run", "-c", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("allow"), "names the missing allow rule: {}", text(&o).1);
}

#[test]
fn run_fails_with_exit_1_when_a_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "p.toml",
        &format!(
            "[listen]\naddress = \"127.0.0.1\"\n[admin]\nlisten = \"off\"\n[access]\nallow = [\"127.0.0.0/8\"]\n[[route]]\nname = \"a\"\nport = {port}\ntarget = \"127.0.0.1:1\"\n"
        ),
    );
    let o = portgate(&["run", "-c", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains(&format!("port {port}")), "{}", text(&o).1);
}

#[test]
fn routes_prints_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "p.toml", VALID);
    let o = portgate(&["routes", "-c", cfg.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("PORT"), "{out}");
    assert_eq!(lines.len(), 4, "{out}");
    assert!(
        lines[1].starts_with("8022") && lines[1].contains("web1") && lines[1].contains("172.31.31.84:22")
    );
    assert!(lines[3].contains("[2001:db8::5]:3389") && lines[3].contains("10.1.0.0/16,2001:db8::/32"));
}

#[test]
fn shipped_example_config_is_valid() {
    let o = portgate(&["check", "-c", repo("config/portgate.example.toml").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
}

fn ssh_g(file: &Path, alias: &str) -> String {
    let o = Command::new("ssh").arg("-G").arg("-F").arg(file).arg(alias).output().expect("ssh -G");
    assert!(o.status.success(), "ssh -G rejected the file: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn ssh_config_is_accepted_by_openssh() {
    let have_ssh = Command::new("ssh").arg("-V").output().is_ok();
    if !require("the OpenSSH client (ssh)", have_ssh, "apt-get install openssh-client") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "p.toml", VALID);
    let out = dir.path().join("ssh dir").join("portgate.conf");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let o = portgate(&[
        "ssh-config",
        "-c",
        cfg.to_str().unwrap(),
        "--host",
        "nlb.example.internal",
        "--user",
        "ops",
        "--identity-file",
        "/keys/my key",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
    let g = ssh_g(&out, "web1");
    assert!(g.contains("\nhostname nlb.example.internal\n"), "{g}");
    assert!(g.contains("\nport 8022\n"), "{g}");
    assert!(g.contains("\nuser ec2-user\n"), "ssh_user wins over --user: {g}");
    assert!(g.contains("\nhostkeyalias web1\n"), "{g}");
    assert!(g.contains("identityfile \"/keys/my key\"") || g.contains("identityfile /keys/my key"), "{g}");
    let alive: u64 =
        g.lines().find_map(|l| l.strip_prefix("serveraliveinterval ")).and_then(|v| v.parse().ok()).unwrap();
    assert!(alive > 0 && alive < 350, "ServerAliveInterval below the idle timeout: {alive}");
    // db1 targets port 5432 without ssh_user: not an SSH route.
    let text_out = std::fs::read_to_string(&out).unwrap();
    assert!(!text_out.contains("Host db1"));
    assert!(text_out.starts_with("# Generated by `portgate ssh-config` from"));
    // No temporary file left behind.
    assert_eq!(std::fs::read_dir(out.parent().unwrap()).unwrap().count(), 1);
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let probe = Command::new("systemd-analyze").arg("--version").output();
    if !require("systemd-analyze", probe.is_ok(), "apt-get install systemd") {
        return;
    }
    assert!(probe.unwrap().status.success());
    let unit = std::fs::read_to_string(repo("systemd/portgate.service")).unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("ExecReload=") && unit.contains("WatchdogSec="));
    // The fleet's config sync: a oneshot service, its timer, and the script.
    let sync = std::fs::read_to_string(repo("systemd/portgate-config-sync.service")).unwrap();
    let timer = std::fs::read_to_string(repo("systemd/portgate-config-sync.timer")).unwrap();
    assert!(sync.contains("Type=oneshot") && sync.contains("ExecStart=/usr/local/bin/portgate-config-sync"));
    assert!(timer.contains("OnUnitActiveSec=") && timer.contains("RandomizedDelaySec="));
    // verify checks that each ExecStart binary exists: point them at the built
    // binary and the repository's script.
    let script = repo("systemd/portgate-config-sync");
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (name, text) in [
        ("portgate.service", unit.replace("/usr/local/bin/portgate", BIN)),
        (
            "portgate-config-sync.service",
            sync.replace("/usr/local/bin/portgate-config-sync", script.to_str().unwrap()),
        ),
        ("portgate-config-sync.timer", timer),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        paths.push(path);
    }
    let o = Command::new("systemd-analyze").arg("verify").args(&paths).output().unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    // Unknown or misspelled keys are only warnings: treat any line about a unit as a failure.
    let about_units: Vec<&str> = err.lines().chain(out.lines()).filter(|l| l.contains("portgate")).collect();
    assert!(about_units.is_empty(), "systemd-analyze complained: {about_units:?}");
}
