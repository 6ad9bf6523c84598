//! What the Kafka tests share: the broker address, fresh topic prefixes,
//! and the skip-or-fail rule for a missing broker.

#![allow(dead_code)]

use std::time::Duration;

use kes_core::conformance::Ledger;
use kes_store_kafka::{KafkaStore, KafkaStoreConfig, KafkaStoreError};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic};
use rdkafka::client::DefaultClientContext;

/// The broker under test, or `None` when there is none (skipped, or failed
/// under CI, by the workspace's one rule in kes-test-support).
pub fn brokers() -> Option<String> {
    kes_test_support::kafka_brokers()
}

/// A topic prefix no other test uses.
pub fn unique_prefix() -> String {
    kes_test_support::unique_prefix("kafka")
}

/// Creates `topics` on the test broker, as an operator would before a store
/// starts; each must be created.
pub async fn create_topics<'a>(brokers: &str, topics: &'a [NewTopic<'a>]) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin");
    for r in admin.create_topics(topics, &AdminOptions::new()).await.expect("create") {
        r.expect("topic created");
    }
}

/// A configuration for fresh topics on the test broker.
pub fn config(brokers: &str, partitions: u32) -> KafkaStoreConfig {
    let mut config = KafkaStoreConfig::new(brokers, unique_prefix());
    config.partitions = partitions;
    config.request_timeout = Duration::from_secs(30);
    config
}

/// Connects, or skips (outside CI) / fails (in CI) when the broker does not
/// answer. Any other error (a configuration the store refuses, a topic it
/// finds unsafe) is the test's own fault and fails it everywhere.
pub async fn connect(config: KafkaStoreConfig) -> Option<KafkaStore<Ledger>> {
    match KafkaStore::open(config).await {
        Ok(store) => Some(store),
        Err(e @ (KafkaStoreError::Unavailable(_) | KafkaStoreError::Broker(_))) => {
            kes_test_support::missing("a usable Kafka broker", &e.to_string())
        }
        Err(e) => panic!("the store refused to start: {e}"),
    }
}

/// A fresh, empty store on its own topics.
pub async fn fresh(partitions: u32) -> Option<KafkaStore<Ledger>> {
    let brokers = brokers()?;
    connect(config(&brokers, partitions)).await
}

/// Kafka tests of one binary take turns: Tansu 0.6.0 serves records slowly
/// and, when produce requests queue up behind fetches long enough for
/// librdkafka to time messages out and bump its producer epoch locally, its
/// SQLite engine panics and stops serving. One test at a time keeps it well
/// below that load.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits for this test's turn on the broker.
pub async fn turn() -> tokio::sync::MutexGuard<'static, ()> {
    TURN.lock().await
}

/// A store that holds the broker turn for as long as any clone lives. It
/// forwards every method, provided ones included, so that the suites test
/// the Kafka store's own `read_page`, `load_document`, `ping` and `flush`
/// rather than the trait's defaults.
#[derive(Clone)]
pub struct Turned {
    store: KafkaStore<Ledger>,
    _turn: std::sync::Arc<tokio::sync::MutexGuard<'static, ()>>,
}

#[async_trait::async_trait]
impl kes_core::EventStore<Ledger> for Turned {
    async fn append(
        &self,
        id: &str,
        expected: kes_core::ExpectedVersion,
        events: Vec<kes_core::conformance::LedgerEvent>,
        metadata: kes_core::Metadata,
    ) -> Result<kes_core::Appended, kes_core::StoreError> {
        self.store.append(id, expected, events, metadata).await
    }
    async fn recall(&self, id: &str, key: &str) -> Result<Option<kes_core::Appended>, kes_core::StoreError> {
        self.store.recall(id, key).await
    }
    async fn load(&self, id: &str) -> Result<Option<kes_core::Snapshot<Ledger>>, kes_core::StoreError> {
        self.store.load(id).await
    }
    async fn load_document(&self, id: &str) -> Result<Option<kes_core::StateDocument>, kes_core::StoreError> {
        self.store.load_document(id).await
    }
    async fn read(
        &self,
        id: &str,
    ) -> Result<Vec<kes_core::Envelope<kes_core::conformance::LedgerEvent>>, kes_core::StoreError> {
        self.store.read(id).await
    }
    async fn read_page(
        &self,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<kes_core::Envelope<kes_core::conformance::LedgerEvent>>, kes_core::StoreError> {
        self.store.read_page(id, after, limit).await
    }
    async fn subscribe(
        &self,
        from: kes_core::Checkpoint,
    ) -> Result<kes_core::EventStream<kes_core::conformance::LedgerEvent>, kes_core::StoreError> {
        self.store.subscribe(from).await
    }
    async fn head(&self) -> Result<kes_core::Checkpoint, kes_core::StoreError> {
        self.store.head().await
    }
    async fn ping(&self) -> Result<(), kes_core::StoreError> {
        kes_core::EventStore::ping(&self.store).await
    }
    async fn flush(&self) -> Result<(), kes_core::StoreError> {
        kes_core::EventStore::flush(&self.store).await
    }
}

/// A fresh store on its own topics, holding the broker turn.
pub async fn fresh_turned(partitions: u32) -> Option<Turned> {
    let turn = turn().await;
    let store = fresh(partitions).await?;
    Some(Turned { store, _turn: std::sync::Arc::new(turn) })
}
