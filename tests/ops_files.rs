//! The operations files: Prometheus alert rules and their unit tests
//! (`promtool`), the Grafana dashboard's queries, and the CloudFormation
//! template (`cfn-lint`, and the systemd unit it carries in its UserData).
//!
//! Every metric name a query mentions must be one portgate exports, so a
//! renamed metric breaks this test instead of a dashboard at 3 a.m.
//!
//! External tools (`promtool`, `cfn-lint`) go through the harness's one skip
//! guard, [`common::require`]: missing, they skip with a line saying so, and
//! fail the test under `CI`.

mod common;

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Every metric family portgate exports (SPEC.md "Admin HTTP" and the README's additions).
const KNOWN_METRICS: &[&str] = &[
    "portgate_connections_accepted_total",
    "portgate_connections_rejected_total",
    "portgate_connections_active",
    "portgate_upstream_connect_errors_total",
    "portgate_upstream_connect_duration_seconds",
    "portgate_session_duration_seconds",
    "portgate_bytes_total",
    "portgate_health_checks_total",
    "portgate_config_reloads_total",
    "portgate_config_last_reload_success",
    "portgate_config_info",
    "portgate_routes",
    "portgate_build_info",
    "portgate_process_open_fds",
    "portgate_process_max_fds",
    "portgate_log_lines_dropped_total",
];

/// Histogram families, whose series carry these suffixes.
const HISTOGRAMS: &[&str] =
    &["portgate_upstream_connect_duration_seconds", "portgate_session_duration_seconds"];

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn read(p: &str) -> String {
    std::fs::read_to_string(repo(p)).unwrap_or_else(|e| panic!("read {p}: {e}"))
}

/// Runs `program args` in the repository; `None` when the program does not exist.
fn run(program: &str, args: &[&str]) -> Option<Output> {
    match Command::new(program).args(args).current_dir(repo("")).output() {
        Ok(o) => Some(o),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => panic!("run {program}: {e}"),
    }
}

fn describe(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn promtool(args: &[&str]) -> Option<Output> {
    let out = run("promtool", args);
    if common::require("promtool", out.is_some(), "apt-get install prometheus") {
        out
    } else {
        None
    }
}

/// `portgate_[a-z_]+` tokens that start a name (not inside another identifier).
fn metric_tokens(expr: &str) -> Vec<String> {
    let bytes = expr.as_bytes();
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(pos) = expr[from..].find("portgate_") {
        let start = from + pos;
        let inside_word = start > 0
            && (bytes[start - 1].is_ascii_alphanumeric() || matches!(bytes[start - 1], b'_' | b':'));
        let mut end = start + "portgate_".len();
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        if !inside_word {
            found.push(expr[start..end].to_string());
        }
        from = end;
    }
    found
}

/// The metric family a series name belongs to, if portgate exports it.
fn family(name: &str) -> Option<&'static str> {
    if let Some(known) = KNOWN_METRICS.iter().find(|k| **k == name) {
        return Some(*known);
    }
    ["_bucket", "_count", "_sum"]
        .iter()
        .filter_map(|suffix| name.strip_suffix(suffix))
        .find_map(|base| HISTOGRAMS.iter().find(|h| **h == base).copied())
}

/// Asserts every metric in `exprs` is known; returns the families used.
fn check_metric_names(file: &str, exprs: &[String]) -> BTreeSet<&'static str> {
    let mut used = BTreeSet::new();
    let mut unknown = Vec::new();
    for expr in exprs {
        for token in metric_tokens(expr) {
            match family(&token) {
                Some(f) => {
                    used.insert(f);
                }
                None => unknown.push(format!("{token}  (in: {expr})")),
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "{file} references metrics portgate does not export:\n  {}\nknown: {KNOWN_METRICS:?}",
        unknown.join("\n  ")
    );
    used
}

/// Every string under a key named `expr` (panel targets, annotation queries),
/// and the templating variables' queries.
fn dashboard_queries(dash: &serde_json::Value) -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dash, &mut out);
    for var in dash["templating"]["list"].as_array().expect("templating.list") {
        if var["type"] != "query" {
            continue;
        }
        for q in [&var["definition"], &var["query"], &var["query"]["query"]] {
            if let Some(s) = q.as_str() {
                out.push(s.to_string());
            }
        }
    }
    out
}

