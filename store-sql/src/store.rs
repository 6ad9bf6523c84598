//! [`SqlStore`]: the event log and table of one aggregate type in SQLite or
//! PostgreSQL.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kes_core::encode_all;
use kes_core::{
    Aggregate, Appended, Checkpoint, Codec, Envelope, EventStore, EventStream, ExpectedVersion, JsonCodec, Metadata,
    Position, Snapshot, StateDocument, StoreError, StoreGauge,
};
use kes_sql::{DbRow, Pool, Statement};
use serde_json::Value;
use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use crate::batch::{EncodedRow, Request};
use crate::cache::StateCache;
use crate::config::SqlStoreConfig;
use crate::error::{SqlStoreError, db};
use crate::sql::{self, StoredEvent};
use crate::tail::Tail;
use crate::writer::{Queue, Queued};

pub use kes_sql::Dialect;

/// The connections of a store. SQLite gets a writer pool of exactly one
/// connection (SQLite has one writer per file anyway; queueing in the pool
/// is cheaper than spinning on `SQLITE_BUSY`) and a pool of readers, which
/// WAL mode lets run beside the writer. PostgreSQL has one pool for both.
#[derive(Clone)]
pub(crate) struct Pools {
    pub(crate) writer: Pool,
    pub(crate) reader: Pool,
}

pub(crate) struct Inner<A: Aggregate> {
    pub(crate) pools: Pools,
    pub(crate) dialect: Dialect,
    pub(crate) codec: Arc<dyn Codec<A::Event>>,
    pub(crate) poll_interval: Duration,
    pub(crate) page_size: i64,
    /// Bumped after every commit through this store, so that subscribers in
    /// this process need not wait for their next poll.
    pub(crate) appended: watch::Sender<u64>,
    pub(crate) cache: StateCache<A>,
    /// Every write at a position below this one is reflected in `cache`
    /// (its aggregate's entry is current or gone); writes of other
    /// processes above it may not be (see `wait_for_position`).
    pub(crate) synced: AtomicU64,
    pub(crate) queue: Mutex<Queue<A>>,
    /// The state version the table was built by when this store rebuilt it
    /// at open (0: it did not).
    pub(crate) table_rebuilt_from: AtomicU32,
}

impl<A: Aggregate> Inner<A> {
    pub(crate) fn queue(&self) -> MutexGuard<'_, Queue<A>> {
        // Nothing panics while the queue is locked.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The event log and table of aggregate type `A` in SQLite or PostgreSQL.
///
/// Cheap to clone: clones share the connection pools. See the crate docs
/// for the layout and guarantees.
pub struct SqlStore<A: Aggregate> {
    pub(crate) inner: Arc<Inner<A>>,
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
    /// Opens the store `config` describes (or the one at a URL:
    /// `sqlite:PATH`, `sqlite::memory:` or `postgres://…`), applying the
    /// migrations, with payloads in JSON ([`JsonCodec`] with the events'
    /// upcasters). The folder of a SQLite file is created when missing.
    pub async fn open(config: impl Into<SqlStoreConfig>) -> Result<Self, SqlStoreError> {
        Self::open_with_codec(config, JsonCodec::default()).await
    }

    /// [`SqlStore::open`] with payloads written and read by `codec`. The
    /// SQL store keeps payloads as text, so the codec must produce UTF-8.
    pub async fn open_with_codec(
        config: impl Into<SqlStoreConfig>,
        codec: impl Codec<A::Event>,
    ) -> Result<Self, SqlStoreError> {
        config.into().open(Arc::new(codec)).await
    }

    /// The database this store runs on.
    pub fn dialect(&self) -> Dialect {
        self.inner.dialect
    }

    /// Closes the connection pools; later operations fail as unavailable.
    pub async fn close(&self) {
        self.inner.pools.reader.close().await;
        self.inner.pools.writer.close().await;
    }

    pub(crate) fn decode(&self, stored: StoredEvent) -> Result<Envelope<A::Event>, StoreError> {
        stored.raw.decode(&*self.inner.codec)
    }

    /// The stream `id` as stored, oldest first.
    pub(crate) async fn read_stored(&self, id: &str) -> Result<Vec<StoredEvent>, StoreError> {
        let statement = Statement::new(sql::read_stream()).text(A::NAME).text(id);
        let rows = self.inner.pools.reader.fetch_all(&statement).await.map_err(db)?;
        rows.iter().map(|r| sql::envelope_from_row(r, A::NAME)).collect()
    }

