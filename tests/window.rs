//! Access windows and `[[test]]` tables, end to end with the real binary:
//! refusals with `reason="outside_window"` (counted and logged), windows
//! written with offsets other than `Z`, `check`'s test count and its
//! ended-window warning, and a failing test refused alike by `check`, `run`,
//! SIGHUP and `portgate reload` (the old config serving on).
//!
//! Windows are set an hour or more away from now, so no assertion depends
//! on how fast the test runs.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use common::*;
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

const HOUR: Duration = Duration::from_secs(3600);

/// `t` in RFC 3339 at the offset `hours` east of UTC (`Z` for 0).
fn rfc3339(t: SystemTime, hours: i8) -> String {
    let offset = UtcOffset::from_hms(hours, 0, 0).unwrap();
    OffsetDateTime::from(t).to_offset(offset).format(&Rfc3339).unwrap()
}

/// Send a byte (so the node does not take it for a probe), then expect
/// the connection to be closed without an answer.
fn refused(mut s: std::net::TcpStream) {
    use std::io::Write;
    s.write_all(b"SSH-2.0-test\r\n").unwrap();
    expect_closed(s);
}

fn now() -> SystemTime {
    SystemTime::now()
}

fn portgate(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUNTIME_DIRECTORY")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run portgate")
}

fn out(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn write(dir: &Path, name: &str, text: impl std::fmt::Display) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, text.to_string()).unwrap();
    p
}

#[test]
fn outside_the_window_is_refused_with_outside_window() {
    let echo = echo_server();
    let base = free_ports(3);
    let (future, past, open) = (base, base + 1, base + 2);
    let cfg = Config::loopback()
        // Not yet open, written in +09:00.
        .with(Route::new("future", future, echo).set("not_before", rfc3339(now() + HOUR, 9)))
        // Ended an hour ago, written in -05:00.
        .with(Route::new("past", past, echo).set("not_after", rfc3339(now() - HOUR, -5)))
        // Open now: from an hour ago (+01:00) to an hour ahead (Z).
        .with(
            Route::new("open", open, echo)
                .set("not_before", rfc3339(now() - HOUR, 1))
                .set("not_after", rfc3339(now() + HOUR, 0)),
        );
    let pg = Portgate::start(cfg);

    assert_eq!(roundtrip(connect(addr(open)), b"in the window"), b"in the window");
    for (port, route) in [(future, "future"), (past, "past")] {
        refused(connect(addr(port)));
        let line = pg.wait_log(
            |l| l.contains("connection rejected") && l.contains(&format!("\"route\":\"{route}\"")),
            SOON,
        );
        let ev = parse(&line);
        assert_eq!(ev["reason"], "outside_window", "{ev}");
        assert_eq!(ev["port"], port, "{ev}");
        pg.wait_metric(
            &format!("portgate_connections_rejected_total{{route=\"{route}\",reason=\"outside_window\"}}"),
            1.0,
        );
        // No target was dialed for it.
        assert_eq!(
            pg.metric(&format!(
                "portgate_connections_accepted_total{{route=\"{route}\",tenant=\"{route}\"}}"
            )),
            Some(0.0)
        );
    }
    assert_eq!(
        pg.metric("portgate_connections_rejected_total{route=\"open\",reason=\"outside_window\"}"),
        Some(0.0),
        "the series exists from startup"
    );
}

#[test]
fn the_window_comes_after_source_and_endpoint_in_the_admission_order() {
    let echo = echo_server();
    let port = free_port();
    let cfg = Config::loopback().with(
        Route::new("closed", port, echo)
            .set("allow", ["127.0.0.5/32"])
            .set("not_after", rfc3339(now() - HOUR, 0)),
    );
    let pg = Portgate::start(cfg);
    // From 127.0.0.1: the source is refused first.
    refused(connect(addr(port)));
    pg.wait_metric(
        "portgate_connections_rejected_total{route=\"closed\",reason=\"source_not_allowed\"}",
        1.0,
    );
    // From 127.0.0.5: the source passes, the window refuses.
    refused(connect_from("127.0.0.5", addr(port)));
    pg.wait_metric("portgate_connections_rejected_total{route=\"closed\",reason=\"outside_window\"}", 1.0);
}

#[test]
fn check_counts_the_tests_in_every_file_and_warns_about_ended_windows() {
    let dir = tempfile::tempdir().unwrap();
    let echo = "127.0.0.1:9";
    let main = Config::loopback()
        .top("include", ["conf.d/*.toml"])
        .with(Route::new("web", 8022, echo))
        .with(Route::new("stale", 8023, echo).set("not_after", rfc3339(now() - 24 * HOUR, 9)))
        .test(Test::admit(8022, "127.0.0.9").set("route", "web"))
        .test(Test::reject(8023, "127.0.0.9").set("reason", "outside_window"));
    let main = write(dir.path(), "portgate.toml", main);
    write(dir.path(), "conf.d/more.toml", Test::reject(8022, "10.0.0.1").set("reason", "source_not_allowed"));
    let o = portgate(&["check", "-c", main.to_str().unwrap()]);
    let (stdout, stderr) = out(&o);
    assert_eq!(o.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("3 tests passed"), "{stdout}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("route \"stale\"") && warnings[0].contains("ended"), "{stderr}");
    // One test: singular. No ended window: no warning.
    let one = Config::loopback().with(Route::new("web", 8022, echo)).test(Test::admit(8022, "127.0.0.9"));
    let one = write(dir.path(), "one.toml", one);
    let o = portgate(&["check", "-c", one.to_str().unwrap()]);
    let (stdout, stderr) = out(&o);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains(" 1 test passed"), "{stdout}");
    assert!(!stderr.contains("warning"), "{stderr}");
    // routes shows the window.
    let o = portgate(&["routes", "-c", main.to_str().unwrap()]);
    let (stdout, _) = out(&o);
    let stale = stdout.lines().find(|l| l.contains("stale")).unwrap();
    let ended = rfc3339(now() - 24 * HOUR, 0);
    assert!(stale.contains(&format!("..{}", &ended[..13])), "{stdout}");
}

