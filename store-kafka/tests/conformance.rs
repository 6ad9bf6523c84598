//! The kes-core EventStore conformance suite against a real broker
//! (`KES_TEST_KAFKA_BROKERS`), each test on its own topics, once on one
//! partition and once on three.

mod common;

/// One partition: the whole log has one order.
mod one_partition {
    use super::common;

    kes_core::event_store_conformance!(common::fresh_turned(1));
}

/// Three partitions: aggregates spread over partitions with independent
/// offsets; only each partition (and so each aggregate) has one order.
mod three_partitions {
    use super::common;

    kes_core::event_store_conformance!(common::fresh_turned(3));
}
