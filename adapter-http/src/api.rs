//! Mounting aggregates on one router, and the routes that serve them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use kes_core::{
    Aggregate, CatchUp, CommandBus, CommandError, CommandOutcome, EventStore, ExpectedVersion, History, HistoryError,
    ListQuery, ListView, Metadata, Position, ProjectionError, ProjectionRunner, ProjectionStatus, QueryError,
    ReactionRunner, ReactionStatus, StoreError, StoreGauge, StoredStatus,
};
use metrics_exporter_prometheus::PrometheusHandle;
use schemars::JsonSchema;
use serde_json::{Map, Value, json};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::access::ANONYMOUS;
use crate::admin::{self, AdminToken};
use crate::auth::{self, JwtAuth, Principal};
use crate::edge::Edge;
use crate::error::{ConfigError, HttpError, RETRY_AFTER_SECS};
use crate::feed::{self, Hub};
use crate::metrics::Metrics;
use crate::openapi::{self, Describe};
use crate::resource::{Operation, Resource, id_for_key};

/// The position token header: sent with every write answer, sent back by a
/// read that wants to see that write.
pub const POSITION_HEADER: &str = "kes-position";
/// How consistent a list answer is: `eventual` (no token was sent),
/// `caught-up` (the views reached the token) or `stale` (they did not
/// within [`HttpConfig::consistency_timeout`]; the answer is what they had).
pub const CONSISTENCY_HEADER: &str = "kes-consistency";
/// Set to `true` on an answer replayed for a repeated `Idempotency-Key`.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// The retry key of a write.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// The correlation id of a write; without it, the request id is used.
pub const CORRELATION_HEADER: &str = "x-correlation-id";
/// The request id (set by the server when the client sent none).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Longest accepted id, idempotency key, principal or correlation id.
const MAX_TOKEN: usize = 255;
/// Longest accepted full-text query.
const MAX_SEARCH: usize = 256;

/// Tunables of the HTTP adapter.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// `info.title` of the OpenAPI document.
    pub title: String,
    /// `info.version` of the OpenAPI document.
    pub version: String,
    /// Origins allowed by CORS (`http://localhost:5173`); `*` allows any;
    /// empty sends no CORS headers.
    pub cors_origins: Vec<String>,
    /// Largest accepted request body in bytes (413 above).
    pub body_limit: usize,
    /// Longest time a request may take (then 503 `timeout`).
    pub request_timeout: Duration,
    /// Longest time a list read that carries a position token waits for
    /// the views to catch up before it answers with what they have.
    pub consistency_timeout: Duration,
    /// How often an idle change feed sends a heartbeat comment, so that
    /// proxies keep it open.
    pub feed_heartbeat: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            title: "KES API".into(),
            version: "0.1.0".into(),
            cors_origins: Vec::new(),
            body_limit: 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            consistency_timeout: Duration::from_secs(2),
            feed_heartbeat: Duration::from_secs(15),
        }
    }
}

/// Reads the principal of a request (after authentication middleware ran,
/// which may have left it in the headers or the extensions).
pub type PrincipalFn = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;

/// Reports projection progress for `/metrics` (`kes_projection_lag`).
///
/// [`ProjectionRunner`] implements it; so can anything else that knows lags.
#[async_trait]
pub trait ProjectionStatusSource: Send + Sync {
    /// The status of each projection.
    async fn projection_status(&self) -> Result<Vec<ProjectionStatus>, StoreError>;

    /// Starts rebuilding projection `name` here (for
    /// `POST /admin/projections/{name}/rebuild`); `None` when this source
    /// has no projection of that name or cannot rebuild.
    fn start_rebuild(&self, name: &str) -> Option<Result<(), ProjectionError>> {
        let _ = name;
        None
    }
}

/// Reports how reactions are doing, for `/metrics` (`kes_reaction_*`) and
/// `GET /admin/reactions`. [`ReactionRunner`] implements it.
#[async_trait]
pub trait ReactionStatusSource: Send + Sync {
    /// The status of each reaction, with up to `recent` of its latest
    /// refused commands.
    async fn reaction_status(&self, recent: u32) -> Result<Vec<ReactionStatus>, StoreError>;
}

#[async_trait]
impl<A: Aggregate, S: EventStore<A> + Clone> ReactionStatusSource for ReactionRunner<A, S> {
    async fn reaction_status(&self, recent: u32) -> Result<Vec<ReactionStatus>, StoreError> {
        self.status(recent).await
    }
}

/// A dependency `/health` reports on beside the mounted stores and views
/// (e.g. the store a projector process reads, when it mounts no routes).
#[async_trait]
pub trait Readiness: Send + Sync {
    /// Whether it answers now.
    async fn ready(&self) -> bool;
}

#[async_trait]
impl<A: Aggregate, S: EventStore<A> + Clone> ProjectionStatusSource for ProjectionRunner<A, S> {
    async fn projection_status(&self) -> Result<Vec<ProjectionStatus>, StoreError> {
        self.status().await
    }

    fn start_rebuild(&self, name: &str) -> Option<Result<(), ProjectionError>> {
        self.names().iter().any(|n| n == name).then(|| ProjectionRunner::start_rebuild(self, name))
    }
}

#[async_trait]
impl<A: Aggregate, S: EventStore<A>> ProjectionStatusSource for StoredStatus<A, S> {
    async fn projection_status(&self) -> Result<Vec<ProjectionStatus>, StoreError> {
        self.status().await
    }
}

