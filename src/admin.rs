//! The admin HTTP endpoint: `GET /metrics`, `/healthz`, `/readyz`.
//!
//! A deliberately small HTTP/1.x server: one request per connection,
//! `Connection: close`, bounded request size and time. It accepts an optional
//! PROXY v1/v2 header first (from `proxy_protocol.trusted` peers only), so
//! `/readyz` can serve as the NLB's HTTP health check on a PROXY-enabled
//! target group. It must stay off the proxy's data path.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::node::state::NodeState;
use crate::proxy_protocol;
use crate::sockopt;

/// A request head must arrive within this time.
const ADMIN_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head (PROXY header included) we read.
const MAX_REQUEST: usize = 16 * 1024;

/// The running admin listener.
pub(crate) struct AdminServer {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl AdminServer {
    /// Bind `addr` and start serving.
    pub(crate) fn bind(addr: SocketAddr, state: Arc<NodeState>) -> io::Result<AdminServer> {
        let listener = sockopt::bind_listener(addr.ip(), addr.port())?;
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(listener, state, cancel.clone()));
        Ok(AdminServer { cancel, task })
    }

    /// Stop accepting and close the socket.
    pub(crate) async fn close(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

async fn serve(listener: TcpListener, state: Arc<NodeState>, cancel: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let state = Arc::clone(&state);
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(ADMIN_READ_TIMEOUT, handle(stream, peer, &state)).await;
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn handle(mut stream: TcpStream, peer: SocketAddr, state: &NodeState) -> io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let mut head_start = None;
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if head_start.is_none() {
            match strip_proxy_header(&buf, peer, state) {
                Strip::NeedMore => {}
                Strip::Reject => {
                    return respond(&mut stream, 400, "text/plain", "bad PROXY header\n", false).await
                }
                Strip::Start(at) => head_start = Some(at),
            }
        }
        if let Some(at) = head_start {
            if let Some(end) = find(&buf[at..], b"\r\n\r\n").or_else(|| find(&buf[at..], b"\n\n")) {
                let head = &buf[at..at + end];
                return route(&mut stream, head, state).await;
            }
        }
        if buf.len() > MAX_REQUEST {
            return respond(&mut stream, 431, "text/plain", "request header too large\n", false).await;
        }
    }
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

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn route(stream: &mut TcpStream, head: &[u8], state: &NodeState) -> io::Result<()> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().split(' ');
    let method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default();
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(stream, 405, "text/plain", "only GET and HEAD\n", head_only).await;
    }
    match path {
        "/metrics" => {
            let body = state.metrics.render();
            respond(stream, 200, "text/plain; version=0.0.4; charset=utf-8", &body, head_only).await
        }
        "/healthz" => respond(stream, 200, "text/plain", "ok\n", head_only).await,
        "/readyz" => {
            if state.is_ready() {
                respond(stream, 200, "text/plain", "ready\n", head_only).await
            } else {
                respond(stream, 503, "text/plain", "not ready\n", head_only).await
            }
        }
        _ => {
            respond(stream, 404, "text/plain", "not found; try /metrics, /healthz or /readyz\n", head_only)
                .await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    code: u16,
    ctype: &str,
    body: &str,
    head_only: bool,
) -> io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&out).await?;
    stream.shutdown().await
}
