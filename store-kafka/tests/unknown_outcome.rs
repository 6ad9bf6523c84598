//! Unknown outcomes: an append whose record the broker wrote but whose
//! acknowledgement never reached the store, and one whose request never
//! reached the broker. Both look the same to the store (no answer within
//! the request timeout), so it answers `Unavailable` and, before the next
//! operation on the partition, reads the log to learn what really landed.
//! A third case: the broker wrote the record but answered with a retriable
//! error, so librdkafka resends it and the broker recognises the resent
//! batch.
//!
//! The faults are injected on the wire: a proxy between the store and a
//! dedicated Tansu broker forwards every request and response untouched,
//! except the one produce it is told to alter. To lose a response, it
//! forwards the request, waits for the broker's answer (so the record is
//! stored) and drops it; to lose a request, it never forwards it. Either
//! way the connection then stays silent, as a broken link would, until the
//! client gives up on it. To fail after the write, it forwards the broker's
//! answer with an error code in place of success. The broker advertises the
//! proxy's address, so every connection of every client goes through the
//! proxy. What landed is checked against the log itself, read with a plain
//! consumer.
//!
//! Why not librdkafka's mock cluster (`rdkafka::mocking`): `KafkaStore::open`
//! creates its topics (CreateTopics) and reads their configuration back
//! (DescribeConfigs). The mock cluster implements neither request, and its
//! metadata names a controller (broker 0) that does not exist (its brokers
//! are numbered from 1), so both admin calls wait for a controller until
//! they fail with `OperationTimedOut`, whether or not the topics were
//! created beforehand with `MockCluster::create_topic`.
//!
//! Why not `scripts/kafka-broker.sh`: it makes the broker advertise the
//! address it listens on, and here it must advertise the proxy's.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kes_core::conformance::{Ledger, LedgerEvent};
use kes_core::{Appended, EventStore, ExpectedVersion, Metadata, Position, StoreError};
use kes_store_kafka::{KafkaStore, KafkaStoreConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::oneshot;

/// The store's request timeout: short, so that a lost answer turns into
/// `Unavailable` quickly.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a call may take before the test calls it hung: far beyond the
/// store's own bound (about twice the request timeout), so a slow machine
/// only waits longer.
const HUNG: Duration = Duration::from_secs(120);

/// Kafka's ApiKey of Produce requests.
const PRODUCE: i16 = 0;

/// Kafka's NOT_ENOUGH_REPLICAS_AFTER_APPEND: the leader wrote the records,
/// but fewer replicas than `min.insync.replicas` have them. Retriable; the
/// records may well be in the log.
const NOT_ENOUGH_REPLICAS_AFTER_APPEND: i16 = 20;

/// What the proxy does to one produce exchange.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The broker gets the request and answers; the answer is dropped and
    /// the connection goes silent.
    LoseResponse,
    /// The request is never forwarded, so the broker never sees it; the
    /// connection goes silent.
    LoseRequest,
    /// The broker gets the request and answers; its answer reaches the
    /// client with this error code in place of the topic's result.
    FailAfterWrite(i16),
}

/// A fault waiting for the next produce request that names `topic`.
struct Armed {
    fault: Fault,
    topic: Vec<u8>,
    /// Told once the fault happened: the broker's answer arrived and was
    /// dropped or altered, or the request was held back.
    done: oneshot::Sender<()>,
}

/// A produce request whose answer the proxy is waiting for.
struct Doomed {
    correlation: i32,
    version: i16,
    armed: Armed,
}

