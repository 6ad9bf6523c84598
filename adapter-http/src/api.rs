//! The API: its settings, how aggregates are mounted on one router, and
//! what every route shares (identities, metrics, shutdown).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::IntoResponse;
use axum::routing::get;
use http::request::Parts;
use http::{HeaderName, HeaderValue, Method, header};
use kes_core::{
    Aggregate, CatchUp, CommandBus, EventStore, History, ListView, ProjectionError, ProjectionRunner, ProjectionStatus,
    ReactionRunner, ReactionStatus, StoreError, StoreGauge, StoredStatus, Vault,
};
use metrics_exporter_prometheus::PrometheusHandle;
use schemars::JsonSchema;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::access::ANONYMOUS;
use crate::admin::{self, AdminToken};
use crate::auth::{self, JwtAuth, Principal};
use crate::edge::Edge;
use crate::error::{ConfigError, HttpError};
use crate::feed::Hub;
use crate::metrics::Metrics;
use crate::openapi::{self, Describe};
use crate::ops::{MountedDescription, Service, StorePing, health, metrics_text, openapi_json};
use crate::resource::Resource;
use crate::routes::{Mounted, routes};

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

/// The header names the routes read and write, parsed once: a name given
/// as text is parsed (and a custom one hashed byte by byte) on every use.
pub(crate) mod names {
    use http::{HeaderName, header};

    pub(crate) static POSITION: HeaderName = HeaderName::from_static(super::POSITION_HEADER);
    pub(crate) static CONSISTENCY: HeaderName = HeaderName::from_static(super::CONSISTENCY_HEADER);
    pub(crate) static REPLAYED: HeaderName = HeaderName::from_static(super::REPLAYED_HEADER);
    pub(crate) static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static(super::IDEMPOTENCY_KEY_HEADER);
    pub(crate) static CORRELATION: HeaderName = HeaderName::from_static(super::CORRELATION_HEADER);
    pub(crate) static REQUEST_ID: HeaderName = HeaderName::from_static(super::REQUEST_ID_HEADER);
    pub(crate) static LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");
    pub(crate) static IF_MATCH: HeaderName = header::IF_MATCH;
    pub(crate) static IF_NONE_MATCH: HeaderName = header::IF_NONE_MATCH;
    pub(crate) static CONTENT_TYPE: HeaderName = header::CONTENT_TYPE;
}

/// Longest accepted id, idempotency key, principal or correlation id.
pub(crate) const MAX_TOKEN: usize = 255;
/// Longest accepted full-text query.
pub(crate) const MAX_SEARCH: usize = 256;

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
    /// The values of headers set by a gateway that authenticates: the
    /// principal's, and (when named) its roles'.
    TrustedHeader { principal: HeaderName, roles: Option<HeaderName> },
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
    pub(crate) fn caller(&self, parts: &Parts) -> Result<Option<Principal>, HttpError> {
        let subject = match &self.identity {
            Identity::Anonymous => return Ok(None),
            Identity::Bearer => {
                return match parts.extensions.get::<Principal>() {
                    Some(p) => Ok(Some(p.clone())),
                    None => Err(HttpError::Unauthorized { realm: auth::REALM, invalid_token: false }),
                };
            }
            Identity::Custom(f) => f(parts),
            Identity::TrustedHeader { principal, .. } => match parts.headers.get(principal) {
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
        let Some(subject) = subject.filter(|s| !s.is_empty()) else {
            // A gateway that let a request through without a name: no
            // roles either, whatever a roles header says.
            return Ok(Some(Principal { subject: ANONYMOUS.to_owned(), roles: Vec::new() }));
        };
        if subject.len() > MAX_TOKEN {
            return Err(HttpError::InvalidHeader {
                name: "principal",
                reason: format!("longer than {MAX_TOKEN} bytes"),
            });
        }
        let roles = match &self.identity {
            Identity::TrustedHeader { roles: Some(header), .. } => trusted_roles(parts.headers.get(header))?,
            _ => Vec::new(),
        };
        Ok(Some(Principal { subject, roles }))
    }
}

/// Most roles a trusted roles header may give.
const MAX_TRUSTED_ROLES: usize = 32;

/// The roles a gateway's header gives: names separated by commas (spaces
/// around them ignored), each 1 to 64 letters, digits or `_-.:/`, at most
/// [`MAX_TRUSTED_ROLES`]. No header, or an empty one, gives none; anything
/// else is refused rather than read in part, since a role dropped or
/// misread would change what the caller may do.
fn trusted_roles(value: Option<&HeaderValue>) -> Result<Vec<String>, HttpError> {
    let bad = |reason: String| HttpError::InvalidHeader { name: "roles", reason };
    let Some(value) = value else { return Ok(Vec::new()) };
    let text = value.to_str().map_err(|_| bad("not visible ASCII".into()))?.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let mut roles: Vec<String> = Vec::new();
    for role in text.split(',').map(str::trim) {
        let valid = (1..=64).contains(&role.len())
            && role.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'/'));
        if !valid {
            return Err(bad("roles are 1 to 64 letters, digits or `_-.:/`, separated by commas".into()));
        }
        if !roles.iter().any(|r| r == role) {
            // Refused as soon as there are too many, so that a long
            // header costs no more than the limit.
            if roles.len() == MAX_TRUSTED_ROLES {
                return Err(bad(format!("more than {MAX_TRUSTED_ROLES} roles")));
            }
            roles.push(role.to_owned());
        }
    }
    Ok(roles)
}

