//! Fresh stores for the tests: a SQLite file in a temp folder, or a
//! PostgreSQL schema of its own (so tests run in parallel).

#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use kes_core::{
    Aggregate, Appended, Checkpoint, Envelope, EventStore, EventStream, ExpectedVersion, Metadata, Snapshot,
    StateDocument, StoreError,
};
use kes_store_sql::{SqlStore, SqlStoreConfig};
use sqlx::{Connection, Executor, PgConnection};
use tempfile::TempDir;
use tokio::sync::OnceCell;

/// A SQLite store whose temp folder lives as long as any clone of it.
pub struct TempStore<A: Aggregate> {
    pub store: SqlStore<A>,
    pub dir: Arc<TempDir>,
}

impl<A: Aggregate> Clone for TempStore<A> {
    fn clone(&self) -> Self {
        Self { store: self.store.clone(), dir: Arc::clone(&self.dir) }
    }
}

impl<A: Aggregate> TempStore<A> {
    pub fn url(&self) -> String {
        sqlite_url(&self.dir)
    }
}

/// A clock for a store's state cache that moves only when the test says:
/// entries expire when the test advances it past their time-to-live.
#[derive(Clone)]
pub struct HandClock(Arc<Mutex<Instant>>);

impl HandClock {
    pub fn new() -> Self {
        Self(Arc::new(Mutex::new(Instant::now())))
    }

    /// The clock for `SqlStoreConfig::state_cache_clock`.
    pub fn reader(&self) -> impl Fn() -> Instant + Send + Sync + use<> {
        let time = Arc::clone(&self.0);
        move || *time.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) += by;
    }
}

impl Default for HandClock {
    fn default() -> Self {
        Self::new()
    }
}

pub fn sqlite_url(dir: &TempDir) -> String {
    format!("sqlite://{}", dir.path().join("data").join("events.db").display())
}

/// A fresh SQLite store in a new temp folder (the `data/` folder under it
/// is created by the store).
pub async fn sqlite<A: Aggregate>() -> TempStore<A> {
    sqlite_with(|b| b).await
}

/// A fresh SQLite store with settings of its own.
pub async fn sqlite_with<A: Aggregate>(configure: impl FnOnce(SqlStoreConfig) -> SqlStoreConfig) -> TempStore<A> {
    let dir = tempfile::tempdir().expect("temp dir");
    let store =
        SqlStore::open(configure(SqlStoreConfig::from_url(&sqlite_url(&dir)))).await.expect("open sqlite store");
    TempStore { store, dir: Arc::new(dir) }
}

#[async_trait]
impl<A: Aggregate> EventStore<A> for TempStore<A> {
    async fn append(
        &self,
        id: &str,
        expected: ExpectedVersion,
        events: Vec<A::Event>,
        metadata: Metadata,
    ) -> Result<Appended, StoreError> {
        self.store.append(id, expected, events, metadata).await
    }
    async fn recall(&self, id: &str, key: &str) -> Result<Option<Appended>, StoreError> {
        self.store.recall(id, key).await
    }
    async fn load(&self, id: &str) -> Result<Option<Snapshot<A>>, StoreError> {
        self.store.load(id).await
    }
    async fn load_current(&self, id: &str) -> Result<Option<Snapshot<A>>, StoreError> {
        self.store.load_current(id).await
    }
    async fn load_document(&self, id: &str) -> Result<Option<StateDocument>, StoreError> {
        self.store.load_document(id).await
    }
    async fn read(&self, id: &str) -> Result<Vec<Envelope<A::Event>>, StoreError> {
        self.store.read(id).await
    }
    async fn read_page(&self, id: &str, after: u64, limit: usize) -> Result<Vec<Envelope<A::Event>>, StoreError> {
        self.store.read_page(id, after, limit).await
    }
    async fn subscribe(&self, from: Checkpoint) -> Result<EventStream<A::Event>, StoreError> {
        self.store.subscribe(from).await
    }
    async fn head(&self) -> Result<Checkpoint, StoreError> {
        self.store.head().await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }
    async fn flush(&self) -> Result<(), StoreError> {
        self.store.flush().await
    }
}

pub fn database_url() -> String {
    kes_test_support::database_url()
}

/// Prefix of the schemas these tests create; the second part is the Unix
/// time, so that leftovers of earlier runs can be dropped.
const SCHEMA_PREFIX: &str = "kes_store_sql_";

static REACHABLE: OnceCell<bool> = OnceCell::const_new();

/// Whether PostgreSQL answers. With `CI` set, an unreachable server fails
/// the test; without, the test is skipped with the reason printed.
pub async fn postgres_available() -> bool {
    let up = *REACHABLE
        .get_or_init(|| async {
            let url = database_url();
            let connect = tokio::time::timeout(Duration::from_secs(5), PgConnection::connect(&url)).await;
            match connect {
                Ok(Ok(mut conn)) => {
                    drop_old_schemas(&mut conn).await;
                    let _ = conn.close().await;
                    true
                }
                Ok(Err(e)) => {
                    eprintln!("PostgreSQL at {url} is not reachable: {e}");
                    false
                }
                Err(_) => {
                    eprintln!("PostgreSQL at {url} did not answer within 5 s");
                    false
                }
            }
        })
        .await;
    if !up {
        kes_test_support::missing::<()>("PostgreSQL", &format!("{} is not reachable", database_url()));
    }
    up
}

/// Leftover schemas of runs more than an hour old (a crashed run cannot
/// clean up after itself).
async fn drop_old_schemas(conn: &mut PgConnection) {
    let now = unix_now();
    let names: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname, $1)")
            .bind(SCHEMA_PREFIX)
            .fetch_all(&mut *conn)
            .await
            .unwrap_or_default();
    for name in names {
        let born = name[SCHEMA_PREFIX.len()..].split('_').next().and_then(|t| t.parse::<u64>().ok());
        if born.is_some_and(|t| t + 3600 < now) {
            let _ = conn.execute(format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE").as_str()).await;
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A schema name no other test (of this run or a parallel one) uses.
pub fn fresh_schema() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!("{SCHEMA_PREFIX}{}_{}_{}", unix_now(), std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A fresh PostgreSQL store in a schema of its own, or `None` when the
/// server is missing and the test is skipped.
pub async fn postgres<A: Aggregate>() -> Option<SqlStore<A>> {
    postgres_in(&fresh_schema()).await
}

/// A PostgreSQL store in `schema` (created when missing).
pub async fn postgres_in<A: Aggregate>(schema: &str) -> Option<SqlStore<A>> {
    postgres_with(schema, |b| b).await
}

/// A PostgreSQL store in `schema` with settings of its own.
pub async fn postgres_with<A: Aggregate>(
    schema: &str,
    configure: impl FnOnce(SqlStoreConfig) -> SqlStoreConfig,
) -> Option<SqlStore<A>> {
    if !postgres_available().await {
        return None;
    }
    let config = SqlStoreConfig::from_url(&database_url()).schema(schema).max_connections(20);
    Some(SqlStore::open(configure(config)).await.expect("open postgres store"))
}

/// A plain connection whose search path is `schema`, for tests that touch
/// the tables directly.
pub async fn postgres_connection(schema: &str) -> PgConnection {
    let mut conn = PgConnection::connect(&database_url()).await.expect("connect");
    conn.execute(format!("SET search_path TO \"{schema}\"").as_str()).await.expect("search path");
    conn
}