/// What one proxied connection is doing.
#[derive(Default)]
struct Connection {
    /// Requests from the client are no longer forwarded.
    silent: bool,
    doomed: Option<Doomed>,
    /// Responses from the broker are no longer forwarded.
    deaf: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A TCP proxy to one broker that reads the Kafka protocol's framing.
struct Proxy {
    addr: String,
    armed: Arc<Mutex<Option<Armed>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// Accepts on `listener` and forwards each connection to `upstream`.
    fn start(listener: TcpListener, upstream: String) -> Self {
        let addr = listener.local_addr().expect("proxy address").to_string();
        let armed: Arc<Mutex<Option<Armed>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (shared, stopping) = (Arc::clone(&armed), Arc::clone(&stop));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::Acquire) {
                    break;
                }
                let Ok(client) = client else { continue };
                let (armed, upstream) = (Arc::clone(&shared), upstream.clone());
                std::thread::spawn(move || serve(client, &upstream, armed));
            }
        });
        Self { addr, armed, stop }
    }

    /// Applies `fault` to the next produce exchange that carries records of
    /// `topic`; the receiver is told once it happened.
    fn inject(&self, fault: Fault, topic: &str) -> oneshot::Receiver<()> {
        let (done, happened) = oneshot::channel();
        let previous = lock(&self.armed).replace(Armed { fault, topic: topic.as_bytes().to_vec(), done });
        assert!(previous.is_none(), "a fault was still waiting for its produce");
        happened
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect(&self.addr);
    }
}

/// One size-prefixed Kafka frame, prefix included; `None` at the end of the
/// stream.
fn read_frame(from: &mut TcpStream) -> Option<Vec<u8>> {
    let mut size = [0u8; 4];
    from.read_exact(&mut size).ok()?;
    let len = usize::try_from(i32::from_be_bytes(size)).ok()?;
    let mut frame = vec![0u8; 4 + len];
    frame[..4].copy_from_slice(&size);
    from.read_exact(&mut frame[4..]).ok()?;
    Some(frame)
}

/// Reads a frame field by field (big-endian, Kafka's encodings).
struct Fields<'a> {
    frame: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let out = self.frame.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(out)
    }

    fn i16(&mut self) -> Option<i16> {
        Some(i16::from_be_bytes(self.bytes(2)?.try_into().ok()?))
    }

    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.bytes(4)?.try_into().ok()?))
    }

    fn uvarint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.bytes(1)?[0];
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    /// An array's length (a null array has none).
    fn len(&mut self, flexible: bool) -> Option<usize> {
        if flexible {
            usize::try_from(self.uvarint()?.saturating_sub(1)).ok()
        } else {
            Some(usize::try_from(self.i32()?).unwrap_or(0))
        }
    }

    /// A (nullable) string's bytes (empty when null).
    fn string(&mut self, flexible: bool) -> Option<&'a [u8]> {
        let n = if flexible {
            usize::try_from(self.uvarint()?.saturating_sub(1)).ok()?
        } else {
            usize::try_from(self.i16()?).unwrap_or(0)
        };
        self.bytes(n)
    }

    /// Tagged fields (flexible versions only).
    fn tags(&mut self, flexible: bool) -> Option<()> {
        if flexible {
            for _ in 0..self.uvarint()? {
                self.uvarint()?;
                let size = usize::try_from(self.uvarint()?).ok()?;
                self.bytes(size)?;
            }
        }
        Some(())
    }
}

/// Where the error codes of `topic`'s partitions sit in a Produce response
/// of version `version` (frame with its size prefix).
fn produce_error_codes(frame: &[u8], version: i16, topic: &[u8]) -> Option<Vec<usize>> {
    let flexible = version >= 9;
    let mut f = Fields { frame, at: 8 };
    f.tags(flexible)?;
    let mut found = Vec::new();
    for _ in 0..f.len(flexible)? {
        let name = f.string(flexible)?;
        for _ in 0..f.len(flexible)? {
            f.i32()?; // partition index
            if name == topic {
                found.push(f.at);
            }
            f.i16()?; // error code
            f.bytes(8)?; // base offset
            if version >= 2 {
                f.bytes(8)?; // log append time
            }
            if version >= 5 {
                f.bytes(8)?; // log start offset
            }
            if version >= 8 {
                for _ in 0..f.len(flexible)? {
                    f.i32()?; // batch index
                    f.string(flexible)?; // its error message
                    f.tags(flexible)?;
                }
                f.string(flexible)?; // error message
            }
            f.tags(flexible)?;
        }
        f.tags(flexible)?;
    }
    Some(found)
}

