//! The EventStore conformance suite. Each function takes a fresh, empty
//! store and panics with a message when the store breaks the contract.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::ledger::{Ledger, LedgerCommand, LedgerEvent};
use crate::bus::{CommandBus, CommandError};
use crate::envelope::{Checkpoint, Envelope, Metadata};
use crate::store::{EventStore, ExpectedVersion, StoreError};

const WAIT: Duration = Duration::from_secs(30);

fn meta() -> Metadata {
    Metadata::default()
}

async fn open<S: EventStore<Ledger>>(store: &S, id: &str) {
    store.append(id, ExpectedVersion::NoStream, vec![LedgerEvent::Opened], meta()).await.expect("open a ledger");
}

/// Reads `items` appends from a subscription starting at `from`.
pub async fn take<S: EventStore<Ledger>>(store: &S, from: Checkpoint, items: usize) -> Vec<Vec<Envelope<LedgerEvent>>> {
    let mut stream = store.subscribe(from).await.expect("subscribe");
    let mut out = Vec::with_capacity(items);
    while out.len() < items {
        match tokio::time::timeout(WAIT, stream.next()).await {
            Ok(Some(Ok(item))) => out.push(item.events),
            Ok(Some(Err(e))) => panic!("subscription failed after {} items: {e}", out.len()),
            Ok(None) => panic!("subscription ended after {} of {items} items", out.len()),
            Err(_) => panic!("subscription delivered {} of {items} items within {WAIT:?}", out.len()),
        }
    }
    out
}

fn assert_contiguous(events: &[Envelope<LedgerEvent>], id: &str, count: u64) {
    let versions: Vec<u64> = events.iter().filter(|e| e.aggregate_id == id).map(|e| e.version).collect();
    assert_eq!(versions, (1..=count).collect::<Vec<_>>(), "versions of {id} are not 1..={count}");
}

/// Events appended are loaded (state + version) and read back with their
/// envelopes and metadata intact.
pub async fn append_load_read_round_trip<S: EventStore<Ledger>>(store: S) {
    let mut metadata = Metadata {
        correlation_id: Some("corr-1".into()),
        causation_id: Some("cause-1".into()),
        principal: Some("alice".into()),
        ..Metadata::default()
    };
    metadata.extra.insert("client".into(), "conformance".into());
    let first = store
        .append(
            "l-1",
            ExpectedVersion::NoStream,
            vec![LedgerEvent::Opened, LedgerEvent::Added { amount: 5 }],
            metadata.clone(),
        )
        .await
        .expect("first append");
    assert_eq!(first.version, 2);
    assert!(!first.deduplicated);
    let second = store
        .append("l-1", ExpectedVersion::Exact(2), vec![LedgerEvent::Added { amount: -2 }], meta())
        .await
        .expect("second");
    assert_eq!(second.version, 3);
    assert!(second.position > first.position, "positions grow within a stream");

    let snapshot = store.load("l-1").await.expect("load").expect("the stream exists");
    assert_eq!(snapshot.version, 3);
    assert_eq!(snapshot.state, Ledger { open: true, closed: false, total: 3, entries: 2 });

    let history = store.read("l-1").await.expect("read");
    assert_eq!(history.len(), 3);
    assert_contiguous(&history, "l-1", 3);
    assert_eq!(history[0].payload, LedgerEvent::Opened);
    assert_eq!(history[0].event_type, "LedgerOpened");
    assert_eq!(history[1].event_type, "EntryAdded");
    assert_eq!(history[0].revision, 1);
    assert!(history.iter().all(|e| e.aggregate_type == "ledger" && e.aggregate_id == "l-1"));
    assert_eq!(history[0].metadata, metadata);
    assert_eq!(history[1].metadata, metadata);
    assert_eq!(history[2].metadata, Metadata::default());
    assert_eq!(history[2].position, second.position);
    let ids: HashSet<_> = history.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), 3, "event ids are unique");
    let age = chrono::Utc::now() - history[0].recorded_at;
    assert!(age.num_seconds().abs() < 300, "recorded_at is the append time, got {}", history[0].recorded_at);
}

/// An append without events is `Invalid` and writes nothing.
pub async fn an_append_without_events_is_invalid<S: EventStore<Ledger>>(store: S) {
    let err = store.append("l-empty", ExpectedVersion::Any, Vec::new(), Metadata::default()).await.unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    assert!(store.load("l-empty").await.expect("load").is_none());
    assert!(store.read("l-empty").await.expect("read").is_empty());
}

