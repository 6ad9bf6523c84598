//! [`KafkaStore`]: the event log on a Kafka topic, the table in memory and
//! in a compacted topic.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::stream;
use kes_core::codec::encode_all;
use kes_core::{
    Aggregate, Appended, Checkpoint, Codec, Envelope, EventStore, EventStream, ExpectedVersion, JsonCodec, Metadata,
    Position, Snapshot, StateDocument, StoreError,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::error::{KafkaStoreError, is_transient};
use crate::record::{EventsDoc, KeyDoc, OutgoingEvent, TableDoc, partition_for};

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

struct Inner<A: Aggregate> {
    config: KafkaConfig,
    events_topic: String,
    table_topic: String,
    /// Partition count of the events topic (decides where an id lives).
    partitions: u32,
    table_partitions: u32,
    codec: Arc<dyn Codec<A::Event>>,
    /// Replaced when librdkafka reports a fatal producer error.
    producer: RwLock<Arc<FutureProducer>>,
    table: Mutex<Table<A>>,
    locks: IdLocks,
    /// One resynchronisation of a partition at a time.
    resync: Vec<tokio::sync::Mutex<()>>,
    tickets: AtomicU64,
    /// Bumped by `flush` to end every table record's wait at once.
    hurry: tokio::sync::watch::Sender<u64>,
    /// Running `flush` calls: table records are written without delay.
    flushing: AtomicUsize,
    /// Table records waiting for their delay or for their acknowledgement.
    saves: AtomicUsize,
}

/// The in-memory table and, per events partition, what this process knows
/// about the partition's progress.
struct Table<A: Aggregate> {
    /// Every aggregate of the type; a row is boxed so that the map's empty
    /// slots (up to half of them, as the map grows by doubling) cost a
    /// pointer rather than a whole row.
    rows: HashMap<Box<str>, Box<Row>>,
    logs: Vec<PartitionLog>,
    /// Bytes held by the rows' `history` caches.
    cache_bytes: usize,
    /// Ids whose history is cached, oldest first (evicted first).
    cache_order: VecDeque<String>,
    model: std::marker::PhantomData<fn() -> A>,
}

impl<A: Aggregate> Table<A> {
    /// Adds one events record to the cached history of `id` (if it holds
    /// the whole history), then evicts whole histories down to `budget`.
    fn cache(&mut self, id: &str, value: &[u8], budget: usize) {
        let Some(row) = self.rows.get_mut(id) else { return };
        let Some(history) = row.history.as_mut() else { return };
        if history.is_empty() {
            self.cache_order.push_back(id.to_owned());
        }
        history.push(Arc::from(value));
        self.cache_bytes += value.len();
        while self.cache_bytes > budget {
            let Some(victim) = self.cache_order.pop_front() else { break };
            if let Some(dropped) = self.rows.get_mut(victim.as_str()).and_then(|r| r.history.take()) {
                self.cache_bytes -= dropped.iter().map(|v| v.len()).sum::<usize>();
            }
        }
    }
}

/// One aggregate of the table. The table holds every aggregate of its type,
/// so a row is kept small: the state as its compact JSON (a typed state
/// with strings and sets takes several times the bytes of its JSON; `load`
/// and `append` deserialise it), and what most rows lack (idempotency
/// keys, several records, a cached history) behind a pointer or not at all.
#[expect(
    clippy::box_collection,
    reason = "a boxed collection takes 8 bytes of every row instead of 24 or 32; most rows have none"
)]
struct Row {
    /// The state, serialised with `serde_json` (compact).
    state: Box<[u8]>,
    version: u64,
    first_offset: u64,
    last_offset: u64,
    /// Its events partition.
    partition: u32,
    /// Size of its largest events record, saturated at `u32::MAX` (kept in
    /// table records; reads no longer size fetches by it).
    max_bytes: u32,
    offsets: Offsets,
    /// Its recent idempotency keys, oldest first; `None` when it has none.
    keys: Option<Box<VecDeque<KeyDoc>>>,
    /// Its events records' values, all of them, while they fit the read
    /// cache; `None` once evicted or for rows loaded from the table topic.
    history: Option<Box<Vec<Arc<[u8]>>>>,
    /// [`Aggregate::is_deleted`] of the state.
    deleted: bool,
    /// A table record of this row is in flight (see `save_row`).
    table_writing: bool,
    /// The row moved since the record in flight was built.
    table_stale: bool,
}

/// The offsets of a row's events records.
#[derive(Clone, Debug, PartialEq)]
enum Offsets {
    /// Not known: a table record from an older writer did not list them
    /// (`read` scans the partition then).
    Unknown,
    /// One record, at the row's `first_offset` (most aggregates).
    First,
    /// All of them, ascending, the first one included.
    Many(Vec<u64>),
}

impl Offsets {
    /// The list a table record carries (empty when unknown).
    fn to_vec(&self, first: u64) -> Vec<u64> {
        match self {
            Self::Unknown => Vec::new(),
            Self::First => vec![first],
            Self::Many(all) => all.clone(),
        }
    }

    /// The list read from a table record.
    fn from_vec(all: Vec<u64>, first: u64) -> Self {
        match all.as_slice() {
            [] => Self::Unknown,
            [only] if *only == first => Self::First,
            _ => Self::Many(all),
        }
    }

    /// One more record after those listed (nothing when they are unknown).
    fn push(&mut self, first: u64, offset: u64) {
        match self {
            Self::Unknown => {}
            Self::First => *self = Self::Many(vec![first, offset]),
            Self::Many(all) => all.push(offset),
        }
    }
}

impl Row {
    /// A row for an aggregate whose first events record is at `at`, before
    /// that record is applied (version 0, the default state).
    fn new(at: Position) -> Self {
        Self {
            state: Box::default(),
            version: 0,
            first_offset: at.offset,
            last_offset: at.offset,
            partition: at.partition,
            max_bytes: 0,
            offsets: Offsets::First,
            keys: None,
            history: Some(Box::default()),
            deleted: false,
            table_writing: false,
            table_stale: false,
        }
    }

    /// The state, typed (the default one for a row no record reached yet).
    fn typed<A: Aggregate>(&self) -> Result<A, serde_json::Error> {
        if self.version == 0 { Ok(A::default()) } else { serde_json::from_slice(&self.state) }
    }

    /// Moves the row by one events record (`size` bytes of key and value,
    /// at `at`) that brought it to `version` and `state`.
    fn advance(&mut self, state: Box<[u8]>, deleted: bool, version: u64, at: Position, size: u64) {
        if self.version > 0 {
            self.offsets.push(self.first_offset, at.offset);
        }
        self.state = state;
        self.deleted = deleted;
        self.version = version;
        self.last_offset = at.offset;
        self.partition = at.partition;
        self.max_bytes = self.max_bytes.max(u32::try_from(size).unwrap_or(u32::MAX));
    }

    fn key(&self, key: &str) -> Option<&KeyDoc> {
        self.keys.as_deref().and_then(|keys| keys.iter().find(|k| k.key == key))
    }
}

/// A state the table holds, typed; [`StoreError::Corrupt`] when it does
/// not fit the aggregate's model.
fn typed_state<A: Aggregate>(id: &str, bytes: &[u8]) -> Result<A, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        aggregate: A::NAME.to_owned(),
        id: id.to_owned(),
        version: 0,
        reason: format!("the table's state does not fit the aggregate's model: {e}"),
    })
}

/// A state as the table keeps it: its compact JSON, and whether it is
/// deleted. The JSON is written into `scratch` (cleared first; reused
/// across many states by the start-up load) and copied into an allocation
/// of its exact size.
fn encode_state<A: Aggregate>(state: &A, scratch: &mut Vec<u8>) -> Result<(Box<[u8]>, bool), serde_json::Error> {
    scratch.clear();
    serde_json::to_writer(&mut *scratch, state)?;
    Ok((Box::from(scratch.as_slice()), state.is_deleted()))
}

