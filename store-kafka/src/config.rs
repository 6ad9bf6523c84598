//! How a [`crate::KafkaStore`] is configured.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::error::KafkaStoreError;

/// 1000 years in milliseconds: the events topic's `retention.ms` (the seed's
/// "awfully long" retention). Not `-1`: Kafka reads that as forever, but
/// some Kafka-compatible brokers (Tansu 0.6.0) delete such topics' records.
pub const THOUSAND_YEARS_MS: i64 = 1000 * 365 * 24 * 3600 * 1000;

/// [`KafkaStoreConfig::follow_wait`] unless set: short, for brokers that
/// hold every fetch for its whole wait.
pub const DEFAULT_FOLLOW_WAIT: Duration = Duration::from_millis(20);

/// Settings of a [`crate::KafkaStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaStoreConfig {
    /// `bootstrap.servers`: comma-separated `host:port` list.
    pub brokers: String,
    /// Topics are named `{prefix}.{aggregate}.events` and
    /// `{prefix}.{aggregate}.table`.
    pub topic_prefix: String,
    /// Partitions of both topics when KES creates them. Existing topics keep
    /// theirs (the partition of an aggregate depends on it: never change it
    /// on a topic with data).
    pub partitions: u32,
    /// Replication factor of topics KES creates (1 for a single test broker;
    /// 3 on a production cluster).
    pub replication_factor: i32,
    /// Upper bound of every broker round trip the store waits for: a produce
    /// (librdkafka `message.timeout.ms`), an admin call, a watermark query,
    /// the idle time of a scan. A down broker turns into
    /// [`kes_core::StoreError::Unavailable`] after at most this long.
    pub request_timeout: Duration,
    /// How many idempotency keys each aggregate remembers at least (kept
    /// in its table record, so they survive restarts).
    pub idempotency_keys_per_aggregate: usize,
    /// Keys younger than this are remembered beyond
    /// `idempotency_keys_per_aggregate` (up to 1,024 per aggregate): a
    /// client's retry through another instance may come after many
    /// commands on a hot aggregate.
    pub idempotency_window: Duration,
    /// Memory for the read cache: the events records of recently written
    /// aggregates, so that `read` of a hot aggregate needs no broker round
    /// trip. Whole histories are evicted, oldest first; 0 turns it off.
    pub read_cache_bytes: usize,
    /// How long a changed row waits before its table record is written.
    /// Commands on the row during the wait ride along in the same record, so
    /// a busy aggregate writes a few table records per second instead of
    /// one per command, and a table record never queues in front of the
    /// next command's events record. Recovery replays the events topic past
    /// what the table records reflect, so the delay costs nothing in
    /// durability, only a slightly longer catch-up at the next start.
    /// [`crate::KafkaStore::flush`] writes waiting records at once.
    pub table_write_delay: Duration,
    /// `session.timeout.ms` of the consumer group that picks, per events
    /// partition, the one instance writing its table records: how long a
    /// dead instance keeps its partitions (their table records wait, the
    /// events do not).
    pub owner_session_timeout: Duration,
    /// How long a fetch of the store's follower (and of the key store's
    /// reader) may wait at the head of the log for new records
    /// (`fetch.wait.max.ms`). Every read of another instance's write waits
    /// for the follower, so on brokers that hold every fetch for the whole
    /// wait even when records come (Tansu 0.6) this is added to the follow
    /// lag; there a follower at the head of an idle log also asks once per
    /// wait, and an idle `projects` service kept Tansu busy at 27–32 % of a
    /// core with the default, 4 % with 200 ms (docs/BENCHMARKS.md). Brokers
    /// that answer as soon as records come (Apache Kafka) lose no latency
    /// with a longer wait and get fewer idle requests. From 1 ms to 10 s,
    /// and shorter than `request_timeout`.
    pub follow_wait: Duration,
    /// The shortest `retention.ms` of the events topic KES accepts.
    pub min_retention_ms: i64,
    /// Extra librdkafka settings for every client (security, tuning), e.g.
    /// `security.protocol`, `linger.ms`. They override KES's defaults except
    /// for those KES's correctness or its reads rest on, which stay as KES
    /// needs them: the producers' `enable.idempotence` and `acks`, and the
    /// readers' group, offset, end-of-partition and fetch settings. A
    /// `receive.message.max.bytes` set here caps the fetch bound of the
    /// reads that go to the head of a topic (8 MiB otherwise).
    pub client: BTreeMap<String, String>,
}