/// A stream never written is `None` to `load` and empty to `read`.
pub async fn missing_stream_is_empty<S: EventStore<Ledger>>(store: S) {
    assert!(store.load("nobody").await.expect("load").is_none());
    assert!(store.read("nobody").await.expect("read").is_empty());
    assert!(store.recall("nobody", "key").await.expect("recall").is_none());
    store.ping().await.expect("ping");
}

/// Every form of stale expectation is a typed conflict and appends nothing.
pub async fn stale_expected_version_is_a_conflict<S: EventStore<Ledger>>(store: S) {
    open(&store, "l-1").await;
    store
        .append("l-1", ExpectedVersion::Exact(1), vec![LedgerEvent::Added { amount: 1 }], meta())
        .await
        .expect("append");
    for expected in [ExpectedVersion::Exact(1), ExpectedVersion::Exact(3), ExpectedVersion::NoStream] {
        match store.append("l-1", expected, vec![LedgerEvent::Added { amount: 100 }], meta()).await {
            Err(StoreError::Conflict { actual: 2, .. }) => {}
            other => panic!("expected a conflict at version 2 for {expected}, got {other:?}"),
        }
    }
    match store.append("l-2", ExpectedVersion::Exists, vec![LedgerEvent::Opened], meta()).await {
        Err(StoreError::Conflict { actual: 0, .. }) => {}
        other => panic!("expected a conflict on a missing stream, got {other:?}"),
    }
    assert_eq!(store.read("l-1").await.expect("read").len(), 2);
    assert!(store.read("l-2").await.expect("read").is_empty());
    assert_eq!(store.load("l-1").await.expect("load").expect("exists").state.total, 1);
}

/// A multi-event append lands whole, as one subscription item; a failed one
/// (conflict, or an event that cannot be encoded) leaves nothing behind.
pub async fn multi_event_append_is_atomic<S: EventStore<Ledger>>(store: S) {
    let three = vec![LedgerEvent::Opened, LedgerEvent::Added { amount: 1 }, LedgerEvent::Added { amount: 2 }];
    store.append("l-1", ExpectedVersion::NoStream, three, meta()).await.expect("append three");
    let half_bad = vec![LedgerEvent::Added { amount: 10 }, LedgerEvent::Unencodable];
    match store.append("l-1", ExpectedVersion::Exact(3), half_bad, meta()).await {
        Err(StoreError::Invalid(_)) => {}
        other => panic!("an unencodable event must fail the append as invalid, got {other:?}"),
    }
    let stale = vec![LedgerEvent::Added { amount: 10 }, LedgerEvent::Added { amount: 20 }];
    match store.append("l-1", ExpectedVersion::Exact(2), stale, meta()).await {
        Err(StoreError::Conflict { expected: ExpectedVersion::Exact(2), actual: 3, .. }) => {}
        other => panic!("a stale multi-event append must conflict at version 3, got {other:?}"),
    }
    let snapshot = store.load("l-1").await.expect("load").expect("exists");
    assert_eq!((snapshot.version, snapshot.state.total), (3, 3), "failed appends changed the table");
    assert_eq!(store.read("l-1").await.expect("read").len(), 3, "failed appends left events");
    // Later appends still work after the failures.
    store
        .append("l-1", ExpectedVersion::Exact(3), vec![LedgerEvent::Added { amount: 4 }], meta())
        .await
        .expect("append");
    let items = take(&store, Checkpoint::start(), 2).await;
    assert_eq!(items[0].len(), 3, "the events of one command arrive together");
    assert_eq!(items[1].len(), 1);
    assert_contiguous(&items.concat(), "l-1", 4);
}

/// Several writers racing on one stream with the same expected version:
/// exactly one wins, the others get conflicts.
pub async fn racing_appends_admit_exactly_one<S: EventStore<Ledger> + Clone>(store: S) {
    open(&store, "l-1").await;
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store.append("l-1", ExpectedVersion::Exact(1), vec![LedgerEvent::Added { amount: i }], meta()).await
            })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(a) => {
                assert_eq!(a.version, 2);
                wins += 1;
            }
            Err(StoreError::Conflict { expected: ExpectedVersion::Exact(1), actual: 2, .. }) => {}
            Err(e) => panic!("a racing append failed with {e} instead of a conflict at version 2"),
        }
    }
    assert_eq!(wins, 1, "exactly one racing append may win");
    assert_eq!(store.read("l-1").await.expect("read").len(), 2);
}

