//! A ProjectionRunner keeps running through outages of what it reads and
//! what it writes, without a restart of the process:
//!
//! - a Kafka broker stopped and started under a runner following a
//!   `KafkaStore` (a broker of the test's own, through
//!   `scripts/kafka-broker.sh` on a free port, so that the shared test broker
//!   keeps serving the other tests);
//! - a PostgreSQL view whose connections the server ends while the runner
//!   applies batches.
//!
//! Afterwards the view holds every acknowledged append and equals a fresh
//! replay of the log.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::Place;
use common::projects::{CATCH_UP, Project, ProjectEvent, Store, dump, load, replay, runner, schema};
use common::stores::{Backend, DroppedDatabase, TestStore, caught_up, merge};
use kes_core::ViewProgress;
use kes_core::{
    Appended, CatchUp, Checkpoint, EventStore, ExpectedVersion, ListQuery, ListView, Metadata, Page, RowChange,
    StoreError, StoredState, ViewCopy, ViewError, ViewSchema, ViewStore,
};
use kes_store_kafka::{KafkaStore, KafkaStoreConfig};
use kes_view_sql::SqlView;
use sqlx::Connection as _;

/// Appends one command, retrying while the store reports itself
/// unavailable (a broker coming back), until `deadline`.
async fn append_when_up(store: &Store, id: &str, deadline: Instant) -> Appended {
    loop {
        let created = vec![ProjectEvent::Created { name: format!("Project {id}"), budget: 7 }];
        match store.append(id, ExpectedVersion::Any, created, Metadata::default()).await {
            Ok(appended) => return appended,
            Err(StoreError::Unavailable(e)) if Instant::now() < deadline => {
                eprintln!("the store is not back yet: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the store did not come back: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_following_kafka_keeps_running_through_a_broker_stop_and_start() {
    let started = Instant::now();
    let Some(own) = kes_test_support::OwnBroker::start() else { return };
    let mut config = KafkaStoreConfig::new(own.address(), kes_test_support::unique_prefix("vsql-outage"));
    config.partitions = 3;
    config.request_timeout = Duration::from_secs(3);
    let store: Store = Arc::new(KafkaStore::<Project>::open(config.clone()).await.expect("connect"));
    let view = Arc::new(Place::fresh(false).open(schema()).await.expect("SQLite view"));
    let runner = runner(&store, view.clone(), 16);
    runner.start().await.expect("start");

    // Appends the runner has applied before the stop, then appends made just
    // before it (the runner may or may not have read them by then).
    let (mut ids, mut written) = load(store.as_ref(), 41, 120, 40).await;
    assert!(caught_up(runner.as_ref(), &written, CATCH_UP).await, "the runner did not catch up before the stop");
    let status = runner.status().await.expect("status while the broker is up");
    assert_eq!((status[0].lag, status[0].last_error.as_deref()), (0, None), "{status:?}");
    let (before_stop, just_before) = load(store.as_ref(), 42, 60, 60).await;
    ids.extend(before_stop);
    merge(&mut written, &just_before);

    own.down();
    // While the broker is down, the runner's status reports it (within a
    // bound far above the request timeout, so a slow machine only waits
    // longer), and the view keeps serving what it has.
    let bound = config.request_timeout * 40;
    let down = tokio::time::timeout(bound, runner.status())
        .await
        .unwrap_or_else(|_| panic!("the runner's status still waited for the stopped broker after {bound:?}"));
    match down {
        Err(e @ StoreError::Unavailable(_)) => eprintln!("status while the broker is down: {e}"),
        other => panic!("expected Unavailable from the status while the broker is down, got {other:?}"),
    }
    let page = view.list(&ListQuery::new()).await.expect("the view serves while the broker is down");
    assert!(!page.items.is_empty());

    own.up();
    // The same runner, never restarted, takes what is appended next.
    let back = append_when_up(&store, "after-restart", Instant::now() + Duration::from_secs(120)).await;
    written.advance(back.position);
    ids.push("after-restart".into());
    let (after_restart, later) = load(store.as_ref(), 43, 60, 60).await;
    ids.extend(after_restart);
    merge(&mut written, &later);
    ids.sort();
    ids.dedup();
    assert!(
        caught_up(runner.as_ref(), &written, CATCH_UP).await,
        "appends from before the stop or after the restart never reached the view"
    );
    let status = runner.status().await.expect("status after the restart");
    assert_eq!((status[0].lag, status[0].last_error.as_deref()), (0, None), "{status:?}");
    runner.shutdown().await;

    let fresh = Arc::new(Place::fresh(false).open(schema()).await.expect("fresh view"));
    replay(&store, fresh.clone(), &written).await;
    let followed = dump(view.as_ref(), &ids).await;
    assert!(followed.0.len() > 40, "too few rows to mean anything: {}", followed.0.len());
    assert_eq!(
        followed,
        dump(fresh.as_ref(), &ids).await,
        "the view followed through the outage differs from a replay"
    );
    assert_eq!(view.position().await.expect("position"), fresh.position().await.expect("position"));
    eprintln!("the broker outage test took {:?}", started.elapsed());
}

/// A view that counts the failures of the calls the runner makes.
struct Observed {
    inner: Arc<SqlView>,
    failures: AtomicUsize,
}

impl Observed {
    fn count<T>(&self, result: Result<T, ViewError>) -> Result<T, ViewError> {
        if result.is_err() {
            self.failures.fetch_add(1, Ordering::SeqCst);
        }
        result
    }
}

#[async_trait]
impl ListView for Observed {
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
impl ViewStore for Observed {
    async fn progress(&self, copy: ViewCopy) -> Result<Option<ViewProgress>, ViewError> {
        self.count(self.inner.progress(copy).await)
    }
    async fn states(&self, copy: ViewCopy, ids: &[String]) -> Result<HashMap<String, StoredState>, ViewError> {
        self.count(self.inner.states(copy, ids).await)
    }
    async fn write(&self, copy: ViewCopy, changes: &[RowChange], checkpoint: &Checkpoint) -> Result<(), ViewError> {
        self.count(self.inner.write(copy, changes, checkpoint).await)
    }
    async fn begin_rebuild(&self) -> Result<(), ViewError> {
        self.count(self.inner.begin_rebuild().await)
    }
    async fn swap(&self) -> Result<(), ViewError> {
        self.count(self.inner.swap().await)
    }
}

/// How many sessions are waiting for a lock on the view's table (read from
/// the lock manager, which every call reads afresh).
async fn waiting_on_the_view(admin: &mut sqlx::PgConnection) -> i64 {
    let (n,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM pg_locks WHERE NOT granted AND relation = 'view_projects'::regclass")
            .fetch_one(&mut *admin)
            .await
            .expect("read pg_locks");
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_writing_to_postgres_recovers_when_the_server_ends_its_connections() {
    let Some(url) = kes_test_support::fresh_postgres_database("vsql_outage").await else { return };
    let _database = DroppedDatabase::new(&url);
    let started = Instant::now();
    let Some(log) = TestStore::<Project>::fresh(Backend::Sqlite).await else { return };
    let store = log.store.clone();
    let view = Arc::new(SqlView::open(&url, schema()).await.expect("open the view"));
    let observed = Arc::new(Observed { inner: view.clone(), failures: AtomicUsize::new(0) });
    let runner = runner(&store, observed.clone(), 8);
    runner.start().await.expect("start");
    let writer = {
        let store = store.clone();
        tokio::spawn(async move { load(store.as_ref(), 51, 600, 80).await })
    };

    let mut admin = sqlx::PgConnection::connect(&url).await.expect("admin connection");
    let mut extra = Vec::new();
    for round in 0..3 {
        // Holds the view's table, so that the runner's next batch waits on
        // it; an append makes sure there is a next batch.
        let mut lock = admin.begin().await.expect("begin");
        sqlx::query("LOCK TABLE view_projects IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.expect("lock");
        let id = format!("round-{round}");
        let created = vec![ProjectEvent::Created { name: format!("Project {id}"), budget: round }];
        let appended = store.append(&id, ExpectedVersion::Any, created, Metadata::default()).await.expect("append");
        extra.push((id, appended.position));
        let deadline = Instant::now() + CATCH_UP;
        while waiting_on_the_view(&mut lock).await == 0 {
            assert!(Instant::now() < deadline, "round {round}: the runner never reached the view's table");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (terminated,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FILTER (WHERE ended) FROM (SELECT pg_terminate_backend(pid) AS ended \
             FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()) s",
        )
        .fetch_one(&mut *lock)
        .await
        .expect("terminate the view's connections");
        assert!(terminated >= 1, "round {round}: no connection of the view was ended");
        lock.rollback().await.expect("release the table");
        assert!(
            runner.wait_for(appended.position, CATCH_UP).await,
            "round {round}: the runner did not recover from its ended connections"
        );
        let failures = observed.failures.load(Ordering::SeqCst);
        assert!(failures > round as usize, "round {round}: the ended connections failed no call ({failures})");
    }
    let _ = admin.close().await;

    let (mut ids, _) = writer.await.expect("writer");
    ids.extend(extra.iter().map(|(id, _)| id.clone()));
    ids.sort();
    let head = store.head().await.expect("head");
    assert!(caught_up(runner.as_ref(), &head, CATCH_UP).await, "the runner did not catch up after the outages");
    let status = runner.status().await.expect("status");
    assert_eq!((status[0].lag, status[0].last_error.as_deref()), (0, None), "{status:?}");
    runner.shutdown().await;

    let fresh = Arc::new(Place::fresh(true).open(schema()).await.expect("fresh view"));
    replay(&store, fresh.clone(), &head).await;
    let followed = dump(view.as_ref(), &ids).await;
    assert!(followed.0.len() > 40, "too few rows to mean anything: {}", followed.0.len());
    assert_eq!(followed, dump(fresh.as_ref(), &ids).await, "the view that lost its connections differs from a replay");
    assert_eq!(view.position().await.expect("position"), head);
    view.close().await;
    eprintln!(
        "the PostgreSQL view outage test took {:?}; {} calls failed",
        started.elapsed(),
        observed.failures.load(Ordering::SeqCst)
    );
}