#[derive(Default)]
struct PartitionLog {
    /// Offset after the highest events record applied to the table.
    end: u64,
    /// Applied events records whose table record is not acknowledged yet
    /// (offset → aggregate id).
    unsaved: BTreeMap<u64, String>,
    /// Sends in flight (ticket → the partition's `end` when sent: the
    /// record's offset will not be lower).
    in_flight: HashMap<u64, u64>,
    /// Lowest offset a failed send may have landed at: the send timed out or
    /// failed without telling whether the broker wrote it.
    uncertain_from: Option<u64>,
    /// The highest `reflected_below` an acknowledged table record claims.
    claimed: u64,
    /// The aggregate of the latest events record applied.
    last_id: Option<String>,
}

impl PartitionLog {
    /// Every events record of this partition below the returned offset is
    /// reflected in an acknowledged table record.
    fn reflected_below(&self) -> u64 {
        let mut low = self.end;
        if let Some((o, _)) = self.unsaved.first_key_value() {
            low = low.min(*o);
        }
        if let Some(f) = self.in_flight.values().min() {
            low = low.min(*f);
        }
        if let Some(u) = self.uncertain_from {
            low = low.min(u);
        }
        low
    }
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
        let admin: AdminClient<DefaultClientContext> =
            client_config(&config).create().map_err(|e| KafkaStoreError::from_kafka("admin client", &e))?;
        ensure_topics(&admin, &config, &events_topic, &table_topic).await?;
        check_topics(&admin, &config, &events_topic, &table_topic).await?;
        let producer = Arc::new(create_producer(&config)?);
        let partitions = partition_count(&producer, &events_topic, config.request_timeout).await?;
        let table_partitions = partition_count(&producer, &table_topic, config.request_timeout).await?;
        if partitions != config.partitions {
            tracing::warn!(topic = %events_topic, partitions, configured = config.partitions,
                "the events topic exists with another partition count; using the topic's");
        }
        let inner = Arc::new(Inner {
            resync: (0..partitions).map(|_| tokio::sync::Mutex::new(())).collect(),
            table: Mutex::new(Table {
                rows: HashMap::new(),
                logs: (0..partitions).map(|_| PartitionLog::default()).collect(),
                cache_bytes: 0,
                cache_order: VecDeque::new(),
                model: std::marker::PhantomData,
            }),
            config,
            events_topic,
            table_topic,
            partitions,
            table_partitions,
            codec: Arc::new(codec),
            producer: RwLock::new(producer),
            locks: IdLocks::default(),
            tickets: AtomicU64::new(0),
            hurry: tokio::sync::watch::Sender::new(0),
            flushing: AtomicUsize::new(0),
            saves: AtomicUsize::new(0),
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
        let inner = &self.inner;
        inner.flushing.fetch_add(1, Ordering::AcqRel);
        inner.hurry.send_modify(|n| *n = n.wrapping_add(1));
        let result = inner.flush_until(Instant::now() + timeout).await;
        inner.flushing.fetch_sub(1, Ordering::AcqRel);
        result
    }
}

/// Fetch size of scans and subscriptions.
const SCAN_FETCH_BYTES: u64 = 1 << 20;

/// `fetch.wait.max.ms` of reads that know where they end (start-up scans,
/// `read`): the data is there, so a fetch has no reason to wait. It matters
/// on brokers that hold every fetch answer for the whole wait even when
/// they have data (Tansu 0.6 does): there each fetch of a bounded read
/// would cost the wait. Subscriptions, which wait at the head of the log
/// for new records, keep [`FOLLOW_FETCH_WAIT_MS`].
const BOUNDED_FETCH_WAIT_MS: u32 = 5;

/// `fetch.wait.max.ms` of subscriptions: how long an idle follower's fetch
/// waits at the head of the log (latency of a new record at worst).
const FOLLOW_FETCH_WAIT_MS: u32 = 100;

/// `read` fetches a stream's records by offset; from one of them to the
/// next it reads through up to this many other records rather than seek.
/// A seek costs a new fetch round trip, and on brokers that answer every
/// fetch with up to `fetch.max.bytes` whatever the partition bound (Tansu
/// 0.6: about 2,000 records of a few hundred bytes, each looked up on its
/// own) a seek costs as much as reading that far ahead. On Apache Kafka
/// reading through 2,048 small records costs about a megabyte of transfer.
const READ_THROUGH_RECORDS: u64 = 2048;

/// Upper bound of one fetch response, over all partitions. Kafka brokers
/// size a response by `max.partition.fetch.bytes`; some compatible brokers
/// (Tansu) only by this request-wide bound, and assemble the whole response
/// before sending any of it: a large bound there means long silences while
/// reading a big topic. It stays above the largest record a producer sends
/// (`message.max.bytes`, 1,000,000 by default), which such a broker would
/// otherwise never return.
const FETCH_MAX_BYTES: u64 = 1 << 20;

/// The settings every client shares, then the user's overrides.
fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    let timeout = config.request_timeout.as_millis().to_string();
    c.set("bootstrap.servers", &config.brokers)
        .set("socket.timeout.ms", &timeout)
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "1000")
        .set("log_level", "3");
    for (k, v) in &config.client {
        c.set(k, v);
    }
    c
}

fn create_producer(config: &KafkaConfig) -> Result<FutureProducer, KafkaStoreError> {
    let mut c = client_config(config);
    let timeout = config.request_timeout.as_millis();
    // Every append waits for its record: lingering would add to each
    // command's latency. Under concurrency records still share requests,
    // since they queue while earlier requests are in flight.
    if !config.client.contains_key("linger.ms") {
        c.set("linger.ms", "0");
    }
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", timeout.to_string())
        .set("request.timeout.ms", timeout.clamp(100, 30_000).to_string());
    c.create().map_err(|e| KafkaStoreError::from_kafka("producer", &e))
}

/// A consumer for assign + seek reads. It keeps librdkafka's deep
/// prefetch queue, so that fetches overlap with the caller's work (a
/// shallow queue starves on brokers with slow fetches). `wait_ms` is its
/// `fetch.wait.max.ms` ([`BOUNDED_FETCH_WAIT_MS`] or
/// [`FOLLOW_FETCH_WAIT_MS`]).
fn create_consumer(config: &KafkaConfig, eof: bool, wait_ms: u32) -> Result<StreamConsumer, KafkaStoreError> {
    let mut c = client_config(config);
    c.set("max.partition.fetch.bytes", SCAN_FETCH_BYTES.clamp(1024, FETCH_MAX_BYTES).to_string())
        .set("fetch.max.bytes", FETCH_MAX_BYTES.to_string());
    // librdkafka wants a group id even for assign(); nothing is ever
    // committed to it (checkpoints belong to the readers).
    c.set("group.id", format!("{}.kes-readers", config.topic_prefix))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", if eof { "true" } else { "false" })
        .set("fetch.wait.max.ms", wait_ms.to_string());
    c.create().map_err(|e| KafkaStoreError::from_kafka("consumer", &e))
}

/// Creates the two topics with their configs; an existing topic is fine
/// (its configuration is checked next).
async fn ensure_topics(
    admin: &AdminClient<DefaultClientContext>,
    config: &KafkaConfig,
    events: &str,
    table: &str,
) -> Result<(), KafkaStoreError> {
    let retention = crate::config::THOUSAND_YEARS_MS.max(config.min_retention_ms).to_string();
    let partitions = i32::try_from(config.partitions).unwrap_or(i32::MAX);
    let replication = || TopicReplication::Fixed(config.replication_factor);
    let topics = [
        NewTopic::new(events, partitions, replication())
            .set("cleanup.policy", "delete")
            .set("retention.ms", &retention)
            .set("retention.bytes", "-1"),
        NewTopic::new(table, partitions, replication()).set("cleanup.policy", "compact"),
    ];
    let opts = admin_options(config);
    let results = bounded(config, "create topics", admin.create_topics(&topics, &opts)).await?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                let e = KafkaError::AdminOp(code);
                return Err(KafkaStoreError::from_kafka(&format!("create topic {topic}"), &e));
            }
        }
    }
    Ok(())
}

fn admin_options(config: &KafkaConfig) -> AdminOptions {
    AdminOptions::new().request_timeout(Some(config.request_timeout)).operation_timeout(Some(config.request_timeout))
}

