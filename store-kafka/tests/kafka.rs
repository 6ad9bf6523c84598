//! Kafka-specific behaviour on a real broker: restart and crash recovery,
//! several partitions, topic configuration checks, what other clients see,
//! bad records.

mod common;

use std::time::Duration;

use futures::StreamExt;
use kes_core::conformance::{Ledger, LedgerCommand, LedgerEvent};
use kes_core::{Checkpoint, CommandBus, EventStore, ExpectedVersion, Metadata, StoreError};
use kes_store_kafka::{KafkaStore, KafkaStoreConfig, KafkaStoreError};
use rdkafka::ClientConfig;
use rdkafka::admin::{NewTopic, TopicReplication};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

/// How long a flush may wait for the broker's acknowledgements: a bound
/// that only a broker that stopped answering reaches.
const FLUSH: Duration = Duration::from_secs(120);

fn raw_producer(brokers: &str) -> FutureProducer {
    ClientConfig::new().set("bootstrap.servers", brokers).create().expect("producer")
}

/// Writes an events record the way KES does, without KES: what a crash
/// right after the events write leaves behind (no table record).
async fn produce_events_record(brokers: &str, store: &KafkaStore<Ledger>, id: &str, first: u64, amounts: &[i64]) {
    let events: Vec<_> = amounts
        .iter()
        .enumerate()
        .map(|(i, a)| {
            json!({
                "event_id": uuid::Uuid::now_v7(), "version": first + i as u64, "event_type": "EntryAdded",
                "revision": 1, "content_type": "application/json", "payload": {"Added": {"amount": a}}
            })
        })
        .collect();
    let doc = json!({
        "format": "kes.events.v1", "aggregate_type": "ledger", "aggregate_id": id,
        "first_version": first, "last_version": first + amounts.len() as u64 - 1,
        "recorded_at": chrono::Utc::now(), "metadata": {"idempotency_key": format!("crash-{id}")}, "events": events
    });
    let value = serde_json::to_vec(&doc).expect("json");
    let partition = store.partition_of(id) as i32;
    let record = FutureRecord::to(store.events_topic()).key(id).payload(&value).partition(partition);
    raw_producer(brokers).send(record, Duration::from_secs(10)).await.expect("raw produce");
}

