//! [`SqlStore`]: the event log and table of one aggregate type in SQLite or
//! PostgreSQL.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kes_core::codec::encode_all;
use kes_core::{
    Aggregate, Appended, Checkpoint, Codec, Envelope, EventStore, EventStream, ExpectedVersion, JsonCodec, Logged,
    Metadata, Position, Snapshot, StateDocument, StoreError, StoreGauge,
};
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqlitePool, SqlitePoolOptions};
use sqlx::types::Json;
use sqlx::{ConnectOptions, Connection, Executor};
use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use crate::batch::{Decider, EncodedRow, PrepareRow, Request};
use crate::cache::{Clock, StateCache};
use crate::error::{SqlStoreError, db, is_unique_violation, redact};
use crate::sql::{self, StoredEvent};

pub use kes_sql::Dialect;

/// The connections of a store. SQLite gets a writer pool of exactly one
/// connection (SQLite has one writer per file anyway; queueing in the pool
/// is cheaper than spinning on `SQLITE_BUSY`) and a pool of readers, which
/// WAL mode lets run beside the writer.
#[derive(Clone)]
enum Pools {
    Sqlite { writer: SqlitePool, reader: SqlitePool },
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to the pool that serves reads. The body
/// is written once and compiled for each dialect.
macro_rules! on_reader {
    ($pools:expr, |$pool:ident| $body:expr) => {
        match $pools {
            Pools::Sqlite { reader: $pool, .. } => $body,
            Pools::Postgres($pool) => $body,
        }
    };
}

/// Runs `$body` with `$pool` bound to the pool that serves writes.
macro_rules! on_writer {
    ($pools:expr, |$pool:ident| $body:expr) => {
        match $pools {
            Pools::Sqlite { writer: $pool, .. } => $body,
            Pools::Postgres($pool) => $body,
        }
    };
}

/// Runs `$body` inside a transaction `$tx` that holds the log of aggregate
/// type `$name` for writing: `BEGIN IMMEDIATE` on SQLite (the write lock is
/// taken at once, so a busy database waits in `busy_timeout` instead of
/// failing on a lock upgrade), an advisory transaction lock on PostgreSQL.
/// A failure to start it is [`Failure::Database`].
macro_rules! in_append_tx {
    ($pools:expr, $name:expr, |$tx:ident| $body:expr) => {
        match $pools {
            Pools::Sqlite { writer, .. } => match writer.begin_with("BEGIN IMMEDIATE").await {
                Ok(mut $tx) => $body,
                Err(e) => Err(Failure::Database(db(e))),
            },
            Pools::Postgres(pool) => match pool.begin_with(sql::pg_begin_append($name)).await {
                Ok(mut $tx) => $body,
                Err(e) => Err(Failure::Database(db(e))),
            },
        }
    };
}

/// Binds the columns of the event rows `$rows` (of `$requests`) to
/// `$query`, in the order of `sql::insert_events`.
macro_rules! bind_events {
    ($query:expr, $requests:expr, $rows:expr) => {{
        let mut query = $query;
        for row in $rows {
            let request = &$requests[row.request];
            let event = &request.encoded[row.index];
            query = query
                .bind(A::NAME)
                .bind(version_param(row.position))
                .bind(request.id.as_str())
                .bind(version_param(row.version))
                .bind(version_param(row.end))
                .bind(event.event_id)
                .bind(event.event_type)
                .bind(i64::from(event.revision))
                .bind(event.payload.as_str())
                .bind(Json(&request.metadata))
                .bind(request.recorded_at)
                .bind(if row.version == row.end { request.key.as_deref() } else { None });
        }
        query
    }};
}

/// Binds the columns of the table rows `$rows` to `$query`, in the order
/// of `sql::upsert_states`.
macro_rules! bind_states {
    ($query:expr, $rows:expr) => {{
        let mut query = $query;
        for row in $rows {
            query = query
                .bind(A::NAME)
                .bind(row.id)
                .bind(version_param(row.version))
                .bind(Json(row.state))
                .bind(row.updated_at);
        }
        query
    }};
}

/// Why the transaction of a batch wrote nothing, or may have.
enum Failure {
    /// An insert hit a unique key: a writer outside this store's locking
    /// got there first. Nothing was written.
    Raced,
    /// A statement before `COMMIT` failed. Nothing was written.
    Database(StoreError),
    /// `COMMIT` failed: whether the batch was written is unknown.
    Commit(StoreError),
}

fn failure(e: sqlx::Error) -> Failure {
    Failure::Database(db(e))
}

/// Most appends decided in one transaction, and most events written by one
/// (a batch holds at least one append, however large).
const MAX_BATCH_APPENDS: usize = 256;
const MAX_BATCH_EVENTS: usize = 4 * sql::EVENTS_PER_INSERT;

/// Most table rows written per statement.
const STATES_PER_UPSERT: usize = 1000;

/// An append waiting for its batch, and where its answer goes.
struct Queued<A: Aggregate> {
    request: Request<A>,
    reply: oneshot::Sender<Result<Appended, StoreError>>,
}

/// The appends waiting to be written, and whether a writer task is running
/// (at most one per store: it takes everything queued as one batch, writes
/// it, and looks again).
struct Queue<A: Aggregate> {
    pending: VecDeque<Queued<A>>,
    writing: bool,
}

/// Ends the writer's turn if its task stops early (a panic in aggregate
/// code, or the runtime shutting down): the batch in hand is answered as
/// unknown when its reply channels drop, and a new writer takes over what
/// is still queued.
struct WriterWatch<'a, A: Aggregate> {
    store: &'a SqlStore<A>,
    done: bool,
}

