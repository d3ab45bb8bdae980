//! A fleet, proven: three portgate nodes behind HAProxy (the NLB's stand-in:
//! TCP mode, `send-proxy-v2` with CRC32C, HTTP health checks on `/readyz`
//! with `check-send-proxy`, the listener range mirrored), a real Prometheus
//! with the shipped alert rules, and rolling changes under load.
//!
//! Each scenario runs a client load through the balancer the whole time and
//! holds long sessions open across it, and prints its figures (connections
//! attempted and failed, long sessions and how many were cut). `rig.rs`
//! builds the network, the nodes, HAProxy and Prometheus; `protocols.rs`
//! runs real RDP and PostgreSQL clients and servers through the fleet.

#[path = "../common/mod.rs"]
mod common;
mod protocols;
mod rig;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use rig::*;

const NODES: usize = 3;
const LONG_SESSIONS: usize = 6;
const ECHO_PORT: u16 = FIRST_PORT;

fn per_node(long: &[LongSession]) -> Vec<usize> {
    (1..=NODES).map(|i| long.iter().filter(|s| s.node == i).count()).collect()
}

/// Every node carries at least one long session, so a scenario that touches
/// one node has sessions to lose and sessions to keep.
fn assert_spread(long: &[LongSession]) {
    let spread = per_node(long);
    assert!(spread.iter().all(|&n| n > 0), "long sessions per node: {spread:?}");
}

/// Scenario 1: a route change rolled out with `portgate reload`, node by
/// node. While the nodes disagree, Prometheus's PortgateConfigDrift fires;
/// after the last node it resolves. No connect fails, no session is cut.
#[test]
fn rolling_route_change_node_by_node_drops_nothing_and_drift_alert_follows() {
    if !have_rig(&[("prometheus", "prometheus")]) {
        return;
    }
    let lan = Lan::new(NODES);
    let echo_v1 = Echo::start(&lan, 9001);
    let echo_v2 = Echo::start(&lan, 9002);
    let v1 = node_config(&[("echo", ECHO_PORT, echo_v1.addr)], &[]);
    // v2: the echo route gets a new target (new sessions go there, running
    // ones stay where they are), and a new route appears inside the range.
    let v2 = node_config(&[("echo", ECHO_PORT, echo_v2.addr), ("added", ECHO_PORT + 3, echo_v2.addr)], &[]);
    let nodes: Vec<Node> = (1..=NODES).map(|i| Node::start(&lan, i, &v1)).collect();
    let haproxy = Haproxy::start(&lan, NODES);
    let prom = Prometheus::start(&lan, NODES);
    let hash_v1 = nodes[0].config_hash(&lan);
    assert!(nodes.iter().all(|n| n.config_hash(&lan) == hash_v1), "identical files, identical hashes");
    assert!(!prom.firing("PortgateConfigDrift", &[]), "no drift before the rollout");

    let mut long = open_long_sessions(&lan, ECHO_PORT, &echo_v1, LONG_SESSIONS);
    assert_spread(&long);
    let load = Load::start(&lan, ECHO_PORT, 2);
    load.wait_progress(50);

    let mut drift_fired_after = None;
    for node in &nodes {
        node.write_config(&v2);
        let out = node.reload();
        assert!(
            out.status.success(),
            "portgate reload on node {}: {}",
            node.idx,
            String::from_utf8_lossy(&out.stderr)
        );
        if node.idx == 1 {
            // One node runs another config: the drift alert fires.
            drift_fired_after =
                Some(prom.wait_until("PortgateConfigDrift firing", Duration::from_secs(30), |p| {
                    p.firing("PortgateConfigDrift", &[("job", "portgate")])
                }));
        }
        load.wait_progress(50);
    }
    let hash_v2 = nodes[0].config_hash(&lan);
    assert_ne!(hash_v2, hash_v1);
    assert!(nodes.iter().all(|n| n.config_hash(&lan) == hash_v2), "every node on v2");
    let resolved_after = prom.wait_until("PortgateConfigDrift resolved", Duration::from_secs(30), |p| {
        !p.alerts().iter().any(|(n, _, _)| n == "PortgateConfigDrift")
    });
    load.wait_progress(100);
    let (attempted, failures) = load.stop();

    let cut = long.iter_mut().map(|s| s.alive()).filter(|alive| !alive).count();
    // New sessions reached the new target through every node; the new route
    // answers through the balancer on every node (round robin).
    for i in 1..=NODES {
        assert!(echo_v2.connections_from(i) > 0, "node {i} never dialed the new target");
    }
    for k in 0..NODES * 2 {
        lan.ns.run(move || one_echo(balancer(ECHO_PORT + 3), format!("added-{k}\n").as_bytes())).unwrap();
    }
    report(
        "1 (rolling route change, portgate reload node by node)",
        attempted,
        failures.len(),
        long.len(),
        cut,
        &format!(
            "long sessions per node {:?}; drift alert fired {:.1}s after the first reload, resolved {:.1}s \
             after the last",
            per_node(&long),
            drift_fired_after.unwrap().as_secs_f64(),
            resolved_after.as_secs_f64()
        ),
    );
    assert!(failures.is_empty(), "failed connects during the rollout: {failures:?}");
    assert_eq!(cut, 0, "long sessions cut by the rollout");
    for node in &nodes {
        let revoked = node.events(|v| v["message"] == "session closed" && v["close"] == "revoked");
        assert!(revoked.is_empty(), "node {} revoked sessions: {revoked:?}", node.idx);
    }
    drop((prom, haproxy));
}

