//! Operator endpoints, absent unless an admin token is configured
//! ([`Api::admin`](crate::Api::admin)) or bearer JWTs are
//! ([`Api::authenticate`](crate::Api::authenticate)). They answer requests
//! that carry the admin token, or a JWT granting the admin role
//! ([`Api::admin_role`](crate::Api::admin_role), `admin` by default); a
//! valid JWT without the role is `403`, anything else `401`:
//!
//! - `GET /admin/projections`: every projection this process reports, with
//!   its checkpoint, lag, whether this process leads it and its last
//!   rebuild's progress;
//! - `POST /admin/projections/{name}/rebuild`: starts a rebuild where this
//!   process leads the projection (`202`; `409` when another process leads
//!   it or a rebuild runs; `404` for an unknown name);
//! - `GET /admin/reactions`: every reaction this process runs, with its
//!   checkpoint, lag, lease, last error (a stopped reaction says why
//!   here), what it sent, and its latest refused commands
//!   (`?recent=N`, 20 by default, at most 100);
//! - `DELETE /subjects/{subject}`, when a vault is given
//!   ([`Api::erasure`](crate::Api::erasure)): forgets a data subject, named
//!   by its subject id or by the person reference its data was filed under
//!   ([`kes_core::Personal::new`]). The subject's key is deleted, an
//!   erasure marker kept, and every aggregate holding its data records the
//!   erasure in its log, so that its ETag, list rows and feeds move. `200`
//!   with the subject and the aggregates (each with the `KES-Position`
//!   token of its erasure event, for reads that must see it); erasing again is `200` with
//!   `"already_erased": true` and finishes what an interrupted erasure
//!   left; `404` for a subject never known. Aggregates of types this
//!   process does not mount are listed with `"recorded": false`.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::{delete, get, post};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use kes_core::{ProjectionError, ProjectionStatus, ReactionStatus, Vault};
use serde_json::{Value, json};

use crate::api::{Mount, ProjectionStatusSource, ReactionStatusSource};
use crate::auth::JwtAuth;
use crate::error::{ConfigError, HttpError};
use crate::request::json_response;

/// The realm of the admin endpoints' `WWW-Authenticate` challenge.
const REALM: &str = "kes-admin";

/// The shared secret an operator sends as `Authorization: Bearer …`.
#[derive(Clone)]
pub struct AdminToken(Arc<str>);

impl AdminToken {
    /// Fewest characters a token may have.
    pub const MIN_LEN: usize = 16;

    /// A token; refused when shorter than [`AdminToken::MIN_LEN`] or not
    /// visible ASCII (it travels in a header).
    pub fn new(token: impl AsRef<str>) -> Result<Self, ConfigError> {
        let token = token.as_ref().trim();
        if token.len() < Self::MIN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError(format!(
                "an admin token needs at least {} visible ASCII characters",
                Self::MIN_LEN
            )));
        }
        Ok(Self(token.into()))
    }

    /// Whether `headers` carry this token, compared in time independent of
    /// where they differ.
    fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(sent) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
        let Some(sent) = sent.strip_prefix("Bearer ").map(str::trim) else { return false };
        same_secret(sent.as_bytes(), self.0.as_bytes())
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(***)")
    }
}

/// Equality of two secrets that reads every byte whatever they hold.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Who may use the admin endpoints.
pub(crate) struct Admins {
    /// The shared admin token.
    pub(crate) token: Option<AdminToken>,
    /// JWTs verified by this, granting this role.
    pub(crate) jwt: Option<(Arc<JwtAuth>, String)>,
}

impl Admins {
    /// Whether anyone may: without, the admin routes do not exist.
    pub(crate) fn any(&self) -> bool {
        self.token.is_some() || self.jwt.is_some()
    }

    fn check(&self, headers: &HeaderMap) -> Result<(), HttpError> {
        if self.token.as_ref().is_some_and(|t| t.admits(headers)) {
            return Ok(());
        }
        if let Some((auth, role)) = &self.jwt
            && let Ok(principal) = auth.authenticate(headers)
        {
            return if principal.has_role(role) {
                Ok(())
            } else {
                Err(HttpError::Forbidden(format!("the admin endpoints need the {role:?} role")))
            };
        }
        let sent = headers.contains_key(header::AUTHORIZATION);
        Err(HttpError::Unauthorized { realm: REALM, invalid_token: sent })
    }
}

