//! Event log and compacted table on Kafka (work in progress).
