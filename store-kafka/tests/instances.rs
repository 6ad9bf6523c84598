//! Several `KafkaStore` instances on the same topics, on a real broker:
//! "the log decides" (DESIGN.md §4 and §5, "Several instances").
//!
//! Every reader — recovery at start, the follower of a running store,
//! `read`/`read_page`, `subscribe` — applies one validity rule: a record
//! counts only if its `first_version` continues the aggregate's valid
//! stream and its `previous_event_id` names the last valid event. These
//! tests write through several instances at once, and write records by hand
//! with a plain rdkafka producer (races, losing records, records decided on
//! a loser, an event type this deploy cannot decode), then check that every
//! reader of every instance agrees, that nothing acknowledged is lost and
//! that nothing unacknowledged is shown twice.
//!
//! Synchronisation is by `wait_applied` / `wait_for_position` or by polling
//! with a deadline, never by a fixed sleep.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kes_core::conformance::{Ledger, LedgerCommand, LedgerEvent};
use kes_core::{
    BusConfig, Checkpoint, Codec, CodecError, CommandBus, CommandError, Envelope, EventStore, ExpectedVersion,
    JsonCodec, Logged, Metadata, Position, StoreError,
};
use kes_store_kafka::{FollowerStats, KafkaStore};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use uuid::Uuid;

/// How long an instance may take to apply a position that is in the log:
/// far beyond the follower's normal lag, so only a follower that stopped
/// (or never applies it) reaches it.
const APPLIED: Duration = Duration::from_secs(60);

/// How long a subscription may stay silent while the log still holds
/// records it has not delivered.
const ITEM: Duration = Duration::from_secs(30);

/// How long a command that keeps losing races is decided again. Longer
/// than the bus's default: these tests prove that no write is lost or
/// doubled, not how fast a shared test machine re-decides.
const RETRY_FOR: Duration = Duration::from_secs(30);

type Bus = CommandBus<Ledger, KafkaStore<Ledger>>;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A plain producer, as any Kafka client other than KES would write.
fn raw_producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.timeout.ms", "30000")
        .create()
        .expect("a raw producer")
}

/// One event of a hand-written events record.
#[derive(Debug, Clone)]
struct RawEvent {
    event_id: Uuid,
    event_type: &'static str,
    payload: Value,
}

impl RawEvent {
    /// `LedgerEvent::Opened`, as the JSON codec writes it.
    fn opened() -> Self {
        Self { event_id: Uuid::now_v7(), event_type: "LedgerOpened", payload: json!("Opened") }
    }

    /// `LedgerEvent::Added { amount }`, as the JSON codec writes it.
    fn added(amount: i64) -> Self {
        Self { event_id: Uuid::now_v7(), event_type: "EntryAdded", payload: json!({"Added": {"amount": amount}}) }
    }
}

/// Writes one events record of aggregate `id` the way KES writes it
/// (`store-kafka/src/record.rs`, with `previous_event_id`), without KES,
/// into `store`'s events topic and `id`'s partition. Returns where it
/// landed.
async fn produce_record(
    producer: &FutureProducer,
    store: &KafkaStore<Ledger>,
    id: &str,
    first_version: u64,
    previous_event_id: Option<Uuid>,
    events: &[RawEvent],
) -> Position {
    assert!(!events.is_empty(), "a record carries at least one event");
    let last_version = first_version + events.len() as u64 - 1;
    let docs: Vec<Value> = events
        .iter()
        .zip(first_version..)
        .map(|(e, version)| {
            json!({
                "event_id": e.event_id, "version": version, "event_type": e.event_type, "revision": 1,
                "content_type": "application/json", "payload": e.payload
            })
        })
        .collect();
    let mut doc = json!({
        "format": "kes.events.v1", "aggregate_type": "ledger", "aggregate_id": id,
        "first_version": first_version, "last_version": last_version,
        "recorded_at": chrono::Utc::now(), "metadata": {"correlation_id": format!("by-hand-{id}-{first_version}")},
        "events": docs
    });
    if let Some(previous) = previous_event_id {
        doc["previous_event_id"] = json!(previous);
    }
    let value = serde_json::to_vec(&doc).expect("the record as JSON");
    let types = events.iter().map(|e| e.event_type).collect::<Vec<_>>().join(",");
    let header = format!("v={first_version}-{last_version};t={types}");
    let headers = OwnedHeaders::new().insert(Header { key: "kes", value: Some(&header) });
    let partition = store.partition_of(id);
    let record =
        FutureRecord::to(store.events_topic()).key(id).payload(&value).partition(partition as i32).headers(headers);
    let delivery = producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).expect("raw produce");
    assert_eq!(delivery.partition, partition as i32, "the record landed in {id}'s partition");
    assert!(delivery.offset >= 0, "the broker reported where the record landed");
    Position::new(partition, delivery.offset as u64)
}

/// The follower's counters in words, for assertion messages.
fn describe(stats: &FollowerStats) -> String {
    let halted: Vec<String> =
        stats.halted.iter().map(|h| format!("{}:{} ({})", h.partition, h.offset, h.reason)).collect();
    format!(
        "applied {:?}, void {}, fast {}, awaited {}, lost {}, halted {:?}",
        stats.applied, stats.void_records, stats.fast_path_appends, stats.awaited_appends, stats.lost_races, halted
    )
}

/// Waits until `store` has applied every record `head` holds.
async fn wait_for_head(store: &KafkaStore<Ledger>, head: &Checkpoint, who: &str) {
    for (partition, next) in head.iter() {
        if next == 0 {
            continue;
        }
        let last = Position::new(partition, next - 1);
        assert!(
            store.wait_applied(last, APPLIED).await,
            "{who} did not apply {last} within {APPLIED:?}: {}",
            describe(&store.follower_stats())
        );
    }
}

