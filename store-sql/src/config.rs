//! How a [`SqlStore`] is configured and opened.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kes_core::{Aggregate, Codec};
use kes_sql::Dialect;
use kes_sql::{Pool, Statement};
use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::SqlitePoolOptions;
use sqlx::{ConnectOptions, Connection, Executor};
use tokio::sync::watch;

use crate::cache::{Clock, StateCache};
use crate::error::{SqlStoreError, redact};
use crate::sql::{self};
use crate::store::{Inner, Pools, SqlStore, from_db};
use crate::writer::Queue;

/// Where a [`SqlStore`] lives and how it runs: URL, PostgreSQL schema, pool
/// and cache settings. `SqlStoreConfig::from_url(url)` gives the defaults;
/// a URL alone converts into one (`SqlStore::open("sqlite::memory:")`).
#[derive(Clone)]
pub struct SqlStoreConfig {
    url: String,
    schema: Option<String>,
    max_connections: u32,
    acquire_timeout: Duration,
    busy_timeout: Duration,
    poll_interval: Duration,
    page_size: u32,
    cache_capacity: usize,
    cache_ttl: Duration,
    cache_clock: Option<Clock>,
}

impl fmt::Debug for SqlStoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlStoreConfig")
            .field("url", &redact(&self.url))
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("busy_timeout", &self.busy_timeout)
            .field("poll_interval", &self.poll_interval)
            .field("page_size", &self.page_size)
            .field("state_cache", &self.cache_capacity)
            .field("state_cache_ttl", &self.cache_ttl)
            .finish_non_exhaustive()
    }
}

kes_sql::config_from_url!(SqlStoreConfig);

impl SqlStoreConfig {
    /// The default settings for the database at `url` (`sqlite:PATH`,
    /// `sqlite::memory:` or `postgres://…`). The URL is checked when the
    /// store opens.
    pub fn from_url(url: &str) -> Self {
        Self {
            url: url.trim().to_owned(),
            schema: None,
            max_connections: 10,
            acquire_timeout: Duration::from_secs(10),
            busy_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(50),
            page_size: 500,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            cache_ttl: DEFAULT_CACHE_TTL,
            cache_clock: None,
        }
    }

    /// PostgreSQL only: keep the tables in this schema (created when
    /// missing) instead of the server's default search path. Lets several
    /// stores, or tests running in parallel, share one database.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// Most connections the store opens (readers for SQLite; the writer is
    /// always one connection). Default 10.
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// How long an operation waits for a free connection before it fails as
    /// unavailable. Default 10 s.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// SQLite only: how long a statement waits on a lock held by another
    /// process before failing. Default 10 s.
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// How often a caught-up subscription looks for appends made by other
    /// processes (appends through this store wake it at once). Default 50 ms.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How many events a subscription reads per query. Default 500.
    pub fn page_size(mut self, size: u32) -> Self {
        self.page_size = size.max(1);
        self
    }

    /// How many aggregates the state cache holds (least recently used
    /// first out); 0 turns it off. Default 10 000.
    ///
    /// The cache keeps the latest version and state of each aggregate this
    /// store appended to or loaded, so that `load` answers without a query
    /// and an append need not decode the table row. Memory grows with
    /// capacity × the size of a state. Appends stay exact whatever the
    /// cache holds: the expected version is checked in the database, inside
    /// the append's transaction, and a cached state is used only when its
    /// version is the stream's current one.
    pub fn state_cache(mut self, capacity: usize) -> Self {
        self.cache_capacity = capacity;
        self
    }

