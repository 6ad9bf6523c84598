//! The projection runner over the in-memory store and view: batches,
//! checkpoints, resume, rebuild, lag and read-your-writes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kes_core::conformance::{Ledger, LedgerEvent};
use kes_core::{
    CatchUp, EventStore, ExpectedVersion, Field, FieldValue, InMemoryStore, InMemoryView, ListQuery, ListView,
    Metadata, Position, Projection, ProjectionRunner, Row, RowChange, RunnerConfig, ViewCopy, ViewProjection,
    ViewSchema, ViewStore,
};

fn schema() -> ViewSchema {
    ViewSchema::new("ledgers", 1)
        .field(Field::integer("total").filterable().sortable())
        .field(Field::integer("entries"))
}

fn row(l: &Ledger) -> Row {
    let mut r = Row::new();
    r.insert("total".into(), FieldValue::Integer(l.total));
    r.insert("entries".into(), FieldValue::Integer(l.entries as i64));
    r
}

struct Setup {
    store: InMemoryStore<Ledger>,
    view: Arc<InMemoryView>,
    runner: Arc<ProjectionRunner<Ledger, InMemoryStore<Ledger>>>,
}

fn setup(store: InMemoryStore<Ledger>, view: Arc<InMemoryView>, batch_size: usize) -> Setup {
    let projection: Arc<dyn Projection<LedgerEvent>> = Arc::new(ViewProjection::<Ledger>::new(view.clone(), row));
    let config = RunnerConfig { batch_size, retry_delay: Duration::from_millis(20), ..RunnerConfig::default() };
    let runner = ProjectionRunner::new(store.clone(), vec![projection], config);
    Setup { store, view, runner }
}

async fn add(store: &InMemoryStore<Ledger>, id: &str, amounts: &[i64]) -> Position {
    let version = store.load(id).await.unwrap().map_or(0, |s| s.version);
    let mut events: Vec<LedgerEvent> = amounts.iter().map(|a| LedgerEvent::Added { amount: *a }).collect();
    if version == 0 {
        events.insert(0, LedgerEvent::Opened);
    }
    store.append(id, ExpectedVersion::Exact(version), events, Metadata::default()).await.unwrap().position
}

/// Appends `events` single-amount events (amounts 0, 1, …) round-robin over
/// the ledgers `l-0`…`l-{ledgers - 1}`; the position of the last.
async fn add_spread(store: &InMemoryStore<Ledger>, events: i64, ledgers: i64) -> Position {
    let mut last = Position::new(0, 0);
    for i in 0..events {
        last = add(store, &format!("l-{}", i % ledgers), &[i]).await;
    }
    last
}

async fn totals(view: &InMemoryView) -> Vec<(String, Row)> {
    let page = view.list(&ListQuery::new().page_size(100)).await.unwrap();
    page.items.into_iter().map(|i| (i.id, i.row)).collect()
}

#[tokio::test]
async fn follows_the_log_and_waits_for_a_position() {
    let s = setup(InMemoryStore::new(), Arc::new(InMemoryView::new(schema()).unwrap()), 4);
    s.runner.start().await.unwrap();
    let last = add_spread(&s.store, 30, 5).await;
    assert!(s.runner.wait_for(last, Duration::from_secs(5)).await, "the view never caught up");
    let rows = totals(&s.view).await;
    assert_eq!(rows.len(), 5);
    let sum: i64 =
        rows.iter().map(|(_, r)| if let Some(FieldValue::Integer(t)) = r.get("total") { *t } else { 0 }).sum();
    assert_eq!(sum, (0..30).sum::<i64>());
    let status = s.runner.status().await.unwrap();
    assert_eq!(status[0].lag, 0);
    assert!(status[0].last_error.is_none());
    // A position the log has not reached yet is not waited for forever.
    assert!(!s.runner.wait_for(Position::new(0, 1_000), Duration::from_millis(50)).await);
    s.runner.shutdown().await;
}