/// client address -> (id, started) of the long sessions `node` lists in
/// `GET /sessions`.
fn listed(node: &Node, long: &[LongSession]) -> BTreeMap<String, (String, String)> {
    let clients: Vec<String> = long.iter().map(LongSession::client).collect();
    node.sessions()
        .iter()
        .filter_map(|s| {
            let client = s["client"].as_str()?.to_owned();
            clients.contains(&client).then(|| {
                (
                    client,
                    (
                        s["id"].as_str().unwrap_or("").to_owned(),
                        s["started"].as_str().unwrap_or("").to_owned(),
                    ),
                )
            })
        })
        .collect()
}

/// Scenario 2: a rolling upgrade in place, node by node. A fresh copy of
/// the binary is installed where each node was started from, then
/// `portgate upgrade`: the new process takes over the listeners and the
/// running sessions, the old one exits. The balancer never sees a node
/// unready, no connect fails, no session is cut, every session keeps its
/// id, and the fleet runs one config hash throughout (no drift alert).
#[test]
fn rolling_upgrade_in_place_node_by_node_cuts_nothing_and_keeps_session_ids() {
    if !have_rig(&[("prometheus", "prometheus")]) {
        return;
    }
    let lan = Lan::new(NODES);
    let echo = Echo::start(&lan, 9001);
    let config = node_config(&[("echo", ECHO_PORT, echo.addr)], &[]);
    let mut nodes: Vec<Node> = (1..=NODES).map(|i| Node::start(&lan, i, &config)).collect();
    let haproxy = Haproxy::start(&lan, NODES);
    let prom = Prometheus::start(&lan, NODES);
    let hash = nodes[0].config_hash(&lan);
    assert!(nodes.iter().all(|n| n.config_hash(&lan) == hash), "identical files, identical hashes");

    let mut long = open_long_sessions(&lan, ECHO_PORT, &echo, LONG_SESSIONS);
    assert_spread(&long);
    let spread = per_node(&long);
    let before: Vec<_> = nodes.iter().map(|n| listed(n, &long)).collect();
    for (n, listed) in nodes.iter().zip(&before) {
        assert_eq!(listed.len(), spread[n.idx - 1], "node {} does not list its long sessions", n.idx);
    }
    // Prometheus's own start fires PortgateTargetsMissing (no `up` series
    // before the first scrape, `for` cut to 0s); the rollout starts from a
    // quiet fleet.
    prom.wait_until("no alert active", Duration::from_secs(30), |p| p.alerts().is_empty());
    let load = Load::start(&lan, ECHO_PORT, 2);
    load.wait_progress(50);

    let rollout = Instant::now();
    let mut pids = Vec::new();
    let mut per_upgrade = Vec::new();
    for node in nodes.iter_mut() {
        let i = node.idx;
        node.install_binary();
        let ready = ReadyWatch::start(&lan, node.admin());
        load.wait_progress(20);
        let up = node.upgrade().unwrap_or_else(|e| panic!("{e}"));
        // The upgraded node takes new sessions through the balancer.
        let dialed = echo.connections_from(i);
        let deadline = Instant::now() + SOON;
        while echo.connections_from(i) == dialed {
            assert!(Instant::now() < deadline, "node {i} takes no new sessions after its upgrade");
            load.wait_progress(10);
        }
        load.wait_progress(50);
        let (polls, not_ready) = ready.stop();

        assert_ne!(up.new_pid, up.old_pid, "node {i}: the pid did not change");
        assert_eq!(node.pid(), up.new_pid);
        assert!(is_dead(up.old_pid), "node {i}: the old process {} still runs", up.old_pid);
        assert!(!is_dead(up.new_pid), "node {i}: the new process {} does not run", up.new_pid);
        assert_eq!(up.event["from_version"], up.event["to_version"], "{}", up.event);
        let carried = up.event["sessions"].as_u64().expect("upgraded: sessions");
        assert!(carried >= spread[i - 1] as u64, "node {i} carried {carried} sessions: {}", up.event);
        assert!(not_ready.is_empty(), "node {i}: /readyz not 200 across its upgrade: {not_ready:?}");
        assert!(haproxy.is_up(i), "HAProxy does not see node {i} UP after its upgrade");
        assert_eq!(node.config_hash(&lan), hash, "node {i}: the config hash changed");
        // As an operator would: the next node once Prometheus has scraped
        // this one's new process (it counts one successful upgrade).
        let instance = format!("{}:{ADMIN_PORT}", node_ip(i));
        let scraped =
            prom.wait_until(&format!("node {i}: one successful upgrade"), Duration::from_secs(30), |p| {
                p.query_value(&format!(
                    "portgate_upgrades_total{{result=\"success\",instance=\"{instance}\"}}"
                )) == Some(1.0)
            });
        pids.extend([up.old_pid, up.new_pid]);
        per_upgrade.push(format!(
            "node {i} pid {} -> {} in {} ms, {carried} sessions carried, /readyz 200 x{polls}, \
             Prometheus saw it {:.1}s later",
            up.old_pid,
            up.new_pid,
            up.took.as_millis(),
            scraped.as_secs_f64()
        ));
    }
    load.wait_progress(100);
    let (attempted, failures) = load.stop();
    let window = format!("{}ms", rollout.elapsed().as_millis());

    let cut = long.iter_mut().map(|s| s.alive()).filter(|alive| !alive).count();
    let after: Vec<_> = nodes.iter().map(|n| listed(n, &long)).collect();
    let clients: Vec<String> = long.iter().map(LongSession::client).collect();
    let closed: Vec<_> = nodes
        .iter()
        .flat_map(|n| {
            n.events(|v| {
                v["message"] == "session closed" && clients.iter().any(|c| v["client"] == c.as_str())
            })
        })
        .collect();
    // HAProxy's view: no health check failed, no node ever went down.
    let checks: Vec<(String, String, String)> = (1..=NODES)
        .map(|i| {
            let st = haproxy.server_stat(i);
            (st["status"].clone(), st["chkfail"].clone(), st["chkdown"].clone())
        })
        .collect();
    // Prometheus's view: one config hash at every scrape of the run, every
    // node up at every scrape of the rollout, no alert (pending or firing)
    // while the fleet was upgraded, and no failed upgrade.
    let hashes = prom.query_value(
        "max_over_time(count(count by (hash) (portgate_config_info{job=\"portgate\"}))[10m:1s])",
    );
    let up_min = prom.query_value(&format!("min(min_over_time(up{{job=\"portgate\"}}[{window}]))"));
    let alerts = prom.query(&format!("count by (alertname) (count_over_time(ALERTS[{window}]))"));
    let drift = prom.query("count_over_time(ALERTS{alertname=\"PortgateConfigDrift\"}[10m])");
    let failed_upgrades = prom.query_value("sum(portgate_upgrades_total{result=\"failure\"})");
    report(
        "2 (rolling upgrade in place, portgate upgrade node by node)",
        attempted,
        failures.len(),
        long.len(),
        cut,
        &format!(
            "long sessions per node {spread:?}, same ids after; {}; HAProxy (status, chkfail, chkdown) per \
             node {checks:?}; distinct config hashes at most {hashes:?}; alerts during the rollout ({window}) {}",
            per_upgrade.join("; "),
            alerts.len()
        ),
    );
    assert!(failures.is_empty(), "failed connects during the upgrade: {failures:?}");
    assert_eq!(cut, 0, "long sessions cut by the upgrade");
    assert_eq!(after, before, "the long sessions' ids changed across the upgrade");
    assert!(closed.is_empty(), "long sessions closed: {closed:?}");
    for (i, (status, chkfail, chkdown)) in checks.iter().enumerate() {
        assert_eq!(
            (status.as_str(), chkfail.as_str(), chkdown.as_str()),
            ("UP", "0", "0"),
            "HAProxy saw node {} fail a check or go down",
            i + 1
        );
    }
    assert_eq!(hashes, Some(1.0), "the fleet ran more than one config hash");
    assert_eq!(up_min, Some(1.0), "Prometheus failed to scrape a node during the rollout");
    assert!(alerts.is_empty(), "alerts during the upgrade: {alerts:?}");
    assert!(drift.is_empty(), "PortgateConfigDrift was pending or firing: {drift:?}");
    assert_eq!(failed_upgrades, Some(0.0));

    // Every process of the run, old and new, is gone once the nodes are.
    drop((prom, haproxy));
    drop(nodes);
    for pid in pids {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "portgate process {pid} survived the rig");
    }
    for ns in &lan.nodes {
        assert_eq!(pids_in_netns(&ns.path()), Vec::<i32>::new(), "processes left in {}", ns.name);
    }
}

