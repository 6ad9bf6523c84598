//! The two topics of an aggregate type: created with their configs when
//! missing, their configuration read back and refused when it could lose
//! events or table rows, and their partition counts. Nothing here reads or
//! writes records.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::util::Timeout;

use crate::client::{Detached, client_config};
use crate::config::KafkaStoreConfig;
use crate::error::KafkaStoreError;

/// Creates the events topic `events` and the table topic `table` when
/// missing, refuses them when their configuration could lose events or
/// table rows (see [`check_topics`]), and answers their partition counts.
pub(crate) async fn prepare_topics(
    config: &KafkaStoreConfig,
    events: &str,
    table: &str,
) -> Result<(u32, u32), KafkaStoreError> {
    // Asking for a missing topic's metadata must not create it with the
    // broker's defaults (a table topic that is not compacted).
    let admin: AdminClient<DefaultClientContext> = client_config(config)
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(|e| KafkaStoreError::from_kafka("admin client", &e))?;
    let admin = Detached::new(Arc::new(admin));
    // A restart finds both topics: three independent questions, asked side
    // by side, answer it, and nothing is created. The configuration is only
    // judged once both topics are known to exist.
    let (checked, partitions, table_partitions) = futures::future::join3(
        check_topics(&admin, config, events, table),
        partitions_now(&admin, events, config.request_timeout),
        partitions_now(&admin, table, config.request_timeout),
    )
    .await;
    if let (Some(partitions), Some(table_partitions)) = (partitions?, table_partitions?) {
        checked?;
        return Ok((partitions, table_partitions));
    }
    ensure_topics(&admin, config, events, table).await?;
    let ((), partitions, table_partitions) = futures::future::try_join3(
        check_topics(&admin, config, events, table),
        partition_count(&admin, events, config.request_timeout),
        partition_count(&admin, table, config.request_timeout),
    )
    .await?;
    Ok((partitions, table_partitions))
}

/// Creates the two topics with their configs; an existing topic is fine
/// (its configuration is checked next).
async fn ensure_topics(
    admin: &AdminClient<DefaultClientContext>,
    config: &KafkaStoreConfig,
    events: &str,
    table: &str,
) -> Result<(), KafkaStoreError> {
    let retention = crate::config::THOUSAND_YEARS_MS.max(config.min_retention_ms).to_string();
    let partitions = i32::try_from(config.partitions).unwrap_or(i32::MAX);
    let replication = || TopicReplication::Fixed(config.replication_factor);
    let topics = [
        NewTopic::new(events, partitions, replication())
            .set("cleanup.policy", "delete")
            .set("retention.ms", &retention)
            .set("retention.bytes", "-1"),
        NewTopic::new(table, partitions, replication()).set("cleanup.policy", "compact"),
    ];
    let opts = admin_options(config);
    let results = bounded(config, "create topics", admin.create_topics(&topics, &opts)).await?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                let e = KafkaError::AdminOp(code);
                return Err(KafkaStoreError::from_kafka(&format!("create topic {topic}"), &e));
            }
        }
    }
    Ok(())
}

fn admin_options(config: &KafkaStoreConfig) -> AdminOptions {
    AdminOptions::new().request_timeout(Some(config.request_timeout)).operation_timeout(Some(config.request_timeout))
}

/// Runs a client future with the configured bound.
async fn bounded<T>(
    config: &KafkaStoreConfig,
    what: &str,
    f: impl Future<Output = Result<T, KafkaError>>,
) -> Result<T, KafkaStoreError> {
    match tokio::time::timeout(config.request_timeout + Duration::from_secs(1), f).await {
        Ok(r) => r.map_err(|e| KafkaStoreError::from_kafka(what, &e)),
        Err(_) => Err(KafkaStoreError::Unavailable(format!("{what}: no answer within {:?}", config.request_timeout))),
    }
}

