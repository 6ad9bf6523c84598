//! [`KafkaStore`]: the event log on a Kafka topic, the table in memory and
//! in a compacted topic. This module holds the store's shared state and the
//! [`EventStore`] contract; each step lives in the module of its concern
//! (`append`, `reads`, `recovery`, `table_writer`, `topics`, `client`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use kes_core::{
    Aggregate, Appended, Checkpoint, Codec, Envelope, EventStore, EventStream, ExpectedVersion, JsonCodec, KeyedLocks,
    Metadata, Position, Snapshot, StateDocument, StoreError, StoreGauge,
};
use rdkafka::producer::FutureProducer;

use crate::client::{ProducerSlot, create_producer};
use crate::config::KafkaStoreConfig;
use crate::error::KafkaStoreError;
use crate::follower::{FollowerCounters, FollowerStats};
use crate::record::partition_for;
use crate::table::{Table, typed_state};
use crate::table_writer::TableWrites;
use crate::topics::prepare_topics;

/// Shards of the per-id lock table: enough that appends to unrelated ids
/// rarely meet on one shard's map lookup.
const ID_LOCK_SHARDS: usize = 64;

/// An [`EventStore`] on Kafka. Cheap to clone (clones share one producer
/// and one table). See the crate docs for the layout and guarantees.
pub struct KafkaStore<A: Aggregate> {
    inner: Arc<Inner<A>>,
}

impl<A: Aggregate> Clone for KafkaStore<A> {
    fn clone(&self) -> Self {
        Self { inner: Arc::clone(&self.inner) }
    }
}

impl<A: Aggregate> std::fmt::Debug for KafkaStore<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaStore")
            .field("events_topic", &self.inner.events_topic)
            .field("table_topic", &self.inner.table_topic)
            .field("partitions", &self.inner.partitions)
            .finish()
    }
}

/// What every clone of a [`KafkaStore`] and its background tasks share.
pub(crate) struct Inner<A: Aggregate> {
    pub(crate) config: KafkaStoreConfig,
    pub(crate) events_topic: String,
    pub(crate) table_topic: String,
    /// Partition count of the events topic (decides where an id lives).
    pub(crate) partitions: u32,
    /// Partition count of the table topic.
    pub(crate) table_partitions: u32,
    pub(crate) codec: Arc<dyn Codec<A::Event>>,
    /// Replaced when librdkafka reports a fatal producer error.
    producer: ProducerSlot,
    table: Mutex<Table<A>>,
    /// One append at a time per aggregate id in this process (never a
    /// global lock).
    pub(crate) id_locks: KeyedLocks,
    /// Bumped whenever the table applied records (or a partition halted):
    /// what reads waiting for a position and subscriptions wait on.
    pub(crate) progress: tokio::sync::watch::Sender<u64>,
    pub(crate) counters: FollowerCounters,
    /// Set once the owners' group first assigned this instance its
    /// partitions and their tenures were claimed.
    pub(crate) owners_settled: tokio::sync::watch::Sender<bool>,
    /// This store's identity in epoch markers (random per store).
    pub(crate) instance: uuid::Uuid,
    /// The table writer's bookkeeping: records waiting or unacknowledged,
    /// and the `flush` calls cutting their waits short.
    pub(crate) table_writes: TableWrites,
    /// Per events partition: the last high watermark read for
    /// `load_current`, and when its read started (see
    /// `Inner::partition_head`).
    pub(crate) heads: Vec<tokio::sync::Mutex<Option<(std::time::Instant, u64)>>>,
    /// The state version the table records were built by when this store
    /// found them outdated at start and rebuilt the table (0: it did not).
    pub(crate) table_rebuilt_from: std::sync::atomic::AtomicU32,
}

impl<A: Aggregate> KafkaStore<A> {
    /// Opens the store `config` describes with payloads in JSON
    /// ([`JsonCodec`] with the events' upcasters): creates the topics when
    /// missing, checks their configuration, loads the table and catches it
    /// up with the events topic.
    pub async fn open(config: KafkaStoreConfig) -> Result<Self, KafkaStoreError> {
        Self::open_with_codec(config, JsonCodec::default()).await
    }

