//! Command throughput against raw producer throughput to the same broker in
//! the same run. Ignored by default (a measurement, not a check):
//!
//! ```sh
//! KES_TEST_KAFKA_BROKERS=127.0.0.1:19092 cargo test -p kes-store-kafka --test throughput -- --ignored --nocapture
//! ```

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kes_core::conformance::LedgerCommand;
use kes_core::{CommandBus, ExpectedVersion, Metadata};
use rdkafka::ClientConfig;
use rdkafka::admin::{NewTopic, TopicReplication};
use rdkafka::producer::{FutureProducer, FutureRecord};

const N: usize = 1000;
const IN_FLIGHT: usize = 64;

fn rate(n: usize, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run with --ignored --nocapture"]
async fn command_throughput_against_raw_producer() {
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let config = common::config(&brokers, 1);
    // Raw baseline: the same producer settings KES uses (idempotent,
    // acks=all, no linger), a record of the same size, no KES.
    let raw_topic = format!("{}.raw", config.topic_prefix);
    common::create_topics(&brokers, &[NewTopic::new(&raw_topic, 1, TopicReplication::Fixed(1))]).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        .create()
        .expect("producer");
    let value = vec![b'x'; 420];
    let send = |i: usize| {
        let producer = producer.clone();
        let value = value.clone();
        let topic = raw_topic.clone();
        async move {
            let key = format!("k-{i}");
            producer
                .send(FutureRecord::to(&topic).key(&key).payload(&value), Duration::from_secs(30))
                .await
                .expect("raw");
        }
    };
    send(0).await;
    let t = Instant::now();
    for i in 0..N {
        send(i).await;
    }
    let raw_seq = rate(N, t.elapsed());
    let t = Instant::now();
    futures::stream::iter(0..N).for_each_concurrent(IN_FLIGHT, send).await;
    let raw_par = rate(N, t.elapsed());

    let Some(store) = common::connect(config).await else { return };
    let bus = Arc::new(CommandBus::new(store.clone()));
    let t = Instant::now();
    bus.execute("seq", LedgerCommand::Open, ExpectedVersion::NoStream, Metadata::default()).await.expect("open");
    for _ in 1..N {
        bus.execute("seq", LedgerCommand::Add(1), ExpectedVersion::Any, Metadata::default()).await.expect("command");
    }
    let cmd_seq = rate(N, t.elapsed());
    let t = Instant::now();
    futures::stream::iter(0..N)
        .for_each_concurrent(IN_FLIGHT, |i| {
            let bus = bus.clone();
            async move {
                let id = format!("par-{}", i % IN_FLIGHT);
                let cmd = if i < IN_FLIGHT { LedgerCommand::Open } else { LedgerCommand::Add(1) };
                // Opens go first per id because ids repeat every IN_FLIGHT commands.
                bus.execute(&id, cmd, ExpectedVersion::Any, Metadata::default()).await.expect("command");
            }
        })
        .await;
    let cmd_par = rate(N, t.elapsed());
    println!("raw producer, sequential:      {raw_seq:8.0} records/s");
    println!("commands, sequential:          {cmd_seq:8.0} commands/s  ratio {:.2}", cmd_seq / raw_seq);
    println!("raw producer, {IN_FLIGHT} in flight:    {raw_par:8.0} records/s");
    println!("commands, {IN_FLIGHT} in flight:        {cmd_par:8.0} commands/s  ratio {:.2}", cmd_par / raw_par);
    let stats = store.follower_stats();
    let decided = stats.fast_path_appends + stats.awaited_appends;
    println!(
        "appends judged without waiting for the follower: {} of {decided} ({:.1} %)",
        stats.fast_path_appends,
        100.0 * stats.fast_path_appends as f64 / decided.max(1) as f64
    );
}

/// Follow lag: how long after an append through one instance another
/// instance's table has applied it, against how long the append itself
/// took (same run, same broker). Prints p50/p99 of both.
///
/// ```sh
/// KES_TEST_KAFKA_BROKERS=127.0.0.1:19092 cargo test -p kes-store-kafka --release --test throughput follow_lag -- --ignored --nocapture
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run with --ignored --nocapture"]
async fn follow_lag_between_two_instances() {
    use kes_core::EventStore;
    use kes_core::conformance::{Ledger, LedgerEvent};
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let config = common::config(&brokers, 3);
    let Some(writer) = common::connect(config.clone()).await else { return };
    let reader = kes_store_kafka::KafkaStore::<Ledger>::open(config).await.expect("second instance");
    let (mut appends, mut lags) = (Vec::new(), Vec::new());
    for i in 0..300u64 {
        let id = format!("lag-{}", i % 30);
        let version = i / 30;
        let events = if version == 0 { vec![LedgerEvent::Opened] } else { vec![LedgerEvent::Added { amount: 1 }] };
        let expected = if version == 0 { ExpectedVersion::NoStream } else { ExpectedVersion::Exact(version) };
        let started = Instant::now();
        let appended = writer.append(&id, expected, events, Metadata::default()).await.expect("append");
        appends.push(started.elapsed());
        let acknowledged = Instant::now();
        assert!(reader.wait_applied(appended.position, Duration::from_secs(30)).await, "not followed");
        lags.push(acknowledged.elapsed());
    }
    let pct = |v: &mut Vec<Duration>, q: f64| {
        v.sort();
        v[((v.len() as f64 - 1.0) * q).round() as usize]
    };
    let stats = writer.follower_stats();
    println!(
        "append p50 {:?} p99 {:?}; follow lag after the acknowledgement p50 {:?} p99 {:?}; fast path {} of {} appends",
        pct(&mut appends, 0.5),
        pct(&mut appends, 0.99),
        pct(&mut lags, 0.5),
        pct(&mut lags, 0.99),
        stats.fast_path_appends,
        stats.fast_path_appends + stats.awaited_appends,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run with --ignored --nocapture"]
async fn subscription_lag_after_the_acknowledgement() {
    use kes_core::EventStore;
    use kes_core::conformance::LedgerEvent;
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let Some(store) = common::connect(common::config(&brokers, 3)).await else { return };
    let head = store.head().await.expect("head");
    let mut stream = store.subscribe(head).await.expect("subscribe");
    let mut lags = Vec::new();
    for i in 0..300u64 {
        let id = format!("sub-lag-{}", i % 30);
        let events = if i < 30 { vec![LedgerEvent::Opened] } else { vec![LedgerEvent::Added { amount: 1 }] };
        let appended = store.append(&id, ExpectedVersion::Any, events, Metadata::default()).await.expect("append");
        let acknowledged = Instant::now();
        loop {
            let item = tokio::time::timeout(Duration::from_secs(30), stream.next()).await.expect("in time");
            let logged = item.expect("endless").expect("item");
            if logged.position == appended.position {
                break;
            }
        }
        lags.push(acknowledged.elapsed());
    }
    lags.sort();
    let pct = |q: f64| lags[((lags.len() as f64 - 1.0) * q).round() as usize];
    let stats = store.follower_stats();
    println!(
        "subscription lag after the acknowledgement p50 {:?} p99 {:?}; records from memory {}, from the broker {}",
        pct(0.5),
        pct(0.99),
        stats.subscribed_from_tail,
        stats.subscribed_from_broker,
    );
}
