//! Services (fresh PostgreSQL databases, Kafka topic prefixes), raw
//! baselines, and the cqrs-es mirror of the Project aggregate.

use std::time::Duration;

use anyhow::{Context, bail};
use kes_core::DomainEvent as _;
use kes_examples::domain::{Project, ProjectCommand, ProjectError, ProjectEvent};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgConnection, PgPool};

/// A database created for one scenario, dropped by [`Postgres::drop_all`].
pub struct Postgres {
    base: String,
    created: Vec<String>,
}

impl Postgres {
    /// Connects to `KES_TEST_DATABASE_URL`; `Err` names why it is unavailable.
    pub async fn connect() -> Result<Self, String> {
        let base =
            std::env::var("KES_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let probe = tokio::time::timeout(Duration::from_secs(5), PgConnection::connect(&base)).await;
        match probe {
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
                Ok(Self { base, created: Vec::new() })
            }
            Ok(Err(e)) => Err(format!("PostgreSQL at KES_TEST_DATABASE_URL is unavailable: {e}")),
            Err(_) => Err("PostgreSQL at KES_TEST_DATABASE_URL did not answer within 5 s".into()),
        }
    }

    /// A fresh empty database; its URL.
    pub async fn fresh(&mut self, tag: &str) -> anyhow::Result<String> {
        let name = format!("kes_bench_{}_{tag}", std::process::id());
        let mut conn = PgConnection::connect(&self.base).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name}")).execute(&mut conn).await?;
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await?;
        conn.close().await?;
        self.created.push(name.clone());
        Ok(self.url_of(&name))
    }

    fn url_of(&self, db: &str) -> String {
        let (head, query) = match self.base.split_once('?') {
            Some((h, q)) => (h, format!("?{q}")),
            None => (self.base.as_str(), String::new()),
        };
        let prefix = match head.rfind('/') {
            Some(slash) if slash > head.find("://").map_or(0, |s| s + 2) => &head[..slash],
            _ => head,
        };
        format!("{prefix}/{db}{query}")
    }

    /// Drops every database this run created.
    pub async fn drop_all(&mut self) {
        if let Ok(mut conn) = PgConnection::connect(&self.base).await {
            for name in self.created.drain(..) {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut conn).await;
            }
        }
    }
}

/// A pool of `n` connections to `url` as postgres-es makes its own
/// (`default_postgress_pool`: sqlx's defaults, a ping before every use), for
/// the cqrs-es baseline, which is measured as its documentation sets it up.
pub async fn peer_pool(url: &str, n: u32) -> anyhow::Result<PgPool> {
    sqlx::postgres::PgPoolOptions::new().max_connections(n).connect(url).await.context("connecting to PostgreSQL")
}

/// A pool of `n` connections to `url`, checked before use as KES's own
/// pools are (a ping only after the connection idled), so that no side
/// pays a round trip the other does not.
pub async fn pool(url: &str, n: u32) -> anyhow::Result<PgPool> {
    kes_sql::pg_pool_options().max_connections(n).connect(url).await.context("connecting to PostgreSQL")
}

/// The Kafka broker from `KES_TEST_KAFKA_BROKERS`.
pub struct Kafka {
    /// Bootstrap servers.
    pub brokers: String,
}

