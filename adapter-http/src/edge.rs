//! The service every request passes through before routing.
//!
//! It does in one place, with one boxed future per request, what a stack
//! of tower-http layers would do with a boxed future, a service clone and
//! often a re-boxed body each:
//!
//! * trailing-slash normalisation (`/projects/` is `/projects`);
//! * request ids: `x-request-id` is kept when the client sent one, made
//!   from a counter otherwise, seen by the routes that write (which record
//!   it in the events' metadata) and echoed on every answer;
//! * a tracing span per request (with the request id), and a log record
//!   when it ends; a failure of the server (an internal error, a backend
//!   outage, a panic) is one record at warn or error level that names the
//!   request id the client was given, whatever level the span is at;
//! * the body limit: a declared `Content-Length` above it is a 413 at once,
//!   any other body is read through a limit;
//! * the request timeout (503 `timeout`); the timer is only armed when the
//!   answer is not ready at the first poll;
//! * panic catching (a bare 500, the message goes to the log);
//! * problem answers for the bare errors of axum itself (see [`problemize`]).
//!
//! Compression and CORS are tower-http's: requests that carry
//! `Accept-Encoding` (or any request, once CORS origins are configured) go
//! through those layers, built around the same guarded routes.

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, HttpBody as _};
use axum::extract::Request;
use axum::response::Response;
use axum::routing::future::RouteFuture;
use futures::FutureExt;
use http::uri::PathAndQuery;
use http::{HeaderValue, StatusCode, Uri, header};
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt};
use tower_http::compression::CompressionLayer;
use tower_http::cors::CorsLayer;
use tracing::Instrument;

use crate::api::{MAX_TOKEN, names};
use crate::error::{Failure, FailureKind, PROBLEM_JSON, problem_response, problem_type};

/// What a panic or a bare answer is told.
const INTERNAL_DETAIL: &str = "the server failed to answer; the failure was logged";

type Layered = BoxCloneSyncService<Request, Response, Infallible>;

/// The edge service: see the module documentation.
///
/// Cheap to clone (the router clones its fallback service for every
/// request): everything sits behind one `Arc`.
#[derive(Clone)]
pub(crate) struct Edge(Arc<Parts>);

struct Parts {
    /// The routes, guarded inline: used when nothing asks for compression
    /// and no CORS origin is configured. `None` when CORS is configured.
    plain: Option<Guard>,
    /// The same guarded routes inside compression (and CORS, when configured).
    layered: Layered,
    ids: RequestIds,
    body_limit: usize,
}

impl Edge {
    /// The edge around `routes`; `cors` when origins are allowed.
    pub(crate) fn new(routes: Router, cors: Option<CorsLayer>, body_limit: usize, timeout: Duration) -> Self {
        let guard = Guard { routes, timeout };
        let compressed = CompressionLayer::new().layer(guard.clone()).map_response(|r| r.map(Body::new));
        let (plain, layered) = match cors {
            None => (Some(guard), BoxCloneSyncService::new(compressed)),
            Some(cors) => (None, BoxCloneSyncService::new(cors.layer(compressed))),
        };
        Self(Arc::new(Parts { plain, layered, ids: RequestIds::new(), body_limit }))
    }
}

