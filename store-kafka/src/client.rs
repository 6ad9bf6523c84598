//! Client settings: what every librdkafka client of the store shares, the
//! producer's and the consumers' own settings, and the producer slot that
//! replaces a producer left unusable by a failed send. Only here does the
//! store decide how it talks to the brokers.

use std::sync::{Arc, RwLock};

use rdkafka::ClientContext;
use rdkafka::Offset;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer};

use crate::config::KafkaStoreConfig;
use crate::error::KafkaStoreError;

/// Fetch size of scans and subscriptions.
const SCAN_FETCH_BYTES: u64 = 1 << 20;

/// `fetch.wait.max.ms` of reads that know where they end (start-up scans,
/// `read`, a subscription's reads below the partitions' tails): the data
/// is there, so a fetch has no reason to wait. It matters on brokers that
/// hold every fetch answer for the whole wait even when they have data
/// (Tansu 0.6 does): there each fetch of a bounded read would cost the
/// wait. Only the follower and the key store's reader wait at the head of
/// a log for new records ([`follow_wait_ms`]); subscriptions at the head
/// take them from the follower (see `tail`).
pub(crate) const BOUNDED_FETCH_WAIT_MS: u32 = 5;

/// `fetch.wait.max.ms` of a reader at the head of a log (the store's
/// follower, the key store's reader): the configured
/// [`KafkaStoreConfig::follow_wait`], in whole milliseconds.
pub(crate) fn follow_wait_ms(config: &KafkaStoreConfig) -> u32 {
    u32::try_from(config.follow_wait.as_millis()).unwrap_or(u32::MAX)
}

/// Upper bound of one fetch response, over all partitions. Kafka brokers
/// size a response by `max.partition.fetch.bytes`; some compatible brokers
/// (Tansu) only by this request-wide bound, and assemble the whole response
/// before sending any of it: a large bound there means long silences while
/// reading a big topic, and a read that wants a few records past its start
/// waits for the whole bound. It stays above the largest record a producer
/// sends (`message.max.bytes`, 1,000,000 by default), which such a broker
/// would otherwise never return.
const FETCH_MAX_BYTES: u64 = 1 << 20;

/// The request-wide bound of a read that goes to the end of its
/// partitions ([`Reach::ToTheHead`]): nothing lies past what it wants, so a
/// large response brings nothing it does not read. Each fetch costs a
/// broker that assembles whole responses (Tansu) a fixed overhead beside
/// its per-record work: a plain read of a 3 MB table topic took about 8 ms
/// more in fetches of 1 MiB than in one fetch (medians of eight reads
/// each). At Tansu's pace, about 40 ms per megabyte, a fetch of this bound
/// is a silence of about a third of a second, far within the read's idle
/// bound (the request timeout).
const TO_THE_HEAD_FETCH_MAX_BYTES: u64 = 8 << 20;

/// Where a read ends, which decides how much one fetch may bring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reach {
    /// At the partitions' high watermarks as they were just asked: a scan
    /// of a whole topic, or a catch-up to its head.
    ToTheHead,
    /// Anywhere: a stretch in the middle of a partition, or an endless
    /// subscription. A fetch past the read's end would be wasted.
    Within,
}

/// What librdkafka adds to `fetch.max.bytes` for a response's protocol
/// overhead when it checks it against `receive.message.max.bytes`.
const RESPONSE_OVERHEAD_BYTES: u64 = 512;

impl Reach {
    /// `fetch.max.bytes` of a reader of this reach under `config`. A
    /// `receive.message.max.bytes` the user set (librdkafka adjusts it only
    /// when nobody did) caps a read to the head's bound, since librdkafka
    /// refuses a consumer whose fetch bound does not fit in it; never
    /// below [`FETCH_MAX_BYTES`], which every reader has always asked for.
    pub(crate) fn fetch_max_bytes(self, config: &KafkaStoreConfig) -> u64 {
        let bound = match self {
            Self::ToTheHead => TO_THE_HEAD_FETCH_MAX_BYTES,
            Self::Within => FETCH_MAX_BYTES,
        };
        let receive = config.client.get("receive.message.max.bytes").and_then(|v| v.trim().parse::<u64>().ok());
        match receive {
            Some(receive) => bound.min(receive.saturating_sub(RESPONSE_OVERHEAD_BYTES).max(FETCH_MAX_BYTES)),
            None => bound,
        }
    }
}

