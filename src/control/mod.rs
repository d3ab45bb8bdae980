//! The control socket: HTTP/1.1 over a Unix stream socket (mode 0600), for
//! the service user and root only. The TCP admin port never offers these
//! verbs.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /sessions?route=&tenant=&client=` | 200, the running sessions that match (JSON array) |
//! | `GET /sessions/ID` | 200, one session; 404 if none runs with that id |
//! | `DELETE /sessions/ID` | 200, the session, which then closes (`close=operator`); 404 if none |
//! | `DELETE /sessions?…` | 200, the sessions closed (at least one filter, else 400) |
//! | `POST /reload` | the same as SIGHUP, answered when done: 200 with what changed, or 422 with every problem |
//! | `POST /upgrade` | the same as SIGUSR2, answered when done: 200 once the new process serves, 500 with why not |
//!
//! Served by [`crate::http`]; this file holds the routes, [`sessions`] the
//! session verbs. A verb that needs
//! the node's steps (a reload) is sent to the node's event loop as a
//! [`NodeRequest`] carrying a oneshot reply, so it runs exactly where a
//! SIGHUP does; a verb that only reads state can read [`NodeState`]. More
//! verbs (sessions, upgrade) are added here, each a route and, if it needs
//! the node, a [`NodeRequest`] variant. The file itself is handled by
//! [`socket`]; the command-line side is [`client`].

pub mod client;
mod sessions;
pub(crate) mod socket;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http::{self, Body};
use crate::node::state::NodeState;
use socket::{SocketError, SocketFile};

/// Largest request body read (and discarded); no verb needs one.
const MAX_BODY: usize = 64 * 1024;
/// One exchange must end within this time. A reload usually takes
/// milliseconds; this bounds a client, not the reload (which completes
/// even if its client is gone).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the control socket asks of the node's event loop.
pub(crate) enum NodeRequest {
    /// `POST /reload`: reload like SIGHUP, and say how it went.
    Reload(oneshot::Sender<ReloadOutcome>),
    /// `POST /upgrade`: upgrade in place like SIGUSR2, and say how it went.
    Upgrade(oneshot::Sender<UpgradeOutcome>),
}

/// How an upgrade in place ended, for `POST /upgrade`: the new process's
/// pid and the sessions it took over, or why the old one keeps serving.
pub(crate) type UpgradeOutcome = Result<(u32, usize), String>;

/// How a reload ended, for SIGHUP's log and `POST /reload`'s answer alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReloadOutcome {
    /// The new config serves.
    Applied(ReloadSummary),
    /// The old config keeps serving; one message per problem.
    Refused(Vec<String>),
}

/// What an applied reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReloadSummary {
    /// Route names, sorted.
    pub(crate) added: Vec<String>,
    pub(crate) removed: Vec<String>,
    /// Same name, different settings.
    pub(crate) changed: Vec<String>,
    /// Running sessions the new config revokes after `revoke_grace`.
    pub(crate) revoking: usize,
    /// The new `portgate_config_info` hash.
    pub(crate) hash: String,
}

impl ReloadOutcome {
    /// The JSON answer of `POST /reload`.
    fn to_json(&self) -> (StatusCode, serde_json::Value) {
        match self {
            ReloadOutcome::Applied(s) => (
                StatusCode::OK,
                serde_json::json!({
                    "result": "success",
                    "added": s.added,
                    "removed": s.removed,
                    "changed": s.changed,
                    "revoking": s.revoking,
                    "hash": s.hash,
                }),
            ),
            ReloadOutcome::Refused(errors) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::json!({ "result": "failure", "errors": errors }),
            ),
        }
    }
}

/// The running control server.
pub(crate) struct ControlServer {
    /// Kept to hand the socket to a successor (upgrade in place).
    listener: Arc<UnixListener>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
    /// Exchanges in flight (a closing node answers them first).
    exchanges: TaskTracker,
    file: SocketFile,
    path: PathBuf,
}