impl Service<Request> for Edge {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Routers and the tower-http layers around them are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let started = Instant::now();
        trim_trailing_slash(request.uri_mut());
        let edge = &*self.0;
        let id = match request.headers().get(&names::REQUEST_ID) {
            Some(given) => given.clone(),
            None => {
                let made = edge.ids.next();
                // Writes record the id in their events' metadata; reads do
                // not look for it, and skip the insert.
                if !request.method().is_safe() {
                    request.headers_mut().insert(names::REQUEST_ID.clone(), made.clone());
                }
                made
            }
        };
        let span = tracing::debug_span!(
            "request",
            method = %request.method(),
            path = %loggable_path(request.uri()),
            version = ?request.version(),
            request_id = loggable_id(&id),
        );
        let limit = edge.body_limit;
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let answer = if declared.is_some_and(|n| n > limit as u64) {
            Answer::Ready(problem_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                problem_type::PAYLOAD_TOO_LARGE,
                "the body is larger than the limit".into(),
            ))
        } else {
            if !request.body().is_end_stream() {
                // Whoever reads the body meets the limit, streamed or not.
                request = request.map(|body| Body::new(http_body_util::Limited::new(body, limit)));
            }
            let compress = request.headers().contains_key(header::ACCEPT_ENCODING);
            match &edge.plain {
                Some(guard) if !compress => Answer::Plain(guard.start(request), guard.timeout),
                _ => Answer::Layered(edge.layered.clone().oneshot(request)),
            }
        };
        Box::pin(
            async move {
                let mut response = match answer {
                    Answer::Ready(response) => response,
                    Answer::Plain(call, timeout) => Guard::finish(call, timeout).await,
                    Answer::Layered(future) => match future.await {
                        Ok(response) => response,
                        Err(never) => match never {},
                    },
                };
                finished(&mut response, started, &id);
                response.headers_mut().entry(&names::REQUEST_ID).or_insert(id);
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// How a request is going to be answered, decided before the future starts.
enum Answer {
    /// Already known (a refused body).
    Ready(Response),
    /// Through the inline guard: the routes' future (or their panic) and the timeout.
    Plain(Started, Duration),
    /// Through compression (and CORS).
    Layered(tower::util::Oneshot<Layered, Request>),
}

/// The routes' future, or the panic that calling them raised.
type Started = std::thread::Result<RouteFuture<Infallible>>;

/// The routes with the timeout, panic catching and problem answers.
#[derive(Clone)]
struct Guard {
    routes: Router,
    timeout: Duration,
}

impl Guard {
    /// Calls the routes (routing runs here), catching a panic.
    fn start(&self, request: Request) -> Started {
        // A router clone is a reference count.
        std::panic::catch_unwind(AssertUnwindSafe(|| self.routes.clone().call(request)))
    }

    /// Runs the routes' future to its answer, within the timeout.
    async fn finish(started: Started, timeout: Duration) -> Response {
        let future = match started {
            Ok(future) => future,
            Err(panic) => return panic_response(panic),
        };
        // The answer is polled once before the timeout is set: one ready at
        // once (a read served from memory) costs no clock read and no timer.
        let mut future = std::pin::pin!(AssertUnwindSafe(future).catch_unwind());
        let first = match futures::poll!(future.as_mut()) {
            std::task::Poll::Ready(answer) => Ok(answer),
            std::task::Poll::Pending => tokio::time::timeout(timeout, future).await,
        };
        match first {
            Ok(Ok(Ok(response))) => problemize(response),
            Ok(Ok(Err(never))) => match never {},
            Ok(Err(panic)) => panic_response(panic),
            Err(_) => {
                problem_response(StatusCode::SERVICE_UNAVAILABLE, problem_type::TIMEOUT, "the request timed out".into())
            }
        }
    }
}

impl Service<Request> for Guard {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let started = self.start(request);
        let timeout = self.timeout;
        Box::pin(async move { Ok(Guard::finish(started, timeout).await) })
    }
}

/// The end of a request in the log: its status and latency at debug level
/// (the span names the request); a failure of the server at warn or error
/// level, naming the request id itself, since the span may be disabled.
fn finished(response: &mut Response, started: Instant, id: &HeaderValue) {
    let status = response.status().as_u16();
    if let Some(failure) = response.extensions_mut().remove::<Failure>() {
        failure.log(Some(loggable_id(id)));
    } else if response.status().is_server_error() {
        tracing::error!(status, request_id = loggable_id(id), latency = ?started.elapsed(), "request failed");
    } else {
        tracing::debug!(status, latency = ?started.elapsed(), "finished processing request");
    }
}

/// The part of `uri` that may be logged: the path without the query (a
/// filter or a search may name a person) and without the subject an
/// erasure names (it may be a person's name). Ids in paths are opaque.
fn loggable_path(uri: &Uri) -> &str {
    let path = uri.path();
    if path.starts_with("/subjects/") { "/subjects/{subject}" } else { path }
}

/// The request id as it may be logged: a client's id that is not text or
/// is longer than a retry key may be (and so is not recorded by writes
/// either) is replaced by a fixed word.
fn loggable_id(id: &HeaderValue) -> &str {
    match id.to_str() {
        Ok(text) if text.len() <= MAX_TOKEN => text,
        _ => "(unreadable)",
    }
}

/// `/a//b/` → `/a//b`, `//a` → `/a`, `/` stays: leading and trailing
/// slashes collapse to one leading slash; the query is kept.
fn trim_trailing_slash(uri: &mut Uri) {
    let path = uri.path();
    if path.len() <= 1 || (!path.ends_with('/') && !path.starts_with("//")) {
        return;
    }
    let mut fixed = String::with_capacity(path.len() + uri.query().map_or(0, |q| q.len() + 1));
    fixed.push('/');
    fixed.push_str(path.trim_matches('/'));
    if let Some(query) = uri.query() {
        fixed.push('?');
        fixed.push_str(query);
    }
    let mut parts = uri.clone().into_parts();
    // The new text is a slice of a valid path and query, so it parses.
    parts.path_and_query = PathAndQuery::from_maybe_shared(fixed).ok();
    if let Ok(normalised) = Uri::from_parts(parts) {
        *uri = normalised;
    }
}

/// Request ids for requests that come without one: a random prefix drawn
/// once per router and a counter, unique without a random draw per request.
#[derive(Clone)]
struct RequestIds {
    prefix: Arc<str>,
    next: Arc<AtomicU64>,
}

impl RequestIds {
    fn new() -> Self {
        let random = uuid::Uuid::new_v4().simple().to_string();
        Self { prefix: Arc::from(&random[..16]), next: Arc::new(AtomicU64::new(1)) }
    }

    fn next(&self) -> HeaderValue {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // 16 hex digits, a dash and at most 16 more, written by hand: this
        // runs for almost every request.
        let prefix = self.prefix.as_bytes();
        let mut text = [0u8; 40];
        text[..prefix.len()].copy_from_slice(prefix);
        text[prefix.len()] = b'-';
        let digits = (64 - n.max(1).leading_zeros()).div_ceil(4) as usize;
        let end = prefix.len() + 1 + digits;
        for (i, slot) in text[prefix.len() + 1..end].iter_mut().enumerate() {
            let nibble = (n >> (4 * (digits - 1 - i))) & 0xf;
            *slot = b"0123456789abcdef"[nibble as usize];
        }
        match HeaderValue::from_bytes(&text[..end]) {
            Ok(value) => value,
            // Unreachable with a hex prefix; a constant keeps the request going.
            Err(_) => HeaderValue::from_static("unnumbered"),
        }
    }
}

/// A panic in a handler: answered with a bare 500; its message goes to the
/// log with the request id (see [`finished`]).
fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    let mut response =
        problem_response(StatusCode::INTERNAL_SERVER_ERROR, problem_type::INTERNAL, INTERNAL_DETAIL.into());
    response.extensions_mut().insert(Failure::new(FailureKind::Panic, message.to_owned()));
    response
}

