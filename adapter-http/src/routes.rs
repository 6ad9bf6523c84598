//! The routes of one mounted aggregate: writes turned into commands,
//! reads by id, lists, history and change feeds.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, StatusCode, header};
use kes_core::{
    Aggregate, AggregateRef, CatchUp, CommandBus, CommandError, CommandOutcome, EventStore, ExpectedVersion, History,
    HistoryError, ListQuery, ListView, Metadata, QueryError, StoreError, Vault,
};
use serde_json::{Map, Value};

use crate::api::{MAX_SEARCH, Shared, names};
use crate::error::HttpError;
use crate::feed::{self, Hub};
use crate::request::{
    check_id, etag, history_paging, idempotency_key, if_match, json_bytes, json_response, metadata, none_match,
    position_text, position_token, read_body,
};
use crate::resource::{Operation, Resource, id_for_key};

/// The typed side of a mount: what its routes run on.
pub(crate) struct Mounted<A: Aggregate, S> {
    pub(crate) resource: Resource<A>,
    pub(crate) bus: Arc<CommandBus<A, S>>,
    pub(crate) view: Arc<dyn ListView>,
    pub(crate) catch_up: Arc<dyn CatchUp>,
    /// `None`: history comes from the store.
    pub(crate) history: Option<Arc<dyn History>>,
    pub(crate) shared: Arc<Shared>,
    /// The change feeds.
    pub(crate) feeds: Arc<Hub<A, S>>,
}

/// What the handlers of one mounted resource share: its store, views, feeds and rules.
pub(crate) type MountedRef<A, S> = Arc<Mounted<A, S>>;

pub(crate) fn routes<A: Aggregate, S: EventStore<A>>(m: MountedRef<A, S>) -> Router {
    let plural = m.resource.plural.clone();
    let mut collection: MethodRouter<MountedRef<A, S>> = get(list::<A, S>);
    if m.resource.create.is_some() {
        collection = collection.post(create::<A, S>);
    }
    let mut item: MethodRouter<MountedRef<A, S>> = get(get_one::<A, S>);
    if m.resource.replace.is_some() {
        item = item.put(replace::<A, S>);
    }
    if m.resource.patch.is_some() {
        item = item.patch(patch::<A, S>);
    }
    if m.resource.delete.is_some() {
        item = item.delete(delete::<A, S>);
    }
    let mut router = Router::new()
        .route(&format!("/{plural}"), collection)
        .route(&format!("/{plural}/{{id}}"), item)
        .route(&format!("/{plural}/{{id}}/events"), get(events::<A, S>))
        .route(&format!("/{plural}/changes"), get(list_changes::<A, S>))
        .route(&format!("/{plural}/{{id}}/changes"), get(item_changes::<A, S>));
    if !m.resource.commands.is_empty() {
        router = router.route(&format!("/{plural}/{{id}}/{{command}}"), post(named::<A, S>));
    }
    router.with_state(m)
}

/// How a write ended, for the metrics' `outcome` label.
pub(crate) fn outcome<E>(result: &Result<CommandOutcome<impl Sized>, CommandError<E>>) -> &'static str {
    match result {
        Ok(o) if o.deduplicated => "replayed",
        Ok(_) => "ok",
        Err(CommandError::Rejected(_)) => "rejected",
        Err(CommandError::Forbidden(_)) => "forbidden",
        Err(CommandError::NotFound { .. }) => "not_found",
        Err(CommandError::Conflict { .. }) => "conflict",
        Err(CommandError::Store(e)) if e.is_transient() => "unavailable",
        Err(_) => "error",
    }
}

/// The HTTP answer to a command the bus refused.
fn command_error<A: Aggregate>(e: CommandError<A::Error>, id: &str, if_match: bool, create: bool) -> HttpError {
    match e {
        CommandError::Rejected(e) => HttpError::Rejected(e.to_string()),
        CommandError::Forbidden(rule) => HttpError::Forbidden(rule),
        CommandError::NotFound { .. } => HttpError::NotFound(format!("no {} {id}", A::NAME)),
        CommandError::Conflict { actual, .. } if if_match => {
            HttpError::PreconditionFailed(format!("{} {id} is at version {actual}", A::NAME))
        }
        CommandError::Conflict { actual, .. } if actual > 0 && create => {
            HttpError::Conflict(format!("{} {id} already exists", A::NAME))
        }
        CommandError::Conflict { actual, .. } => {
            HttpError::Conflict(format!("{} {id} changed meanwhile; it is at version {actual}", A::NAME))
        }
        CommandError::Store(e) => HttpError::from(e),
        other => HttpError::Internal(other.to_string()),
    }
}

pub(crate) enum Write {
    Create,
    Update,
    Delete,
}