/// Polls `condition` every 50 ms until it holds or `within` passes.
async fn poll_until(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every item of a subscription from the start of the log until it has
/// delivered every position `head` holds. Checks on the way that no
/// position comes twice or out of order and that every event of an item
/// sits at the item's position.
async fn subscribe_to_head(store: &KafkaStore<Ledger>, head: &Checkpoint) -> Vec<Logged<LedgerEvent>> {
    let mut stream = store.subscribe(Checkpoint::start()).await.expect("subscribe");
    let mut checkpoint = Checkpoint::start();
    let mut items = Vec::new();
    while !checkpoint.covers_all(head) {
        let item = tokio::time::timeout(ITEM, stream.next())
            .await
            .unwrap_or_else(|_| panic!("no subscription item within {ITEM:?} at {checkpoint:?}; head {head:?}"))
            .expect("a subscription is endless")
            .expect("a subscription item");
        assert!(
            !checkpoint.covers(item.position),
            "position {} delivered twice or out of order (checkpoint {checkpoint:?})",
            item.position
        );
        for e in &item.events {
            assert_eq!(e.position, item.position, "an event of the item at {} sits elsewhere", item.position);
        }
        checkpoint.advance(item.position);
        items.push(item);
    }
    items
}

/// The events a subscription delivered, per aggregate, in delivery order.
fn events_by_id(items: &[Logged<LedgerEvent>]) -> BTreeMap<String, Vec<Envelope<LedgerEvent>>> {
    let mut by_id: BTreeMap<String, Vec<Envelope<LedgerEvent>>> = BTreeMap::new();
    for item in items {
        for e in &item.events {
            by_id.entry(e.aggregate_id.clone()).or_default().push(e.clone());
        }
    }
    by_id
}

/// What a reader shows of one event: enough to tell two records apart.
type Shown = (u64, Uuid, LedgerEvent, Position);

fn shown(history: &[Envelope<LedgerEvent>]) -> Vec<Shown> {
    history.iter().map(|e| (e.version, e.event_id, e.payload.clone(), e.position)).collect()
}

/// The state a history folds to, and its version.
fn fold(history: &[Envelope<LedgerEvent>]) -> (Ledger, u64) {
    use kes_core::Aggregate as _;
    let mut state = Ledger::default();
    for e in history {
        state.apply(&e.payload);
    }
    (state, history.last().map_or(0, |e| e.version))
}

/// Asserts that `history` holds versions 1..=n in order.
fn assert_contiguous(history: &[Envelope<LedgerEvent>], who: &str, id: &str) {
    let versions: Vec<u64> = history.iter().map(|e| e.version).collect();
    assert_eq!(versions, (1..=versions.len() as u64).collect::<Vec<_>>(), "{who}: {id}'s history is not contiguous");
}

/// A small deterministic generator (SplitMix64), so that a failing run can
/// be repeated with its printed seed (`KES_TEST_SEED`).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn seed() -> u64 {
    std::env::var("KES_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(7, |d| d.as_nanos() as u64)
    })
}

/// One acknowledged command: the versions it got and the events it decided.
#[derive(Debug, Clone)]
struct Ack {
    id: String,
    first: u64,
    last: u64,
    events: Vec<LedgerEvent>,
    position: Position,
    /// Its correlation id (`cmd-…`), also in the stored metadata.
    command: String,
    /// Which instance acknowledged it.
    via: usize,
}

/// Checks `history` of `id` against the acknowledged commands: each one's
/// events sit at its versions, in its record, with its correlation id; no
/// two share a version. Returns the versions the acknowledgements cover.
fn check_acks(history: &[Envelope<LedgerEvent>], id: &str, acks: &[Ack], who: &str) -> BTreeSet<u64> {
    let mut covered: BTreeMap<u64, &str> = BTreeMap::new();
    for ack in acks.iter().filter(|a| a.id == id) {
        for (version, event) in (ack.first..=ack.last).zip(&ack.events) {
            if let Some(other) = covered.insert(version, &ack.command) {
                panic!("{id} v{version} was acknowledged twice: to {other} and to {} (via {})", ack.command, ack.via);
            }
            let stored = history.get(version as usize - 1).unwrap_or_else(|| {
                panic!(
                    "{who}: {id} v{version}, acknowledged to {} via instance {}, is missing (history has {})",
                    ack.command,
                    ack.via,
                    history.len()
                )
            });
            assert_eq!(
                (&stored.payload, stored.position, stored.metadata.correlation_id.as_deref()),
                (event, ack.position, Some(ack.command.as_str())),
                "{who}: {id} v{version} is not what {} (via {}) was acknowledged for",
                ack.command,
                ack.via
            );
        }
    }
    covered.into_keys().collect()
}

/// A bus over `store` that re-decides lost races for [`RETRY_FOR`].
fn bus(store: &KafkaStore<Ledger>) -> Arc<Bus> {
    let config = BusConfig { conflict_retry_for: RETRY_FOR, ..BusConfig::default() };
    Arc::new(CommandBus::with_config(store.clone(), config))
}

fn tagged(command: &str) -> Metadata {
    Metadata { correlation_id: Some(command.to_owned()), ..Metadata::default() }
}

/// An id that lives in `partition`.
fn id_in(store: &KafkaStore<Ledger>, partition: u32, prefix: &str) -> String {
    (0..1000)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| store.partition_of(id) == partition)
        .expect("some id lives in the partition")
}

/// An id that lives in another partition than `of`.
fn id_elsewhere(store: &KafkaStore<Ledger>, of: &str, prefix: &str) -> String {
    (0..1000)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| store.partition_of(id) != store.partition_of(of))
        .expect("some id lives in another partition")
}

// ---------------------------------------------------------------------------
// 1. Three instances, random routing
// ---------------------------------------------------------------------------

