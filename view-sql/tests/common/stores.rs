//! The event stores projection tests run on: the in-memory reference, a
//! SQLite and a PostgreSQL `SqlStore`, and a `KafkaStore` on three
//! partitions. A test body takes the store as `Arc<dyn EventStore<A>>`, so
//! one body runs on every backend. Shared by the list backends' tests
//! (kes-view-search includes this file).

use std::sync::Arc;
use std::time::Duration;

use kes_core::{Aggregate, CatchUp, Checkpoint, EventStore, InMemoryStore, Position};
use kes_store_kafka::{KafkaStore, KafkaStoreConfig};
use kes_store_sql::SqlStore;

/// Which event store a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `kes_core::InMemoryStore`.
    Memory,
    /// `SqlStore` on a SQLite file of its own.
    Sqlite,
    /// `SqlStore` on a fresh PostgreSQL database.
    Postgres,
    /// `KafkaStore` on fresh topics of three partitions.
    Kafka,
}

/// Kafka tests of one binary take turns on the broker: the test broker
/// (Tansu) serves records slowly, and several tests loading it at once only
/// make each of them slower.
static KAFKA_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An event store for one test, with whatever it lives in (a temporary
/// directory, a database dropped at the end, the broker turn).
pub struct TestStore<A: Aggregate> {
    /// The store.
    pub store: Arc<dyn EventStore<A>>,
    /// What this backend needs kept alive; dropped after the store.
    _keep: Keep,
}

enum Keep {
    Nothing,
    Dir(tempfile::TempDir),
    Database(DroppedDatabase),
    Turn(tokio::sync::MutexGuard<'static, ()>),
}

impl<A: Aggregate> TestStore<A> {
    /// A new, empty store of `backend`; `None` when its service is missing
    /// (skipped, or failed under `CI`, by the rule of `kes-test-support`).
    pub async fn fresh(backend: Backend) -> Option<Self> {
        let (store, keep): (Arc<dyn EventStore<A>>, Keep) = match backend {
            Backend::Memory => (Arc::new(InMemoryStore::<A>::new()), Keep::Nothing),
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("events.db").display());
                let store = SqlStore::<A>::open(&url).await.unwrap_or_else(|e| panic!("cannot open {url}: {e}"));
                (Arc::new(store), Keep::Dir(dir))
            }
            Backend::Postgres => {
                let url = kes_test_support::fresh_postgres_database(&env!("CARGO_PKG_NAME").replace('-', "_")).await?;
                let database = DroppedDatabase::new(&url);
                let store =
                    SqlStore::<A>::open(&url).await.unwrap_or_else(|e| panic!("cannot open the store at {url}: {e}"));
                (Arc::new(store), Keep::Database(database))
            }
            Backend::Kafka => {
                let brokers = kes_test_support::kafka_brokers()?;
                let turn = KAFKA_TURN.lock().await;
                let mut config =
                    KafkaStoreConfig::new(brokers, kes_test_support::unique_prefix(env!("CARGO_PKG_NAME")));
                config.partitions = 3;
                config.request_timeout = Duration::from_secs(30);
                let store = match KafkaStore::<A>::open(config).await {
                    Ok(store) => store,
                    Err(e) => return kes_test_support::missing("a usable Kafka broker", &e.to_string()),
                };
                (Arc::new(store), Keep::Turn(turn))
            }
        };
        Some(Self { store, _keep: keep })
    }
}

/// A fresh PostgreSQL database, dropped when this is (the fixtures of these
/// tests should not pile up on the shared server).
pub struct DroppedDatabase {
    url: String,
}

impl DroppedDatabase {
    /// Drops the database at `url` (one of `fresh_postgres_database`) when
    /// dropped.
    pub fn new(url: &str) -> Self {
        Self { url: url.to_owned() }
    }
}

impl Drop for DroppedDatabase {
    fn drop(&mut self) {
        let Some(name) = self.url.rsplit('/').next().map(|n| n.split('?').next().unwrap_or(n).to_owned()) else {
            return;
        };
        let admin = kes_test_support::database_url();
        // Drop runs inside the test's runtime: a thread of its own with a
        // runtime of its own can wait for the server.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async move {
                use sqlx::Connection as _;
                let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await else { return };
                // WITH (FORCE) ends the sessions a store still holds open.
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut conn).await;
                let _ = conn.close().await;
            });
        });
        let _ = dropped.join();
    }
}

/// Advances `written` past every record `more` covers.
pub fn merge(written: &mut Checkpoint, more: &Checkpoint) {
    for (partition, next) in more.iter() {
        if next > 0 {
            written.advance(Position::new(partition, next - 1));
        }
    }
}

/// Waits until `runner` has applied every record `written` covers: one
/// position per partition (a Kafka checkpoint's offsets are per partition,
/// so no single position stands for the whole log).
pub async fn caught_up(runner: &dyn CatchUp, written: &Checkpoint, timeout: Duration) -> bool {
    for (partition, next) in written.iter() {
        if next > 0 && !runner.wait_for(Position::new(partition, next - 1), timeout).await {
            return false;
        }
    }
    true
}
