//! Table records written by another `Aggregate::STATE_VERSION` make the
//! store rebuild its table from the events topic at start, and say so in
//! its gauges; the records it writes then carry the new version.

mod common;

use std::time::Duration;

use kes_core::conformance::{LedgerEvent, LedgerV2};
use kes_core::{EventStore, ExpectedVersion, Metadata, StoreGauge};
use kes_store_kafka::KafkaStore;

fn gauge(gauges: &[StoreGauge], name: &str) -> f64 {
    gauges.iter().find(|g| g.name == name).map(|g| g.value).unwrap_or_else(|| panic!("no gauge {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_records_of_another_state_version_are_rebuilt_from_the_log() {
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let config = common::config(&brokers, 2);

    let Some(v1) = common::connect(config.clone()).await else { return };
    for (id, amounts) in [("a", vec![5, 40, 7]), ("b", vec![3])] {
        let mut events = vec![LedgerEvent::Opened];
        events.extend(amounts.into_iter().map(|amount| LedgerEvent::Added { amount }));
        v1.append(id, ExpectedVersion::NoStream, events, Metadata::default()).await.expect("append");
    }
    assert_eq!(gauge(&v1.gauges(), "table_rebuilt_from_state_version"), 0.0);
    // Table records of every row, written by the version-1 store.
    v1.flush(Duration::from_secs(30)).await.expect("flush");
    drop(v1);

    let v2 = KafkaStore::<LedgerV2>::open(config.clone()).await.expect("connect v2");
    let gauges = v2.gauges();
    assert_eq!(gauge(&gauges, "table_state_version"), 2.0);
    assert_eq!(gauge(&gauges, "table_rebuilt_from_state_version"), 1.0, "the v1 records were not trusted");
    let a = v2.load("a").await.expect("load").expect("a");
    // A table trusted as it was would answer largest = 0 (the v1 state).
    assert_eq!((a.state.largest, a.state.total, a.version), (40, 52, 4));
    assert_eq!(v2.load("b").await.expect("load").expect("b").state.largest, 3);
    let appended = v2
        .append("a", ExpectedVersion::Exact(4), vec![LedgerEvent::Added { amount: 90 }], Metadata::default())
        .await
        .expect("append on the rebuilt table");
    assert_eq!(appended.version, 5);
    v2.flush(Duration::from_secs(30)).await.expect("flush");
    drop(v2);

    // The records now carry version 2: the next start trusts them.
    let again = KafkaStore::<LedgerV2>::open(config).await.expect("reconnect v2");
    assert_eq!(gauge(&again.gauges(), "table_rebuilt_from_state_version"), 0.0);
    assert_eq!(again.load("a").await.expect("load").expect("a").state.largest, 90);
}