    /// [`KafkaStore::open`] with another payload codec.
    pub async fn open_with_codec(
        config: KafkaStoreConfig,
        codec: impl Codec<A::Event>,
    ) -> Result<Self, KafkaStoreError> {
        config.validate()?;
        let events_topic = config.events_topic(A::NAME);
        let table_topic = config.table_topic(A::NAME);
        // The producer first: an idempotent producer's start (its producer
        // id) takes a while, and goes on beside the topics' preparation.
        let producer = Arc::new(create_producer(&config)?);
        let (partitions, table_partitions) = prepare_topics(&config, &events_topic, &table_topic).await?;
        if partitions != config.partitions {
            tracing::warn!(topic = %events_topic, partitions, configured = config.partitions,
                "the events topic exists with another partition count; using the topic's");
        }
        let inner = Arc::new(Inner {
            table: Mutex::new(Table::new(partitions)),
            config,
            events_topic,
            table_topic,
            partitions,
            table_partitions,
            codec: Arc::new(codec),
            producer: ProducerSlot::new(producer),
            id_locks: KeyedLocks::new(ID_LOCK_SHARDS),
            progress: tokio::sync::watch::Sender::new(0),
            counters: FollowerCounters::default(),
            instance: uuid::Uuid::new_v4(),
            owners_settled: tokio::sync::watch::Sender::new(false),
            table_writes: TableWrites::new(),
            heads: (0..partitions).map(|_| tokio::sync::Mutex::new(None)).collect(),
            table_rebuilt_from: std::sync::atomic::AtomicU32::new(0),
        });
        let scan = inner.recover().await?;
        inner.start_following()?;
        inner.start_owning(scan)?;
        Ok(Self { inner })
    }

    /// The events topic's name.
    pub fn events_topic(&self) -> &str {
        &self.inner.events_topic
    }

    /// The table topic's name.
    pub fn table_topic(&self) -> &str {
        &self.inner.table_topic
    }

    /// The events partition that holds aggregate `id`.
    pub fn partition_of(&self, id: &str) -> u32 {
        partition_for(id, self.inner.partitions)
    }

    /// Writes the table records still waiting for their delay
    /// ([`KafkaStoreConfig::table_write_delay`]) and waits until every record
    /// handed to the producer (table records included) is acknowledged, or
    /// `timeout` passes. Call it before a planned shutdown so that the next
    /// start has nothing to catch up.
    pub async fn flush(&self, timeout: Duration) -> Result<(), KafkaStoreError> {
        self.inner.flush(timeout).await
    }

    /// What the follower applied and how appends were decided (see
    /// [`FollowerStats`]).
    pub fn follower_stats(&self) -> FollowerStats {
        self.inner.follower_stats()
    }

    /// The events partitions whose table records this instance writes now,
    /// with the epoch of its tenure over each (see the crate docs).
    pub fn owned_partitions(&self) -> Vec<(u32, u64)> {
        let table = self.inner.table();
        table.logs.iter().enumerate().filter_map(|(p, l)| l.tenure.map(|t| (p as u32, t.epoch))).collect()
    }

    /// Waits, at most `timeout`, until this store's table applied the
    /// events record at `at` (written by any instance): `false` when the
    /// time ran out or its partition halted before it.
    pub async fn wait_applied(&self, at: Position, timeout: Duration) -> bool {
        self.inner.wait_applied(at, timeout).await
    }
}

impl<A: Aggregate> Inner<A> {
    /// The producer to send with now.
    pub(crate) fn producer(&self) -> Arc<FutureProducer> {
        self.producer.current()
    }

    /// See [`ProducerSlot::replace_failed`].
    pub(crate) fn heal_producer(&self, failed: &Arc<FutureProducer>, after_timeout: bool) {
        self.producer.replace_failed(&self.config, failed, after_timeout);
    }

    /// The table, locked (never across an `.await`).
    pub(crate) fn table(&self) -> std::sync::MutexGuard<'_, Table<A>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The partition of an id after checking the id.
    pub(crate) fn partition_checked(&self, id: &str) -> Result<u32, StoreError> {
        if id.is_empty() || id.len() > 1024 {
            return Err(StoreError::Invalid("an aggregate id must have 1 to 1024 bytes".into()));
        }
        if id.contains('\0') {
            return Err(StoreError::Invalid("an aggregate id must not contain NUL".into()));
        }
        Ok(partition_for(id, self.partitions))
    }
}

#[async_trait]
impl<A: Aggregate> EventStore<A> for KafkaStore<A> {
    async fn append(
        &self,
        id: &str,
        expected: ExpectedVersion,
        events: Vec<A::Event>,
        metadata: Metadata,
    ) -> Result<Appended, StoreError> {
        self.inner.append(id, expected, events, metadata).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        KafkaStore::flush(self, self.inner.config.request_timeout * 2).await.map_err(StoreError::from)
    }

    async fn recall(&self, id: &str, idempotency_key: &str) -> Result<Option<Appended>, StoreError> {
        let p = self.inner.partition_checked(id)?;
        self.inner.partition_ready(p)?;
        let table = self.inner.table();
        Ok(table.rows.get(id).and_then(|row| {
            row.recall(idempotency_key).map(|(version, offset)| Appended {
                version,
                position: Position::new(row.partition, offset),
                deduplicated: true,
            })
        }))
    }