async fn hammer<S: EventStore<Ledger> + Clone>(store: S, ids: &[String], tasks: usize, per_task: usize) {
    let bus = Arc::new(CommandBus::new(store.clone()));
    for id in ids {
        bus.execute(id, LedgerCommand::Open, ExpectedVersion::NoStream, meta()).await.expect("open");
    }
    let ids: Arc<Vec<String>> = Arc::new(ids.to_vec());
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let bus = Arc::clone(&bus);
            let ids = Arc::clone(&ids);
            tokio::spawn(async move {
                for i in 0..per_task {
                    let id = &ids[(t * per_task + i) % ids.len()];
                    bus.execute(id, LedgerCommand::Add(1), ExpectedVersion::Any, meta()).await.expect("command");
                }
            })
        })
        .collect();
    for h in handles {
        h.await.expect("task");
    }
    let total = tasks * per_task;
    let mut per_id: BTreeMap<&str, u64> = BTreeMap::new();
    for i in 0..total {
        *per_id.entry(&ids[i % ids.len()]).or_default() += 1;
    }
    let mut all_events = 0;
    for (id, adds) in &per_id {
        let snapshot = store.load(id).await.expect("load").expect("exists");
        assert_eq!(snapshot.version, adds + 1, "{id} ends at the wrong version");
        assert_eq!(snapshot.state.entries, *adds, "{id} lost an update");
        let history = store.read(id).await.expect("read");
        assert_contiguous(&history, id, adds + 1);
        all_events += history.len();
    }
    assert_eq!(all_events, total + ids.len());
    // The subscription sees every event exactly once, in version order.
    let head = store.head().await.expect("head");
    let mut seen = Vec::new();
    let mut checkpoint = Checkpoint::start();
    let mut stream = store.subscribe(Checkpoint::start()).await.expect("subscribe");
    while !checkpoint.covers_all(&head) {
        let item = tokio::time::timeout(WAIT, stream.next()).await.expect("in time").expect("endless").expect("item");
        for e in item {
            checkpoint.advance(e.position);
            seen.push(e);
        }
    }
    let unique: HashSet<_> = seen.iter().map(|e| e.event_id).collect();
    assert_eq!(unique.len(), seen.len(), "the subscription repeated events");
    assert_eq!(seen.len(), all_events, "the subscription missed events");
    for id in per_id.keys() {
        assert_contiguous(&seen, id, per_id[id] + 1);
    }
}

/// 32 tasks × 100 commands through the command bus on one aggregate:
/// exact count, contiguous versions, nothing lost or repeated.
pub async fn concurrent_commands_on_one_aggregate<S: EventStore<Ledger> + Clone>(store: S) {
    hammer(store, &["hot".to_owned()], 32, 100).await;
}

/// 32 tasks × 100 commands spread over 100 aggregates.
pub async fn concurrent_commands_on_many_aggregates<S: EventStore<Ledger> + Clone>(store: S) {
    let ids: Vec<String> = (0..100).map(|i| format!("l-{i:03}")).collect();
    hammer(store, &ids, 32, 100).await;
}

/// A subscription resumed from a checkpoint continues exactly where the
/// first one stopped, then delivers appends made after it started.
pub async fn subscribe_resumes_from_checkpoint<S: EventStore<Ledger>>(store: S) {
    for id in ["a", "b", "c"] {
        open(&store, id).await;
    }
    for round in 0..3u64 {
        for id in ["a", "b", "c"] {
            let v = ExpectedVersion::Exact(round + 1);
            store.append(id, v, vec![LedgerEvent::Added { amount: 1 }], meta()).await.expect("append");
        }
    }
    let all = take(&store, Checkpoint::start(), 12).await;
    let mut checkpoint = Checkpoint::start();
    for item in &all[..5] {
        for e in item {
            checkpoint.advance(e.position);
        }
    }
    let rest = take(&store, checkpoint.clone(), 7).await;
    assert_eq!(rest, all[5..].to_vec(), "the resumed subscription has a gap or a repeat");
    for id in ["a", "b", "c"] {
        assert_contiguous(&all.concat(), id, 4);
    }
    // Live tail: an append made while subscribed arrives.
    let mut stream = store.subscribe(checkpoint).await.expect("subscribe");
    for _ in 0..7 {
        tokio::time::timeout(WAIT, stream.next()).await.expect("in time").expect("endless").expect("item");
    }
    store.append("d", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], meta()).await.expect("append");
    let live = tokio::time::timeout(WAIT, stream.next()).await.expect("in time").expect("endless").expect("item");
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].aggregate_id, "d");
    let head = store.head().await.expect("head");
    let mut end = Checkpoint::start();
    for e in all.concat().iter().chain(&live) {
        end.advance(e.position);
    }
    assert!(end.covers_all(&head) && head.covers_all(&end), "head {head:?} is not the end of the log {end:?}");
}

