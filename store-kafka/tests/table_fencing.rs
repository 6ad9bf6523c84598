//! The table topic with several instances: a stale owner's late table
//! record never makes a reader's table wrong, a reader whose picture of a
//! stream has a gap rebuilds the stream instead of voiding a valid record,
//! and an idempotent retry through another instance appends once.

mod common;

use std::time::Duration;

use kes_core::conformance::{Ledger, LedgerCommand, LedgerEvent};
use kes_core::{CommandBus, EventStore, ExpectedVersion, Metadata};
use kes_store_kafka::KafkaStore;
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

fn raw_producer(brokers: &str) -> FutureProducer {
    ClientConfig::new().set("bootstrap.servers", brokers).create().expect("producer")
}

/// Appends `Opened` then `Added` × (`versions` − 1) to `id`.
async fn write(store: &KafkaStore<Ledger>, id: &str, versions: u64) {
    store.append(id, ExpectedVersion::NoStream, vec![LedgerEvent::Opened], Metadata::default()).await.expect("open");
    for v in 1..versions {
        let added = vec![LedgerEvent::Added { amount: v as i64 }];
        store.append(id, ExpectedVersion::Exact(v), added, Metadata::default()).await.expect("add");
    }
}

/// Polls until `store` owns partition 0, and answers its epoch.
async fn owner_epoch(store: &KafkaStore<Ledger>) -> u64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some((_, epoch)) = store.owned_partitions().into_iter().find(|(p, _)| *p == 0) {
            return epoch;
        }
        assert!(tokio::time::Instant::now() < deadline, "the store never became the owner of partition 0");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A table record for `id` at `version` as an instance of `epoch` would
/// write it, claiming every events record below `reflected_below`.
fn table_record(id: &str, version: u64, epoch: u64, reflected_below: u64, state: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "format": "kes.table.v1", "aggregate_type": "ledger", "aggregate_id": id, "version": version,
        "deleted": false, "state": state, "events_partition": 0, "first_offset": 0, "last_offset": 0,
        "offsets": [0], "max_record_bytes": 0, "reflected_below": reflected_below, "epoch": epoch,
        "idempotency_keys": [], "updated_at": chrono::Utc::now()
    }))
    .expect("json")
}

async fn produce(brokers: &str, topic: &str, key: &str, value: &[u8], headers: Option<OwnedHeaders>) {
    let mut record = FutureRecord::to(topic).key(key).payload(value).partition(0);
    if let Some(h) = headers {
        record = record.headers(h);
    }
    raw_producer(brokers).send(record, Duration::from_secs(10)).await.expect("raw produce");
}

/// Pitfall: compaction keeps a key's last record, so a table record that an
/// owner sent before losing its partition and that landed after the new
/// owner's would outlive the new owner's. The new tenure's marker fences it:
/// a reader starting from the table topic ends with the same state as the
/// store that followed the log from offset 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owners_late_table_record_does_not_mislead_a_reader() {
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let config = common::config(&brokers, 1);
    let Some(store) = common::connect(config.clone()).await else { return };
    let epoch = owner_epoch(&store).await;
    write(&store, "k", 3).await;
    write(&store, "other", 1).await;
    store.flush(WAIT).await.expect("flush");
    let followed = store.load("k").await.expect("load").expect("k");
    assert_eq!(followed.version, 3);
    // Another instance takes the partition over (its marker), then the old
    // owner's record of k at version 1, built long ago, lands: it claims
    // the whole events partition, as a late record of a busy owner would.
    let head = store.head().await.expect("head").next_offset(0);
    let marker = serde_json::to_vec(&json!({
        "format": "kes.epoch.v1", "events_partition": 0, "epoch": epoch + 1,
        "owner": uuid::Uuid::new_v4(), "claimed_at": chrono::Utc::now()
    }))
    .expect("json");
    let marker_headers = OwnedHeaders::new().insert(Header { key: "kes.marker", value: Some("epoch") });
    let table = store.table_topic().to_owned();
    produce(&brokers, &table, &format!("\u{0}kes.epoch/0/{}", epoch + 1), &marker, Some(marker_headers)).await;
    let stale = table_record("k", 1, epoch, head, json!({"open": true, "closed": false, "total": 0, "entries": 0}));
    produce(&brokers, &table, "k", &stale, None).await;
    drop(store);

    let reader = KafkaStore::<Ledger>::open(config).await.expect("a reader starting from the table topic");
    let k = reader.load("k").await.expect("load").expect("k");
    assert_eq!((k.version, &k.state), (followed.version, &followed.state), "the stale record misled the reader");
    assert_eq!(reader.read("k").await.expect("read").len(), 3);
    assert_eq!(reader.load("other").await.expect("load").map(|s| s.version), Some(1));
}