/// Three instances on the same topics, each behind its own command bus,
/// take 400 commands from 16 concurrent writers routed at random (most
/// without an expected version, some with an exact one from a fresh load)
/// on 10 aggregates. Proves: every acknowledged command is in the history
/// at the versions it was acknowledged for, with exactly its events; no
/// version is acknowledged twice; nothing unacknowledged is valid;
/// histories are contiguous; all instances, a fresh fourth one and a
/// subscription from the start agree on every state and history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_random_routing_lose_no_acknowledged_write() {
    const WRITERS: usize = 16;
    const COMMANDS: usize = 25;
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let config = common::config(&brokers, 3);
    let Some(first) = common::connect(config.clone()).await else { return };
    let mut stores = vec![first];
    for _ in 0..2 {
        stores.push(KafkaStore::open(config.clone()).await.expect("another instance connects"));
    }
    let buses: Vec<Arc<Bus>> = stores.iter().map(bus).collect();
    let ids: Vec<String> = (0..10).map(|i| format!("acct-{i}")).collect();
    let partitions: BTreeSet<u32> = ids.iter().map(|id| stores[0].partition_of(id)).collect();
    assert!(partitions.len() > 1, "the aggregates should spread over partitions");
    let seed = seed();
    eprintln!("seed {seed} (KES_TEST_SEED repeats it)");

    // Every instance tries to open every ledger at once: exactly one wins.
    let mut acks: Vec<Ack> = Vec::new();
    for id in &ids {
        let attempts = buses.iter().enumerate().map(|(via, bus)| {
            let command = format!("cmd-open-{id}-{via}");
            async move {
                let result = bus.execute(id, LedgerCommand::Open, ExpectedVersion::NoStream, tagged(&command)).await;
                (via, command, result)
            }
        });
        let mut opened = 0;
        for (via, command, result) in futures::future::join_all(attempts).await {
            match result {
                Ok(outcome) => {
                    opened += 1;
                    assert_eq!((outcome.version, outcome.events), (1, 1), "{id}: the open is version 1");
                    let position = outcome.position.expect("an appended command has a position");
                    let events = vec![LedgerEvent::Opened];
                    acks.push(Ack { id: id.clone(), first: 1, last: 1, events, position, command, via });
                }
                Err(CommandError::Conflict { .. }) => {}
                Err(e) => panic!("{id}: opening through instance {via} failed otherwise than by a conflict: {e}"),
            }
        }
        assert_eq!(opened, 1, "{id}: exactly one of three concurrent creates is acknowledged");
    }

    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let buses = buses.clone();
            let ids = ids.clone();
            tokio::spawn(async move {
                let mut rng = SplitMix64(seed ^ (writer as u64).wrapping_mul(0x1000_0000_01b3));
                let mut acked = Vec::new();
                let mut refused = 0usize;
                for n in 0..COMMANDS {
                    let number = (writer * 1000 + n + 1) as i64;
                    let command = format!("cmd-{number}");
                    let id = &ids[rng.below(ids.len())];
                    let via = rng.below(buses.len());
                    let bus = &buses[via];
                    // Amounts name the command: 10·n for one event, 10·n+1 and
                    // 10·n+2 for two.
                    let (cmd, events) = if rng.below(4) == 0 {
                        let amounts = vec![number * 10 + 1, number * 10 + 2];
                        let events = amounts.iter().map(|&amount| LedgerEvent::Added { amount }).collect();
                        (LedgerCommand::AddMany(amounts), events)
                    } else {
                        (LedgerCommand::Add(number * 10), vec![LedgerEvent::Added { amount: number * 10 }])
                    };
                    let expected = if rng.below(5) == 0 {
                        let loaded = bus.store().load(id).await.map_err(|e| format!("{id}: load: {e}"))?;
                        ExpectedVersion::Exact(loaded.map_or(0, |s| s.version))
                    } else {
                        ExpectedVersion::Any
                    };
                    match bus.execute(id, cmd, expected, tagged(&command)).await {
                        Ok(outcome) => {
                            if outcome.deduplicated || outcome.events != events.len() {
                                return Err(format!("{command} on {id}: unexpected outcome {outcome:?}"));
                            }
                            let position =
                                outcome.position.ok_or_else(|| format!("{command}: acknowledged without position"))?;
                            let first = outcome.version + 1 - events.len() as u64;
                            acked.push(Ack {
                                id: id.clone(),
                                first,
                                last: outcome.version,
                                events,
                                position,
                                command,
                                via,
                            });
                        }
                        Err(CommandError::Conflict { .. }) if matches!(expected, ExpectedVersion::Exact(_)) => {
                            refused += 1;
                        }
                        Err(e) => {
                            return Err(format!("{command} on {id} via instance {via} expecting {expected}: {e}"));
                        }
                    }
                }
                Ok::<_, String>((acked, refused))
            })
        })
        .collect();
    let mut refused = 0;
    for writer in writers {
        let (acked, r) = writer.await.expect("a writer task").unwrap_or_else(|e| panic!("a command failed: {e}"));
        acks.extend(acked);
        refused += r;
    }
    eprintln!(
        "{} commands acknowledged, {refused} refused (exact version moved on) in {:.1} s",
        acks.len(),
        started.elapsed().as_secs_f64()
    );
    for (i, store) in stores.iter().enumerate() {
        eprintln!("instance {i}: {}", describe(&store.follower_stats()));
    }

    let head = stores[0].head().await.expect("head");
    for (i, store) in stores.iter().enumerate() {
        wait_for_head(store, &head, &format!("instance {i}")).await;
    }
    let mut reference: BTreeMap<String, Vec<Envelope<LedgerEvent>>> = BTreeMap::new();
    for id in &ids {
        let history = stores[0].read(id).await.expect("read");
        assert_contiguous(&history, "instance 0", id);
        let covered = check_acks(&history, id, &acks, "instance 0");
        assert_eq!(
            covered,
            (1..=history.len() as u64).collect::<BTreeSet<_>>(),
            "{id}: the valid history holds exactly the acknowledged commands"
        );
        let (state, version) = fold(&history);
        for (i, store) in stores.iter().enumerate() {
            let loaded = store.load(id).await.expect("load").expect("an opened ledger");
            assert_eq!(
                (&loaded.state, loaded.version),
                (&state, version),
                "instance {i}: {id}'s table differs from its history"
            );
            if i > 0 {
                let other = store.read(id).await.expect("read");
                assert_eq!(shown(&other), shown(&history), "instance {i} reads another history of {id}");
            }
        }
        reference.insert(id.clone(), history);
    }

    // A fourth instance started now recovers the same states and histories.
    let fourth = KafkaStore::<Ledger>::open(config.clone()).await.expect("a fourth instance connects");
    let applied = fourth.follower_stats().applied;
    for (partition, next) in head.iter() {
        assert!(
            applied.get(partition as usize).copied().unwrap_or(0) >= next,
            "the fourth instance's recovery stopped short of partition {partition}'s head {next}: applied {applied:?}"
        );
    }
    for (id, history) in &reference {
        let (state, version) = fold(history);
        let loaded = fourth.load(id).await.expect("load").expect("an opened ledger");
        assert_eq!((&loaded.state, loaded.version), (&state, version), "the fourth instance's {id} differs");
        let read = fourth.read(id).await.expect("read");
        assert_eq!(shown(&read), shown(history), "the fourth instance reads another history of {id}");
    }

    // A subscription from the start sees exactly the valid events.
    let items = subscribe_to_head(&fourth, &head).await;
    let delivered = events_by_id(&items);
    assert_eq!(delivered.keys().collect::<Vec<_>>(), reference.keys().collect::<Vec<_>>(), "aggregates delivered");
    for (id, history) in &reference {
        assert_eq!(shown(&delivered[id]), shown(history), "the subscription's {id} differs from its history");
    }
    let void = items.iter().filter(|i| i.events.is_empty()).count() as u64;
    for (i, store) in stores.iter().enumerate() {
        eprintln!("instance {i}: {}", describe(&store.follower_stats()));
    }
    eprintln!("the log holds {} records, {void} of them void", items.len());
    // The three instances followed every record from the first one on.
    for (i, store) in stores.iter().enumerate() {
        assert_eq!(
            store.follower_stats().void_records,
            void,
            "instance {i} counted as void exactly the records the subscription gave no events for"
        );
    }
}

// ---------------------------------------------------------------------------
// 2. A record decided on a losing record
// ---------------------------------------------------------------------------

