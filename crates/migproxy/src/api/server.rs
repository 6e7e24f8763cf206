//! The API's HTTP/1.1 connections, with limits no client can outlast: a deadline for each
//! request head, an idle timeout for the connection, and a cap on connections at once
//! (`axum::serve` has none of these: 500 idle connections would be held for ever).
//!
//! The same loop serves the unix socket and the TLS listener.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::serve::Listener;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::daemon::{ApiLimits as Limits, Daemon};

/// Serves `router` on every connection `listener` accepts until `shutdown`; then lets the
/// requests in flight finish (the caller bounds how long).
pub async fn serve<L>(
    daemon: Arc<Daemon>,
    mut listener: L,
    router: Router,
    shutdown: CancellationToken,
) where
    L: Listener,
{
    let limits = daemon.config.api_limits.clone();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // Owned here: when the caller gives up waiting and drops this future, every
    // connection goes with it.
    let mut connections = JoinSet::new();
    loop {
        let io = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            (io, _) = listener.accept() => io,
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            if let Some(suppressed) = daemon.rejections.record("api_busy") {
                tracing::warn!(
                    suppressed,
                    "API connection refused: {} connections already open",
                    limits.max_connections
                );
            }
            continue;
        };
        let connection = connection(io, router.clone(), limits.clone(), shutdown.clone());
        connections.spawn(async move {
            connection.await;
            drop::<OwnedSemaphorePermit>(permit);
        });
    }
    while connections.join_next().await.is_some() {}
}

/// Serves one connection until the client is done, a limit ends it, or `shutdown` (then
/// the request in flight is answered first).
async fn connection<I>(io: I, router: Router, limits: Limits, shutdown: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(Idle::new(io, limits.idle_timeout));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let connection = builder.serve_connection(io, TowerToHyperService::new(router));
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = shutdown.cancelled() => connection.as_mut().graceful_shutdown(),
    }
    let _ = connection.await;
}

/// A stream that fails with `TimedOut` once no byte has moved either way for `timeout`
/// while it is waited on.
struct Idle<I> {
    io: I,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<I> Idle<I> {
    fn new(io: I, timeout: Duration) -> Idle<I> {
        Idle {
            io,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    /// Resets the clock on any progress; on `Pending`, fails once the deadline has passed.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match poll {
            Poll::Pending if self.deadline.as_mut().poll(cx).is_ready() => Poll::Ready(Err(
                io::Error::new(io::ErrorKind::TimedOut, "API connection idle for too long"),
            )),
            Poll::Pending => Poll::Pending,
            ready => {
                let next = Instant::now() + self.timeout;
                self.deadline.as_mut().reset(next);
                ready
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Idle<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_read(cx, buf);
        this.watch(cx, poll)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Idle<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch(cx, poll)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_flush(cx);
        this.watch(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