impl<A: Aggregate, S: EventStore<A>> Mounted<A, S> {
    /// Runs one write: body → command → bus → answer with version and position.
    async fn write(
        &self,
        kind: Write,
        command_name: &str,
        op: &Operation<A::Command>,
        id: Option<String>,
        request: Request,
    ) -> Result<Response, HttpError> {
        let (parts, body) = request.into_parts();
        let caller = self.shared.caller(&parts)?;
        // Read once: the metadata keeps its digest, a create's id is made
        // from the key as sent.
        let key = idempotency_key(&parts.headers)?;
        let meta = metadata(&parts, caller.as_ref(), key.as_deref())?;
        let (id, expected, if_match) = self.target(&kind, id, &parts, &meta, key.as_deref())?;
        let value = match kind {
            Write::Delete => Value::Object(Map::new()),
            _ => read_body(&self.shared, &parts, body, op).await?,
        };
        let command = op.command(&id, value)?;
        let guard = self.resource.rules.write_guard(command_name, caller.as_ref());
        let started = Instant::now();
        let result = match &guard {
            Some(guard) => self.bus.execute_guarded(&id, command, expected, meta, guard).await,
            None => self.bus.execute(&id, command, expected, meta).await,
        };
        self.shared.metrics.command(A::NAME, command_name, outcome(&result), started.elapsed());
        if let Err(CommandError::Conflict { actual, .. }) = &result
            && if_match
        {
            // The version the client must re-read, so that it need not ask.
            let mut r =
                HttpError::PreconditionFailed(format!("{} {id} is at version {actual}", A::NAME)).into_response();
            r.headers_mut().insert(header::ETAG, etag(*actual));
            return Ok(r);
        }
        let done = result.map_err(|e| command_error::<A>(e, &id, if_match, matches!(kind, Write::Create)))?;
        let body = match kind {
            Write::Delete => Bytes::new(),
            _ => self.rendered(&id, &done.state).await?,
        };
        Ok(self.written(&kind, &id, done, body))
    }

    /// The vault that opens this aggregate's personal data, if it has any.
    pub(crate) fn vault(&self) -> Option<&Arc<Vault>> {
        self.bus.vault().filter(|_| A::PERSONAL_DATA)
    }

    /// The JSON of `state` as readers see it: personal values opened, or
    /// `null` and listed in `_erased` once their subject is erased.
    async fn rendered(&self, id: &str, state: &A) -> Result<Bytes, HttpError> {
        let json =
            serde_json::to_vec(state).map_err(|e| HttpError::Internal(format!("cannot serialise the answer: {e}")))?;
        self.rendered_bytes(id, json.into()).await
    }

    /// `json`, a stored document of aggregate `id`, as readers see it:
    /// the same buffer when nothing in it is personal.
    pub(crate) async fn rendered_bytes(&self, id: &str, json: Bytes) -> Result<Bytes, HttpError> {
        let Some(vault) = self.vault() else { return Ok(json) };
        match vault.render_bytes(&AggregateRef::new(A::NAME, id), &json).await {
            Ok(rendered) => Ok(rendered.map_or(json, Bytes::from)),
            Err(e) => Err(HttpError::from(StoreError::from(e))),
        }
    }

    /// The id a write goes to, the version it expects, and whether the
    /// client named that version (`If-Match`). A create with retry key
    /// `key` (as the client sent it, not its stored digest: ids were made
    /// from it before keys were hashed) gets the id derived from it.
    fn target(
        &self,
        kind: &Write,
        id: Option<String>,
        parts: &Parts,
        meta: &Metadata,
        key: Option<&str>,
    ) -> Result<(String, ExpectedVersion, bool), HttpError> {
        Ok(match (kind, id) {
            (Write::Create, _) => {
                let id = match key {
                    Some(key) => id_for_key(&self.resource.plural, meta.principal.as_deref(), key),
                    None => self.resource.ids.next(),
                };
                // A custom id strategy could make ids a URL cannot carry.
                check_id(&id)
                    .map_err(|_| HttpError::Internal(format!("the id strategy made an unusable id {id:?}")))?;
                (id, ExpectedVersion::NoStream, false)
            }
            (_, Some(id)) => {
                check_id(&id)?;
                let given = if_match(&parts.headers)?;
                (id, given.unwrap_or(ExpectedVersion::Exists), given.is_some())
            }
            (_, None) => return Err(HttpError::NotFound("no id".into())),
        })
    }

