//! The crate's one error type and how it maps to the core's portable kinds.

use kes_core::{Position, StoreError};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Why the Kafka store failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaStoreError {
    /// The brokers cannot be reached or did not answer in time; retrying
    /// later may work.
    #[error("Kafka unavailable: {0}")]
    Unavailable(String),
    /// The events topic is configured so that the broker could delete or
    /// compact events; KES refuses to write to it.
    #[error("topic {topic}: {setting}={value} could lose events ({reason}); fix the topic's configuration")]
    UnsafeTopic {
        /// The topic.
        topic: String,
        /// The offending setting (`cleanup.policy`, `retention.ms`, ...).
        setting: String,
        /// Its current value (`<missing>` when the broker did not report it).
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// A record in one of the topics cannot be read.
    #[error("{topic} record at {position} (aggregate {aggregate_id:?}, version {version}) cannot be read: {reason}")]
    Corrupt {
        /// The topic holding it.
        topic: String,
        /// Partition and offset.
        position: Position,
        /// The aggregate id, when the key or value told it.
        aggregate_id: Option<String>,
        /// The event version concerned (0 when unknown or a table record).
        version: u64,
        /// What is wrong.
        reason: String,
    },
    /// The configuration of the store or the Kafka client is invalid.
    #[error("invalid Kafka store configuration: {0}")]
    Config(String),
    /// The broker refused an operation in a way retrying will not fix.
    #[error("Kafka failure: {0}")]
    Broker(String),
}

impl KafkaStoreError {
    /// Sorts a client error into transient (`Unavailable`) and permanent.
    pub(crate) fn from_kafka(context: &str, e: &KafkaError) -> Self {
        let transient = match e {
            KafkaError::Canceled | KafkaError::NoMessageReceived => true,
            KafkaError::ClientCreation(_) | KafkaError::ClientConfig(..) => {
                return Self::Config(format!("{context}: {e}"));
            }
            _ => e.rdkafka_error_code().is_some_and(is_transient),
        };
        if transient { Self::Unavailable(format!("{context}: {e}")) } else { Self::Broker(format!("{context}: {e}")) }
    }
}

/// Codes after which the same request may succeed later (broker down,
/// leader moving, timeouts).
pub(crate) fn is_transient(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageTimedOut
            | C::RequestTimedOut
            | C::OperationTimedOut
            | C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::Resolve
            | C::QueueFull
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::BrokerNotAvailable
            | C::NetworkException
            | C::NotEnoughReplicas
            | C::NotEnoughReplicasAfterAppend
            | C::CoordinatorNotAvailable
            | C::NotCoordinator
            | C::CoordinatorLoadInProgress
            | C::UnknownTopicOrPartition
            | C::UnknownPartition
            | C::PurgeQueue
            | C::PurgeInflight
            | C::OutOfOrderSequenceNumber
            | C::InvalidProducerEpoch
            | C::UnknownProducerId
            | C::ProducerFenced
            | C::KafkaStorageError
            | C::Unknown
    )
}

impl From<KafkaStoreError> for StoreError {
    fn from(e: KafkaStoreError) -> Self {
        match e {
            KafkaStoreError::Unavailable(m) => StoreError::Unavailable(m),
            KafkaStoreError::Corrupt { topic, position, aggregate_id, version, reason } => StoreError::Corrupt {
                aggregate: topic,
                id: aggregate_id.unwrap_or_else(|| "?".to_owned()),
                version,
                reason: format!("record at {position}: {reason}"),
            },
            KafkaStoreError::Config(m) => StoreError::Invalid(m),
            other => StoreError::Backend(other.to_string()),
        }
    }
}

impl From<KafkaStoreError> for kes_core::ProjectionError {
    fn from(e: KafkaStoreError) -> Self {
        kes_core::ProjectionError::Store(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_errors_are_sorted_into_portable_kinds() {
        let down = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert!(matches!(KafkaStoreError::from_kafka("append", &down), KafkaStoreError::Unavailable(_)));
        let big = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        let e: StoreError = KafkaStoreError::from_kafka("append", &big).into();
        assert!(matches!(e, StoreError::Backend(_)) && !e.is_transient());
        let corrupt: StoreError = KafkaStoreError::Corrupt {
            topic: "t".into(),
            position: Position::new(1, 2),
            aggregate_id: Some("a".into()),
            version: 3,
            reason: "bad".into(),
        }
        .into();
        assert!(matches!(corrupt, StoreError::Corrupt { ref id, version: 3, .. } if id == "a"));
    }
}
