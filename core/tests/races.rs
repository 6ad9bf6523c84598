//! The command bus against other writers of the same store (other
//! processes, or a store whose state cache lags): a lost race is decided
//! again on the current state, never answered with a false conflict.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use kes_core::conformance::{Ledger, LedgerCommand, LedgerEvent};
use kes_core::{
    Appended, Checkpoint, CommandBus, CommandError, Envelope, EventStore, EventStream, ExpectedVersion, InMemoryStore,
    Metadata, Snapshot, StoreError,
};

/// A store shared with a competing writer. `load` answers from a snapshot
/// taken when the front was made (a lagging cache) until `load_current`
/// is called; the first `append` lets the competitor append `competitor`
/// first (with the competitor's metadata), as another process would.
#[derive(Clone)]
struct Contended {
    log: InMemoryStore<Ledger>,
    stale: Arc<std::sync::Mutex<Option<Snapshot<Ledger>>>>,
    competitor: Arc<std::sync::Mutex<Option<(LedgerEvent, Metadata)>>>,
    appends: Arc<AtomicUsize>,
    current_loads: Arc<AtomicUsize>,
}

impl Contended {
    async fn new(log: InMemoryStore<Ledger>, competitor: Option<(LedgerEvent, Metadata)>) -> Self {
        let stale = log.load("l-1").await.expect("a snapshot");
        Self {
            log,
            stale: Arc::new(std::sync::Mutex::new(stale)),
            competitor: Arc::new(std::sync::Mutex::new(competitor)),
            appends: Arc::default(),
            current_loads: Arc::default(),
        }
    }
}

#[async_trait]
impl EventStore<Ledger> for Contended {
    async fn append(
        &self,
        id: &str,
        expected: ExpectedVersion,
        events: Vec<LedgerEvent>,
        metadata: Metadata,
    ) -> Result<Appended, StoreError> {
        self.appends.fetch_add(1, Ordering::SeqCst);
        let first = self.competitor.lock().expect("competitor").take();
        if let Some((event, theirs)) = first {
            self.log.append(id, ExpectedVersion::Any, vec![event], theirs).await?;
        }
        self.log.append(id, expected, events, metadata).await
    }
    async fn recall(&self, id: &str, key: &str) -> Result<Option<Appended>, StoreError> {
        self.log.recall(id, key).await
    }
    async fn load(&self, id: &str) -> Result<Option<Snapshot<Ledger>>, StoreError> {
        let stale = self.stale.lock().expect("stale").clone();
        match stale {
            Some(stale) => Ok(Some(stale)),
            None => self.log.load(id).await,
        }
    }
    async fn load_current(&self, id: &str) -> Result<Option<Snapshot<Ledger>>, StoreError> {
        self.current_loads.fetch_add(1, Ordering::SeqCst);
        self.stale.lock().expect("stale").take();
        self.log.load(id).await
    }
    async fn read(&self, id: &str) -> Result<Vec<Envelope<LedgerEvent>>, StoreError> {
        self.log.read(id).await
    }
    async fn subscribe(&self, from: Checkpoint) -> Result<EventStream<LedgerEvent>, StoreError> {
        self.log.subscribe(from).await
    }
    async fn head(&self) -> Result<Checkpoint, StoreError> {
        self.log.head().await
    }
}

/// A ledger opened with `adds` entries of 1: version `1 + adds`.
async fn ledger(adds: usize) -> InMemoryStore<Ledger> {
    let log = InMemoryStore::<Ledger>::new();
    log.append("l-1", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], Metadata::default()).await.expect("open");
    for _ in 0..adds {
        log.append("l-1", ExpectedVersion::Any, vec![LedgerEvent::Added { amount: 1 }], Metadata::default())
            .await
            .expect("add");
    }
    log
}

fn competing_add() -> Option<(LedgerEvent, Metadata)> {
    Some((LedgerEvent::Added { amount: 100 }, Metadata::default()))
}