/// Reads the topics' configuration back and refuses one that could lose
/// events (events topic) or table rows (table topic).
async fn check_topics(
    admin: &AdminClient<DefaultClientContext>,
    config: &KafkaStoreConfig,
    events: &str,
    table: &str,
) -> Result<(), KafkaStoreError> {
    let specs = [ResourceSpecifier::Topic(events), ResourceSpecifier::Topic(table)];
    let results =
        bounded(config, "describe topic configs", admin.describe_configs(&specs, &admin_options(config))).await?;
    let mut found: HashMap<String, HashMap<String, Option<String>>> = HashMap::new();
    for result in results {
        let resource =
            result.map_err(|code| KafkaStoreError::from_kafka("describe topic configs", &KafkaError::AdminOp(code)))?;
        let name = match &resource.specifier {
            rdkafka::admin::OwnedResourceSpecifier::Topic(t) => t.clone(),
            other => format!("{other:?}"),
        };
        found.insert(name, resource.entries.iter().map(|e| (e.name.clone(), e.value.clone())).collect());
    }
    let empty = HashMap::new();
    check_events_config(events, found.get(events).unwrap_or(&empty), config.min_retention_ms)?;
    check_table_config(table, found.get(table).unwrap_or(&empty))
}

/// The rules for the events topic: delete policy only, retention at least
/// `min_retention_ms` (and not `-1`), no size cap.
fn check_events_config(
    topic: &str,
    entries: &HashMap<String, Option<String>>,
    min_retention_ms: i64,
) -> Result<(), KafkaStoreError> {
    let refuse = |setting: &str, value: Option<&str>, reason: &str| KafkaStoreError::UnsafeTopic {
        topic: topic.to_owned(),
        setting: setting.to_owned(),
        value: value.unwrap_or("<missing>").to_owned(),
        reason: reason.to_owned(),
    };
    let get = |name: &str| entries.get(name).and_then(|v| v.as_deref()).map(str::trim);
    let policy = get("cleanup.policy");
    let policies: Vec<String> =
        policy.unwrap_or("").split(',').map(|p| p.trim().to_ascii_lowercase()).filter(|p| !p.is_empty()).collect();
    if policies.iter().any(|p| p == "compact") {
        return Err(refuse("cleanup.policy", policy, "compaction keeps only the last record of each aggregate"));
    }
    if policies != ["delete"] {
        return Err(refuse("cleanup.policy", policy, "KES needs exactly \"delete\" with an unbounded retention"));
    }
    let retention = get("retention.ms");
    match retention.map(str::parse::<i64>) {
        None => {
            return Err(refuse(
                "retention.ms",
                None,
                "the broker did not report it, so KES cannot tell how long events are kept",
            ));
        }
        Some(Err(_)) => return Err(refuse("retention.ms", retention, "not a number")),
        Some(Ok(-1)) => {
            return Err(refuse(
                "retention.ms",
                retention,
                "-1 means forever on Apache Kafka, but some compatible brokers delete all records of such a topic; \
                 set 1000 years (31536000000000)",
            ));
        }
        Some(Ok(ms)) if ms < min_retention_ms => {
            return Err(refuse(
                "retention.ms",
                retention,
                &format!("events older than that would be deleted (KES needs ≥ {min_retention_ms})"),
            ));
        }
        Some(Ok(_)) => {}
    }
    let bytes = get("retention.bytes");
    match bytes.map(str::parse::<i64>) {
        Some(Ok(-1)) => Ok(()),
        None => Err(refuse(
            "retention.bytes",
            None,
            "the broker did not report it, so KES cannot tell whether a size cap deletes events",
        )),
        Some(_) => Err(refuse("retention.bytes", bytes, "a size cap deletes the oldest events; KES needs -1")),
    }
}

/// The table topic must be compacted and never deleted by age.
fn check_table_config(topic: &str, entries: &HashMap<String, Option<String>>) -> Result<(), KafkaStoreError> {
    let policy = entries.get("cleanup.policy").and_then(|v| v.as_deref()).map(str::trim);
    let policies: Vec<String> =
        policy.unwrap_or("").split(',').map(|p| p.trim().to_ascii_lowercase()).filter(|p| !p.is_empty()).collect();
    if policies == ["compact"] {
        return Ok(());
    }
    Err(KafkaStoreError::UnsafeTopic {
        topic: topic.to_owned(),
        setting: "cleanup.policy".into(),
        value: policy.unwrap_or("<missing>").to_owned(),
        reason: "the table topic must be \"compact\" only: deletion would make the table forget aggregates".into(),
    })
}