/// A partition written by hand: v1; two records both claiming v2 (the first
/// wins); a v3 whose `previous_event_id` names the losing v2 (void, although
/// its version alone would fit); a v3 based on the winning v2 (valid).
/// Interleaved in the same partition, the records of an older KES (no
/// `previous_event_id`), judged on version only: v1, v2, a second v2 (void),
/// v3. Proves that the follower of an instance started before the records,
/// the recovery of one started after them, `read`, `read_page` and
/// `subscribe` all show the same valid events, count the same three void
/// records, and that a subscription still delivers every position (void ones
/// without events). Then a command on top continues the valid stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_decided_on_a_losing_record_is_void_in_every_reader() {
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let mut config = common::config(&brokers, 2);
    // No table records during the test (the longest delay a configuration
    // takes): the recovering instance must decide from the events records
    // themselves.
    config.table_write_delay = Duration::from_secs(60);
    let Some(follower) = common::connect(config.clone()).await else { return };
    let id = "contested";
    let partition = follower.partition_of(id);
    let legacy = id_in(&follower, partition, "legacy");
    let producer = raw_producer(&brokers);
    // Written by an older KES: no previous_event_id.
    let legacy_events = [RawEvent::opened(), RawEvent::added(7), RawEvent::added(8), RawEvent::added(9)];

    let opened = RawEvent::opened();
    let winner = RawEvent::added(20);
    let loser = RawEvent::added(21);
    let on_loser = RawEvent::added(30);
    let on_winner = RawEvent::added(40);
    let one = std::slice::from_ref;
    let l_opened = produce_record(&producer, &follower, &legacy, 1, None, one(&legacy_events[0])).await;
    let p_opened = produce_record(&producer, &follower, id, 1, None, one(&opened)).await;
    let l_first = produce_record(&producer, &follower, &legacy, 2, None, one(&legacy_events[1])).await;
    let p_winner = produce_record(&producer, &follower, id, 2, Some(opened.event_id), one(&winner)).await;
    let p_loser = produce_record(&producer, &follower, id, 2, Some(opened.event_id), one(&loser)).await;
    let l_second = produce_record(&producer, &follower, &legacy, 2, None, one(&legacy_events[2])).await;
    let p_on_loser = produce_record(&producer, &follower, id, 3, Some(loser.event_id), one(&on_loser)).await;
    let l_third = produce_record(&producer, &follower, &legacy, 3, None, one(&legacy_events[3])).await;
    let p_on_winner = produce_record(&producer, &follower, id, 3, Some(winner.event_id), one(&on_winner)).await;
    let written = [l_opened, p_opened, l_first, p_winner, p_loser, l_second, p_on_loser, l_third, p_on_winner];
    assert!(written.windows(2).all(|w| w[0].offset < w[1].offset), "the records landed in order: {written:?}");
    let void_positions = [p_loser, l_second, p_on_loser];

    let expected: Vec<Shown> = vec![
        (1, opened.event_id, LedgerEvent::Opened, p_opened),
        (2, winner.event_id, LedgerEvent::Added { amount: 20 }, p_winner),
        (3, on_winner.event_id, LedgerEvent::Added { amount: 40 }, p_on_winner),
    ];
    let expected_state = Ledger { open: true, closed: false, total: 60, entries: 2 };
    let legacy_expected: Vec<Shown> = vec![
        (1, legacy_events[0].event_id, LedgerEvent::Opened, l_opened),
        (2, legacy_events[1].event_id, LedgerEvent::Added { amount: 7 }, l_first),
        (3, legacy_events[3].event_id, LedgerEvent::Added { amount: 9 }, l_third),
    ];

    // (b) The follower of an instance that was running while they were written.
    assert!(
        follower.wait_applied(p_on_winner, APPLIED).await,
        "the follower did not apply {p_on_winner}: {}",
        describe(&follower.follower_stats())
    );
    // (a) The recovery of an instance started after they were written.
    let recovered = KafkaStore::<Ledger>::open(config.clone()).await.expect("a second instance connects");
    let head = follower.head().await.expect("head");
    assert_eq!(head.next_offset(partition), p_on_winner.offset + 1, "the partition holds only these records");

    for (who, store) in [("the follower", &follower), ("the recovered instance", &recovered)] {
        let stats = store.follower_stats();
        assert_eq!(
            stats.void_records,
            3,
            "{who} counts the losing v2, the v3 decided on it and the older KES's second v2: {}",
            describe(&stats)
        );
        assert!(stats.halted.is_empty(), "{who} halted: {}", describe(&stats));
        let loaded = store.load(id).await.expect("load").expect("the ledger exists");
        assert_eq!((loaded.state, loaded.version), (expected_state.clone(), 3), "{who}'s table");
        // (c) History reads apply the rule too.
        let history = store.read(id).await.expect("read");
        assert_eq!(shown(&history), expected, "{who}'s history");
        let page = store.read_page(id, 1, 10).await.expect("read_page");
        assert_eq!(shown(&page), expected[1..].to_vec(), "{who}'s page after v1");
        let page = store.read_page(id, 2, 1).await.expect("read_page");
        assert_eq!(shown(&page), expected[2..].to_vec(), "{who}'s page after v2");
        let old_history = store.read(&legacy).await.expect("read");
        assert_eq!(shown(&old_history), legacy_expected, "{who}'s history of records without previous_event_id");
        let loaded = store.load(&legacy).await.expect("load").expect("the older ledger exists");
        assert_eq!((loaded.version, loaded.state.total), (3, 16), "{who}'s table of the older ledger");

        // (d) A subscription: every position once, void ones without events.
        let items = subscribe_to_head(store, &head).await;
        let in_partition: Vec<&Logged<LedgerEvent>> =
            items.iter().filter(|i| i.position.partition == partition).collect();
        let offsets: Vec<u64> = in_partition.iter().map(|i| i.position.offset).collect();
        assert_eq!(offsets, (0..head.next_offset(partition)).collect::<Vec<_>>(), "{who}: positions of {partition}");
        for item in &in_partition {
            let is_void = void_positions.contains(&item.position);
            assert_eq!(
                item.events.is_empty(),
                is_void,
                "{who}: the item at {} has {} events (void: {is_void})",
                item.position,
                item.events.len()
            );
        }
        let delivered = events_by_id(&items);
        assert_eq!(shown(delivered.get(id).map_or(&[][..], |v| &v[..])), expected, "{who}'s subscription");
        let old_delivered = delivered.get(&legacy).map_or(&[][..], |v| &v[..]);
        assert_eq!(shown(old_delivered), legacy_expected, "{who}'s subscription of the older ledger");
        assert_eq!(
            store.follower_stats().void_records,
            3,
            "{who}: reading and subscribing does not count the void records again"
        );
    }

    // A command on top continues the valid stream, in every instance.
    let appended = recovered
        .append(id, ExpectedVersion::Exact(3), vec![LedgerEvent::Added { amount: 50 }], tagged("cmd-on-top"))
        .await
        .expect("a command on the valid v3");
    assert_eq!(appended.version, 4);
    assert!(follower.wait_applied(appended.position, APPLIED).await, "the follower applies the command on top");
    for (who, store) in [("the follower", &follower), ("the recovered instance", &recovered)] {
        let loaded = store.load(id).await.expect("load").expect("the ledger exists");
        assert_eq!((loaded.version, loaded.state.total), (4, 110), "{who} continues from the valid v3");
        let history = store.read(id).await.expect("read");
        assert_eq!(shown(&history[..3]), expected, "{who}'s history before the command on top");
        assert_eq!(history[3].position, appended.position, "{who}: the command on top");
    }
}

