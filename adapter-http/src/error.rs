//! The one place where failures become HTTP answers: RFC 9457 problem
//! documents with a stable `type` per kind.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use kes_core::{QueryError, StoreError, ViewError};
use serde::Serialize;

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Seconds a client is told to wait after a 503.
pub(crate) const RETRY_AFTER_SECS: u32 = 1;

/// The stable `type` URIs of the problem documents this crate writes.
///
/// Clients may switch on them; they never change meaning.
pub mod problem_type {
    /// 400: the body is not JSON / form data of the expected shape.
    pub const MALFORMED_BODY: &str = "urn:kes:problem:malformed-body";
    /// 400: the query string cannot be read, or names what the list lacks.
    pub const INVALID_QUERY: &str = "urn:kes:problem:invalid-query";
    /// 422: `page[after]` is not a cursor issued for this query (a
    /// well-formed string the list cannot continue from).
    pub const INVALID_CURSOR: &str = "urn:kes:problem:invalid-cursor";
    /// 400: `q` cannot be searched.
    pub const INVALID_SEARCH: &str = "urn:kes:problem:invalid-search";
    /// 400: a request header (If-Match, KES-Position, Idempotency-Key…) is unreadable.
    pub const INVALID_HEADER: &str = "urn:kes:problem:invalid-header";
    /// 400: the request is otherwise unacceptable (an id the store refuses).
    pub const BAD_REQUEST: &str = "urn:kes:problem:bad-request";
    /// 401: the request carries no valid credentials.
    pub const UNAUTHORIZED: &str = "urn:kes:problem:unauthorized";
    /// 403: the caller may not do this (a rule of the resource, named in `detail`).
    pub const FORBIDDEN: &str = "urn:kes:problem:forbidden";
    /// 404: no such aggregate, route or command.
    pub const NOT_FOUND: &str = "urn:kes:problem:not-found";
    /// 405: the route exists, the method does not.
    pub const METHOD_NOT_ALLOWED: &str = "urn:kes:problem:method-not-allowed";
    /// 409: the aggregate changed meanwhile (no If-Match was sent), or already exists.
    pub const CONFLICT: &str = "urn:kes:problem:conflict";
    /// 412: the If-Match version is stale.
    pub const PRECONDITION_FAILED: &str = "urn:kes:problem:precondition-failed";
    /// 413: the body is larger than the configured limit.
    pub const PAYLOAD_TOO_LARGE: &str = "urn:kes:problem:payload-too-large";
    /// 415: the body's media type is neither JSON nor form data.
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "urn:kes:problem:unsupported-media-type";
    /// 422: the aggregate refused the command (a business rule).
    pub const REJECTED: &str = "urn:kes:problem:rejected";
    /// 503: a store or view cannot be reached now; retry later.
    pub const UNAVAILABLE: &str = "urn:kes:problem:unavailable";
    /// 503: the request took longer than the configured timeout.
    pub const TIMEOUT: &str = "urn:kes:problem:timeout";
    /// 500: anything else; details are in the server log only.
    pub const INTERNAL: &str = "urn:kes:problem:internal";
}

/// Everything that can go wrong between a request and its answer.
///
/// Each variant maps to exactly one status and problem type
/// ([`HttpError::status`], [`HttpError::problem_type`]). Variants that carry
/// internal detail ([`HttpError::Unavailable`], [`HttpError::Internal`]) show
/// the client a fixed text instead and log the detail once: the API's edge
/// writes the record when the answer leaves, naming the request id the
/// client got; an answer made outside the API's edge logs it when dropped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The body could not be read as the operation's body type.
    #[error("malformed body: {0}")]
    MalformedBody(String),
    /// The query string is not `key=value` pairs.
    #[error("malformed query string: {0}")]
    MalformedQuery(String),
    /// The list query was refused.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// A request header could not be read.
    #[error("invalid {name} header: {reason}")]
    InvalidHeader {
        /// The header's name.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The request is unacceptable for another reason.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The request carries no valid credentials (`realm` names what it
    /// needs them for, in `WWW-Authenticate`).
    #[error("missing or invalid credentials")]
    Unauthorized {
        /// The realm of the `WWW-Authenticate: Bearer` challenge.
        realm: &'static str,
        /// Whether credentials were sent but refused (the challenge then
        /// says `error="invalid_token"`).
        invalid_token: bool,
    },
    /// The caller may not do this; the text is the rule that refused it.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// No such aggregate, route or command.
    #[error("{0}")]
    NotFound(String),
    /// The method is not offered on this route.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The aggregate is not at the version the command assumed (no If-Match).
    #[error("{0}")]
    Conflict(String),
    /// The If-Match version is stale.
    #[error("{0}")]
    PreconditionFailed(String),
    /// The body exceeds the limit (bytes).
    #[error("the body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// The body's media type is not accepted.
    #[error("unsupported media type {0:?}; send application/json or application/x-www-form-urlencoded")]
    UnsupportedMediaType(String),
    /// The aggregate refused the command; the text is the domain error's message.
    #[error("{0}")]
    Rejected(String),
    /// A backend cannot be reached now (the text is logged, not shown).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The request ran out of time.
    #[error("the request timed out")]
    Timeout,
    /// Anything else (the text is logged, not shown).
    #[error("internal error: {0}")]
    Internal(String),
}

