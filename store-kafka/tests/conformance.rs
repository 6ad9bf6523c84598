//! The kes-core EventStore conformance suite against a real broker
//! (`KES_TEST_KAFKA_BROKERS`), each test on its own topics.
//!
//! One partition: the suite compares whole subscriptions item by item, and
//! only a single partition has one global order. The multi-partition
//! behaviour is covered in `tests/kafka.rs`.

mod common;

kes_core::event_store_conformance!(common::fresh_turned(1));