#[tokio::test]
async fn a_restarted_runner_resumes_from_its_checkpoint_without_double_applying() {
    let store = InMemoryStore::new();
    let view = Arc::new(InMemoryView::new(schema()).unwrap());
    let first = setup(store.clone(), view.clone(), 3);
    first.runner.start().await.unwrap();
    let p = add(&store, "a", &[1, 2, 3]).await;
    assert!(first.runner.wait_for(p, Duration::from_secs(5)).await);
    first.runner.shutdown().await;
    add(&store, "a", &[10]).await;
    let p = add(&store, "b", &[5]).await;
    let second = setup(store.clone(), view.clone(), 3);
    second.runner.start().await.unwrap();
    assert!(second.runner.wait_for(p, Duration::from_secs(5)).await);
    let rows = totals(&view).await;
    assert_eq!(rows[0].1.get("total"), Some(&FieldValue::Integer(16)));
    assert_eq!(rows[0].1.get("entries"), Some(&FieldValue::Integer(4)), "an event was applied twice");
    assert_eq!(rows[1].1.get("total"), Some(&FieldValue::Integer(5)));
    second.runner.shutdown().await;
}

#[tokio::test]
async fn rebuild_serves_the_old_copy_then_swaps_in_an_equal_one() {
    let s = setup(InMemoryStore::new(), Arc::new(InMemoryView::new(schema()).unwrap()), 7);
    s.runner.start().await.unwrap();
    let last = add_spread(&s.store, 200, 13).await;
    assert!(s.runner.wait_for(last, Duration::from_secs(5)).await);
    let before = totals(&s.view).await;
    // Writes keep coming while the rebuild runs.
    let writer = {
        let store = s.store.clone();
        tokio::spawn(async move {
            let mut last = Position::new(0, 0);
            for i in 0..50 {
                last = add(&store, &format!("l-{}", i % 17), &[1]).await;
                tokio::task::yield_now().await;
            }
            last
        })
    };
    let report = s.runner.rebuild("ledgers", &|_, _| {}).await.unwrap();
    assert!(report.events >= 213, "the rebuild read only {} events", report.events);
    let last = writer.await.unwrap();
    assert!(s.runner.wait_for(last, Duration::from_secs(5)).await);
    let after = totals(&s.view).await;
    // A fresh view built from scratch must agree with the rebuilt one.
    let fresh = setup(s.store.clone(), Arc::new(InMemoryView::new(schema()).unwrap()), 64);
    fresh.runner.start().await.unwrap();
    assert!(fresh.runner.wait_for(last, Duration::from_secs(5)).await);
    assert_eq!(after, totals(&fresh.view).await);
    assert_ne!(before, after);
    assert_eq!(s.runner.status().await.unwrap()[0].lag, 0);
    s.runner.shutdown().await;
    fresh.runner.shutdown().await;
}

