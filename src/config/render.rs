//! [`Config`] -> TOML: the *effective* configuration, written out.
//!
//! Every section is written with its effective value (defaults filled in),
//! included routes are inlined, routes are sorted by `(port, via, name)` and
//! each route carries its effective `allow`, `endpoints`, `max_connections`,
//! `tenant`, `max_session` and `source`, so it no longer depends on
//! `[access]`, `[timeouts]` or `[upstream]`. Windows and test times are
//! written in UTC. `[[test]]` tables follow the routes, in file order. [`load`](super::load)
//! accepts the output and gives back an equal [`Config`] (apart from
//! `source`) with the same [`Config::hash`]; `tests/config_props.rs` checks
//! that property on generated configs and the `config` fuzz target on every
//! valid config it finds.
//!
//! Durations are written with [`fmt_duration`] (`"350s"`, `"1500ms"`), except
//! one that it cannot write exactly (a sub-millisecond part, or more
//! milliseconds than a duration string can hold), which is written as seconds
//! plus nanoseconds (`"1s 500ns"`).
//!
//! This module only formats. It must not validate or fill in anything itself:
//! every value it writes comes from the [`Config`], so what it writes cannot
//! drift from what [`load`](super::load) decided.

use std::fmt::Write as _;
use std::time::Duration;

use super::units::fmt_rfc3339;
use super::{fmt_duration, Audit, Config, Expect, LogFormat, ProxyMode, Route};

/// Render `cfg` as a TOML file that [`load`](super::load) accepts back.
pub fn to_toml(cfg: &Config) -> String {
    let mut out = String::new();
    // `writeln!` into a String cannot fail.
    let o = &mut out;
    let _ = writeln!(o, "# Effective portgate configuration: defaults filled in, includes inlined.");
    let _ = writeln!(o, "# Source: {}", cfg.source.display().to_string().replace(['\n', '\r'], " "));

    let _ = writeln!(o, "\n[listen]");
    let _ = writeln!(o, "address = {}", quote(&cfg.listen.address.to_string()));
    if let Some(ports) = cfg.listen.ports {
        let _ = writeln!(o, "ports = {}", quote(&ports.to_string()));
    }

    let pp = &cfg.proxy_protocol;
    let _ = writeln!(o, "\n[proxy_protocol]");
    let mode = match pp.mode {
        ProxyMode::Off => "off",
        ProxyMode::Required => "required",
    };
    let _ = writeln!(o, "mode = {}", quote(mode));
    let _ = writeln!(o, "trusted = {}", list(&pp.trusted));
    let _ = writeln!(o, "header_timeout = {}", quote(&duration(pp.header_timeout)));

    let ka = &cfg.keepalive;
    let _ = writeln!(o, "\n[keepalive]");
    let _ = writeln!(o, "time = {}", quote(&duration(ka.time)));
    let _ = writeln!(o, "interval = {}", quote(&duration(ka.interval)));
    let _ = writeln!(o, "retries = {}", ka.retries);
    let _ = writeln!(o, "idle_timeout_limit = {}", quote(&duration(ka.idle_timeout_limit)));

    let t = &cfg.timeouts;
    let _ = writeln!(o, "\n[timeouts]");
    let _ = writeln!(o, "connect = {}", quote(&duration(t.connect)));
    let idle = t.idle.map_or_else(|| "off".to_owned(), duration);
    let _ = writeln!(o, "idle = {}", quote(&idle));
    let _ = writeln!(o, "shutdown_delay = {}", quote(&duration(t.shutdown_delay)));
    let _ = writeln!(o, "drain = {}", quote(&duration(t.drain)));
    let _ = writeln!(o, "revoke_grace = {}", quote(&duration(t.revoke_grace)));
    let _ = writeln!(o, "max_session = {}", quote(&off_or(t.max_session)));

    let _ = writeln!(o, "\n[admin]");
    let admin = cfg.admin.listen.map_or_else(|| "off".to_owned(), |a| a.to_string());
    let _ = writeln!(o, "listen = {}", quote(&admin));

    let _ = writeln!(o, "\n[log]");
    let format = match cfg.log.format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    let _ = writeln!(o, "format = {}", quote(format));
    let _ = writeln!(o, "level = {}", quote(&cfg.log.level));
    let _ = writeln!(o, "queue_lines = {}", cfg.log.queue_lines);
    let audit = match cfg.log.audit {
        Audit::BestEffort => "best_effort",
        Audit::Required => "required",
    };
    let _ = writeln!(o, "audit = {}", quote(audit));

    let _ = writeln!(o, "\n[control]");
    let socket = cfg.control.socket.as_ref().map_or_else(|| "off".to_owned(), |p| p.display().to_string());
    let _ = writeln!(o, "socket = {}", quote(&socket));

    // Routes carry their effective values; [access] is kept for what it
    // still decides (max_per_source) and for the reader.
    let acc = &cfg.access;
    let _ = writeln!(o, "\n[access]");
    if let Some(allow) = &acc.allow {
        let _ = writeln!(o, "allow = {}", list(allow));
    }
    let _ = writeln!(o, "endpoints = {}", list(&acc.endpoints));
    let _ = writeln!(o, "max_connections = {}", acc.max_connections);
    let _ = writeln!(o, "max_per_source = {}", acc.max_per_source);

    if !cfg.upstream.source.is_empty() {
        let _ = writeln!(o, "\n[upstream]");
        let _ = writeln!(o, "source = {}", list(&cfg.upstream.source));
    }

    let mut routes: Vec<&Route> = cfg.routes.iter().map(|r| r.as_ref()).collect();
    routes.sort_by(|a, b| (a.port, &a.via, &a.name).cmp(&(b.port, &b.via, &b.name)));
    for r in routes {
        let _ = writeln!(o, "\n[[route]]");
        let _ = writeln!(o, "name = {}", quote(&r.name));
        let _ = writeln!(o, "port = {}", r.port);
        if let Some(via) = &r.via {
            let _ = writeln!(o, "via = {}", quote(via));
        }
        let _ = writeln!(o, "target = {}", quote(&r.target.to_string()));
        let _ = writeln!(o, "tenant = {}", quote(&r.tenant));
        let _ = writeln!(o, "allow = {}", list(&r.allow));
        let _ = writeln!(o, "endpoints = {}", list(&r.endpoints));
        let _ = writeln!(o, "max_connections = {}", r.max_connections);
        if let Some(user) = &r.ssh_user {
            let _ = writeln!(o, "ssh_user = {}", quote(user));
        }
        if let Some(t) = r.not_before {
            let _ = writeln!(o, "not_before = {}", quote(&fmt_rfc3339(t)));
        }
        if let Some(t) = r.not_after {
            let _ = writeln!(o, "not_after = {}", quote(&fmt_rfc3339(t)));
        }
        // Written when it differs from the default, "off" included.
        if r.max_session != cfg.timeouts.max_session {
            let _ = writeln!(o, "max_session = {}", quote(&off_or(r.max_session)));
        }
        if !r.source.is_empty() {
            let _ = writeln!(o, "source = {}", list(&r.source));
        }
    }

    for test in &cfg.tests {
        let _ = writeln!(o, "\n[[test]]");
        let _ = writeln!(o, "port = {}", test.port);
        let _ = writeln!(o, "client = {}", quote(&test.client.to_string()));
        if let Some(e) = &test.endpoint {
            let _ = writeln!(o, "endpoint = {}", quote(e));
        }
        if let Some(at) = test.at {
            let _ = writeln!(o, "at = {}", quote(&fmt_rfc3339(at)));
        }
        match &test.expect {
            Expect::Admit { route } => {
                let _ = writeln!(o, "expect = \"admit\"");
                if let Some(r) = route {
                    let _ = writeln!(o, "route = {}", quote(r));
                }
            }
            Expect::Reject { reason } => {
                let _ = writeln!(o, "expect = \"reject\"");
                if let Some(r) = reason {
                    let _ = writeln!(o, "reason = {}", quote(r));
                }
            }
        }
    }
    out
}