/// The API was set up wrongly: found while it is built (mounting a
/// resource, a history, an authenticator or an admin token), so that a
/// mistake stops the service at start rather than failing requests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid API configuration: {0}")]
pub struct ConfigError(pub String);

impl HttpError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Query(QueryError::BadCursor) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::MalformedBody(_)
            | Self::MalformedQuery(_)
            | Self::Query(_)
            | Self::InvalidHeader { .. }
            | Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Rejected(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unavailable(_) | Self::Timeout => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable problem `type` of this error (see [`problem_type`]).
    pub fn problem_type(&self) -> &'static str {
        use problem_type as t;
        match self {
            Self::MalformedBody(_) => t::MALFORMED_BODY,
            Self::MalformedQuery(_) => t::INVALID_QUERY,
            Self::Query(QueryError::BadCursor) => t::INVALID_CURSOR,
            Self::Query(QueryError::BadSearch(_)) => t::INVALID_SEARCH,
            Self::Query(_) => t::INVALID_QUERY,
            Self::InvalidHeader { .. } => t::INVALID_HEADER,
            Self::BadRequest(_) => t::BAD_REQUEST,
            Self::Unauthorized { .. } => t::UNAUTHORIZED,
            Self::Forbidden(_) => t::FORBIDDEN,
            Self::NotFound(_) => t::NOT_FOUND,
            Self::MethodNotAllowed => t::METHOD_NOT_ALLOWED,
            Self::Conflict(_) => t::CONFLICT,
            Self::PreconditionFailed(_) => t::PRECONDITION_FAILED,
            Self::PayloadTooLarge(_) => t::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => t::UNSUPPORTED_MEDIA_TYPE,
            Self::Rejected(_) => t::REJECTED,
            Self::Unavailable(_) => t::UNAVAILABLE,
            Self::Timeout => t::TIMEOUT,
            Self::Internal(_) => t::INTERNAL,
        }
    }

    /// What the client is shown: the message for client errors, a fixed
    /// text for server-side ones (their detail goes to the log).
    fn detail(&self) -> String {
        match self {
            Self::Unavailable(_) => "a backend is unavailable; retry later".to_owned(),
            Self::Internal(_) => "the server failed to answer; the failure was logged".to_owned(),
            other => other.to_string(),
        }
    }
}

/// Maps a store failure; `Conflict` is handled by the caller, which knows
/// whether the client sent `If-Match`.
impl From<StoreError> for HttpError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(reason) => Self::Unavailable(reason),
            StoreError::Conflict { id, expected, actual, .. } => {
                Self::Conflict(format!("{id}: expected {expected}, but it is at version {actual}"))
            }
            // The store's reason may quote internals (SQL, broker); the log gets it.
            StoreError::Invalid(reason) => {
                tracing::info!(%reason, "store refused a request as invalid");
                Self::BadRequest("the store refused this request (check the id)".to_owned())
            }
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<ViewError> for HttpError {
    fn from(e: ViewError) -> Self {
        match e {
            ViewError::Query(q) => Self::Query(q),
            ViewError::Unavailable(reason) => Self::Unavailable(reason),
            other => Self::Internal(other.to_string()),
        }
    }
}

/// An RFC 9457 problem document.
#[derive(Debug, Serialize)]
pub(crate) struct Problem {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
}

/// A problem response with `status`, `kind` and `detail`.
pub(crate) fn problem_response(status: StatusCode, kind: &'static str, detail: String) -> Response {
    let body = Problem { kind, title: status.canonical_reason().unwrap_or("Error"), status: status.as_u16(), detail };
    let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = (status, bytes).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    }
    response
}

