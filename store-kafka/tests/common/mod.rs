//! What the Kafka tests share: the broker address, fresh topic prefixes,
//! and the skip-or-fail rule for a missing broker.

#![allow(dead_code)]

use std::time::Duration;

use kes_core::conformance::Ledger;
use kes_store_kafka::{KafkaConfig, KafkaStore};

/// The broker under test, or `None` (printed) when there is none outside CI.
pub fn brokers() -> Option<String> {
    match std::env::var("KES_TEST_KAFKA_BROKERS") {
        Ok(b) if !b.trim().is_empty() => Some(b),
        _ if std::env::var_os("CI").is_some() => {
            panic!(
                "CI is set but KES_TEST_KAFKA_BROKERS is not: start a broker with scripts/kafka-broker.sh start PORT DIR"
            )
        }
        _ => {
            eprintln!("skipped: KES_TEST_KAFKA_BROKERS is not set (scripts/kafka-broker.sh start PORT DIR)");
            None
        }
    }
}

/// A topic prefix no other test uses.
pub fn unique_prefix() -> String {
    format!("kes-test-{}", uuid::Uuid::new_v4().simple())
}

/// A configuration for fresh topics on the test broker.
pub fn config(brokers: &str, partitions: u32) -> KafkaConfig {
    let mut config = KafkaConfig::new(brokers, unique_prefix());
    config.partitions = partitions;
    config.request_timeout = Duration::from_secs(30);
    config
}

/// Connects, or skips (outside CI) / fails (in CI) when the broker does not
/// answer.
pub async fn connect(config: KafkaConfig) -> Option<KafkaStore<Ledger>> {
    match KafkaStore::connect(config).await {
        Ok(store) => Some(store),
        Err(e) if std::env::var_os("CI").is_some() => panic!("the test broker is unusable: {e}"),
        Err(e) => {
            eprintln!("skipped: the test broker is unusable: {e}");
            None
        }
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

/// A store that holds the broker turn for as long as any clone lives.
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
    async fn read(
        &self,
        id: &str,
    ) -> Result<Vec<kes_core::Envelope<kes_core::conformance::LedgerEvent>>, kes_core::StoreError> {
        self.store.read(id).await
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
}

/// A fresh store on its own topics, holding the broker turn.
pub async fn fresh_turned(partitions: u32) -> Option<Turned> {
    let turn = turn().await;
    let store = fresh(partitions).await?;
    Some(Turned { store, _turn: std::sync::Arc::new(turn) })
}
