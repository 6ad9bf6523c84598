//! [`KafkaStore`]: the event log on a Kafka topic, the table in memory and
//! in a compacted topic. This module holds the store's shared state and the
//! [`EventStore`] contract; each step lives in the module of its concern
//! (`append`, `reads`, `recovery`, `table_writer`, `topics`, `client`).

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use kes_core::{
    Aggregate, Appended, Checkpoint, Codec, Envelope, EventStore, EventStream, ExpectedVersion, JsonCodec, KeyedLocks,
    Metadata, Position, Snapshot, StateDocument, StoreError,
};
use rdkafka::producer::FutureProducer;

use crate::client::{ProducerSlot, create_producer};
use crate::config::KafkaConfig;
use crate::error::KafkaStoreError;
use crate::record::partition_for;
use crate::table::{Table, typed_state};
use crate::table_writer::TableWrites;
use crate::topics::{partition_count, prepare_topics};

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
    pub(crate) config: KafkaConfig,
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
    /// One resynchronisation of a partition at a time, by partition.
    pub(crate) resync_locks: Vec<tokio::sync::Mutex<()>>,
    /// Where the ids of events records' sends come from: each send takes the
    /// next one and is known by it in its partition's
    /// [`in_flight`](crate::table::PartitionLog::in_flight) until it ends.
    pub(crate) next_send_id: AtomicU64,
    /// The table writer's bookkeeping: records waiting or unacknowledged,
    /// and the `flush` calls cutting their waits short.
    pub(crate) table_writes: TableWrites,
}

impl<A: Aggregate> KafkaStore<A> {
    /// Connects with the JSON codec: creates the topics when missing,
    /// checks their configuration, loads the table and catches it up with
    /// the events topic.
    pub async fn connect(config: KafkaConfig) -> Result<Self, KafkaStoreError> {
        Self::connect_with_codec(config, JsonCodec::default()).await
    }

    /// [`KafkaStore::connect`] with another payload codec.
    pub async fn connect_with_codec(config: KafkaConfig, codec: impl Codec<A::Event>) -> Result<Self, KafkaStoreError> {
        config.validate()?;
        let events_topic = config.events_topic(A::NAME);
        let table_topic = config.table_topic(A::NAME);
        prepare_topics(&config, &events_topic, &table_topic).await?;
        let producer = Arc::new(create_producer(&config)?);
        let partitions = partition_count(&producer, &events_topic, config.request_timeout).await?;
        let table_partitions = partition_count(&producer, &table_topic, config.request_timeout).await?;
        if partitions != config.partitions {
            tracing::warn!(topic = %events_topic, partitions, configured = config.partitions,
                "the events topic exists with another partition count; using the topic's");
        }
        let inner = Arc::new(Inner {
            resync_locks: (0..partitions).map(|_| tokio::sync::Mutex::new(())).collect(),
            table: Mutex::new(Table::new(partitions)),
            config,
            events_topic,
            table_topic,
            partitions,
            table_partitions,
            codec: Arc::new(codec),
            producer: ProducerSlot::new(producer),
            id_locks: KeyedLocks::new(ID_LOCK_SHARDS),
            next_send_id: AtomicU64::new(0),
            table_writes: TableWrites::new(),
        });
        inner.recover().await?;
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
    /// ([`KafkaConfig::table_write_delay`]) and waits until every record
    /// handed to the producer (table records included) is acknowledged, or
    /// `timeout` passes. Call it before a planned shutdown so that the next
    /// start has nothing to catch up.
    pub async fn flush(&self, timeout: Duration) -> Result<(), KafkaStoreError> {
        self.inner.flush(timeout).await
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
        self.inner.resync_if_uncertain(p).await?;
        let table = self.inner.table();
        Ok(table.rows.get(id).and_then(|row| {
            row.key(idempotency_key).map(|k| Appended {
                version: k.version,
                position: Position::new(row.partition, k.offset),
                deduplicated: true,
            })
        }))
    }

    async fn load(&self, id: &str) -> Result<Option<Snapshot<A>>, StoreError> {
        let p = self.inner.partition_checked(id)?;
        self.inner.resync_if_uncertain(p).await?;
        // The bytes are copied out and typed after the table is unlocked.
        let Some((bytes, version)) = self.inner.table().rows.get(id).map(|r| (r.state.clone(), r.version)) else {
            return Ok(None);
        };
        let state = if version == 0 { A::default() } else { typed_state::<A>(id, &bytes)? };
        Ok(Some(Snapshot { state, version }))
    }

    async fn load_document(&self, id: &str) -> Result<Option<StateDocument>, StoreError> {
        let p = self.inner.partition_checked(id)?;
        self.inner.resync_if_uncertain(p).await?;
        let table = self.inner.table();
        let Some(row) = table.rows.get(id) else { return Ok(None) };
        if row.version > 0 {
            return Ok(Some(StateDocument { json: row.state.to_vec(), version: row.version, deleted: row.deleted }));
        }
        // As `load`: a row without events stands for the default state.
        drop(table);
        let state = A::default();
        let json = serde_json::to_vec(&state).map_err(|e| StoreError::Backend(format!("{} {id}: {e}", A::NAME)))?;
        Ok(Some(StateDocument { json, version: 0, deleted: state.is_deleted() }))
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
}
