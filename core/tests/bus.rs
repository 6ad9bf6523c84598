//! The command bus: failures of collaborators, expectations, parallelism
//! and idempotent retries.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use kes_core::conformance::{Ledger, LedgerCommand, LedgerEvent};
use kes_core::{
    Appended, BusConfig, Checkpoint, CommandBus, CommandError, Envelope, EventStore, EventStream, ExpectedVersion,
    InMemoryStore, Metadata, Snapshot, StoreError,
};
use tokio::sync::{Notify, watch};

mockall::mock! {
    Store {}
    #[async_trait]
    impl EventStore<Ledger> for Store {
        async fn append(&self, id: &str, expected: ExpectedVersion, events: Vec<LedgerEvent>, metadata: Metadata) -> Result<Appended, StoreError>;
        async fn recall(&self, id: &str, idempotency_key: &str) -> Result<Option<Appended>, StoreError>;
        async fn load(&self, id: &str) -> Result<Option<Snapshot<Ledger>>, StoreError>;
        async fn read(&self, id: &str) -> Result<Vec<Envelope<LedgerEvent>>, StoreError>;
        async fn subscribe(&self, from: Checkpoint) -> Result<EventStream<LedgerEvent>, StoreError>;
        async fn head(&self) -> Result<Checkpoint, StoreError>;
    }
}

fn open_ledger() -> Snapshot<Ledger> {
    Snapshot { state: Ledger { open: true, ..Ledger::default() }, version: 1 }
}