/// Where the principal of a request comes from (see [`crate::access`]).
#[derive(Clone)]
enum Identity {
    /// Everyone is [`ANONYMOUS`]; rules are not asked.
    Anonymous,
    /// The value of a header set by a gateway that authenticates.
    TrustedHeader(HeaderName),
    /// A function of the request.
    Custom(PrincipalFn),
    /// A bearer JWT, verified by the authentication layer.
    Bearer,
}

/// What every route of the API shares.
pub(crate) struct Shared {
    pub(crate) config: HttpConfig,
    identity: Identity,
    pub(crate) metrics: Metrics,
    /// Where each plural's history comes from when not from its store.
    histories: HashMap<String, Arc<dyn History>>,
    /// Turns true at shutdown: the change feeds end.
    stop: tokio::sync::watch::Receiver<bool>,
}

/// Ends the change feeds, so that a graceful shutdown of the server does
/// not wait for clients that never hang up. Call it when shutdown begins
/// (e.g. in the future given to [`serve`](crate::serve)).
#[derive(Debug, Clone)]
pub struct ShutdownHandle(Arc<tokio::sync::watch::Sender<bool>>);

impl ShutdownHandle {
    /// Ends every open feed of the API.
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

impl Shared {
    /// Who sent the request: `None` in an API without identities (the
    /// principal recorded is then [`ANONYMOUS`] and no rule is asked).
    fn caller(&self, parts: &Parts) -> Result<Option<Principal>, HttpError> {
        let subject = match &self.identity {
            Identity::Anonymous => return Ok(None),
            Identity::Bearer => {
                return match parts.extensions.get::<Principal>() {
                    Some(p) => Ok(Some(p.clone())),
                    None => Err(HttpError::Unauthorized { realm: auth::REALM, invalid_token: false }),
                };
            }
            Identity::Custom(f) => f(parts),
            Identity::TrustedHeader(name) => match parts.headers.get(name) {
                None => None,
                Some(v) => Some(
                    v.to_str()
                        .map_err(|_| HttpError::InvalidHeader {
                            name: "principal",
                            reason: "not visible ASCII".into(),
                        })?
                        .trim()
                        .to_owned(),
                ),
            },
        };
        match subject {
            Some(p) if p.len() > MAX_TOKEN => {
                Err(HttpError::InvalidHeader { name: "principal", reason: format!("longer than {MAX_TOKEN} bytes") })
            }
            Some(p) if !p.is_empty() => Ok(Some(Principal { subject: p, roles: Vec::new() })),
            // A gateway that let a request through without a name.
            _ => Ok(Some(Principal { subject: ANONYMOUS.to_owned(), roles: Vec::new() })),
        }
    }
}

/// One mounted aggregate, seen without its types.
#[async_trait]
pub(crate) trait Mount: Describe + Send + Sync {
    fn plural(&self) -> &str;
    /// Name and reachability of each backend this mount uses.
    async fn readiness(&self) -> Vec<(String, bool)>;
    /// The aggregate type and what its store reports for `/metrics`.
    fn store_gauges(&self) -> (&'static str, Vec<StoreGauge>);
}

/// The REST API: aggregates mounted under their plural names, plus
/// `/openapi.json`, `/health` and `/metrics`.
///
/// ```
/// # use kes_http::doc_fixtures::{Task, TaskCommand};
/// use std::sync::Arc;
/// use kes_core::{CommandBus, InMemoryStore, InMemoryView, ProjectionRunner, ViewProjection, ViewSchema, Field};
/// use kes_http::{Api, HttpConfig, Resource};
/// use serde::Deserialize;
///
/// #[derive(Deserialize, schemars::JsonSchema)]
/// struct OpenTask { #[serde(default)] title: String }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let store = InMemoryStore::<Task>::new();
/// let view = Arc::new(InMemoryView::new(ViewSchema::new("tasks", 1).field(Field::text("title").searchable())).unwrap());
/// let projection = ViewProjection::<Task>::new(view.clone(), |t| [("title".to_owned(), t.title.as_str().into())].into());
/// let runner = ProjectionRunner::new(store.clone(), vec![Arc::new(projection)], Default::default());
/// runner.start().await.unwrap();
///
/// let tasks = Resource::<Task>::new("tasks").create(|b: OpenTask| TaskCommand::Open(b.title));
/// let app: axum::Router = Api::new(HttpConfig::default())
///     .mount(tasks, Arc::new(CommandBus::new(store)), view, runner.clone())
///     .unwrap()
///     .projections(runner)
///     .into_router();
/// // kes_http::serve(listener, app, Default::default(), shutdown).await
/// # let _ = app;
/// # });
/// ```
pub struct Api {
    config: HttpConfig,
    identity: Identity,
    prometheus: Option<PrometheusHandle>,
    routes: Vec<Box<dyn FnOnce(Arc<Shared>) -> Router + Send>>,
    mounts: Vec<Arc<dyn Mount>>,
    sources: Vec<Arc<dyn ProjectionStatusSource>>,
    reactions: Vec<Arc<dyn ReactionStatusSource>>,
    histories: HashMap<String, Arc<dyn History>>,
    checks: Vec<(String, Arc<dyn Readiness>)>,
    admin: Option<AdminToken>,
    admin_role: String,
    auth: Option<Arc<JwtAuth>>,
    stop: Arc<tokio::sync::watch::Sender<bool>>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("config", &self.config)
            .field("mounts", &self.mounts.iter().map(|m| m.plural().to_owned()).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Api {
    /// An API with nothing mounted.
    pub fn new(config: HttpConfig) -> Self {
        Self {
            config,
            identity: Identity::Anonymous,
            prometheus: None,
            routes: Vec::new(),
            mounts: Vec::new(),
            sources: Vec::new(),
            reactions: Vec::new(),
            histories: HashMap::new(),
            checks: Vec::new(),
            admin: None,
            admin_role: "admin".to_owned(),
            auth: None,
            stop: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    /// The handle that ends this API's change feeds at shutdown.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(Arc::clone(&self.stop))
    }

    /// Mounts `resource` under `/{plural}`: commands go through `bus`,
    /// lists come from `view`, and `catch_up` (usually the
    /// [`ProjectionRunner`] feeding `view`) lets reads wait for writes.
    ///
    /// `S` may be a concrete store or an `Arc<dyn EventStore<A>>` chosen
    /// at run time. Fails when a name is invalid, reserved or taken.
    pub fn mount<A, S>(
        mut self,
        resource: Resource<A>,
        bus: Arc<CommandBus<A, S>>,
        view: Arc<dyn ListView>,
        catch_up: Arc<dyn CatchUp>,
    ) -> Result<Self, ConfigError>
    where
        A: Aggregate + JsonSchema,
        S: EventStore<A>,
    {
        resource.validate()?;
        if self.mounts.iter().any(|m| m.plural() == resource.plural) {
            return Err(ConfigError(format!("/{} is mounted twice", resource.plural)));
        }
        let description = Arc::new(MountedDescription::<A> {
            resource: resource.clone(),
            schema: view.schema().clone(),
            bus_store: Arc::new(StorePing { bus: Arc::clone(&bus) }),
            view: Arc::clone(&view),
        });
        self.mounts.push(description);
        self.routes.push(Box::new(move |shared| {
            let history = shared.histories.get(&resource.plural).cloned();
            let feeds = Hub::new(
                Arc::clone(&bus),
                Arc::clone(&view),
                Arc::clone(&catch_up),
                shared.stop.clone(),
                shared.metrics.clone(),
                shared.config.feed_heartbeat,
            );
            let mounted = Arc::new(Mounted { resource, bus, view, catch_up, history, shared, feeds });
            routes(mounted)
        }));
        Ok(self)
    }

    /// Serves `GET /{plural}/{id}/events` of an already mounted resource
    /// from `history` instead of its event store: e.g. a
    /// [`ViewHistory`](kes_core::ViewHistory) kept by a
    /// [`HistoryProjection`](kes_core::HistoryProjection) (run it by the
    /// runner given as `catch_up` to [`Api::mount`], so that history reads
    /// carrying `KES-Position` wait for it). Fails when nothing is mounted
    /// under `/{plural}` or a history is set twice.
    pub fn history(mut self, plural: &str, history: Arc<dyn History>) -> Result<Self, ConfigError> {
        if !self.mounts.iter().any(|m| m.plural() == plural) {
            return Err(ConfigError(format!("no resource is mounted under /{plural}")));
        }
        if self.histories.insert(plural.to_owned(), history).is_some() {
            return Err(ConfigError(format!("/{plural} has two histories")));
        }
        Ok(self)
    }

    /// Reads the principal of each request with `f` (a request for which
    /// it finds none is [`ANONYMOUS`]). Resource rules apply to what it
    /// finds, with no roles. Replaced by [`Api::authenticate`] or
    /// [`Api::trust_principal_header`] when called after them.
    pub fn principal(mut self, f: impl Fn(&Parts) -> Option<String> + Send + Sync + 'static) -> Self {
        self.identity = Identity::Custom(Arc::new(f));
        self
    }

    /// **Trusted-header mode**: the principal of each request is the value
    /// of header `name` (e.g. `x-principal`), as set by a gateway in front
    /// of the service that authenticates callers and removes the header
    /// from what they send; resource rules apply to it, with no roles. Off
    /// by default, because anyone who reaches the service without passing
    /// the gateway can name themselves anyone. A request without the
    /// header is [`ANONYMOUS`].
    pub fn trust_principal_header(mut self, name: HeaderName) -> Self {
        self.identity = Identity::TrustedHeader(name);
        self
    }

    /// Adds a dependency that `/health` reports as `name` (`up`/`down`)
    /// beside the mounted stores and views.
    pub fn readiness(mut self, name: impl Into<String>, check: Arc<dyn Readiness>) -> Self {
        self.checks.push((name.into(), check));
        self
    }

    /// Adds a source of projection lags for `/metrics` (and for the admin
    /// endpoints, see [`Api::admin`]).
    pub fn projections(mut self, source: Arc<dyn ProjectionStatusSource>) -> Self {
        self.sources.push(source);
        self
    }

    /// Requires a bearer JWT verified by `auth` on every route of the
    /// mounted resources (see [`crate::auth`]): the principal of every
    /// command is then the token's subject, with the token's roles, and
    /// no header can claim another. `/health`, `/metrics` and
    /// `/openapi.json` stay open; the admin endpoints are served to tokens
    /// with the admin role (see [`Api::admin_role`]) and to the admin
    /// token, when one is set.
    pub fn authenticate(mut self, auth: impl Into<Arc<JwtAuth>>) -> Self {
        self.auth = Some(auth.into());
        self.identity = Identity::Bearer;
        self
    }

    /// The role a JWT must grant for the admin endpoints (`admin` by
    /// default); see [`Api::authenticate`].
    pub fn admin_role(mut self, role: impl Into<String>) -> Self {
        self.admin_role = role.into();
        self
    }

    /// Adds reactions to report on: `/metrics` (`kes_reaction_*`) and,
    /// with [`Api::admin`], `GET /admin/reactions`.
    pub fn reactions(mut self, source: Arc<dyn ReactionStatusSource>) -> Self {
        self.reactions.push(source);
        self
    }

    /// Serves the operator endpoints to requests carrying `token` as
    /// `Authorization: Bearer …`: `GET /admin/projections` (status and
    /// rebuild progress of every projection given to
    /// [`Api::projections`]), `POST /admin/projections/{name}/rebuild`
    /// (a rebuild where this process leads the projection) and
    /// `GET /admin/reactions` (every reaction given to [`Api::reactions`]:
    /// progress, counts and its latest refused commands). Without a token
    /// these routes do not exist.
    pub fn admin(mut self, token: AdminToken) -> Self {
        self.admin = Some(token);
        self
    }

    /// Records into the process-wide recorder that `handle` renders (from
    /// `PrometheusBuilder::install_recorder`), so that the application's
    /// own metrics appear on `/metrics` too. Without it, the API keeps a
    /// recorder of its own.
    pub fn prometheus(mut self, handle: PrometheusHandle) -> Self {
        self.prometheus = Some(handle);
        self
    }

    /// The finished router, with every layer applied.
    pub fn into_router(self) -> Router {
        let metrics = match self.prometheus {
            Some(handle) => Metrics::global(handle),
            None => Metrics::local(),
        };
        let shared = Arc::new(Shared {
            config: self.config,
            identity: self.identity.clone(),
            metrics,
            histories: self.histories,
            stop: self.stop.subscribe(),
        });
        let document = Arc::new(openapi::document(&shared.config, &self.mounts, self.auth.is_some()));
        let admins = admin::Admins { token: self.admin, jwt: self.auth.clone().map(|auth| (auth, self.admin_role)) };
        let admin = admins.any().then(|| admin::routes(admins, self.sources.clone(), self.reactions.clone()));
        let service = Arc::new(Service {
            mounts: self.mounts,
            sources: self.sources,
            reactions: self.reactions,
            checks: self.checks,
            shared: Arc::clone(&shared),
        });

        let mut router = Router::new()
            .route("/openapi.json", get(move || openapi_json(Arc::clone(&document))))
            .route("/health", get(health).with_state(Arc::clone(&service)))
            .route("/metrics", get(metrics_text).with_state(service));
        let mut resources = Router::new();
        for build in self.routes {
            resources = resources.merge(build(Arc::clone(&shared)));
        }
        if let Some(auth) = self.auth {
            resources = resources.layer(axum::middleware::from_fn(move |mut request: Request, next: Next| {
                let verified = auth.authenticate_request(&request);
                async move {
                    match verified {
                        Ok(principal) => {
                            request.extensions_mut().insert(principal);
                            next.run(request).await
                        }
                        Err(refused) => refused.into_response(),
                    }
                }
            }));
        }
        router = router.merge(resources);
        if let Some(admin) = admin {
            router = router.merge(admin);
        }
        let config = &shared.config;
        let routes = router
            .fallback(|| async { HttpError::NotFound("no such route".into()) })
            .method_not_allowed_fallback(|| async { HttpError::MethodNotAllowed });
        // Without allowed origins CORS has nothing to add.
        let cors = (!config.cors_origins.is_empty()).then(|| cors(config, &self.identity));
        let edge = Edge::new(routes, cors, config.body_limit, config.request_timeout);
        // The edge sits outside the routes: routing must see the path without its slash.
        Router::new().fallback_service(edge)
    }
}

fn cors(config: &HttpConfig, identity: &Identity) -> CorsLayer {
    let origin = if config.cors_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(config.cors_origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    let h = |s: &'static str| HeaderName::from_static(s);
    let trusted = match identity {
        Identity::TrustedHeader(name) => Some(name.clone()),
        _ => None,
    };
    CorsLayer::new()
        .allow_origin(origin)
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE])
        .allow_headers(
            [
                header::CONTENT_TYPE,
                header::IF_MATCH,
                header::IF_NONE_MATCH,
                header::AUTHORIZATION,
                h(IDEMPOTENCY_KEY_HEADER),
                h(POSITION_HEADER),
                h(CORRELATION_HEADER),
                h(REQUEST_ID_HEADER),
            ]
            .into_iter()
            .chain(trusted)
            .collect::<Vec<_>>(),
        )
        .expose_headers([
            header::ETAG,
            header::LOCATION,
            header::RETRY_AFTER,
            h(POSITION_HEADER),
            h(CONSISTENCY_HEADER),
            h(REPLAYED_HEADER),
            h(REQUEST_ID_HEADER),
        ])
        .max_age(Duration::from_secs(600))
}

async fn openapi_json(document: Arc<Value>) -> Response {
    json_response(StatusCode::OK, document.as_ref())
}

/// What `/health` and `/metrics` need.
struct Service {
    mounts: Vec<Arc<dyn Mount>>,
    sources: Vec<Arc<dyn ProjectionStatusSource>>,
    reactions: Vec<Arc<dyn ReactionStatusSource>>,
    checks: Vec<(String, Arc<dyn Readiness>)>,
    shared: Arc<Shared>,
}

async fn health(State(service): State<Arc<Service>>) -> Response {
    let checks = futures::future::join_all(service.mounts.iter().map(|m| m.readiness())).await;
    let extra = futures::future::join_all(service.checks.iter().map(|(name, check)| async move {
        let up = tokio::time::timeout(Duration::from_secs(2), check.ready()).await.unwrap_or(false);
        (name.clone(), up)
    }))
    .await;
    let mut ok = true;
    let mut out = Map::new();
    for (name, up) in checks.into_iter().flatten().chain(extra) {
        ok &= up;
        out.insert(name, json!(if up { "up" } else { "down" }));
    }
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let mut response =
        json_response(status, &json!({ "status": if ok { "ok" } else { "unavailable" }, "checks": out }));
    if !ok {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    }
    response
}

async fn metrics_text(State(service): State<Arc<Service>>) -> Response {
    for source in &service.sources {
        let polled = tokio::time::timeout(Duration::from_secs(2), source.projection_status()).await;
        match polled {
            Ok(Ok(statuses)) => service.shared.metrics.projections(&statuses),
            Ok(Err(e)) => tracing::warn!(error = %e, "projection status unavailable for /metrics"),
            Err(_) => tracing::warn!("projection status timed out for /metrics"),
        }
    }
    for source in &service.reactions {
        match tokio::time::timeout(Duration::from_secs(2), source.reaction_status(0)).await {
            Ok(Ok(statuses)) => service.shared.metrics.reactions(&statuses),
            Ok(Err(e)) => tracing::warn!(error = %e, "reaction status unavailable for /metrics"),
            Err(_) => tracing::warn!("reaction status timed out for /metrics"),
        }
    }
    for mount in &service.mounts {
        let (aggregate, gauges) = mount.store_gauges();
        service.shared.metrics.store(aggregate, &gauges);
    }
    let mut response = service.shared.metrics.render().into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    response
}

/// Pings the store behind a bus, without knowing `S`.
#[async_trait]
trait Ping: Send + Sync {
    async fn ping(&self) -> Result<(), StoreError>;
    fn gauges(&self) -> Vec<StoreGauge>;
}

struct StorePing<A: Aggregate, S> {
    bus: Arc<CommandBus<A, S>>,
}

#[async_trait]
impl<A: Aggregate, S: EventStore<A>> Ping for StorePing<A, S> {
    async fn ping(&self) -> Result<(), StoreError> {
        self.bus.store().ping().await
    }

    fn gauges(&self) -> Vec<StoreGauge> {
        self.bus.store().gauges()
    }
}

/// The type-erased side of a mount: docs and readiness.
pub(crate) struct MountedDescription<A: Aggregate> {
    pub(crate) resource: Resource<A>,
    pub(crate) schema: kes_core::ViewSchema,
    bus_store: Arc<dyn Ping>,
    view: Arc<dyn ListView>,
}

#[async_trait]
impl<A: Aggregate + JsonSchema> Mount for MountedDescription<A> {
    fn plural(&self) -> &str {
        &self.resource.plural
    }

    fn store_gauges(&self) -> (&'static str, Vec<StoreGauge>) {
        (A::NAME, self.bus_store.gauges())
    }

    async fn readiness(&self) -> Vec<(String, bool)> {
        let probe = Duration::from_secs(2);
        let store = tokio::time::timeout(probe, self.bus_store.ping()).await;
        let view = tokio::time::timeout(probe, self.view.position()).await;
        if let Ok(Err(e)) = &store {
            tracing::warn!(aggregate = A::NAME, error = %e, "store not ready");
        }
        if let Ok(Err(e)) = &view {
            tracing::warn!(aggregate = A::NAME, error = %e, "list view not ready");
        }
        vec![
            (format!("{}.store", self.resource.plural), matches!(store, Ok(Ok(_)))),
            (format!("{}.view", self.resource.plural), matches!(view, Ok(Ok(_)))),
        ]
    }
}

/// The typed side of a mount: what its routes run on.
struct Mounted<A: Aggregate, S> {
    resource: Resource<A>,
    bus: Arc<CommandBus<A, S>>,
    view: Arc<dyn ListView>,
    catch_up: Arc<dyn CatchUp>,
    /// `None`: history comes from the store.
    history: Option<Arc<dyn History>>,
    shared: Arc<Shared>,
    /// The change feeds.
    feeds: Arc<Hub<A, S>>,
}

type M<A, S> = Arc<Mounted<A, S>>;

fn routes<A: Aggregate, S: EventStore<A>>(m: M<A, S>) -> Router {
    let plural = m.resource.plural.clone();
    let mut collection: MethodRouter<M<A, S>> = get(list::<A, S>);
    if m.resource.create.is_some() {
        collection = collection.post(create::<A, S>);
    }
    let mut item: MethodRouter<M<A, S>> = get(get_one::<A, S>);
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

pub(crate) fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(bytes) => {
            let mut r = (status, bytes).into_response();
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        Err(e) => HttpError::Internal(format!("cannot serialise the answer: {e}")).into_response(),
    }
}

fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
}

pub(crate) fn header_text<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, HttpError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| HttpError::InvalidHeader { name, reason: "not visible ASCII".into() }),
    }
}