/// How long a closing control server waits for exchanges in flight (the
/// answer to `POST /upgrade`, say).
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// What every request handler can reach.
struct Ctx {
    /// Read-only state and the session registry.
    state: Arc<NodeState>,
    node: mpsc::Sender<NodeRequest>,
}

/// A control socket claimed but not served yet, so that a node can claim
/// it before it binds anything else and serve it once its state exists.
pub(crate) struct ControlClaim {
    listener: UnixListener,
    file: SocketFile,
    path: PathBuf,
}

impl ControlClaim {
    /// Start serving the claimed socket.
    pub(crate) fn serve(self, state: Arc<NodeState>, node: mpsc::Sender<NodeRequest>) -> ControlServer {
        ControlServer::serve(self.listener, self.file, &self.path, state, node)
    }

    /// Give the socket up unserved (the node failed to start): its file
    /// is removed.
    pub(crate) fn release(self) {
        self.file.remove();
    }
}

impl ControlServer {
    /// Claim the socket at `path`, to serve later. Must run inside the
    /// runtime.
    pub(crate) fn claim(path: &Path) -> Result<ControlClaim, SocketError> {
        let claimed = socket::claim(path)?;
        let (std_listener, file) = claimed.split();
        let listener = UnixListener::from_std(std_listener).map_err(|source| {
            file.remove();
            SocketError::Io { path: path.to_path_buf(), source }
        })?;
        Ok(ControlClaim { listener, file, path: path.to_path_buf() })
    }

    /// Claim the socket at `path` and start serving. Must run inside the
    /// runtime.
    pub(crate) fn bind(
        path: &Path,
        state: Arc<NodeState>,
        node: mpsc::Sender<NodeRequest>,
    ) -> Result<ControlServer, SocketError> {
        Ok(Self::claim(path)?.serve(state, node))
    }

    /// Serve the socket a predecessor served at `path` (upgrade in place):
    /// no duplicate check (the predecessor answers on it until it exits),
    /// and from now on this node removes the file at exit.
    pub(crate) fn inherit(
        listener: std::os::unix::net::UnixListener,
        path: &Path,
        state: Arc<NodeState>,
        node: mpsc::Sender<NodeRequest>,
    ) -> Result<ControlServer, SocketError> {
        let io_err = |source| SocketError::Io { path: path.to_path_buf(), source };
        let file = SocketFile::adopt(path).map_err(io_err)?;
        listener.set_nonblocking(true).map_err(io_err)?;
        let listener = UnixListener::from_std(listener).map_err(io_err)?;
        Ok(Self::serve(listener, file, path, state, node))
    }

    fn serve(
        listener: UnixListener,
        file: SocketFile,
        path: &Path,
        state: Arc<NodeState>,
        node: mpsc::Sender<NodeRequest>,
    ) -> ControlServer {
        let listener = Arc::new(listener);
        let cancel = CancellationToken::new();
        let exchanges = TaskTracker::new();
        let ctx = Arc::new(Ctx { state, node });
        let task = tokio::spawn(serve(Arc::clone(&listener), ctx, cancel.clone(), exchanges.clone()));
        ControlServer { listener, cancel, task, exchanges, file, path: path.to_path_buf() }
    }

    /// The listening socket and its path (for a successor).
    pub(crate) fn socket(&self) -> (std::os::fd::BorrowedFd<'_>, &Path) {
        (std::os::fd::AsFd::as_fd(&*self.listener), &self.path)
    }

    /// Stop accepting, answer the exchanges in flight, and remove the
    /// socket file.
    pub(crate) async fn close(self) {
        let file = self.stop().await;
        file.remove();
    }

    /// Stop accepting and answer the exchanges in flight, but leave the
    /// file: a successor serves it now.
    pub(crate) async fn hand_off(self) {
        self.stop().await;
    }