#[tokio::test]
async fn a_command_without_an_expected_version_that_loses_a_race_is_decided_again() {
    let store = Contended::new(ledger(1).await, competing_add()).await;
    let bus = CommandBus::new(store.clone());
    let done = bus.execute("l-1", LedgerCommand::Add(5), ExpectedVersion::Any, Metadata::default()).await;
    let done = done.expect("no conflict for a caller that expected nothing");
    assert_eq!((done.version, done.state.total), (4, 106), "decided on the state the competitor left");
    assert_eq!(store.appends.load(Ordering::SeqCst), 2, "one lost race, one new decision");
    let history = store.log.read("l-1").await.expect("history");
    let amounts: Vec<_> = history.iter().map(|e| e.payload.clone()).collect();
    assert_eq!(
        amounts,
        [
            LedgerEvent::Opened,
            LedgerEvent::Added { amount: 1 },
            LedgerEvent::Added { amount: 100 },
            LedgerEvent::Added { amount: 5 }
        ]
    );
}

#[tokio::test]
async fn an_expected_version_that_only_a_stale_cache_contradicts_is_admitted() {
    // The log is at version 3; the cache still says 2. The caller saw 3.
    let log = ledger(1).await;
    let store = Contended::new(log.clone(), None).await;
    log.append("l-1", ExpectedVersion::Exact(2), vec![LedgerEvent::Added { amount: 7 }], Metadata::default())
        .await
        .expect("another process appends");
    let bus = CommandBus::new(store.clone());
    let done = bus.execute("l-1", LedgerCommand::Add(5), ExpectedVersion::Exact(3), Metadata::default()).await;
    let done = done.expect("If-Match matched the log");
    assert_eq!((done.version, done.state.total), (4, 13));
    assert_eq!(store.current_loads.load(Ordering::SeqCst), 1, "the bus looked past its cache before refusing");
}

#[tokio::test]
async fn an_expected_version_the_log_moved_past_is_a_conflict_with_the_actual_version() {
    let store = Contended::new(ledger(1).await, competing_add()).await;
    let bus = CommandBus::new(store.clone());
    let err = bus.execute("l-1", LedgerCommand::Add(5), ExpectedVersion::Exact(2), Metadata::default()).await;
    match err {
        Err(CommandError::Conflict { expected: ExpectedVersion::Exact(2), actual: 3, .. }) => {}
        other => panic!("expected a conflict at version 3, got {other:?}"),
    }
    assert_eq!(store.log.load("l-1").await.expect("load").map(|s| s.version), Some(3), "nothing appended");
}

#[tokio::test]
async fn a_retry_that_another_process_already_appended_answers_as_the_first() {
    // The first attempt went through another process and landed; this
    // process's retry with the same key loses the race to it.
    let key = Metadata { idempotency_key: Some("k-1".into()), ..Metadata::default() };
    let store = Contended::new(ledger(1).await, Some((LedgerEvent::Added { amount: 5 }, key.clone()))).await;
    let bus = CommandBus::new(store.clone());
    let done = bus.execute("l-1", LedgerCommand::Add(5), ExpectedVersion::Any, key).await.expect("answered");
    assert!(done.deduplicated, "the retry repeats the first answer");
    assert_eq!((done.version, done.events), (3, 0));
    assert_eq!(store.log.read("l-1").await.expect("history").len(), 3, "appended once");
}

