//! A SqlView fed by kes-core's ViewProjection and ProjectionRunner: crashes
//! between batches, rebuilds while queries run, rebuilds in tiny batches and
//! rebuilds stopped before their swap, on both dialects.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::Place;
use futures::FutureExt as _;
use kes_core::view::ViewProgress;
use kes_core::{
    Aggregate, CatchUp, Checkpoint, DomainEvent, EventStore, ExpectedVersion, Field, FilterOp, InMemoryStore,
    InMemoryView, ListItem, ListQuery, ListView, Metadata, Page, Position, ProjectionRunner, Row, RowChange,
    RunnerConfig, StoredState, ViewCopy, ViewError, ViewProjection, ViewSchema, ViewStore,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Project {
    name: String,
    budget: i64,
    status: String,
    deleted: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
enum ProjectEvent {
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

fn schema() -> ViewSchema {
    ViewSchema::new("projects", 1)
        .field(Field::text("name").filterable().sortable().searchable())
        .field(Field::integer("budget").filterable().sortable())
        .field(Field::keyword("status").filterable().sortable())
        .page_sizes(20, 100)
}

fn to_row(p: &Project) -> Row {
    let mut row = Row::new();
    row.insert("name".into(), p.name.clone().into());
    row.insert("budget".into(), p.budget.into());
    if p.status != "new" {
        row.insert("status".into(), p.status.clone().into());
    }
    row
}

/// A small deterministic generator, so that failures can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

const STATUSES: [&str; 4] = ["open", "done", "late", "Open"];

/// Appends `appends` commands over `ids` aggregates; returns the ids used
/// and the position of the last append.
async fn load(store: &InMemoryStore<Project>, seed: u64, appends: usize, ids: u64) -> (Vec<String>, Position) {
    let mut rng = Lcg(seed);
    let mut created: HashMap<String, bool> = HashMap::new();
    let mut last = None;
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
        let appended =
            store.append(&id, ExpectedVersion::Any, events, Metadata::default()).await.expect("append to memory");
        last = Some(appended.position);
    }
    let mut ids: Vec<String> = created.into_keys().collect();
    ids.sort();
    (ids, last.expect("at least one append"))
}

/// Everything a view holds for `ids`: every listed row (all pages) and the
/// stored states, deleted aggregates included.
async fn dump(view: &dyn ViewStore, ids: &[String]) -> (Vec<ListItem>, Vec<(String, u64, serde_json::Value)>) {
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

/// Runs a projection of `store` into `view` until it has applied `last`.
async fn replay(store: &InMemoryStore<Project>, view: Arc<dyn ViewStore>, last: Position) {
    let runner = runner(store, view, 64);
    runner.start().await.expect("start");
    assert!(runner.wait_for(last, Duration::from_secs(60)).await, "the replay did not catch up");
    runner.shutdown().await;
}

fn runner(
    store: &InMemoryStore<Project>,
    view: Arc<dyn ViewStore>,
    batch_size: usize,
) -> Arc<ProjectionRunner<Project, InMemoryStore<Project>>> {
    let projection = Arc::new(ViewProjection::<Project>::new(view, to_row));
    ProjectionRunner::new(
        store.clone(),
        vec![projection],
        RunnerConfig { batch_size, retry_delay: Duration::from_millis(20) },
    )
}

/// A view that dies during its `writes`-th write: that write is dropped
/// after its first poll (its transaction is left unfinished, as in a
/// crash), and every later one fails.
struct Crashing {
    inner: Arc<dyn ViewStore>,
    writes: AtomicUsize,
    crashed: AtomicBool,
}

#[async_trait]
impl ListView for Crashing {
    fn schema(&self) -> &ViewSchema {
        self.inner.schema()
    }
    async fn list(&self, query: &ListQuery) -> Result<Page, ViewError> {
        self.inner.list(query).await
    }
    async fn position(&self) -> Result<Checkpoint, ViewError> {
        self.inner.position().await
    }
}

#[async_trait]
impl ViewStore for Crashing {
    async fn progress(&self, copy: ViewCopy) -> Result<Option<ViewProgress>, ViewError> {
        self.inner.progress(copy).await
    }
    async fn states(&self, copy: ViewCopy, ids: &[String]) -> Result<HashMap<String, StoredState>, ViewError> {
        self.inner.states(copy, ids).await
    }
    async fn write(&self, copy: ViewCopy, changes: &[RowChange], checkpoint: &Checkpoint) -> Result<(), ViewError> {
        if self.crashed.load(Ordering::SeqCst) {
            return Err(ViewError::Unavailable("crashed".into()));
        }
        if self.writes.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.crashed.store(true, Ordering::SeqCst);
            // Poll once, then drop the write half-way.
            let _ = self.inner.write(copy, changes, checkpoint).now_or_never();
            return Err(ViewError::Unavailable("crashed".into()));
        }
        self.inner.write(copy, changes, checkpoint).await
    }
    async fn begin_rebuild(&self) -> Result<(), ViewError> {
        self.inner.begin_rebuild().await
    }
    async fn swap(&self) -> Result<(), ViewError> {
        self.inner.swap().await
    }
}

async fn crash_between_batches(postgres: bool) {
    let store = InMemoryStore::<Project>::new();
    let (ids, last) = load(&store, 7, 600, 90).await;
    let place = Place::fresh(postgres);
    let Some(view) = place.open(schema()).await else { return };
    let view = Arc::new(view);
    let crashing =
        Arc::new(Crashing { inner: view.clone(), writes: AtomicUsize::new(9), crashed: AtomicBool::new(false) });
    let first = runner(&store, crashing.clone(), 16);
    first.start().await.expect("start");
    for _ in 0..500 {
        if crashing.crashed.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(crashing.crashed.load(Ordering::SeqCst), "the view never crashed");
    first.shutdown().await;
    drop(first);
    drop(crashing);
    view.close().await;
    drop(view);

    // Restart: a new process opens the same tables.
    let reopened = Arc::new(place.open(schema()).await.expect("reopen"));
    let resumed_at = reopened.position().await.expect("position");
    let head = store.head().await.expect("head");
    let done = Checkpoint::start().lag_behind(&head) - resumed_at.lag_behind(&head);
    assert!(done > 0, "nothing was kept from before the crash");
    assert!(!resumed_at.covers_all(&head), "the crash came after the last batch");
    replay(&store, reopened.clone(), last).await;

    // A fresh replay into new tables, and the in-memory reference.
    let fresh = Arc::new(Place::fresh(postgres).open(schema()).await.expect("fresh"));
    replay(&store, fresh.clone(), last).await;
    let memory = Arc::new(InMemoryView::new(schema()).expect("memory view"));
    replay(&store, memory.clone(), last).await;

    let after_restart = dump(reopened.as_ref(), &ids).await;
    assert!(after_restart.0.len() > 40, "too few rows to mean anything: {}", after_restart.0.len());
    assert!(after_restart.1.len() > after_restart.0.len(), "no deleted aggregate in the fixture");
    assert_eq!(after_restart, dump(fresh.as_ref(), &ids).await, "restarted view differs from a fresh replay");
    assert_eq!(after_restart, dump(memory.as_ref(), &ids).await, "SQL view differs from the in-memory view");
    assert_eq!(reopened.position().await.expect("position"), fresh.position().await.expect("position"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_between_batches_resumes_from_the_checkpoint() {
    crash_between_batches(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_crash_between_batches_resumes_from_the_checkpoint() {
    crash_between_batches(false).await;
}

/// Queries a reader runs in a loop; each is checked against the in-memory
/// semantics by the conformance suite, here they only must never fail.
fn reader_queries() -> Vec<ListQuery> {
    vec![
        ListQuery::new(),
        ListQuery::new().filter("status", FilterOp::Eq, "open").sort_by("-budget").page_size(10),
        ListQuery::new().filter("budget", FilterOp::Gte, "500").sort_by("name,-budget"),
        ListQuery::new().search("project 1").page_size(5),
        ListQuery::new().filter("name", FilterOp::Prefix, "Project 2").sort_by("status"),
    ]
}

async fn rebuild_while_queries_run(postgres: bool) {
    let store = InMemoryStore::<Project>::new();
    let (_, _) = load(&store, 11, 800, 150).await;
    let Some(view) = Place::fresh(postgres).open(schema()).await else { return };
    let view = Arc::new(view);
    let live = runner(&store, view.clone(), 32);
    live.start().await.expect("start");

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for r in 0..3 {
        let (view, stop, answered) = (view.clone(), stop.clone(), answered.clone());
        readers.push(tokio::spawn(async move {
            let queries = reader_queries();
            let mut i = r;
            while !stop.load(Ordering::SeqCst) {
                let query = &queries[i % queries.len()];
                let page = view.list(query).await.unwrap_or_else(|e| panic!("{query:?} failed during a rebuild: {e}"));
                if let Some(next) = page.next {
                    view.list(&query.clone().after(next)).await.unwrap_or_else(|e| panic!("next page failed: {e}"));
                }
                answered.fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
        }));
    }
    // Writes keep coming while the view is rebuilt, twice.
    let writer = {
        let store = store.clone();
        tokio::spawn(async move { load(&store, 12, 300, 200).await })
    };
    for _ in 0..2 {
        let report = live.rebuild("projects", &|_, _| {}).await.expect("rebuild");
        assert!(report.events >= 800, "the rebuild skipped events: {report:?}");
    }
    let (ids, _) = writer.await.expect("writer");
    let head = store.head().await.expect("head");
    let last = Position::new(0, head.next_offset(0) - 1);
    assert!(live.wait_for(last, Duration::from_secs(60)).await, "the live view did not catch up");
    stop.store(true, Ordering::SeqCst);
    for reader in readers {
        reader.await.expect("a reader failed");
    }
    assert!(answered.load(Ordering::SeqCst) > 10, "the readers hardly ran");
    live.shutdown().await;

    let mut all_ids = ids;
    all_ids.extend((0..150).map(|i| format!("p{i:03}")));
    all_ids.sort();
    all_ids.dedup();
    let fresh = Arc::new(Place::fresh(postgres).open(schema()).await.expect("fresh"));
    replay(&store, fresh.clone(), last).await;
    let rebuilt = dump(view.as_ref(), &all_ids).await;
    assert!(rebuilt.0.len() > 100);
    assert_eq!(rebuilt, dump(fresh.as_ref(), &all_ids).await, "the swapped-in view differs from a fresh replay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_rebuild_while_queries_run() {
    rebuild_while_queries_run(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_rebuild_while_queries_run() {
    rebuild_while_queries_run(false).await;
}

/// The secondary indexes (primary key left out) of `table` at `place`,
/// read from the database's catalog.
async fn secondary_indexes(place: &Place, table: &str) -> i64 {
    match place {
        Place::Postgres(schema) => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect_with(
                    common::pg_url()
                        .parse::<sqlx::postgres::PgConnectOptions>()
                        .expect("url")
                        .options([("search_path", schema.as_str())]),
                )
                .await
                .expect("connect");
            let (n,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM pg_index i WHERE i.indrelid = to_regclass($1) AND NOT i.indisprimary",
            )
            .bind(table)
            .fetch_one(&pool)
            .await
            .expect("count indexes");
            pool.close().await;
            n
        }
        Place::Sqlite(url) => {
            let pool = sqlx::SqlitePool::connect(url).await.expect("connect");
            let (n,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = $1 AND sql IS NOT NULL",
            )
            .bind(table)
            .fetch_one(&pool)
            .await
            .expect("count indexes");
            pool.close().await;
            n
        }
    }
}

/// A rebuild in batches of three appends, so that most aggregates have
/// events in many batches: the swapped-in copy equals a fresh replay and
/// the in-memory view, and has the indexes of its filterable and sortable
/// fields.
async fn rebuild_in_tiny_batches(postgres: bool) {
    let store = InMemoryStore::<Project>::new();
    let (ids, last) = load(&store, 21, 700, 60).await;
    let place = Place::fresh(postgres);
    let Some(view) = place.open(schema()).await else { return };
    let view = Arc::new(view);
    let report = runner(&store, view.clone(), 3).rebuild("projects", &|_, _| {}).await.expect("rebuild");
    assert!(report.events >= 700, "events rebuilt: {report:?}");
    assert!(view.position().await.expect("position").covers(last));
    let fresh = Arc::new(Place::fresh(postgres).open(schema()).await.expect("fresh"));
    replay(&store, fresh.clone(), last).await;
    let memory = Arc::new(InMemoryView::new(schema()).expect("memory view"));
    replay(&store, memory.clone(), last).await;
    let rebuilt = dump(view.as_ref(), &ids).await;
    assert!(rebuilt.0.len() > 30, "too few rows to mean anything: {}", rebuilt.0.len());
    assert_eq!(rebuilt, dump(fresh.as_ref(), &ids).await, "rebuilt view differs from a fresh replay");
    assert_eq!(rebuilt, dump(memory.as_ref(), &ids).await, "rebuilt view differs from the in-memory view");
    assert_eq!(secondary_indexes(&place, "view_projects").await, 3, "one index per filterable or sortable field");
    // A second rebuild of the same view gives the same again.
    runner(&store, view.clone(), 5).rebuild("projects", &|_, _| {}).await.expect("rebuild again");
    assert_eq!(dump(view.as_ref(), &ids).await, rebuilt, "second rebuild");
    assert_eq!(secondary_indexes(&place, "view_projects").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rebuild_in_tiny_batches_equals_a_fresh_replay() {
    rebuild_in_tiny_batches(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_rebuild_in_tiny_batches_equals_a_fresh_replay() {
    rebuild_in_tiny_batches(false).await;
}

fn change(id: &str, version: u64, name: &str) -> RowChange {
    let mut row = Row::new();
    row.insert("name".into(), name.into());
    row.insert("budget".into(), (version as i64).into());
    RowChange { id: id.into(), version, state: serde_json::json!({ "name": name }), row: Some(row) }
}

fn at(offset: u64) -> Checkpoint {
    let mut c = Checkpoint::start();
    c.advance(Position::new(0, offset));
    c
}

/// A rebuild that stops before its swap (the process ends): the live copy
/// serves unchanged throughout, the shadow's checkpoint matches its rows,
/// and the next rebuild starts over from an empty shadow.
async fn rebuild_stopped_before_the_swap(postgres: bool) {
    let store = InMemoryStore::<Project>::new();
    let (ids, last) = load(&store, 31, 300, 40).await;
    let place = Place::fresh(postgres);
    let Some(view) = place.open(schema()).await else { return };
    let view = Arc::new(view);
    replay(&store, view.clone(), last).await;
    let before = dump(view.as_ref(), &ids).await;
    let position = view.position().await.expect("position");

    view.begin_rebuild().await.expect("begin");
    for n in 0..4u64 {
        // Ids of the live copy, written again and again in the shadow.
        let batch: Vec<RowChange> =
            (0..5).map(|k| change(&ids[((n * 3 + k) % 8) as usize], n + 1, &format!("shadow {n}"))).collect();
        view.write(ViewCopy::Shadow, &batch, &at(1_000 + n)).await.expect("shadow write");
        assert_eq!(dump(view.as_ref(), &ids).await, before, "the live copy changed during the rebuild");
        assert_eq!(view.position().await.expect("position"), position);
    }
    let shadow_states = view.states(ViewCopy::Shadow, &ids[..8]).await.expect("shadow states");
    assert_eq!(shadow_states.len(), 8);
    assert!(shadow_states.values().all(|s| s.version >= 2), "a later batch's write of an id wins");
    assert_eq!(secondary_indexes(&place, "shadow_projects").await, 0, "the shadow is filled without its indexes");
    view.close().await;
    drop(view);

    // Restart: the live copy is as it was; the shadow's checkpoint is that
    // of its last batch, committed with its rows.
    let reopened = Arc::new(place.open(schema()).await.expect("reopen"));
    assert_eq!(dump(reopened.as_ref(), &ids).await, before);
    let shadow = reopened.progress(ViewCopy::Shadow).await.expect("progress").expect("a shadow checkpoint");
    assert_eq!(shadow.checkpoint, at(1_003));
    assert_eq!(reopened.states(ViewCopy::Shadow, &ids).await.expect("states").len(), 8);

    // The next rebuild starts over, and its swap brings the indexes.
    reopened.begin_rebuild().await.expect("begin again");
    assert!(reopened.progress(ViewCopy::Shadow).await.expect("progress").is_none(), "the new shadow starts empty");
    assert!(reopened.states(ViewCopy::Shadow, &ids).await.expect("states").is_empty());
    reopened.swap().await.expect("swap an empty shadow");
    assert_eq!(dump(reopened.as_ref(), &ids).await.0, Vec::new());
    runner(&store, reopened.clone(), 7).rebuild("projects", &|_, _| {}).await.expect("rebuild");
    assert_eq!(dump(reopened.as_ref(), &ids).await, before, "rebuilt view vs the one followed live");
    assert_eq!(reopened.position().await.expect("position"), position);
    assert_eq!(secondary_indexes(&place, "view_projects").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rebuild_stopped_before_the_swap_starts_over() {
    rebuild_stopped_before_the_swap(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_rebuild_stopped_before_the_swap_starts_over() {
    rebuild_stopped_before_the_swap(false).await;
}