    /// How long `load` answers from the state cache after the state was
    /// last known current (appended or read by this store). Default 1 s.
    ///
    /// Appends made by other processes sharing the database (or by another
    /// store opened on it) reach this store's `load` within this time: a
    /// longer time-to-live spares more queries, a shorter one shows foreign
    /// writes sooner, `Duration::ZERO` reads every `load` from the table.
    /// An append of this store that meets such a write answers `Conflict`
    /// and drops the entry, so the next `load` reads the table. Rows
    /// changed by hand behind the store's back are also seen only after
    /// this time.
    pub fn state_cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl = ttl;
        self
    }

    /// The clock the state cache measures its time-to-live with. Default:
    /// the monotonic clock ([`Instant::now`]). Tests pass a clock they move
    /// by hand, so that entries expire when the test says and not when the
    /// machine gets round to it.
    pub fn state_cache_clock(mut self, now: impl Fn() -> Instant + Send + Sync + 'static) -> Self {
        self.cache_clock = Some(Arc::new(now));
        self
    }

    /// Connects, applies the embedded migrations and returns the store.
    pub(crate) async fn open<A: Aggregate>(
        self,
        codec: Arc<dyn Codec<A::Event>>,
    ) -> Result<SqlStore<A>, SqlStoreError> {
        let (pools, dialect) = match Dialect::of_url(&self.url) {
            Some(Dialect::Sqlite) => (self.open_sqlite().await?, Dialect::Sqlite),
            Some(Dialect::Postgres) => (self.open_postgres().await?, Dialect::Postgres),
            None => {
                return Err(SqlStoreError::Url {
                    url: redact(&self.url),
                    reason: "expected sqlite:PATH or postgres://…".into(),
                });
            }
        };
        let store = SqlStore {
            inner: Arc::new(Inner {
                synced: AtomicU64::new(0),
                pools,
                dialect,
                codec,
                poll_interval: self.poll_interval,
                page_size: i64::from(self.page_size),
                appended: watch::channel(0).0,
                cache: match self.cache_clock {
                    Some(clock) => StateCache::with_clock(self.cache_capacity, self.cache_ttl, clock),
                    None => StateCache::new(self.cache_capacity, self.cache_ttl),
                },
                queue: Mutex::new(Queue { pending: VecDeque::new(), writing: false }),
                table_rebuilt_from: AtomicU32::new(0),
            }),
        };
        // The cache starts empty: it reflects every write so far.
        let head: Option<i64> = store
            .inner
            .pools
            .reader
            .fetch_scalar::<Option<i64>>(&Statement::new(sql::HEAD).text(A::NAME))
            .await
            .map_err(SqlStoreError::Database)?
            .flatten();
        store.inner.synced.store(head.map_or(0, |h| from_db(h) + 1), Ordering::SeqCst);
        if let Some(built_by) = store.check_state_version().await? {
            store.inner.table_rebuilt_from.store(built_by.max(1), Ordering::Relaxed);
        }
        Ok(store)
    }

    async fn open_sqlite(&self) -> Result<Pools, SqlStoreError> {
        // The log's durability: an append is acknowledged only once its
        // WAL frame is on disk, so it survives a power cut too.
        let target = kes_sql::sqlite_options(&self.url, kes_sql::Durability::Log).map_err(|e| match e {
            kes_sql::SqliteSetupError::Url(e) => SqlStoreError::Url { url: redact(&self.url), reason: e.to_string() },
            kes_sql::SqliteSetupError::Folder { path, source } => SqlStoreError::CreateDir { path, source },
        })?;
        let memory = target.in_memory;
        let options = target.options.busy_timeout(self.busy_timeout).statement_cache_capacity(STATEMENT_CACHE);
        // An in-memory database lives as long as one connection to it does,
        // and shared-cache connections lock each other out: one connection
        // serves everything there.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(u32::from(memory))
            .idle_timeout(if memory { None } else { Some(Duration::from_secs(600)) })
            .max_lifetime(if memory { None } else { Some(Duration::from_secs(1800)) })
            .acquire_timeout(self.acquire_timeout)
            .connect_with(options.clone())
            .await
            .map_err(SqlStoreError::Connect)?;
        sqlx::migrate!("./migrations/sqlite").run(&writer).await.map_err(SqlStoreError::Migrate)?;
        let reader = if memory {
            writer.clone()
        } else {
            SqlitePoolOptions::new()
                .max_connections(self.max_connections)
                .acquire_timeout(self.acquire_timeout)
                .connect_with(options)
                .await
                .map_err(SqlStoreError::Connect)?
        };
        Ok(Pools { writer: Pool::Sqlite(writer), reader: Pool::Sqlite(reader) })
    }

    async fn open_postgres(&self) -> Result<Pools, SqlStoreError> {
        let options = postgres_options(&self.url, self.schema.as_deref(), sql::PG_INDEX_PLANS)
            .await?
            .statement_cache_capacity(STATEMENT_CACHE);
        let pool = kes_sql::pg_pool_options()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
            .connect_with(options)
            .await
            .map_err(SqlStoreError::Connect)?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await.map_err(SqlStoreError::Migrate)?;
        Ok(Pools { writer: Pool::Postgres(pool.clone()), reader: Pool::Postgres(pool) })
    }
}

/// The connect options of the PostgreSQL database at `url`, with
/// `settings` as startup parameters: every connection of a pool made with
/// them, including ones opened after a reconnect, starts with them, and
/// none pays a round trip for them (options the URL gives are kept). With
/// a `schema`, the schema is created when missing and every connection
/// lands in it.
pub(crate) async fn postgres_options(
    url: &str,
    schema: Option<&str>,
    settings: &[(&str, &str)],
) -> Result<PgConnectOptions, SqlStoreError> {
    let options =
        PgConnectOptions::from_str(url).map_err(|e| SqlStoreError::Url { url: redact(url), reason: e.to_string() })?;
    let Some(schema) = schema else { return Ok(options.options(settings.iter().copied())) };
    check_schema_name(schema)?;
    let mut conn = options.connect().await.map_err(SqlStoreError::Connect)?;
    conn.execute(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"").as_str())
        .await
        .map_err(SqlStoreError::Database)?;
    conn.close().await.map_err(SqlStoreError::Connect)?;
    Ok(options.options(settings.iter().copied().chain([("search_path", schema)])))
}

/// Schema names are spliced into `CREATE SCHEMA` and the search path, so
/// only plain names ([`kes_core::is_plain_name`]) pass.
pub(crate) fn check_schema_name(schema: &str) -> Result<(), SqlStoreError> {
    if kes_core::is_plain_name(schema) {
        Ok(())
    } else {
        Err(SqlStoreError::SchemaName(schema.chars().take(80).collect()))
    }
}

/// Prepared statements kept per connection. A batch's statements differ by
/// its number of appends, events and aggregates; keeping the common sizes
/// prepared spares a round trip each.
const STATEMENT_CACHE: usize = 512;

/// Default capacity of the state cache.
const DEFAULT_CACHE_CAPACITY: usize = 10_000;

/// Default time-to-live of the state cache.
const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(check_schema_name("kes_test_1").is_ok());
        for bad in ["", "1abc", "a-b", "a\"; DROP SCHEMA public; --", &"x".repeat(64)] {
            assert!(check_schema_name(bad).is_err(), "{bad:?} passed");
        }
    }
}