/// Pitfall: a gap is never a verdict. A reader whose row of a stream is
/// older than its table record claimed (a trusted record that lies, here
/// written by hand) sees the stream's next record skip versions: it
/// rebuilds the stream from the log, and the record counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_rebuilds_the_stream_instead_of_voiding_the_record() {
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let config = common::config(&brokers, 1);
    let Some(writer) = common::connect(config.clone()).await else { return };
    let epoch = owner_epoch(&writer).await;
    write(&writer, "g", 3).await;
    writer.flush(WAIT).await.expect("flush");
    let head = writer.head().await.expect("head").next_offset(0);
    // The current tenure's epoch: trusted, yet it says version 1 while
    // claiming every record below the head.
    let lying = table_record("g", 1, epoch, head, json!({"open": true, "closed": false, "total": 0, "entries": 0}));
    produce(&brokers, writer.table_topic(), "g", &lying, None).await;
    let reader = KafkaStore::<Ledger>::open(config).await.expect("reader");
    // The next record of g (version 4) reaches the reader's follower.
    let added = vec![LedgerEvent::Added { amount: 40 }];
    let appended = writer.append("g", ExpectedVersion::Exact(3), added, Metadata::default()).await.expect("append");
    assert!(reader.wait_applied(appended.position, WAIT).await, "the reader did not apply version 4");
    let g = reader.load("g").await.expect("load").expect("g");
    let expected = writer.load("g").await.expect("load").expect("g");
    assert_eq!((g.version, &g.state), (4, &expected.state));
    assert_eq!(reader.read("g").await.expect("read").len(), 4);
    assert_eq!(reader.follower_stats().void_records, 0, "a gap must never void a valid record");
}

/// Pitfall: idempotency across instances. A command retried through
/// another instance (its first answer lost on the way back) is answered
/// as the first one was, and appends once — also while the second
/// instance has not seen the first record yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_through_another_instance_appends_once() {
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let config = common::config(&brokers, 1);
    let Some(a) = common::connect(config.clone()).await else { return };
    let b = KafkaStore::<Ledger>::open(config).await.expect("second instance");
    let (bus_a, bus_b) = (CommandBus::new(a.clone()), CommandBus::new(b.clone()));
    bus_a.execute("i", LedgerCommand::Open, ExpectedVersion::NoStream, Metadata::default()).await.expect("open");
    for n in 0..20 {
        let key = format!("retry-{n}");
        let meta = || Metadata { idempotency_key: Some(key.clone()), ..Metadata::default() };
        let first = bus_a.execute("i", LedgerCommand::Add(n), ExpectedVersion::Any, meta()).await.expect("first");
        // At once through the other instance, whose follower may lag.
        let retry = bus_b.execute("i", LedgerCommand::Add(n), ExpectedVersion::Any, meta()).await.expect("retry");
        assert!(retry.deduplicated, "retry {n} appended again");
        assert_eq!((retry.version, retry.position), (first.version, first.position), "retry {n}");
    }
    let history = a.read("i").await.expect("read");
    assert_eq!(history.len(), 21, "one event per command, whatever the retries");
    let at = a.head().await.expect("head").next_offset(0);
    assert!(b.wait_applied(kes_core::Position::new(0, at - 1), WAIT).await);
    assert_eq!(b.read("i").await.expect("read"), history);
}

/// Who owns which partition's table records, over `stores`: partition →
/// (store index, epoch) for every tenure held now.
fn owners(stores: &[&KafkaStore<Ledger>]) -> Vec<(u32, usize, u64)> {
    let mut all: Vec<(u32, usize, u64)> = stores
        .iter()
        .enumerate()
        .flat_map(|(i, s)| s.owned_partitions().into_iter().map(move |(p, e)| (p, i, e)))
        .collect();
    all.sort_unstable();
    all
}