/// Scenario 3: drain one node. SIGTERM with `shutdown_delay` above the
/// balancer's detection time: HAProxy marks the node down before its
/// listeners close, so new sessions go to the others and no connect fails;
/// the node's own sessions run on until `drain` ends them with
/// `close=shutdown`; the other nodes' sessions are untouched.
#[test]
fn drain_one_node_moves_new_sessions_and_ends_its_own_at_drain() {
    if !have_rig(&[]) {
        return;
    }
    let lan = Lan::new(NODES);
    let echo = Echo::start(&lan, 9001);
    // Detection takes CHECK_FALL x CHECK_INTER_MS (0.4 s) plus a check's
    // round trip; 2 s is well above it.
    let config = node_config(&[("echo", ECHO_PORT, echo.addr)], &[("shutdown_delay", "2s"), ("drain", "3s")]);
    let mut nodes: Vec<Node> = (1..=NODES).map(|i| Node::start(&lan, i, &config)).collect();
    let haproxy = Haproxy::start(&lan, NODES);
    let mut long = open_long_sessions(&lan, ECHO_PORT, &echo, LONG_SESSIONS);
    assert_spread(&long);
    let load = Load::start(&lan, ECHO_PORT, 2);
    load.wait_progress(50);

    const DRAINED: usize = 2;
    let node = &mut nodes[DRAINED - 1];
    let t0 = Instant::now();
    node.signal(libc::SIGTERM);
    let detected = haproxy.wait_state(DRAINED, false, SOON);
    assert!(
        !node.has_log(|l| l.contains("listeners closed")),
        "node {DRAINED} closed its listeners before the balancer saw it unready ({detected:?}): \
         shutdown_delay must exceed the detection time"
    );
    // New sessions go to the others while the drained node still runs.
    let on_others_before = echo.connections_from(1) + echo.connections_from(3);
    load.wait_progress(100);
    assert!(echo.connections_from(1) + echo.connections_from(3) > on_others_before);
    node.wait_log(|l| l.contains("listeners closed"), SOON);
    let listeners_closed = t0.elapsed();
    // The drained node's sessions keep working through the drain...
    for s in long.iter_mut().filter(|s| s.node == DRAINED) {
        assert!(s.alive(), "{} died before the drain ended", s.token);
    }
    // ...and end at its end, with FIN; the process exits 0.
    for s in long.iter_mut().filter(|s| s.node == DRAINED) {
        assert!(s.wait_closed(SOON), "{} was not closed at the drain's end", s.token);
    }
    let ended = t0.elapsed();
    assert_eq!(node.wait_exit(SOON).code(), Some(0));
    load.wait_progress(50);
    let (attempted, failures) = load.stop();

    let drained_long = long.iter().filter(|s| s.node == DRAINED).count();
    let shutdown_closes = node.events(|v| v["message"] == "session closed" && v["close"] == "shutdown");
    let cut = long.iter_mut().filter(|s| s.node != DRAINED).map(|s| s.alive()).filter(|a| !a).count();
    report(
        "3 (drain one node: SIGTERM, shutdown_delay 2s, drain 3s)",
        attempted,
        failures.len(),
        long.len(),
        cut,
        &format!(
            "balancer marked the node down {:.2}s after SIGTERM, listeners closed at {:.2}s, its {drained_long} \
             long sessions ended at {:.2}s with close=shutdown ({} such log lines)",
            detected.as_secs_f64(),
            listeners_closed.as_secs_f64(),
            ended.as_secs_f64(),
            shutdown_closes.len()
        ),
    );
    assert!(failures.is_empty(), "failed connects during the drain: {failures:?}");
    assert_eq!(cut, 0, "sessions on the other nodes were cut");
    assert_eq!(shutdown_closes.len(), drained_long, "close=shutdown lines: {shutdown_closes:?}");
    assert!(ended >= Duration::from_secs(5), "sessions ended before shutdown_delay + drain: {ended:?}");
}