fn load_dashboard() -> serde_json::Value {
    serde_json::from_str(&read("config/grafana-dashboard.json"))
        .expect("config/grafana-dashboard.json is JSON")
}

/// The `expr:` values of a Prometheus rule file, including `expr: |` blocks.
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let indent = line.len() - line.trim_start().len();
        i += 1;
        let Some(rest) = line.trim_start().trim_start_matches("- ").strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            let mut block = Vec::new();
            while i < lines.len()
                && (lines[i].trim().is_empty() || lines[i].len() - lines[i].trim_start().len() > indent)
            {
                block.push(lines[i].trim());
                i += 1;
            }
            exprs.push(block.join(" ").trim().to_string());
        } else {
            exprs.push(rest.to_string());
        }
    }
    exprs
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let Some(check) = promtool(&["check", "rules", "config/alerts.yml"]) else { return };
    assert!(check.status.success(), "promtool check rules config/alerts.yml\n{}", describe(&check));
    let Some(test) = promtool(&["test", "rules", "config/alerts.test.yml"]) else { return };
    assert!(test.status.success(), "promtool test rules config/alerts.test.yml\n{}", describe(&test));
}

#[test]
fn alert_rules_and_their_tests_use_known_metrics() {
    let rules = read("config/alerts.yml");
    let exprs = rule_exprs(&rules);
    let alerts = rules.lines().filter(|l| l.trim_start().starts_with("- alert:")).count();
    assert!(alerts >= 6, "expected the portgate alerts, found {alerts} in config/alerts.yml");
    assert_eq!(exprs.len(), alerts, "one expr per alert: {exprs:#?}");
    let used = check_metric_names("config/alerts.yml", &exprs);
    for needed in ["portgate_config_last_reload_success", "portgate_config_info", "portgate_process_max_fds"]
    {
        assert!(used.contains(needed), "config/alerts.yml has no alert on {needed}");
    }

    // The unit tests' input series must be real series too, or they test nothing.
    let tests = read("config/alerts.test.yml");
    let series: Vec<String> = tests
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- series:"))
        .map(|s| s.trim().trim_matches('\'').to_string())
        .collect();
    assert!(!series.is_empty(), "config/alerts.test.yml has no input series");
    check_metric_names("config/alerts.test.yml", &series);
    for line in rules.lines().filter_map(|l| l.trim_start().strip_prefix("- alert:")) {
        let name = line.trim();
        assert!(
            tests.contains(&format!("alertname: {name}\n")),
            "alert {name} has no alert_rule_test in config/alerts.test.yml"
        );
    }
}