/// Polls until every partition of `partitions` has exactly one owner among
/// `stores` and every store owns one at least (the group's assignment
/// once every member joined: right after a start, the first member may
/// hold everything until the others join), and answers the tenures.
async fn settled_owners(stores: &[&KafkaStore<Ledger>], partitions: u32, within: Duration) -> Vec<(u32, usize, u64)> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let all = owners(stores);
        let covered: Vec<u32> = all.iter().map(|(p, ..)| *p).collect();
        let holders: std::collections::HashSet<usize> = all.iter().map(|(_, i, _)| *i).collect();
        if covered == (0..partitions).collect::<Vec<_>>() && holders.len() == stores.len() {
            return all;
        }
        assert!(tokio::time::Instant::now() < deadline, "ownership never settled: {all:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Table records have one writer per partition: the instances' consumer
/// group hands each partition to exactly one of them, and the partitions
/// of an instance that goes away move to the others in new, higher epochs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_partition_has_one_table_writer_and_a_departed_owners_partitions_move() {
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let config = common::config(&brokers, 3);
    let Some(a) = common::connect(config.clone()).await else { return };
    let b = KafkaStore::<Ledger>::open(config.clone()).await.expect("b");
    let c = KafkaStore::<Ledger>::open(config).await.expect("c");
    let before = settled_owners(&[&a, &b, &c], 3, WAIT).await;
    let holders: std::collections::HashSet<usize> = before.iter().map(|(_, i, _)| *i).collect();
    assert_eq!(holders.len(), 3, "three instances, three partitions: one each ({before:?})");
    // c goes away without a word (dropped: its group membership expires).
    let gone: Vec<(u32, u64)> = c.owned_partitions();
    drop(c);
    let after = settled_owners(&[&a, &b], 3, WAIT).await;
    for (p, epoch) in gone {
        let (_, _, new_epoch) = after.iter().find(|(q, ..)| *q == p).copied().expect("taken over");
        assert!(new_epoch > epoch, "partition {p}: a new tenure must have a higher epoch ({epoch} → {new_epoch})");
    }
    // The new owners write: a command on every partition reaches the
    // table topic (a fresh reader needs no replay past them).
    let bus = CommandBus::new(a.clone());
    for i in 0..12 {
        let id = format!("moved-{i}");
        bus.execute(&id, LedgerCommand::Open, ExpectedVersion::NoStream, Metadata::default()).await.expect("open");
    }
    a.flush(WAIT).await.expect("flush a");
    b.flush(WAIT).await.expect("flush b");
}

/// Claiming a tenure reads only what the table topic gained since the
/// instance's start-up load (the markers and records written meanwhile),
/// not the whole topic again: a claim goes on from the load's reading. It
/// read the whole topic twice per claim before, before and after its
/// markers, which on a large table is most of what a start asks of the
/// broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claiming_a_tenure_reads_only_what_the_table_topic_gained_since_the_start() {
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let config = common::config(&brokers, 3);
    let Some(a) = common::connect(config.clone()).await else { return };
    settled_owners(&[&a], 3, WAIT).await;
    const AGGREGATES: u64 = 60;
    for i in 0..AGGREGATES {
        write(&a, &format!("held-{i}"), 1).await;
    }
    a.flush(WAIT).await.expect("flush");
    // A second instance loads the table (every aggregate's record and a's
    // three markers), joins the owners' group and claims its share; `a`
    // gives its share up and claims again.
    let b = KafkaStore::<Ledger>::open(config).await.expect("b");
    let loaded = b.follower_stats().table_records_scanned;
    assert!(loaded >= AGGREGATES, "the start-up load reads every table record ({loaded})");
    let owners = settled_owners(&[&a, &b], 3, WAIT).await;
    let scanned = b.follower_stats().table_records_scanned;
    // Each claim reads the markers written since (a few per instance and
    // rebalance), never the aggregates' records again.
    assert!(
        scanned < loaded + AGGREGATES / 2,
        "b read {scanned} table records to claim its tenures after loading {loaded} ({owners:?})"
    );
    // `a` loaded an empty topic; its claims read its own markers, then,
    // after the rebalance, what was written since its first claim: its
    // records once (twice per claim before).
    let gauge = b.gauges().into_iter().find(|g| g.name == "table_records_scanned").map(|g| g.value);
    assert!(gauge.is_some_and(|v| v >= scanned as f64), "the count is a gauge too ({gauge:?})");
    let by_a = a.follower_stats().table_records_scanned;
    assert!(by_a < 2 * AGGREGATES, "a read {by_a} table records for its claims");
    // The tenures hold: the owners write the table records of new commands.
    for i in 0..6 {
        write(&b, &format!("after-{i}"), 2).await;
    }
    a.flush(WAIT).await.expect("flush a");
    b.flush(WAIT).await.expect("flush b");
}