impl<A: Aggregate> Drop for WriterWatch<'_, A> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut queue = self.store.inner.queue();
        queue.writing = false;
        if queue.pending.is_empty() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            queue.writing = true;
            drop(queue);
            runtime.spawn(self.store.clone().write_queued());
        }
    }
}

/// Builds a [`SqlStore`]: URL, codec, PostgreSQL schema and pool settings.
pub struct SqlStoreBuilder<A: Aggregate> {
    url: String,
    codec: Arc<dyn Codec<A::Event>>,
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

impl<A: Aggregate> fmt::Debug for SqlStoreBuilder<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlStoreBuilder")
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

impl<A: Aggregate> SqlStoreBuilder<A> {
    fn new(url: &str) -> Self {
        Self {
            url: url.trim().to_owned(),
            codec: Arc::new(JsonCodec::default()),
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

    /// The payload codec (default: [`JsonCodec`] without upcasters). The
    /// SQL store keeps payloads as text, so the codec must produce UTF-8.
    pub fn codec(mut self, codec: Arc<dyn Codec<A::Event>>) -> Self {
        self.codec = codec;
        self
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
    pub async fn open(self) -> Result<SqlStore<A>, SqlStoreError> {
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
                codec: self.codec,
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
        let head: Option<i64> = on_reader!(&store.inner.pools, |pool| {
            sqlx::query_scalar(sql::HEAD).bind(A::NAME).fetch_one(pool).await.map_err(SqlStoreError::Database)?
        });
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
        Ok(Pools::Sqlite { writer, reader })
    }

    async fn open_postgres(&self) -> Result<Pools, SqlStoreError> {
        let mut options = PgConnectOptions::from_str(&self.url)
            .map_err(|e| SqlStoreError::Url { url: redact(&self.url), reason: e.to_string() })?
            .statement_cache_capacity(STATEMENT_CACHE);
        if let Some(schema) = &self.schema {
            check_schema_name(schema)?;
            let mut conn = options.connect().await.map_err(SqlStoreError::Connect)?;
            conn.execute(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"").as_str())
                .await
                .map_err(SqlStoreError::Database)?;
            conn.close().await.map_err(SqlStoreError::Connect)?;
            // A startup parameter: every connection of the pool, including
            // ones opened after a reconnect, lands in the schema.
            options = options.options([("search_path", schema.as_str())]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
            .connect_with(options)
            .await
            .map_err(SqlStoreError::Connect)?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await.map_err(SqlStoreError::Migrate)?;
        Ok(Pools::Postgres(pool))
    }
}

/// Schema names are spliced into `CREATE SCHEMA` and the search path, so
/// only plain names ([`kes_core::is_plain_name`]) pass.
fn check_schema_name(schema: &str) -> Result<(), SqlStoreError> {
    if kes_core::is_plain_name(schema) {
        Ok(())
    } else {
        Err(SqlStoreError::SchemaName(schema.chars().take(80).collect()))
    }
}

struct Inner<A: Aggregate> {
    pools: Pools,
    dialect: Dialect,
    codec: Arc<dyn Codec<A::Event>>,
    poll_interval: Duration,
    page_size: i64,
    /// Bumped after every commit through this store, so that subscribers in
    /// this process need not wait for their next poll.
    appended: watch::Sender<u64>,
    cache: StateCache<A>,
    /// Every write at a position below this one is reflected in `cache`
    /// (its aggregate's entry is current or gone); writes of other
    /// processes above it may not be (see `wait_for_position`).
    synced: AtomicU64,
    queue: Mutex<Queue<A>>,
    /// The state version the table was built by when this store rebuilt it
    /// at open (0: it did not).
    table_rebuilt_from: AtomicU32,
}

impl<A: Aggregate> Inner<A> {
    fn queue(&self) -> MutexGuard<'_, Queue<A>> {
        // Nothing panics while the queue is locked.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
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

/// The event log and table of aggregate type `A` in SQLite or PostgreSQL.
///
/// Cheap to clone: clones share the connection pools. See the crate docs
/// for the layout and guarantees.
pub struct SqlStore<A: Aggregate> {
    inner: Arc<Inner<A>>,
}

impl<A: Aggregate> Clone for SqlStore<A> {
    fn clone(&self) -> Self {
        Self { inner: Arc::clone(&self.inner) }
    }
}

impl<A: Aggregate> fmt::Debug for SqlStore<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlStore").field("aggregate", &A::NAME).field("dialect", &self.inner.dialect).finish()
    }
}

impl<A: Aggregate> SqlStore<A> {
    /// Opens the store at `url` (`sqlite:PATH`, `sqlite::memory:` or
    /// `postgres://…`) with the default settings, applying the migrations.
    /// The folder of a SQLite file is created when missing.
    pub async fn open(url: &str) -> Result<Self, SqlStoreError> {
        Self::builder(url).open().await
    }

    /// Opens the store at `url` with payloads written and read by `codec`.
    pub async fn open_with_codec(url: &str, codec: Arc<dyn Codec<A::Event>>) -> Result<Self, SqlStoreError> {
        Self::builder(url).codec(codec).open().await
    }

    /// A builder for every other setting.
    pub fn builder(url: &str) -> SqlStoreBuilder<A> {
        SqlStoreBuilder::new(url)
    }

    /// The database this store runs on.
    pub fn dialect(&self) -> Dialect {
        self.inner.dialect
    }

    /// Closes the connection pools; later operations fail as unavailable.
    pub async fn close(&self) {
        match &self.inner.pools {
            Pools::Sqlite { writer, reader } => {
                reader.close().await;
                writer.close().await;
            }
            Pools::Postgres(pool) => pool.close().await,
        }
    }

    fn decode(&self, stored: StoredEvent) -> Result<Envelope<A::Event>, StoreError> {
        stored.raw.decode(&*self.inner.codec)
    }

    /// The stream `id` as stored, oldest first.
    async fn read_stored(&self, id: &str) -> Result<Vec<StoredEvent>, StoreError> {
        let query = sql::read_stream();
        on_reader!(&self.inner.pools, |pool| {
            let rows = sqlx::query(&query).bind(A::NAME).bind(id).fetch_all(pool).await.map_err(db)?;
            rows.iter().map(|r| sql::envelope_from_row(r, A::NAME)).collect()
        })
    }

    fn replay(&self, events: Vec<StoredEvent>) -> Result<(A, u64), StoreError> {
        let mut state = A::default();
        let mut version = 0;
        for stored in events {
            let envelope = self.decode(stored)?;
            state.apply(&envelope.payload);
            version = envelope.version;
        }
        Ok((state, version))
    }

    /// The table's JSON of a state.
    fn state_json(&self, id: &str, state: &A) -> Result<Value, StoreError> {
        serde_json::to_value(state)
            .map_err(|e| StoreError::Backend(format!("{} {id}: state not serialisable: {e}", A::NAME)))
    }

    /// Reads up to one page of the log from position `next`, cut at command
    /// boundaries. A failure comes after the appends that preceded it.
    async fn page(&self, next: u64) -> Page<A::Event> {
        let from = i64::try_from(next).unwrap_or(i64::MAX);
        let query = sql::read_log();
        let rows = on_reader!(&self.inner.pools, |pool| {
            sqlx::query(&query).bind(A::NAME).bind(from).bind(self.inner.page_size).fetch_all(pool).await.map(|rows| {
                rows.iter()
                    .map(|r| sql::envelope_from_row(r, A::NAME))
                    .collect::<Vec<Result<StoredEvent, StoreError>>>()
            })
        });
        let mut page = Page { appends: Vec::new(), next, failure: None };
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                page.failure = Some(db(e));
                return page;
            }
        };
        let mut groups: Vec<Vec<StoredEvent>> = Vec::new();
        for row in rows {
            let event = match row {
                Ok(event) => event,
                Err(e) => {
                    page.failure = Some(e);
                    break;
                }
            };
            match groups.last_mut() {
                Some(group) if continues(group, &event) => group.push(event),
                _ => groups.push(vec![event]),
            }
        }
        if groups.last().is_some_and(|g| !complete(g)) {
            if groups.len() > 1 || page.failure.is_some() {
                // The page (or the readable part of it) ended inside a
                // command: leave that command for the next read.
                groups.pop();
            } else if let Some(group) = groups.last_mut() {
                // One command larger than a page: fetch the rest of it.
                match self.command_rest(group).await {
                    Ok(rest) => group.extend(rest),
                    Err(e) => {
                        page.failure = Some(e);
                        groups.pop();
                    }
                }
            }
        }
        for mut group in groups {
            if let Some(last) = group.last().filter(|_| !complete(&group)) {
                page.failure = Some(StoreError::Corrupt {
                    aggregate: A::NAME.to_owned(),
                    id: last.raw.aggregate_id.clone(),
                    version: last.raw.version,
                    reason: format!("the command ending at version {} is incomplete in the log", last.command_end),
                });
                break;
            }
            group.sort_by_key(|e| e.raw.version);
            let after = group.iter().map(|e| e.raw.position.offset + 1).max().unwrap_or(page.next);
            match group.into_iter().map(|e| self.decode(e)).collect::<Result<Vec<_>, _>>() {
                Ok(append) => {
                    page.appends.push(append);
                    page.next = page.next.max(after);
                }
                Err(e) => {
                    page.failure = Some(e);
                    break;
                }
            }
        }
        page
    }

    async fn command_rest(&self, group: &[StoredEvent]) -> Result<Vec<StoredEvent>, StoreError> {
        let Some(last) = group.last() else { return Ok(Vec::new()) };
        let query = sql::read_command_rest();
        let (id, after, end) =
            (&last.raw.aggregate_id, version_param(last.raw.version), version_param(last.command_end));
        on_reader!(&self.inner.pools, |pool| {
            let rows =
                sqlx::query(&query).bind(A::NAME).bind(id).bind(after).bind(end).fetch_all(pool).await.map_err(db)?;
            rows.iter().map(|r| sql::envelope_from_row(r, A::NAME)).collect()
        })
    }

    async fn stream_version(&self, id: &str) -> Result<u64, StoreError> {
        let version: i64 = on_reader!(&self.inner.pools, |pool| {
            sqlx::query_scalar(sql::STREAM_VERSION).bind(A::NAME).bind(id).fetch_one(pool).await.map_err(db)?
        });
        Ok(u64::try_from(version).unwrap_or(0))
    }

    /// The writer: takes everything queued as one batch, writes it, and
    /// looks again, until the queue is empty. Appends that arrive while a
    /// batch is in its transaction wait for the next one; a lone append
    /// starts a writer at once and waits for no timer.
    async fn write_queued(self) {
        let mut watch = WriterWatch { store: &self, done: false };
        while let Some(batch) = self.next_batch() {
            self.write_batch(batch).await;
        }
        watch.done = true;
    }

    /// The next batch: queued appends in arrival order, up to the limits.
    /// `None` (and the writer ends) when nothing is queued.
    fn next_batch(&self) -> Option<Vec<Queued<A>>> {
        let mut queue = self.inner.queue();
        let mut batch = Vec::new();
        let mut events = 0;
        while let Some(next) = queue.pending.front() {
            let size = next.request.events.len();
            if !batch.is_empty() && (batch.len() >= MAX_BATCH_APPENDS || events + size > MAX_BATCH_EVENTS) {
                break;
            }
            events += size;
            batch.extend(queue.pending.pop_front());
        }
        if batch.is_empty() {
            queue.writing = false;
            return None;
        }
        Some(batch)
    }

    /// Writes one batch in one transaction and answers each append. When
    /// the transaction fails before its commit, no append of it was
    /// written, and each is tried again on its own, so that one bad append
    /// (or one that raced a foreign writer) fails alone.
    async fn write_batch(&self, batch: Vec<Queued<A>>) {
        let (requests, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|q| (q.request, q.reply)).unzip();
        if requests.len() > 1 {
            match self.commit(&requests).await {
                Ok(outcomes) => {
                    for (reply, outcome) in replies.into_iter().zip(outcomes) {
                        let _ = reply.send(outcome);
                    }
                    return;
                }
                Err(Failure::Commit(e)) => {
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                    return;
                }
                Err(Failure::Raced) => {
                    tracing::debug!(aggregate = A::NAME, appends = requests.len(), "batch raced; appending one by one");
                }
                Err(Failure::Database(e)) => {
                    tracing::debug!(aggregate = A::NAME, appends = requests.len(), error = %e,
                        "batch failed; appending one by one");
                }
            }
        }
        let mut down: Option<StoreError> = None;
        for (request, reply) in requests.iter().zip(replies) {
            let outcome = match &down {
                // The database failed this append alone too: the rest of the
                // batch would only wait for the same failure.
                Some(e) => Err(e.clone()),
                None => {
                    let (outcome, database_down) = self.append_alone(request).await;
                    if database_down {
                        down = outcome.clone().err();
                    }
                    outcome
                }
            };
            let _ = reply.send(outcome);
        }
    }

    /// One append in a transaction of its own, with the answer to a race
    /// against a foreign writer; `true` when the database failed it
    /// transiently.
    async fn append_alone(&self, request: &Request<A>) -> (Result<Appended, StoreError>, bool) {
        match self.commit(std::slice::from_ref(request)).await {
            Ok(outcomes) => {
                let outcome = outcomes.into_iter().next().unwrap_or_else(|| {
                    Err(StoreError::Backend(format!("{} {}: the append was not decided", A::NAME, request.id)))
                });
                (outcome, false)
            }
            Err(Failure::Raced) => {
                self.inner.cache.evict(&request.id);
                (self.after_race(request).await, false)
            }
            Err(Failure::Database(e) | Failure::Commit(e)) => {
                let down = e.is_transient();
                (Err(e), down)
            }
        }
    }

    /// The answer to an append whose insert hit a unique key. The
    /// transaction was rolled back when it was dropped. Only a writer
    /// outside this store's locking gets here (e.g. an older version of
    /// it); answer as if we had waited for it.
    async fn after_race(&self, request: &Request<A>) -> Result<Appended, StoreError> {
        let id = request.id.as_str();
        if let Some(key) = &request.key
            && let Some(first) = self.recall(id, key).await?
        {
            return Ok(first);
        }
        let actual = self.stream_version(id).await?;
        if request.expected.admits(actual) {
            // The stream was fine; the race was for the log position.
            // Trying again will find the next one.
            return Err(StoreError::Unavailable(format!(
                "{} {id}: a concurrent append took the same log position; retry",
                A::NAME
            )));
        }
        Err(StoreError::Conflict {
            aggregate: A::NAME.to_owned(),
            id: id.to_owned(),
            expected: request.expected,
            actual,
        })
    }

    /// Decides and writes `requests` in one transaction: one query reads
    /// what they need, one insert per thousand events writes the log, one
    /// upsert the table rows (on PostgreSQL both in one statement), then
    /// `COMMIT`. Returns each request's answer.
    async fn commit(&self, requests: &[Request<A>]) -> Result<Vec<Result<Appended, StoreError>>, Failure> {
        let prepare = sql::append_prepare(requests.len());
        let cache = &self.inner.cache;
        let (outcomes, settled, known_at) = in_append_tx!(&self.inner.pools, A::NAME, |tx| {
            let mut query = sqlx::query_as::<_, PrepareRow>(&prepare).bind(A::NAME);
            for request in requests {
                query = query.bind(request.id.as_str()).bind(request.key.as_deref());
            }
            let rows = query.fetch_all(&mut *tx).await.map_err(failure)?;
            let mut decider = Decider::new(requests, rows).map_err(Failure::Database)?;
            while let Some(id) = decider.run(cache) {
                let statement = sql::read_stream();
                let rows = sqlx::query(&statement).bind(A::NAME).bind(id).fetch_all(&mut *tx).await.map_err(failure)?;
                let state = rows
                    .iter()
                    .map(|r| sql::envelope_from_row(r, A::NAME))
                    .collect::<Result<Vec<_>, _>>()
                    .and_then(|stored| self.replay(stored))
                    .map(|(state, _)| state);
                decider.replayed(id, state);
            }
            if decider.event_rows().is_empty() {
                // Conflicts and retries only: nothing to write.
                let _ = tx.rollback().await;
                let (outcomes, settled) = decider.finish();
                Ok((outcomes, settled, cache.now()))
            } else {
                let events = decider.event_rows();
                let states = decider.state_rows();
                // PostgreSQL writes both in one statement when they fit in
                // one; SQLite has no INSERT inside WITH.
                let together = self.inner.dialect == Dialect::Postgres
                    && events.len() <= sql::EVENTS_PER_INSERT
                    && states.len() <= STATES_PER_UPSERT;
                if together {
                    let statement = sql::insert_events_and_states(events.len(), states.len());
                    let query = bind_states!(bind_events!(sqlx::query(&statement), requests, events), &states);
                    match query.execute(&mut *tx).await {
                        Ok(_) => {}
                        Err(e) if is_unique_violation(&e) => return Err(Failure::Raced),
                        Err(e) => return Err(failure(e)),
                    }
                } else {
                    for chunk in events.chunks(sql::EVENTS_PER_INSERT) {
                        let statement = sql::insert_events(chunk.len());
                        match bind_events!(sqlx::query(&statement), requests, chunk).execute(&mut *tx).await {
                            Ok(_) => {}
                            Err(e) if is_unique_violation(&e) => return Err(Failure::Raced),
                            Err(e) => return Err(failure(e)),
                        }
                    }
                    for chunk in states.chunks(STATES_PER_UPSERT) {
                        let statement = sql::upsert_states(chunk.len());
                        bind_states!(sqlx::query(&statement), chunk).execute(&mut *tx).await.map_err(failure)?;
                    }
                }
                drop(states);
                // The states are current until the lock is released, which
                // the commit does: an entry may be trusted from here on.
                let known_at = cache.now();
                tx.commit().await.map_err(|e| Failure::Commit(db(e)))?;
                let (outcomes, settled) = decider.finish();
                Ok((outcomes, settled, known_at))
            }
        })?;
        let mut wrote = false;
        for settled in settled {
            if settled.conflicted {
                cache.evict(settled.id);
            }
            if let Some((version, state)) = settled.appended {
                cache.put(settled.id, version, state, known_at);
                wrote = true;
            }
        }
        if wrote {
            self.inner.appended.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(outcomes)
    }

    /// Writes a table row rebuilt by replay. Best effort: the answer of
    /// `load` is right either way, only the next `load` is slower.
    async fn repair_state(&self, id: &str, state: &A, version: u64) {
        let Ok(json) = self.state_json(id, state) else { return };
        let now = now();
        let result = on_writer!(&self.inner.pools, |pool| {
            sqlx::query(sql::REPAIR_STATE)
                .bind(A::NAME)
                .bind(id)
                .bind(version_param(version))
                .bind(Json(&json))
                .bind(now)
                .execute(pool)
                .await
                .map(drop)
        });
        if let Err(e) = result {
            tracing::warn!(aggregate = A::NAME, id, error = %e, "could not write the rebuilt table row");
        }
    }

    /// At open: when the table rows of this aggregate type were built by
    /// another [`Aggregate::STATE_VERSION`], drops them and records ours in
    /// one transaction holding the log for writing (no append of this
    /// store's kind can slip a row of the old meaning in between), then
    /// rebuilds them from the log. Returns the version they were built by
    /// when it rebuilt them.
    ///
    /// Correctness rests on the drop: a missing row is rebuilt from the log
    /// by `load` and by an append anyway. The rebuild that follows only
    /// spares those first reads; if it fails (a corrupt event, an outage)
    /// it is logged and the rows it did not write are rebuilt one by one
    /// when used.
    async fn check_state_version(&self) -> Result<Option<u32>, SqlStoreError> {
        let ours = i64::from(A::STATE_VERSION);
        let outdated = in_append_tx!(&self.inner.pools, A::NAME, |tx| {
            async {
                let recorded: Option<i64> =
                    sqlx::query_scalar(sql::RECORDED_STATE_VERSION).bind(A::NAME).fetch_optional(&mut *tx).await?;
                let any: Option<i64> =
                    sqlx::query_scalar(sql::ANY_STATE).bind(A::NAME).fetch_optional(&mut *tx).await?;
                // Rows written before versions were recorded: version 1.
                let built_by = recorded.unwrap_or(1);
                let outdated = (any.is_some() && built_by != ours).then_some(built_by);
                if outdated.is_some() {
                    sqlx::query(sql::DROP_STATES).bind(A::NAME).execute(&mut *tx).await?;
                }
                if recorded != Some(ours) {
                    sqlx::query(sql::RECORD_STATE_VERSION).bind(A::NAME).bind(ours).execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok(outdated)
            }
            .await
            .map_err(failure)
        });
        let outdated = match outdated {
            Ok(outdated) => outdated,
            Err(Failure::Database(e) | Failure::Commit(e)) => return Err(SqlStoreError::StateVersion(e)),
            Err(Failure::Raced) => unreachable!("no insert of events"),
        };
        let Some(built_by) = outdated else { return Ok(None) };
        let built_by = u32::try_from(built_by).unwrap_or(u32::MAX);
        let started = Instant::now();
        match self.rebuild_table().await {
            Ok(rows) => tracing::info!(
                aggregate = A::NAME,
                from = built_by,
                to = A::STATE_VERSION,
                rows,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "the table of latest states was built by another state version: rebuilt from the log"
            ),
            Err(e) => tracing::warn!(
                aggregate = A::NAME,
                from = built_by,
                to = A::STATE_VERSION,
                error = %e,
                "the table of latest states was built by another state version and was dropped; rebuilding it \
                 failed, so each row is rebuilt from the log when it is next used"
            ),
        }
        Ok(Some(built_by))
    }

    /// Folds the whole log of this aggregate type and writes every row,
    /// keeping rows that appends moved on meanwhile. Returns the number of
    /// rows.
    async fn rebuild_table(&self) -> Result<usize, StoreError> {
        let mut states: HashMap<String, (A, u64)> = HashMap::new();
        let mut next = 0;
        loop {
            let page = self.page(next).await;
            let done = page.appends.is_empty();
            for envelope in page.appends.into_iter().flatten() {
                let (state, version) = states.entry(envelope.aggregate_id).or_default();
                state.apply(&envelope.payload);
                *version = envelope.version;
            }
            if let Some(e) = page.failure {
                return Err(e);
            }
            if done {
                break;
            }
            next = page.next;
        }
        let rows: Vec<(String, u64, Value)> = states
            .into_iter()
            .map(|(id, (state, version))| {
                let json = self.state_json(&id, &state)?;
                Ok((id, version, json))
            })
            .collect::<Result<_, StoreError>>()?;
        let now = now();
        for chunk in rows.chunks(STATES_PER_UPSERT) {
            let query = sql::repair_states(chunk.len());
            on_writer!(&self.inner.pools, |pool| {
                let mut q = sqlx::query(&query);
                for (id, version, json) in chunk {
                    q = q.bind(A::NAME).bind(id.as_str()).bind(version_param(*version)).bind(Json(json)).bind(now);
                }
                q.execute(pool).await.map_err(db)?;
            });
        }
        Ok(rows.len())
    }
}

/// Whether `event` belongs to the same command as the open `group`.
fn continues(group: &[StoredEvent], event: &StoredEvent) -> bool {
    group.last().is_some_and(|last| {
        !last.ends_command()
            && last.raw.aggregate_id == event.raw.aggregate_id
            && last.command_end == event.command_end
            && last.raw.version + 1 == event.raw.version
    })
}

/// Whether the group ends with the last event of its command.
fn complete(group: &[StoredEvent]) -> bool {
    group.last().is_some_and(StoredEvent::ends_command)
}

fn version_param(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn from_db(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Now, at the microsecond precision both databases keep, so that what is
/// stored reads back equal.
fn now() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

#[async_trait]
impl<A: Aggregate> EventStore<A> for SqlStore<A> {
    async fn append(
        &self,
        id: &str,
        expected: ExpectedVersion,
        events: Vec<A::Event>,
        metadata: Metadata,
    ) -> Result<Appended, StoreError> {
        let encoded = encode_all(&*self.inner.codec, &events)?
            .into_iter()
            .map(|e| {
                let payload = String::from_utf8(e.payload).map_err(|_| {
                    StoreError::Invalid(format!("the SQL store keeps text payloads; {} is not UTF-8", e.event_type))
                })?;
                Ok(EncodedRow { event_id: Uuid::now_v7(), event_type: e.event_type, revision: e.revision, payload })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let metadata_json =
            serde_json::to_value(&metadata).map_err(|e| StoreError::Invalid(format!("metadata: {e}")))?;
        let request = Request {
            id: id.to_owned(),
            expected,
            events,
            encoded,
            metadata: metadata_json,
            key: metadata.idempotency_key,
            recorded_at: now(),
        };
        let (reply, answer) = oneshot::channel();
        let start_writer = {
            let mut queue = self.inner.queue();
            queue.pending.push_back(Queued { request, reply });
            !std::mem::replace(&mut queue.writing, true)
        };
        if start_writer {
            tokio::spawn(self.clone().write_queued());
        }
        answer.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "{} {id}: the store's writer stopped before answering; whether the append was written is unknown",
                A::NAME
            )))
        })
    }

    async fn recall(&self, id: &str, idempotency_key: &str) -> Result<Option<Appended>, StoreError> {
        let found: Option<(i64, i64)> = on_reader!(&self.inner.pools, |pool| {
            sqlx::query_as(sql::RECALL)
                .bind(A::NAME)
                .bind(id)
                .bind(idempotency_key)
                .fetch_optional(pool)
                .await
                .map_err(db)?
        });
        Ok(found.map(|(version, position)| Appended {
            version: from_db(version),
            position: Position::new(0, from_db(position)),
            deduplicated: true,
        }))
    }

    async fn load_document(&self, id: &str) -> Result<Option<StateDocument>, StoreError> {
        let encode = |state: &A| {
            serde_json::to_vec(state)
                .map_err(|e| StoreError::Backend(format!("{} {id}: the state does not serialise: {e}", A::NAME)))
        };
        // A fresh cached state keeps its document, made once for all reads
        // of this version.
        if let Some((version, cached)) = self.inner.cache.fresh_shared(id) {
            let json = match cached.json.get() {
                Some(json) => json.clone(),
                None => {
                    let json = encode(&cached.state)?;
                    let _ = cached.json.set(json.clone());
                    json
                }
            };
            return Ok(Some(StateDocument { json, version, deleted: cached.state.is_deleted() }));
        }
        let Some(snapshot) = self.load(id).await? else { return Ok(None) };
        let json = encode(&snapshot.state)?;
        Ok(Some(StateDocument { json, version: snapshot.version, deleted: snapshot.state.is_deleted() }))
    }

    /// The table's row, never the state cache's: another process may have
    /// appended within the cache's time-to-live.
    async fn load_current(&self, id: &str) -> Result<Option<Snapshot<A>>, StoreError> {
        self.inner.cache.evict(id);
        self.load(id).await
    }

    async fn load(&self, id: &str) -> Result<Option<Snapshot<A>>, StoreError> {
        let cache = &self.inner.cache;
        if let Some((version, state)) = cache.fresh(id) {
            return Ok(Some(Snapshot { state, version }));
        }
        // What is read below was current at least from here on.
        let known_at = cache.now();
        let row: Option<(i64, String)> = on_reader!(&self.inner.pools, |pool| {
            sqlx::query_as(sql::LOAD_STATE).bind(A::NAME).bind(id).fetch_optional(pool).await.map_err(db)?
        });
        if let Some((version, json)) = row {
            match serde_json::from_str::<A>(&json) {
                Ok(state) => {
                    let version = from_db(version);
                    if cache.enabled() {
                        cache.put(id, version, state.clone(), known_at);
                    }
                    return Ok(Some(Snapshot { state, version }));
                }
                Err(e) => {
                    tracing::info!(aggregate = A::NAME, id, error = %e, "table row no longer decodes; replaying");
                }
            }
        }
        // No row (the table was dropped or never written) or one of an older
        // shape: the log decides, and the row is written back.
        let stored = self.read_stored(id).await?;
        if stored.is_empty() {
            return Ok(None);
        }
        let (state, version) = self.replay(stored)?;
        self.repair_state(id, &state, version).await;
        if cache.enabled() {
            cache.put(id, version, state.clone(), known_at);
        }
        Ok(Some(Snapshot { state, version }))
    }

    async fn read(&self, id: &str) -> Result<Vec<Envelope<A::Event>>, StoreError> {
        self.read_stored(id).await?.into_iter().map(|e| self.decode(e)).collect()
    }

    async fn read_page(&self, id: &str, after: u64, limit: usize) -> Result<Vec<Envelope<A::Event>>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let query = sql::read_stream_page();
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let stored: Vec<StoredEvent> = on_reader!(&self.inner.pools, |pool| {
            let rows =
                sqlx::query(&query).bind(A::NAME).bind(id).bind(after).bind(limit).fetch_all(pool).await.map_err(db)?;
            rows.iter().map(|r| sql::envelope_from_row(r, A::NAME)).collect::<Result<Vec<_>, _>>()?
        });
        stored.into_iter().map(|e| self.decode(e)).collect()
    }

    async fn subscribe(&self, from: Checkpoint) -> Result<EventStream<A::Event>, StoreError> {
        let tail = Tail {
            store: self.clone(),
            next: from.next_offset(0),
            ready: VecDeque::new(),
            failure: None,
            wake: self.inner.appended.subscribe(),
            backoff: false,
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(tail, Tail::next_item)))
    }