// ---------------------------------------------------------------------------
// 3. Races
// ---------------------------------------------------------------------------

/// Another writer's valid record for version n+1 lands just before an
/// instance appends at `Exact(n)`: the append answers `Conflict` (whether
/// the instance saw the foreign record before sending or only after its own
/// record landed), its events show in no reader — the instance itself, a
/// second running instance, a fresh one — and the instance then appends on
/// top of the winner at `Exact(n + 1)`. Several rounds, so that the race
/// path (own record written, then voided) is taken in practice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loser_of_a_race_is_never_acknowledged() {
    const ROUNDS: i64 = 6;
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let config = common::config(&brokers, 2);
    let Some(a) = common::connect(config.clone()).await else { return };
    let b = KafkaStore::<Ledger>::open(config.clone()).await.expect("instance B connects");
    let producer = raw_producer(&brokers);
    let id = "raced";
    a.append(id, ExpectedVersion::NoStream, vec![LedgerEvent::Opened], tagged("cmd-open")).await.expect("open");
    a.append(id, ExpectedVersion::Exact(1), vec![LedgerEvent::Added { amount: 1 }], tagged("cmd-1"))
        .await
        .expect("add");

    // What must be in every history after the rounds (version → event id).
    let mut foreign: BTreeMap<u64, Uuid> = BTreeMap::new();
    for round in 0..ROUNDS {
        let n = a.load(id).await.expect("load").expect("the ledger exists").version;
        let history = a.read(id).await.expect("read");
        assert_eq!(history.len() as u64, n, "round {round}: A's history and table agree");
        let last = history.last().expect("a history").event_id;
        let winner = RawEvent::added(1000 + round);
        let at = produce_record(&producer, &a, id, n + 1, Some(last), std::slice::from_ref(&winner)).await;
        foreign.insert(n + 1, winner.event_id);
        let mine = vec![LedgerEvent::Added { amount: -(1000 + round) }];
        match a.append(id, ExpectedVersion::Exact(n), mine, tagged(&format!("cmd-lost-{round}"))).await {
            Err(StoreError::Conflict { actual, .. }) => {
                assert_eq!(actual, n + 1, "round {round}: the conflict names the winner's version")
            }
            other => panic!("round {round}: an append that lost to {at} must answer Conflict, got {other:?}"),
        }
        let on_top = vec![LedgerEvent::Added { amount: 2000 + round }];
        let next = a
            .append(id, ExpectedVersion::Exact(n + 1), on_top, tagged(&format!("cmd-top-{round}")))
            .await
            .unwrap_or_else(|e| panic!("round {round}: the append on top of the winner at v{}: {e}", n + 1));
        assert_eq!(next.version, n + 2, "round {round}");
    }
    let stats = a.follower_stats();
    eprintln!("instance A: {}", describe(&stats));

    let head = a.head().await.expect("head");
    wait_for_head(&a, &head, "A").await;
    wait_for_head(&b, &head, "B").await;
    let c = KafkaStore::<Ledger>::open(config).await.expect("instance C connects");
    let reference = a.read(id).await.expect("read");
    for (who, store) in [("A", &a), ("B", &b), ("C", &c)] {
        let history = store.read(id).await.expect("read");
        assert_contiguous(&history, who, id);
        assert_eq!(history.len() as u64, 2 + 2 * ROUNDS as u64, "{who}: two events per round after v2");
        assert_eq!(shown(&history), shown(&reference), "{who} reads another history");
        for e in &history {
            if let LedgerEvent::Added { amount } = e.payload {
                assert!(amount >= 0, "{who} shows the lost append's event {amount} at v{}", e.version);
            }
        }
        for (version, event_id) in &foreign {
            assert_eq!(history[*version as usize - 1].event_id, *event_id, "{who}: the winner holds v{version}");
        }
        let loaded = store.load(id).await.expect("load").expect("the ledger exists");
        assert_eq!((loaded.state, loaded.version), fold(&history), "{who}'s table");
    }
    let items = subscribe_to_head(&c, &head).await;
    assert_eq!(shown(&events_by_id(&items)[id]), shown(&reference), "the subscription shows the valid events only");
}

