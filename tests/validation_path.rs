//! One validation path (SPEC "Reload validates exactly what check
//! validates"): for every class of config problem, `portgate check` and a
//! SIGHUP reload of a running node refuse with the same messages; and a
//! config that `check` accepts, reload applies.

mod common;

use std::process::Command;

use common::*;

/// The node's own sections, so the harness keeps reading JSON lines.
fn harness(admin: std::net::SocketAddr, log_extra: &str) -> String {
    format!("[admin]\nlisten = \"{admin}\"\n[log]\nformat = \"json\"\n{log_extra}")
}

fn route(port: u16) -> String {
    format!("[access]\nallow = [\"127.0.0.0/8\"]\n[[route]]\nname = \"a\"\nport = {port}\ntarget = \"127.0.0.1:9\"\n")
}

/// `portgate check`'s problem lines (without the closing count line).
fn check(path: &std::path::Path) -> (bool, Vec<String>) {
    let out = Command::new(BIN).arg("check").arg("-c").arg(path).output().expect("run check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines = stderr.lines().filter(|l| !l.starts_with("portgate: ")).map(str::to_owned).collect();
    (out.status.success(), lines)
}

#[test]
fn check_and_reload_refuse_every_problem_class_with_the_same_messages() {
    let port = free_port();
    let pg = Portgate::start(route(port));
    let h = |extra: &str| harness(pg.admin, extra);
    let r = route(port);
    let classes: Vec<(&str, String)> = vec![
        ("toml syntax", format!("{}{r}[[route]\n", h(""))),
        ("unknown key", format!("{}{r}[listen]\nbogus = 1\n", h(""))),
        ("bad duration", format!("{}{r}[timeouts]\nconnect = \"5 parsecs\"\n", h(""))),
        ("bad cidr", format!("{}[[route]]\nname = \"a\"\nport = {port}\ntarget = \"127.0.0.1:9\"\nallow = [\"10.0.0.0/33\"]\n", h(""))),
        ("no allow rule", format!("{}[[route]]\nname = \"a\"\nport = {port}\ntarget = \"127.0.0.1:9\"\n", h(""))),
        (
            "duplicate names",
            format!("{}{r}[[route]]\nname = \"a\"\nport = {}\ntarget = \"127.0.0.1:9\"\n", h(""), port + 1),
        ),
        ("port outside range", format!("{}{r}[listen]\nports = \"1-2\"\n", h(""))),
        ("keepalive above idle limit", format!("{}{r}[keepalive]\ntime = \"400s\"\n", h(""))),
        ("via without proxy", format!("{}{r}[[route]]\nname = \"b\"\nport = {port}\nvia = \"vpce-0a1b2c3d4e5f67890\"\ntarget = \"127.0.0.1:9\"\n", h(""))),
        ("missing include", format!("include = [\"nowhere.toml\"]\n{}{r}", h(""))),
        ("invalid log level", format!("{}{r}", h("level = \"portgate=loud\"\n"))),
        ("log queue too small", format!("{}{r}", h("queue_lines = 10\n"))),
        ("unknown audit mode", format!("{}{r}", h("audit = \"maybe\"\n"))),
    ];
    for (class, text) in &classes {
        std::fs::write(&pg.config_path, text).unwrap();
        let (ok, lines) = check(&pg.config_path);
        assert!(!ok, "{class}: check accepted it");
        assert!(!lines.is_empty(), "{class}: check said nothing");
        assert!(
            lines.iter().all(|l| l.contains(&*pg.config_path.to_string_lossy()) || l.starts_with("route ")),
            "{class}: a problem without its file: {lines:?}"
        );
        let outcome = pg.reload();
        assert_eq!(
            outcome["message"], "config reload failed; still serving the previous config",
            "{class}: reload accepted what check refused"
        );
        assert_eq!(outcome["reason"].as_str().unwrap_or(""), lines.join("; "), "{class}: different messages");
    }
    // And the other way round: what check accepts, reload applies.
    let good = format!(
        "{}{}",
        h("level = \"portgate=debug,info\"\nqueue_lines = 64\naudit = \"required\"\n"),
        route(port)
    );
    std::fs::write(&pg.config_path, &good).unwrap();
    let (ok, lines) = check(&pg.config_path);
    assert!(ok, "check refused a valid config: {lines:?}");
    assert_eq!(pg.reload()["message"], "config reloaded");
}

#[test]
fn an_invalid_log_level_is_located() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portgate.toml");
    std::fs::write(&path, format!("{}[log]\nlevel = \"portgate=loud\"\n", route(free_port()))).unwrap();
    let (ok, lines) = check(&path);
    assert!(!ok);
    let want = format!("{}:8:9: log.level \"portgate=loud\" is not a valid filter", path.display());
    assert!(lines.iter().any(|l| l.starts_with(&want)), "{lines:?}");
}
