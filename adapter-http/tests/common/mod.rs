//! A small aggregate and an API around it, on the in-memory backends.
#![allow(dead_code)]

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use kes_core::{
    Aggregate, CommandBus, DomainEvent, Field, InMemoryStore, InMemoryView, ProjectionRunner, Row, RunnerConfig,
    ViewProjection, ViewSchema,
};
use kes_http::{Api, HttpConfig, IdStrategy, Resource};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tower::ServiceExt;

/// A project with a name, a budget and a lifecycle.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Project {
    pub name: String,
    pub budget: i64,
    pub archived: bool,
    pub deleted: bool,
    /// How many changes it has seen.
    pub changes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ProjectEvent {
    Created { name: String, budget: i64 },
    Replaced { name: String, budget: i64 },
    Renamed { name: String },
    BudgetSet { budget: i64 },
    Touched,
    Archived { reason: String },
    Deleted,
}

impl DomainEvent for ProjectEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Created { .. } => "ProjectCreated",
            Self::Replaced { .. } => "ProjectReplaced",
            Self::Renamed { .. } => "ProjectRenamed",
            Self::BudgetSet { .. } => "BudgetSet",
            Self::Touched => "ProjectTouched",
            Self::Archived { .. } => "ProjectArchived",
            Self::Deleted => "ProjectDeleted",
        }
    }
}

#[derive(Debug, Clone)]
pub enum ProjectCommand {
    Create { name: String, budget: i64 },
    Replace { name: String, budget: i64 },
    Update { name: Option<String>, budget: Option<i64> },
    Archive { reason: String },
    Delete,
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    #[error("a budget cannot be negative")]
    NegativeBudget,
    #[error("an archived project cannot change")]
    Archived,
}

impl Aggregate for Project {
    const NAME: &'static str = "project";
    type Command = ProjectCommand;
    type Event = ProjectEvent;
    type Error = ProjectError;

    fn handle(&self, command: ProjectCommand) -> Result<Vec<ProjectEvent>, ProjectError> {
        use ProjectCommand as C;
        if self.archived && !matches!(command, C::Delete) {
            return Err(ProjectError::Archived);
        }
        match command {
            C::Create { budget, .. } | C::Replace { budget, .. } | C::Update { budget: Some(budget), .. }
                if budget < 0 =>
            {
                Err(ProjectError::NegativeBudget)
            }
            C::Create { name, budget } => Ok(vec![ProjectEvent::Created { name, budget }]),
            C::Replace { name, budget } => Ok(vec![ProjectEvent::Replaced { name, budget }]),
            C::Update { name: None, budget: None } => Ok(vec![ProjectEvent::Touched]),
            C::Update { name, budget } => {
                let mut events = Vec::new();
                if let Some(name) = name {
                    events.push(ProjectEvent::Renamed { name });
                }
                if let Some(budget) = budget {
                    events.push(ProjectEvent::BudgetSet { budget });
                }
                Ok(events)
            }
            C::Archive { reason } => Ok(vec![ProjectEvent::Archived { reason }]),
            C::Delete => Ok(vec![ProjectEvent::Deleted]),
        }
    }

    fn apply(&mut self, event: &ProjectEvent) {
        self.changes += 1;
        match event {
            ProjectEvent::Created { name, budget } | ProjectEvent::Replaced { name, budget } => {
                self.name = name.clone();
                self.budget = *budget;
            }
            ProjectEvent::Renamed { name } => self.name = name.clone(),
            ProjectEvent::BudgetSet { budget } => self.budget = *budget,
            ProjectEvent::Touched => {}
            ProjectEvent::Archived { .. } => self.archived = true,
            ProjectEvent::Deleted => self.deleted = true,
        }
    }

    fn is_deleted(&self) -> bool {
        self.deleted
    }
}

/// Creates a project; every field may be left out.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct CreateProject {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub budget: i64,
}

/// Replaces a project's fields.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ReplaceProject {
    pub name: String,
    pub budget: i64,
}

/// Changes some fields of a project.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct PatchProject {
    pub name: Option<String>,
    pub budget: Option<i64>,
}

/// Archives a project.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ArchiveProject {
    #[serde(default)]
    pub reason: String,
}

/// A command whose mapping fails, to see a panic contained.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct Explode {}