struct Admin {
    admins: Admins,
    sources: Vec<Arc<dyn ProjectionStatusSource>>,
    reactions: Vec<Arc<dyn ReactionStatusSource>>,
    erasure: Option<Erasure>,
}

/// What `DELETE /subjects/{subject}` works with.
pub(crate) struct Erasure {
    /// Deletes keys.
    pub(crate) vault: Arc<Vault>,
    /// Record erasures in their aggregates.
    pub(crate) mounts: Vec<Arc<dyn Mount>>,
}

impl Admin {
    fn check(&self, headers: &HeaderMap) -> Result<(), HttpError> {
        self.admins.check(headers)
    }
}

/// The admin routes over `sources` and `reactions`.
pub(crate) fn routes(
    admins: Admins,
    sources: Vec<Arc<dyn ProjectionStatusSource>>,
    reactions: Vec<Arc<dyn ReactionStatusSource>>,
    erasure: Option<Erasure>,
) -> Router {
    let erases = erasure.is_some();
    let admin = Arc::new(Admin { admins, sources, reactions, erasure });
    let mut router = Router::new()
        .route("/admin/projections", get(list))
        .route("/admin/projections/{name}/rebuild", post(rebuild))
        .route("/admin/reactions", get(list_reactions));
    if erases {
        router = router.route("/subjects/{subject}", delete(erase_subject));
    }
    router.with_state(admin)
}

/// The longest subject reference `DELETE /subjects/{subject}` takes.
const MAX_SUBJECT: usize = 255;

async fn erase_subject(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    Path(subject): Path<String>,
) -> Result<Response, HttpError> {
    admin.check(&headers)?;
    let Some(erasure) = &admin.erasure else { return Err(HttpError::NotFound("no such route".into())) };
    if subject.is_empty() || subject.len() > MAX_SUBJECT || subject.chars().any(char::is_control) {
        return Err(HttpError::BadRequest(format!("a subject is 1 to {MAX_SUBJECT} bytes without control characters")));
    }
    let erased = erasure.vault.erase(&subject).await.map_err(|e| HttpError::from(kes_core::StoreError::from(e)))?;
    // The reference may be a person's name: never echo it in errors or logs.
    let Some(erased) = erased else { return Err(HttpError::NotFound("no such subject".into())) };
    tracing::info!(subject = %erased.subject, aggregates = erased.aggregates.len(), "subject erased");
    let mut aggregates = Vec::with_capacity(erased.aggregates.len());
    for at in &erased.aggregates {
        let mut recorded = false;
        let mut position = None;
        for mount in &erasure.mounts {
            if let Some(result) = mount.record_erasure(&at.aggregate, &at.id, &erased.subject).await {
                position = result?;
                recorded = true;
                break;
            }
        }
        aggregates.push(json!({ "aggregate": at.aggregate, "id": at.id, "recorded": recorded, "position": position }));
    }
    let body = json!({
        "subject": erased.subject,
        "already_erased": !erased.first,
        "aggregates": aggregates,
    });
    Ok(json_response(StatusCode::OK, &body))
}

/// The query of `GET /admin/reactions`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReactionsQuery {
    /// How many of each reaction's latest refused commands to show.
    recent: Option<u32>,
}