/// Runs a client future with the configured bound.
async fn bounded<T>(
    config: &KafkaConfig,
    what: &str,
    f: impl Future<Output = Result<T, KafkaError>>,
) -> Result<T, KafkaStoreError> {
    match tokio::time::timeout(config.request_timeout + Duration::from_secs(1), f).await {
        Ok(r) => r.map_err(|e| KafkaStoreError::from_kafka(what, &e)),
        Err(_) => Err(KafkaStoreError::Unavailable(format!("{what}: no answer within {:?}", config.request_timeout))),
    }
}

/// Reads the topics' configuration back and refuses one that could lose
/// events (events topic) or table rows (table topic).
async fn check_topics(
    admin: &AdminClient<DefaultClientContext>,
    config: &KafkaConfig,
    events: &str,
    table: &str,
) -> Result<(), KafkaStoreError> {
    let specs = [ResourceSpecifier::Topic(events), ResourceSpecifier::Topic(table)];
    let results =
        bounded(config, "describe topic configs", admin.describe_configs(&specs, &admin_options(config))).await?;
    let mut found: HashMap<String, HashMap<String, Option<String>>> = HashMap::new();
    for result in results {
        let resource =
            result.map_err(|code| KafkaStoreError::from_kafka("describe topic configs", &KafkaError::AdminOp(code)))?;
        let name = match &resource.specifier {
            rdkafka::admin::OwnedResourceSpecifier::Topic(t) => t.clone(),
            other => format!("{other:?}"),
        };
        found.insert(name, resource.entries.iter().map(|e| (e.name.clone(), e.value.clone())).collect());
    }
    let empty = HashMap::new();
    check_events_config(events, found.get(events).unwrap_or(&empty), config.min_retention_ms)?;
    check_table_config(table, found.get(table).unwrap_or(&empty))
}

/// The rules for the events topic: delete policy only, retention at least
/// `min_retention_ms` (and not `-1`), no size cap.
pub(crate) fn check_events_config(
    topic: &str,
    entries: &HashMap<String, Option<String>>,
    min_retention_ms: i64,
) -> Result<(), KafkaStoreError> {
    let refuse = |setting: &str, value: Option<&str>, reason: &str| KafkaStoreError::UnsafeTopic {
        topic: topic.to_owned(),
        setting: setting.to_owned(),
        value: value.unwrap_or("<missing>").to_owned(),
        reason: reason.to_owned(),
    };
    let get = |name: &str| entries.get(name).and_then(|v| v.as_deref()).map(str::trim);
    let policy = get("cleanup.policy");
    let policies: Vec<String> =
        policy.unwrap_or("").split(',').map(|p| p.trim().to_ascii_lowercase()).filter(|p| !p.is_empty()).collect();
    if policies.iter().any(|p| p == "compact") {
        return Err(refuse("cleanup.policy", policy, "compaction keeps only the last record of each aggregate"));
    }
    if policies != ["delete"] {
        return Err(refuse("cleanup.policy", policy, "KES needs exactly \"delete\" with an unbounded retention"));
    }
    let retention = get("retention.ms");
    match retention.map(str::parse::<i64>) {
        None => {
            return Err(refuse(
                "retention.ms",
                None,
                "the broker did not report it, so KES cannot tell how long events are kept",
            ));
        }
        Some(Err(_)) => return Err(refuse("retention.ms", retention, "not a number")),
        Some(Ok(-1)) => {
            return Err(refuse(
                "retention.ms",
                retention,
                "-1 means forever on Apache Kafka, but some compatible brokers delete all records of such a topic; \
                 set 1000 years (31536000000000)",
            ));
        }
        Some(Ok(ms)) if ms < min_retention_ms => {
            return Err(refuse(
                "retention.ms",
                retention,
                &format!("events older than that would be deleted (KES needs ≥ {min_retention_ms})"),
            ));
        }
        Some(Ok(_)) => {}
    }
    let bytes = get("retention.bytes");
    match bytes.map(str::parse::<i64>) {
        Some(Ok(-1)) => Ok(()),
        None => Err(refuse(
            "retention.bytes",
            None,
            "the broker did not report it, so KES cannot tell whether a size cap deletes events",
        )),
        Some(_) => Err(refuse("retention.bytes", bytes, "a size cap deletes the oldest events; KES needs -1")),
    }
}

/// The table topic must be compacted and never deleted by age.
pub(crate) fn check_table_config(
    topic: &str,
    entries: &HashMap<String, Option<String>>,
) -> Result<(), KafkaStoreError> {
    let policy = entries.get("cleanup.policy").and_then(|v| v.as_deref()).map(str::trim);
    let policies: Vec<String> =
        policy.unwrap_or("").split(',').map(|p| p.trim().to_ascii_lowercase()).filter(|p| !p.is_empty()).collect();
    if policies == ["compact"] {
        return Ok(());
    }
    Err(KafkaStoreError::UnsafeTopic {
        topic: topic.to_owned(),
        setting: "cleanup.policy".into(),
        value: policy.unwrap_or("<missing>").to_owned(),
        reason: "the table topic must be \"compact\" only: deletion would make the table forget aggregates".into(),
    })
}

