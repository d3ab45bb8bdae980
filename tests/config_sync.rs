//! `systemd/portgate-config-sync`, the fleet's config distribution, run for
//! real against a running node: a local directory stands in for the S3
//! prefix. A release is fetched, its checksum and `portgate check` gate it,
//! one symlink swap makes it live and `portgate reload` applies it; a
//! release the node refuses is swapped back; a broken or corrupted one never
//! becomes live.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/portgate-config-sync")
}

/// Publish `version` to `source`: the tarball of `portgate.toml` and
/// `conf.d/`, its sha256 (`corrupt` writes a wrong one), and point `channel` at it.
fn publish(source: &Path, version: &str, main: &str, routes: &str, corrupt: bool) {
    let build = tempfile::tempdir().unwrap();
    std::fs::write(build.path().join("portgate.toml"), main).unwrap();
    std::fs::create_dir(build.path().join("conf.d")).unwrap();
    std::fs::write(build.path().join("conf.d/routes.toml"), routes).unwrap();
    let artefact = source.join(format!("portgate-config-{version}.tar.gz"));
    let st = Command::new("tar")
        .arg("-czf")
        .arg(&artefact)
        .arg("-C")
        .arg(build.path())
        .args(["portgate.toml", "conf.d"])
        .status()
        .unwrap();
    assert!(st.success());
    let sum = Command::new("sha256sum").arg(&artefact).output().unwrap();
    let mut line = String::from_utf8_lossy(&sum.stdout).to_string();
    if corrupt {
        line = format!("{}{}", "0".repeat(64), &line[64..]);
    }
    std::fs::write(source.join(format!("portgate-config-{version}.tar.gz.sha256")), line).unwrap();
    std::fs::write(source.join("fleet"), format!("{version}\n")).unwrap();
}

fn sync(source: &Path, etc: &Path, socket: &Path) -> Output {
    Command::new("bash")
        .arg(script())
        .env("PORTGATE_CONFIG_SOURCE", source)
        .env("PORTGATE_ETC", etc)
        .env("PORTGATE_SOCKET", socket)
        .env("PORTGATE_BIN", BIN)
        .output()
        .unwrap()
}

fn live(etc: &Path) -> String {
    std::fs::read_link(etc.join("live")).unwrap().to_string_lossy().into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn config_sync_swaps_checked_releases_and_rolls_back_a_refused_one() {
    let have = Command::new("tar").arg("--version").output().is_ok()
        && Command::new("sha256sum").arg("--version").output().is_ok();
    if !require("tar and sha256sum", have, "apt-get install tar coreutils") {
        return;
    }
    let source = tempfile::tempdir().unwrap();
    let etc = tempfile::tempdir().unwrap();
    let socket = etc.path().join("control.sock");
    let echo = echo_server();
    let (port_a, port_b, admin) = (free_port(), free_port(), free_port());
    let main = |address: &str| {
        format!(
            "include = [\"conf.d/*.toml\"]\n[listen]\naddress = \"{address}\"\n[access]\nallow = [\"127.0.0.0/8\"]\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n[control]\nsocket = \"{}\"\n[log]\nformat = \"json\"\n",
            socket.display()
        )
    };
    let route =
        |name: &str, port: u16| format!("[[route]]\nname = \"{name}\"\nport = {port}\ntarget = \"{echo}\"\n");

    // v1 before the node runs (as at boot): swapped in, nothing to reload.
    publish(source.path(), "v1", &main("127.0.0.1"), &route("a", port_a), false);
    let o = sync(source.path(), etc.path(), &socket);
    assert!(o.status.success(), "first sync: {}", stderr(&o));
    assert_eq!(live(etc.path()), "releases/v1");
    let config = etc.path().join("portgate.toml");
    let mut child = run_command(&config).spawn().unwrap();
    let logs = LogBuf::capture(child.stderr.take().unwrap());
    let _reaped = Reaped(child);
    logs.wait_from(0, |l| l.contains("portgate ready"), 1, SOON);
    assert_eq!(roundtrip(connect(addr(port_a)), b"a"), b"a");
    // The same channel again: nothing to do.
    let o = sync(source.path(), etc.path(), &socket);
    assert!(o.status.success() && o.stdout.is_empty(), "{}", stderr(&o));

    // v2 adds a route: swapped and reloaded.
    publish(source.path(), "v2", &main("127.0.0.1"), &(route("a", port_a) + &route("b", port_b)), false);
    let o = sync(source.path(), etc.path(), &socket);
    assert!(o.status.success(), "sync v2: {}", stderr(&o));
    assert_eq!(live(etc.path()), "releases/v2");
    assert_eq!(roundtrip(connect(addr(port_b)), b"b"), b"b");

    // v3 fails `portgate check`: never kept, never live.
    publish(source.path(), "v3", &main("127.0.0.1"), "[[route]]\nname = \"c\"\nport = 0\n", false);
    let o = sync(source.path(), etc.path(), &socket);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("fails portgate check"), "{}", stderr(&o));
    assert_eq!(live(etc.path()), "releases/v2");
    assert!(!etc.path().join("releases/v3").exists());

    // v4's checksum does not match: refused before unpacking.
    publish(source.path(), "v4", &main("127.0.0.1"), &route("a", port_a), true);
    let o = sync(source.path(), etc.path(), &socket);
    assert!(!o.status.success() && stderr(&o).contains("sha256"), "{}", stderr(&o));
    assert_eq!(live(etc.path()), "releases/v2");

    // v5 passes check but the running node refuses it (listen.address needs a
    // restart): swapped back to v2, exit 1, the node serves v2 untouched.
    publish(source.path(), "v5", &main("127.0.0.2"), &route("a", port_a), false);
    let o = sync(source.path(), etc.path(), &socket);
    assert!(!o.status.success(), "a refused release must fail the sync");
    assert!(stderr(&o).contains("refused v5; back on releases/v2"), "{}", stderr(&o));
    assert_eq!(live(etc.path()), "releases/v2");
    assert_eq!(roundtrip(connect(addr(port_b)), b"still"), b"still");
    let reloads = logs.events(|v| v["message"] == "config reloaded").len();
    assert_eq!(reloads, 1, "one successful reload (v2)");
}
