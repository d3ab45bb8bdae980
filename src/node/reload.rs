//! SIGHUP and `POST /reload`: re-read the config, and swap it in only if all
//! of it is good. Both run [`Node::reload`], which returns the outcome the
//! control socket answers with and SIGHUP only logs.
//!
//! The file is loaded and validated off the async workers. An invalid file
//! changes nothing. A valid one is applied in an order that never refuses a
//! connection: bind the new ports (all or nothing), publish the new route
//! snapshot, then close the ports that were dropped. Running sessions are
//! judged against the new snapshot over the session registry: those it no
//! longer admits are counted now (`revoking`) and, after `revoke_grace`,
//! asked to close unless a later config admits them again
//! ([`revoke_after_grace`]). There is no restart branch.
//!
//! A step of the node: it must not call shutdown, nor be called from below.

use std::collections::HashMap;
use std::sync::Arc;

use super::Node;
use crate::admin::AdminServer;
use crate::config::{self, Config, Route};
use crate::control::{ReloadOutcome, ReloadSummary};
use crate::node::state::Snapshot;
use crate::session::admission;
use crate::systemd;

/// Why a valid config could not be applied.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    #[error(
        "listen.address changed from {old} to {new}; this needs a restart (the old config keeps serving)"
    )]
    AddressChanged { old: std::net::IpAddr, new: std::net::IpAddr },
    #[error(
        "control.socket changed from {old} to {new}; this needs a restart (the old config keeps serving)"
    )]
    ControlChanged { old: String, new: String },
    #[error(transparent)]
    Bind(#[from] crate::listener::BindError),
    #[error("{0}; the old config keeps serving")]
    Source(#[from] crate::sockopt::SourceBindError),
    #[error("cannot listen on admin address {addr}: {source}")]
    Admin { addr: std::net::SocketAddr, source: std::io::Error },
}

/// What a reload changes in the route set, by route name.
#[derive(Debug, Default, PartialEq, Eq)]
struct RouteDiff {
    added: Vec<String>,
    removed: Vec<String>,
    /// Same name, different settings.
    changed: Vec<String>,
}

/// Compare two route sets by name (the identity of a route across reloads).
/// Names come out sorted. One hash lookup per route: at 50,000 routes two
/// name-sorted maps cost a tenth of the reload.
fn diff_routes(old: &[Arc<Route>], new: &[Arc<Route>]) -> RouteDiff {
    let (old_by, new_by) = (by_name(old), by_name(new));
    let mut d = RouteDiff::default();
    for r in new {
        match old_by.get(r.name.as_str()) {
            None => d.added.push(r.name.as_str().to_owned()),
            Some(o) if *o != r.as_ref() => d.changed.push(r.name.as_str().to_owned()),
            Some(_) => {}
        }
    }
    d.removed = old
        .iter()
        .filter(|r| !new_by.contains_key(r.name.as_str()))
        .map(|r| r.name.as_str().to_owned())
        .collect();
    d.added.sort_unstable();
    d.removed.sort_unstable();
    d.changed.sort_unstable();
    d
}

fn by_name(routes: &[Arc<Route>]) -> HashMap<&str, &Route> {
    let mut m = HashMap::with_capacity(routes.len());
    m.extend(routes.iter().map(|r| (r.name.as_str(), r.as_ref())));
    m
}

impl Node {
    /// Handle one SIGHUP or `POST /reload`: count and log the result, and
    /// return it.
    pub(super) async fn reload(&mut self) -> ReloadOutcome {
        systemd::notify_reloading();
        let path = self.config_path.clone();
        // Its own thread, not the runtime's blocking pool: hung name lookups
        // could hold every pool thread, and a reload must still run.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new().name("portgate-reload".into()).spawn(move || {
            let _ = tx.send(config::load(&path));
        });
        let loaded = match spawned {
            Ok(_) => rx.await.map_err(|_| "the loader thread ended without an answer".to_string()),
            Err(e) => Err(format!("cannot start the loader thread: {e}")),
        };
        let metrics = Arc::clone(&self.state.metrics);
        let outcome = match loaded {
            Ok(Ok(new)) => match self.apply(new).await {
                Ok(summary) => ReloadOutcome::Applied(summary),
                Err(e) => ReloadOutcome::Refused(vec![e.to_string()]),
            },
            Ok(Err(e)) => ReloadOutcome::Refused(e.problems.iter().map(|p| p.to_string()).collect()),
            Err(e) => ReloadOutcome::Refused(vec![format!("config loader failed: {e}")]),
        };
        match &outcome {
            ReloadOutcome::Applied(_) => {
                metrics.reloads_success.increment(1);
                metrics.last_reload_success.set(1);
            }
            ReloadOutcome::Refused(problems) => {
                metrics.reloads_failure.increment(1);
                metrics.last_reload_success.set(0);
                tracing::error!(
                    config = %self.config_path.display(),
                    reason = %problems.join("; "),
                    "config reload failed; still serving the previous config"
                );
            }
        }
        systemd::notify_ready(&self.state.status_line());
        // The old route table and the parse tree are freed by now.
        crate::sys::trim_heap();
        outcome
    }

    /// Apply a validated config: all or nothing.
    async fn apply(&mut self, new: Config) -> Result<ReloadSummary, ApplyError> {
        let state = Arc::clone(&self.state);
        let old = state.snapshot();
        if new.listen.address != old.config.listen.address {
            return Err(ApplyError::AddressChanged {
                old: old.config.listen.address,
                new: new.listen.address,
            });
        }
        if new.control.socket != old.config.control.socket {
            let show = |p: &Option<std::path::PathBuf>| {
                p.as_ref().map_or("off".to_owned(), |p| p.display().to_string())
            };
            return Err(ApplyError::ControlChanged {
                old: show(&old.config.control.socket),
                new: show(&new.control.socket),
            });
        }
        crate::sockopt::check_sources(&new.source_addresses())?;
        let ports = new.listen_ports();
        let bound = self.listeners.bind_new(new.listen.address, &ports, &new.keepalive)?;
        let new_admin = if new.admin.listen != old.config.admin.listen {
            match new.admin.listen {
                Some(a) => Some(Some(
                    AdminServer::bind(a, Arc::clone(&state))
                        .map_err(|source| ApplyError::Admin { addr: a, source })?,
                )),
                None => Some(None),
            }
        } else {
            None
        };

        // Nothing can fail from here on.
        let diff = diff_routes(&old.config.routes, &new.routes);
        if new.log.format != old.config.log.format {
            tracing::warn!("log.format changes take effect at the next restart");
        }
        self.log.apply(&new.log.level, new.log.queue_lines);
        state.metrics.set_histograms(new.metrics.histograms);
        let keepalive = new.keepalive.clone();
        let snap = Arc::new(Snapshot::new(new, &state.states));
        state.publish(Arc::clone(&snap));
        self.deadlines.poke();
        self.listeners.commit(bound, &ports, &keepalive, &state).await;
        state.states.retain(&snap.config);
        if let Some(admin) = new_admin {
            if let Some(old_admin) = std::mem::replace(&mut self.admin, admin) {
                tokio::spawn(old_admin.close());
            }
        }
        tracing::info!(
            routes = snap.table.len(),
            listeners = self.listeners.len(),
            added = %diff.added.join(","),
            removed = %diff.removed.join(","),
            changed = %diff.changed.join(","),
            hash = %snap.hash,
            "config reloaded"
        );
        let revoking = state.registry.count(|e| !admission::still_admits(&snap, &e.route, &e.info));
        if revoking > 0 {
            tokio::spawn(revoke_after_grace(Arc::clone(&state), snap.config.timeouts.revoke_grace));
        }
        Ok(ReloadSummary {
            added: diff.added,
            removed: diff.removed,
            changed: diff.changed,
            revoking,
            hash: snap.hash.clone(),
        })
    }
}