/// The partition count of `topic`, waiting (bounded) for a topic created a
/// moment ago to show up in the metadata.
async fn partition_count(
    producer: &Arc<FutureProducer>,
    topic: &str,
    timeout: Duration,
) -> Result<u32, KafkaStoreError> {
    let deadline = Instant::now() + timeout;
    loop {
        let p = Arc::clone(producer);
        let t = topic.to_owned();
        let result = tokio::task::spawn_blocking(move || {
            p.client().fetch_metadata(Some(&t), Timeout::After(timeout)).map(|m| {
                m.topics().iter().find(|x| x.name() == t && x.error().is_none()).map_or(0, |x| x.partitions().len())
            })
        })
        .await
        .map_err(|e| KafkaStoreError::Broker(format!("metadata: {e}")))?;
        match result {
            Ok(n) if n > 0 => {
                return u32::try_from(n).map_err(|_| KafkaStoreError::Broker("too many partitions".into()));
            }
            Ok(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(_) => {
                return Err(KafkaStoreError::Unavailable(format!("topic {topic} has no partitions in the metadata")));
            }
            Err(e) => return Err(KafkaStoreError::from_kafka(&format!("metadata of {topic}"), &e)),
        }
    }
}

impl<A: Aggregate> Inner<A> {
    fn producer(&self) -> Arc<FutureProducer> {
        Arc::clone(&self.producer.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table<A>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a fresh producer in place of `failed` after a fatal error or
    /// (`after_timeout`) a send that failed for lack of an answer.
    ///
    /// Why the latter: an idempotent librdkafka producer whose message
    /// timed out bumps its epoch locally and keeps producing with it; some
    /// brokers (Tansu 0.6.0) cannot handle an epoch they never issued. A
    /// fresh producer asks the broker for a new producer id instead.
    fn heal_producer(&self, failed: &Arc<FutureProducer>, after_timeout: bool) {
        let fatal = failed.client().fatal_error();
        if fatal.is_none() && !after_timeout {
            return;
        }
        let mut slot = self.producer.write().unwrap_or_else(|p| p.into_inner());
        if Arc::ptr_eq(&slot, failed) {
            match create_producer(&self.config) {
                Ok(fresh) => {
                    tracing::warn!(?fatal, "producer replaced after a failed send");
                    *slot = Arc::new(fresh);
                }
                Err(e) => tracing::error!(error = %e, "cannot replace the failed producer"),
            }
        }
    }

    /// Waits until no table record is waiting or unacknowledged.
    async fn saves_settled(&self, deadline: Instant) -> Result<(), KafkaStoreError> {
        while self.saves.load(Ordering::Acquire) > 0 {
            if Instant::now() >= deadline {
                return Err(KafkaStoreError::Unavailable(format!(
                    "flush: {} table records not acknowledged in time",
                    self.saves.load(Ordering::Acquire)
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// [`KafkaStore::flush`] once the waits are cut short.
    async fn flush_until(self: &Arc<Self>, deadline: Instant) -> Result<(), KafkaStoreError> {
        self.saves_settled(deadline).await?;
        let producer = self.producer();
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::task::spawn_blocking(move || producer.flush(left))
            .await
            .map_err(|e| KafkaStoreError::Broker(format!("flush: {e}")))?
            .map_err(|e| KafkaStoreError::from_kafka("flush", &e))?;
        // Every row is written now, but the records claim only what was
        // acknowledged when each was built. One more record per partition
        // claims the whole partition, so the next start replays nothing.
        let mut marks = Vec::new();
        {
            let mut table = self.table();
            for p in 0..table.logs.len() {
                let log = &table.logs[p];
                let behind = log.reflected_below() > log.claimed;
                if let Some(id) = log.last_id.clone().filter(|_| behind)
                    && let Some(row) = table.rows.get_mut(id.as_str())
                    && !row.table_writing
                {
                    row.table_writing = true;
                    self.saves.fetch_add(1, Ordering::AcqRel);
                    marks.push(id);
                }
            }
            for id in &marks {
                self.send_row(&mut table, id);
            }
        }
        self.saves_settled(deadline).await
    }

    /// High watermarks of the events topic's partitions.
    async fn high_watermarks(&self, topic: &str, partitions: u32) -> Result<Vec<u64>, KafkaStoreError> {
        let producer = self.producer();
        let topic = topic.to_owned();
        let timeout = self.config.request_timeout;
        let started = Instant::now();
        let marks = tokio::task::spawn_blocking(move || {
            (0..partitions)
                .map(|p| {
                    let left = timeout.saturating_sub(started.elapsed()).max(Duration::from_millis(1));
                    producer
                        .client()
                        .fetch_watermarks(&topic, p as i32, Timeout::After(left))
                        .map(|(_, high)| u64::try_from(high).unwrap_or(0))
                })
                .collect::<Result<Vec<u64>, KafkaError>>()
        })
        .await
        .map_err(|e| KafkaStoreError::Broker(format!("watermarks: {e}")))?;
        marks.map_err(|e| KafkaStoreError::from_kafka("watermarks", &e))
    }

    /// Reads `topic` partition by partition from each start offset up to
    /// (excluding) each end offset, calling `f` on every record in order.
    /// Fails with `Unavailable` when no record arrives for the request
    /// timeout.
    async fn scan(
        &self,
        topic: &str,
        ranges: &[(u32, u64, u64)],
        mut f: impl FnMut(&BorrowedMessage<'_>) -> Result<(), KafkaStoreError>,
    ) -> Result<(), KafkaStoreError> {
        let mut open: HashMap<i32, u64> =
            ranges.iter().filter(|(_, from, to)| from < to).map(|(p, _, to)| (*p as i32, *to)).collect();
        if open.is_empty() {
            return Ok(());
        }
        let consumer = create_consumer(&self.config, true, BOUNDED_FETCH_WAIT_MS)?;
        let mut tpl = TopicPartitionList::new();
        for (p, from, to) in ranges.iter().filter(|(_, from, to)| from < to) {
            let _ = to;
            let offset = if *from == 0 { Offset::Beginning } else { Offset::Offset(*from as i64) };
            tpl.add_partition_offset(topic, *p as i32, offset)
                .map_err(|e| KafkaStoreError::from_kafka("assign", &e))?;
        }
        consumer.assign(&tpl).map_err(|e| KafkaStoreError::from_kafka("assign", &e))?;
        let idle = self.config.request_timeout;
        let mut deadline = Instant::now() + idle;
        while !open.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = tokio::time::timeout(left, consumer.recv()).await;
            match next {
                Err(_) => {
                    return Err(KafkaStoreError::Unavailable(format!(
                        "reading {topic}: nothing received for {idle:?} ({} partitions unfinished)",
                        open.len()
                    )));
                }
                Ok(Ok(message)) => {
                    deadline = Instant::now() + idle;
                    let p = message.partition();
                    let Some(end) = open.get(&p).copied() else { continue };
                    let offset = u64::try_from(message.offset()).unwrap_or(0);
                    if offset >= end {
                        open.remove(&p);
                        continue;
                    }
                    f(&message)?;
                    if offset + 1 >= end {
                        open.remove(&p);
                    }
                }
                Ok(Err(KafkaError::PartitionEOF(p))) => {
                    open.remove(&p);
                }
                Ok(Err(e)) if e.rdkafka_error_code().is_some_and(is_transient) => {
                    tracing::debug!(topic, error = %e, "transient error while reading; librdkafka retries");
                }
                Ok(Err(e)) => return Err(KafkaStoreError::from_kafka(&format!("reading {topic}"), &e)),
            }
        }
        Ok(())
    }

    /// Reads the records at `offsets` (ascending) of one partition: reads
    /// through gaps of up to [`READ_THROUGH_RECORDS`] other records and
    /// seeks over longer ones, so a stream whose records lie close together
    /// costs a few sequential fetches, and one spread thin costs a fetch
    /// per stretch, never one per record of the partition.
    async fn fetch_at(
        &self,
        topic: &str,
        partition: u32,
        offsets: &[u64],
        mut f: impl FnMut(&BorrowedMessage<'_>) -> Result<(), KafkaStoreError>,
    ) -> Result<(), KafkaStoreError> {
        let Some(first) = offsets.first() else { return Ok(()) };
        let consumer = create_consumer(&self.config, false, BOUNDED_FETCH_WAIT_MS)?;
        let assign = |at: u64| {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, partition as i32, Offset::Offset(at as i64))
                .and_then(|()| consumer.assign(&tpl))
                .map_err(|e| KafkaStoreError::from_kafka("assign", &e))
        };
        assign(*first)?;
        let idle = self.config.request_timeout;
        let mut deadline = Instant::now() + idle;
        let mut i = 0;
        let mut retries = 0;
        while i < offsets.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = match tokio::time::timeout(left, consumer.recv()).await {
                Err(_) => {
                    return Err(KafkaStoreError::Unavailable(format!(
                        "reading {topic}: record {partition}:{} not received within {idle:?}",
                        offsets[i]
                    )));
                }
                Ok(Err(e)) if e.rdkafka_error_code().is_some_and(is_transient) => continue,
                Ok(Err(e)) => return Err(KafkaStoreError::from_kafka(&format!("reading {topic}"), &e)),
                Ok(Ok(m)) => m,
            };
            deadline = Instant::now() + idle;
            let offset = u64::try_from(message.offset()).unwrap_or(0);
            let wanted = offsets[i];
            if offset < wanted {
                continue;
            }
            if offset > wanted {
                // Stale prefetch from before a jump, or the record is gone.
                retries += 1;
                if retries > 3 {
                    return Err(KafkaStoreError::Corrupt {
                        topic: topic.to_owned(),
                        position: Position::new(partition, wanted),
                        aggregate_id: None,
                        version: 0,
                        reason: "the record is missing from the partition".into(),
                    });
                }
                assign(wanted)?;
                continue;
            }
            retries = 0;
            f(&message)?;
            i += 1;
            if let Some(next) = offsets.get(i).filter(|n| **n > offset + READ_THROUGH_RECORDS) {
                assign(*next)?;
            }
        }
        Ok(())
    }

    /// At most `limit` events of `id` after version `after`, oldest first.
    ///
    /// The row knows the offsets of the aggregate's records, so only they
    /// are fetched (see [`Inner::fetch_at`]), and only those that can hold
    /// the page: record `i` (from 0) holds versions from `i + 1` on, so
    /// records from index `after + limit` on are never needed; when every
    /// record holds one event (most aggregates), record `i` is version
    /// `i + 1` and the page is exactly records `after..after + limit`.
    /// While the row's records are all in the read cache, nothing is
    /// fetched.
    async fn read_stream(
        self: &Arc<Self>,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Envelope<A::Event>>, StoreError> {
        let p = self.partition_checked(id)?;
        self.settle(p).await?;
        let Some((from, to, version, offsets, history)) = self.table().rows.get(id).map(|r| {
            let offsets = r.offsets.to_vec(r.first_offset);
            (r.first_offset, r.last_offset + 1, r.version, offsets, r.history.clone())
        }) else {
            return Ok(Vec::new());
        };
        if after >= version || limit == 0 {
            return Ok(Vec::new());
        }
        let wanted_end = after.saturating_add(u64::try_from(limit).unwrap_or(u64::MAX)).min(version);
        // Records selected: `skip..take` of the row's list.
        let one_per_record = offsets.len() as u64 == version;
        let skip = if one_per_record { usize::try_from(after).unwrap_or(usize::MAX) } else { 0 };
        let take = usize::try_from(wanted_end).unwrap_or(usize::MAX).min(offsets.len());
        let selected = offsets.get(skip..take).unwrap_or_default();

        let topic = self.events_topic.clone();
        let mut out: Vec<Envelope<A::Event>> = Vec::new();
        // The last version seen, kept or not: records continue it.
        let mut have: u64 = if one_per_record { after } else { 0 };
        let mut keep = |at: Position, key: Option<&[u8]>, value: Option<&[u8]>| -> Result<(), KafkaStoreError> {
            if key != Some(id.as_bytes()) {
                return Ok(());
            }
            let doc = EventsDoc::decode(&topic, at, key, value)?;
            if doc.last_version <= have || have >= wanted_end {
                return Ok(());
            }
            if doc.first_version != have + 1 {
                return Err(KafkaStoreError::Corrupt {
                    topic: topic.clone(),
                    position: at,
                    aggregate_id: Some(id.to_owned()),
                    version: doc.first_version,
                    reason: format!("versions after {have} are missing"),
                });
            }
            have = doc.last_version;
            for raw in doc.into_raw(&topic, at)? {
                let version = raw.version;
                if version <= after || version > wanted_end {
                    continue;
                }
                out.push(raw.decode(&*self.codec).map_err(|e| KafkaStoreError::Corrupt {
                    topic: topic.clone(),
                    position: at,
                    aggregate_id: Some(id.to_owned()),
                    version,
                    reason: e.to_string(),
                })?);
            }
            Ok(())
        };
        let cached = history.filter(|h| h.len() == offsets.len() && !h.is_empty());
        if let Some(history) = cached {
            for (value, offset) in history.iter().zip(&offsets).skip(skip).take(take.saturating_sub(skip)) {
                keep(Position::new(p, *offset), Some(id.as_bytes()), Some(value))?;
            }
        } else if offsets.is_empty() {
            self.scan(&topic, &[(p, from, to)], |m| keep(Position::new(p, m.offset() as u64), m.key(), m.payload()))
                .await?;
        } else {
            self.fetch_at(&topic, p, selected, |m| keep(Position::new(p, m.offset() as u64), m.key(), m.payload()))
                .await?;
        }
        Ok(out)
    }

    /// Start-up: the table from the table topic, then every events record it
    /// does not reflect yet, then table records for what that changed.
    async fn recover(self: &Arc<Self>) -> Result<(), KafkaStoreError> {
        let table_high = self.high_watermarks(&self.table_topic, self.table_partitions).await?;
        let mut docs: HashMap<String, TableDoc> = HashMap::new();
        let mut trustworthy = true;
        let ranges: Vec<_> = table_high.iter().enumerate().map(|(p, h)| (p as u32, 0, *h)).collect();
        let table_topic = self.table_topic.clone();
        self.scan(&table_topic, &ranges, |m| {
            let at = Position::new(m.partition() as u32, m.offset() as u64);
            match TableDoc::decode(&table_topic, at, m.key(), m.payload()) {
                Ok(Some(doc)) if doc.events_partition < self.partitions => {
                    let newer = docs.get(&doc.aggregate_id).is_none_or(|old| old.version <= doc.version);
                    if newer {
                        docs.insert(doc.aggregate_id.clone(), doc);
                    }
                }
                Ok(other) => {
                    tracing::warn!(topic = %table_topic, position = %at, tombstone = other.is_none(),
                        "table record KES did not write; rebuilding the table from the events topic");
                    trustworthy = false;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable table record; rebuilding the table from the events topic");
                    trustworthy = false;
                }
            }
            Ok(())
        })
        .await?;
        let mut rows: HashMap<Box<str>, Box<Row>> = HashMap::new();
        let mut from = vec![0u64; self.partitions as usize];
        if trustworthy {
            rows.reserve(docs.len());
            let mut scratch = Vec::with_capacity(1024);
            for (id, doc) in docs {
                // Typed once to check that it fits the model, then kept as
                // the JSON the model writes.
                let encoded =
                    serde_json::from_value::<A>(doc.state).and_then(|state| encode_state(&state, &mut scratch));
                let Ok((state, deleted)) = encoded else {
                    tracing::warn!(%id, "table state does not fit the aggregate's model; rebuilding from the events topic");
                    rows.clear();
                    from.iter_mut().for_each(|f| *f = 0);
                    break;
                };
                let slot = &mut from[doc.events_partition as usize];
                *slot = (*slot).max(doc.reflected_below);
                let keys = doc.idempotency_keys;
                rows.insert(
                    id.into_boxed_str(),
                    Box::new(Row {
                        state,
                        version: doc.version,
                        first_offset: doc.first_offset,
                        last_offset: doc.last_offset,
                        partition: doc.events_partition,
                        max_bytes: u32::try_from(doc.max_record_bytes).unwrap_or(u32::MAX),
                        offsets: Offsets::from_vec(doc.offsets, doc.first_offset),
                        keys: (!keys.is_empty()).then(|| Box::new(keys)),
                        history: None,
                        deleted,
                        table_writing: false,
                        table_stale: false,
                    }),
                );
            }
        }
        self.table().rows = rows;
        let events_high = self.high_watermarks(&self.events_topic, self.partitions).await?;
        let ranges: Vec<_> = events_high.iter().enumerate().map(|(p, h)| (p as u32, from[p], *h)).collect();
        let changed = self.replay(&ranges).await?;
        {
            let mut table = self.table();
            for (p, high) in events_high.iter().enumerate() {
                table.logs[p].end = *high;
            }
        }
        // Repair the table topic before taking commands, so that the table
        // records written from now on may claim everything below the head.
        let mut pending = Vec::new();
        {
            let table = self.table();
            for id in &changed {
                if let Some((doc, p)) = self.table_doc(&table, id) {
                    let reflected = from[p as usize];
                    pending.push(self.send_table_doc(TableDoc { reflected_below: reflected, ..doc })?.0);
                }
            }
        }
        for delivery in pending {
            match tokio::time::timeout(self.config.request_timeout + Duration::from_secs(1), delivery).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err((e, _)))) => return Err(KafkaStoreError::from_kafka("repairing the table topic", &e)),
                _ => return Err(KafkaStoreError::Unavailable("repairing the table topic: no acknowledgement".into())),
            }
        }
        {
            // Every row the replay moved has an acknowledged record now.
            let mut table = self.table();
            for (log, claimed) in table.logs.iter_mut().zip(&from) {
                log.unsaved.clear();
                log.claimed = *claimed;
            }
        }
        if !changed.is_empty() {
            tracing::info!(aggregates = changed.len(), topic = %self.events_topic, "table caught up from the events topic");
        }
        Ok(())
    }

    /// Applies the events records in `ranges` to the table (skipping those it
    /// already reflects) and returns the ids whose rows moved.
    async fn replay(&self, ranges: &[(u32, u64, u64)]) -> Result<HashSet<String>, KafkaStoreError> {
        let mut changed = HashSet::new();
        let topic = self.events_topic.clone();
        self.scan(&topic, ranges, |m| {
            let at = Position::new(m.partition() as u32, m.offset() as u64);
            let doc = EventsDoc::decode(&topic, at, m.key(), m.payload())?;
            let id = doc.aggregate_id.clone();
            let mut table = self.table();
            if self.apply_from_log(&mut table, doc, at, m.key_len() as u64, m.payload().unwrap_or_default())? {
                table.logs[at.partition as usize].unsaved.insert(at.offset, id.clone());
                changed.insert(id.clone());
            }
            let log = &mut table.logs[at.partition as usize];
            if at.offset + 1 >= log.end {
                log.end = at.offset + 1;
                log.last_id = Some(id);
            }
            Ok(())
        })
        .await?;
        Ok(changed)
    }

    /// Moves a row by one events record read from the log. `false` when the
    /// row already reflects it (a record this process applied on its
    /// acknowledgement, or a duplicate: the first record of a version wins).
    fn apply_from_log(
        &self,
        table: &mut Table<A>,
        doc: EventsDoc,
        at: Position,
        key_len: u64,
        value: &[u8],
    ) -> Result<bool, KafkaStoreError> {
        let size = key_len + value.len() as u64;
        let current = table.rows.get(doc.aggregate_id.as_str()).map_or(0, |r| r.version);
        if doc.last_version <= current {
            return Ok(false);
        }
        if doc.first_version != current + 1 {
            return Err(KafkaStoreError::Corrupt {
                topic: self.events_topic.clone(),
                position: at,
                aggregate_id: Some(doc.aggregate_id),
                version: doc.first_version,
                reason: format!("the stream is at version {current}: versions are missing before this record"),
            });
        }
        let key = doc.metadata.idempotency_key.clone();
        let last_version = doc.last_version;
        let id = doc.aggregate_id.clone();
        let raw = doc.into_raw(&self.events_topic, at)?;
        let mut events = Vec::with_capacity(raw.len());
        for e in raw {
            let event =
                self.codec.decode(&e.event_type, e.revision, &e.payload).map_err(|err| KafkaStoreError::Corrupt {
                    topic: self.events_topic.clone(),
                    position: at,
                    aggregate_id: Some(id.clone()),
                    version: e.version,
                    reason: err.to_string(),
                })?;
            events.push(event);
        }
        let unfit = |what: &str, err: serde_json::Error| KafkaStoreError::Corrupt {
            topic: self.events_topic.clone(),
            position: at,
            aggregate_id: Some(id.clone()),
            version: last_version,
            reason: format!("the aggregate's state {what}: {err}"),
        };
        let row = table.rows.entry(id.as_str().into()).or_insert_with(|| Box::new(Row::new(at)));
        let mut state: A = row.typed().map_err(|e| unfit("held by the table does not fit its model", e))?;
        for e in &events {
            state.apply(e);
        }
        let (state, deleted) = encode_state(&state, &mut Vec::new()).map_err(|e| unfit("cannot be serialised", e))?;
        row.advance(state, deleted, last_version, at, size);
        if let Some(key) = key {
            remember(row, key, last_version, at.offset, self.config.idempotency_keys_per_aggregate);
        }
        table.cache(&id, value, self.config.read_cache_bytes);
        Ok(true)
    }

    /// The table record of `id` as the table holds it now, and its events
    /// partition.
    fn table_doc(&self, table: &Table<A>, id: &str) -> Option<(TableDoc, u32)> {
        let row = table.rows.get(id)?;
        let p = row.partition;
        // The table wrote these bytes from a typed state: they are JSON.
        let state = serde_json::from_slice(&row.state).unwrap_or(serde_json::Value::Null);
        Some((
            TableDoc {
                format: Some(crate::record::TABLE_FORMAT.to_owned()),
                aggregate_type: A::NAME.to_owned(),
                aggregate_id: id.to_owned(),
                version: row.version,
                deleted: row.deleted,
                state,
                events_partition: p,
                first_offset: row.first_offset,
                last_offset: row.last_offset,
                offsets: row.offsets.to_vec(row.first_offset),
                max_record_bytes: u64::from(row.max_bytes),
                reflected_below: table.logs.get(p as usize).map_or(0, PartitionLog::reflected_below),
                idempotency_keys: row.keys.as_deref().cloned().unwrap_or_default(),
                updated_at: chrono::Utc::now(),
            },
            p,
        ))
    }

    /// Hands a table record to the producer. Called with the table locked,
    /// so that two records of one id enter the producer in the order their
    /// states were reached.
    fn send_table_doc(
        &self,
        doc: TableDoc,
    ) -> Result<(rdkafka::producer::DeliveryFuture, Arc<FutureProducer>), KafkaStoreError> {
        let value = serde_json::to_vec(&doc).map_err(|e| KafkaStoreError::Broker(format!("table record: {e}")))?;
        let partition = partition_for(&doc.aggregate_id, self.table_partitions) as i32;
        let mut record =
            FutureRecord::to(&self.table_topic).key(&doc.aggregate_id).payload(&value).partition(partition);
        if let Some(headers) = doc.headers() {
            record = record.headers(headers);
        }
        let producer = self.producer();
        let sent = producer.send_result(record).map_err(|(e, _)| KafkaStoreError::from_kafka("table record", &e))?;
        Ok((sent, producer))
    }

    /// After [`KafkaConfig::table_write_delay`], writes the current table
    /// record of `id` and, once the broker has it, forgets the events
    /// records it reflects; retries in the background until it succeeds or
    /// the store is dropped.
    ///
    /// One table record per id is waiting or in flight at a time: commands
    /// arriving meanwhile only mark the row stale, and the next record
    /// carries the latest state (a busy aggregate writes far fewer table
    /// records than events records, and its records can never overtake each
    /// other).
    fn save_row(self: &Arc<Self>, table: &mut Table<A>, id: &str) {
        let Some(row) = table.rows.get_mut(id) else { return };
        if row.table_writing {
            row.table_stale = true;
            return;
        }
        row.table_writing = true;
        row.table_stale = false;
        self.saves.fetch_add(1, Ordering::AcqRel);
        let delay = self.config.table_write_delay;
        if delay.is_zero() || self.flushing.load(Ordering::Acquire) > 0 {
            self.send_row(table, id);
            return;
        }
        let weak = Arc::downgrade(self);
        let id = id.to_owned();
        let mut hurry = self.hurry.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = hurry.changed() => {}
            }
            let Some(inner) = weak.upgrade() else { return };
            let mut table = inner.table();
            inner.send_row(&mut table, &id);
        });
    }

    /// Hands the table record of `id`, built now, to the producer, and
    /// follows it up: `row_saved` once acknowledged, retries otherwise.
    /// The row is marked `table_writing` and counted in `saves` already.
    fn send_row(self: &Arc<Self>, table: &mut Table<A>, id: &str) {
        if let Some(row) = table.rows.get_mut(id) {
            // The record carries whatever arrived while it waited.
            row.table_stale = false;
        }
        let Some((doc, p)) = self.table_doc(table, id) else {
            self.saves.fetch_sub(1, Ordering::AcqRel);
            return;
        };
        let (last, claims) = (doc.last_offset, doc.reflected_below);
        let sent = self.send_table_doc(doc);
        let weak = Arc::downgrade(self);
        let id = id.to_owned();
        tokio::spawn(async move {
            let outcome = match sent {
                Ok((delivery, producer)) => match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    _ => Err(Some(producer)),
                },
                Err(_) => Err(None),
            };
            let Some(inner) = weak.upgrade() else { return };
            match outcome {
                Ok(()) => inner.row_saved(p, &id, last, claims),
                Err(producer) => {
                    if let Some(producer) = producer {
                        inner.heal_producer(&producer, true);
                    }
                    drop(inner);
                    retry_save(weak.clone(), id).await;
                }
            }
            if let Some(inner) = weak.upgrade() {
                inner.saves.fetch_sub(1, Ordering::AcqRel);
            }
        });
    }

    /// The table record of `id` up to events offset `last` is acknowledged.
    /// The record claimed every events record below `claims`.
    fn row_saved(self: &Arc<Self>, p: u32, id: &str, last: u64, claims: u64) {
        let mut table = self.table();
        let log = &mut table.logs[p as usize];
        log.claimed = log.claimed.max(claims);
        log.forget_saved(id, last);
        let again = table.rows.get_mut(id).is_some_and(|r| {
            r.table_writing = false;
            std::mem::take(&mut r.table_stale)
        });
        if again {
            self.save_row(&mut table, id);
        }
    }

    /// Before using partition `p`: if a send to it ended without knowing
    /// whether the broker wrote the record, read the partition from there to
    /// its head so the table reflects what is really in the log.
    async fn settle(self: &Arc<Self>, p: u32) -> Result<(), KafkaStoreError> {
        if self.table().logs[p as usize].uncertain_from.is_none() {
            return Ok(());
        }
        let _one = self.resync[p as usize].lock().await;
        let Some(from) = self.table().logs[p as usize].uncertain_from.take() else { return Ok(()) };
        let result = async {
            let high = self.high_watermarks(&self.events_topic, self.partitions).await?[p as usize];
            let changed = self.replay(&[(p, from, high)]).await?;
            let mut table = self.table();
            for id in &changed {
                self.save_row(&mut table, id);
            }
            Ok::<_, KafkaStoreError>(())
        }
        .await;
        if result.is_err() {
            let mut table = self.table();
            let log = &mut table.logs[p as usize];
            log.uncertain_from = Some(log.uncertain_from.map_or(from, |u| u.min(from)));
        }
        result
    }

    /// The partition of an id after checking the id.
    fn partition_checked(&self, id: &str) -> Result<u32, StoreError> {
        if id.is_empty() || id.len() > 1024 {
            return Err(StoreError::Invalid("an aggregate id must have 1 to 1024 bytes".into()));
        }
        Ok(partition_for(id, self.partitions))
    }
}

impl PartitionLog {
    fn forget_saved(&mut self, id: &str, up_to: u64) {
        let saved: Vec<u64> = self.unsaved.range(..=up_to).filter(|(_, i)| i.as_str() == id).map(|(o, _)| *o).collect();
        for o in saved {
            self.unsaved.remove(&o);
        }
    }
}

async fn retry_save<A: Aggregate>(weak: Weak<Inner<A>>, id: String) {
    let mut delay = Duration::from_millis(500);
    loop {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
        let Some(inner) = weak.upgrade() else { return };
        let sent = {
            let table = inner.table();
            inner
                .table_doc(&table, &id)
                .map(|(doc, p)| (doc.last_offset, doc.reflected_below, p, inner.send_table_doc(doc)))
        };
        let Some((last, claims, p, sent)) = sent else { return };
        if let Ok((delivery, producer)) = sent {
            if matches!(delivery.await, Ok(Ok(_))) {
                inner.row_saved(p, &id, last, claims);
                return;
            }
            inner.heal_producer(&producer, true);
        }
        tracing::debug!(%id, "table record still not written; retrying");
    }
}

fn remember(row: &mut Row, key: String, version: u64, offset: u64, capacity: usize) {
    if capacity == 0 || row.key(&key).is_some() {
        return;
    }
    let keys = row.keys.get_or_insert_default();
    keys.push_back(KeyDoc { key, version, offset });
    while keys.len() > capacity {
        keys.pop_front();
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
        let inner = &self.inner;
        if events.is_empty() {
            return Err(StoreError::Invalid("an append needs at least one event".into()));
        }
        let p = inner.partition_checked(id)?;
        let _turn = inner.locks.lock(id).await;
        inner.settle(p).await?;
        let (actual, state) = {
            let table = inner.table();
            let row = table.rows.get(id);
            let first = metadata.idempotency_key.as_ref().zip(row).and_then(|(key, row)| row.key(key));
            if let Some(k) = first {
                return Ok(Appended { version: k.version, position: Position::new(p, k.offset), deduplicated: true });
            }
            // The bytes are copied out and typed after the table is unlocked.
            (row.map_or(0, |r| r.version), row.filter(|r| r.version > 0).map(|r| r.state.clone()))
        };
        let mut state = match state {
            Some(bytes) => typed_state::<A>(id, &bytes)?,
            None => A::default(),
        };
        if !expected.admits(actual) {
            return Err(StoreError::Conflict { aggregate: A::NAME.into(), id: id.into(), expected, actual });
        }
        let encoded = encode_all(&*inner.codec, &events)?;
        let outgoing = encoded
            .into_iter()
            .map(|e| OutgoingEvent { event_type: e.event_type.to_owned(), revision: e.revision, payload: e.payload })
            .collect();
        let key = metadata.idempotency_key.clone();
        let doc = EventsDoc::new(A::NAME, id, actual + 1, inner.codec.content_type(), outgoing, metadata)
            .map_err(StoreError::Invalid)?;
        let value = serde_json::to_vec(&doc).map_err(|e| StoreError::Invalid(e.to_string()))?;
        for e in &events {
            state.apply(e);
        }
        let (state, deleted) = encode_state(&state, &mut Vec::new())
            .map_err(|e| StoreError::Invalid(format!("the new state cannot be serialised as JSON: {e}")))?;

        let ticket = inner.tickets.fetch_add(1, Ordering::Relaxed);
        {
            let mut table = inner.table();
            let log = &mut table.logs[p as usize];
            let floor = log.end;
            log.in_flight.insert(ticket, floor);
        }
        let producer = inner.producer();
        let record = FutureRecord::to(&inner.events_topic)
            .key(id)
            .payload(&value)
            .partition(p as i32)
            .timestamp(doc.recorded_at.timestamp_millis())
            .headers(doc.headers());
        let timeout = inner.config.request_timeout;
        let sent = tokio::time::timeout(timeout * 2 + Duration::from_secs(1), producer.send(record, timeout)).await;
        let delivery = match sent {
            Ok(Ok(delivery)) => delivery,
            failed => {
                let mut table = inner.table();
                let log = &mut table.logs[p as usize];
                let floor = log.in_flight.remove(&ticket).unwrap_or(log.end);
                log.uncertain_from = Some(log.uncertain_from.map_or(floor, |u| u.min(floor)));
                drop(table);
                let error: StoreError = match failed {
                    Ok(Err((e, _))) => KafkaStoreError::from_kafka("append", &e).into(),
                    _ => StoreError::Unavailable(format!("append: no acknowledgement within {:?}", timeout * 2)),
                };
                inner.heal_producer(&producer, error.is_transient());
                return Err(error);
            }
        };
        let position =
            Position::new(u32::try_from(delivery.partition).unwrap_or(p), u64::try_from(delivery.offset).unwrap_or(0));
        let mut table = inner.table();
        let log = &mut table.logs[p as usize];
        log.in_flight.remove(&ticket);
        if position.offset + 1 >= log.end {
            log.end = position.offset + 1;
            log.last_id = Some(id.to_owned());
        }
        log.unsaved.insert(position.offset, id.to_owned());
        let capacity = inner.config.idempotency_keys_per_aggregate;
        let row = table.rows.entry(id.into()).or_insert_with(|| Box::new(Row::new(position)));
        // A resynchronisation may have read this very record already.
        if row.version == actual {
            row.advance(state, deleted, doc.last_version, position, (id.len() + value.len()) as u64);
            if let Some(key) = key {
                remember(row, key, doc.last_version, position.offset, capacity);
            }
            table.cache(id, &value, inner.config.read_cache_bytes);
        }
        inner.save_row(&mut table, id);
        Ok(Appended { version: doc.last_version, position, deduplicated: false })
    }

    async fn flush(&self) -> Result<(), StoreError> {
        KafkaStore::flush(self, self.inner.config.request_timeout * 2).await.map_err(StoreError::from)
    }

    async fn recall(&self, id: &str, idempotency_key: &str) -> Result<Option<Appended>, StoreError> {
        let p = self.inner.partition_checked(id)?;
        self.inner.settle(p).await?;
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
        self.inner.settle(p).await?;
        // The bytes are copied out and typed after the table is unlocked.
        let Some((bytes, version)) = self.inner.table().rows.get(id).map(|r| (r.state.clone(), r.version)) else {
            return Ok(None);
        };
        let state = if version == 0 { A::default() } else { typed_state::<A>(id, &bytes)? };
        Ok(Some(Snapshot { state, version }))
    }

    async fn load_document(&self, id: &str) -> Result<Option<StateDocument>, StoreError> {
        let p = self.inner.partition_checked(id)?;
        self.inner.settle(p).await?;
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
        let inner = &self.inner;
        let consumer = create_consumer(&inner.config, false, FOLLOW_FETCH_WAIT_MS)?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..inner.partitions {
            let next = from.next_offset(p);
            let offset =
                if next == 0 { Offset::Beginning } else { Offset::Offset(i64::try_from(next).unwrap_or(i64::MAX)) };
            tpl.add_partition_offset(&inner.events_topic, p as i32, offset)
                .map_err(|e| StoreError::from(KafkaStoreError::from_kafka("subscribe", &e)))?;
        }
        consumer.assign(&tpl).map_err(|e| StoreError::from(KafkaStoreError::from_kafka("subscribe", &e)))?;
        let reader = Reader { consumer, topic: inner.events_topic.clone(), codec: Arc::clone(&inner.codec) };
        let stream = stream::unfold(reader, |reader| async move {
            let item = reader.next().await;
            Some((item, reader))
        });
        Ok(Box::pin(stream))
    }

    async fn head(&self) -> Result<Checkpoint, StoreError> {
        let marks = self.inner.high_watermarks(&self.inner.events_topic, self.inner.partitions).await?;
        let mut head = Checkpoint::start();
        for (p, high) in marks.into_iter().enumerate() {
            if high > 0 {
                head.set_next(p as u32, high);
            }
        }
        Ok(head)
    }
}

/// The consumer behind one subscription.
struct Reader<E> {
    consumer: StreamConsumer,
    topic: String,
    codec: Arc<dyn Codec<E>>,
}

impl<E: 'static> Reader<E> {
    /// The next record's events. Transient consumer errors are left to
    /// librdkafka, which reconnects by itself; the stream just waits.
    async fn next(&self) -> Result<Vec<Envelope<E>>, StoreError> {
        loop {
            match self.consumer.recv().await {
                Ok(m) => {
                    let at = Position::new(m.partition() as u32, m.offset() as u64);
                    let doc = EventsDoc::decode(&self.topic, at, m.key(), m.payload())?;
                    return doc.into_raw(&self.topic, at)?.into_iter().map(|raw| raw.decode(&*self.codec)).collect();
                }
                Err(e) if e.rdkafka_error_code().is_some_and(is_transient) => {
                    tracing::debug!(topic = %self.topic, error = %e, "subscription waiting for the broker");
                }
                Err(e) => return Err(KafkaStoreError::from_kafka("subscription", &e).into()),
            }
        }
    }
}

/// Per-id async locks whose entries disappear when unused: one writer per
/// aggregate in this process, never a global lock.
#[derive(Default)]
struct IdLocks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

struct IdGuard<'a> {
    locks: &'a IdLocks,
    id: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl IdLocks {
    async fn lock(&self, id: &str) -> IdGuard<'_> {
        let lock = self.map.lock().unwrap_or_else(|p| p.into_inner()).entry(id.to_owned()).or_default().clone();
        IdGuard { locks: self, id: id.to_owned(), guard: Some(lock.lock_owned().await) }
    }
}