/// Why an answer is a failure of the server, carried on the response (an
/// extension) to the edge, which logs it in one record with the request id
/// (see [`crate::edge`]). The detail is for the operator; the client never
/// sees it.
///
/// Logged exactly once: by [`Failure::log`], or, when the response never
/// meets the edge (a route of the application's own outside the API), when
/// the last copy is dropped.
#[derive(Clone)]
pub(crate) struct Failure(Arc<Cause>);

struct Cause {
    kind: FailureKind,
    detail: String,
    logged: AtomicBool,
}

/// What failed: a backend that cannot be reached (warn), the server itself
/// (error), or a handler that panicked (error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FailureKind {
    Outage,
    Internal,
    Panic,
}

impl Failure {
    pub(crate) fn new(kind: FailureKind, detail: String) -> Self {
        Self(Arc::new(Cause { kind, detail, logged: AtomicBool::new(false) }))
    }

    /// Writes the log record, naming `request_id` when there is one.
    pub(crate) fn log(&self, request_id: Option<&str>) {
        if !self.0.logged.swap(true, Ordering::Relaxed) {
            self.0.write(request_id);
        }
    }
}

impl Cause {
    fn write(&self, request_id: Option<&str>) {
        let detail = self.detail.as_str();
        match self.kind {
            FailureKind::Outage => tracing::warn!(request_id, error = detail, "backend unavailable"),
            FailureKind::Internal => tracing::error!(request_id, error = detail, "request failed"),
            FailureKind::Panic => tracing::error!(request_id, panic = detail, "a request handler panicked"),
        }
    }
}

impl Drop for Cause {
    fn drop(&mut self) {
        if !*self.logged.get_mut() {
            self.write(None);
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let failure = match &self {
            Self::Internal(_) => Some(FailureKind::Internal),
            Self::Unavailable(_) | Self::Timeout => Some(FailureKind::Outage),
            _ => {
                tracing::debug!(error = %self, "request refused");
                None
            }
        };
        let mut response = problem_response(self.status(), self.problem_type(), self.detail());
        if let Some(kind) = failure {
            response.extensions_mut().insert(Failure::new(kind, self.to_string()));
        }
        if let Self::Unauthorized { realm, invalid_token } = &self
            && let Ok(challenge) = HeaderValue::from_str(&if *invalid_token {
                format!("Bearer realm=\"{realm}\", error=\"invalid_token\"")
            } else {
                format!("Bearer realm=\"{realm}\"")
            })
        {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_side_detail_never_reaches_the_client() {
        let e = HttpError::from(StoreError::Backend("syntax error at or near \"SELECT\"".into()));
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!e.detail().contains("SELECT"));
        let e = HttpError::from(ViewError::Unavailable("connection refused 10.0.0.3:5432".into()));
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(!e.detail().contains("5432"));
    }

    #[test]
    fn a_failure_is_logged_once_with_the_request_id_or_when_its_answer_is_dropped() {
        let (log, _guard) = kes_test_support::CapturedLog::start();
        // Met by the edge: one record, with the id; dropping adds none.
        let response = HttpError::Internal("disk full on /var/db".into()).into_response();
        let failure = response.extensions().get::<Failure>().cloned().expect("a failure travels with the answer");
        failure.log(Some("req-7"));
        failure.log(Some("req-7"));
        drop((response, failure));
        // Never met by an edge: logged when the answer is dropped.
        drop(HttpError::Unavailable("connection refused 10.0.0.3:5432".into()).into_response());
        // Refusals are the client's doing: nothing at INFO or above.
        drop(HttpError::NotFound("no such project".into()).into_response());
        let failed = log.lines_with("request failed");
        assert_eq!(failed.len(), 1, "{}", log.text());
        assert!(failed[0].contains("ERROR") && failed[0].contains("req-7") && failed[0].contains("disk full"));
        let outage = log.lines_with("backend unavailable");
        assert_eq!(outage.len(), 1, "{}", log.text());
        assert!(outage[0].contains("WARN") && outage[0].contains("10.0.0.3") && !outage[0].contains("request_id"));
        assert_eq!(log.text().lines().count(), 2, "{}", log.text());
    }

    #[test]
    fn query_errors_have_their_own_types() {
        assert_eq!(HttpError::from(QueryError::BadCursor).problem_type(), problem_type::INVALID_CURSOR);
        assert_eq!(HttpError::from(QueryError::BadSearch("x".into())).problem_type(), problem_type::INVALID_SEARCH);
        assert_eq!(HttpError::from(QueryError::UnknownField("x".into())).problem_type(), problem_type::INVALID_QUERY);
    }
}