/// An instance taking commands from several tasks is dropped mid-load (the
/// tasks aborted, the store and its bus dropped) while a second instance
/// keeps writing the same aggregates. Proves: every command the dropped
/// instance acknowledged is in the survivor's and a fresh instance's
/// history at its versions; every survivor command too; no command's events
/// are valid twice; histories are contiguous and agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_dropped_mid_load_leaves_exactly_what_it_acknowledged() {
    const ACKED_BEFORE_DROP: usize = 20;
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let config = common::config(&brokers, 2);
    let Some(survivor) = common::connect(config.clone()).await else { return };
    let doomed = KafkaStore::<Ledger>::open(config.clone()).await.expect("the doomed instance connects");
    let ids: Vec<String> = (0..4).map(|i| format!("d-{i}")).collect();
    let survivor_bus = bus(&survivor);
    let mut survivor_acks: Vec<Ack> = Vec::new();
    for id in &ids {
        let command = format!("cmd-open-{id}");
        let outcome = survivor_bus
            .execute(id, LedgerCommand::Open, ExpectedVersion::NoStream, tagged(&command))
            .await
            .expect("open");
        let position = outcome.position.expect("a position");
        let events = vec![LedgerEvent::Opened];
        survivor_acks.push(Ack { id: id.clone(), first: 1, last: 1, events, position, command, via: 0 });
    }

    // The doomed instance's writers run until they are aborted; what they
    // record was acknowledged.
    let doomed_acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
    let doomed_bus = bus(&doomed);
    let doomed_writers: Vec<_> = (0..4)
        .map(|writer| {
            let (bus, ids, acks) = (doomed_bus.clone(), ids.clone(), doomed_acks.clone());
            tokio::spawn(async move {
                for n in 0.. {
                    let amount = 1_000_000 + writer * 100_000 + n;
                    let id = &ids[(writer as usize + n as usize) % ids.len()];
                    let command = format!("cmd-{amount}");
                    // Any other failure of a command (none expected) only
                    // leaves its outcome unknown: it must then be valid at
                    // most once, which the checks below cover.
                    if let Ok(outcome) =
                        bus.execute(id, LedgerCommand::Add(amount), ExpectedVersion::Any, tagged(&command)).await
                    {
                        let Some(position) = outcome.position else { continue };
                        let events = vec![LedgerEvent::Added { amount }];
                        let ack = Ack {
                            id: id.clone(),
                            first: outcome.version,
                            last: outcome.version,
                            events,
                            position,
                            command,
                            via: 1,
                        };
                        acks.lock().expect("acks").push(ack);
                    }
                }
            })
        })
        .collect();
    let survivor_writers: Vec<_> = (0..2)
        .map(|writer| {
            let (bus, ids) = (survivor_bus.clone(), ids.clone());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for n in 0..30i64 {
                    let amount = -(1 + writer * 1000 + n);
                    let id = &ids[(writer as usize + n as usize) % ids.len()];
                    let command = format!("cmd-{amount}");
                    let outcome = bus
                        .execute(id, LedgerCommand::Add(amount), ExpectedVersion::Any, tagged(&command))
                        .await
                        .map_err(|e| format!("{command} on {id}: {e}"))?;
                    let position = outcome.position.ok_or("no position")?;
                    let events = vec![LedgerEvent::Added { amount }];
                    acked.push(Ack {
                        id: id.clone(),
                        first: outcome.version,
                        last: outcome.version,
                        events,
                        position,
                        command,
                        via: 0,
                    });
                }
                Ok::<_, String>(acked)
            })
        })
        .collect();

    poll_until("the doomed instance acknowledges commands", Duration::from_secs(120), || {
        doomed_acks.lock().expect("acks").len() >= ACKED_BEFORE_DROP
    })
    .await;
    for writer in &doomed_writers {
        writer.abort();
    }
    for writer in doomed_writers {
        // Aborted: cancelled, or it never finishes otherwise.
        let _ = writer.await;
    }
    drop(doomed_bus);
    drop(doomed);
    let doomed_acks = doomed_acks.lock().expect("acks").clone();
    eprintln!("the doomed instance acknowledged {} commands before the drop", doomed_acks.len());

    for writer in survivor_writers {
        survivor_acks.extend(writer.await.expect("a survivor writer").unwrap_or_else(|e| panic!("{e}")));
    }
    // More commands after the drop, on every aggregate.
    for id in &ids {
        let command = format!("cmd-after-{id}");
        let outcome = survivor_bus
            .execute(id, LedgerCommand::Add(0), ExpectedVersion::Any, tagged(&command))
            .await
            .expect("a command after the drop");
        let position = outcome.position.expect("a position");
        let events = vec![LedgerEvent::Added { amount: 0 }];
        survivor_acks.push(Ack {
            id: id.clone(),
            first: outcome.version,
            last: outcome.version,
            events,
            position,
            command,
            via: 0,
        });
    }

    let head = survivor.head().await.expect("head");
    wait_for_head(&survivor, &head, "the survivor").await;
    let fresh = KafkaStore::<Ledger>::open(config).await.expect("a fresh instance connects");
    let acks: Vec<Ack> = survivor_acks.iter().chain(&doomed_acks).cloned().collect();
    let mut unacknowledged = 0;
    for id in &ids {
        let history = survivor.read(id).await.expect("read");
        assert_contiguous(&history, "the survivor", id);
        let covered = check_acks(&history, id, &acks, "the survivor");
        let mut commands: HashMap<&str, u64> = HashMap::new();
        for e in &history {
            let command = e.metadata.correlation_id.as_deref().expect("every command is tagged");
            if let Some(first) = commands.insert(command, e.version) {
                panic!("{id}: {command} is valid twice, at v{first} and v{}", e.version);
            }
            if !covered.contains(&e.version) {
                assert!(
                    command.starts_with("cmd-1"),
                    "{id} v{} of {command} is valid without an acknowledgement, and not the dropped instance's",
                    e.version
                );
                unacknowledged += 1;
            }
        }
        let loaded = survivor.load(id).await.expect("load").expect("the ledger exists");
        assert_eq!((loaded.state, loaded.version), fold(&history), "the survivor's {id}");
        let again = fresh.read(id).await.expect("read");
        assert_eq!(shown(&again), shown(&history), "the fresh instance reads another history of {id}");
        let loaded = fresh.load(id).await.expect("load").expect("the ledger exists");
        assert_eq!((loaded.state, loaded.version), fold(&history), "the fresh instance's {id}");
    }
    eprintln!(
        "{unacknowledged} commands in flight at the drop landed valid; survivor: {}",
        describe(&survivor.follower_stats())
    );
}

// ---------------------------------------------------------------------------
// 4. An event type this deploy cannot decode
// ---------------------------------------------------------------------------

/// The event type a newer deploy added.
const NEW_EVENT_TYPE: &str = "EntryAddedV9";

/// The codec of a deploy that predates [`NEW_EVENT_TYPE`]: it cannot decode
/// that type and delegates everything else to the JSON codec.
#[derive(Default)]
struct OldDeployCodec(JsonCodec<LedgerEvent>);

impl Codec<LedgerEvent> for OldDeployCodec {
    fn content_type(&self) -> &'static str {
        self.0.content_type()
    }

    fn encode(&self, event: &LedgerEvent) -> Result<Vec<u8>, CodecError> {
        self.0.encode(event)
    }

    fn decode(&self, event_type: &str, revision: u32, payload: &[u8]) -> Result<LedgerEvent, CodecError> {
        if event_type == NEW_EVENT_TYPE {
            return Err(CodecError {
                event_type: event_type.to_owned(),
                revision,
                reason: "unknown event type (written by a newer deploy)".into(),
            });
        }
        self.0.decode(event_type, revision, payload)
    }
}

/// The codec of the newer deploy: [`NEW_EVENT_TYPE`] carries
/// `{"amount_cents": n}` and is read as `Added { amount: n / 100 }`.
#[derive(Default)]
struct NewDeployCodec(JsonCodec<LedgerEvent>);

impl Codec<LedgerEvent> for NewDeployCodec {
    fn content_type(&self) -> &'static str {
        self.0.content_type()
    }

    fn encode(&self, event: &LedgerEvent) -> Result<Vec<u8>, CodecError> {
        self.0.encode(event)
    }

    fn decode(&self, event_type: &str, revision: u32, payload: &[u8]) -> Result<LedgerEvent, CodecError> {
        if event_type != NEW_EVENT_TYPE {
            return self.0.decode(event_type, revision, payload);
        }
        let err = |reason: String| CodecError { event_type: event_type.to_owned(), revision, reason };
        let value: Value = serde_json::from_slice(payload).map_err(|e| err(e.to_string()))?;
        let cents = value["amount_cents"].as_i64().ok_or_else(|| err("no amount_cents".into()))?;
        Ok(LedgerEvent::Added { amount: cents / 100 })
    }
}