    pub(crate) fn replay(&self, events: Vec<StoredEvent>) -> Result<(A, u64), StoreError> {
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
    pub(crate) fn state_json(&self, id: &str, state: &A) -> Result<Value, StoreError> {
        serde_json::to_value(state)
            .map_err(|e| StoreError::Backend(format!("{} {id}: state not serialisable: {e}", A::NAME)))
    }

    pub(crate) async fn stream_version(&self, id: &str) -> Result<u64, StoreError> {
        let statement = Statement::new(sql::STREAM_VERSION).text(A::NAME).text(id);
        let version: Option<i64> = self.inner.pools.reader.fetch_scalar(&statement).await.map_err(db)?;
        Ok(version.map_or(0, from_db))
    }
}

pub(crate) fn version_param(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn from_db(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Now, at the microsecond precision both databases keep, so that what is
/// stored reads back equal.
pub(crate) fn now() -> DateTime<Utc> {
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
        let statement = Statement::new(sql::RECALL).text(A::NAME).text(id).text(idempotency_key);
        let found = match self.inner.pools.reader.fetch_optional(&statement).await.map_err(db)? {
            Some(row) => Some((row.get::<i64>(0).map_err(db)?, row.get::<i64>(1).map_err(db)?)),
            None => None,
        };
        Ok(found.map(|(version, position)| Appended {
            version: from_db(version),
            position: Position::new(0, from_db(position)),
            deduplicated: true,
        }))
    }

    async fn load_document(&self, id: &str) -> Result<Option<StateDocument>, StoreError> {
        let encode = |state: &A| {
            serde_json::to_vec(state)
                .map(bytes::Bytes::from)
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
        let statement = Statement::new(sql::LOAD_STATE).text(A::NAME).text(id);
        let row = match self.inner.pools.reader.fetch_optional(&statement).await.map_err(db)? {
            Some(row) => Some((row.get::<i64>(0).map_err(db)?, row.get::<String>(1).map_err(db)?)),
            None => None,
        };
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
        let statement = Statement::new(query).text(A::NAME).text(id).int(after).int(limit);
        let rows = self.inner.pools.reader.fetch_all(&statement).await.map_err(db)?;
        let stored = rows.iter().map(|r| sql::envelope_from_row(r, A::NAME)).collect::<Result<Vec<_>, _>>()?;
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
        let statement = Statement::new(sql::WRITTEN_BETWEEN)
            .text(A::NAME)
            .int(version_param(from))
            .int(version_param(position.offset));
        let rows = self.inner.pools.reader.fetch_all(&statement).await.map_err(db)?;
        let written = rows.iter().map(Written::read).collect::<Result<Vec<_>, _>>().map_err(db)?;
        // Positions are visible gap-free, in commit order: everything up
        // to the last one found is swept. A token past the log's end (from
        // another log, or made up) moves the mark no further than that.
        let last = written.iter().map(|w| w.last_position).max();
        let latest: Vec<(String, u64)> = written.into_iter().map(|w| (w.id, w.version)).collect();
        cache.sweep(&latest, read_at);
        if let Some(last) = last {
            self.inner.synced.fetch_max(last + 1, Ordering::SeqCst);
        }
        Ok(true)
    }

    async fn head(&self) -> Result<Checkpoint, StoreError> {
        let statement = Statement::new(sql::HEAD).text(A::NAME);
        let last: Option<i64> =
            self.inner.pools.reader.fetch_scalar::<Option<i64>>(&statement).await.map_err(db)?.flatten();
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
        self.inner.pools.reader.execute(&Statement::new("SELECT 1")).await.map(drop).map_err(db)
    }
}

/// One row of `sql::WRITTEN_BETWEEN`: an aggregate written in a stretch of
/// the log, its latest version and the last position it was written at.
struct Written {
    pub(crate) id: String,
    pub(crate) version: u64,
    pub(crate) last_position: u64,
}

impl Written {
    fn read(row: &DbRow) -> Result<Self, sqlx::Error> {
        Ok(Self { id: row.get(0)?, version: from_db(row.get(1)?), last_position: from_db(row.get(2)?) })
    }
}