    /// The answer to a write that the bus accepted.
    fn written(&self, kind: &Write, id: &str, done: CommandOutcome<A>, body: Bytes) -> Response {
        let mut response = match kind {
            Write::Create => json_bytes(StatusCode::CREATED, body),
            Write::Update => json_bytes(StatusCode::OK, body),
            Write::Delete => StatusCode::NO_CONTENT.into_response(),
        };
        let headers = response.headers_mut();
        headers.insert(header::ETAG, etag(done.version));
        if let Some(p) = done.position.and_then(|p| HeaderValue::from_str(&position_text(A::NAME, p)).ok()) {
            headers.insert(names::POSITION.clone(), p);
        }
        if done.deduplicated {
            headers.insert(names::REPLAYED.clone(), HeaderValue::from_static("true"));
        }
        if matches!(kind, Write::Create)
            && let Ok(location) = HeaderValue::from_str(&format!("/{}/{id}", self.resource.plural))
        {
            headers.insert(header::LOCATION, location);
        }
        response
    }

    /// Refuses `parts` when the resource's read rule does.
    fn may_read(&self, parts: &Parts) -> Result<(), HttpError> {
        if !self.resource.rules.guards_reads() {
            return Ok(());
        }
        self.resource.rules.check_read(self.shared.caller(parts)?.as_ref())
    }

    async fn get_one(&self, id: String, parts: Parts) -> Result<Response, HttpError> {
        self.may_read(&parts)?;
        let headers = parts.headers;
        check_id(&id)?;
        // The table moves with every append of this process; a write made
        // through another process (several instances on one Kafka log) is
        // there once this process's follower applied it: a token makes the
        // read wait for that, bounded.
        let consistency = match position_token(&headers, A::NAME)? {
            None | Some(None) => "eventual",
            Some(Some(p)) => {
                let timeout = self.shared.config.consistency_timeout;
                if self.bus.store().wait_for_position(p, timeout).await? { "caught-up" } else { "stale" }
            }
        };
        // The state's JSON document: stores that keep JSON hand it over
        // without decoding and encoding it again.
        let document = self.bus.store().load_document(&id).await?;
        let document =
            document.filter(|d| !d.deleted).ok_or_else(|| HttpError::NotFound(format!("no {} {id}", A::NAME)))?;
        if none_match(&headers, document.version)? {
            let mut r = StatusCode::NOT_MODIFIED.into_response();
            r.headers_mut().insert(header::ETAG, etag(document.version));
            return Ok(r);
        }
        let mut r = json_bytes(StatusCode::OK, self.rendered_bytes(&id, document.json).await?);
        r.headers_mut().insert(header::ETAG, etag(document.version));
        r.headers_mut().insert(names::CONSISTENCY.clone(), HeaderValue::from_static(consistency));
        Ok(r)
    }

    async fn list(&self, parts: Parts) -> Result<Response, HttpError> {
        self.may_read(&parts)?;
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(parts.uri.query().unwrap_or(""))
            .map_err(|e| HttpError::MalformedQuery(e.to_string()))?;
        let query = ListQuery::from_pairs(pairs)?;
        if let Some(q) = &query.q {
            let schema = self.view.schema();
            if q.chars().count() > MAX_SEARCH {
                return Err(QueryError::BadSearch(format!("longer than {MAX_SEARCH} characters")).into());
            }
            if q.chars().any(char::is_control) {
                return Err(QueryError::BadSearch("control characters are not searchable".into()).into());
            }
            if !schema.fields.iter().any(|f| f.searchable) {
                return Err(QueryError::BadSearch("this list has no searchable fields".into()).into());
            }
        }
        let consistency = match position_token(&parts.headers, A::NAME)? {
            None | Some(None) => "eventual",
            Some(Some(p)) => {
                if self.catch_up.wait_for(p, self.shared.config.consistency_timeout).await {
                    "caught-up"
                } else {
                    "stale"
                }
            }
        };
        let page = self.view.list(&query).await?;
        let mut r = json_response(StatusCode::OK, &page);
        r.headers_mut().insert(names::CONSISTENCY.clone(), HeaderValue::from_static(consistency));
        Ok(r)
    }