/// After `grace`, close every running session that the config serving
/// *then* does not admit (`close=revoked`): a later reload that admits a
/// session again saves it, one that revokes it too does not delay it.
pub(super) async fn revoke_after_grace(
    state: Arc<crate::node::state::NodeState>,
    grace: std::time::Duration,
) {
    tokio::time::sleep(grace).await;
    let snap = state.snapshot();
    let closed = state
        .registry
        .close(|e| !admission::still_admits(&snap, &e.route, &e.info), crate::reason::CloseReason::Revoked);
    if !closed.is_empty() {
        tracing::info!(sessions = closed.len(), "revoke_grace ended: closing revoked sessions");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Target;

    fn r(name: &str, port: u16, target: &str) -> Arc<Route> {
        let mut route = crate::routes::test_route(name, port, None, &["0.0.0.0/0"], &[]);
        route.target = Target::Addr(target.parse().unwrap());
        Arc::new(route)
    }

    #[test]
    fn diff_table() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        type Case = (Vec<Arc<Route>>, Vec<Arc<Route>>, RouteDiff);
        let cases: Vec<Case> = vec![
            (vec![], vec![], RouteDiff::default()),
            (vec![], vec![r("a", 1, "127.0.0.1:1")], RouteDiff { added: s(&["a"]), ..Default::default() }),
            (vec![r("a", 1, "127.0.0.1:1")], vec![], RouteDiff { removed: s(&["a"]), ..Default::default() }),
            (
                vec![r("a", 1, "127.0.0.1:1"), r("b", 2, "127.0.0.1:2")],
                vec![r("a", 1, "127.0.0.1:9"), r("b", 2, "127.0.0.1:2"), r("c", 3, "127.0.0.1:3")],
                RouteDiff { added: s(&["c"]), changed: s(&["a"]), ..Default::default() },
            ),
            (
                // A rename is a removal plus an addition.
                vec![r("a", 1, "127.0.0.1:1")],
                vec![r("z", 1, "127.0.0.1:1")],
                RouteDiff { added: s(&["z"]), removed: s(&["a"]), ..Default::default() },
            ),
        ];
        for (old, new, want) in cases {
            assert_eq!(diff_routes(&old, &new), want);
        }
    }
}