#[test]
fn dashboard_queries_use_known_metrics() {
    let dash = load_dashboard();
    let queries = dashboard_queries(&dash);
    assert!(queries.len() >= 15, "expected the dashboard's queries, found {}", queries.len());
    let used = check_metric_names("config/grafana-dashboard.json", &queries);
    let unused: Vec<_> = KNOWN_METRICS.iter().filter(|m| !used.contains(*m)).collect();
    assert!(unused.is_empty(), "the dashboard shows nothing of {unused:?}");

    // Template variables and the data source.
    let vars: BTreeSet<&str> =
        dash["templating"]["list"].as_array().unwrap().iter().filter_map(|v| v["name"].as_str()).collect();
    for v in ["DS_PROMETHEUS", "job", "instance", "route", "tenant"] {
        assert!(vars.contains(v), "dashboard variable ${v} is missing (have {vars:?})");
    }
    let mut ids = BTreeSet::new();
    for panel in dash["panels"].as_array().expect("panels") {
        let id = panel["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "duplicate panel id {id}");
        if panel["type"] != "row" {
            assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {}", panel["title"]);
        }
    }
}

/// Every dashboard query is valid PromQL once Grafana's variables are filled in:
/// promtool parses them as recording rules.
#[test]
fn dashboard_queries_parse_as_promql() {
    let dash = load_dashboard();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in dashboard_queries(&dash).iter().enumerate() {
        if q.starts_with("label_values(") {
            continue; // Grafana's own function, not PromQL
        }
        let q = q.replace("$__rate_interval", "5m").replace("$__interval", "1m");
        let quoted = serde_json::to_string(&q).unwrap(); // a JSON string is a YAML double-quoted scalar
        rules.push_str(&format!("      - record: dashboard:query_{i}\n        expr: {quoted}\n"));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yml");
    std::fs::write(&file, &rules).unwrap();
    let Some(out) = promtool(&["check", "rules", file.to_str().unwrap()]) else { return };
    assert!(out.status.success(), "dashboard queries that promtool rejects:\n{}\n{rules}", describe(&out));
}

#[test]
fn cloudformation_template_passes_cfn_lint() {
    const INSTALL: &str = "pip install cfn-lint";
    let args = ["deploy/cloudformation.yaml"];
    // The console script, else the module (pip installs it either way; a pyenv
    // shim without the package exits 127).
    let out = match run("cfn-lint", &args) {
        Some(o) if o.status.code() != Some(127) => Some(o),
        _ => match run("python3", &["-m", "cfnlint", args[0]]) {
            Some(o) if !String::from_utf8_lossy(&o.stderr).contains("No module named") => Some(o),
            _ => None,
        },
    };
    if !common::require("cfn-lint", out.is_some(), INSTALL) {
        return;
    }
    let out = out.unwrap();
    assert!(out.status.success(), "cfn-lint deploy/cloudformation.yaml\n{}", describe(&out));
}

/// The template's UserData writes the node's unit: it must be the shipped one,
/// and the NLB settings the guide relies on must be there.
#[test]
fn cloudformation_template_carries_the_unit_and_nlb_settings() {
    let template = read("deploy/cloudformation.yaml");
    let unit = read("systemd/portgate.service");
    let template_lines: Vec<&str> = template.lines().map(str::trim).collect();
    let mut at = 0;
    for line in unit.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match template_lines[at..].iter().position(|t| *t == line) {
            Some(p) => at += p + 1,
            None => panic!(
                "deploy/cloudformation.yaml's UserData does not carry systemd/portgate.service \
                 (line {line:?} missing or out of order): copy the unit into the PORTGATE_UNIT heredoc"
            ),
        }
    }
    for needle in [
        "proxy_protocol_v2.enabled, Value: \"true\"",
        "preserve_client_ip.enabled, Value: \"false\"",
        "target_health_state.unhealthy.connection_termination.enabled, Value: \"false\"",
        "deregistration_delay.timeout_seconds, Value: !Ref DrainSeconds",
        "tcp.idle_timeout.seconds",
        "load_balancing.cross_zone.enabled",
        "HealthCheckPath: /readyz",
        "AWS::EC2::VPCEndpointService",
        "AcceptanceRequired: true",
        "systemctl enable --now portgate",
        "mode = \"required\"",
        "listen = \"0.0.0.0:${AdminPort}\"",
        "idle_timeout_limit = \"${IdleTimeoutSeconds}s\"",
        "drain = \"${DrainSeconds}s\"",
    ] {
        assert!(template.contains(needle), "deploy/cloudformation.yaml lacks {needle:?}");
    }
}

#[test]
fn metric_token_scanner() {
    assert_eq!(
        metric_tokens("sum by (le) (rate(portgate_session_duration_seconds_bucket{route=~\"$route\"}[5m]))"),
        ["portgate_session_duration_seconds_bucket"]
    );
    assert_eq!(metric_tokens("a / portgate_process_max_fds > 0.8"), ["portgate_process_max_fds"]);
    assert!(metric_tokens("job:portgate_x + myportgate_y").is_empty());
    assert_eq!(family("portgate_session_duration_seconds_count"), Some("portgate_session_duration_seconds"));
    assert_eq!(family("portgate_bytes_total_sum"), None);
    assert_eq!(family("portgate_connections_open"), None);
    let exprs = rule_exprs("  - alert: A\n    expr: |\n      sum(x)\n        / y\n    for: 5m\n  - alert: B\n    expr: up == 0\n");
    assert_eq!(exprs, ["sum(x) / y", "up == 0"]);
}