    async fn events(&self, id: String, parts: Parts) -> Result<Response, HttpError> {
        self.may_read(&parts)?;
        check_id(&id)?;
        let (after, size) = history_paging(parts.uri.query())?;
        let consistency = match (&self.history, position_token(&parts.headers, A::NAME)?) {
            // The store itself is the log: always current.
            (None, _) => "caught-up",
            (Some(h), _) if !h.is_projected() => "caught-up",
            (Some(_), None | Some(None)) => "eventual",
            (Some(_), Some(Some(p))) => {
                if self.catch_up.wait_for(p, self.shared.config.consistency_timeout).await {
                    "caught-up"
                } else {
                    "stale"
                }
            }
        };
        let mut page = match &self.history {
            None => kes_core::store_page(self.bus.store(), &id, after, size).await?,
            Some(h) => h.page(&id, after, size).await.map_err(|e| match e {
                HistoryError::Store(e) => HttpError::from(e),
                HistoryError::View(e) => HttpError::from(e),
                other => HttpError::Internal(other.to_string()),
            })?,
        };
        if let Some(vault) = self.vault() {
            let at = AggregateRef::new(A::NAME, &id);
            let mut docs: Vec<(AggregateRef, &mut Value)> =
                page.items.iter_mut().map(|item| (at.clone(), &mut item.payload)).collect();
            vault.render_all(&mut docs).await.map_err(|e| HttpError::from(StoreError::from(e)))?;
        }
        let mut r = if after == 0 && page.items.is_empty() {
            HttpError::NotFound(format!("no {} {id}", A::NAME)).into_response()
        } else {
            json_response(StatusCode::OK, &page)
        };
        r.headers_mut().insert(names::CONSISTENCY.clone(), HeaderValue::from_static(consistency));
        Ok(r)
    }
}

pub(crate) async fn create<A: Aggregate, S: EventStore<A>>(
    State(m): State<MountedRef<A, S>>,
    request: Request,
) -> Result<Response, HttpError> {
    let op = m.resource.create.as_ref().ok_or(HttpError::MethodNotAllowed)?;
    m.write(Write::Create, "create", op, None, request).await
}

pub(crate) async fn replace<A: Aggregate, S: EventStore<A>>(
    State(m): State<MountedRef<A, S>>,
    Path(id): Path<String>,
    request: Request,
) -> Result<Response, HttpError> {
    let op = m.resource.replace.as_ref().ok_or(HttpError::MethodNotAllowed)?;
    m.write(Write::Update, "replace", op, Some(id), request).await
}

pub(crate) async fn patch<A: Aggregate, S: EventStore<A>>(
    State(m): State<MountedRef<A, S>>,
    Path(id): Path<String>,
    request: Request,
) -> Result<Response, HttpError> {
    let op = m.resource.patch.as_ref().ok_or(HttpError::MethodNotAllowed)?;
    m.write(Write::Update, "patch", op, Some(id), request).await
}

pub(crate) async fn delete<A: Aggregate, S: EventStore<A>>(
    State(m): State<MountedRef<A, S>>,
    Path(id): Path<String>,
    request: Request,
) -> Result<Response, HttpError> {
    let op = m.resource.delete.as_ref().ok_or(HttpError::MethodNotAllowed)?;
    m.write(Write::Delete, "delete", op, Some(id), request).await
}

pub(crate) async fn named<A: Aggregate, S: EventStore<A>>(
    State(m): State<MountedRef<A, S>>,
    Path((id, command)): Path<(String, String)>,
    request: Request,
) -> Result<Response, HttpError> {
    let op = m.resource.commands.get(&command).ok_or_else(|| {
        HttpError::NotFound(format!("{} has no command {:?}", A::NAME, command.chars().take(64).collect::<String>()))
    })?;
    m.write(Write::Update, &command, op, Some(id), request).await
}

pub(crate) async fn get_one<A: Aggregate, S: EventStore<A>>(
    State(m): State<MountedRef<A, S>>,
    Path(id): Path<String>,
    request: Request,
) -> Result<Response, HttpError> {
    // The headers are taken from the request, not copied by an extractor.
    m.get_one(id, request.into_parts().0).await
}

pub(crate) async fn list<A: Aggregate, S: EventStore<A>>(
    State(m): State<MountedRef<A, S>>,
    request: Request,
) -> Result<Response, HttpError> {
    m.list(request.into_parts().0).await
}

pub(crate) async fn list_changes<A: Aggregate, S: EventStore<A>>(
    State(m): State<MountedRef<A, S>>,
    request: Request,
) -> Result<Response, HttpError> {
    let parts = request.into_parts().0;
    m.may_read(&parts)?;
    let (query, after) = feed::feed_query(parts.uri.query(), m.view.schema())?;
    let resume = feed::resume_of(&parts.headers, after.as_deref())?;
    m.feeds.list_feed(query, resume).await
}

pub(crate) async fn item_changes<A: Aggregate, S: EventStore<A>>(
    State(m): State<MountedRef<A, S>>,
    Path(id): Path<String>,
    request: Request,
) -> Result<Response, HttpError> {
    let parts = request.into_parts().0;
    m.may_read(&parts)?;
    check_id(&id)?;
    let seen = feed::seen_version(&parts.headers)?;
    m.feeds.item_feed(id, seen).await
}

pub(crate) async fn events<A: Aggregate, S: EventStore<A>>(
    State(m): State<MountedRef<A, S>>,
    Path(id): Path<String>,
    request: Request,
) -> Result<Response, HttpError> {
    m.events(id, request.into_parts().0).await
}