/// Gives error answers made by axum itself (empty or plain-text 404, 405,
/// 413, 415, extractor rejections…) the same problem+json shape as the
/// adapter's own.
pub(crate) fn problemize(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    // Only bare answers are rewritten: ours are JSON already (problems, or
    // the health report).
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == PROBLEM_JSON || v.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (kind, detail) = match status {
        StatusCode::NOT_FOUND => (problem_type::NOT_FOUND, "no such route"),
        StatusCode::METHOD_NOT_ALLOWED => (problem_type::METHOD_NOT_ALLOWED, "method not allowed on this route"),
        StatusCode::PAYLOAD_TOO_LARGE => (problem_type::PAYLOAD_TOO_LARGE, "the body is larger than the limit"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (problem_type::UNSUPPORTED_MEDIA_TYPE, "unsupported media type"),
        StatusCode::SERVICE_UNAVAILABLE => (problem_type::TIMEOUT, "the request timed out"),
        s if s.is_client_error() => (problem_type::BAD_REQUEST, "the request could not be read"),
        _ => (problem_type::INTERNAL, INTERNAL_DETAIL),
    };
    let (mut parts, _) = response.into_parts();
    let fresh = problem_response(status, kind, detail.into());
    for name in [header::CONTENT_TYPE, header::CONTENT_LENGTH, header::RETRY_AFTER] {
        parts.headers.remove(&name);
    }
    let (fresh_parts, body) = fresh.into_parts();
    parts.headers.extend(fresh_parts.headers);
    Response::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trimmed(text: &str) -> String {
        let mut uri: Uri = text.parse().unwrap();
        trim_trailing_slash(&mut uri);
        uri.to_string()
    }

    #[test]
    fn trailing_and_doubled_leading_slashes_are_trimmed_and_the_query_kept() {
        assert_eq!(trimmed("/projects/"), "/projects");
        assert_eq!(trimmed("/projects//?sort=name"), "/projects?sort=name");
        assert_eq!(trimmed("//projects"), "/projects");
        assert_eq!(trimmed("/projects/p-1"), "/projects/p-1");
        assert_eq!(trimmed("/"), "/");
        assert_eq!(trimmed("///"), "/");
    }

    #[test]
    fn made_request_ids_share_a_prefix_and_differ() {
        let ids = RequestIds::new();
        let (a, b) = (ids.next(), ids.next());
        let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 18);
        assert_eq!(&a[..17], &b[..17]);
    }

    #[test]
    fn made_request_ids_end_in_the_counter_in_hex() {
        let ids = RequestIds::new();
        for n in [0, 1, 0xf, 0x10, 0xabc, 0x1234_5678, u64::MAX] {
            ids.next.store(n, Ordering::Relaxed);
            let id = ids.next();
            assert_eq!(id.to_str().unwrap(), format!("{}-{n:x}", ids.prefix));
        }
    }
}