/// `"off"` or the duration.
fn off_or(d: Option<Duration>) -> String {
    d.map_or_else(|| "off".to_owned(), duration)
}

/// A duration string that parses back to exactly `d`.
fn duration(d: Duration) -> String {
    let nanos = d.subsec_nanos();
    let exact_millis = nanos % 1_000_000 == 0 && u64::try_from(d.as_millis()).is_ok();
    if exact_millis {
        fmt_duration(d)
    } else if d.as_secs() == 0 {
        format!("{nanos}ns")
    } else {
        format!("{}s {nanos}ns", d.as_secs())
    }
}

/// A TOML array of basic strings.
fn list<T: ToString>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(|i| quote(&i.to_string())).collect();
    format!("[{}]", items.join(", "))
}

/// A TOML basic string: `"` and `\` escaped, and every control character
/// (which TOML does not allow raw in a basic string).
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load, ConfigError};
    use std::path::{Path, PathBuf};

    fn load_str(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("portgate.toml");
        std::fs::write(&p, text).unwrap();
        load(&p)
    }

    /// `to_toml(cfg)` loads back to `cfg` (source aside) with the same hash.
    fn round_trip(cfg: &Config) -> String {
        let text = to_toml(cfg);
        let mut back =
            load_str(&text).unwrap_or_else(|e| panic!("rendered config invalid:\n{e}\n---\n{text}"));
        back.source = cfg.source.clone();
        assert_eq!(&back, cfg, "round trip changed the config:\n{text}");
        assert_eq!(back.hash(), cfg.hash());
        // Rendering is a fixed point.
        assert_eq!(to_toml(&back), text);
        text
    }

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    #[test]
    fn shipped_configs_round_trip() {
        for rel in [
            "tests/fixtures/valid/full.toml",
            "tests/fixtures/valid/minimal.toml",
            "tests/fixtures/valid/windows.toml",
            "config/portgate.example.toml",
        ] {
            let cfg = load(&fixture(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
            let text = round_trip(&cfg);
            assert!(!text.lines().any(|l| l.starts_with("include")), "includes are inlined: {text}");
        }
    }

    #[test]
    fn full_fixture_renders_effective_values() {
        let cfg = load(&fixture("tests/fixtures/valid/full.toml")).unwrap();
        let text = to_toml(&cfg);
        // The included route, with the inherited [access] values written out.
        let db = "[[route]]\nname = \"tenant-a-db\"\nport = 8032\ntarget = \"db1.tenant-a.internal:5432\"\n\
                  tenant = \"tenant-a\"\nallow = [\"172.31.0.0/16\", \"2001:db8::/32\"]\n\
                  endpoints = [\"vpce-0a1b2c3d4e5f67890\"]\nmax_connections = 10\n";
        assert!(text.contains(db), "{text}");
        // Durations as fmt_duration writes them.
        assert!(text.contains("connect = \"1500ms\"\n"), "{text}");
        assert!(text.contains("drain = \"300s\"\n"), "{text}");
        assert!(text.contains("idle = \"28800s\"\n"), "{text}");
        assert!(text.contains("listen = \"[::1]:9090\"\n"), "{text}");
        // Sorted by port, then via.
        let a = text.find("name = \"tenant-a-web1\"").unwrap();
        let b = text.find("name = \"tenant-b-web1\"").unwrap();
        let db = text.find("name = \"tenant-a-db\"").unwrap();
        assert!(a < b && b < db, "{text}");
    }

    #[test]
    fn defaults_are_written_out() {
        let cfg = load_str("").unwrap();
        let text = round_trip(&cfg);
        for line in [
            "address = \"0.0.0.0\"",
            "mode = \"off\"",
            "trusted = []",
            "header_timeout = \"5s\"",
            "time = \"60s\"",
            "interval = \"15s\"",
            "retries = 4",
            "idle_timeout_limit = \"350s\"",
            "connect = \"5s\"",
            "idle = \"off\"",
            "shutdown_delay = \"0s\"",
            "drain = \"30s\"",
            "revoke_grace = \"30s\"",
            "listen = \"127.0.0.1:14090\"",
            "format = \"text\"",
            "level = \"info\"",
            "endpoints = []",
            "max_connections = 0",
            "max_per_source = 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("ports ="), "{text}");
        assert!(!text.contains("allow ="), "{text}");
    }

    #[test]
    fn awkward_values_round_trip() {
        let cfg = load_str(
            "[admin]\nlisten = \"off\"\n[log]\nlevel = \"portgate=debug,info\"\n\
             [timeouts]\nconnect = \"1500us\"\nidle = \"1m 30s 7ns\"\nshutdown_delay = \"0s\"\n\
             [access]\nallow = [\"10.0.0.1\", \"::1\"]\n\
             [[route]]\nname = \"a\"\nport = 1\ntarget = \"[fe80::1%2]:22\"\ntenant = \"t \\\"q\\\" \\\\ \\u0001 \\u007f é\\n\"\n\
             ssh_user = \"ec2-user\\\\x\"\n\
             [[route]]\nname = \"b\"\nport = 65535\ntarget = \"db-1.internal:5432\"\nendpoints = []\n",
        )
        .unwrap();
        assert_eq!(cfg.timeouts.connect, Duration::from_micros(1500));
        let text = round_trip(&cfg);
        assert!(text.contains("connect = \"1500000ns\"\n"), "{text}");
        assert!(text.contains("idle = \"90s 7ns\"\n"), "{text}");
        assert!(text.contains("listen = \"off\"\n"), "{text}");
        assert!(text.contains("allow = [\"10.0.0.1/32\", \"::1/128\"]"), "{text}");
    }

    #[test]
    fn durations_parse_back_exactly() {
        for d in [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_micros(1500),
            Duration::from_millis(1500),
            Duration::from_secs(350),
            Duration::new(7, 1),
            Duration::new(u64::MAX, 1_000_000),
            Duration::new(u64::MAX, 999_999_999),
            Duration::MAX,
        ] {
            let s = duration(d);
            assert_eq!(humantime::parse_duration(&s), Ok(d), "{s}");
        }
        assert_eq!(duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(duration(Duration::from_secs(60)), "60s");
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("plain"), "\"plain\"");
        assert_eq!(quote("a\"b\\c\nd\te\u{1}\u{7f}é"), "\"a\\\"b\\\\c\\nd\\te\\u0001\\u007Fé\"");
    }
}
