//! # kes-http
//!
//! The generic REST adapter of KES: it puts any number of event-sourced
//! aggregates on one [axum] router, following the REST contract of the
//! design (§7). It knows no backend — every route runs on the `kes-core`
//! traits: a [`CommandBus`](kes_core::CommandBus) over any
//! [`EventStore`](kes_core::EventStore) (including `Arc<dyn EventStore<A>>`
//! chosen at run time), a [`ListView`](kes_core::ListView) and a
//! [`CatchUp`](kes_core::CatchUp).
//!
//! | request | answer |
//! |---|---|
//! | `POST /{plural}` | 201, `Location`, `ETag`, `KES-Position`, body = state |
//! | `GET /{plural}/{id}` | 200 + `ETag` (from the store's table); 304 on `If-None-Match`; 404 when missing or deleted |
//! | `PUT` / `PATCH /{plural}/{id}` | 200 + new `ETag` + `KES-Position` |
//! | `DELETE /{plural}/{id}` | 204 |
//! | `POST /{plural}/{id}/{command}` | 200 + new `ETag`: any named domain command |
//! | `GET /{plural}?filter[f][op]=v&sort=-a,b&page[size]=n&page[after]=c&q=w` | `{ "items", "next", "total" }` |
//! | `GET /{plural}/{id}/events` | the audit history, with metadata |
//! | `GET /openapi.json`, `/health`, `/metrics` | OpenAPI 3.1, readiness, Prometheus text |
//!
//! **Writes.** `If-Match: "3"` makes the write expect version 3 (412 when
//! stale); without it, updates expect the aggregate to exist (404) and a
//! concurrent change is a 409. `Idempotency-Key` goes into the event
//! metadata; the same key on the same aggregate appends once and replays the
//! first answer (`Idempotent-Replayed: true`). On a create, the new id is
//! derived from the key (and the principal), so a retried create reaches
//! the aggregate the first attempt made. The principal (`anonymous` by
//! default; a bearer JWT's subject with [`Api::authenticate`]; see
//! [`access`]) and the correlation id (`X-Correlation-Id`, else the
//! request id) are recorded with the events.
//!
//! **Who may.** A resource's rules ([`Resource::allow`],
//! [`Resource::allow_reads`]) decide from the principal and the
//! aggregate's current state; a refusal is 403 before the command runs.
//!
//! **Bodies.** JSON, or flat form data (`curl -d name=x`), which becomes a
//! JSON object of strings; where the body type wants a number, bool or null,
//! the string is converted. An empty body is `{}`. Trailing slashes are
//! ignored.
//!
//! **Read-your-writes.** Every write answers with `KES-Position:
//! PARTITION:OFFSET`. A list read that sends it back waits, at most
//! [`HttpConfig::consistency_timeout`], until the views have applied it; the
//! answer then says `KES-Consistency: caught-up`. When the wait times out
//! the read is not failed: it answers what the views have, marked
//! `KES-Consistency: stale` (reads without a token say `eventual`). A read
//! by id needs no token: it comes from the store's table, which moves with
//! every append.
//!
//! **Errors** are `application/problem+json` (RFC 9457) with a stable
//! `type` from [`problem_type`]: 400 malformed body, query, search or
//! header; 401 without valid credentials; 403 when a rule refuses; 404;
//! 405; 409 / 412; 413; 415; 422 with the domain error's message, or for a
//! page cursor the list did not issue; 431 for oversized headers (from
//! [`serve`]); 503 with `Retry-After` when a store or view is unavailable or
//! the request timed out; 500 otherwise. Server-side detail (SQL, broker,
//! panic messages) goes to the log, never to the client; a panicking
//! handler becomes a 500 and the service goes on.
//!
//! **Around the routes**, one service with one future per request:
//! trailing-slash normalisation, tracing, request ids (`x-request-id`,
//! generated when absent and echoed), panic catching, a request timeout
//! (its timer armed only for answers not ready at once) and a body limit
//! (413). gzip compression (tower-http) runs for requests that send
//! `Accept-Encoding`; CORS (tower-http, [`HttpConfig::cors_origins`]) only
//! when origins are configured.
//!
//! **Metrics** (`metrics` facade, Prometheus exporter):
//! `kes_commands_total` and the histogram `kes_command_duration_seconds` by
//! aggregate, command and outcome; `kes_projection_lag` and
//! `kes_projection_failing` per projection, read at scrape time from the
//! [`ProjectionStatusSource`]s given to [`Api::projections`].
//!
//! ## Example
//!
//! ```
//! use std::sync::Arc;
//!
//! use kes_core::{Aggregate, CommandBus, DomainEvent, Field, InMemoryStore, InMemoryView};
//! use kes_core::{ProjectionRunner, ViewProjection, ViewSchema};
//! use kes_http::{Api, HttpConfig, Resource};
//! use serde::{Deserialize, Serialize};
//! use tower::ServiceExt;
//!
//! #[derive(Debug, Default, Clone, Serialize, Deserialize, schemars::JsonSchema)]
//! struct Project { name: String, budget: i64 }
//!
//! #[derive(Debug, Clone, Serialize, Deserialize)]
//! enum ProjectEvent { Created { name: String }, BudgetSet { budget: i64 } }
//! impl DomainEvent for ProjectEvent {
//!     fn event_type(&self) -> &'static str {
//!         match self { Self::Created { .. } => "Created", Self::BudgetSet { .. } => "BudgetSet" }
//!     }
//! }
//!
//! #[derive(Debug, Clone)]
//! enum ProjectCommand { Create { name: String }, SetBudget(i64) }
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("a budget cannot be negative")]
//! struct NegativeBudget;
//!
//! impl Aggregate for Project {
//!     const NAME: &'static str = "project";
//!     type Command = ProjectCommand;
//!     type Event = ProjectEvent;
//!     type Error = NegativeBudget;
//!     fn handle(&self, c: ProjectCommand) -> Result<Vec<ProjectEvent>, NegativeBudget> {
//!         match c {
//!             ProjectCommand::Create { name } => Ok(vec![ProjectEvent::Created { name }]),
//!             ProjectCommand::SetBudget(b) if b < 0 => Err(NegativeBudget),
//!             ProjectCommand::SetBudget(budget) => Ok(vec![ProjectEvent::BudgetSet { budget }]),
//!         }
//!     }
//!     fn apply(&mut self, e: &ProjectEvent) {
//!         match e {
//!             ProjectEvent::Created { name } => self.name = name.clone(),
//!             ProjectEvent::BudgetSet { budget } => self.budget = *budget,
//!         }
//!     }
//! }
//!
//! /// Creates a project.
//! #[derive(Deserialize, schemars::JsonSchema)]
//! struct CreateProject { #[serde(default)] name: String }
//!
//! /// Sets the budget.
//! #[derive(Deserialize, schemars::JsonSchema)]
//! struct SetBudget { budget: i64 }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let store = InMemoryStore::<Project>::new();
//! let schema = ViewSchema::new("projects", 1)
//!     .field(Field::text("name").filterable().sortable().searchable())
//!     .field(Field::integer("budget").filterable().sortable());
//! let view = Arc::new(InMemoryView::new(schema).unwrap());
//! let projection = ViewProjection::<Project>::new(view.clone(), |p| {
//!     [("name".to_owned(), p.name.as_str().into()), ("budget".to_owned(), p.budget.into())].into()
//! });
//! let runner = ProjectionRunner::new(store.clone(), vec![Arc::new(projection)], Default::default());
//! runner.start().await.unwrap();
//!
//! let projects = Resource::<Project>::new("projects")
//!     .create(|b: CreateProject| ProjectCommand::Create { name: b.name })
//!     .command("budget", |b: SetBudget| ProjectCommand::SetBudget(b.budget));
//! let app = Api::new(HttpConfig::default())
//!     .mount(projects, Arc::new(CommandBus::new(store)), view, runner.clone())
//!     .unwrap()
//!     .projections(runner)
//!     .into_router();
//!
//! // What `curl -d name=kes http://localhost:8080/projects/` sends:
//! let request = http::Request::post("/projects/")
//!     .header("content-type", "application/x-www-form-urlencoded")
//!     .body(axum::body::Body::from("name=kes"))
//!     .unwrap();
//! let response = app.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), 201);
//! assert_eq!(response.headers()["etag"], "\"1\"");
//! # });
//! ```
//!
//! ## Features
//!
//! | feature | what it adds |
//! |---|---|
//! | (none) | everything above; the crate has no optional parts |

pub mod access;
mod admin;
mod api;
pub mod auth;
#[doc(hidden)]
pub mod doc_fixtures;
mod edge;
mod error;
mod feed;
mod id;
pub mod metrics;
mod openapi;
mod ops;
mod request;
mod resource;
mod routes;
mod server;

pub use access::ANONYMOUS;
pub use admin::AdminToken;
pub use api::{
    Api, App, CONSISTENCY_HEADER, CORRELATION_HEADER, HttpConfig, IDEMPOTENCY_KEY_HEADER, POSITION_HEADER, PrincipalFn,
    ProjectionStatusSource, REPLAYED_HEADER, REQUEST_ID_HEADER, ReactionStatusSource, Readiness, ShutdownHandle,
};
pub use auth::{JwtAuth, Principal};
pub use error::{ConfigError, HttpError, PROBLEM_JSON, problem_type};
pub use id::AggregateId;
pub use resource::{IdStrategy, Resource};
/// The schemars version body, state and event types derive `JsonSchema` with.
pub use schemars;
pub use server::{ServerConfig, serve};
