//! A SqlView fed by kes-core's ViewProjection and ProjectionRunner: crashes
//! between batches, rebuilds while queries run, rebuilds in tiny batches and
//! rebuilds stopped before their swap, on both dialects, each following the
//! subscription of every event store: the in-memory reference, SQLite and
//! PostgreSQL `SqlStore`s and a `KafkaStore` on three partitions (whose
//! positions are per partition: views are compared by their rows and
//! states, and catch-up is awaited on every partition).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::Place;
use common::projects::{CATCH_UP, Project, dump, load, replay, runner, schema};
use common::stores::{Backend, TestStore, caught_up};
use futures::FutureExt as _;
use kes_core::ViewProgress;
use kes_core::{
    Checkpoint, FilterOp, InMemoryView, ListQuery, ListView, Page, Position, Row, RowChange, StoredState, ViewCopy,
    ViewError, ViewSchema, ViewStore,
};

/// Runs `$case(backend, postgres_view)` as one test per store: the
/// in-memory reference under both view dialects, each SQL store under a
/// view of its own dialect, and Kafka under both.
macro_rules! on_every_store {
    ($name:ident, $case:ident, $threads:literal) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = $threads)]
            async fn memory_store_sqlite_view() {
                $case(Backend::Memory, false).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = $threads)]
            async fn memory_store_postgres_view() {
                $case(Backend::Memory, true).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = $threads)]
            async fn sqlite_store_sqlite_view() {
                $case(Backend::Sqlite, false).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = $threads)]
            async fn postgres_store_postgres_view() {
                $case(Backend::Postgres, true).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = $threads)]
            async fn kafka_store_sqlite_view() {
                $case(Backend::Kafka, false).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = $threads)]
            async fn kafka_store_postgres_view() {
                $case(Backend::Kafka, true).await;
            }
        }
    };
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

async fn crash_between_batches(backend: Backend, postgres: bool) {
    let Some(log) = TestStore::<Project>::fresh(backend).await else { return };
    let store = log.store.clone();
    let (ids, written) = load(store.as_ref(), 7, 600, 90).await;
    let place = Place::fresh(postgres);
    let Some(view) = place.open(schema()).await else { return };
    let view = Arc::new(view);
    let crashing =
        Arc::new(Crashing { inner: view.clone(), writes: AtomicUsize::new(9), crashed: AtomicBool::new(false) });
    let first = runner(&store, crashing.clone(), 16);
    first.start().await.expect("start");
    // Waits for the observable crash; a slow machine only waits longer.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !crashing.crashed.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
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
    replay(&store, reopened.clone(), &written).await;

    // A fresh replay into new tables, and the in-memory reference.
    let fresh = Arc::new(Place::fresh(postgres).open(schema()).await.expect("fresh"));
    replay(&store, fresh.clone(), &written).await;
    let memory = Arc::new(InMemoryView::new(schema()).expect("memory view"));
    replay(&store, memory.clone(), &written).await;

    let after_restart = dump(reopened.as_ref(), &ids).await;
    assert!(after_restart.0.len() > 40, "too few rows to mean anything: {}", after_restart.0.len());
    assert!(after_restart.1.len() > after_restart.0.len(), "no deleted aggregate in the fixture");
    assert_eq!(after_restart, dump(fresh.as_ref(), &ids).await, "restarted view differs from a fresh replay");
    assert_eq!(after_restart, dump(memory.as_ref(), &ids).await, "SQL view differs from the in-memory view");
    assert_eq!(reopened.position().await.expect("position"), fresh.position().await.expect("position"));
}

on_every_store!(crash_between_batches_resumes_from_the_checkpoint, crash_between_batches, 2);

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

async fn rebuild_while_queries_run(backend: Backend, postgres: bool) {
    let Some(log) = TestStore::<Project>::fresh(backend).await else { return };
    let store = log.store.clone();
    let (_, _) = load(store.as_ref(), 11, 800, 150).await;
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
        tokio::spawn(async move { load(store.as_ref(), 12, 300, 200).await })
    };
    for _ in 0..2 {
        let report = live.rebuild("projects", &|_, _| {}).await.expect("rebuild");
        assert!(report.events >= 800, "the rebuild skipped events: {report:?}");
    }
    let (ids, _) = writer.await.expect("writer");
    let head = store.head().await.expect("head");
    assert!(caught_up(live.as_ref(), &head, CATCH_UP).await, "the live view did not catch up");
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
    replay(&store, fresh.clone(), &head).await;
    let rebuilt = dump(view.as_ref(), &all_ids).await;
    assert!(rebuilt.0.len() > 100);
    assert_eq!(rebuilt, dump(fresh.as_ref(), &all_ids).await, "the swapped-in view differs from a fresh replay");
    assert_eq!(view.position().await.expect("position"), head, "the swapped-in view's checkpoint");
}

on_every_store!(rebuild_while_queries_run, rebuild_while_queries_run, 4);

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
async fn rebuild_in_tiny_batches(backend: Backend, postgres: bool) {
    let Some(log) = TestStore::<Project>::fresh(backend).await else { return };
    let store = log.store.clone();
    let (ids, written) = load(store.as_ref(), 21, 700, 60).await;
    let place = Place::fresh(postgres);
    let Some(view) = place.open(schema()).await else { return };
    let view = Arc::new(view);
    let report = runner(&store, view.clone(), 3).rebuild("projects", &|_, _| {}).await.expect("rebuild");
    assert!(report.events >= 700, "events rebuilt: {report:?}");
    assert!(view.position().await.expect("position").covers_all(&written));
    let fresh = Arc::new(Place::fresh(postgres).open(schema()).await.expect("fresh"));
    replay(&store, fresh.clone(), &written).await;
    let memory = Arc::new(InMemoryView::new(schema()).expect("memory view"));
    replay(&store, memory.clone(), &written).await;
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

on_every_store!(rebuild_in_tiny_batches_equals_a_fresh_replay, rebuild_in_tiny_batches, 2);

fn change(id: &str, version: u64, name: &str) -> RowChange {
    let mut row = Row::new();
    row.insert("name".into(), name.into());
    row.insert("budget".into(), (version as i64).into());
    RowChange {
        id: id.into(),
        version,
        state: kes_core::RowChange::state_of(&serde_json::json!({ "name": name })).expect("state JSON"),
        row: Some(row),
    }
}

fn at(offset: u64) -> Checkpoint {
    let mut c = Checkpoint::start();
    c.advance(Position::new(0, offset));
    c
}

/// A rebuild that stops before its swap (the process ends): the live copy
/// serves unchanged throughout, the shadow's checkpoint matches its rows,
/// and the next rebuild starts over from an empty shadow.
async fn rebuild_stopped_before_the_swap(backend: Backend, postgres: bool) {
    let Some(log) = TestStore::<Project>::fresh(backend).await else { return };
    let store = log.store.clone();
    let (ids, written) = load(store.as_ref(), 31, 300, 40).await;
    let place = Place::fresh(postgres);
    let Some(view) = place.open(schema()).await else { return };
    let view = Arc::new(view);
    replay(&store, view.clone(), &written).await;
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

on_every_store!(rebuild_stopped_before_the_swap_starts_over, rebuild_stopped_before_the_swap, 2);
