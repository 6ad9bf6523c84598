//! Against librdkafka's in-process mock cluster (no broker needed): KES's
//! partitioner is the one other clients use, so every client agrees where an
//! aggregate lives.
//!
//! A `KafkaStore` cannot connect to the mock cluster: it creates its topics
//! and reads their configuration back, and the mock cluster answers neither
//! CreateTopics nor DescribeConfigs. Faults on a running store are injected
//! on the wire in front of a real broker instead (`unknown_outcome.rs`).

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_land_where_librdkafkas_murmur2_partitioner_puts_them() {
    const TOPIC: &str = "ledger.events";
    const PARTITIONS: u32 = 7;
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, PARTITIONS as i32, 1).expect("topic");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("partitioner", "murmur2")
        .create()
        .expect("producer");
    let mut used = std::collections::HashSet::new();
    for i in 0..64 {
        let id = format!("aggregate-{i}");
        let record = FutureRecord::to(TOPIC).key(&id).payload("{}");
        let delivery = producer.send(record, Duration::from_secs(10)).await.expect("delivered");
        let ours = kes_store_kafka::record::partition_for(&id, PARTITIONS);
        assert_eq!(delivery.partition as u32, ours, "{id}");
        used.insert(ours);
    }
    assert!(used.len() > 3, "the ids spread over the partitions");
}
