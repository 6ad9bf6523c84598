//! Reactions over the in-memory store and view: commands with their
//! cause, exactly once across replays, refusals recorded, transient
//! failures retried, and an event the reaction cannot decide on stopping
//! it visibly.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use kes_core::conformance::{Ledger, LedgerCommand, LedgerEvent};
use kes_core::{
    Appended, CatchUp, Checkpoint, CommandBus, CommandRouter, CommandSink, Commands, Envelope, EventStore, EventStream,
    ExpectedVersion, InMemoryStore, InMemoryView, Metadata, Position, Reaction, ReactionConfig, ReactionError,
    ReactionKey, ReactionProjection, ReactionRunner, ReactionStart, ReactionTest, RunnerConfig, Snapshot, StoreError,
    journal_schema,
};

/// Mirrors every entry added to ledger `x` into ledger `mirror-x`.
struct Mirror {
    /// Whether an entry of 13 may be mirrored; until then the reaction
    /// cannot decide on it.
    thirteen: AtomicBool,
}

#[async_trait]
impl Reaction<Ledger> for Mirror {
    fn name(&self) -> &str {
        "mirror"
    }

    async fn react(&self, event: &Envelope<LedgerEvent>, commands: &mut Commands) -> Result<(), ReactionError> {
        if event.aggregate_id.starts_with("mirror-") {
            return Ok(());
        }
        if let LedgerEvent::Added { amount } = event.payload {
            if amount == 13 && !self.thirteen.load(Ordering::SeqCst) {
                return Err(ReactionError::Failed("13 is not mirrored".into()));
            }
            commands.send::<Ledger>(format!("mirror-{}", event.aggregate_id), LedgerCommand::Add(amount));
        }
        Ok(())
    }
}

/// A real store whose first `fail` appends answer `Unavailable`, as an
/// outage would.
#[derive(Clone)]
struct Outage {
    store: InMemoryStore<Ledger>,
    fail: Arc<AtomicU32>,
}

#[async_trait]
impl EventStore<Ledger> for Outage {
    async fn append(
        &self,
        id: &str,
        expected: ExpectedVersion,
        events: Vec<LedgerEvent>,
        metadata: Metadata,
    ) -> Result<Appended, StoreError> {
        if self.fail.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(StoreError::Unavailable("the store is down".into()));
        }
        self.store.append(id, expected, events, metadata).await
    }
    async fn recall(&self, id: &str, key: &str) -> Result<Option<Appended>, StoreError> {
        self.store.recall(id, key).await
    }
    async fn load(&self, id: &str) -> Result<Option<Snapshot<Ledger>>, StoreError> {
        self.store.load(id).await
    }
    async fn read(&self, id: &str) -> Result<Vec<Envelope<LedgerEvent>>, StoreError> {
        self.store.read(id).await
    }
    async fn subscribe(&self, from: Checkpoint) -> Result<EventStream<LedgerEvent>, StoreError> {
        self.store.subscribe(from).await
    }
    async fn head(&self) -> Result<Checkpoint, StoreError> {
        self.store.head().await
    }
}

struct World {
    store: InMemoryStore<Ledger>,
    mirror: Arc<Mirror>,
    fail: Arc<AtomicU32>,
}

impl World {
    fn new() -> Self {
        Self {
            store: InMemoryStore::new(),
            mirror: Arc::new(Mirror { thirteen: AtomicBool::new(false) }),
            fail: Arc::new(AtomicU32::new(0)),
        }
    }

    /// A reaction runner with a journal of its own (a fresh one starts
    /// from the beginning of the log).
    async fn runner(&self, journal: Arc<InMemoryView>) -> ReactionRunner<Ledger, InMemoryStore<Ledger>> {
        self.runner_starting(journal, ReactionStart::Beginning).await
    }

    /// [`World::runner`], a fresh journal starting at `start`.
    async fn runner_starting(
        &self,
        journal: Arc<InMemoryView>,
        start: ReactionStart,
    ) -> ReactionRunner<Ledger, InMemoryStore<Ledger>> {
        let target = Outage { store: self.store.clone(), fail: Arc::clone(&self.fail) };
        let bus: Arc<dyn CommandSink<Ledger>> = Arc::new(CommandBus::new(target));
        let router = CommandRouter::new().route::<Ledger>(bus);
        let config = ReactionConfig {
            retry_first: Duration::from_millis(1),
            retry_attempts: 3,
            start,
            ..ReactionConfig::default()
        };
        let projection = ReactionProjection::new(self.mirror.clone(), router, journal, config).unwrap();
        let runner_config = RunnerConfig { retry_delay: Duration::from_millis(10), ..RunnerConfig::default() };
        let runner = ReactionRunner::new(self.store.clone(), vec![projection], runner_config);
        runner.start().await.unwrap();
        runner
    }