#[tokio::test]
async fn a_create_that_loses_to_another_create_is_a_conflict() {
    let log = InMemoryStore::<Ledger>::new();
    let store = Contended::new(log, competing_add().map(|_| (LedgerEvent::Opened, Metadata::default()))).await;
    let bus = CommandBus::new(store.clone());
    let err = bus.execute("l-1", LedgerCommand::Open, ExpectedVersion::NoStream, Metadata::default()).await;
    assert!(matches!(err, Err(CommandError::Conflict { actual: 1, .. })), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_buses_on_one_store_never_answer_a_plain_command_with_a_conflict() {
    // Two processes' buses (each serialises its own commands only) on one
    // log, writing the same aggregate at once.
    let log = ledger(0).await;
    let buses = [Arc::new(CommandBus::new(log.clone())), Arc::new(CommandBus::new(log.clone()))];
    let failed = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let bus = Arc::clone(&buses[i % 2]);
            let failed = Arc::clone(&failed);
            tokio::spawn(async move {
                for _ in 0..20 {
                    let r = bus.execute("l-1", LedgerCommand::Add(1), ExpectedVersion::Any, Metadata::default()).await;
                    if r.is_err() {
                        failed.store(true, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("a writer");
    }
    assert!(!failed.load(Ordering::SeqCst), "a plain command was refused");
    let state = log.load("l-1").await.expect("load").expect("a ledger");
    assert_eq!((state.version, state.state.total), (321, 320));
}

/// A guard (an authorization rule on the state) that allowed a command on
/// a state another writer has since changed is asked again on the new one:
/// nothing is appended on a permission the log no longer grants.
#[tokio::test]
async fn a_guard_is_asked_again_on_the_state_a_lost_race_leaves() {
    let store = Contended::new(ledger(1).await, competing_add()).await;
    let bus = CommandBus::new(store.clone());
    let asked = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&asked);
    let small_only = move |l: &Ledger, _: &LedgerCommand| {
        counted.fetch_add(1, Ordering::SeqCst);
        if l.total < 50 { Ok(()) } else { Err("only small ledgers take entries".to_owned()) }
    };
    let refused =
        bus.execute_guarded("l-1", LedgerCommand::Add(5), ExpectedVersion::Any, Metadata::default(), &small_only).await;
    assert!(
        matches!(&refused, Err(CommandError::Forbidden(r)) if r == "only small ledgers take entries"),
        "{refused:?}"
    );
    assert_eq!(asked.load(Ordering::SeqCst), 2, "asked on the stale state, then on the competitor's");
    let history = store.log.read("l-1").await.expect("history");
    assert!(!history.iter().any(|e| e.payload == LedgerEvent::Added { amount: 5 }), "nothing appended");
}

/// Like a rejection, a guard's refusal decided on a state that may be
/// stale is checked against the log before the caller hears it.
#[tokio::test]
async fn a_guard_refusal_on_a_stale_cache_is_checked_against_the_log() {
    let log = ledger(1).await;
    let store = Contended::new(log.clone(), None).await;
    log.append("l-1", ExpectedVersion::Any, vec![LedgerEvent::Added { amount: 7 }], Metadata::default())
        .await
        .expect("another process appends");
    let bus = CommandBus::new(store.clone());
    let big_only = |l: &Ledger, _: &LedgerCommand| if l.total >= 5 { Ok(()) } else { Err("too small".to_owned()) };
    let done = bus
        .execute_guarded("l-1", LedgerCommand::Add(5), ExpectedVersion::Any, Metadata::default(), &big_only)
        .await
        .expect("the log's state passes the guard");
    assert_eq!((done.version, done.state.total), (4, 13));
    assert_eq!(store.current_loads.load(Ordering::SeqCst), 1);
}

/// A retry whose key already landed replays the first answer: the guard
/// is not asked again, so a caller whose own command changed what the rule
/// looks at still gets the answer to what they did.
#[tokio::test]
async fn a_replayed_retry_does_not_ask_the_guard() {
    let log = ledger(0).await;
    let bus = CommandBus::new(log.clone());
    let meta = Metadata { idempotency_key: Some("k-1".into()), ..Metadata::default() };
    let small_only =
        |l: &Ledger, _: &LedgerCommand| if l.total < 50 { Ok(()) } else { Err("only small ledgers".to_owned()) };
    let first = bus
        .execute_guarded("l-1", LedgerCommand::Add(60), ExpectedVersion::Any, meta.clone(), &small_only)
        .await
        .expect("allowed on the empty ledger");
    let again = bus
        .execute_guarded("l-1", LedgerCommand::Add(60), ExpectedVersion::Any, meta, &small_only)
        .await
        .expect("the retry replays");
    assert!(again.deduplicated);
    assert_eq!(again.version, first.version);
    let other =
        bus.execute_guarded("l-1", LedgerCommand::Add(1), ExpectedVersion::Any, Metadata::default(), &small_only);
    assert!(matches!(other.await, Err(CommandError::Forbidden(_))), "a new command meets the rule");
}

/// A guard sees the command too: a rule on what a command would change
/// (only small entries), decided with the state it would change.
#[tokio::test]
async fn a_guard_sees_the_command() {
    let bus = CommandBus::new(ledger(0).await);
    let small_entries = |_: &Ledger, c: &LedgerCommand| match c {
        LedgerCommand::Add(n) if *n > 10 => Err(format!("{n} is too large an entry")),
        _ => Ok(()),
    };
    let refused =
        bus.execute_guarded("l-1", LedgerCommand::Add(11), ExpectedVersion::Any, Metadata::default(), &small_entries);
    assert!(matches!(refused.await, Err(CommandError::Forbidden(r)) if r == "11 is too large an entry"));
    let done = bus
        .execute_guarded("l-1", LedgerCommand::Add(3), ExpectedVersion::Any, Metadata::default(), &small_entries)
        .await
        .expect("a small entry passes");
    assert_eq!(done.state.total, 3);
}