pub fn resource() -> Resource<Project> {
    Resource::<Project>::new("projects")
        .create(|b: CreateProject| ProjectCommand::Create { name: b.name, budget: b.budget })
        .replace(|b: ReplaceProject| ProjectCommand::Replace { name: b.name, budget: b.budget })
        .patch(|b: PatchProject| ProjectCommand::Update { name: b.name, budget: b.budget })
        .delete(|| ProjectCommand::Delete)
        .command("archive", |b: ArchiveProject| ProjectCommand::Archive { reason: b.reason })
        .command("explode", |_: Explode| -> ProjectCommand { panic!("mapping failed: secret detail 42") })
}

pub fn view_schema() -> ViewSchema {
    ViewSchema::new("projects", 1)
        .field(Field::text("name").filterable().sortable().searchable())
        .field(Field::integer("budget").filterable().sortable())
        .field(Field::bool("archived").filterable())
}

pub fn row(p: &Project) -> Row {
    let mut row = Row::new();
    row.insert("name".into(), p.name.as_str().into());
    row.insert("budget".into(), p.budget.into());
    row.insert("archived".into(), p.archived.into());
    row
}

pub struct Harness {
    pub app: Router,
    pub store: InMemoryStore<Project>,
    pub view: Arc<InMemoryView>,
    pub runner: Arc<ProjectionRunner<Project, InMemoryStore<Project>>>,
    pub shutdown: kes_http::ShutdownHandle,
}

pub async fn harness() -> Harness {
    build(HttpConfig::default(), true, IdStrategy::default()).await
}

pub async fn build(config: HttpConfig, start_projections: bool, ids: IdStrategy) -> Harness {
    build_with(config, start_projections, resource().ids(ids), |api| api).await
}

/// A harness serving `resource`, with `shape` applied to the API (its
/// identity, say) before it becomes a router.
pub async fn build_with(
    config: HttpConfig,
    start_projections: bool,
    resource: Resource<Project>,
    shape: impl FnOnce(Api) -> Api,
) -> Harness {
    let store = InMemoryStore::<Project>::new();
    let view = Arc::new(InMemoryView::new(view_schema()).expect("valid schema"));
    let projection = ViewProjection::<Project>::new(view.clone(), row);
    let runner = ProjectionRunner::new(store.clone(), vec![Arc::new(projection)], RunnerConfig::default());
    if start_projections {
        runner.start().await.expect("projections start");
    }
    let api = Api::new(config)
        .mount(resource, Arc::new(CommandBus::new(store.clone())), view.clone(), runner.clone())
        .expect("mount")
        .projections(runner.clone());
    let api = shape(api);
    let shutdown = api.shutdown_handle();
    Harness { app: api.into_router(), store, view, runner, shutdown }
}

/// What came back: status, headers and the body (JSON when it parses, else a string).
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    /// Asserts a problem answer of `status` and `kind` (`urn:kes:problem:{kind}`).
    #[track_caller]
    pub fn assert_problem(&self, status: u16, kind: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.body);
        assert_eq!(self.header("content-type"), "application/problem+json");
        assert_eq!(self.body["type"], format!("urn:kes:problem:{kind}"), "body: {}", self.body);
        assert_eq!(self.body["status"], status);
    }
}

pub async fn send(app: &Router, request: Request<Body>) -> Reply {
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    Reply { status, headers, body }
}

pub fn json(method: &str, uri: &str, body: Value) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("request")
}

pub fn empty(method: &str, uri: &str) -> Request<Body> {
    Request::builder().method(method).uri(uri).body(Body::empty()).expect("request")
}

pub fn with_header(mut request: Request<Body>, name: &'static str, value: &str) -> Request<Body> {
    request.headers_mut().insert(name, value.parse().expect("header value"));
    request
}

/// Creates a project and returns its id and the create answer.
pub async fn create(app: &Router, name: &str, budget: i64) -> (String, Reply) {
    let reply = send(app, json("POST", "/projects", serde_json::json!({ "name": name, "budget": budget }))).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let id = reply.header("location").trim_start_matches("/projects/").to_owned();
    (id, reply)
}

/// What the adapter stores for a retry key: `sha256:` and the unpadded
/// base64url SHA-256 of `hashed` (the key; for an identified caller, the
/// key, `·` and the caller's subject), computed here independently.
pub fn stored_key(hashed: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    format!("sha256:{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(hashed)))
}