    /// The table is the log, but the state cache may hold an aggregate as
    /// it was before another process wrote it: the entries behind what the
    /// log holds up to `position` are dropped (one query over the stretch
    /// written since the last such sweep), so the next `load` reads them.
    async fn wait_for_position(&self, position: Position, timeout: Duration) -> Result<bool, StoreError> {
        let _ = timeout;
        let cache = &self.inner.cache;
        let from = self.inner.synced.load(Ordering::SeqCst);
        if !cache.enabled() || position.partition != 0 || position.offset < from {
            return Ok(true);
        }
        let read_at = cache.now();
        let rows: Vec<(String, i64, i64)> = on_reader!(&self.inner.pools, |pool| {
            sqlx::query_as(sql::WRITTEN_BETWEEN)
                .bind(A::NAME)
                .bind(version_param(from))
                .bind(version_param(position.offset))
                .fetch_all(pool)
                .await
                .map_err(db)?
        });
        // Positions are visible gap-free, in commit order: everything up
        // to the last one found is swept. A token past the log's end (from
        // another log, or made up) moves the mark no further than that.
        let last = rows.iter().map(|(_, _, p)| from_db(*p)).max();
        let latest: Vec<(String, u64)> = rows.into_iter().map(|(id, v, _)| (id, from_db(v))).collect();
        cache.sweep(&latest, read_at);
        if let Some(last) = last {
            self.inner.synced.fetch_max(last + 1, Ordering::SeqCst);
        }
        Ok(true)
    }