/// `If-Match` → the expected version: `"3"` (or `3`) → exactly 3, `*` → it
/// must exist. One tag only: a version is a single point. Exactly what
/// the OpenAPI document's pattern admits (`kes.IfMatch`).
fn if_match(headers: &HeaderMap) -> Result<Option<ExpectedVersion>, HttpError> {
    let Some(text) = header_text(headers, "if-match")? else { return Ok(None) };
    if text == "*" {
        return Ok(Some(ExpectedVersion::Exists));
    }
    let bad = || HttpError::InvalidHeader {
        name: "if-match",
        reason: "expected * or one entity tag holding a version, like \"3\"".into(),
    };
    let tag = match text.strip_prefix('"') {
        Some(quoted) => quoted.strip_suffix('"').ok_or_else(bad)?,
        None => text,
    };
    version_digits(tag).map(|v| Some(ExpectedVersion::Exact(v))).ok_or_else(bad)
}

/// A version written as the document says: 1 to 19 digits, no leading zero.
fn version_digits(text: &str) -> Option<u64> {
    let plain = (1..=19).contains(&text.len()) && !text.starts_with('0') && text.bytes().all(|b| b.is_ascii_digit());
    if plain { text.parse().ok() } else { None }
}

/// Whether `If-None-Match` names `version` (weak comparison, as RFC 9110 asks).
fn none_match(headers: &HeaderMap, version: u64) -> Result<bool, HttpError> {
    let Some(text) = header_text(headers, "if-none-match")? else { return Ok(false) };
    Ok(text.split(',').map(str::trim).any(|tag| {
        tag == "*" || {
            let tag = tag.strip_prefix("W/").unwrap_or(tag);
            tag.strip_prefix('"').and_then(|t| t.strip_suffix('"')).unwrap_or(tag).parse::<u64>() == Ok(version)
        }
    }))
}