impl Drop for IdGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.locks.map.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map and this guard hold it: nobody waits, the entry can go.
        if map.get(&self.id).is_some_and(|l| Arc::strong_count(l) == 2) {
            map.remove(&self.id);
        }
        self.guard.take();
    }
}

impl From<KafkaStoreError> for kes_core::ProjectionError {
    fn from(e: KafkaStoreError) -> Self {
        kes_core::ProjectionError::Store(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(pairs: &[(&str, &str)]) -> HashMap<String, Option<String>> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), Some((*v).to_owned()))).collect()
    }

    #[test]
    fn events_topic_configs_that_could_lose_events_are_refused_by_name() {
        let ok = [("cleanup.policy", "delete"), ("retention.ms", "31536000000000"), ("retention.bytes", "-1")];
        let min = crate::config::THOUSAND_YEARS_MS;
        check_events_config("t", &entries(&ok), min).unwrap();
        let cases: [(&str, &str, &str); 6] = [
            ("cleanup.policy", "compact", "cleanup.policy"),
            ("cleanup.policy", "compact,delete", "cleanup.policy"),
            ("retention.ms", "-1", "retention.ms"),
            ("retention.ms", "604800000", "retention.ms"),
            ("retention.ms", "soon", "retention.ms"),
            ("retention.bytes", "1073741824", "retention.bytes"),
        ];
        for (name, value, setting) in cases {
            let mut e = entries(&ok);
            e.insert(name.to_owned(), Some(value.to_owned()));
            match check_events_config("t", &e, min) {
                Err(KafkaStoreError::UnsafeTopic { setting: s, value: v, .. }) => {
                    assert_eq!((s.as_str(), v.as_str()), (setting, value));
                }
                other => panic!("{name}={value}: {other:?}"),
            }
        }
        let mut missing = entries(&ok);
        missing.remove("retention.bytes");
        assert!(check_events_config("t", &missing, min).unwrap_err().to_string().contains("retention.bytes"));
    }

    #[test]
    fn table_topic_must_be_compacted_only() {
        check_table_config("t", &entries(&[("cleanup.policy", "compact")])).unwrap();
        assert!(check_table_config("t", &entries(&[("cleanup.policy", "delete")])).is_err());
        assert!(check_table_config("t", &entries(&[("cleanup.policy", "compact,delete")])).is_err());
        assert!(check_table_config("t", &HashMap::new()).is_err());
    }

    #[test]
    fn offsets_lists_round_trip_and_cost_nothing_for_one_record() {
        assert_eq!(Offsets::from_vec(vec![], 5), Offsets::Unknown);
        assert_eq!(Offsets::from_vec(vec![5], 5), Offsets::First);
        assert_eq!(Offsets::from_vec(vec![4], 5), Offsets::Many(vec![4]), "kept as written");
        for list in [vec![], vec![5], vec![5, 9, 12]] {
            assert_eq!(Offsets::from_vec(list.clone(), 5).to_vec(5), list);
        }
        let mut offsets = Offsets::First;
        offsets.push(5, 9);
        offsets.push(5, 12);
        assert_eq!(offsets.to_vec(5), [5, 9, 12]);
        let mut unknown = Offsets::Unknown;
        unknown.push(5, 9);
        assert_eq!(unknown, Offsets::Unknown, "an unknown list stays unknown");
    }

    #[test]
    fn a_row_moves_record_by_record() {
        use kes_core::conformance::Ledger;
        let mut scratch = Vec::new();
        let mut row = Row::new(Position::new(2, 7));
        assert_eq!(row.typed::<Ledger>().unwrap(), Ledger::default());
        let opened = Ledger { open: true, ..Ledger::default() };
        let (state, deleted) = encode_state(&opened, &mut scratch).unwrap();
        row.advance(state, deleted, 1, Position::new(2, 7), 300);
        assert_eq!((row.version, row.first_offset, row.last_offset, row.partition), (1, 7, 7, 2));
        assert_eq!((row.offsets.clone(), row.max_bytes, row.deleted), (Offsets::First, 300, false));
        let closed = Ledger { closed: true, total: 3, entries: 2, ..opened };
        let (state, deleted) = encode_state(&closed, &mut scratch).unwrap();
        assert_eq!(&*state, serde_json::to_vec(&closed).unwrap().as_slice(), "compact JSON, exact size");
        row.advance(state, deleted, 3, Position::new(2, 11), 1 << 40);
        assert_eq!(row.typed::<Ledger>().unwrap(), closed);
        assert_eq!((row.version, row.first_offset, row.last_offset), (3, 7, 11));
        assert_eq!((row.offsets.to_vec(row.first_offset), row.max_bytes, row.deleted), (vec![7, 11], u32::MAX, true));
        let mut keyed = row;
        remember(&mut keyed, "k".into(), 3, 11, 1);
        remember(&mut keyed, "k".into(), 3, 11, 1);
        assert_eq!(keyed.key("k").map(|k| (k.version, k.offset)), Some((3, 11)));
        remember(&mut keyed, "l".into(), 4, 12, 1);
        assert!(keyed.key("k").is_none() && keyed.key("l").is_some(), "only the last keys are remembered");
    }

    #[test]
    fn a_stored_state_that_does_not_fit_the_model_is_a_typed_error() {
        use kes_core::conformance::Ledger;
        for bytes in [&br#"{"open":"yes"}"#[..], b"{not json", b""] {
            match typed_state::<Ledger>("a-1", bytes) {
                Err(StoreError::Corrupt { id, version: 0, reason, .. }) => {
                    assert_eq!(id, "a-1");
                    assert!(reason.contains("model"), "{reason}");
                }
                other => panic!("expected Corrupt, got {other:?}"),
            }
        }
    }

    #[test]
    fn reflected_below_never_passes_unsaved_in_flight_or_uncertain_records() {
        let mut log = PartitionLog { end: 10, ..PartitionLog::default() };
        assert_eq!(log.reflected_below(), 10);
        log.in_flight.insert(1, 8);
        assert_eq!(log.reflected_below(), 8);
        log.unsaved.insert(5, "a".into());
        log.unsaved.insert(7, "b".into());
        assert_eq!(log.reflected_below(), 5);
        log.forget_saved("a", 6);
        assert_eq!(log.reflected_below(), 7);
        log.uncertain_from = Some(2);
        assert_eq!(log.reflected_below(), 2);
    }
}