    async fn head(&self) -> Result<Checkpoint, StoreError> {
        let last: Option<i64> = on_reader!(&self.inner.pools, |pool| {
            sqlx::query_scalar(sql::HEAD).bind(A::NAME).fetch_one(pool).await.map_err(db)?
        });
        let mut head = Checkpoint::start();
        if let Some(last) = last {
            head.set_next(0, from_db(last) + 1);
        }
        Ok(head)
    }

    fn gauges(&self) -> Vec<StoreGauge> {
        StoreGauge::state_version::<A>(self.inner.table_rebuilt_from.load(Ordering::Relaxed))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        on_reader!(&self.inner.pools, |pool| { sqlx::query("SELECT 1").execute(pool).await.map(drop).map_err(db) })
    }
}

/// What one read of the log found.
struct Page<E> {
    /// Whole appends, in log order.
    appends: Vec<Vec<Envelope<E>>>,
    /// The position after the last of them.
    next: u64,
    /// What stopped the read before the end of the page, if anything.
    failure: Option<StoreError>,
}

/// The state of one subscription.
struct Tail<A: Aggregate> {
    store: SqlStore<A>,
    /// The position of the next event to deliver.
    next: u64,
    /// Appends read but not delivered yet.
    ready: VecDeque<Vec<Envelope<A::Event>>>,
    /// A failure to deliver once `ready` is empty.
    failure: Option<StoreError>,
    wake: watch::Receiver<u64>,
    /// The last read failed transiently: wait before the next one.
    backoff: bool,
    /// A permanent failure was delivered; the stream ends.
    done: bool,
}

impl<A: Aggregate> Tail<A> {
    async fn next_item(mut self) -> Option<(Result<Logged<A::Event>, StoreError>, Self)> {
        loop {
            if let Some(record) = self.ready.pop_front().and_then(Logged::of) {
                return Some((Ok(record), self));
            }
            if let Some(e) = self.failure.take() {
                // A transient failure is reported and retried; anything
                // else (a corrupt event) ends the stream, since skipping an
                // event would silently lose it.
                self.backoff = e.is_transient();
                self.done = !self.backoff;
                return Some((Err(e), self));
            }
            if self.done {
                return None;
            }
            if std::mem::take(&mut self.backoff) {
                tokio::time::sleep(self.store.inner.poll_interval.max(Duration::from_millis(200))).await;
            }
            // Marks the current append count as seen *before* reading, so
            // that an append committed after the read wakes the wait below.
            self.wake.borrow_and_update();
            let page = self.store.page(self.next).await;
            let found = !page.appends.is_empty() || page.failure.is_some();
            self.ready.extend(page.appends);
            self.next = page.next;
            self.failure = page.failure;
            if !found {
                let poll = self.store.inner.poll_interval;
                tokio::select! {
                    _ = self.wake.changed() => {}
                    _ = tokio::time::sleep(poll) => {}
                }
            }
        }
    }
}

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