async fn list_reactions(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    query: Result<Query<ReactionsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, HttpError> {
    admin.check(&headers)?;
    let Query(query) = query.map_err(|e| HttpError::BadRequest(format!("bad query: {}", e.body_text())))?;
    let recent = query.recent.unwrap_or(20);
    if recent > 100 {
        return Err(HttpError::BadRequest("recent: at most 100".into()));
    }
    let mut items = Vec::new();
    for source in &admin.reactions {
        let statuses = source.reaction_status(recent).await.map_err(HttpError::from)?;
        items.extend(statuses.iter().map(reaction_json));
    }
    Ok(json_response(StatusCode::OK, &json!({ "reactions": items })))
}

fn reaction_json(r: &ReactionStatus) -> Value {
    let refusals: Vec<Value> = r
        .recent_refusals
        .iter()
        .map(|f| {
            json!({
                "source_event": f.source_event,
                "source_id": f.source_id,
                "target": f.target,
                "target_id": f.target_id,
                "command": f.command,
                "error": f.error,
                "at": f.at.map(|t| t.to_rfc3339()),
            })
        })
        .collect();
    json!({
        "reaction": r.reaction,
        "source": r.source,
        "journal": r.status.name,
        "leads": r.status.leads,
        "checkpoint": serde_json::to_value(&r.status.checkpoint).unwrap_or(Value::Null),
        "lag": r.status.lag,
        "last_error": r.status.last_error,
        "events": r.counts.events,
        "sent": r.counts.sent,
        "deduplicated": r.counts.deduplicated,
        "refused": r.counts.refused,
        "retries": r.counts.retries,
        "refused_total": r.refused_total,
        "recent_refusals": refusals,
    })
}

async fn list(State(admin): State<Arc<Admin>>, headers: HeaderMap) -> Result<Response, HttpError> {
    admin.check(&headers)?;
    let mut items = Vec::new();
    for source in &admin.sources {
        let statuses = source.projection_status().await.map_err(HttpError::from)?;
        items.extend(statuses.iter().map(status_json));
    }
    Ok(json_response(StatusCode::OK, &json!({ "projections": items })))
}

async fn rebuild(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    admin.check(&headers)?;
    for source in &admin.sources {
        let Some(started) = source.start_rebuild(&name) else { continue };
        match started {
            Ok(()) => {}
            Err(ProjectionError::Standby(_) | ProjectionError::Outdated { .. }) => {
                return Err(HttpError::Conflict(format!(
                    "projection {name:?} is led by another process: send the rebuild to the one that leads it"
                )));
            }
            Err(e @ ProjectionError::Busy(_)) => return Err(HttpError::Conflict(e.to_string())),
            Err(e) => return Err(HttpError::Unavailable(e.to_string())),
        }
        let status = source
            .projection_status()
            .await
            .map_err(HttpError::from)?
            .into_iter()
            .find(|s| s.name == name)
            .map(|s| status_json(&s))
            .unwrap_or(Value::Null);
        let mut response = json_response(StatusCode::ACCEPTED, &status);
        response.headers_mut().insert(header::LOCATION, HeaderValue::from_static("/admin/projections"));
        return Ok(response);
    }
    Err(HttpError::NotFound(format!("no projection named {name:?} runs here")))
}

fn status_json(s: &ProjectionStatus) -> Value {
    let rebuild = s.rebuild.as_ref().map(|r| {
        json!({
            "state": r.state.as_str(),
            "done": r.done,
            "total": r.total,
            "events": r.events,
            "started_ms": r.started.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            "elapsed_ms": r.elapsed.as_millis() as u64,
            "error": r.error,
        })
    });
    json!({
        "name": s.name,
        "leads": s.leads,
        "checkpoint": serde_json::to_value(&s.checkpoint).unwrap_or(Value::Null),
        "lag": s.lag,
        "last_error": s.last_error,
        "rebuild": rebuild,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_compared_whole() {
        assert!(same_secret(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!same_secret(b"0123456789abcdef", b"0123456789abcdeF"));
        assert!(!same_secret(b"0123456789abcdef", b"0123456789abcde"));
    }

    #[test]
    fn short_or_unprintable_tokens_are_refused() {
        assert!(AdminToken::new("short").is_err());
        assert!(AdminToken::new("0123456789abcdef\u{7f}").is_err());
        assert!(
            AdminToken::new("  0123456789abcdef\n").is_ok(),
            "surrounding whitespace (a file's newline) is trimmed"
        );
    }

    #[test]
    fn only_the_bearer_token_admits() {
        let token = AdminToken::new("0123456789abcdef").unwrap();
        let mut headers = HeaderMap::new();
        assert!(!token.admits(&headers));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer 0123456789abcdeX"));
        assert!(!token.admits(&headers));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic 0123456789abcdef"));
        assert!(!token.admits(&headers));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer 0123456789abcdef"));
        assert!(token.admits(&headers));
    }
}