/// One mounted aggregate, seen without its types.
#[async_trait]
pub(crate) trait Mount: Describe + Send + Sync {
    fn plural(&self) -> &str;
    /// Name and reachability of each backend this mount uses.
    async fn readiness(&self) -> Vec<(String, bool)>;
    /// The aggregate type and what its store reports for `/metrics`.
    fn store_gauges(&self) -> (&'static str, Vec<StoreGauge>);
    /// Records the erasure of `subject` in aggregate `id` of type
    /// `aggregate`; `None` when this mount is of another type.
    async fn record_erasure(
        &self,
        aggregate: &str,
        id: &str,
        subject: &str,
    ) -> Option<Result<Option<String>, HttpError>>;
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
    /// Where trusted-header mode reads roles from ([`Api::trust_roles_header`]).
    roles_header: Option<HeaderName>,
    prometheus: Option<PrometheusHandle>,
    routes: Vec<Box<dyn FnOnce(Arc<Shared>) -> Router + Send>>,
    mounts: Vec<Arc<dyn Mount>>,
    sources: Vec<Arc<dyn ProjectionStatusSource>>,
    reactions: Vec<Arc<dyn ReactionStatusSource>>,
    histories: HashMap<String, Arc<dyn History>>,
    checks: Vec<(String, Arc<dyn Readiness>)>,
    admin: Option<AdminToken>,
    admin_role: String,
    vault: Option<Arc<Vault>>,
    auth: Option<Arc<JwtAuth>>,
    /// The application's own routes, served behind the same edge.
    own: Option<Router>,
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
            roles_header: None,
            prometheus: None,
            routes: Vec::new(),
            mounts: Vec::new(),
            sources: Vec::new(),
            reactions: Vec::new(),
            histories: HashMap::new(),
            checks: Vec::new(),
            admin: None,
            admin_role: "admin".to_owned(),
            vault: None,
            auth: None,
            own: None,
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
    /// from what they send; resource rules apply to it, with no roles
    /// unless [`Api::trust_roles_header`] names where they come from. Off
    /// by default, because anyone who reaches the service without passing
    /// the gateway can name themselves anyone. A request without the
    /// header is [`ANONYMOUS`].
    pub fn trust_principal_header(mut self, name: HeaderName) -> Self {
        self.identity = Identity::TrustedHeader { principal: name, roles: None };
        self
    }

    /// In trusted-header mode, the roles of each request's principal are
    /// the value of header `name` (e.g. `x-roles`), set by the same
    /// gateway: role names separated by commas. The gateway must remove
    /// this header from what callers send too. A request without the
    /// principal header is [`ANONYMOUS`] with no roles, whatever this
    /// header says; a malformed value is a `400` and runs nothing. It
    /// applies in trusted-header mode only ([`Api::trust_principal_header`],
    /// before or after this call). Admin endpoints keep their own token or
    /// JWT role.
    pub fn trust_roles_header(mut self, name: HeaderName) -> Self {
        self.roles_header = Some(name);
        self
    }

    /// Where each request's principal comes from: the mode chosen, with the
    /// roles header in trusted-header mode.
    fn identity(&self) -> Identity {
        match &self.identity {
            Identity::TrustedHeader { principal, .. } => {
                Identity::TrustedHeader { principal: principal.clone(), roles: self.roles_header.clone() }
            }
            other => other.clone(),
        }
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

    /// Serves `DELETE /subjects/{subject}` (an admin endpoint, see
    /// [`Api::admin`]): erases a data subject's personal data with `vault`
    /// and records the erasure in every mounted aggregate holding it.
    /// Without this call there is no such route.
    pub fn erasure(mut self, vault: Arc<Vault>) -> Self {
        self.vault = Some(vault);
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

    /// Serves `routes` (the application's own: a web page, a webhook)
    /// beside the API, behind the same edge: they get request ids, the
    /// body limit, the timeout, panic catching, compression and CORS, and
    /// their paths lose a trailing slash before routing as the API's do.
    /// They are not behind [`Api::authenticate`]: they check their own
    /// callers. A fallback of theirs gives way to the API's (an unknown
    /// path is a problem 404). Several calls add up.
    ///
    /// # Panics
    ///
    /// When finished ([`Api::into_app`], [`Api::into_router`]), if a
    /// route of `routes` overlaps one of the API's, as
    /// [`Router::merge`] does.
    pub fn merge(mut self, routes: Router) -> Self {
        self.own = Some(match self.own.take() {
            Some(own) => own.merge(routes),
            None => routes,
        });
        self
    }

    /// The finished router, with every layer applied: [`Api::into_app`]
    /// behind an axum router, for an application that nests or merges it
    /// into a router of its own. The router in front routes every request
    /// twice (once to reach the API, once inside it); [`Api::merge`] and
    /// [`Api::into_app`] with [`serve`](crate::serve) route once.
    pub fn into_router(self) -> Router {
        Router::new().fallback_service(self.into_app())
    }

    /// The finished API as one service, for [`serve`](crate::serve): the
    /// edge (request ids, limits, timeout, panic catching, compression,
    /// CORS) with the routes behind it.
    pub fn into_app(self) -> App {
        let identity = self.identity();
        let metrics = match self.prometheus {
            Some(handle) => Metrics::global(handle),
            None => Metrics::local(),
        };
        let shared = Arc::new(Shared {
            config: self.config,
            identity: identity.clone(),
            metrics,
            histories: self.histories,
            stop: self.stop.subscribe(),
        });
        let document = Arc::new(openapi::document(&shared.config, &self.mounts, self.auth.is_some()));
        let admins = admin::Admins { token: self.admin, jwt: self.auth.clone().map(|auth| (auth, self.admin_role)) };
        let erasure = self.vault.map(|vault| admin::Erasure { vault, mounts: self.mounts.clone() });
        let admin = admins.any().then(|| admin::routes(admins, self.sources.clone(), self.reactions.clone(), erasure));
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
        if let Some(own) = self.own {
            router = router.merge(own);
        }
        let config = &shared.config;
        let routes = router
            .fallback(|| async { HttpError::NotFound("no such route".into()) })
            .method_not_allowed_fallback(|| async { HttpError::MethodNotAllowed });
        // Without allowed origins CORS has nothing to add.
        let cors = (!config.cors_origins.is_empty()).then(|| cors(config, &identity));
        // The edge sits outside the routes: routing must see the path without its slash.
        App(Edge::new(routes, cors, config.body_limit, config.request_timeout))
    }
}

/// The finished API as one service ([`Api::into_app`]): what
/// [`serve`](crate::serve) serves, or what a router takes with
/// `fallback_service` ([`Api::into_router`] does that). Cheap to clone.
#[derive(Clone)]
pub struct App(Edge);

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

impl<B> tower::Service<http::Request<B>> for App
where
    B: axum::body::HttpBody<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        self.0.call(request.map(axum::body::Body::new))
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
        Identity::TrustedHeader { principal, roles } => [Some(principal.clone()), roles.clone()],
        _ => [None, None],
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
            .chain(trusted.into_iter().flatten())
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