impl KafkaStoreConfig {
    /// Defaults for brokers at `brokers` and topics under `topic_prefix`.
    pub fn new(brokers: impl Into<String>, topic_prefix: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topic_prefix: topic_prefix.into(),
            partitions: 3,
            replication_factor: 1,
            request_timeout: Duration::from_secs(10),
            idempotency_keys_per_aggregate: 32,
            idempotency_window: Duration::from_secs(600),
            owner_session_timeout: Duration::from_secs(6),
            read_cache_bytes: 64 << 20,
            table_write_delay: Duration::from_millis(250),
            follow_wait: DEFAULT_FOLLOW_WAIT,
            min_retention_ms: THOUSAND_YEARS_MS,
            client: BTreeMap::new(),
        }
    }

    /// Reads `kafka://host:port[,host:port…][?prefix=P&partitions=N&replication=R&timeout_ms=T&table_delay_ms=D&follow_wait_ms=W]`,
    /// the form the example service takes as its store URL. The prefix
    /// defaults to `kes`; a path (`kafka://h:9092/app`) is refused, since
    /// the prefix goes in the query.
    pub fn from_url(url: &str) -> Result<Self, KafkaStoreError> {
        let rest = url
            .strip_prefix("kafka://")
            .ok_or_else(|| KafkaStoreError::Config(format!("not a kafka:// URL: {url:?}")))?;
        let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
        let hosts = hosts.trim_end_matches('/');
        if hosts.is_empty() {
            return Err(KafkaStoreError::Config("the kafka:// URL names no broker".into()));
        }
        // `kafka://h:9092/app` would otherwise reach librdkafka as the
        // broker `h:9092/app`, and fail only when it cannot connect.
        if let Some((_, path)) = hosts.split_once('/') {
            return Err(KafkaStoreError::Config(format!(
                "the kafka:// URL has a path ({path:?}); the topic prefix goes in the query: ?prefix=P"
            )));
        }
        let mut config = Self::new(hosts, "kes");
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let number = || value.parse::<i64>().map_err(|_| KafkaStoreError::Config(format!("{name}={value:?}")));
            // A negative count of milliseconds becomes one too long for
            // every bound `validate` checks, so it is refused there.
            let millis = || number().map(|n| Duration::from_millis(u64::try_from(n).unwrap_or(u64::MAX)));
            match name {
                "prefix" if !value.is_empty() => config.topic_prefix = value.to_owned(),
                "partitions" => config.partitions = u32::try_from(number()?).unwrap_or(0),
                "replication" => config.replication_factor = i32::try_from(number()?).unwrap_or(0),
                "timeout_ms" => config.request_timeout = millis()?,
                "table_delay_ms" => config.table_write_delay = millis()?,
                "follow_wait_ms" => config.follow_wait = millis()?,
                _ => return Err(KafkaStoreError::Config(format!("unknown kafka:// URL parameter {pair:?}"))),
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the values that librdkafka would otherwise reject late.
    pub fn validate(&self) -> Result<(), KafkaStoreError> {
        let bad = |m: &str| Err(KafkaStoreError::Config(m.to_owned()));
        if self.brokers.trim().is_empty() {
            return bad("no brokers");
        }
        for broker in self.brokers.split(',') {
            check_broker(broker.trim()).map_err(|why| KafkaStoreError::Config(format!("broker {broker:?}: {why}")))?;
        }
        let prefix_ok = !self.topic_prefix.is_empty()
            && self.topic_prefix.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !prefix_ok {
            return bad("the topic prefix must be non-empty ASCII letters, digits, '.', '_' or '-'");
        }
        if self.partitions == 0 || self.partitions > 10_000 {
            return bad("partitions must be between 1 and 10000");
        }
        if self.replication_factor < 1 {
            return bad("the replication factor must be at least 1");
        }
        if self.request_timeout < Duration::from_millis(100) || self.request_timeout > Duration::from_secs(3600) {
            return bad("the request timeout must be between 100 ms and one hour");
        }
        if self.table_write_delay > Duration::from_secs(60) {
            return bad("the table write delay must be at most 60 s");
        }
        let follow_ok = self.follow_wait >= Duration::from_millis(1)
            && self.follow_wait <= Duration::from_secs(10)
            && self.follow_wait < self.request_timeout;
        if !follow_ok {
            return bad("the follow wait must be from 1 ms to 10 s and shorter than the request timeout");
        }
        Ok(())
    }

    /// The events topic of `aggregate`.
    pub fn events_topic(&self, aggregate: &str) -> String {
        format!("{}.{aggregate}.events", self.topic_prefix)
    }

    /// The table topic of `aggregate`.
    pub fn table_topic(&self, aggregate: &str) -> String {
        format!("{}.{aggregate}.table", self.topic_prefix)
    }
}

/// One entry of a broker list as librdkafka reads it:
/// `[protocol://]host[:port]`, an IPv6 host in brackets. Checked here so
/// that a typo is refused at start instead of surfacing as a connection
/// that never succeeds.
fn check_broker(broker: &str) -> Result<(), &'static str> {
    let address = match broker.split_once("://") {
        Some((protocol, rest))
            if !protocol.is_empty() && protocol.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
        {
            rest
        }
        Some(_) => return Err("not [protocol://]host[:port]"),
        None => broker,
    };
    if address.is_empty() {
        return Err("empty");
    }
    if address
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || matches!(b, b'/' | b'?' | b'#' | b'@'))
    {
        return Err("not [protocol://]host[:port]: a path, query, user or space");
    }
    let (host, port) = match address.strip_prefix('[') {
        Some(bracketed) => {
            let (host, after) = bracketed.split_once(']').ok_or("an IPv6 host without its closing bracket")?;
            match after {
                "" => (host, None),
                _ => (host, Some(after.strip_prefix(':').ok_or("not [host]:port")?)),
            }
        }
        None => match address.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (address, None),
        },
    };
    if host.is_empty() {
        return Err("no host");
    }
    match port.map(str::parse::<u16>) {
        None | Some(Ok(1..)) => Ok(()),
        Some(_) => Err("the port must be a number from 1 to 65535"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_read_or_refused() {
        let c = KafkaStoreConfig::from_url("kafka://127.0.0.1:9092?prefix=app&partitions=6").unwrap();
        assert_eq!((c.brokers.as_str(), c.topic_prefix.as_str(), c.partitions), ("127.0.0.1:9092", "app", 6));
        assert_eq!(c.events_topic("project"), "app.project.events");
        assert_eq!(KafkaStoreConfig::from_url("kafka://a:1,b:2/").unwrap().brokers, "a:1,b:2");
        let c = KafkaStoreConfig::from_url("kafka://h:1?table_delay_ms=0").unwrap();
        assert_eq!(c.table_write_delay, Duration::ZERO);
        assert_eq!(c.follow_wait, DEFAULT_FOLLOW_WAIT);
        let c = KafkaStoreConfig::from_url("kafka://h:1?follow_wait_ms=500").unwrap();
        assert_eq!(c.follow_wait, Duration::from_millis(500));
        for bad in [
            "http://x",
            "kafka://",
            "kafka://h:1?partitions=x",
            "kafka://h:1?partitions=0",
            "kafka://h:1?x=1",
            "kafka://h:1?table_delay_ms=-1",
            "kafka://h:1?table_delay_ms=600000",
            "kafka://h:1?follow_wait_ms=-1",
            "kafka://h:1?follow_wait_ms=0",
            "kafka://h:1?follow_wait_ms=10001",
            "kafka://h:1?timeout_ms=500&follow_wait_ms=500",
            "kafka://h:1?timeout_ms=-1",
            "kafka://h:1/app",
            "kafka://h:1,h:2/app/?partitions=3",
        ] {
            assert!(KafkaStoreConfig::from_url(bad).is_err(), "{bad}");
        }
        assert!(KafkaStoreConfig::new("h:1", "bad prefix").validate().is_err());
        for good in ["h", "h:9092", "10.0.0.1:9092, h2:9093", "[::1]:9092", "[::1]", "SASL_SSL://h:9093", "a:1,b:2"] {
            assert!(KafkaStoreConfig::new(good, "kes").validate().is_ok(), "{good}");
        }
        for bad in ["h:9092/app", "h:0", "h:65536", "h:port", ":9092", "h:1,,h:2", "h :1", "[::1:9092", "[::1]9092"] {
            let refused = KafkaStoreConfig::new(bad, "kes").validate().map_err(|e| e.to_string());
            assert!(refused.as_ref().is_err_and(|e| e.contains("broker")), "{bad}: {refused:?}");
        }
        assert!(KafkaStoreConfig::new("://h:1", "kes").validate().is_err());
        assert!(KafkaStoreConfig::new("u@h:1", "kes").validate().is_err());
        let path = KafkaStoreConfig::from_url("kafka://h:1/app").map(|_| ()).unwrap_err().to_string();
        assert!(path.contains("?prefix="), "{path}");
    }
}