/// The same idempotency key on the same stream appends once and answers
/// what the first append answered; on another stream it is a new key.
pub async fn idempotency_key_appends_once<S: EventStore<Ledger>>(store: S) {
    open(&store, "l-1").await;
    let keyed = Metadata { idempotency_key: Some("retry-1".into()), ..Metadata::default() };
    let first = store
        .append("l-1", ExpectedVersion::Exact(1), vec![LedgerEvent::Added { amount: 7 }], keyed.clone())
        .await
        .expect("first");
    assert!(!first.deduplicated);
    // The retry carries the expectation of the first try, which is stale now.
    let again = store
        .append("l-1", ExpectedVersion::Exact(1), vec![LedgerEvent::Added { amount: 7 }], keyed.clone())
        .await
        .expect("retry");
    assert!(again.deduplicated);
    assert_eq!((again.version, again.position), (first.version, first.position));
    let recalled = store.recall("l-1", "retry-1").await.expect("recall").expect("the key is remembered");
    assert_eq!((recalled.version, recalled.position), (first.version, first.position));
    assert_eq!(store.read("l-1").await.expect("read").len(), 2, "the retry appended");
    assert_eq!(store.load("l-1").await.expect("load").expect("exists").state.total, 7);
    open(&store, "l-2").await;
    let other = store
        .append("l-2", ExpectedVersion::Exact(1), vec![LedgerEvent::Added { amount: 1 }], keyed)
        .await
        .expect("other stream");
    assert!(!other.deduplicated, "keys are per stream");
}

/// A deleted (closed) aggregate keeps its version: it cannot be re-created
/// from version 1, and its history stays readable.
pub async fn deleted_stream_keeps_its_version<S: EventStore<Ledger>>(store: S) {
    open(&store, "l-1").await;
    store.append("l-1", ExpectedVersion::Exact(1), vec![LedgerEvent::Closed], meta()).await.expect("close");
    let snapshot = store.load("l-1").await.expect("load").expect("a deleted stream still exists");
    assert_eq!(snapshot.version, 2, "the delete is the stream's version 2");
    assert!(snapshot.state.closed, "the loaded state is the deleted one");
    match store.append("l-1", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], meta()).await {
        Err(StoreError::Conflict { actual: 2, .. }) => {}
        other => panic!("re-creating a deleted stream must conflict at version 2, got {other:?}"),
    }
    assert_eq!(store.read("l-1").await.expect("read").len(), 2);
}

/// `load_document` is `load` as compact JSON, deleted flag included.
pub async fn state_documents_match_loads<S: EventStore<Ledger>>(store: S) {
    assert_eq!(store.load_document("l-1").await.expect("missing"), None);
    open(&store, "l-1").await;
    store.append("l-1", ExpectedVersion::Exact(1), vec![LedgerEvent::Added { amount: 4 }], meta()).await.expect("add");
    for expect_deleted in [false, true] {
        let snapshot = store.load("l-1").await.expect("load").expect("exists");
        let document = store.load_document("l-1").await.expect("document").expect("exists");
        let decoded: Ledger = serde_json::from_slice(&document.json).expect("the document is the state's JSON");
        assert_eq!((decoded, document.version, document.deleted), (snapshot.state, snapshot.version, expect_deleted));
        if !expect_deleted {
            store.append("l-1", ExpectedVersion::Exact(2), vec![LedgerEvent::Closed], meta()).await.expect("close");
        }
    }
}