impl Kafka {
    /// Checks the broker answers; `Err` names why it is unavailable.
    pub async fn connect() -> Result<Self, String> {
        let brokers = std::env::var("KES_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into());
        let probe = brokers.clone();
        let answer = tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer =
                ClientConfig::new().set("bootstrap.servers", &probe).create().map_err(|e| e.to_string())?;
            // A busy broker can miss one probe; three misses mean it is not there.
            let mut last = String::new();
            for _ in 0..3 {
                match consumer.fetch_metadata(None, Duration::from_secs(10)) {
                    Ok(_) => return Ok(()),
                    Err(e) => last = e.to_string(),
                }
            }
            Err(last)
        })
        .await;
        match answer {
            Ok(Ok(())) => Ok(Self { brokers }),
            Ok(Err(e)) => Err(format!("no Kafka broker at KES_TEST_KAFKA_BROKERS={brokers}: {e}")),
            Err(e) => Err(format!("probing Kafka failed: {e}")),
        }
    }

    /// A topic prefix no earlier run used.
    pub fn prefix(tag: &str) -> String {
        format!(
            "kesbench{}{tag}{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple().to_string().get(..6).unwrap_or("")
        )
    }

    /// Creates `topic` with `partitions` partitions.
    pub async fn create_topic(&self, topic: &str, partitions: i32) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &self.brokers).create()?;
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1))
            .set("retention.ms", "31536000000000")
            .set("retention.bytes", "-1");
        let results = admin.create_topics(&[new], &AdminOptions::new()).await?;
        for r in results {
            if let Err((name, code)) = r {
                bail!("creating topic {name}: {code}");
            }
        }
        Ok(())
    }

    /// An idempotent producer with `acks=all`, configured as the KES
    /// store's (no linger, as many requests in flight).
    pub fn producer(&self) -> anyhow::Result<FutureProducer> {
        Ok(ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "0")
            .set("max.in.flight.requests.per.connection", kes_store_kafka::PRODUCER_IN_FLIGHT.to_string())
            .create()?)
    }

    /// Key and value sizes of a newest record of `topic`.
    pub async fn record_size_newest(&self, topic: &str) -> anyhow::Result<(usize, usize)> {
        let brokers = self.brokers.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let consumer = raw_consumer(&brokers)?;
            let parts = watermarks(&consumer, &topic)?;
            let mut list = TopicPartitionList::new();
            for (p, _, _) in parts {
                list.add_partition_offset(&topic, p, Offset::OffsetTail(1))?;
            }
            consumer.assign(&list)?;
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while std::time::Instant::now() < deadline {
                if let Some(message) = consumer.poll(Duration::from_millis(200)) {
                    let m = message?;
                    return Ok((m.key().map_or(0, <[u8]>::len), m.payload().map_or(0, <[u8]>::len)));
                }
            }
            bail!("no record in {topic} within 20 s")
        })
        .await?
    }

    /// Reads every record of `topic` (of `partitions` partitions) from the
    /// beginning to its current end with a plain consumer: the records read.
    /// It starts at each partition's low watermark, a concrete offset, as
    /// KafkaStore's reads do: assigned a logical one (`Offset::Beginning`),
    /// a new librdkafka consumer waits half a second before it looks it up.
    /// It is told the partition count rather than asking for the topic's
    /// metadata: a new client's first metadata request races librdkafka's
    /// retirement of its bootstrap connection (about every other time the
    /// request fails there, and the retry waits 50 ms), which KafkaStore's
    /// reads never meet, since they ask a running client for the watermarks.
    pub async fn read_all(&self, topic: &str, partitions: i32) -> anyhow::Result<u64> {
        let brokers = self.brokers.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let consumer = raw_consumer(&brokers)?;
            let parts = partition_watermarks(&consumer, &topic, 0..partitions)?;
            let mut list = TopicPartitionList::new();
            let mut remaining = 0usize;
            let mut ends = std::collections::HashMap::new();
            for (p, low, high) in parts {
                if high > low {
                    list.add_partition_offset(&topic, p, Offset::Offset(low))?;
                    ends.insert(p, high);
                    remaining += 1;
                }
            }
            consumer.assign(&list)?;
            let mut read = 0u64;
            let deadline = std::time::Instant::now() + Duration::from_secs(300);
            while remaining > 0 {
                if std::time::Instant::now() > deadline {
                    bail!("reading {topic} took over 300 s");
                }
                match consumer.poll(Duration::from_millis(500)) {
                    Some(Ok(m)) => {
                        read += 1;
                        if ends.get(&m.partition()).is_some_and(|end| m.offset() + 1 >= *end) {
                            ends.remove(&m.partition());
                            remaining -= 1;
                        }
                    }
                    // Offsets can have holes (control records): the end of
                    // a partition is where the broker says it is.
                    Some(Err(KafkaError::PartitionEOF(p))) if ends.remove(&p).is_some() => remaining -= 1,
                    Some(Err(KafkaError::PartitionEOF(_))) => {}
                    Some(Err(e)) => return Err(e.into()),
                    None => {}
                }
            }
            detach(consumer);
            Ok(read)
        })
        .await?
    }
}

impl Kafka {
    /// How many records `topic` holds: the sum over its partitions of high
    /// minus low watermark.
    pub async fn records(&self, topic: &str) -> anyhow::Result<u64> {
        Ok(self
            .topic_watermarks(topic)
            .await?
            .iter()
            .map(|(_, low, high)| u64::try_from(high - low).unwrap_or(0))
            .sum())
    }

    /// The partition count of `topic`.
    pub async fn partitions(&self, topic: &str) -> anyhow::Result<i32> {
        Ok(i32::try_from(self.topic_watermarks(topic).await?.len())?)
    }

    /// The partitions of `topic` with their low and high watermarks, asked
    /// by a consumer of their own.
    async fn topic_watermarks(&self, topic: &str) -> anyhow::Result<Vec<(i32, i64, i64)>> {
        let brokers = self.brokers.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let consumer = raw_consumer(&brokers)?;
            let parts = watermarks(&consumer, &topic);
            detach(consumer);
            parts
        })
        .await?
    }
}

/// `fetch.wait.max.ms` of the raw range read, the same as KafkaStore's
/// bounded reads: Tansu holds every fetch answer for that long.
pub const RAW_FETCH_WAIT_MS: u32 = 5;

