//! SIGHUP: re-read the config, and swap it in only if all of it is good.
//!
//! The file is loaded and validated off the async workers. An invalid file
//! changes nothing. A valid one is applied in an order that never refuses a
//! connection: bind the new ports (all or nothing), publish the new route
//! snapshot, then close the ports that were dropped. Running sessions receive
//! the snapshot and re-check themselves (see `session.rs`); there is no
//! restart branch.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::admin::AdminServer;
use crate::config::{self, Config, Route};
use crate::server::{Server, Snapshot};
use crate::systemd;

/// Why a valid config could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(
        "listen.address changed from {old} to {new}; this needs a restart (the old config keeps serving)"
    )]
    AddressChanged { old: std::net::IpAddr, new: std::net::IpAddr },
    #[error(transparent)]
    Bind(#[from] crate::listener::BindError),
    #[error("cannot listen on admin address {addr}: {source}")]
    Admin { addr: std::net::SocketAddr, source: std::io::Error },
}

/// What a reload changes in the route set, by route name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RouteDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Same name, different settings.
    pub changed: Vec<String>,
}

/// Compare two route sets by name (the identity of a route across reloads).
pub fn diff_routes(old: &[Arc<Route>], new: &[Arc<Route>]) -> RouteDiff {
    let old: BTreeMap<&str, &Route> = old.iter().map(|r| (r.name.as_str(), r.as_ref())).collect();
    let new: BTreeMap<&str, &Route> = new.iter().map(|r| (r.name.as_str(), r.as_ref())).collect();
    let mut d = RouteDiff::default();
    for (name, r) in &new {
        match old.get(name) {
            None => d.added.push((*name).to_owned()),
            Some(o) if o != r => d.changed.push((*name).to_owned()),
            Some(_) => {}
        }
    }
    d.removed = old.keys().filter(|n| !new.contains_key(*n)).map(|n| (*n).to_owned()).collect();
    d
}

/// Handle one SIGHUP.
pub async fn reload(server: &mut Server) {
    systemd::notify_reloading();
    let path = server.config_path.clone();
    let loaded = tokio::task::spawn_blocking(move || config::load(&path)).await;
    let metrics = Arc::clone(&server.shared.metrics);
    let result = match loaded {
        Ok(Ok(new)) => apply(server, new).await.map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(e.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; ")),
        Err(e) => Err(format!("config loader failed: {e}")),
    };
    match result {
        Ok(()) => {
            metrics.reloads_success.increment(1);
            metrics.last_reload_success.set(1.0);
        }
        Err(reason) => {
            metrics.reloads_failure.increment(1);
            metrics.last_reload_success.set(0.0);
            tracing::error!(
                config = %server.config_path.display(),
                reason = %reason,
                "config reload failed; still serving the previous config"
            );
        }
    }
    systemd::notify_ready(&server.shared.status_line());
}

/// Apply a validated config: all or nothing.
pub async fn apply(server: &mut Server, new: Config) -> Result<(), ApplyError> {
    let shared = Arc::clone(&server.shared);
    let old = shared.snapshot.load_full();
    if new.listen.address != old.config.listen.address {
        return Err(ApplyError::AddressChanged { old: old.config.listen.address, new: new.listen.address });
    }
    let ports = new.listen_ports();
    let bound = server.listeners.bind_new(new.listen.address, &ports, &new.keepalive)?;
    let new_admin = if new.admin.listen != old.config.admin.listen {
        match new.admin.listen {
            Some(a) => Some(Some(
                AdminServer::bind(a, Arc::clone(&shared))
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
    server.log.set_level(&new.log.level);
    shared.states.refresh_labels(&new);
    let snap = Arc::new(Snapshot::new(new, &shared.states));
    shared.publish(Arc::clone(&snap));
    server.listeners.commit(bound, &ports, &shared).await;
    shared.states.retain(&snap.config);
    if let Some(admin) = new_admin {
        if let Some(old_admin) = std::mem::replace(&mut server.admin, admin) {
            tokio::spawn(old_admin.close());
        }
    }
    tracing::info!(
        routes = snap.table.len(),
        listeners = server.listeners.len(),
        added = %diff.added.join(","),
        removed = %diff.removed.join(","),
        changed = %diff.changed.join(","),
        hash = %snap.hash,
        "config reloaded"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Target;

    fn r(name: &str, port: u16, target: &str) -> Arc<Route> {
        Arc::new(Route {
            name: name.into(),
            port,
            via: None,
            target: Target::Addr(target.parse().unwrap()),
            tenant: name.into(),
            allow: vec!["0.0.0.0/0".parse().unwrap()],
            endpoints: vec![],
            max_connections: 0,
            ssh_user: None,
        })
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