/// A record of an event type the running code cannot decode halts its
/// partition, visibly and without voiding it: `load`, `append` and `read`
/// of an aggregate there (the record's own or another one of the
/// partition) answer `Unavailable` ("halted"), `follower_stats().halted`
/// names the record, no void record is counted, `wait_applied` of the
/// record answers `false`, and an aggregate in another partition keeps
/// working. An old-code instance started afterwards halts the same way
/// (recovery); an instance whose codec can decode the type applies the
/// record like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_record_halts_its_partition_until_code_can_read_it() {
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let config = common::config(&brokers, 3);
    let old = match KafkaStore::<Ledger>::open_with_codec(config.clone(), OldDeployCodec::default()).await {
        Ok(store) => store,
        Err(e) => {
            let _: Option<()> = kes_test_support::missing("a usable Kafka broker", &e.to_string());
            return;
        }
    };
    let x = "halt-x";
    let y = id_elsewhere(&old, x, "free");
    let neighbour = id_in(&old, old.partition_of(x), "neighbour");
    for id in [x, y.as_str(), neighbour.as_str()] {
        old.append(id, ExpectedVersion::NoStream, vec![LedgerEvent::Opened], Metadata::default()).await.expect("open");
    }
    let opened = old.read(x).await.expect("read")[0].event_id;
    let newer =
        RawEvent { event_id: Uuid::now_v7(), event_type: NEW_EVENT_TYPE, payload: json!({"amount_cents": 900}) };
    let at = produce_record(&raw_producer(&brokers), &old, x, 2, Some(opened), std::slice::from_ref(&newer)).await;

    poll_until("the old deploy halts the partition", APPLIED, || !old.follower_stats().halted.is_empty()).await;
    let stats = old.follower_stats();
    assert_eq!(stats.halted.len(), 1, "one partition halted: {}", describe(&stats));
    let halted = &stats.halted[0];
    assert_eq!((halted.partition, halted.offset), (at.partition, at.offset), "the halt names the record");
    assert!(halted.reason.contains(NEW_EVENT_TYPE), "the reason names the event type: {}", halted.reason);
    assert_eq!(stats.void_records, 0, "an undecodable record is not void: {}", describe(&stats));

    let is_halted = |result: Result<(), StoreError>, what: &str| match result {
        Err(StoreError::Unavailable(message)) => {
            assert!(message.contains("halted"), "{what}: the message says the partition is halted: {message}")
        }
        other => panic!("{what} in a halted partition must answer Unavailable, got {other:?}"),
    };
    is_halted(old.load(x).await.map(drop), "load");
    is_halted(old.read(x).await.map(drop), "read");
    is_halted(old.load(&neighbour).await.map(drop), "load of another aggregate of the partition");
    assert!(!old.wait_applied(at, Duration::from_secs(1)).await, "a halted record is never applied");
    is_halted(
        old.append(x, ExpectedVersion::Any, vec![LedgerEvent::Added { amount: 1 }], Metadata::default())
            .await
            .map(drop),
        "append",
    );
    // Another partition keeps working.
    let appended = old
        .append(&y, ExpectedVersion::Exact(1), vec![LedgerEvent::Added { amount: 5 }], Metadata::default())
        .await
        .expect("an append in another partition");
    assert_eq!(appended.version, 2);
    assert_eq!(old.load(&y).await.expect("load").map(|s| s.version), Some(2));
    assert_eq!(old.read(&y).await.expect("read").len(), 2);
    assert_eq!(old.follower_stats().void_records, 0, "still nothing void");

    // The old code restarted (a rolling deploy not done yet) halts the same
    // way at recovery.
    let restarted = KafkaStore::<Ledger>::open_with_codec(config.clone(), OldDeployCodec::default())
        .await
        .expect("an old-code instance starts on a log it cannot fully read");
    let stats = restarted.follower_stats();
    let halts: Vec<(u32, u64)> = stats.halted.iter().map(|h| (h.partition, h.offset)).collect();
    assert_eq!(halts, [(at.partition, at.offset)], "the restarted old code: {}", describe(&stats));
    assert_eq!(stats.void_records, 0, "the restarted old code voids nothing: {}", describe(&stats));
    is_halted(restarted.load(x).await.map(drop), "load after a restart");
    assert_eq!(restarted.load(&y).await.expect("load").map(|s| s.version), Some(2), "y after a restart");

    // The newer deploy reads it.
    let new = KafkaStore::<Ledger>::open_with_codec(config, NewDeployCodec::default())
        .await
        .expect("the newer deploy connects");
    let stats = new.follower_stats();
    assert!(stats.halted.is_empty() && stats.void_records == 0, "the newer deploy: {}", describe(&stats));
    let loaded = new.load(x).await.expect("load").expect("x exists");
    assert_eq!((loaded.version, loaded.state.total, loaded.state.entries), (2, 9, 1), "x with the new event");
    let history = new.read(x).await.expect("read");
    // A decoded envelope names the event as the code reads it: the new
    // deploy's codec reads the new type as `EntryAdded`.
    let types: Vec<&str> = history.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["LedgerOpened", "EntryAdded"]);
    assert_eq!(history[1].event_id, newer.event_id);
    assert_eq!(history[1].payload, LedgerEvent::Added { amount: 9 });
    let appended = new
        .append(x, ExpectedVersion::Exact(2), vec![LedgerEvent::Added { amount: 1 }], Metadata::default())
        .await
        .expect("the newer deploy appends to x");
    assert_eq!(appended.version, 3);
    assert_eq!(new.load(&y).await.expect("load").map(|s| s.version), Some(2), "y as the old deploy left it");
    is_halted(old.load(x).await.map(drop), "load (still, in the old deploy)");
}

// ---------------------------------------------------------------------------
// 5. Reads after writes through another instance
// ---------------------------------------------------------------------------

/// A position answered by one instance's append, handed to another
/// instance's `wait_for_position`, makes that instance's next `load` and
/// `read` show the write — in both directions, on several aggregates, and
/// the next append there may expect that version exactly. A position not
/// yet in the log is waited for only as long as asked and answers `false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_wait_for_a_position_written_through_another_instance() {
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let config = common::config(&brokers, 2);
    let Some(a) = common::connect(config.clone()).await else { return };
    let b = KafkaStore::<Ledger>::open(config).await.expect("instance B connects");
    let instances = [("A", &a), ("B", &b)];
    let mut versions: HashMap<String, u64> = HashMap::new();
    for i in 0..12usize {
        let (writer_name, writer) = instances[i % 2];
        let (reader_name, reader) = instances[(i + 1) % 2];
        let id = format!("w-{}", i % 3);
        let version = versions.entry(id.clone()).or_default();
        let (expected, event) = if *version == 0 {
            (ExpectedVersion::NoStream, LedgerEvent::Opened)
        } else {
            (ExpectedVersion::Exact(*version), LedgerEvent::Added { amount: i as i64 })
        };
        let appended = writer
            .append(&id, expected, vec![event.clone()], Metadata::default())
            .await
            .unwrap_or_else(|e| panic!("{writer_name} appends to {id} expecting {expected}: {e}"));
        *version += 1;
        assert_eq!(appended.version, *version);
        let reached = reader.wait_for_position(appended.position, Duration::from_secs(10)).await;
        assert_eq!(
            reached,
            Ok(true),
            "{reader_name} did not apply {writer_name}'s {} within 10 s: {}",
            appended.position,
            describe(&reader.follower_stats())
        );
        let loaded = reader.load(&id).await.expect("load").expect("the ledger exists");
        assert_eq!(loaded.version, *version, "{reader_name}'s load after waiting for {}", appended.position);
        let history = reader.read(&id).await.expect("read");
        let last = history.last().expect("a history");
        assert_eq!((last.version, last.position, &last.payload), (*version, appended.position, &event));
    }

    // A position past the end of the log: false after the time asked for.
    let head = a.head().await.expect("head");
    let beyond = Position::new(0, head.next_offset(0) + 1000);
    let started = Instant::now();
    let reached = b.wait_for_position(beyond, Duration::from_millis(300)).await;
    let waited = started.elapsed();
    assert_eq!(reached, Ok(false), "{beyond} is not in the log");
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(10),
        "waited {waited:?} for a position that does not come (asked 300 ms)"
    );
}