/// The `KES-Position` token of a write to `log` (the aggregate type) at
/// `position`: `LOG@PARTITION:OFFSET`. Every aggregate type has a log of its
/// own (its SQL table is partition 0 of it; on Kafka, its events topic), so
/// a token names the log its position belongs to.
fn position_text(log: &str, position: Position) -> String {
    format!("{log}@{position}")
}

/// A `KES-Position` token of a read on the resource whose log is `log`:
/// `None` without one, `Some(None)` for a token of another log (another
/// aggregate type: nothing here can wait for it), `Some(Some(position))`
/// for one of `log` (or a bare `PARTITION:OFFSET`, taken to be of `log`).
fn position_token(headers: &HeaderMap, log: &str) -> Result<Option<Option<Position>>, HttpError> {
    let text = match header_text(headers, POSITION_HEADER)? {
        None | Some("") => return Ok(None),
        Some(text) => text,
    };
    let bad = || HttpError::InvalidHeader {
        name: POSITION_HEADER,
        reason: "expected LOG@PARTITION:OFFSET (a log name of letters, digits, _ . -; at most 9 and 19 digits)".into(),
    };
    let (named, position) = match text.split_once('@') {
        Some((named, position)) => (Some(named), position),
        None => (None, text),
    };
    if let Some(named) = named
        && !((1..=64).contains(&named.len())
            && named.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')))
    {
        return Err(bad());
    }
    // The document's pattern bounds the digits so that every token it
    // admits fits: 9 for the partition, 19 for the offset.
    let fits = position.split_once(':').is_some_and(|(p, o)| p.len() <= 9 && o.len() <= 19);
    let position = position.parse::<Position>().ok().filter(|_| fits).ok_or_else(bad)?;
    Ok(Some(match named {
        Some(named) if named != log => None,
        _ => Some(position),
    }))
}

/// An id as the document's `kes.Id` pattern says (see [`crate::id`]).
fn check_id(id: &str) -> Result<(), HttpError> {
    if !crate::id::is_valid_id(id) {
        return Err(HttpError::BadRequest(crate::id::ID_RULE.to_owned()));
    }
    Ok(())
}

/// An `Idempotency-Key` as the document's `kes.IdempotencyKey` says: 1 to
/// 255 visible ASCII characters and inner spaces.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, HttpError> {
    let Some(key) = header_text(headers, IDEMPOTENCY_KEY_HEADER)? else { return Ok(None) };
    if key.is_empty() || key.len() > MAX_TOKEN || !key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(HttpError::InvalidHeader {
            name: IDEMPOTENCY_KEY_HEADER,
            reason: format!("a key is 1 to {MAX_TOKEN} visible ASCII characters (inner spaces allowed)"),
        });
    }
    Ok(Some(key.to_owned()))
}