/// A config whose `[[test]]`s fail: one in the main file (header on line
/// `main_line`), one in `conf.d/more.toml` (line 1). Returns the main file.
fn failing(dir: &Path, port: u16, echo: std::net::SocketAddr) -> (std::path::PathBuf, Vec<String>) {
    let cfg = Config::loopback()
        .top("include", ["conf.d/*.toml"])
        .with(Route::new("web", port, echo).set("allow", ["127.0.0.0/24"]))
        .test(Test::admit(port, "127.0.0.9").set("route", "web"))
        .test(Test::admit(port, "127.0.1.9").set("route", "web"));
    let text = cfg.to_string();
    let main = write(dir, "portgate.toml", &text);
    let inc = write(dir, "conf.d/more.toml", Test::reject(port, "127.0.0.9"));
    // The second [[test]] header of the main file.
    let line = text.lines().enumerate().filter(|(_, l)| *l == "[[test]]").nth(1).unwrap().0 + 1;
    let want = vec![
        format!(
            "{}:{line}:1: test expects admit by route \"web\", got reject: source_not_allowed",
            main.display()
        ),
        format!("{}:1:1: test expects reject, got admit by route \"web\"", inc.display()),
    ];
    (main, want)
}

#[test]
fn a_failing_test_is_an_error_at_its_header_in_the_main_file_and_in_an_include() {
    let dir = tempfile::tempdir().unwrap();
    let (main, want) = failing(dir.path(), 8022, addr(9));
    let o = portgate(&["check", "-c", main.to_str().unwrap()]);
    let (stdout, stderr) = out(&o);
    assert_eq!(o.status.code(), Some(1), "{stdout}{stderr}");
    let problems: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("portgate: ")).collect();
    assert_eq!(problems, want, "{stderr}");
}

#[test]
fn run_refuses_to_start_with_a_failing_test() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (main, want) = failing(dir.path(), port, addr(9));
    let o = portgate(&["run", "-c", main.to_str().unwrap()]);
    let (_, stderr) = out(&o);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    for w in &want {
        assert!(stderr.contains(w.as_str()), "missing {w:?} in {stderr}");
    }
    // Nothing was bound.
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
}

#[test]
fn reload_refuses_a_failing_test_and_the_old_config_serves() {
    let echo = echo_server();
    let port = free_port();
    let good = Config::loopback()
        .set("control", "socket", "control.sock")
        .with(Route::new("web", port, echo))
        .test(Test::admit(port, "127.0.0.9").set("route", "web"));
    let pg = Portgate::start(&good);
    let bad = good.clone().test(Test::reject(port, "127.0.0.9").set("reason", "source_not_allowed"));
    pg.write_config(&bad);
    let text = std::fs::read_to_string(&pg.config_path).unwrap();
    let line = text.lines().enumerate().filter(|(_, l)| *l == "[[test]]").nth(1).unwrap().0 + 1;
    let want = format!(
        "{}:{line}:1: test expects reject: source_not_allowed, got admit by route \"web\"",
        pg.config_path.display()
    );

    // SIGHUP.
    let outcome = pg.reload();
    assert_eq!(outcome["message"], "config reload failed; still serving the previous config");
    assert_eq!(outcome["reason"], want.as_str());
    // portgate reload over the control socket: the same message, exit 1.
    let o = portgate(&["reload", "-c", pg.config_path.to_str().unwrap()]);
    let (stdout, stderr) = out(&o);
    assert_eq!(o.status.code(), Some(1), "{stdout}{stderr}");
    let problems: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("portgate: ")).collect();
    assert_eq!(problems, [want.as_str()], "{stderr}");
    pg.wait_metric("portgate_config_reloads_total{result=\"failure\"}", 2.0);
    assert_eq!(pg.metric("portgate_config_last_reload_success"), Some(0.0));
    // The old config serves on.
    assert_eq!(roundtrip(connect(addr(port)), b"still here"), b"still here");
    // Fixed: applied.
    pg.write_config(good.test(Test::admit(port, "127.0.0.10")));
    let o = portgate(&["reload", "-c", pg.config_path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{:?}", out(&o));
}

#[test]
fn a_reload_that_moves_the_window_away_from_a_session_revokes_it() {
    let echo = echo_server();
    let port = free_port();
    let route = |nb: SystemTime, na: SystemTime| {
        Route::new("web", port, echo).set("not_before", rfc3339(nb, 9)).set("not_after", rfc3339(na, 0))
    };
    let base =
        Config::loopback().set("control", "socket", "control.sock").set("timeouts", "revoke_grace", "100ms");
    let pg = Portgate::start(base.clone().with(route(now() - HOUR, now() + HOUR)));
    let mut s = connect(addr(port));
    use std::io::{Read, Write};
    s.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();

    let reload = || {
        let o = portgate(&["reload", "-c", pg.config_path.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(0), "{:?}", out(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    // not_after moved to a later instant: the session is still inside.
    pg.write_config(base.clone().with(route(now() - HOUR, now() + 2 * HOUR)));
    assert!(reload().contains("revoking 0"));
    // The window moved to tomorrow: the session is outside it now.
    pg.write_config(base.with(route(now() + 24 * HOUR, now() + 25 * HOUR)));
    assert!(reload().contains("revoking 1"));
    let closed = pg.wait_event("session closed", 1);
    assert_eq!(closed["close"], "revoked", "{closed}");
    assert_eq!(closed["route"], "web");
    expect_closed(s);
}
