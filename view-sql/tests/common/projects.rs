//! The projects fixture of the projection tests: an aggregate, its list
//! schema and row, a deterministic load of commands, a dump of everything a
//! view holds, and runners over any event store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kes_core::{
    Aggregate, Checkpoint, DomainEvent, EventStore, ExpectedVersion, Field, ListItem, ListQuery, Metadata, Page,
    ProjectionRunner, Row, RunnerConfig, ViewCopy, ViewProjection, ViewSchema, ViewStore,
};
use serde::{Deserialize, Serialize};

use super::stores::caught_up;

/// A project: what the list view shows, and a deleted flag.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Project {
    pub name: String,
    pub budget: i64,
    pub status: String,
    pub deleted: bool,
}

/// What happens to a project (its commands are its events).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum ProjectEvent {
    Created { name: String, budget: i64 },
    Budgeted { budget: i64 },
    Moved { status: String },
    Deleted,
    Restored,
}

impl DomainEvent for ProjectEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Created { .. } => "Created",
            Self::Budgeted { .. } => "Budgeted",
            Self::Moved { .. } => "Moved",
            Self::Deleted => "Deleted",
            Self::Restored => "Restored",
        }
    }
}

impl Aggregate for Project {
    const NAME: &'static str = "project";
    type Command = ProjectEvent;
    type Event = ProjectEvent;
    type Error = std::convert::Infallible;

    fn handle(&self, command: ProjectEvent) -> Result<Vec<ProjectEvent>, Self::Error> {
        Ok(vec![command])
    }

    fn apply(&mut self, event: &ProjectEvent) {
        match event {
            ProjectEvent::Created { name, budget } => {
                self.name = name.clone();
                self.budget = *budget;
                self.status = "new".into();
            }
            ProjectEvent::Budgeted { budget } => self.budget = *budget,
            ProjectEvent::Moved { status } => self.status = status.clone(),
            ProjectEvent::Deleted => self.deleted = true,
            ProjectEvent::Restored => self.deleted = false,
        }
    }

    fn is_deleted(&self) -> bool {
        self.deleted
    }
}

/// The list view of projects.
pub fn schema() -> ViewSchema {
    ViewSchema::new("projects", 1)
        .field(Field::text("name").filterable().sortable().searchable())
        .field(Field::integer("budget").filterable().sortable())
        .field(Field::keyword("status").filterable().sortable())
        .page_sizes(20, 100)
}

/// The list row of a project.
pub fn to_row(p: &Project) -> Row {
    let mut row = Row::new();
    row.insert("name".into(), p.name.clone().into());
    row.insert("budget".into(), p.budget.into());
    if p.status != "new" {
        row.insert("status".into(), p.status.clone().into());
    }
    row
}

/// A small deterministic generator, so that failures can be replayed.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self, below: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

/// The statuses `load` moves projects to.
pub const STATUSES: [&str; 4] = ["open", "done", "late", "Open"];

/// The event store a test body follows, whichever backend it is.
pub type Store = Arc<dyn EventStore<Project>>;

/// How long a runner may take to apply what was written: generous, so that
/// a slow machine or a slow broker only makes the test slower.
pub const CATCH_UP: Duration = Duration::from_secs(120);

/// Appends `appends` commands over `ids` aggregates; returns the ids used
/// and a checkpoint covering every append (its position on each partition).
pub async fn load(store: &dyn EventStore<Project>, seed: u64, appends: usize, ids: u64) -> (Vec<String>, Checkpoint) {
    let mut rng = Lcg(seed);
    let mut created: HashMap<String, bool> = HashMap::new();
    let mut written = Checkpoint::start();
    for _ in 0..appends {
        let id = format!("p{:03}", rng.next(ids));
        let events = match created.get(&id) {
            None => vec![ProjectEvent::Created { name: format!("Project {} {id}", rng.next(50)), budget: 0 }],
            Some(deleted) => match rng.next(10) {
                0 if !deleted => vec![ProjectEvent::Deleted],
                0 | 1 if *deleted => vec![ProjectEvent::Restored],
                2..=5 => vec![ProjectEvent::Budgeted { budget: rng.next(1000) as i64 - 100 }],
                _ => vec![
                    ProjectEvent::Moved { status: STATUSES[rng.next(4) as usize].into() },
                    ProjectEvent::Budgeted { budget: rng.next(1000) as i64 },
                ],
            },
        };
        let deleted = match events[0] {
            ProjectEvent::Deleted => true,
            ProjectEvent::Restored => false,
            _ => created.get(&id).copied().unwrap_or(false),
        };
        created.insert(id.clone(), deleted);
        let appended = store.append(&id, ExpectedVersion::Any, events, Metadata::default()).await.expect("append");
        written.advance(appended.position);
    }
    assert!(appends == 0 || written != Checkpoint::start(), "no append reported its position");
    let mut ids: Vec<String> = created.into_keys().collect();
    ids.sort();
    (ids, written)
}

/// Everything a view holds for `ids`: every listed row (all pages) and the
/// stored states, deleted aggregates included.
pub async fn dump(view: &dyn ViewStore, ids: &[String]) -> (Vec<ListItem>, Vec<(String, u64, serde_json::Value)>) {
    let mut rows = Vec::new();
    let mut query = ListQuery::new().page_size(100);
    loop {
        let page: Page = view.list(&query).await.expect("list");
        rows.extend(page.items);
        match page.next {
            Some(next) => query = query.after(next),
            None => break,
        }
    }
    let states = view.states(ViewCopy::Live, ids).await.expect("states");
    let mut states: Vec<(String, u64, serde_json::Value)> =
        states.into_iter().map(|(id, s)| (id, s.version, s.state)).collect();
    states.sort_by(|a, b| a.0.cmp(&b.0));
    (rows, states)
}

/// Runs a projection of `store` into `view` until it has applied every
/// record `written` covers.
pub async fn replay(store: &Store, view: Arc<dyn ViewStore>, written: &Checkpoint) {
    let runner = runner(store, view, 64);
    runner.start().await.expect("start");
    assert!(caught_up(runner.as_ref(), written, CATCH_UP).await, "the replay did not catch up");
    runner.shutdown().await;
}

/// A runner of one `ViewProjection` of `store` into `view`, retrying soon
/// after a failure.
pub fn runner(store: &Store, view: Arc<dyn ViewStore>, batch_size: usize) -> Arc<ProjectionRunner<Project, Store>> {
    let projection = Arc::new(ViewProjection::<Project>::new(view, to_row));
    ProjectionRunner::new(
        store.clone(),
        vec![projection],
        RunnerConfig { batch_size, retry_delay: Duration::from_millis(20), ..RunnerConfig::default() },
    )
}