impl Kafka {
    /// Reads partition `partition` of `topic` from `from` up to (excluding)
    /// `to` with a plain consumer; the records whose key is `key`.
    pub async fn read_range(&self, topic: &str, partition: u32, from: u64, to: u64, key: &[u8]) -> anyhow::Result<u64> {
        let brokers = self.brokers.clone();
        let topic = topic.to_owned();
        let key = key.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut config = ClientConfig::new();
            config
                .set("bootstrap.servers", &brokers)
                .set("group.id", format!("kes-bench-{}", uuid::Uuid::new_v4()))
                .set("enable.auto.commit", "false")
                .set("fetch.wait.max.ms", RAW_FETCH_WAIT_MS.to_string())
                .set("fetch.max.bytes", (1u32 << 20).to_string());
            let consumer: BaseConsumer = config.create()?;
            let mut list = TopicPartitionList::new();
            list.add_partition_offset(&topic, partition as i32, Offset::Offset(from as i64))?;
            consumer.assign(&list)?;
            let mut found = 0u64;
            let deadline = std::time::Instant::now() + Duration::from_secs(300);
            loop {
                if std::time::Instant::now() > deadline {
                    bail!("reading {topic} took over 300 s");
                }
                match consumer.poll(Duration::from_millis(500)) {
                    Some(Ok(m)) => {
                        let offset = u64::try_from(m.offset()).unwrap_or(0);
                        if offset >= to {
                            break;
                        }
                        if m.key() == Some(key.as_slice()) {
                            found += 1;
                        }
                        if offset + 1 >= to {
                            break;
                        }
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => {}
                }
            }
            detach(consumer);
            Ok(found)
        })
        .await?
    }
}

/// Destroys a raw consumer on a thread of its own, as KafkaStore does with
/// the clients of its bounded reads: librdkafka's destroy joins the
/// client's threads (up to about 100 ms), which a reader that has its
/// records does not wait for.
fn detach(consumer: BaseConsumer) {
    std::thread::spawn(move || drop(consumer));
}

fn raw_consumer(brokers: &str) -> anyhow::Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("kes-bench-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        // As KafkaStore's bounded reads: Tansu holds every fetch answer for
        // the whole wait.
        .set("fetch.wait.max.ms", RAW_FETCH_WAIT_MS.to_string())
        .create()?)
}

/// The partitions of `topic`, each with its low and high watermarks.
fn watermarks(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Vec<(i32, i64, i64)>> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else { bail!("topic {topic} not found") };
    partition_watermarks(consumer, topic, t.partitions().iter().map(|p| p.id()))
}

/// Partitions `partitions` of `topic`, each with its low and high
/// watermarks.
fn partition_watermarks(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: impl IntoIterator<Item = i32>,
) -> anyhow::Result<Vec<(i32, i64, i64)>> {
    let mut parts = Vec::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        parts.push((p, low, high));
    }
    Ok(parts)
}

/// The Project aggregate seen through cqrs-es: the same state, commands,
/// rules and events, only wrapped (cqrs-es's traits cannot be implemented
/// on the domain's types from here).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CqrsProject(pub Project);

/// A [`ProjectEvent`] for cqrs-es.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CqrsEvent(pub ProjectEvent);

impl cqrs_es::DomainEvent for CqrsEvent {
    fn event_type(&self) -> String {
        self.0.event_type().to_owned()
    }
    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

impl cqrs_es::Aggregate for CqrsProject {
    const TYPE: &'static str = "project";
    type Command = ProjectCommand;
    type Event = CqrsEvent;
    type Error = ProjectError;
    type Services = ();

    async fn handle(
        &mut self,
        command: ProjectCommand,
        _: &(),
        sink: &cqrs_es::event_sink::EventSink<Self>,
    ) -> Result<(), ProjectError> {
        let events = kes_core::Aggregate::handle(&self.0, command)?;
        for event in events {
            sink.write(CqrsEvent(event), self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: CqrsEvent) {
        kes_core::Aggregate::apply(&mut self.0, &event.0);
    }
}

/// The tables postgres-es expects (its `db/init.sql`).
pub async fn cqrs_tables(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query(
        "CREATE TABLE events (aggregate_type text NOT NULL, aggregate_id text NOT NULL, \
         sequence bigint CHECK (sequence >= 0) NOT NULL, event_type text NOT NULL, event_version text NOT NULL, \
         payload json NOT NULL, metadata json NOT NULL, PRIMARY KEY (aggregate_type, aggregate_id, sequence))",
    )
    .execute(pool)
    .await?;
    sqlx::query(
        "CREATE TABLE snapshots (aggregate_type text NOT NULL, aggregate_id text NOT NULL, \
         last_sequence bigint CHECK (last_sequence >= 0) NOT NULL, current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL, \
         payload json NOT NULL, PRIMARY KEY (aggregate_type, aggregate_id, last_sequence))",
    )
    .execute(pool)
    .await?;
    Ok(())
}