/// A domain error through the bus appends nothing; the error stays typed.
pub async fn rejected_command_appends_nothing<S: EventStore<Ledger>>(store: S) {
    let bus = CommandBus::new(store);
    match bus.execute("l-1", LedgerCommand::Add(1), ExpectedVersion::Any, meta()).await {
        Err(CommandError::Rejected(super::ledger::LedgerError::NotOpen)) => {}
        other => panic!("expected a domain rejection, got {other:?}"),
    }
    bus.execute("l-1", LedgerCommand::Open, ExpectedVersion::NoStream, meta()).await.expect("open");
    assert!(matches!(
        bus.execute("l-1", LedgerCommand::Open, ExpectedVersion::Any, meta()).await,
        Err(CommandError::Rejected(super::ledger::LedgerError::AlreadyOpen))
    ));
    assert_eq!(bus.store().read("l-1").await.expect("read").len(), 1);
    let head = bus.store().head().await.expect("head");
    assert_eq!(Checkpoint::start().lag_behind(&head), 1, "only the open reached the log");
}

/// History pages by version: a missing stream and a page past the end are
/// empty; pages of one stream, read while another task keeps appending to
/// it (single- and multi-event appends), hold every event exactly once, in
/// version order, with the envelopes `read` gives.
// Kept in one piece: A conformance check reads as one scenario: what it writes, then every property asserted on
// it.
pub async fn history_pages_walk_every_event_once<S: EventStore<Ledger> + Clone>(store: S) {
    assert!(store.read_page("h-missing", 0, 10).await.expect("read a page").is_empty());
    open(&store, "h-1").await;
    for amount in 1..=10 {
        // Every third append carries two events: not every record is one version.
        let events = if amount % 3 == 0 {
            vec![LedgerEvent::Added { amount }, LedgerEvent::Added { amount: -amount }]
        } else {
            vec![LedgerEvent::Added { amount }]
        };
        store.append("h-1", ExpectedVersion::Any, events, meta()).await.expect("append");
    }
    let first = store.read_page("h-1", 0, 4).await.expect("first page");
    assert_eq!(first.iter().map(|e| e.version).collect::<Vec<_>>(), [1, 2, 3, 4], "the first page");
    assert!(store.read_page("h-1", 0, 0).await.expect("empty page").is_empty(), "a page of 0 is empty");
    assert!(store.read_page("h-1", 14, 5).await.expect("past the end").is_empty(), "nothing after the last version");
    let middle = store.read_page("h-1", 3, 2).await.expect("a page inside a two-event append");
    assert_eq!(middle.iter().map(|e| e.version).collect::<Vec<_>>(), [4, 5], "a page may start inside an append");

    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for amount in 11..=40 {
                let events = if amount % 4 == 0 {
                    vec![LedgerEvent::Added { amount }, LedgerEvent::Added { amount: 1 }]
                } else {
                    vec![LedgerEvent::Added { amount }]
                };
                store.append("h-1", ExpectedVersion::Any, events, meta()).await.expect("append while paging");
            }
        })
    };
    let mut paged: Vec<Envelope<LedgerEvent>> = Vec::new();
    let mut after = 0;
    let mut writing = true;
    loop {
        let page = store.read_page("h-1", after, 3).await.expect("a page while appending");
        assert!(page.len() <= 3, "a page holds at most its size");
        match page.last() {
            Some(last) => {
                after = last.version;
                paged.extend(page);
            }
            // The end of the stream as it is now: once the writer is done,
            // one more empty page means the whole stream was seen.
            None if writing => {
                if writer.is_finished() {
                    writing = false;
                }
                tokio::task::yield_now().await;
            }
            None => break,
        }
    }
    writer.await.expect("the writer task");
    let whole = store.read("h-1").await.expect("read the whole stream");
    let last = whole.last().map_or(0, |e| e.version);
    assert_eq!(last, 14 + 30 + 8, "every append is in the stream");
    assert_contiguous(&paged, "h-1", last);
    let ids = |events: &[Envelope<LedgerEvent>]| events.iter().map(|e| (e.version, e.event_id)).collect::<Vec<_>>();
    assert_eq!(ids(&paged), ids(&whole), "pages hold the events `read` gives");
    assert_eq!(
        paged.iter().map(|e| e.payload.clone()).collect::<Vec<_>>(),
        whole.iter().map(|e| e.payload.clone()).collect::<Vec<_>>()
    );
}