fn bounded_token(headers: &HeaderMap, name: &'static str) -> Result<Option<String>, HttpError> {
    match header_text(headers, name)? {
        None | Some("") => Ok(None),
        Some(t) if t.len() > MAX_TOKEN => {
            Err(HttpError::InvalidHeader { name, reason: format!("longer than {MAX_TOKEN} bytes") })
        }
        Some(t) => Ok(Some(t.to_owned())),
    }
}

/// Who asked (`caller`, from [`Shared::caller`]), as part of what, under
/// which retry key.
fn metadata(parts: &Parts, caller: Option<&Principal>) -> Result<Metadata, HttpError> {
    let request_id = bounded_token(&parts.headers, REQUEST_ID_HEADER).ok().flatten();
    let correlation_id = bounded_token(&parts.headers, CORRELATION_HEADER)?.or_else(|| request_id.clone());
    let mut extra = std::collections::BTreeMap::new();
    if let Some(r) = request_id {
        extra.insert("request_id".to_owned(), r);
    }
    Ok(Metadata {
        correlation_id,
        causation_id: None,
        principal: Some(caller.map_or_else(|| ANONYMOUS.to_owned(), |c| c.subject.clone())),
        idempotency_key: idempotency_key(&parts.headers)?,
        extra,
    })
}