#[tokio::test]
async fn a_failing_append_is_reported_and_nothing_is_answered_as_done() {
    let mut store = MockStore::new();
    store.expect_load().returning(|_| Ok(Some(open_ledger())));
    store.expect_append().times(1).returning(|_, _, _, _| Err(StoreError::Unavailable("broker down".into())));
    let bus = CommandBus::new(store);
    let err = bus.execute("l-1", LedgerCommand::Add(5), ExpectedVersion::Any, Metadata::default()).await.unwrap_err();
    match err {
        CommandError::Store(e) => assert!(e.is_transient()),
        other => panic!("expected a store error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_failing_load_appends_nothing() {
    let mut store = MockStore::new();
    store.expect_load().returning(|_| Err(StoreError::Backend("disk".into())));
    store.expect_append().never();
    let bus = CommandBus::new(store);
    let err = bus.execute("l-1", LedgerCommand::Add(5), ExpectedVersion::Any, Metadata::default()).await.unwrap_err();
    assert!(matches!(err, CommandError::Store(StoreError::Backend(_))));
}

/// A store that refuses every append as a conflict while its loads never
/// move: the bus decides again until its retry window closes, then answers
/// a typed conflict naming what the caller expected.
#[tokio::test]
async fn a_conflict_that_never_clears_is_a_typed_conflict_after_the_retry_window() {
    let mut store = MockStore::new();
    store.expect_load().returning(|_| Ok(Some(open_ledger())));
    store.expect_recall().returning(|_, _| Ok(None));
    let appends = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&appends);
    store.expect_append().returning(move |id, expected, _, _| {
        counted.fetch_add(1, Ordering::SeqCst);
        Err(StoreError::Conflict { aggregate: "ledger".into(), id: id.into(), expected, actual: 2 })
    });
    let config = BusConfig { conflict_retry_for: Duration::from_millis(30), ..BusConfig::default() };
    let bus = CommandBus::with_config(store, config);
    let err = bus.execute("l-1", LedgerCommand::Add(5), ExpectedVersion::Any, Metadata::default()).await.unwrap_err();
    assert!(matches!(err, CommandError::Conflict { actual: 2, expected: ExpectedVersion::Any, .. }), "{err:?}");
    assert!(appends.load(Ordering::SeqCst) >= 2, "the command was decided again before giving up");
}

/// A real store behind a front whose next `failures` appends fail before
/// reaching it; every other call, and every later append, goes through.
#[derive(Clone)]
struct FailingFront {
    inner: InMemoryStore<Ledger>,
    failures: Arc<AtomicUsize>,
    appends: Arc<AtomicUsize>,
}

#[async_trait]
impl EventStore<Ledger> for FailingFront {
    async fn append(
        &self,
        id: &str,
        expected: ExpectedVersion,
        events: Vec<LedgerEvent>,
        metadata: Metadata,
    ) -> Result<Appended, StoreError> {
        self.appends.fetch_add(1, Ordering::SeqCst);
        let fail = self.failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if fail {
            return Err(StoreError::Unavailable("timeout".into()));
        }
        self.inner.append(id, expected, events, metadata).await
    }
    async fn recall(&self, id: &str, key: &str) -> Result<Option<Appended>, StoreError> {
        self.inner.recall(id, key).await
    }
    async fn load(&self, id: &str) -> Result<Option<Snapshot<Ledger>>, StoreError> {
        self.inner.load(id).await
    }
    async fn read(&self, id: &str) -> Result<Vec<Envelope<LedgerEvent>>, StoreError> {
        self.inner.read(id).await
    }
    async fn subscribe(&self, from: Checkpoint) -> Result<EventStream<LedgerEvent>, StoreError> {
        self.inner.subscribe(from).await
    }
    async fn head(&self) -> Result<Checkpoint, StoreError> {
        self.inner.head().await
    }
}

#[tokio::test]
async fn a_failing_store_leaves_the_state_unchanged() {
    let real = InMemoryStore::<Ledger>::new();
    real.append("l-1", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], Metadata::default()).await.unwrap();
    let front = FailingFront {
        inner: real.clone(),
        failures: Arc::new(AtomicUsize::new(1)),
        appends: Arc::new(AtomicUsize::new(0)),
    };
    let bus = CommandBus::new(front.clone());
    let keyed = Metadata { idempotency_key: Some("k-9".into()), ..Metadata::default() };
    match bus.execute("l-1", LedgerCommand::Add(9), ExpectedVersion::Exact(1), keyed.clone()).await {
        Err(CommandError::Store(e)) => assert!(e.is_transient(), "{e:?}"),
        other => panic!("expected the store's failure, got {other:?}"),
    }
    // The front passes every later append through: a retry behind the
    // caller's back would have reached the real store.
    assert_eq!(front.appends.load(Ordering::SeqCst), 1, "the bus appended again after the failure");
    let after = real.load("l-1").await.unwrap().unwrap();
    assert_eq!((after.version, after.state.total), (1, 0));
    assert_eq!(real.read("l-1").await.unwrap().len(), 1);
    // The bus kept nothing of the failed command either: the caller's retry
    // with the same key runs on the unchanged state and really appends.
    let retried = bus.execute("l-1", LedgerCommand::Add(9), ExpectedVersion::Exact(1), keyed).await.unwrap();
    assert!(!retried.deduplicated, "the failed command's key was remembered as done");
    assert_eq!((retried.version, retried.state.total, retried.events), (2, 9, 1));
    let after = real.load("l-1").await.unwrap().unwrap();
    assert_eq!((after.version, after.state.total), (2, 9));
    assert_eq!(front.appends.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn expectations_are_checked_before_the_aggregate_decides() {
    let bus = CommandBus::new(InMemoryStore::<Ledger>::new());
    let none = Metadata::default;
    assert!(matches!(
        bus.execute("l-1", LedgerCommand::Add(1), ExpectedVersion::Exists, none()).await,
        Err(CommandError::NotFound { .. })
    ));
    bus.execute("l-1", LedgerCommand::Open, ExpectedVersion::NoStream, none()).await.unwrap();
    assert!(matches!(
        bus.execute("l-1", LedgerCommand::Add(1), ExpectedVersion::Exact(7), none()).await,
        Err(CommandError::Conflict { actual: 1, .. })
    ));
    assert!(matches!(
        bus.execute("l-1", LedgerCommand::Open, ExpectedVersion::NoStream, none()).await,
        Err(CommandError::Conflict { actual: 1, .. })
    ));
    bus.execute("l-1", LedgerCommand::Close, ExpectedVersion::Exact(1), none()).await.unwrap();
    // A deleted aggregate is not found, whatever version the caller names.
    assert!(matches!(
        bus.execute("l-1", LedgerCommand::Add(1), ExpectedVersion::Exact(2), none()).await,
        Err(CommandError::NotFound { .. })
    ));
    assert!(matches!(
        bus.execute("l-1", LedgerCommand::Add(1), ExpectedVersion::Exists, none()).await,
        Err(CommandError::NotFound { .. })
    ));
}

#[tokio::test]
async fn a_command_deciding_nothing_appends_nothing() {
    let bus = CommandBus::new(InMemoryStore::<Ledger>::new());
    bus.execute("l-1", LedgerCommand::Open, ExpectedVersion::NoStream, Metadata::default()).await.unwrap();
    let out =
        bus.execute("l-1", LedgerCommand::AddMany(vec![]), ExpectedVersion::Any, Metadata::default()).await.unwrap();
    assert_eq!((out.version, out.events, out.position), (1, 0, None));
    assert_eq!(bus.store().read("l-1").await.unwrap().len(), 1);
}

#[tokio::test]
async fn the_same_idempotency_key_runs_once_even_after_a_restart() {
    let store = InMemoryStore::<Ledger>::new();
    let bus = CommandBus::new(store.clone());
    bus.execute("l-1", LedgerCommand::Open, ExpectedVersion::NoStream, Metadata::default()).await.unwrap();
    let keyed = Metadata { idempotency_key: Some("k-1".into()), ..Metadata::default() };
    let first = bus.execute("l-1", LedgerCommand::Add(3), ExpectedVersion::Exact(1), keyed.clone()).await.unwrap();
    let again = bus.execute("l-1", LedgerCommand::Add(3), ExpectedVersion::Exact(1), keyed.clone()).await.unwrap();
    assert!(!first.deduplicated && again.deduplicated);
    assert_eq!((again.version, again.position, again.events), (first.version, first.position, 0));
    assert_eq!(again.state.total, 3);
    // A new bus (a restarted process) learns the key from the store.
    let restarted = CommandBus::new(store.clone());
    let third = restarted.execute("l-1", LedgerCommand::Add(3), ExpectedVersion::Exact(1), keyed).await.unwrap();
    assert!(third.deduplicated);
    assert_eq!(store.read("l-1").await.unwrap().len(), 2);
}

/// A store that holds appends to one id until released, and counts what
/// reaches it for that id.
#[derive(Clone)]
struct HeldStore {
    inner: InMemoryStore<Ledger>,
    held_id: &'static str,
    release: Arc<Notify>,
    /// Appends to the held id that have arrived (and wait for a release).
    arrived: Arc<watch::Sender<usize>>,
    /// Loads of the held id.
    loads: Arc<AtomicUsize>,
}

impl HeldStore {
    fn new(held_id: &'static str) -> Self {
        Self {
            inner: InMemoryStore::new(),
            held_id,
            release: Arc::new(Notify::new()),
            arrived: Arc::new(watch::channel(0).0),
            loads: Arc::new(AtomicUsize::new(0)),
        }
    }
}

#[async_trait]
impl EventStore<Ledger> for HeldStore {
    async fn append(
        &self,
        id: &str,
        expected: ExpectedVersion,
        events: Vec<LedgerEvent>,
        metadata: Metadata,
    ) -> Result<Appended, StoreError> {
        if id == self.held_id {
            self.arrived.send_modify(|n| *n += 1);
            self.release.notified().await;
        }
        self.inner.append(id, expected, events, metadata).await
    }
    async fn recall(&self, id: &str, key: &str) -> Result<Option<Appended>, StoreError> {
        self.inner.recall(id, key).await
    }
    async fn load(&self, id: &str) -> Result<Option<Snapshot<Ledger>>, StoreError> {
        if id == self.held_id {
            self.loads.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.load(id).await
    }
    async fn read(&self, id: &str) -> Result<Vec<Envelope<LedgerEvent>>, StoreError> {
        self.inner.read(id).await
    }
    async fn subscribe(&self, from: Checkpoint) -> Result<EventStream<LedgerEvent>, StoreError> {
        self.inner.subscribe(from).await
    }
    async fn head(&self) -> Result<Checkpoint, StoreError> {
        self.inner.head().await
    }
}

/// Returns once every other task of this test's runtime is blocked. The
/// test runs with the clock paused, and a paused clock moves on to the next
/// timer only when no task can make progress, however slow the machine.
async fn until_idle() {
    tokio::time::sleep(Duration::from_secs(3600)).await;
}

#[tokio::test(start_paused = true)]
async fn commands_on_different_aggregates_do_not_wait_for_each_other() {
    let store = HeldStore::new("slow");
    let (release, loads) = (Arc::clone(&store.release), Arc::clone(&store.loads));
    let mut arrived = store.arrived.subscribe();
    let bus = Arc::new(CommandBus::new(store));
    let slow = {
        let bus = Arc::clone(&bus);
        tokio::spawn(async move {
            bus.execute("slow", LedgerCommand::Open, ExpectedVersion::Any, Metadata::default()).await
        })
    };
    // From here on the slow command holds its turn, its append in the store.
    arrived.wait_for(|n| *n == 1).await.expect("the slow command reaches the store");
    let fast = tokio::time::timeout(
        Duration::from_secs(5),
        bus.execute("fast", LedgerCommand::Open, ExpectedVersion::Any, Metadata::default()),
    )
    .await
    .expect("a command on another aggregate waited for the held one");
    assert_eq!(fast.unwrap().version, 1);
    // The same aggregate does wait: a second command on "slow" queues for
    // its turn before it even loads the state.
    let queued = {
        let bus = Arc::clone(&bus);
        tokio::spawn(async move {
            bus.execute("slow", LedgerCommand::Add(1), ExpectedVersion::Any, Metadata::default()).await
        })
    };
    until_idle().await;
    assert!(!queued.is_finished());
    assert_eq!(loads.load(Ordering::SeqCst), 1, "the second command on slow ran beside the first");
    assert_eq!(*arrived.borrow(), 1);
    release.notify_one();
    assert_eq!(slow.await.unwrap().unwrap().version, 1);
    arrived.wait_for(|n| *n == 2).await.expect("the queued command reaches the store");
    assert_eq!(loads.load(Ordering::SeqCst), 2);
    release.notify_one();
    assert_eq!(queued.await.unwrap().unwrap().version, 2);
    assert_eq!(bus.store().inner.head().await.unwrap().next_offset(0), 3);
}