async fn snapshot_of(store: &KafkaStore<Ledger>, ids: &[&str]) -> Vec<(String, Option<(Ledger, u64)>, usize)> {
    let mut out = Vec::new();
    for id in ids {
        let loaded = store.load(id).await.expect("load").map(|s| (s.state, s.version));
        let history = store.read(id).await.expect("read");
        let versions: Vec<u64> = history.iter().map(|e| e.version).collect();
        assert_eq!(versions, (1..=versions.len() as u64).collect::<Vec<_>>(), "{id}: history not contiguous");
        out.push(((*id).to_owned(), loaded, history.len()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_rebuilds_the_table_including_a_command_whose_table_record_was_lost() {
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let config = common::config(&brokers, 3);
    let Some(store) = common::connect(config.clone()).await else { return };
    let bus = CommandBus::new(store.clone());
    let keyed = Metadata { idempotency_key: Some("k-1".into()), ..Metadata::default() };
    for id in ["a", "b", "c", "d", "e"] {
        bus.execute(id, LedgerCommand::Open, ExpectedVersion::NoStream, Metadata::default()).await.expect("open");
    }
    bus.execute("a", LedgerCommand::AddMany(vec![1, 2, 3]), ExpectedVersion::Exact(1), keyed.clone())
        .await
        .expect("add many");
    bus.execute("b", LedgerCommand::Add(10), ExpectedVersion::Any, Metadata::default()).await.expect("add");
    bus.execute("c", LedgerCommand::Close, ExpectedVersion::Any, Metadata::default()).await.expect("close");
    store.flush(FLUSH).await.expect("flush");
    // The crash: events records on the log whose table records never came.
    produce_events_record(&brokers, &store, "b", 3, &[5, 6]).await;
    produce_events_record(&brokers, &store, "f", 1, &[7]).await;
    let ids = ["a", "b", "c", "d", "e", "f", "never"];
    let before = snapshot_of(&store, &["a", "c", "d", "e", "never"]).await;
    drop(bus);
    drop(store);

    let again = KafkaStore::<Ledger>::open(config.clone()).await.expect("restart");
    let after = snapshot_of(&again, &ids).await;
    for row in &before {
        assert!(after.contains(row), "{} changed across the restart: {row:?} vs {after:?}", row.0);
    }
    let b = again.load("b").await.expect("load").expect("b exists");
    assert_eq!((b.version, b.state.total, b.state.entries), (4, 21, 3), "the crashed command on b is in the table");
    let f = again.load("f").await.expect("load").expect("f exists");
    assert_eq!((f.version, f.state.total), (1, 7), "an aggregate known only from the log is in the table");
    let recalled = again.recall("a", "k-1").await.expect("recall").expect("keys survive restarts");
    assert_eq!(recalled.version, 4);
    assert!(again.recall("b", "crash-b").await.expect("recall").is_some(), "keys of caught-up records too");
    match again.append("c", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], Metadata::default()).await {
        Err(StoreError::Conflict { actual: 2, .. }) => {}
        other => panic!("a deleted aggregate must keep its version across restarts, got {other:?}"),
    }
    // Commands continue from the recovered versions, then a third start
    // (from the repaired table topic) agrees with the second.
    again
        .append("b", ExpectedVersion::Exact(4), vec![LedgerEvent::Added { amount: 1 }], Metadata::default())
        .await
        .expect("append");
    let second = snapshot_of(&again, &ids).await;
    again.flush(FLUSH).await.expect("flush");
    drop(again);
    let third = KafkaStore::<Ledger>::open(config).await.expect("third start");
    assert_eq!(snapshot_of(&third, &ids).await, second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_partitions_keep_each_aggregate_in_order() {
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let Some(store) = common::connect(common::config(&brokers, 4)).await else { return };
    let ids: Vec<String> = (0..12).map(|i| format!("p-{i}")).collect();
    let partitions: std::collections::HashSet<u32> = ids.iter().map(|id| store.partition_of(id)).collect();
    assert!(partitions.len() > 1, "the ids should spread over partitions");
    let bus = std::sync::Arc::new(CommandBus::new(store.clone()));
    let tasks: Vec<_> = ids
        .iter()
        .cloned()
        .map(|id| {
            let bus = bus.clone();
            tokio::spawn(async move {
                bus.execute(&id, LedgerCommand::Open, ExpectedVersion::NoStream, Metadata::default())
                    .await
                    .expect("open");
                for i in 0..5 {
                    bus.execute(&id, LedgerCommand::Add(i), ExpectedVersion::Any, Metadata::default())
                        .await
                        .expect("add");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let head = store.head().await.expect("head");
    assert_eq!(Checkpoint::start().lag_behind(&head), 72);
    // Every event the full read delivers: (position, aggregate, version, event id).
    type Seen = (u32, u64, String, u64, uuid::Uuid);
    let seen_of = |e: &kes_core::Envelope<LedgerEvent>| -> Seen {
        (e.position.partition, e.position.offset, e.aggregate_id.clone(), e.version, e.event_id)
    };
    let mut stream = store.subscribe(Checkpoint::start()).await.expect("subscribe");
    let mut full: Vec<Seen> = Vec::new();
    let mut versions: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let mut checkpoint = Checkpoint::start();
    while !checkpoint.covers_all(&head) {
        let item =
            tokio::time::timeout(Duration::from_secs(30), stream.next()).await.expect("in time").expect("endless");
        for e in item.expect("item") {
            assert_eq!(e.position.partition, store.partition_of(&e.aggregate_id));
            let last = versions.entry(e.aggregate_id.clone()).or_default();
            assert_eq!(e.version, *last + 1, "{} out of order", e.aggregate_id);
            *last = e.version;
            checkpoint.advance(e.position);
            full.push(seen_of(&e));
        }
    }
    assert_eq!(versions.len(), 12, "every aggregate was delivered");
    assert!(versions.values().all(|v| *v == 6));
    assert_eq!(full.len(), 72, "every record once");
    // Resuming from the middle of each partition delivers exactly the
    // records at or past the checkpoint, each once, in each partition's
    // order: no repeat of what was read, no gap.
    let mut half = Checkpoint::start();
    for (p, next) in head.iter() {
        half.set_next(p, next / 2);
    }
    let expected: Vec<Seen> = full.iter().filter(|s| s.1 >= half.next_offset(s.0)).cloned().collect();
    assert_eq!(
        expected.len() as u64,
        Checkpoint::start().lag_behind(&head) - Checkpoint::start().lag_behind(&half),
        "the full read holds every record past the checkpoint"
    );
    let mut stream = store.subscribe(half.clone()).await.expect("subscribe");
    let mut resumed: Vec<Seen> = Vec::new();
    let mut checkpoint = half;
    while !checkpoint.covers_all(&head) {
        let item =
            tokio::time::timeout(Duration::from_secs(30), stream.next()).await.expect("in time").expect("endless");
        for e in item.expect("item") {
            let s = seen_of(&e);
            assert!(!resumed.contains(&s), "the resumed subscription repeated {s:?}");
            assert!(expected.contains(&s), "the resumed subscription delivered {s:?}, read before the checkpoint");
            checkpoint.advance(e.position);
            resumed.push(s);
        }
    }
    // Across partitions the interleaving may differ; within one, the order
    // is the log's.
    for p in 0..4 {
        let of = |all: &[Seen]| all.iter().filter(|s| s.0 == p).cloned().collect::<Vec<_>>();
        assert_eq!(of(&resumed), of(&expected), "partition {p}: the resumed records differ from the full read's");
    }
    assert_eq!(resumed.len(), expected.len(), "the resumed subscription missed records");
}

/// The records of `stream` up to `head`: per partition, (offset, aggregate,
/// version) of every event, in the order delivered.
async fn subscribed_up_to(
    stream: &mut kes_core::EventStream<LedgerEvent>,
    from: Checkpoint,
    head: &Checkpoint,
) -> std::collections::BTreeMap<u32, Vec<(u64, String, u64)>> {
    let mut seen: std::collections::BTreeMap<u32, Vec<(u64, String, u64)>> = Default::default();
    let mut checkpoint = from;
    while !checkpoint.covers_all(head) {
        let item =
            tokio::time::timeout(Duration::from_secs(30), stream.next()).await.expect("in time").expect("endless");
        let logged = item.expect("item");
        assert!(
            logged.position.offset >= checkpoint.next_offset(logged.position.partition),
            "{:?} delivered twice or out of order",
            logged.position
        );
        for e in &logged.events {
            seen.entry(e.position.partition).or_default().push((e.position.offset, e.aggregate_id.clone(), e.version));
        }
        checkpoint.advance(logged.position);
    }
    seen
}

/// Per partition, (offset, aggregate, version) of every event `read` gives
/// for `ids`, in log order.
async fn logged_events(
    store: &KafkaStore<Ledger>,
    ids: &[String],
) -> std::collections::BTreeMap<u32, Vec<(u64, String, u64)>> {
    let mut all: std::collections::BTreeMap<u32, Vec<(u64, String, u64)>> = Default::default();
    for id in ids {
        for e in store.read(id).await.expect("read") {
            all.entry(e.position.partition).or_default().push((e.position.offset, e.aggregate_id.clone(), e.version));
        }
    }
    for events in all.values_mut() {
        events.sort();
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_at_the_head_take_records_from_memory_and_older_ones_from_the_broker() {
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let config = common::config(&brokers, 3);
    let Some(writer) = common::connect(config.clone()).await else { return };
    let ids: Vec<String> = (0..9).map(|i| format!("t-{i}")).collect();
    let write = |round: i64| {
        let writer = writer.clone();
        let ids = ids.clone();
        async move {
            for id in &ids {
                let events =
                    if round == 0 { vec![LedgerEvent::Opened] } else { vec![LedgerEvent::Added { amount: round }] };
                writer.append(id, ExpectedVersion::Any, events, Metadata::default()).await.expect("append");
            }
        }
    };
    write(0).await;
    write(1).await;
    // A second instance opens after those 18 records: its follower starts
    // past them, so its tails do not hold them.
    let reader = KafkaStore::<Ledger>::open(config).await.expect("second instance");
    let before = reader.follower_stats();
    let mut from_start = reader.subscribe(Checkpoint::start()).await.expect("subscribe");
    let head = reader.head().await.expect("head");
    let old = subscribed_up_to(&mut from_start, Checkpoint::start(), &head).await;
    let stats = reader.follower_stats();
    assert_eq!(stats.subscribed_from_broker - before.subscribed_from_broker, 18, "below the tails: from the broker");
    assert_eq!(stats.subscribed_from_tail, before.subscribed_from_tail);
    // Its broker reader was pointed at the three partitions once, then
    // again as each reached its end: never once per record, which would
    // drop what it fetched ahead and fetch every record on its own.
    let seeks = stats.subscription_seeks - before.subscription_seeks;
    assert!((1..=3).contains(&seeks), "{seeks} seeks for 18 records on 3 partitions");

    // At the head, records written through the other instance come from the
    // reader's tails, to both the subscription that read the old ones and a
    // new one from the head.
    let mut at_head = reader.subscribe(head.clone()).await.expect("subscribe");
    write(2).await;
    write(3).await;
    let new_head = writer.head().await.expect("head");
    let newer = subscribed_up_to(&mut from_start, head.clone(), &new_head).await;
    let newer_at_head = subscribed_up_to(&mut at_head, head.clone(), &new_head).await;
    assert_eq!(newer, newer_at_head, "both subscriptions deliver the same records");
    let stats_after = reader.follower_stats();
    assert_eq!(stats_after.subscribed_from_broker, stats.subscribed_from_broker, "nothing more from the broker");
    assert_eq!(stats_after.subscribed_from_tail - stats.subscribed_from_tail, 36, "18 records, to two subscriptions");

    // Together they are exactly the log: every event once, in each
    // partition's order.
    let mut delivered = old;
    for (p, events) in newer {
        delivered.entry(p).or_default().extend(events);
    }
    assert_eq!(delivered, logged_events(&reader, &ids).await);
    assert!(delivered.values().map(Vec::len).sum::<usize>() == 36);

    // A subscription from the start now reads below the tails from the
    // broker, then goes on from them without a repeat or a gap.
    let mut late = reader.subscribe(Checkpoint::start()).await.expect("subscribe");
    let all = subscribed_up_to(&mut late, Checkpoint::start(), &new_head).await;
    assert_eq!(all, delivered);
    let stats_late = reader.follower_stats();
    assert_eq!(stats_late.subscribed_from_broker - stats_after.subscribed_from_broker, 18);
    assert_eq!(stats_late.subscribed_from_tail - stats_after.subscribed_from_tail, 18);
    let seeks = stats_late.subscription_seeks - stats_after.subscription_seeks;
    assert!((1..=3).contains(&seeks), "{seeks} seeks for 18 records on 3 partitions");
    // The counters are the store's gauges too (`/metrics`).
    let gauge = |name: &str| reader.gauges().into_iter().find(|g| g.name == name).map(|g| g.value);
    assert_eq!(gauge("subscription_seeks"), Some(stats_late.subscription_seeks as f64));
    assert_eq!(gauge("subscribed_from_broker"), Some(stats_late.subscribed_from_broker as f64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_events_topic_that_could_lose_events_is_refused_by_setting() {
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let config = common::config(&brokers, 1);
    let topic = config.events_topic("ledger");
    let forever = NewTopic::new(&topic, 1, TopicReplication::Fixed(1))
        .set("cleanup.policy", "delete")
        .set("retention.ms", "-1")
        .set("retention.bytes", "-1");
    common::create_topics(&brokers, &[forever]).await;
    match KafkaStore::<Ledger>::open(config.clone()).await {
        Err(KafkaStoreError::UnsafeTopic { setting, value, .. }) => {
            assert_eq!((setting.as_str(), value.as_str()), ("retention.ms", "-1"));
        }
        other => panic!("expected a refusal naming retention.ms, got {other:?}"),
    }
    let compacted = KafkaStoreConfig { topic_prefix: format!("{}-c", config.topic_prefix), ..config };
    let topic = compacted.events_topic("ledger");
    let compact = NewTopic::new(&topic, 1, TopicReplication::Fixed(1)).set("cleanup.policy", "compact");
    common::create_topics(&brokers, &[compact]).await;
    match KafkaStore::<Ledger>::open(compacted).await {
        Err(e @ KafkaStoreError::UnsafeTopic { .. }) => assert!(e.to_string().contains("cleanup.policy"), "{e}"),
        other => panic!("expected a refusal naming cleanup.policy, got {other:?}"),
    }
}

/// A restart finds both topics and creates nothing, but still judges their
/// configuration: a table topic that deletes by age is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_topics_are_checked_before_the_store_starts() {
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let config = common::config(&brokers, 1);
    let events_topic = config.events_topic("ledger");
    let events = NewTopic::new(&events_topic, 1, TopicReplication::Fixed(1))
        .set("cleanup.policy", "delete")
        .set("retention.ms", "31536000000000")
        .set("retention.bytes", "-1");
    let table_topic = config.table_topic("ledger");
    let table = NewTopic::new(&table_topic, 1, TopicReplication::Fixed(1)).set("cleanup.policy", "delete");
    common::create_topics(&brokers, &[events, table]).await;
    match KafkaStore::<Ledger>::open(config.clone()).await {
        Err(KafkaStoreError::UnsafeTopic { topic, setting, value, .. }) => {
            assert_eq!(
                (topic.as_str(), setting.as_str(), value.as_str()),
                (table_topic.as_str(), "cleanup.policy", "delete")
            );
        }
        other => panic!("expected a refusal of the table topic's cleanup.policy, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_are_typed_errors_not_panics() {
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let config = common::config(&brokers, 1);
    let Some(store) = common::connect(config.clone()).await else { return };
    store
        .append("ok", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], Metadata::default())
        .await
        .expect("append");
    let producer = raw_producer(&brokers);
    for (key, value) in [("junk", &b"{not json"[..]), ("half", &br#"{"aggregate_id":"half"}"#[..])] {
        let record = FutureRecord::to(store.events_topic()).key(key).payload(value).partition(0);
        producer.send(record, Duration::from_secs(10)).await.expect("produce");
    }
    let mut stream = store.subscribe(Checkpoint::start()).await.expect("subscribe");
    let first = tokio::time::timeout(Duration::from_secs(30), stream.next()).await.expect("in time").expect("item");
    assert_eq!(first.expect("the good record").len(), 1);
    let bad = tokio::time::timeout(Duration::from_secs(30), stream.next()).await.expect("in time").expect("item");
    match bad {
        Err(StoreError::Corrupt { id, reason, .. }) => {
            assert_eq!(id, "junk");
            assert!(reason.contains("0:1"), "the error names the position: {reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // A store starting on that log halts the partition at the record it
    // cannot read: nothing past it is judged, its aggregates answer
    // Unavailable, and the halt is visible.
    let again = KafkaStore::<Ledger>::open(config).await.expect("a store starts on a log it cannot fully read");
    let halted = again.follower_stats().halted;
    assert_eq!(halted.len(), 1, "{halted:?}");
    assert_eq!((halted[0].partition, halted[0].offset), (0, 1), "{halted:?}");
    assert!(halted[0].reason.contains("not a KES events document"), "{halted:?}");
    match again.load("ok").await {
        Err(StoreError::Unavailable(why)) => assert!(why.contains("halted"), "{why}"),
        other => panic!("an aggregate of a halted partition must be unavailable, got {other:?}"),
    }
    assert_eq!(again.follower_stats().void_records, 0, "an unreadable record is never voided");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_state_that_no_longer_fits_the_model_is_rebuilt_from_the_events() {
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let config = common::config(&brokers, 1);
    let Some(store) = common::connect(config.clone()).await else { return };
    let keyed = Metadata { idempotency_key: Some("k-9".into()), ..Metadata::default() };
    store.append("a", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], Metadata::default()).await.expect("open");
    store.append("a", ExpectedVersion::Exact(1), vec![LedgerEvent::Added { amount: 4 }], keyed).await.expect("add");
    store.append("z", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], Metadata::default()).await.expect("open");
    store.flush(FLUSH).await.expect("flush");
    // A table record as an older model of the aggregate could have left it.
    let old_model = json!({
        "format": "kes.table.v1", "aggregate_type": "ledger", "aggregate_id": "a", "version": 2,
        "deleted": false, "state": {"open": "yes", "total": [4]}, "events_partition": 0,
        "first_offset": 0, "last_offset": 1, "offsets": [0, 1], "max_record_bytes": 600,
        "reflected_below": 3, "idempotency_keys": [], "updated_at": chrono::Utc::now()
    });
    let value = serde_json::to_vec(&old_model).expect("json");
    let record = FutureRecord::to(store.table_topic()).key("a").payload(&value).partition(0);
    raw_producer(&brokers).send(record, Duration::from_secs(10)).await.expect("raw produce");
    drop(store);

    let again = KafkaStore::<Ledger>::open(config).await.expect("restart");
    let a = again.load("a").await.expect("load").expect("a exists");
    assert_eq!((a.version, a.state.open, a.state.total, a.state.entries), (2, true, 4, 1));
    assert_eq!(again.recall("a", "k-9").await.expect("recall").map(|r| r.version), Some(2));
    assert_eq!(again.read("a").await.expect("read").len(), 2);
    assert_eq!(again.load("z").await.expect("load").map(|s| s.version), Some(1));
}

/// Keys of every record of `topic`, read to its end by a plain consumer
/// (epoch markers of the partitions' owners left out: see `records_of`).
fn keys_of(brokers: &str, topic: &str, partitions: u32) -> Vec<String> {
    records_of(brokers, topic, partitions).into_iter().map(|(k, _)| k).collect()
}

/// Key and JSON value of every record of `topic`, read to its end by a
/// plain consumer, except the epoch markers the owners of partitions write
/// to the table topic (keys starting with a NUL byte): they are not table
/// records, and when they appear depends on the owners' group.
fn records_of(brokers: &str, topic: &str, partitions: u32) -> Vec<(String, serde_json::Value)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "kes-test-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p as i32, Offset::Beginning).expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut open = partitions;
    let mut keys = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while open > 0 {
        assert!(std::time::Instant::now() < deadline, "{topic} not read to its end within 60 s");
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) if m.key().is_some_and(|k| k.first() == Some(&0)) => {}
            Some(Ok(m)) => keys.push((
                String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or(serde_json::Value::Null),
            )),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => open -= 1,
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_aggregate_writes_few_table_records() {
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let mut config = common::config(&brokers, 1);
    config.table_write_delay = Duration::from_millis(400);
    let Some(store) = common::connect(config.clone()).await else { return };
    let started = std::time::Instant::now();
    store
        .append("busy", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], Metadata::default())
        .await
        .expect("open");
    for v in 1..30 {
        store
            .append("busy", ExpectedVersion::Exact(v), vec![LedgerEvent::Added { amount: 1 }], Metadata::default())
            .await
            .expect("add");
    }
    store.append("quiet", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], Metadata::default()).await.expect("q");
    let elapsed = started.elapsed();
    store.flush(FLUSH).await.expect("flush");
    let keys = keys_of(&brokers, store.table_topic(), 1);
    let busy = keys.iter().filter(|k| *k == "busy").count();
    // At most one record per delay while commands keep coming, plus the
    // last one written by the flush.
    let bound = (elapsed.as_millis() / 400) as usize + 2;
    assert!((1..=bound).contains(&busy), "{busy} table records for 30 commands in {elapsed:?} (bound {bound})");
    // Written at once by the flush, and once more as the record that claims
    // the whole partition (it is the latest aggregate written).
    let quiet = keys.iter().filter(|k| *k == "quiet").count();
    assert!((1..=2).contains(&quiet), "the flush wrote the waiting record: {keys:?}");
    // After a flush the table records claim the whole events partition, so
    // the next start has nothing to replay.
    let records = records_of(&brokers, store.table_topic(), 1);
    let claimed = records.iter().filter_map(|(_, v)| v["reflected_below"].as_u64()).max();
    assert_eq!(claimed, Some(31), "31 events records, all reflected");
    // Each record carries the latest state when it is built, so the busy
    // aggregate's records never go back and the last one holds version 30.
    let versions: Vec<u64> =
        records.iter().filter(|(k, _)| k == "busy").map(|(_, v)| v["version"].as_u64().expect("a version")).collect();
    assert!(versions.windows(2).all(|w| w[0] <= w[1]), "table records overtook each other: {versions:?}");
    assert_eq!(versions.last(), Some(&30), "the last table record of busy holds every command: {versions:?}");
    drop(store);
    let again = KafkaStore::<Ledger>::open(config).await.expect("restart");
    let busy = again.load("busy").await.expect("load").expect("busy exists");
    assert_eq!((busy.version, busy.state.total), (30, 29));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_dropped_before_its_table_records_were_written_loses_nothing() {
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let mut config = common::config(&brokers, 2);
    config.table_write_delay = Duration::from_secs(60);
    let Some(store) = common::connect(config.clone()).await else { return };
    let bus = CommandBus::new(store.clone());
    let keyed = Metadata { idempotency_key: Some("retry-me".into()), ..Metadata::default() };
    for id in ["x", "y", "z"] {
        bus.execute(id, LedgerCommand::Open, ExpectedVersion::NoStream, Metadata::default()).await.expect("open");
        bus.execute(id, LedgerCommand::Add(5), ExpectedVersion::Any, keyed.clone()).await.expect("add");
    }
    bus.execute("z", LedgerCommand::Close, ExpectedVersion::Any, Metadata::default()).await.expect("close");
    let before = snapshot_of(&store, &["x", "y", "z"]).await;
    drop(bus);
    drop(store);
    assert!(keys_of(&brokers, &config.table_topic("ledger"), 2).is_empty(), "no table record was written yet");

    let again = KafkaStore::<Ledger>::open(config).await.expect("restart");
    assert_eq!(snapshot_of(&again, &["x", "y", "z"]).await, before);
    let retried = again.recall("y", "retry-me").await.expect("recall").expect("the key survived");
    assert_eq!(retried.version, 2);
    match again.append("z", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], Metadata::default()).await {
        Err(StoreError::Conflict { actual: 3, .. }) => {}
        other => panic!("the closed ledger keeps its version, got {other:?}"),
    }
}

/// A cold history read (a freshly connected store: no read cache) of an
/// aggregate whose 1,000 records lie among 50,000 records of other
/// aggregates in one partition — interleaved for its first 500 versions,
/// then behind a run of 25,000 foreign records — reads its records in
/// order, and a page reads only the records that can hold it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_history_read_among_many_other_records_is_whole_and_in_order() {
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let config = common::config(&brokers, 1);
    let Some(store) = common::connect(config.clone()).await else { return };
    let others = |range: std::ops::Range<usize>| {
        let store = store.clone();
        range
            .map(|o| {
                let store = store.clone();
                tokio::spawn(async move {
                    let id = format!("other-{o}");
                    store
                        .append(&id, ExpectedVersion::NoStream, vec![LedgerEvent::Opened], Metadata::default())
                        .await?;
                    for i in 0..999 {
                        let events = vec![LedgerEvent::Added { amount: i }];
                        store.append(&id, ExpectedVersion::Any, events, Metadata::default()).await?;
                    }
                    Ok::<_, StoreError>(())
                })
            })
            .collect::<Vec<_>>()
    };
    let target = |versions: std::ops::RangeInclusive<u64>| {
        let store = store.clone();
        tokio::spawn(async move {
            for v in versions {
                let event = if v == 1 { LedgerEvent::Opened } else { LedgerEvent::Added { amount: v as i64 } };
                store.append("target", ExpectedVersion::Exact(v - 1), vec![event], Metadata::default()).await?;
            }
            Ok::<_, StoreError>(())
        })
    };
    let started = std::time::Instant::now();
    // Interleaved: the target's first 500 versions while 25 others write.
    let mut writers = others(0..25);
    writers.push(target(1..=500));
    for w in writers {
        w.await.expect("writer").expect("append");
    }
    // A long stretch of foreign records, then the rest of the target.
    for w in others(25..50) {
        w.await.expect("writer").expect("append");
    }
    target(501..=1000).await.expect("writer").expect("append");
    store.flush(Duration::from_secs(60)).await.expect("flush");
    drop(store);
    eprintln!("seeded in {:.1} s", started.elapsed().as_secs_f64());

    let started = std::time::Instant::now();
    let Some(cold) = common::connect(config.clone()).await else { return };
    eprintln!("connected in {:.1} s", started.elapsed().as_secs_f64());
    let started = std::time::Instant::now();
    let history = cold.read("target").await.expect("read the history");
    eprintln!("cold read of 1,000 events in {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(history.len(), 1000);
    assert!(history.iter().enumerate().all(|(i, e)| e.version == i as u64 + 1), "versions 1..=1000 in order");
    assert!(history.iter().all(|e| e.aggregate_id == "target"), "only the target's events");
    assert_eq!(history[999].payload, LedgerEvent::Added { amount: 1000 });
    assert!(history.windows(2).all(|w| w[0].position.offset < w[1].position.offset));

    drop(cold);
    let Some(cold) = common::connect(config).await else { return };
    let started = std::time::Instant::now();
    let page = cold.read_page("target", 450, 100).await.expect("a page across the long stretch");
    eprintln!("cold page of 100 in {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(page.iter().map(|e| e.version).collect::<Vec<_>>(), (451..=550).collect::<Vec<_>>());
    let ids: Vec<_> = history[450..550].iter().map(|e| e.event_id).collect();
    assert_eq!(page.iter().map(|e| e.event_id).collect::<Vec<_>>(), ids, "the page holds the events `read` gives");
    let last = cold.read_page("target", 999, 100).await.expect("the last page");
    assert_eq!(last.iter().map(|e| e.version).collect::<Vec<_>>(), [1000]);
    assert!(cold.read_page("target", 1000, 100).await.expect("past the end").is_empty());
}

/// The idempotency key of the `index`-th command reaction `reaction` sent
/// for the event at `offset` of partition 0 of the project log.
fn reaction_key(reaction: &str, offset: u64, index: u32) -> String {
    kes_core::ReactionKey {
        reaction: reaction.into(),
        event_id: uuid::Uuid::from_u128(u128::from(offset) << 32 | u128::from(index)),
        index,
        source: "project".into(),
        position: kes_core::Position::new(0, offset),
    }
    .to_string()
}

/// A reaction replaying from an old checkpoint, long after the aggregate's
/// recent idempotency keys moved on (here: one key, no time window), sends
/// commands the stream already holds: the row's mark of the reaction's
/// sequence recognises them, also after a restart, and later commands of
/// the sequence, or another reaction's, still append.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reaction_replayed_after_its_keys_were_forgotten_appends_nothing() {
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let mut config = common::config(&brokers, 2);
    config.idempotency_keys_per_aggregate = 1;
    config.idempotency_window = Duration::ZERO;
    let Some(store) = common::connect(config.clone()).await else { return };
    let bus = CommandBus::new(store.clone());
    let keyed = |key: String| Metadata { idempotency_key: Some(key), ..Metadata::default() };
    bus.execute("m", LedgerCommand::Open, ExpectedVersion::NoStream, Metadata::default()).await.expect("open");
    let first = bus
        .execute("m", LedgerCommand::Add(1), ExpectedVersion::Any, keyed(reaction_key("mirror", 5, 0)))
        .await
        .expect("the reaction's command");
    assert_eq!(first.version, 2);
    for i in 0..3 {
        let plain = keyed(format!("client-{i}"));
        bus.execute("m", LedgerCommand::Add(10), ExpectedVersion::Any, plain).await.expect("a client's command");
    }
    let recalled = store.recall("m", &reaction_key("mirror", 5, 0)).await.expect("recall");
    assert_eq!(recalled.map(|a| a.version), Some(2), "the mark answers for a key the recent keys forgot");
    for (offset, index) in [(5, 0), (3, 0), (4, 9)] {
        let replay = bus
            .execute("m", LedgerCommand::Add(1), ExpectedVersion::Any, keyed(reaction_key("mirror", offset, index)))
            .await
            .expect("a replayed command");
        assert!(replay.deduplicated, "({offset}, {index}) was appended again");
    }
    assert_eq!(store.load("m").await.expect("load").map(|s| (s.version, s.state.total)), Some((5, 31)));
    let later = bus
        .execute("m", LedgerCommand::Add(100), ExpectedVersion::Any, keyed(reaction_key("mirror", 6, 0)))
        .await
        .expect("a later command");
    let other = bus
        .execute("m", LedgerCommand::Add(1000), ExpectedVersion::Any, keyed(reaction_key("audit", 1, 0)))
        .await
        .expect("another reaction's command");
    assert!(!later.deduplicated && !other.deduplicated);
    store.flush(FLUSH).await.expect("flush");
    drop(bus);
    drop(store);

    let again = KafkaStore::<Ledger>::open(config).await.expect("restart");
    // Recognised by the mark, which answers with the furthest command of
    // the sequence (6, at version 6), not the replayed one's own answer.
    for (reaction, offset, version) in [("mirror", 5, 6), ("mirror", 6, 6), ("audit", 1, 7)] {
        let recalled = again.recall("m", &reaction_key(reaction, offset, 0)).await.expect("recall");
        assert_eq!(recalled.map(|a| a.version), Some(version), "{reaction} at {offset} after a restart");
    }
    assert_eq!(again.recall("m", &reaction_key("mirror", 7, 0)).await.expect("recall"), None);
}