#[tokio::test]
async fn unreadable_view_state_is_reported_and_retried_not_panicked() {
    let s = setup(InMemoryStore::new(), Arc::new(InMemoryView::new(schema()).unwrap()), 8);
    let bad = RowChange {
        id: "a".into(),
        version: 0,
        state: kes_core::RowChange::state_of(&serde_json::json!("not a ledger")).expect("state JSON"),
        row: None,
    };
    s.view.write(ViewCopy::Live, &[bad], &kes_core::Checkpoint::start()).await.unwrap();
    s.runner.start().await.unwrap();
    let p = add(&s.store, "a", &[1]).await;
    // The runner reports the failure once it has met the state.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = s.runner.status().await.unwrap();
        if status[0].last_error.is_some() {
            break status;
        }
        assert!(Instant::now() < deadline, "no failure was reported: {status:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(status[0].last_error.as_deref().is_some_and(|e| e.contains("cannot be read")), "{status:?}");
    assert_eq!(status[0].lag, 2);
    assert!(!status[0].checkpoint.covers(p), "the checkpoint moved past the unreadable state");
    let states = s.view.states(ViewCopy::Live, &["a".to_owned()]).await.unwrap();
    assert_eq!(states["a"].state, serde_json::json!("not a ledger"), "a corrupt state was silently overwritten");
    // Retried, not given up: once the state reads again, the runner goes on.
    let repaired = RowChange {
        id: "a".into(),
        version: 0,
        state: kes_core::RowChange::state_of(&Ledger::default()).unwrap(),
        row: None,
    };
    s.view.write(ViewCopy::Live, &[repaired], &kes_core::Checkpoint::start()).await.unwrap();
    assert!(s.runner.wait_for(p, Duration::from_secs(30)).await, "the runner stopped retrying");
    let status = s.runner.status().await.unwrap();
    assert_eq!((status[0].lag, status[0].last_error.as_deref()), (0, None));
    assert_eq!(totals(&s.view).await[0].1.get("total"), Some(&FieldValue::Integer(1)));
    s.runner.shutdown().await;
}

#[tokio::test]
async fn unknown_projection_names_are_an_error() {
    let s = setup(InMemoryStore::new(), Arc::new(InMemoryView::new(schema()).unwrap()), 8);
    assert!(s.runner.rebuild("nope", &|_, _| {}).await.is_err());
    assert_eq!(s.runner.names(), vec!["ledgers".to_owned()]);
}

/// Pitfall: a view that holds an aggregate at an older version than the
/// next event it is given (its copy missed events, e.g. written around a
/// swap by another process) must not fold that event onto the stale state;
/// the runner reads the missing events from the log first.
#[tokio::test]
async fn a_view_that_missed_events_is_refolded_from_the_log() {
    let store = InMemoryStore::new();
    let view = Arc::new(InMemoryView::new(schema()).unwrap());
    add(&store, "a", &[1]).await; // versions 1, 2
    let skipped = add(&store, "a", &[10, 100]).await; // versions 3, 4
    // The view holds `a` at version 2, yet its checkpoint is past 3 and 4.
    let stale = Ledger { open: true, closed: false, total: 1, entries: 1 };
    let change = RowChange {
        id: "a".into(),
        version: 2,
        state: kes_core::RowChange::state_of(&stale).unwrap(),
        row: Some(row(&stale)),
    };
    let mut checkpoint = kes_core::Checkpoint::start();
    checkpoint.advance(skipped);
    view.write(ViewCopy::Live, &[change], &checkpoint).await.unwrap();

    let s = setup(store.clone(), view.clone(), 8);
    s.runner.start().await.unwrap();
    let last = add(&store, "a", &[1000]).await; // version 5
    assert!(s.runner.wait_for(last, Duration::from_secs(5)).await, "the view never caught up");
    let rows = totals(&view).await;
    assert_eq!(rows[0].1.get("total"), Some(&FieldValue::Integer(1111)), "the missed events were not refolded");
    assert_eq!(rows[0].1.get("entries"), Some(&FieldValue::Integer(4)));
    assert!(s.runner.status().await.unwrap()[0].last_error.is_none());
    s.runner.shutdown().await;
}

/// Pitfall: a process that projects nothing (no view to wait on) never
/// answers a read carrying a position as caught up; one that reads stored
/// checkpoints answers once they cover it.
#[tokio::test]
async fn nothing_projected_is_never_caught_up_and_stored_checkpoints_are_waited_for() {
    let store = InMemoryStore::<Ledger>::new();
    let p = add(&store, "a", &[1]).await;
    let nothing = kes_core::StoredCatchUp::new(Vec::new(), Duration::from_millis(5));
    assert!(!nothing.wait_for(p, Duration::from_millis(20)).await, "no view, yet caught up");
    let idle = ProjectionRunner::new(store.clone(), Vec::new(), RunnerConfig::default());
    assert!(!idle.wait_for(p, Duration::from_millis(20)).await, "no projection, yet caught up");

    let view = Arc::new(InMemoryView::new(schema()).unwrap());
    let stored = kes_core::StoredCatchUp::new(vec![view.clone() as Arc<dyn ListView>], Duration::from_millis(5));
    assert!(!stored.wait_for(p, Duration::from_millis(20)).await, "caught up before anything was projected");
    let s = setup(store.clone(), view.clone(), 8);
    s.runner.start().await.unwrap();
    assert!(stored.wait_for(p, Duration::from_secs(5)).await, "the stored checkpoint was not waited for");
    s.runner.shutdown().await;
}

/// An in-memory view that records which ids each `states` call of the
/// shadow copy asks for, which ids went into it and which were handed to
/// it as new to it, and can fail the next shadow write or the next start
/// of a shadow copy.
struct Recording {
    inner: InMemoryView,
    asked: std::sync::Mutex<Vec<String>>,
    written: std::sync::Mutex<std::collections::HashSet<String>>,
    asked_unwritten: std::sync::Mutex<Vec<String>>,
    /// Ids a rebuild's batch named as new to the shadow, and as known.
    named_new: std::sync::Mutex<Vec<String>>,
    named_known: std::sync::Mutex<Vec<String>>,
    /// Ids named new that the shadow held already: none may be.
    new_but_written: std::sync::Mutex<Vec<String>>,
    fail_next_shadow_write: std::sync::atomic::AtomicBool,
    fail_next_begin: std::sync::atomic::AtomicBool,
    /// Each shadow write takes a permit first.
    shadow_writes: tokio::sync::Semaphore,
}

impl Recording {
    fn new() -> Self {
        Self {
            inner: InMemoryView::new(schema()).unwrap(),
            asked: Default::default(),
            written: Default::default(),
            asked_unwritten: Default::default(),
            named_new: Default::default(),
            named_known: Default::default(),
            new_but_written: Default::default(),
            fail_next_shadow_write: Default::default(),
            fail_next_begin: Default::default(),
            shadow_writes: tokio::sync::Semaphore::new(tokio::sync::Semaphore::MAX_PERMITS),
        }
    }

    /// Shadow writes wait until [`Recording::shadow_writes`] gets permits.
    fn held() -> Self {
        Self { shadow_writes: tokio::sync::Semaphore::new(0), ..Self::new() }
    }
}

#[async_trait::async_trait]
impl ListView for Recording {
    fn schema(&self) -> &ViewSchema {
        self.inner.schema()
    }
    async fn list(&self, query: &ListQuery) -> Result<kes_core::Page, kes_core::ViewError> {
        self.inner.list(query).await
    }
    async fn position(&self) -> Result<kes_core::Checkpoint, kes_core::ViewError> {
        self.inner.position().await
    }
}

#[async_trait::async_trait]
impl ViewStore for Recording {
    async fn progress(&self, copy: ViewCopy) -> Result<Option<kes_core::ViewProgress>, kes_core::ViewError> {
        self.inner.progress(copy).await
    }
    async fn states(
        &self,
        copy: ViewCopy,
        ids: &[String],
    ) -> Result<std::collections::HashMap<String, kes_core::StoredState>, kes_core::ViewError> {
        if copy == ViewCopy::Shadow {
            let written = self.written.lock().unwrap();
            self.asked.lock().unwrap().extend(ids.iter().cloned());
            let unwritten = ids.iter().filter(|id| !written.contains(*id)).cloned();
            self.asked_unwritten.lock().unwrap().extend(unwritten);
        }
        self.inner.states(copy, ids).await
    }
    async fn write(
        &self,
        copy: ViewCopy,
        changes: &[RowChange],
        checkpoint: &kes_core::Checkpoint,
    ) -> Result<(), kes_core::ViewError> {
        if copy == ViewCopy::Shadow {
            self.shadow_writes.acquire().await.unwrap().forget();
            if self.fail_next_shadow_write.swap(false, std::sync::atomic::Ordering::SeqCst) {
                return Err(kes_core::ViewError::Unavailable("injected".into()));
            }
            self.written.lock().unwrap().extend(changes.iter().map(|c| c.id.clone()));
        }
        self.inner.write(copy, changes, checkpoint).await
    }
    async fn write_shadow_fenced(
        &self,
        new: Vec<RowChange>,
        known: Vec<RowChange>,
        checkpoint: &kes_core::Checkpoint,
        _: &kes_core::Lease,
    ) -> Result<(), kes_core::ViewError> {
        {
            let written = self.written.lock().unwrap();
            let doubled = new.iter().filter(|c| written.contains(&c.id)).map(|c| c.id.clone());
            self.new_but_written.lock().unwrap().extend(doubled);
        }
        self.named_new.lock().unwrap().extend(new.iter().map(|c| c.id.clone()));
        self.named_known.lock().unwrap().extend(known.iter().map(|c| c.id.clone()));
        let mut changes = new;
        changes.extend(known);
        self.write(ViewCopy::Shadow, &changes, checkpoint).await
    }
    async fn begin_rebuild(&self) -> Result<(), kes_core::ViewError> {
        if self.fail_next_begin.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Err(kes_core::ViewError::Unavailable("injected".into()));
        }
        self.written.lock().unwrap().clear();
        self.inner.begin_rebuild().await
    }
    async fn swap(&self) -> Result<(), kes_core::ViewError> {
        self.inner.swap().await
    }
}

