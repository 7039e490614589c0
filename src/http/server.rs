//! The HTTP connections: accepted under a cap, each given a deadline for its request head and
//! for the pause between requests, and each stopped on shutdown.
//!
//! A node's API faces careless and hostile local clients; each of them must not be able to
//! hold a file descriptor or a task for ever. `axum::serve` has no such bounds, so connections
//! are served here with hyper's own HTTP/1 connection driver.
//! - A connection over the cap gets `503` with `Retry-After` and is closed, so the process
//!   keeps descriptors for its database and its broker.
//! - A connection whose first request head does not arrive within the header timeout gets
//!   `408` and is closed. After that, hyper's header timeout closes a keep-alive connection
//!   that stays idle between requests for the idle timeout.
//! - When `accept` fails (out of file descriptors, typically), the loop waits before it tries
//!   again, longer each time up to a second: it logs and backs off instead of spinning.
//! - On shutdown a connection finishing a request gets [`GRACE`]; one serving a watch, whose
//!   stream ends on the stop anyway, gets only [`WATCH_GRACE`] to take its last bytes: a
//!   watcher that does not read would otherwise hold the stop up for the whole grace.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::Query;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use super::auth::ClientCertificate;
use super::scope::is_watch;

use crate::shutdown::Shutdown;

/// How long open connections may take to finish once the server stops.
const GRACE: Duration = Duration::from_secs(5);
/// How long a connection whose last request is a watch may take to finish once the server
/// stops: its stream has ended, and a client that reads has its end at once.
const WATCH_GRACE: Duration = Duration::from_millis(100);
/// A request head larger than this is handed to hyper as it is, which answers `431`.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The longest wait between two failed `accept`s.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// The bounds on connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once, at most.
    pub max_connections: usize,
    /// Time for a new connection's first request head to arrive.
    pub header_timeout: Duration,
    /// Time a keep-alive connection may stay idle between requests.
    pub idle_timeout: Duration,
}

/// Accepts and serves connections until `stop`, then gives open ones [`GRACE`] to finish; over
/// TLS when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    tls: Option<TlsAcceptor>,
    stop: Shutdown,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut backoff = Duration::ZERO;
    let mut waiting = stop.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = waiting.wait() => break,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => {
                backoff = Duration::ZERO;
                tcp
            }
            Err(e) => {
                backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_ACCEPT_BACKOFF);
                tracing::warn!(error = %e, retry_in = ?backoff, "HTTP endpoint cannot accept a connection");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => continue,
                    _ = waiting.wait() => break,
                }
            }
        };
        let _ = tcp.set_nodelay(true);
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let (app, stop, tls) = (app.clone(), stop.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        None => connection(tcp, app, limits, stop, slot).await,
                        Some(tls) => {
                            let handshake =
                                tokio::time::timeout(limits.header_timeout, tls.accept(tcp));
                            match handshake.await {
                                Ok(Ok(stream)) => {
                                    let app = with_client_certificate(app, &stream);
                                    connection(stream, app, limits, stop, slot).await
                                }
                                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                                Err(_) => tracing::debug!("TLS handshake did not finish in time"),
                            }
                        }
                    }
                });
            }
            Err(_) => {
                tracing::debug!(
                    max = limits.max_connections,
                    "HTTP connection refused: too many open"
                );
                tokio::spawn(answer_and_close(tcp, Refusal::TooManyConnections));
            }
        }
    }
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(GRACE, slots.acquire_many(all)).await;
}

/// `app` with the user of the connection's verified client certificate, if it presented one,
/// on each of its requests (see [`super::auth`]).
fn with_client_certificate(
    app: Router,
    stream: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
) -> Router {
    let user = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|cert| ClientCertificate::from_der(cert));
    match user {
        Some(user) => app.layer(axum::Extension(user)),
        None => app,
    }
}

/// Serves one connection, holding its `slot` until it closes.
async fn connection<S: Stream>(
    mut tcp: S,
    app: Router,
    limits: ConnectionLimits,
    mut stop: Shutdown,
    slot: OwnedSemaphorePermit,
) {
    let _slot = slot;
    let head = match tokio::time::timeout(limits.header_timeout, read_head(&mut tcp)).await {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) | Ok(Err(_)) => return,
        Err(_) => {
            tracing::debug!("HTTP request head did not arrive in time");
            return answer_and_close(tcp, Refusal::HeadTimeout).await;
        }
    };
    let io = TokioIo::new(Prefixed { head, at: 0, tcp });
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout)
        .keep_alive(true);
    let watching = Arc::new(AtomicBool::new(false));
    let service = Marked {
        inner: TowerToHyperService::new(app),
        watching: watching.clone(),
    };
    let conn = http1.serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.wait() => {
            conn.as_mut().graceful_shutdown();
            let grace = match watching.load(Ordering::Relaxed) {
                true => WATCH_GRACE,
                false => GRACE,
            };
            let _ = tokio::time::timeout(grace, conn).await;
        }
    }
}

/// A connection's service that notes whether its latest request is a watch.
struct Marked<S> {
    inner: S,
    watching: Arc<AtomicBool>,
}

impl<S, B> hyper::service::Service<hyper::Request<B>> for Marked<S>
where
    S: hyper::service::Service<hyper::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, request: hyper::Request<B>) -> Self::Future {
        let watch = Query::<HashMap<String, String>>::try_from_uri(request.uri())
            .is_ok_and(|Query(params)| is_watch(&params));
        self.watching.store(watch, Ordering::Relaxed);
        self.inner.call(request)
    }
}

/// Reads until the end of the first request head (or [`MAX_HEAD_BYTES`]); `None` when the
/// client closes first.
async fn read_head<S: Stream>(tcp: &mut S) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 4096];
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&chunk[..n]);
        let searched_from = head.len().saturating_sub(n + 3);
        if head[searched_from..].windows(4).any(|w| w == b"\r\n\r\n")
            || head.len() >= MAX_HEAD_BYTES
        {
            return Ok(Some(head));
        }
    }
}

/// Why a connection is answered and closed without being served.
#[derive(Clone, Copy)]
enum Refusal {
    TooManyConnections,
    HeadTimeout,
}

/// Writes the refusal as kube-apiserver words it (a `Status` body) and closes. The write has
/// a deadline of its own: a client that does not read is not waited for.
async fn answer_and_close<S: Stream>(mut tcp: S, refusal: Refusal) {
    use axum::http::StatusCode;
    let (code, reason, message, retry) = match refusal {
        Refusal::TooManyConnections => (
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "too many connections open; try again later",
            Some(super::scope::RETRY_AFTER_SECONDS),
        ),
        Refusal::HeadTimeout => (
            StatusCode::REQUEST_TIMEOUT,
            "Timeout",
            "the request head did not arrive in time",
            None,
        ),
    };
    let body = super::scope::status_object(code, reason, message.to_owned(), None).to_string();
    let retry = retry.map_or(String::new(), |s| format!("Retry-After: {s}\r\n"));
    let response = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{retry}Connection: close\r\n\r\n{body}",
        code.as_u16(),
        code.canonical_reason().unwrap_or(""),
        body.len(),
    );
    let write = async {
        tcp.write_all(response.as_bytes()).await?;
        tcp.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

/// A connection, plain or TLS.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for S {}

/// The connection with the bytes already read from it put back in front.
struct Prefixed<S> {
    head: Vec<u8>,
    at: usize,
    tcp: S,
}

impl<S: Stream> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.head.len() {
            let n = buf.remaining().min(self.head.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.head[at..at + n]);
            self.at += n;
            if self.at == self.head.len() {
                self.head = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl<S: Stream> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}
