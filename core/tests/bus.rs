//! The command bus: failures of collaborators, expectations, parallelism
//! and idempotent retries.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kes_core::conformance::{Ledger, LedgerCommand, LedgerEvent};
use kes_core::{
    Appended, Checkpoint, CommandBus, CommandError, Envelope, EventStore, EventStream, ExpectedVersion, InMemoryStore,
    Metadata, Snapshot, StoreError,
};
use tokio::sync::Notify;

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

#[tokio::test]
async fn a_conflict_from_another_writer_is_a_typed_conflict() {
    let mut store = MockStore::new();
    store.expect_load().returning(|_| Ok(Some(open_ledger())));
    store.expect_append().returning(|id, expected, _, _| {
        Err(StoreError::Conflict { aggregate: "ledger".into(), id: id.into(), expected, actual: 2 })
    });
    let bus = CommandBus::new(store);
    let err = bus.execute("l-1", LedgerCommand::Add(5), ExpectedVersion::Any, Metadata::default()).await.unwrap_err();
    assert!(matches!(err, CommandError::Conflict { actual: 2, expected: ExpectedVersion::Exact(1), .. }));
}

#[tokio::test]
async fn a_failing_store_leaves_the_state_unchanged() {
    // A real store behind a failing front: the append never reaches it.
    let real = InMemoryStore::<Ledger>::new();
    real.append("l-1", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], Metadata::default()).await.unwrap();
    let mut store = MockStore::new();
    let loader = real.clone();
    store.expect_load().returning(move |id| {
        let loader = loader.clone();
        let id = id.to_owned();
        futures::executor::block_on(async move { loader.load(&id).await })
    });
    store.expect_append().returning(|_, _, _, _| Err(StoreError::Unavailable("timeout".into())));
    let bus = CommandBus::new(store);
    assert!(bus.execute("l-1", LedgerCommand::Add(9), ExpectedVersion::Any, Metadata::default()).await.is_err());
    let after = real.load("l-1").await.unwrap().unwrap();
    assert_eq!((after.version, after.state.total), (1, 0));
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

/// A store that holds appends to one id until released.
#[derive(Clone)]
struct HeldStore {
    inner: InMemoryStore<Ledger>,
    held_id: &'static str,
    release: Arc<Notify>,
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
            self.release.notified().await;
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
async fn commands_on_different_aggregates_do_not_wait_for_each_other() {
    let release = Arc::new(Notify::new());
    let store = HeldStore { inner: InMemoryStore::new(), held_id: "slow", release: Arc::clone(&release) };
    let bus = Arc::new(CommandBus::new(store));
    let slow = {
        let bus = Arc::clone(&bus);
        tokio::spawn(async move {
            bus.execute("slow", LedgerCommand::Open, ExpectedVersion::Any, Metadata::default()).await
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let fast = tokio::time::timeout(
        Duration::from_secs(5),
        bus.execute("fast", LedgerCommand::Open, ExpectedVersion::Any, Metadata::default()),
    )
    .await
    .expect("a command on another aggregate waited for the held one");
    assert_eq!(fast.unwrap().version, 1);
    // The same aggregate does wait: a second command on "slow" queues.
    let queued = {
        let bus = Arc::clone(&bus);
        tokio::spawn(async move {
            bus.execute("slow", LedgerCommand::Add(1), ExpectedVersion::Any, Metadata::default()).await
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!queued.is_finished());
    release.notify_one();
    assert_eq!(slow.await.unwrap().unwrap().version, 1);
    release.notify_one();
    assert_eq!(queued.await.unwrap().unwrap().version, 2);
    assert_eq!(bus.store().inner.head().await.unwrap().next_offset(0), 3);
}