/// Scenario 4: kill -9 one node. Only that node's sessions end; HAProxy
/// routes around it; Prometheus's PortgateDown fires for it; it restarts,
/// rejoins (HAProxy marks it up, it takes new sessions) and the alert
/// resolves. Connections that were in flight on the killed node at the
/// instant of the kill die with it (at most one per client thread); no
/// other connect fails.
#[test]
fn kill_one_node_ends_only_its_sessions_and_it_rejoins() {
    if !have_rig(&[("prometheus", "prometheus")]) {
        return;
    }
    let lan = Lan::new(NODES);
    let echo = Echo::start(&lan, 9001);
    let config = node_config(&[("echo", ECHO_PORT, echo.addr)], &[]);
    let mut nodes: Vec<Node> = (1..=NODES).map(|i| Node::start(&lan, i, &config)).collect();
    let haproxy = Haproxy::start(&lan, NODES);
    let prom = Prometheus::start(&lan, NODES);
    let mut long = open_long_sessions(&lan, ECHO_PORT, &echo, LONG_SESSIONS);
    assert_spread(&long);
    const CLIENT_THREADS: usize = 2;
    let load = Load::start(&lan, ECHO_PORT, CLIENT_THREADS);
    load.wait_progress(50);

    const KILLED: usize = 3;
    let instance = format!("{}:{ADMIN_PORT}", node_ip(KILLED));
    let killed_at = Instant::now();
    nodes[KILLED - 1].signal(libc::SIGKILL);
    nodes[KILLED - 1].wait_exit(SOON);
    for s in long.iter_mut().filter(|s| s.node == KILLED) {
        assert!(s.wait_closed(SOON), "{} survived its node's death?", s.token);
    }
    let detected = haproxy.wait_state(KILLED, false, SOON);
    let down_fired = prom.wait_until("PortgateDown firing", Duration::from_secs(30), |p| {
        p.firing("PortgateDown", &[("instance", &instance)])
    });
    load.wait_progress(100);

    // Restart: it rejoins and takes new sessions again.
    let before = echo.connections_from(KILLED);
    nodes[KILLED - 1].restart(&lan);
    let rejoined = haproxy.wait_state(KILLED, true, SOON);
    let deadline = Instant::now() + SOON;
    while echo.connections_from(KILLED) == before {
        assert!(Instant::now() < deadline, "the restarted node takes no new sessions");
        load.wait_progress(10);
    }
    let down_resolved = prom.wait_until("PortgateDown resolved", Duration::from_secs(30), |p| {
        !p.alerts().iter().any(|(n, _, l)| n == "PortgateDown" && l["instance"] == instance.as_str())
    });
    let (attempted, failures) = load.stop();

    let killed_long = long.iter().filter(|s| s.node == KILLED).count();
    let cut = long.iter_mut().filter(|s| s.node != KILLED).map(|s| s.alive()).filter(|a| !a).count();
    let late: Vec<_> =
        failures.iter().filter(|(t, _)| t.duration_since(killed_at) > Duration::from_secs(1)).collect();
    report(
        "4 (kill -9 one node, restart, rejoin)",
        attempted,
        failures.len(),
        long.len(),
        cut,
        &format!(
            "{killed_long} long sessions on the killed node ended with it; balancer marked it down {:.2}s \
             after the kill; PortgateDown fired {:.1}s after that; restarted node up again in {:.2}s, alert \
             resolved {:.1}s later",
            detected.as_secs_f64(),
            down_fired.as_secs_f64(),
            rejoined.as_secs_f64(),
            down_resolved.as_secs_f64()
        ),
    );
    assert_eq!(cut, 0, "sessions on the surviving nodes were cut");
    assert!(
        failures.len() <= CLIENT_THREADS && late.is_empty(),
        "only connections in flight on the killed node at the kill may fail: {failures:?}"
    );
    drop((prom, haproxy));
}