    async fn run(&self, id: &str, command: LedgerCommand, metadata: Metadata) -> Position {
        let bus = CommandBus::new(self.store.clone());
        bus.execute(id, command, ExpectedVersion::Any, metadata).await.unwrap().position.unwrap()
    }

    async fn ledger(&self, id: &str) -> (u64, i64) {
        self.store.load(id).await.unwrap().map_or((0, 0), |s| (s.version, s.state.total))
    }
}

fn journal() -> Arc<InMemoryView> {
    Arc::new(InMemoryView::new(journal_schema("mirror", "ledger")).unwrap())
}

async fn caught_up(runner: &ReactionRunner<Ledger, InMemoryStore<Ledger>>, position: Position) {
    assert!(runner.projections().wait_for(position, Duration::from_secs(10)).await, "the reaction did not get there");
}

#[tokio::test]
async fn each_event_becomes_one_command_that_names_its_cause() {
    let w = World::new();
    w.run("mirror-a", LedgerCommand::Open, Metadata::default()).await;
    let runner = w.runner(journal()).await;
    w.run("a", LedgerCommand::Open, Metadata::default()).await;
    let request = Metadata { correlation_id: Some("req-7".into()), ..Metadata::default() };
    let mut last = Position::new(0, 0);
    for amount in 1..=10 {
        last = w.run("a", LedgerCommand::Add(amount), request.clone()).await;
    }
    caught_up(&runner, last).await;
    assert_eq!(w.ledger("mirror-a").await, (11, 55));
    let sources = w.store.read("a").await.unwrap();
    let mirrored = w.store.read("mirror-a").await.unwrap();
    for (source, copy) in sources[1..].iter().zip(&mirrored[1..]) {
        assert_eq!(copy.metadata.causation_id, Some(source.event_id.to_string()));
        assert_eq!(copy.metadata.correlation_id.as_deref(), Some("req-7"));
        assert_eq!(copy.metadata.principal.as_deref(), Some("mirror"));
        assert_eq!(copy.metadata.extra.get("kes.reaction").map(String::as_str), Some("mirror"));
        let key = ReactionKey::parse(copy.metadata.idempotency_key.as_deref().unwrap()).unwrap();
        assert_eq!((key.event_id, key.index, key.position), (source.event_id, 0, source.position));
    }
    let status = runner.status(5).await.unwrap();
    assert_eq!(status[0].counts.sent, 10);
    assert_eq!(status[0].status.name, "reaction_mirror_ledger");
    runner.shutdown().await;
}

#[tokio::test]
async fn a_new_reaction_started_at_the_head_leaves_the_past_alone_and_then_keeps_its_place() {
    let w = World::new();
    w.run("mirror-a", LedgerCommand::Open, Metadata::default()).await;
    w.run("a", LedgerCommand::Open, Metadata::default()).await;
    w.run("a", LedgerCommand::Add(5), Metadata::default()).await;
    let before = w.run("a", LedgerCommand::Add(6), Metadata::default()).await;
    let journal = journal();
    let runner = w.runner_starting(Arc::clone(&journal), ReactionStart::Head).await;
    // Its first checkpoint, the head, covers every event so far.
    caught_up(&runner, before).await;
    let last = w.run("a", LedgerCommand::Add(7), Metadata::default()).await;
    caught_up(&runner, last).await;
    assert_eq!(w.ledger("mirror-a").await, (2, 7), "the reaction acted on events from before its start");
    assert_eq!(runner.status(0).await.unwrap()[0].counts.sent, 1);
    runner.shutdown().await;
    // Started again, it goes on from its checkpoint, not from the new head:
    // what happened while it was stopped is not lost.
    let missed = w.run("a", LedgerCommand::Add(8), Metadata::default()).await;
    let again = w.runner_starting(journal, ReactionStart::Head).await;
    caught_up(&again, missed).await;
    assert_eq!(w.ledger("mirror-a").await, (3, 15), "a restart skipped an event");
    again.shutdown().await;
}

#[tokio::test]
async fn a_replay_from_the_start_of_the_log_appends_nothing() {
    let w = World::new();
    w.run("mirror-a", LedgerCommand::Open, Metadata::default()).await;
    w.run("a", LedgerCommand::Open, Metadata::default()).await;
    let mut last = Position::new(0, 0);
    for amount in 1..=10 {
        last = w.run("a", LedgerCommand::AddMany(vec![amount, 100]), Metadata::default()).await;
    }
    let first = w.runner(journal()).await;
    caught_up(&first, last).await;
    first.abort();
    assert_eq!(w.ledger("mirror-a").await, (21, 1055));
    // A journal that lost its checkpoint: everything is decided again.
    let second = w.runner(journal()).await;
    caught_up(&second, last).await;
    assert_eq!(w.ledger("mirror-a").await, (21, 1055), "a replay appended commands again");
    let counts = second.status(0).await.unwrap()[0].counts;
    assert_eq!((counts.sent, counts.deduplicated), (0, 20));
    second.shutdown().await;
}