/// Reads the body: JSON, or a flat form turned into a JSON object; an
/// empty body is `{}`.
async fn read_body<C>(shared: &Shared, parts: &Parts, body: Body, op: &Operation<C>) -> Result<Value, HttpError> {
    let limit = shared.config.body_limit;
    let bytes: Bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        // The limit error sits somewhere in the chain (axum and tower-http both wrap it).
        let too_large = std::iter::successors(std::error::Error::source(&e), |s| s.source())
            .any(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            HttpError::PayloadTooLarge(limit)
        } else {
            HttpError::MalformedBody("the body could not be read".into())
        }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    let media = match header_text(&parts.headers, "content-type")? {
        None => "application/json".to_owned(),
        Some(t) => t.split(';').next().unwrap_or("").trim().to_ascii_lowercase(),
    };
    if media == "application/json" || (media.starts_with("application/") && media.ends_with("+json")) {
        return serde_json::from_slice(&bytes).map_err(|e| HttpError::MalformedBody(format!("not JSON: {e}")));
    }
    if media == "application/x-www-form-urlencoded" {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes)
            .map_err(|e| HttpError::MalformedBody(format!("not form data: {e}")))?;
        let mut fields = Map::new();
        for (k, v) in pairs {
            match fields.get_mut(&k) {
                // A repeated key is a list (`tag=a&tag=b`).
                Some(Value::Array(items)) => items.push(v.into()),
                Some(first) => *first = Value::Array(vec![first.take(), v.into()]),
                None => {
                    fields.insert(k, v.into());
                }
            }
        }
        return Ok(op.coerce_form(fields));
    }
    Err(HttpError::UnsupportedMediaType(media.chars().take(64).collect()))
}