/// A runner of one projection into `view`, in batches of 5.
fn recording_runner(
    store: &InMemoryStore<Ledger>,
    view: &Arc<Recording>,
) -> Arc<ProjectionRunner<Ledger, InMemoryStore<Ledger>>> {
    let projection: Arc<dyn Projection<LedgerEvent>> = Arc::new(ViewProjection::<Ledger>::new(view.clone(), row));
    ProjectionRunner::new(store.clone(), vec![projection], RunnerConfig { batch_size: 5, ..RunnerConfig::default() })
}

/// Checks that `view` holds the rows a plain follow of `store` up to
/// `last` makes.
async fn assert_rows_of_a_follow(store: &InMemoryStore<Ledger>, last: Position, view: &InMemoryView) {
    let s = setup(store.clone(), Arc::new(InMemoryView::new(schema()).unwrap()), 5);
    s.runner.start().await.unwrap();
    assert!(s.runner.wait_for(last, Duration::from_secs(5)).await);
    assert_eq!(totals(view).await, totals(&s.view).await);
    s.runner.shutdown().await;
}

#[tokio::test]
async fn a_rebuild_reads_back_only_states_it_wrote_and_still_folds_every_event() {
    let store = InMemoryStore::new();
    // Aggregates whose events spread over several batches of 5.
    let last = add_spread(&store, 120, 11).await;
    let view = Arc::new(Recording::new());
    let runner = recording_runner(&store, &view);
    let report = runner.rebuild("ledgers", &|_, _| {}).await.unwrap();
    assert_eq!(report.events, 131);
    // The states of aggregates met again were read back and folded onto…
    assert!(!view.asked.lock().unwrap().is_empty(), "no state was ever read back from the shadow");
    // …but an aggregate met for the first time was not looked up.
    assert_eq!(*view.asked_unwritten.lock().unwrap(), Vec::<String>::new());
    // Each aggregate was handed to the shadow as new once, in its first
    // batch, and as known in every later one: never as new once there.
    let mut named_new = view.named_new.lock().unwrap().clone();
    named_new.sort();
    let mut expected: Vec<String> = (0..11).map(|i| format!("l-{i}")).collect();
    expected.sort();
    assert_eq!(named_new, expected);
    assert_eq!(*view.new_but_written.lock().unwrap(), Vec::<String>::new());
    assert!(!view.named_known.lock().unwrap().is_empty(), "no batch met an aggregate again");
    // The rebuilt rows are those of a plain follow of the same log.
    assert_rows_of_a_follow(&store, last, &view.inner).await;
}