#[tokio::test]
async fn a_refused_command_is_recorded_and_later_events_go_on() {
    let w = World::new();
    let runner = w.runner(journal()).await;
    w.run("b", LedgerCommand::Open, Metadata::default()).await;
    // mirror-b is not open: its ledger refuses the entry.
    let refused = w.run("b", LedgerCommand::Add(5), Metadata::default()).await;
    caught_up(&runner, refused).await;
    w.run("mirror-b", LedgerCommand::Open, Metadata::default()).await;
    let last = w.run("b", LedgerCommand::Add(7), Metadata::default()).await;
    caught_up(&runner, last).await;
    assert_eq!(w.ledger("mirror-b").await, (2, 7));
    let status = &runner.status(10).await.unwrap()[0];
    assert_eq!((status.counts.refused, status.counts.sent, status.refused_total), (1, 1, 1));
    let refusal = &status.recent_refusals[0];
    assert_eq!((refusal.target.as_str(), refusal.target_id.as_str()), ("ledger", "mirror-b"));
    assert!(refusal.error.contains("not open"), "{}", refusal.error);
    assert!(refusal.command.contains("Add(5)"), "{}", refusal.command);
    assert!(status.status.last_error.is_none());
    runner.shutdown().await;
}

#[tokio::test]
async fn a_store_outage_is_retried_until_it_ends() {
    let w = World::new();
    w.run("mirror-c", LedgerCommand::Open, Metadata::default()).await;
    w.run("c", LedgerCommand::Open, Metadata::default()).await;
    // Longer than one batch's retries: the runner retries the batch too.
    w.fail.store(8, Ordering::SeqCst);
    let runner = w.runner(journal()).await;
    let mut last = Position::new(0, 0);
    for amount in 1..=4 {
        last = w.run("c", LedgerCommand::Add(amount), Metadata::default()).await;
    }
    caught_up(&runner, last).await;
    assert_eq!(w.ledger("mirror-c").await, (5, 10));
    let counts = runner.status(0).await.unwrap()[0].counts;
    assert!(counts.retries >= 6, "{counts:?}");
    assert_eq!((counts.sent, counts.refused), (4, 0));
    runner.shutdown().await;
}

#[tokio::test]
async fn an_event_it_cannot_decide_on_stops_it_visibly_until_fixed() {
    let w = World::new();
    w.run("mirror-d", LedgerCommand::Open, Metadata::default()).await;
    let runner = w.runner(journal()).await;
    w.run("d", LedgerCommand::Open, Metadata::default()).await;
    w.run("d", LedgerCommand::Add(1), Metadata::default()).await;
    let poison = w.run("d", LedgerCommand::Add(13), Metadata::default()).await;
    let last = w.run("d", LedgerCommand::Add(2), Metadata::default()).await;
    let error = loop {
        let status = runner.status(0).await.unwrap().remove(0);
        if let Some(e) = status.status.last_error {
            break e;
        }
        tokio::task::yield_now().await;
    };
    assert!(error.contains("stopped at event") && error.contains("13 is not mirrored"), "{error}");
    assert!(!runner.projections().wait_for(poison, Duration::from_millis(100)).await, "it skipped the event");
    assert_eq!(w.ledger("mirror-d").await, (2, 1), "nothing past the event it stopped at");
    w.mirror.thirteen.store(true, Ordering::SeqCst);
    caught_up(&runner, last).await;
    assert_eq!(w.ledger("mirror-d").await, (4, 16));
    assert!(runner.status(0).await.unwrap()[0].status.last_error.is_none());
    runner.shutdown().await;
}

#[tokio::test]
async fn the_test_kit_shows_what_a_reaction_asks_for() {
    let mirror = Mirror { thirteen: AtomicBool::new(false) };
    let test = ReactionTest::new(mirror);
    test.when::<Ledger>("e", 2, LedgerEvent::Added { amount: 4 })
        .await
        .then_expect::<Ledger>(vec![("mirror-e".into(), LedgerCommand::Add(4))]);
    test.when::<Ledger>("mirror-e", 2, LedgerEvent::Added { amount: 4 }).await.then_expect_nothing();
    test.when::<Ledger>("e", 3, LedgerEvent::Added { amount: 13 })
        .await
        .then_expect_error(ReactionError::Failed("13 is not mirrored".into()));
}

#[tokio::test]
async fn a_reaction_is_never_rebuilt() {
    let w = World::new();
    let runner = w.runner(journal()).await;
    let refused = runner.projections().rebuild("reaction_mirror_ledger", &|_, _| {}).await;
    assert!(matches!(refused, Err(kes_core::ProjectionError::NotRebuildable(_))), "{refused:?}");
    runner.shutdown().await;
}