/// The settings every client shares, then the user's overrides.
pub(crate) fn client_config(config: &KafkaStoreConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    let timeout = config.request_timeout.as_millis().to_string();
    c.set("bootstrap.servers", &config.brokers)
        .set("socket.timeout.ms", &timeout)
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "1000")
        .set("log_level", "3");
    for (k, v) in &config.client {
        c.set(k, v);
    }
    c
}

/// librdkafka's setting for the produce requests in flight per broker.
const MAX_IN_FLIGHT: &str = "max.in.flight.requests.per.connection";

/// The produce requests an events producer keeps in flight per broker.
pub const PRODUCER_IN_FLIGHT: u32 = 2;

pub(crate) fn create_producer(config: &KafkaStoreConfig) -> Result<FutureProducer, KafkaStoreError> {
    producer_config(config).create().map_err(|e| KafkaStoreError::from_kafka("producer", &e))
}

/// The events producer's settings: `config`'s client settings, then the
/// store's defaults for those it leaves out.
fn producer_config(config: &KafkaStoreConfig) -> ClientConfig {
    let mut c = client_config(config);
    let timeout = config.request_timeout.as_millis();
    // Every append waits for its record: lingering would add to each
    // command's latency. Under concurrency records still share requests,
    // since they queue while earlier requests are in flight.
    if !config.client.contains_key("linger.ms") {
        c.set("linger.ms", "0");
    }
    // At most two produce requests in flight per broker (five by default
    // with idempotence): under load the records that wait share the next
    // request, so a command costs the broker fewer requests. On Tansu this
    // raised the rate of 64 concurrent PATCHes by about 40 % (see
    // docs/BENCHMARKS.md); a lone append is sent at once either way.
    if !config.client.contains_key(MAX_IN_FLIGHT) {
        c.set(MAX_IN_FLIGHT, PRODUCER_IN_FLIGHT.to_string());
    }
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", timeout.to_string())
        .set("request.timeout.ms", timeout.clamp(100, 30_000).to_string());
    c
}

/// A consumer for assign + seek reads. It keeps librdkafka's deep
/// prefetch queue, so that fetches overlap with the caller's work (a
/// shallow queue starves on brokers with slow fetches). `wait_ms` is its
/// `fetch.wait.max.ms` ([`BOUNDED_FETCH_WAIT_MS`] or
/// [`follow_wait_ms`]); `reach` sizes its fetches.
pub(crate) fn create_consumer(
    config: &KafkaStoreConfig,
    eof: bool,
    wait_ms: u32,
    reach: Reach,
) -> Result<Reader, KafkaStoreError> {
    consumer_config(config, eof, wait_ms, reach)
        .create_with_context(ReadContext)
        .map_err(|e| KafkaStoreError::from_kafka("consumer", &e))
}

/// The settings of [`create_consumer`]: `config`'s client settings, then
/// those the reads rest on.
fn consumer_config(config: &KafkaStoreConfig, eof: bool, wait_ms: u32, reach: Reach) -> ClientConfig {
    let mut c = client_config(config);
    let fetch_max = reach.fetch_max_bytes(config);
    c.set("max.partition.fetch.bytes", SCAN_FETCH_BYTES.clamp(1024, fetch_max).to_string())
        .set("fetch.max.bytes", fetch_max.to_string());
    // librdkafka wants a group id even for assign(); nothing is ever
    // committed to it (checkpoints belong to the readers).
    c.set("group.id", format!("{}.kes-readers", config.topic_prefix))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", if eof { "true" } else { "false" })
        .set("fetch.wait.max.ms", wait_ms.to_string());
    c
}

/// Where a reader assigned to a partition starts: `next`, as a concrete
/// offset even when it is 0. A logical offset (`Offset::Beginning`) has to
/// be looked up at the partition's leader, and a new client that does not
/// know the leader yet puts that lookup off by half a second; every
/// start-up scan, catch-up and subscription from the start of a topic
/// paid it. Offset 0 is the start of every partition whose records were
/// never deleted; where the oldest were (retention), the fetch is out of
/// range and `auto.offset.reset = earliest` moves the reader to the first
/// record left, as `Offset::Beginning` would have.
pub(crate) fn start_at(next: u64) -> Offset {
    Offset::Offset(i64::try_from(next).unwrap_or(i64::MAX))
}