#[tokio::test]
async fn a_rebuild_whose_copy_cannot_be_started_fails_and_the_next_one_completes() {
    let store = InMemoryStore::new();
    let last = add_spread(&store, 30, 7).await;
    let view = Arc::new(Recording::new());
    view.fail_next_begin.store(true, std::sync::atomic::Ordering::SeqCst);
    let runner = recording_runner(&store, &view);
    // The log is read while the copy is started: the failure still ends
    // the rebuild, and nothing of the read is left behind.
    let failed = runner.rebuild("ledgers", &|_, _| {}).await.expect_err("the copy could not be started");
    assert!(failed.to_string().contains("injected"), "{failed}");
    assert!(view.named_new.lock().unwrap().is_empty(), "a batch was written without a fresh copy");
    let report = runner.rebuild("ledgers", &|_, _| {}).await.unwrap();
    assert_eq!(report.events, 37);
    assert_rows_of_a_follow(&store, last, &view.inner).await;
}

#[tokio::test]
async fn after_a_failed_shadow_write_every_fold_asks_the_view_again() {
    let store = InMemoryStore::<Ledger>::new();
    let mut positions = Vec::new();
    for id in ["a", "b", "c"] {
        positions.push(add(&store, id, &[]).await);
    }
    let view = Arc::new(Recording::new());
    let projection = ViewProjection::<Ledger>::new(view.clone(), row);
    projection.begin_rebuild().await.unwrap();
    let mut checkpoint = kes_core::Checkpoint::start();
    let mut apply = async |id: &str, at: Position| {
        let batch = store.read_page(id, 0, 10).await.unwrap();
        checkpoint.advance(at);
        projection.apply(ViewCopy::Shadow, &batch, &checkpoint).await
    };
    apply("a", positions[0]).await.unwrap();
    assert!(view.asked.lock().unwrap().is_empty(), "a fresh shadow was asked for an aggregate it cannot hold");
    view.fail_next_shadow_write.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(apply("b", positions[1]).await.is_err());
    // Another runner may fill the shadow from here on: nothing is assumed.
    apply("c", positions[2]).await.unwrap();
    assert_eq!(*view.asked.lock().unwrap(), vec!["c".to_owned()]);
}

