//! The admin HTTP endpoint: `GET /metrics`, `/healthz`, `/readyz`.
//!
//! Served by [`crate::http`] (one request per connection, `Connection:
//! close`, bounded request size and time); this file holds the routes and
//! the PROXY header in front of the request. It accepts an optional
//! PROXY v1/v2 header first (from `proxy_protocol.trusted` peers only), so
//! `/readyz` can serve as the NLB's HTTP health check on a PROXY-enabled
//! target group. It must stay off the proxy's data path.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::http::{self, Body, Rewind};
use crate::node::state::NodeState;
use crate::proxy_protocol;
use crate::sockopt;

/// One exchange (PROXY header, request and answer) must end within this
/// time; the request head is bounded by [`http::HEAD_TIMEOUT`] too.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The running admin listener.
pub(crate) struct AdminServer {
    /// Kept to hand the socket to a successor (upgrade in place).
    listener: Arc<TcpListener>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl AdminServer {
    /// Bind `addr` and start serving.
    pub(crate) fn bind(addr: SocketAddr, state: Arc<NodeState>) -> io::Result<AdminServer> {
        Ok(Self::serve(sockopt::bind_listener(addr.ip(), addr.port())?, state))
    }

    /// Serve a socket a predecessor listened on (upgrade in place).
    pub(crate) fn inherit(listener: std::net::TcpListener, state: Arc<NodeState>) -> io::Result<AdminServer> {
        listener.set_nonblocking(true)?;
        Ok(Self::serve(TcpListener::from_std(listener)?, state))
    }

    fn serve(listener: TcpListener, state: Arc<NodeState>) -> AdminServer {
        let listener = Arc::new(listener);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(Arc::clone(&listener), state, cancel.clone()));
        AdminServer { listener, cancel, task }
    }

    /// The listening socket (for a successor).
    pub(crate) fn socket(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&*self.listener)
    }

    /// Stop accepting and close the socket.
    pub(crate) async fn close(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

async fn serve(listener: Arc<TcpListener>, state: Arc<NodeState>, cancel: CancellationToken) {
    let l = &listener;
    let exchange = move |(stream, peer)| handle(stream, peer, Arc::clone(&state));
    let exchanges = tokio_util::task::TaskTracker::new();
    http::accept_each(move || l.accept(), cancel, ADMIN_TIMEOUT, exchanges, exchange).await;
}

async fn handle(mut stream: TcpStream, peer: SocketAddr, state: Arc<NodeState>) -> io::Result<()> {
    // The PROXY header, if any, is read here; hyper gets the rest.
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let start = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        match strip_proxy_header(&buf, peer, &state) {
            Strip::NeedMore if buf.len() > http::MAX_HEAD => {
                return refuse(
                    &mut stream,
                    "431 Request Header Fields Too Large",
                    "request header too large\n",
                )
                .await
            }
            Strip::NeedMore => {}
            Strip::Reject => return refuse(&mut stream, "400 Bad Request", "bad PROXY header\n").await,
            Strip::Start(at) => break at,
        }
    };
    buf.drain(..start);
    http::serve_one(Rewind::new(buf, stream), move |req| route(req, Arc::clone(&state))).await;
    Ok(())
}

/// The answer to a connection whose PROXY header is refused, before any
/// HTTP has been read.
async fn refuse(stream: &mut TcpStream, status: &str, body: &str) -> io::Result<()> {
    let out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}

/// Scrapes rendered at the same time; more wait their turn, so a burst of
/// scrapes cannot start a thread each.
static RENDERS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// The exposition, rendered on a thread of its own: at 50,000 routes it
/// takes a few hundred milliseconds, which must not hold a runtime worker
/// (and the sessions queued on it) still. Not the runtime's blocking pool:
/// hung name lookups can hold all of it, and metrics must still answer
/// then. `None` if the render thread could not start or panicked.
async fn render_metrics(state: &Arc<NodeState>) -> Option<String> {
    let _turn = RENDERS.acquire().await.ok()?;
    let metrics = Arc::clone(&state.metrics);
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("portgate-scrape".into())
        .spawn(move || {
            crate::sys::yield_on_wakeup();
            let _ = tx.send(metrics.render());
        })
        .ok()?;
    rx.await.ok()
}

enum Strip {
    NeedMore,
    Reject,
    /// The HTTP request starts at this offset.
    Start(usize),
}

fn strip_proxy_header(buf: &[u8], peer: SocketAddr, state: &NodeState) -> Strip {
    let looks_like_proxy = |b: u8| b == b'\r' || b == b'P';
    match buf.first() {
        Some(&b) if looks_like_proxy(b) => {}
        Some(_) => return Strip::Start(0),
        None => return Strip::NeedMore,
    }
    // "P" may also begin "POST"/"PUT": only a full "PROXY " prefix counts.
    if buf[0] == b'P' && buf.len() < 6 && b"PROXY ".starts_with(buf) {
        return Strip::NeedMore;
    }
    if buf[0] == b'P' && !buf.starts_with(b"PROXY ") {
        return Strip::Start(0);
    }
    let trusted = {
        let snap = state.snapshot();
        let ip = peer.ip().to_canonical();
        snap.config.proxy_protocol.trusted.iter().any(|n| n.contains(&ip))
    };
    match proxy_protocol::parse(buf) {
        Ok(None) => Strip::NeedMore,
        Ok(Some((h, used))) if trusted => {
            // The NLB's HTTP health check arrives behind a LOCAL header.
            if h.command == proxy_protocol::Command::Local {
                state.metrics.health_checks.increment(1);
            }
            Strip::Start(used)
        }
        _ => Strip::Reject,
    }
}

/// The admin routes. Control verbs (`/reload`, ...) are not among them:
/// they are served on the control socket only, so here they are 404.
async fn route(req: Request<Incoming>, state: Arc<NodeState>) -> Response<Body> {
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return http::text(StatusCode::NOT_FOUND, "not found; try /metrics, /healthz or /readyz\n");
    }
    // hyper writes no body for HEAD, but keeps its Content-Length.
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return http::text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    match path {
        "/metrics" => match render_metrics(&state).await {
            Some(text) => http::respond(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", text),
            None => http::text(StatusCode::INTERNAL_SERVER_ERROR, "rendering the metrics failed\n"),
        },
        "/healthz" => http::text(StatusCode::OK, "ok\n"),
        _ if state.is_ready() => http::text(StatusCode::OK, "ready\n"),
        _ => http::text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
    }
}