/// How a write ended, for the metrics' `outcome` label.
fn outcome<E>(result: &Result<CommandOutcome<impl Sized>, CommandError<E>>) -> &'static str {
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

enum Write {
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
        let meta = metadata(&parts, caller.as_ref())?;
        let (id, expected, if_match) = match (&kind, id) {
            (Write::Create, _) => {
                let id = match &meta.idempotency_key {
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
        };
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
        let done = result.map_err(|e| match e {
            CommandError::Rejected(e) => HttpError::Rejected(e.to_string()),
            CommandError::Forbidden(rule) => HttpError::Forbidden(rule),
            CommandError::NotFound { .. } => HttpError::NotFound(format!("no {} {id}", A::NAME)),
            CommandError::Conflict { actual, .. } if if_match => {
                HttpError::PreconditionFailed(format!("{} {id} is at version {actual}", A::NAME))
            }
            CommandError::Conflict { actual, .. } if actual > 0 && matches!(kind, Write::Create) => {
                HttpError::Conflict(format!("{} {id} already exists", A::NAME))
            }
            CommandError::Conflict { actual, .. } => {
                HttpError::Conflict(format!("{} {id} changed meanwhile; it is at version {actual}", A::NAME))
            }
            CommandError::Store(e) => HttpError::from(e),
            other => HttpError::Internal(other.to_string()),
        })?;
        let mut response = match kind {
            Write::Create => json_response(StatusCode::CREATED, &done.state),
            Write::Update => json_response(StatusCode::OK, &done.state),
            Write::Delete => StatusCode::NO_CONTENT.into_response(),
        };
        let headers = response.headers_mut();
        headers.insert(header::ETAG, etag(done.version));
        if let Some(p) = done.position.and_then(|p| HeaderValue::from_str(&position_text(A::NAME, p)).ok()) {
            headers.insert(POSITION_HEADER, p);
        }
        if done.deduplicated {
            headers.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
        }
        if matches!(kind, Write::Create)
            && let Ok(location) = HeaderValue::from_str(&format!("/{}/{id}", self.resource.plural))
        {
            headers.insert(header::LOCATION, location);
        }
        Ok(response)
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
        let mut r = (StatusCode::OK, document.json).into_response();
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r.headers_mut().insert(header::ETAG, etag(document.version));
        r.headers_mut().insert(CONSISTENCY_HEADER, HeaderValue::from_static(consistency));
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
        r.headers_mut().insert(CONSISTENCY_HEADER, HeaderValue::from_static(consistency));
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
        let page = match &self.history {
            None => kes_core::store_page(self.bus.store(), &id, after, size).await?,
            Some(h) => h.page(&id, after, size).await.map_err(|e| match e {
                HistoryError::Store(e) => HttpError::from(e),
                HistoryError::View(e) => HttpError::from(e),
                other => HttpError::Internal(other.to_string()),
            })?,
        };
        let mut r = if after == 0 && page.items.is_empty() {
            HttpError::NotFound(format!("no {} {id}", A::NAME)).into_response()
        } else {
            json_response(StatusCode::OK, &page)
        };
        r.headers_mut().insert(CONSISTENCY_HEADER, HeaderValue::from_static(consistency));
        Ok(r)
    }
}

/// Rows of history per page when the client names no `page[size]`.
pub const HISTORY_DEFAULT_PAGE: u32 = 1_000;

/// `page[after]` (a version, default 0) and `page[size]` (1 to
/// [`kes_core::history::HISTORY_MAX_PAGE`]) of a history request; any
/// other parameter is refused.
fn history_paging(query: Option<&str>) -> Result<(u64, u32), HttpError> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query.unwrap_or("")).map_err(|e| HttpError::MalformedQuery(e.to_string()))?;
    let (mut after, mut size) = (0u64, HISTORY_DEFAULT_PAGE);
    let max = kes_core::history::HISTORY_MAX_PAGE;
    for (key, value) in pairs {
        match key.as_str() {
            "page[after]" => {
                after = value.parse().map_err(|_| {
                    HttpError::MalformedQuery(format!("page[after] must be a version (a whole number), not {value:?}"))
                })?;
            }
            "page[size]" => {
                size = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=max).contains(n))
                    .ok_or_else(|| HttpError::MalformedQuery(format!("page[size] must be 1 to {max}")))?;
            }
            other => {
                return Err(HttpError::MalformedQuery(format!(
                    "unknown parameter {other:?}: history takes page[size] and page[after]"
                )));
            }
        }
    }
    Ok((after, size))
}