/// The partition count of `topic`, waiting (bounded) for a topic created a
/// moment ago to show up in the metadata.
async fn partition_count(
    admin: &Arc<AdminClient<DefaultClientContext>>,
    topic: &str,
    timeout: Duration,
) -> Result<u32, KafkaStoreError> {
    let deadline = Instant::now() + timeout;
    loop {
        match partitions_now(admin, topic, timeout).await? {
            Some(n) => return Ok(n),
            None if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            None => {
                return Err(KafkaStoreError::Unavailable(format!("topic {topic} has no partitions in the metadata")));
            }
        }
    }
}

/// The partition count of `topic` as the metadata has it now: `None` while
/// the topic is missing (or has no partitions yet).
async fn partitions_now(
    admin: &Arc<AdminClient<DefaultClientContext>>,
    topic: &str,
    timeout: Duration,
) -> Result<Option<u32>, KafkaStoreError> {
    let a = Arc::clone(admin);
    let t = topic.to_owned();
    let result = tokio::task::spawn_blocking(move || {
        a.inner().fetch_metadata(Some(&t), Timeout::After(timeout)).map(|m| {
            m.topics().iter().find(|x| x.name() == t && x.error().is_none()).map_or(0, |x| x.partitions().len())
        })
    })
    .await
    .map_err(|e| KafkaStoreError::Broker(format!("metadata: {e}")))?;
    match result {
        Ok(0) => Ok(None),
        Ok(n) => u32::try_from(n).map(Some).map_err(|_| KafkaStoreError::Broker("too many partitions".into())),
        Err(e) => Err(KafkaStoreError::from_kafka(&format!("metadata of {topic}"), &e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(pairs: &[(&str, &str)]) -> HashMap<String, Option<String>> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), Some((*v).to_owned()))).collect()
    }

    #[test]
    fn events_topic_configs_that_could_lose_events_are_refused_by_name() {
        let ok = [("cleanup.policy", "delete"), ("retention.ms", "31536000000000"), ("retention.bytes", "-1")];
        let min = crate::config::THOUSAND_YEARS_MS;
        check_events_config("t", &entries(&ok), min).unwrap();
        let cases: [(&str, &str, &str); 6] = [
            ("cleanup.policy", "compact", "cleanup.policy"),
            ("cleanup.policy", "compact,delete", "cleanup.policy"),
            ("retention.ms", "-1", "retention.ms"),
            ("retention.ms", "604800000", "retention.ms"),
            ("retention.ms", "soon", "retention.ms"),
            ("retention.bytes", "1073741824", "retention.bytes"),
        ];
        for (name, value, setting) in cases {
            let mut e = entries(&ok);
            e.insert(name.to_owned(), Some(value.to_owned()));
            match check_events_config("t", &e, min) {
                Err(KafkaStoreError::UnsafeTopic { setting: s, value: v, .. }) => {
                    assert_eq!((s.as_str(), v.as_str()), (setting, value));
                }
                other => panic!("{name}={value}: {other:?}"),
            }
        }
        let mut missing = entries(&ok);
        missing.remove("retention.bytes");
        assert!(check_events_config("t", &missing, min).unwrap_err().to_string().contains("retention.bytes"));
    }

    #[test]
    fn table_topic_must_be_compacted_only() {
        check_table_config("t", &entries(&[("cleanup.policy", "compact")])).unwrap();
        assert!(check_table_config("t", &entries(&[("cleanup.policy", "delete")])).is_err());
        assert!(check_table_config("t", &entries(&[("cleanup.policy", "compact,delete")])).is_err());
        assert!(check_table_config("t", &HashMap::new()).is_err());
    }
}
