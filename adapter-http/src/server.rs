//! Serving a router on a TCP listener with limits that hostile clients
//! cannot talk their way around ([`serve`]).
//!
//! `axum::serve` arms no timer in hyper, so a client that sends its
//! request headers one byte at a time (slowloris), or opens a connection
//! and sends nothing, holds that connection for ever. [`serve`] speaks
//! HTTP/1.1 with hyper's timer set, and bounds:
//!
//! - the time to send a request's line and headers
//!   ([`ServerConfig::header_read_timeout`]; the same clock closes a
//!   keep-alive connection idle for that long between requests);
//! - the size of the request line and headers together, so of the path
//!   and query too ([`ServerConfig::max_header_bytes`]; `431` above), and
//!   their number ([`ServerConfig::max_headers`]);
//! - the connections served at once ([`ServerConfig::max_connections`]:
//!   beyond it, new connections wait in the listener's backlog).
//!
//! Bodies and whole requests are bounded by the router's own edge
//! ([`HttpConfig::body_limit`](crate::HttpConfig::body_limit),
//! [`HttpConfig::request_timeout`](crate::HttpConfig::request_timeout)).
//! TLS and HTTP/2 belong to the proxy in front of the service.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Limits of [`serve`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Longest time a client may take to send a request's line and
    /// headers (then the connection is closed); also how long a
    /// keep-alive connection may sit idle between requests.
    pub header_read_timeout: Duration,
    /// Largest request line plus headers, in bytes (`431` above).
    pub max_header_bytes: usize,
    /// Most header fields in one request (`431` above).
    pub max_headers: usize,
    /// Most connections served at once.
    pub max_connections: usize,
    /// Longest time a graceful shutdown waits for open connections to
    /// finish their requests before it drops them.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            max_connections: 4096,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Serves `app` on `listener` within `config`'s limits until `shutdown`
/// completes; then stops accepting, lets open requests finish (at most
/// [`ServerConfig::shutdown_grace`]) and returns. End long-lived answers
/// such as change feeds when shutdown begins
/// ([`ShutdownHandle`](crate::ShutdownHandle)), or they hold the grace
/// period open.
///
/// `app` is an [`App`](crate::App) ([`Api::into_app`](crate::Api::into_app))
/// or any axum `Router`.
pub async fn serve<S>(
    listener: TcpListener,
    app: S,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()>
where
    S: tower::Service<http::Request<Incoming>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_header_size(config.max_header_bytes)
        .max_headers(config.max_headers)
        .keep_alive(true);
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, a connection reset before it
                // was accepted, …: pause instead of spinning on the error.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let watched = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = watched.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(config.shutdown_grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(grace = ?config.shutdown_grace, "connections still open after the shutdown grace period");
    }
    Ok(())
}