/// A librdkafka client destroyed away from its owner's task. librdkafka's
/// destroy joins the client's threads, each of which notices at its next
/// wake-up: dropping a client takes up to about 100 ms. A bounded read, or
/// a start-up done with its admin client, hands the client to a blocking
/// thread to be destroyed there instead of waiting for it.
pub(crate) struct Detached<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> Detached<T> {
    pub(crate) fn new(client: T) -> Self {
        Self(Some(client))
    }
}

impl<T: Send + 'static> std::ops::Deref for Detached<T> {
    type Target = T;

    fn deref(&self) -> &T {
        // Taken only by `drop`.
        self.0.as_ref().unwrap_or_else(|| unreachable!("a detached client is present until dropped"))
    }
}

impl<T: Send + 'static> Drop for Detached<T> {
    fn drop(&mut self) {
        let Some(client) = self.0.take() else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(move || drop(client));
            }
            Err(_) => drop(client),
        }
    }
}

/// The store's assign + seek consumers.
pub(crate) type Reader = StreamConsumer<ReadContext>;

/// The client context of the store's consumers: librdkafka's errors are
/// logged as the default context does, except the end-of-partition events
/// a bounded read asks for (`enable.partition.eof`), which librdkafka also
/// reports as client-wide errors: they are how a scan knows it is done.
pub(crate) struct ReadContext;

impl ClientContext for ReadContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let eof = matches!(error, KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF);
        if eof {
            return;
        }
        tracing::error!(%error, reason, "librdkafka");
    }
}

impl ConsumerContext for ReadContext {}

/// The producer every send of the store uses. Replaced when librdkafka
/// reports a fatal producer error, or after a send that failed for lack of
/// an answer (see [`ProducerSlot::replace_failed`]).
pub(crate) struct ProducerSlot {
    current: RwLock<Arc<FutureProducer>>,
}

impl ProducerSlot {
    pub(crate) fn new(producer: Arc<FutureProducer>) -> Self {
        Self { current: RwLock::new(producer) }
    }