// ---------------------------------------------------------------------------
// 6. One idempotency key through several instances
// ---------------------------------------------------------------------------

/// The same keyed command sent through three instances at once, and a
/// retry sent through another instance right after the first answer (its
/// follower may not have applied the first record yet), appends once
/// (DESIGN.md §5, pitfall 4): every answer names the same version and
/// position, exactly one is not a replay, the history holds the command's
/// event once, and every instance recalls the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_idempotency_key_through_every_instance_appends_once() {
    const KEYS: i64 = 12;
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let config = common::config(&brokers, 2);
    let Some(first) = common::connect(config.clone()).await else { return };
    let mut stores = vec![first];
    for _ in 0..2 {
        stores.push(KafkaStore::open(config.clone()).await.expect("another instance connects"));
    }
    let buses: Vec<Arc<Bus>> = stores.iter().map(bus).collect();
    let ids = ["k-0", "k-1", "k-2"];
    for id in ids {
        buses[0].execute(id, LedgerCommand::Open, ExpectedVersion::NoStream, Metadata::default()).await.expect("open");
    }
    // Every instance knows the ledgers are open: a bus that decided on a
    // state without the open would refuse the command ("not open") instead.
    let opened = stores[0].head().await.expect("head");
    for (i, store) in stores.iter().enumerate() {
        wait_for_head(store, &opened, &format!("instance {i}")).await;
    }
    // key → (id, amount, answered version)
    let mut answered: BTreeMap<String, (&str, i64, u64)> = BTreeMap::new();
    for k in 0..KEYS {
        let id = ids[k as usize % ids.len()];
        let key = format!("key-{k}");
        let amount = 100 + k;
        let keyed = Metadata { idempotency_key: Some(key.clone()), ..Metadata::default() };
        let outcomes = if k % 2 == 0 {
            // At once through every instance.
            let sends = buses
                .iter()
                .map(|bus| bus.execute(id, LedgerCommand::Add(amount), ExpectedVersion::Any, keyed.clone()));
            futures::future::join_all(sends).await
        } else {
            // One after another, each through the next instance.
            let mut outcomes = Vec::new();
            for bus in &buses {
                outcomes.push(bus.execute(id, LedgerCommand::Add(amount), ExpectedVersion::Any, keyed.clone()).await);
            }
            outcomes
        };
        let outcomes: Vec<_> = outcomes
            .into_iter()
            .enumerate()
            .map(|(via, o)| o.unwrap_or_else(|e| panic!("{key} on {id} via instance {via}: {e}")))
            .collect();
        let answers: BTreeSet<(u64, Option<Position>)> = outcomes.iter().map(|o| (o.version, o.position)).collect();
        assert_eq!(answers.len(), 1, "{key} on {id}: the instances answered differently: {outcomes:?}");
        let originals = outcomes.iter().filter(|o| !o.deduplicated).count();
        assert_eq!(originals, 1, "{key} on {id}: exactly one answer is not a replay: {outcomes:?}");
        answered.insert(key, (id, amount, outcomes[0].version));
    }

    let head = stores[0].head().await.expect("head");
    for (i, store) in stores.iter().enumerate() {
        wait_for_head(store, &head, &format!("instance {i}")).await;
    }
    for (key, (id, amount, version)) in &answered {
        for (i, store) in stores.iter().enumerate() {
            let history = store.read(id).await.expect("read");
            let at: Vec<u64> = history
                .iter()
                .filter(|e| e.payload == LedgerEvent::Added { amount: *amount })
                .map(|e| e.version)
                .collect();
            assert_eq!(at, [*version], "instance {i}: {key}'s event on {id} is in the history once, at v{version}");
            let recalled = store.recall(id, key).await.expect("recall").map(|a| a.version);
            assert_eq!(recalled, Some(*version), "instance {i} recalls {key} on {id}");
        }
    }
    for id in ids {
        let history = stores[0].read(id).await.expect("read");
        assert_contiguous(&history, "instance 0", id);
        let keyed = history.iter().filter(|e| e.metadata.idempotency_key.is_some()).count();
        let expected = answered.values().filter(|(i, _, _)| *i == id).count();
        assert_eq!(keyed, expected, "{id}: one event per key, nothing else keyed");
    }
    for (i, store) in stores.iter().enumerate() {
        eprintln!("instance {i}: {}", describe(&store.follower_stats()));
    }
}

// ---------------------------------------------------------------------------
// 7. A command decided on a state another instance just changed
// ---------------------------------------------------------------------------

/// A ledger opened through instance A takes a command without an expected
/// version through instance B right away, before B's follower could have
/// applied the open: the command must be decided on the log as it is
/// (`load_current`), not refused by the aggregate on B's stale view ("not
/// open") — with `ExpectedVersion::Any` through a bus a command always
/// succeeds. Proves it on several aggregates in both partitions, and that
/// the histories stay contiguous.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_right_after_a_create_through_another_instance_is_decided_on_the_log() {
    let Some(brokers) = common::brokers() else { return };
    let _turn = common::turn().await;
    let config = common::config(&brokers, 2);
    let Some(a) = common::connect(config.clone()).await else { return };
    let b = KafkaStore::<Ledger>::open(config).await.expect("instance B connects");
    let (bus_a, bus_b) = (bus(&a), bus(&b));
    let mut refused = Vec::new();
    for i in 0..6 {
        let id = format!("fresh-{i}");
        let opened = bus_a
            .execute(&id, LedgerCommand::Open, ExpectedVersion::NoStream, Metadata::default())
            .await
            .expect("open through A");
        match bus_b.execute(&id, LedgerCommand::Add(5), ExpectedVersion::Any, Metadata::default()).await {
            Ok(outcome) => assert_eq!(outcome.version, 2, "{id}: the command through B follows the open"),
            Err(e) => refused.push(format!("{id} (opened at {:?} through A): {e}", opened.position)),
        }
    }
    assert!(refused.is_empty(), "commands through B refused on a stale view of the log: {refused:#?}");
    let head = a.head().await.expect("head");
    wait_for_head(&a, &head, "A").await;
    for i in 0..6 {
        let id = format!("fresh-{i}");
        let history = a.read(&id).await.expect("read");
        assert_contiguous(&history, "A", &id);
        assert_eq!(history.len(), 2, "{id}: the open and the command");
    }
}