#[tokio::test]
async fn a_rebuild_folds_the_next_batch_while_the_view_writes_the_last() {
    let store = InMemoryStore::<Ledger>::new();
    let first = add(&store, "a", &[1]).await;
    let second = add(&store, "a", &[2]).await;
    let view = Arc::new(Recording::held());
    let projection = Arc::new(ViewProjection::<Ledger>::new(view.clone(), row));
    let lease = kes_core::Lease { owner: "me".into(), fence: 0 };
    projection.begin_rebuild().await.unwrap();
    let mut at_first = kes_core::Checkpoint::start();
    at_first.advance(first);
    let mut at_second = at_first.clone();
    at_second.advance(second);
    // Versions 1–2, then 3, of one aggregate, in two batches.
    let opened = store.read_page("a", 0, 2).await.unwrap();
    let added = store.read_page("a", 2, 10).await.unwrap();
    assert_eq!(added.len(), 1);
    // The first batch's write waits for a permit, and the call returns anyway.
    tokio::time::timeout(Duration::from_secs(5), projection.apply_ahead(&opened, &at_first, &lease))
        .await
        .expect("apply_ahead waited for its own write")
        .unwrap();
    let next = {
        let (projection, lease) = (projection.clone(), lease.clone());
        tokio::spawn(async move { projection.apply_ahead(&added, &at_second, &lease).await })
    };
    // The second batch is folded onto the state the running write carries,
    // not onto the view's (which does not have it yet), and waits for that
    // write before it starts its own.
    tokio::task::yield_now().await;
    assert!(!next.is_finished(), "the second batch did not wait for the first one's write");
    view.shadow_writes.add_permits(2);
    next.await.unwrap().unwrap();
    projection.finish_ahead().await.unwrap();
    assert!(view.asked.lock().unwrap().is_empty(), "the view was asked for a state it was still writing");
    let states = view.inner.states(ViewCopy::Shadow, &["a".to_owned()]).await.unwrap();
    assert_eq!(states["a"].version, 3);
    projection.swap().await.unwrap();
    assert_eq!(totals(&view.inner).await[0].1.get("total"), Some(&FieldValue::Integer(3)));
}

#[tokio::test]
async fn a_failed_write_ahead_is_reported_by_the_next_call() {
    let store = InMemoryStore::<Ledger>::new();
    let first = add(&store, "a", &[]).await;
    let second = add(&store, "b", &[]).await;
    let view = Arc::new(Recording::new());
    let projection = ViewProjection::<Ledger>::new(view.clone(), row);
    let lease = kes_core::Lease { owner: "me".into(), fence: 0 };
    projection.begin_rebuild().await.unwrap();
    let mut checkpoint = kes_core::Checkpoint::start();
    checkpoint.advance(first);
    view.fail_next_shadow_write.store(true, std::sync::atomic::Ordering::SeqCst);
    projection.apply_ahead(&store.read_page("a", 0, 10).await.unwrap(), &checkpoint, &lease).await.unwrap();
    checkpoint.advance(second);
    let e = projection.apply_ahead(&store.read_page("b", 0, 10).await.unwrap(), &checkpoint, &lease).await;
    assert!(matches!(e, Err(kes_core::ProjectionError::View(kes_core::ViewError::Unavailable(_)))), "{e:?}");
    // Nothing is left running, and the shadow holds neither batch.
    projection.finish_ahead().await.unwrap();
    assert!(view.inner.states(ViewCopy::Shadow, &["a".to_owned(), "b".to_owned()]).await.unwrap().is_empty());
}