async fn create<A: Aggregate, S: EventStore<A>>(
    State(m): State<M<A, S>>,
    request: Request,
) -> Result<Response, HttpError> {
    let op = m.resource.create.as_ref().ok_or(HttpError::MethodNotAllowed)?;
    m.write(Write::Create, "create", op, None, request).await
}

async fn replace<A: Aggregate, S: EventStore<A>>(
    State(m): State<M<A, S>>,
    Path(id): Path<String>,
    request: Request,
) -> Result<Response, HttpError> {
    let op = m.resource.replace.as_ref().ok_or(HttpError::MethodNotAllowed)?;
    m.write(Write::Update, "replace", op, Some(id), request).await
}

async fn patch<A: Aggregate, S: EventStore<A>>(
    State(m): State<M<A, S>>,
    Path(id): Path<String>,
    request: Request,
) -> Result<Response, HttpError> {
    let op = m.resource.patch.as_ref().ok_or(HttpError::MethodNotAllowed)?;
    m.write(Write::Update, "patch", op, Some(id), request).await
}

async fn delete<A: Aggregate, S: EventStore<A>>(
    State(m): State<M<A, S>>,
    Path(id): Path<String>,
    request: Request,
) -> Result<Response, HttpError> {
    let op = m.resource.delete.as_ref().ok_or(HttpError::MethodNotAllowed)?;
    m.write(Write::Delete, "delete", op, Some(id), request).await
}

async fn named<A: Aggregate, S: EventStore<A>>(
    State(m): State<M<A, S>>,
    Path((id, command)): Path<(String, String)>,
    request: Request,
) -> Result<Response, HttpError> {
    let op = m.resource.commands.get(&command).ok_or_else(|| {
        HttpError::NotFound(format!("{} has no command {:?}", A::NAME, command.chars().take(64).collect::<String>()))
    })?;
    m.write(Write::Update, &command, op, Some(id), request).await
}

async fn get_one<A: Aggregate, S: EventStore<A>>(
    State(m): State<M<A, S>>,
    Path(id): Path<String>,
    request: Request,
) -> Result<Response, HttpError> {
    // The headers are taken from the request, not copied by an extractor.
    m.get_one(id, request.into_parts().0).await
}

async fn list<A: Aggregate, S: EventStore<A>>(
    State(m): State<M<A, S>>,
    request: Request,
) -> Result<Response, HttpError> {
    m.list(request.into_parts().0).await
}

async fn list_changes<A: Aggregate, S: EventStore<A>>(
    State(m): State<M<A, S>>,
    request: Request,
) -> Result<Response, HttpError> {
    let parts = request.into_parts().0;
    m.may_read(&parts)?;
    let (query, after) = feed::feed_query(parts.uri.query(), m.view.schema())?;
    let resume = feed::resume_of(&parts.headers, after.as_deref())?;
    m.feeds.list_feed(query, resume).await
}

async fn item_changes<A: Aggregate, S: EventStore<A>>(
    State(m): State<M<A, S>>,
    Path(id): Path<String>,
    request: Request,
) -> Result<Response, HttpError> {
    let parts = request.into_parts().0;
    m.may_read(&parts)?;
    check_id(&id)?;
    let seen = feed::seen_version(&parts.headers)?;
    m.feeds.item_feed(id, seen).await
}

async fn events<A: Aggregate, S: EventStore<A>>(
    State(m): State<M<A, S>>,
    Path(id): Path<String>,
    request: Request,
) -> Result<Response, HttpError> {
    m.events(id, request.into_parts().0).await
}