    /// The producer to send with now.
    pub(crate) fn current(&self) -> Arc<FutureProducer> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Starts a fresh producer in place of `failed` after a fatal error or
    /// (`after_timeout`) a send that failed for lack of an answer.
    ///
    /// Why the latter: an idempotent librdkafka producer whose message
    /// timed out bumps its epoch locally and keeps producing with it; some
    /// brokers (Tansu 0.6.0) cannot handle an epoch they never issued. A
    /// fresh producer asks the broker for a new producer id instead.
    pub(crate) fn replace_failed(&self, config: &KafkaStoreConfig, failed: &Arc<FutureProducer>, after_timeout: bool) {
        let fatal = failed.client().fatal_error();
        if fatal.is_none() && !after_timeout {
            return;
        }
        let mut slot = self.current.write().unwrap_or_else(|p| p.into_inner());
        if Arc::ptr_eq(&slot, failed) {
            match create_producer(config) {
                Ok(fresh) => {
                    tracing::warn!(?fatal, "producer replaced after a failed send");
                    *slot = Arc::new(fresh);
                }
                Err(e) => tracing::error!(error = %e, "cannot replace the failed producer"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use rdkafka::Offset;

    use super::{
        BOUNDED_FETCH_WAIT_MS, Detached, FETCH_MAX_BYTES, MAX_IN_FLIGHT, PRODUCER_IN_FLIGHT, Reach, consumer_config,
        create_consumer, follow_wait_ms, producer_config, start_at,
    };
    use crate::config::KafkaStoreConfig;

    #[test]
    fn the_producer_keeps_two_requests_in_flight_unless_told_otherwise() {
        let mut config = KafkaStoreConfig::new("127.0.0.1:1", "t");
        let defaults = producer_config(&config);
        assert_eq!(defaults.get(MAX_IN_FLIGHT), Some(PRODUCER_IN_FLIGHT.to_string().as_str()));
        assert_eq!(defaults.get("enable.idempotence"), Some("true"));
        assert_eq!(defaults.get("linger.ms"), Some("0"));
        config.client.insert(MAX_IN_FLIGHT.to_owned(), "5".to_owned());
        assert_eq!(producer_config(&config).get(MAX_IN_FLIGHT), Some("5"), "a client setting wins");
    }

    #[test]
    fn readers_at_the_head_wait_as_configured_and_bounded_reads_do_not() {
        let mut config = KafkaStoreConfig::new("127.0.0.1:1", "t");
        let wait = |c: &KafkaStoreConfig, ms| {
            consumer_config(c, false, ms, Reach::Within).get("fetch.wait.max.ms").map(str::to_owned)
        };
        assert_eq!(wait(&config, follow_wait_ms(&config)).as_deref(), Some("20"));
        config.follow_wait = std::time::Duration::from_millis(500);
        // A client setting does not move it: the follow lag rests on it.
        config.client.insert("fetch.wait.max.ms".to_owned(), "3000".to_owned());
        assert_eq!(wait(&config, follow_wait_ms(&config)).as_deref(), Some("500"));
        assert_eq!(wait(&config, BOUNDED_FETCH_WAIT_MS).as_deref(), Some("5"));
    }

    #[test]
    fn only_reads_to_the_head_fetch_more_than_a_megabyte() {
        // A read that stops in the middle of a partition would make Tansu
        // gather the whole bound past its end; one to the head cannot
        // overshoot, and saves the broker a fetch per megabyte.
        let config = KafkaStoreConfig::new("127.0.0.1:1", "kes-test");
        assert_eq!(Reach::Within.fetch_max_bytes(&config), FETCH_MAX_BYTES);
        assert!(Reach::ToTheHead.fetch_max_bytes(&config) >= 4 * FETCH_MAX_BYTES);
        // Both stay above the largest record a producer sends by default,
        // which a broker sizing by this bound would otherwise never return.
        assert!(Reach::Within.fetch_max_bytes(&config) > 1_000_000);
    }

    #[tokio::test]
    async fn a_users_receive_bound_still_lets_every_reader_start() {
        // librdkafka refuses a consumer whose fetch bound plus its protocol
        // overhead passes an explicitly set `receive.message.max.bytes`.
        let mut config = KafkaStoreConfig::new("127.0.0.1:1", "kes-test");
        config.client.insert("receive.message.max.bytes".into(), "2000000".into());
        for reach in [Reach::ToTheHead, Reach::Within] {
            let consumer = create_consumer(&config, true, BOUNDED_FETCH_WAIT_MS, reach);
            assert!(consumer.is_ok(), "{reach:?}: {:?}", consumer.err());
        }
        assert_eq!(Reach::ToTheHead.fetch_max_bytes(&config), 2_000_000 - 512);
        // A bound below what readers always asked for is the user's to fix:
        // it never shrinks the ordinary readers' bound.
        config.client.insert("receive.message.max.bytes".into(), "100000".into());
        assert_eq!(Reach::ToTheHead.fetch_max_bytes(&config), FETCH_MAX_BYTES);
        assert_eq!(Reach::Within.fetch_max_bytes(&config), FETCH_MAX_BYTES);
    }

    #[test]
    fn readers_start_at_concrete_offsets_even_at_the_start() {
        // A logical offset would cost every new reader from the start of a
        // partition half a second before its first fetch.
        assert_eq!(start_at(0), Offset::Offset(0));
        assert_eq!(start_at(41), Offset::Offset(41));
        assert_eq!(start_at(u64::MAX), Offset::Offset(i64::MAX));
    }

    /// Stands for a client whose destroy blocks until `release` answers
    /// (or 5 s pass).
    struct SlowDestroy {
        release: mpsc::Receiver<()>,
        destroyed: mpsc::Sender<()>,
    }

    impl Drop for SlowDestroy {
        fn drop(&mut self) {
            let _ = self.release.recv_timeout(std::time::Duration::from_secs(5));
            let _ = self.destroyed.send(());
        }
    }

    #[tokio::test]
    async fn a_detached_client_is_destroyed_without_holding_up_its_owner() {
        let (release_tx, release) = mpsc::channel();
        let (destroyed, destroyed_rx) = mpsc::channel();
        let client = Detached::new(SlowDestroy { release, destroyed });
        // Were the destroy run here, it would wait out the 5 s and report
        // itself destroyed before `release` is sent.
        drop(client);
        assert!(destroyed_rx.try_recv().is_err(), "not destroyed yet: it waits for its release");
        release_tx.send(()).unwrap();
        let done = tokio::task::spawn_blocking(move || destroyed_rx.recv()).await.unwrap();
        assert!(done.is_ok(), "destroyed on a blocking thread once released");
    }

    #[test]
    fn outside_a_runtime_a_detached_client_is_destroyed_in_place() {
        let (release_tx, release) = mpsc::channel();
        let (destroyed, destroyed_rx) = mpsc::channel();
        release_tx.send(()).unwrap();
        drop(Detached::new(SlowDestroy { release, destroyed }));
        assert!(destroyed_rx.try_recv().is_ok());
    }
}