    async fn stop(self) -> SocketFile {
        self.cancel.cancel();
        let _ = self.task.await;
        self.exchanges.close();
        let _ = tokio::time::timeout(CLOSE_WAIT, self.exchanges.wait()).await;
        self.file
    }
}

async fn serve(
    listener: Arc<UnixListener>,
    ctx: Arc<Ctx>,
    cancel: CancellationToken,
    exchanges: TaskTracker,
) {
    let l = &listener;
    let exchange = move |(stream, _)| {
        let ctx = Arc::clone(&ctx);
        http::serve_one(stream, move |req| route(req, Arc::clone(&ctx)))
    };
    http::accept_each(move || l.accept(), cancel, EXCHANGE_TIMEOUT, exchanges, exchange).await;
}

/// The control routes.
async fn route(req: Request<Incoming>, ctx: Arc<Ctx>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let method = req.method().clone();
    if let Err(e) = http::read_body(req, MAX_BODY).await {
        return body_refused(e);
    }
    let registry = &ctx.state.registry;
    let answer = |(code, body): sessions::Answer| http::json(code, &body);
    match (path.as_str(), path.strip_prefix("/sessions/")) {
        ("/reload", _) if method == Method::POST => reload(&ctx).await,
        ("/reload", _) => not_allowed("POST", "use POST /reload\n"),
        ("/upgrade", _) if method == Method::POST => upgrade(&ctx).await,
        ("/upgrade", _) => not_allowed("POST", "use POST /upgrade\n"),
        ("/sessions", _) if method == Method::GET => answer(sessions::list(registry, query.as_deref())),
        ("/sessions", _) if method == Method::DELETE => {
            answer(sessions::close_matching(registry, query.as_deref()))
        }
        ("/sessions", _) => not_allowed("GET, DELETE", "use GET or DELETE /sessions\n"),
        (_, Some(id)) if method == Method::GET => answer(sessions::one(registry, id, false)),
        (_, Some(id)) if method == Method::DELETE => answer(sessions::one(registry, id, true)),
        (_, Some(_)) => not_allowed("GET, DELETE", "use GET or DELETE /sessions/ID\n"),
        _ => http::text(StatusCode::NOT_FOUND, "not found; try GET /sessions or POST /reload\n"),
    }
}

fn not_allowed(allow: &'static str, text: &'static str) -> Response<Body> {
    let mut resp = http::text(StatusCode::METHOD_NOT_ALLOWED, text);
    resp.headers_mut().insert(hyper::header::ALLOW, hyper::header::HeaderValue::from_static(allow));
    resp
}

fn body_refused(e: http::BodyError) -> Response<Body> {
    match e {
        http::BodyError::TooLarge => http::text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n"),
        http::BodyError::Broken => http::text(StatusCode::BAD_REQUEST, "broken request body\n"),
    }
}

async fn reload(ctx: &Ctx) -> Response<Body> {
    let (tx, rx) = oneshot::channel();
    if ctx.node.send(NodeRequest::Reload(tx)).await.is_err() {
        return shutting_down();
    }
    match rx.await {
        Ok(outcome) => {
            let (code, body) = outcome.to_json();
            http::json(code, &body)
        }
        Err(_) => shutting_down(),
    }
}

async fn upgrade(ctx: &Ctx) -> Response<Body> {
    let (tx, rx) = oneshot::channel();
    if ctx.node.send(NodeRequest::Upgrade(tx)).await.is_err() {
        return shutting_down();
    }
    match rx.await {
        Ok(Ok((pid, sessions))) => http::json(
            StatusCode::OK,
            &serde_json::json!({ "result": "success", "pid": pid, "sessions": sessions }),
        ),
        Ok(Err(why)) => http::json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({ "result": "failure", "errors": [why] }),
        ),
        Err(_) => shutting_down(),
    }
}

fn shutting_down() -> Response<Body> {
    http::json(
        StatusCode::SERVICE_UNAVAILABLE,
        &serde_json::json!({ "result": "failure", "errors": ["the node is shutting down"] }),
    )
}
