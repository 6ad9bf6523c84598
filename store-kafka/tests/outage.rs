//! The broker stops and starts during a run: typed errors while it is down,
//! success after, no acknowledged command lost. Runs its own broker through
//! `scripts/kafka-broker.sh` on a free port and a temp dir (the shared test
//! broker keeps serving the other tests).

mod common;

use std::time::{Duration, Instant};

use kes_core::conformance::{Ledger, LedgerEvent};
use kes_core::{EventStore, ExpectedVersion, Metadata, StoreError};
use kes_store_kafka::{KafkaStore, KafkaStoreConfig};

async fn append_one(store: &KafkaStore<Ledger>, version: u64) -> Result<u64, StoreError> {
    let event = if version == 0 { LedgerEvent::Opened } else { LedgerEvent::Added { amount: 1 } };
    store.append("o-1", ExpectedVersion::Exact(version), vec![event], Metadata::default()).await.map(|a| a.version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_gives_typed_errors_then_recovers_without_losing_commands() {
    let Some(own) = kes_test_support::OwnBroker::start() else { return };
    let mut config = KafkaStoreConfig::new(own.address(), common::unique_prefix());
    config.partitions = 1;
    config.request_timeout = Duration::from_secs(3);
    let store = KafkaStore::<Ledger>::open(config.clone()).await.expect("connect");
    let mut acknowledged = 0;
    for _ in 0..5 {
        acknowledged = append_one(&store, acknowledged).await.expect("append while up");
    }

    own.down();
    // The broker stays down until both calls have answered. A call bounded
    // by the request timeout fails after a few of them; one that waits for
    // the broker to come back never answers, and one left to librdkafka's
    // own delivery timeout (five minutes) answers far later. The bound tells
    // these apart with room to spare, so a slow machine only waits longer.
    let bound = config.request_timeout * 40;
    let started = Instant::now();
    let down = tokio::time::timeout(bound, append_one(&store, acknowledged))
        .await
        .unwrap_or_else(|_| panic!("an append still waited for the stopped broker after {bound:?}"));
    eprintln!("the append failed after {:?} (request timeout {:?})", started.elapsed(), config.request_timeout);
    match down {
        Err(e @ StoreError::Unavailable(_)) => assert!(e.is_transient()),
        other => panic!("expected Unavailable while the broker is down, got {other:?}"),
    }
    let head = tokio::time::timeout(bound, store.head())
        .await
        .unwrap_or_else(|_| panic!("head still waited for the stopped broker after {bound:?}"));
    assert!(matches!(head, Err(StoreError::Unavailable(_))), "expected Unavailable from head, got {head:?}");

    own.up();
    // The store heals by itself: keep trying the same command.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        match append_one(&store, acknowledged).await {
            Ok(v) => {
                acknowledged = v;
                break;
            }
            Err(StoreError::Unavailable(e)) if Instant::now() < deadline => {
                eprintln!("still down: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("the store did not recover: {e}"),
        }
    }
    for _ in 0..3 {
        acknowledged = append_one(&store, acknowledged).await.expect("append after recovery");
    }
    assert_eq!(acknowledged, 9);
    let history = store.read("o-1").await.expect("read");
    assert_eq!(history.iter().map(|e| e.version).collect::<Vec<_>>(), (1..=9).collect::<Vec<_>>());
    store.flush(Duration::from_secs(120)).await.expect("flush");
    drop(store);
    let again = KafkaStore::<Ledger>::open(config).await.expect("restart the store");
    let snapshot = again.load("o-1").await.expect("load").expect("exists");
    assert_eq!((snapshot.version, snapshot.state.entries), (9, 8), "an acknowledged command was lost");
}