/// Forwards one client connection to the broker, both ways, until either
/// side closes it.
fn serve(client: TcpStream, upstream: &str, armed: Arc<Mutex<Option<Armed>>>) {
    let Ok(broker) = TcpStream::connect(upstream) else { return };
    let state: Arc<Mutex<Connection>> = Arc::default();
    let (Ok(client_in), Ok(client_out), Ok(broker_in), Ok(broker_out)) =
        (client.try_clone(), client.try_clone(), broker.try_clone(), broker.try_clone())
    else {
        return;
    };
    let responses = {
        let state = Arc::clone(&state);
        std::thread::spawn(move || forward_responses(broker_in, client_out, &state))
    };
    forward_requests(client_in, broker_out, &state, &armed);
    // Whichever side ended, the other one's read returns now.
    let _ = client.shutdown(Shutdown::Both);
    let _ = broker.shutdown(Shutdown::Both);
    let _ = responses.join();
}

fn forward_requests(
    mut client: TcpStream,
    mut broker: TcpStream,
    state: &Mutex<Connection>,
    armed: &Mutex<Option<Armed>>,
) {
    while let Some(frame) = read_frame(&mut client) {
        let mut connection = lock(state);
        if connection.silent {
            continue;
        }
        // Request header: api key (i16), api version (i16), correlation id (i32).
        let mut header = Fields { frame: &frame, at: 4 };
        let (Some(api), Some(version), Some(correlation)) = (header.i16(), header.i16(), header.i32()) else {
            break;
        };
        if api == PRODUCE {
            let mut slot = lock(armed);
            // Topic names are unique to each test: a request that contains
            // the name carries records of that topic.
            let hit = slot.as_ref().is_some_and(|a| frame.windows(a.topic.len()).any(|w| w == a.topic));
            if let Some(armed) = slot.take_if(|_| hit) {
                drop(slot);
                match armed.fault {
                    Fault::LoseRequest => {
                        connection.silent = true;
                        let _ = armed.done.send(());
                        continue;
                    }
                    Fault::LoseResponse => connection.silent = true,
                    Fault::FailAfterWrite(_) => {}
                }
                connection.doomed = Some(Doomed { correlation, version, armed });
            }
        }
        drop(connection);
        if broker.write_all(&frame).is_err() {
            break;
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = broker.shutdown(Shutdown::Both);
}

fn forward_responses(mut broker: TcpStream, mut client: TcpStream, state: &Mutex<Connection>) {
    while let Some(mut frame) = read_frame(&mut broker) {
        let mut connection = lock(state);
        if connection.deaf {
            continue;
        }
        // Response header: correlation id (i32).
        let correlation = Fields { frame: &frame, at: 4 }.i32();
        if let Some(doomed) = connection.doomed.take_if(|d| Some(d.correlation) == correlation) {
            match doomed.armed.fault {
                Fault::LoseResponse | Fault::LoseRequest => {
                    connection.deaf = true;
                    let _ = doomed.armed.done.send(());
                    continue;
                }
                Fault::FailAfterWrite(code) => {
                    let at = produce_error_codes(&frame, doomed.version, &doomed.armed.topic)
                        .filter(|at| !at.is_empty())
                        .unwrap_or_else(|| panic!("a produce response v{} without the topic", doomed.version));
                    for at in at {
                        frame[at..at + 2].copy_from_slice(&code.to_be_bytes());
                    }
                    let _ = doomed.armed.done.send(());
                }
            }
        }
        drop(connection);
        if client.write_all(&frame).is_err() {
            break;
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = broker.shutdown(Shutdown::Both);
}

/// The Tansu binary, where `scripts/kafka-broker.sh install` puts it.
fn tansu_binary() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/tansu"));
    let works = |bin: &PathBuf| Command::new(bin).arg("--version").output().is_ok_and(|o| o.status.success());
    home.filter(works).or_else(|| Some(PathBuf::from("tansu")).filter(works))
}

/// A dedicated Tansu broker (SQLite engine in a temp dir) that listens on
/// one port and advertises another; killed when dropped.
struct Tansu {
    child: Child,
    dir: tempfile::TempDir,
}

impl Tansu {
    fn start(port: u16, advertised: u16) -> Result<Self, String> {
        let bin = tansu_binary().ok_or("tansu is not installed (scripts/kafka-broker.sh install)")?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.path().join("tansu.log")).map_err(|e| e.to_string())?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .current_dir(dir.path())
            .args(["broker", "--listener-url", &format!("tcp://127.0.0.1:{port}")])
            .args(["--advertised-listener-url", &format!("tcp://127.0.0.1:{advertised}")])
            .args(["--storage-engine", "sqlite://./tansu.db"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut tansu = Self { child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = tansu.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() >= deadline {
                return Err(format!("tansu did not start ({exited:?}): {}", tansu.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(tansu)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A store connected through the proxy to its own broker (fields drop in
/// this order: the store before the proxy and the broker).
struct Rig {
    store: KafkaStore<Ledger>,
    config: KafkaStoreConfig,
    proxy: Proxy,
    broker: Tansu,
}

impl Rig {
    /// Runs wherever the broker tests run (`KES_TEST_KAFKA_BROKERS` set).
    async fn start() -> Option<Self> {
        common::brokers()?;
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listener");
        let advertised = listener.local_addr().expect("proxy address").port();
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let broker = match Tansu::start(port, advertised) {
            Ok(broker) => broker,
            Err(e) => return kes_test_support::missing("a dedicated Tansu broker", &e),
        };
        let proxy = Proxy::start(listener, format!("127.0.0.1:{port}"));
        let mut config = KafkaStoreConfig::new(proxy.addr.clone(), common::unique_prefix());
        config.partitions = 1;
        config.request_timeout = REQUEST_TIMEOUT;
        let store = match KafkaStore::<Ledger>::open(config.clone()).await {
            Ok(store) => store,
            Err(e) => panic!("connect through the proxy: {e}\n--- broker log:\n{}", broker.log()),
        };
        Some(Self { store, config, proxy, broker })
    }

    /// Appends while the proxy loses the request or the response of the
    /// append's produce: the store must answer `Unavailable`, and the loss
    /// must have happened.
    async fn append_unanswered(&self, fault: Fault, id: &str, expected: u64, event: LedgerEvent, key: &str) {
        let happened = self.proxy.inject(fault, self.store.events_topic());
        let started = Instant::now();
        let append = self.store.append(id, ExpectedVersion::Exact(expected), vec![event], keyed(key));
        let answer = tokio::time::timeout(HUNG, append)
            .await
            .unwrap_or_else(|_| panic!("the append still waited after {HUNG:?}"));
        match answer {
            Err(StoreError::Unavailable(reason)) => {
                eprintln!("{fault:?}: Unavailable after {:?}: {reason}", started.elapsed());
            }
            other => panic!("{fault:?}: expected Unavailable, got {other:?}\n--- broker log:\n{}", self.broker.log()),
        }
        tokio::time::timeout(HUNG, happened)
            .await
            .expect("the proxy never saw the append's produce request")
            .expect("the proxy forgot the fault");
    }

    /// The events records of `id` in the log, read with a plain consumer.
    async fn logged(&self, id: &str) -> Vec<Logged> {
        let (brokers, topic) = (self.config.brokers.clone(), self.store.events_topic().to_owned());
        let group = format!("{}.log-check", self.config.topic_prefix);
        let all = tokio::task::spawn_blocking(move || read_log(&brokers, &topic, &group)).await.expect("log reader");
        all.into_iter().filter(|r| r.id == id).collect()
    }
}

/// One events record as the log holds it.
#[derive(Debug)]
struct Logged {
    id: String,
    first_version: u64,
    last_version: u64,
    key: Option<String>,
    position: Position,
}

/// Versions and idempotency keys of records.
fn versions(records: &[Logged]) -> Vec<(u64, u64, Option<String>)> {
    records.iter().map(|r| (r.first_version, r.last_version, r.key.clone())).collect()
}

/// Every record of the (one-partition) events topic, up to its high
/// watermark.
fn read_log(brokers: &str, topic: &str, group: &str) -> Vec<Logged> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let (_, high) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(30)).expect("watermarks");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning).expect("partition");
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let mut next = 0;
    let deadline = Instant::now() + HUNG;
    while next < high {
        assert!(Instant::now() < deadline, "{topic}: read up to {next} of {high} in {HUNG:?}");
        let message = match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                eprintln!("reading {topic}: {e}");
                continue;
            }
            None => continue,
        };
        next = message.offset() + 1;
        let value: serde_json::Value = serde_json::from_slice(message.payload().expect("a value")).expect("JSON");
        let number = |name: &str| value[name].as_u64().unwrap_or_else(|| panic!("{name} in {value}"));
        out.push(Logged {
            id: value["aggregate_id"].as_str().expect("aggregate_id").to_owned(),
            first_version: number("first_version"),
            last_version: number("last_version"),
            key: value["metadata"]["idempotency_key"].as_str().map(str::to_owned),
            position: Position::new(0, u64::try_from(message.offset()).expect("an offset")),
        });
    }
    out
}

fn keyed(key: &str) -> Metadata {
    Metadata { idempotency_key: Some(key.to_owned()), ..Metadata::default() }
}

fn added(amount: i64) -> LedgerEvent {
    LedgerEvent::Added { amount }
}

fn some(key: &str) -> Option<String> {
    Some(key.to_owned())
}

/// `id`'s history as the store reads it: version, event, idempotency key,
/// position.
async fn history(store: &KafkaStore<Ledger>, id: &str) -> Vec<(u64, LedgerEvent, Option<String>, Position)> {
    let events = tokio::time::timeout(HUNG, store.read(id)).await.expect("read hung").expect("read");
    events.into_iter().map(|e| (e.version, e.payload, e.metadata.idempotency_key, e.position)).collect()
}

/// `id`'s versions as the store reads them.
async fn read_versions(store: &KafkaStore<Ledger>, id: &str) -> Vec<u64> {
    history(store, id).await.into_iter().map(|e| e.0).collect()
}

/// `id`'s version, total and entry count as the store loads them.
async fn load(store: &KafkaStore<Ledger>, id: &str) -> (u64, i64, u64) {
    let snapshot = tokio::time::timeout(HUNG, store.load(id)).await.expect("load hung").expect("load");
    let snapshot = snapshot.unwrap_or_else(|| panic!("{id} exists"));
    (snapshot.version, snapshot.state.total, snapshot.state.entries)
}

async fn open(store: &KafkaStore<Ledger>, id: &str, metadata: Metadata) {
    let opened = store.append(id, ExpectedVersion::NoStream, vec![LedgerEvent::Opened], metadata).await;
    assert_eq!(opened.expect("open").version, 1, "{id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_written_without_acknowledgement_is_read_back_once_and_the_stream_goes_on() {
    let Some(rig) = Rig::start().await else { return };
    let store = &rig.store;
    open(store, "u-1", keyed("open")).await;

    rig.append_unanswered(Fault::LoseResponse, "u-1", 1, added(5), "add-5").await;
    // The broker answered the produce, so the record is in the log, once.
    let logged = rig.logged("u-1").await;
    assert_eq!(versions(&logged), [(1, 1, some("open")), (2, 2, some("add-5"))], "the log");
    let written = logged[1].position;

    // The store learns it from the log: state and history show it once.
    assert_eq!(load(store, "u-1").await, (2, 5, 1), "load after the unknown outcome");
    assert_eq!(
        history(store, "u-1").await,
        [(1, LedgerEvent::Opened, some("open"), logged[0].position), (2, added(5), some("add-5"), written)],
        "read after the unknown outcome"
    );

    // The client retries the same command with the same key: nothing new.
    let retried = store.append("u-1", ExpectedVersion::Exact(1), vec![added(5)], keyed("add-5")).await;
    assert_eq!(retried.expect("retry"), Appended { version: 2, position: written, deduplicated: true });

    // The next command lands at the next version.
    let next = store.append("u-1", ExpectedVersion::Exact(2), vec![added(7)], keyed("add-7")).await.expect("next");
    assert_eq!((next.version, next.deduplicated), (3, false));
    assert!(next.position.offset > written.offset, "{next:?} lands after {written:?}");
    assert_eq!(load(store, "u-1").await, (3, 12, 2));
    assert_eq!(read_versions(store, "u-1").await, [1, 2, 3]);
    let logged = rig.logged("u-1").await;
    assert_eq!(versions(&logged), [(1, 1, some("open")), (2, 2, some("add-5")), (3, 3, some("add-7"))]);
    assert_eq!(logged[2].position, next.position);

    // A store started afresh on the same topics agrees.
    store.flush(HUNG).await.expect("flush");
    let again = KafkaStore::<Ledger>::open(rig.config.clone()).await.expect("restart");
    assert_eq!(load(&again, "u-1").await, (3, 12, 2));
    assert_eq!(read_versions(&again, "u-1").await, [1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "flaky on the test broker under load: once in five loaded runs, after the lost response Tansu 0.6.0 \
            served no fetch for 120 s (the check's plain consumer read nothing); run with --ignored on a quiet machine"]
async fn a_retry_right_after_a_lost_acknowledgement_is_recognised_by_its_idempotency_key() {
    let Some(rig) = Rig::start().await else { return };
    let store = &rig.store;
    open(store, "u-2", Metadata::default()).await;

    rig.append_unanswered(Fault::LoseResponse, "u-2", 1, added(3), "add-3").await;
    // The retry is the first operation after the failure: the append itself
    // must find the record in the log before deciding.
    let retried = store.append("u-2", ExpectedVersion::Exact(1), vec![added(3)], keyed("add-3")).await;
    let logged = rig.logged("u-2").await;
    assert_eq!(versions(&logged), [(1, 1, None), (2, 2, some("add-3"))], "the log after the retry");
    let written = logged[1].position;
    assert_eq!(retried.expect("retry"), Appended { version: 2, position: written, deduplicated: true });

    assert_eq!(load(store, "u-2").await, (2, 3, 1));
    assert_eq!(
        history(store, "u-2").await,
        [(1, LedgerEvent::Opened, None, logged[0].position), (2, added(3), some("add-3"), written)]
    );
    let next = store.append("u-2", ExpectedVersion::Exact(2), vec![added(4)], Metadata::default()).await;
    assert_eq!(next.expect("next").version, 3);
    assert_eq!(versions(&rig.logged("u-2").await), [(1, 1, None), (2, 2, some("add-3")), (3, 3, None)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_that_never_reached_the_broker_is_not_invented_and_its_retry_lands_once() {
    let Some(rig) = Rig::start().await else { return };
    let store = &rig.store;
    open(store, "u-3", Metadata::default()).await;

    rig.append_unanswered(Fault::LoseRequest, "u-3", 1, added(4), "add-4").await;
    assert_eq!(versions(&rig.logged("u-3").await), [(1, 1, None)], "the broker never saw the request");
    // Another aggregate of the same partition is the first to use it again.
    open(store, "v-3", Metadata::default()).await;
    assert_eq!(load(store, "u-3").await, (1, 0, 0), "nothing landed");
    assert_eq!(read_versions(store, "u-3").await, [1]);

    // The retry appends the command, once.
    let retried = store.append("u-3", ExpectedVersion::Exact(1), vec![added(4)], keyed("add-4")).await.expect("retry");
    assert_eq!((retried.version, retried.deduplicated), (2, false));
    let logged = rig.logged("u-3").await;
    assert_eq!(versions(&logged), [(1, 1, None), (2, 2, some("add-4"))]);
    assert_eq!(retried.position, logged[1].position);
    assert_eq!(load(store, "u-3").await, (2, 4, 1));
    assert_eq!(read_versions(store, "u-3").await, [1, 2]);
    let again = store.append("u-3", ExpectedVersion::Exact(1), vec![added(4)], keyed("add-4")).await;
    assert_eq!(again.expect("second retry"), Appended { deduplicated: true, ..retried });
}

/// A resent batch the broker had stored already is acknowledged by Tansu
/// with DUPLICATE_SEQUENCE_NUMBER, which librdkafka reports as a delivery at
/// offset -1: the store must find the record where the broker wrote it,
/// never take -1 for offset 0 (another aggregate's record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_acknowledged_through_a_resend_is_found_where_the_broker_wrote_it() {
    let Some(rig) = Rig::start().await else { return };
    let store = &rig.store;
    for id in ["a", "b", "c"] {
        open(store, id, Metadata::default()).await;
    }
    store.flush(HUNG).await.expect("flush");

    // The broker writes the record and answers NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    // as Kafka does when the in-sync replicas shrank after the leader wrote
    // it. librdkafka resends the batch; the broker recognises the resent
    // sequence and answers DUPLICATE_SEQUENCE_NUMBER (Tansu) or success with
    // the first offset (Kafka); librdkafka reports a delivery either way,
    // without an offset (-1) in the first case.
    let happened = rig.proxy.inject(Fault::FailAfterWrite(NOT_ENOUGH_REPLICAS_AFTER_APPEND), store.events_topic());
    let append = store.append("d", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], keyed("open-d"));
    let answer = tokio::time::timeout(HUNG, append).await.expect("the append hung");
    tokio::time::timeout(HUNG, happened).await.expect("the proxy never saw the produce").expect("fault");
    let logged = rig.logged("d").await;
    assert_eq!(versions(&logged), [(1, 1, some("open-d"))], "the log");
    let written = logged[0].position;
    match answer {
        Ok(appended) => {
            assert_eq!(appended, Appended { version: 1, position: written, deduplicated: false }, "the answer");
        }
        // Not knowing is an honest answer too.
        Err(StoreError::Unavailable(_)) => {}
        Err(other) => panic!("expected an acknowledgement or Unavailable, got {other:?}"),
    }

    assert_eq!(load(store, "d").await, (1, 0, 0));
    assert_eq!(history(store, "d").await, [(1, LedgerEvent::Opened, some("open-d"), written)], "read");
    let recalled = store.recall("d", "open-d").await.expect("recall");
    assert_eq!(recalled, Some(Appended { version: 1, position: written, deduplicated: true }), "recall");
    let next = store.append("d", ExpectedVersion::Exact(1), vec![added(2)], Metadata::default()).await;
    assert_eq!(next.expect("next").version, 2);

    store.flush(HUNG).await.expect("flush");
    let again = KafkaStore::<Ledger>::open(rig.config.clone()).await.expect("restart");
    assert_eq!(load(&again, "d").await, (2, 2, 1));
    let read: Vec<(u64, Position)> = history(&again, "d").await.into_iter().map(|e| (e.0, e.3)).collect();
    assert_eq!(read.first(), Some(&(1, written)), "read after a restart: {read:?}");
    assert_eq!(read.len(), 2, "read after a restart: {read:?}");
}
