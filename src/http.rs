//! HTTP/1.1 plumbing shared by both HTTP surfaces, the TCP admin port
//! ([`admin`](crate::admin)) and the control socket
//! ([`control`](crate::control)): hyper's `http1` server, one request per
//! connection, `Connection: close`, a bounded request head, body and time.
//!
//! hyper parses the request and answers malformed ones itself (400, or 431
//! for a head larger than [`MAX_HEAD`]). Each surface brings only its routes:
//! a function from a request to a response. This module knows no route and
//! no node state.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Every response body: complete before the head is written.
pub(crate) type Body = Full<Bytes>;

/// Largest request head read (a PROXY header in front of it included, on
/// the admin port); hyper answers 431 past it. hyper's floor is 8 KiB.
pub(crate) const MAX_HEAD: usize = 16 * 1024;

/// A request head must arrive within this time, or the connection is closed
/// without an answer: a client that connects and sends nothing holds
/// nothing for long.
pub(crate) const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Accept connections until `stop`; each gets a task of its own (on
/// `exchanges`, so the caller can wait for those in flight) running
/// `handle`, bounded by `limit`. A failed accept (out of descriptors, say)
/// pauses briefly and the loop goes on: the surface never dies.
pub(crate) async fn accept_each<C, A, AF, H, HF>(
    mut accept: A,
    stop: CancellationToken,
    limit: Duration,
    exchanges: TaskTracker,
    handle: H,
) where
    A: FnMut() -> AF,
    AF: Future<Output = io::Result<C>>,
    H: Fn(C) -> HF,
    HF: Future + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = accept() => r,
        };
        match accepted {
            Ok(conn) => {
                let exchange = handle(conn);
                exchanges.spawn(async move {
                    let _ = tokio::time::timeout(limit, exchange).await;
                });
            }
            Err(_) => tokio::time::sleep(ACCEPT_RETRY).await,
        }
    }
}

/// Pause after a failed accept.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Serve one request on `io` with `routes`, then close the connection.
/// The caller bounds the whole exchange in time.
pub(crate) async fn serve_one<S, F, Fut>(io: S, routes: F)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut,
    Fut: Future<Output = Response<Body>>,
{
    let service = hyper::service::service_fn(move |req| {
        let answer = routes(req);
        async move {
            let mut resp = answer.await;
            resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .max_buf_size(MAX_HEAD)
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .serve_connection(TokioIo::new(io), service);
    // A client that goes away, or sends garbage, is not the node's problem.
    let _ = conn.await;
}

/// A response with `body` of type `ctype`.
pub(crate) fn respond(code: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = code;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp
}

/// A plain-text response.
pub(crate) fn text(code: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    respond(code, "text/plain", body)
}

/// A JSON response (one line, newline-terminated).
pub(crate) fn json(code: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut body = value.to_string();
    body.push('\n');
    respond(code, "application/json", body)
}

/// Why a request body was not read.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// Larger than the bound (answer 413).
    TooLarge,
    /// The client went away or sent a broken body (answer 400).
    Broken,
}

/// Read a request body of at most `max` bytes; a `Content-Length` above it
/// is refused before anything is read.
pub(crate) async fn read_body(req: Request<Incoming>, max: usize) -> Result<Bytes, BodyError> {
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(BodyError::TooLarge);
    }
    match Limited::new(req.into_body(), max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
        Err(_) => Err(BodyError::Broken),
    }
}

/// A stream that first gives back bytes already read from it (a PROXY
/// header's tail: the start of the HTTP request), then reads on.
pub(crate) struct Rewind<S> {
    pre: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Rewind<S> {
    /// `inner`, read from after `pre`.
    pub(crate) fn new(pre: Vec<u8>, inner: S) -> Rewind<S> {
        Rewind { pre, pos: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.pre.len() {
            let n = (this.pre.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.pre[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.pre.len() {
                this.pre = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn rewind_gives_back_the_bytes_first() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b" world").await.unwrap();
        drop(a);
        let mut r = Rewind::new(b"hello".to_vec(), b);
        let mut out = String::new();
        r.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }
}