    async fn load(&self, id: &str) -> Result<Option<Snapshot<A>>, StoreError> {
        let p = self.inner.partition_checked(id)?;
        self.inner.partition_ready(p)?;
        // The bytes are copied out and typed after the table is unlocked.
        let Some((bytes, version)) = self.inner.table().rows.get(id).map(|r| (r.state.to_vec(), r.version)) else {
            return Ok(None);
        };
        let state = if version == 0 { A::default() } else { typed_state::<A>(id, &bytes)? };
        Ok(Some(Snapshot { state, version }))
    }

    async fn load_current(&self, id: &str) -> Result<Option<Snapshot<A>>, StoreError> {
        // Other instances may have appended records this one's follower has
        // not applied yet: wait (bounded) until it applied the partition as
        // the broker has it now.
        let p = self.inner.partition_checked(id)?;
        if !self.inner.catch_up_partition(p, self.inner.config.request_timeout).await? {
            self.inner.partition_ready(p)?;
            return Err(StoreError::Unavailable(format!(
                "partition {p} of {} is not caught up within {:?}",
                self.inner.events_topic, self.inner.config.request_timeout
            )));
        }
        self.load(id).await
    }

    async fn load_document(&self, id: &str) -> Result<Option<StateDocument>, StoreError> {
        let p = self.inner.partition_checked(id)?;
        self.inner.partition_ready(p)?;
        let table = self.inner.table();
        let Some(row) = table.rows.get(id) else { return Ok(None) };
        if row.version > 0 {
            return Ok(Some(StateDocument {
                json: bytes::Bytes::copy_from_slice(row.state),
                version: row.version,
                deleted: row.deleted,
            }));
        }
        // As `load`: a row without events stands for the default state.
        drop(table);
        let state = A::default();
        let json = serde_json::to_vec(&state).map_err(|e| StoreError::Backend(format!("{} {id}: {e}", A::NAME)))?;
        Ok(Some(StateDocument { json: json.into(), version: 0, deleted: state.is_deleted() }))
    }

    async fn read(&self, id: &str) -> Result<Vec<Envelope<A::Event>>, StoreError> {
        self.inner.read_stream(id, 0, usize::MAX).await
    }

    async fn read_page(&self, id: &str, after: u64, limit: usize) -> Result<Vec<Envelope<A::Event>>, StoreError> {
        self.inner.read_stream(id, after, limit).await
    }

    async fn subscribe(&self, from: Checkpoint) -> Result<EventStream<A::Event>, StoreError> {
        self.inner.subscribe(&from)
    }

    async fn head(&self) -> Result<Checkpoint, StoreError> {
        self.inner.head().await
    }

    async fn wait_for_position(&self, position: Position, timeout: Duration) -> Result<bool, StoreError> {
        let p = position.partition;
        if p >= self.inner.partitions {
            return Err(StoreError::Invalid(format!("no partition {p} in {}", self.inner.events_topic)));
        }
        let applied = self.inner.wait_applied(position, timeout).await;
        if !applied {
            self.inner.partition_ready(p)?;
        }
        Ok(applied)
    }

    fn gauges(&self) -> Vec<StoreGauge> {
        let stats = self.inner.follower_stats();
        let count = |name, help, value: u64| StoreGauge { name, help, labels: Vec::new(), value: value as f64 };
        let mut gauges = vec![
            count("void_records", "events records judged void (lost a race) since start", stats.void_records),
            count("fast_path_appends", "appends judged as soon as acknowledged", stats.fast_path_appends),
            count("awaited_appends", "appends that waited for the follower's verdict", stats.awaited_appends),
            count("lost_races", "appends answered Conflict because their record was void", stats.lost_races),
            count("subscribed_from_tail", "records subscriptions took from memory", stats.subscribed_from_tail),
            count("subscribed_from_broker", "records subscriptions read from the broker", stats.subscribed_from_broker),
            count(
                "subscription_seeks",
                "times subscriptions pointed their broker reader anew",
                stats.subscription_seeks,
            ),
            count(
                "table_records_scanned",
                "table topic records read (start-up and tenure claims)",
                stats.table_records_scanned,
            ),
        ];
        gauges.extend(StoreGauge::state_version::<A>(
            self.inner.table_rebuilt_from.load(std::sync::atomic::Ordering::Relaxed),
        ));
        for (p, applied) in stats.applied.iter().enumerate() {
            let halted = stats.halted.iter().any(|h| h.partition as usize == p);
            let labels = vec![("partition", p.to_string())];
            gauges.push(StoreGauge {
                name: "applied_offset",
                help: "offset after the last events record the table applied",
                labels: labels.clone(),
                value: *applied as f64,
            });
            gauges.push(StoreGauge {
                name: "partition_halted",
                help: "1 while a partition is stopped at a record this version cannot read",
                labels,
                value: if halted { 1.0 } else { 0.0 },
            });
        }
        gauges
    }
}
