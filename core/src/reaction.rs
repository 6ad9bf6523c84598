//! Reactions (process managers): consumers of the log that turn events into
//! commands for aggregates of any type, exactly once in effect.
//!
//! A [`Reaction`] looks at one event of its source aggregate type (and, where
//! it needs to, at list views or other aggregates' current states it holds
//! handles to) and asks for commands through [`Commands`]. A
//! [`ReactionProjection`] runs it as a projection of the source type under a
//! [`ProjectionRunner`](crate::ProjectionRunner): the runner delivers the log
//! in batches from the reaction's checkpoint, holds the lease of its journal
//! view (one active instance per reaction when several processes run, each
//! write fenced), and retries a failed batch from the stored checkpoint.
//!
//! ## Exactly once in effect
//!
//! Delivery is at least once: a crash between a command and the checkpoint
//! write replays the batch. Every command carries an idempotency key derived
//! from the reaction, the source event and the command's index among those
//! the event caused ([`ReactionKey`]), so the command bus answers a replay
//! with the first outcome and appends nothing. The duplicate check is
//! durable in the target stream itself: the SQL stores and the in-memory
//! store keep every key for as long as the events; the Kafka store keeps,
//! besides its recent keys, the highest [`ReactionKey::order`] each
//! reaction reached on each aggregate, so a replay from any old checkpoint
//! — long after the recent keys moved on — still appends nothing.
//!
//! Metadata of a reaction's command: `causation_id` = the source event id,
//! `correlation_id` = the source's correlation id (or the source event id
//! when it had none), `principal` = the reaction's name, and
//! `extra["kes.reaction"]` = the reaction's name, so the audit history shows
//! the chain.
//!
//! ## Failures
//!
//! - A command the target refuses (a business rule, not found, a version
//!   conflict) is recorded in the reaction's journal view — one row per
//!   refused command, written with the checkpoint — counted
//!   ([`ReactionStats`]) and skipped: later events go on.
//! - A transient failure (the store unavailable) is retried with backoff;
//!   when it persists, the batch fails and the runner retries it from the
//!   stored checkpoint (already sent commands are deduplicated).
//! - An event the store cannot decode stops the reaction at that event: the
//!   runner reports the error and retries, and never skips it.
//!
//! A reaction is never rebuilt: replaying the whole log would decide
//! commands on today's states for events of long ago. Its journal view
//! refuses a rebuild ([`ProjectionError::NotRebuildable`]). For the same
//! reason a reaction added to a running system can start at the log's head
//! ([`ReactionStart::Head`]) instead of its beginning.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use uuid::Uuid;

use crate::aggregate::Aggregate;
use crate::bus::{CommandBus, CommandError, CommandOutcome};
use crate::envelope::{Checkpoint, Envelope, Metadata, Position};
use crate::projection::{Projection, ProjectionError, ProjectionRunner, ProjectionStatus, RunnerConfig};
use crate::store::{EventStore, ExpectedVersion, StoreError};
use crate::view::{
    Field, FieldValue, Lease, ListQuery, ListView, Row, RowChange, ViewCopy, ViewError, ViewProgress, ViewSchema,
    ViewStore,
};

/// The `Metadata::extra` entry naming the reaction that sent a command.
pub const REACTION_METADATA_KEY: &str = "kes.reaction";

/// The idempotency key of a reaction's command: which reaction, caused by
/// which event (its id, aggregate type and log position), and the
/// command's index among those the event's log record caused (the events
/// of one command share a record on Kafka; elsewhere each event is a
/// position of its own).
///
/// As text: `reaction:{reaction}:{event_id}:{index}@{source}:{partition}:{offset}`.
/// Reaction and source names are [`ViewSchema`]-style names (lower-case
/// letters, digits, `_`), so the text parses back unambiguously.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReactionKey {
    /// The reaction.
    pub reaction: String,
    /// The source event.
    pub event_id: Uuid,
    /// The command's index among those its source record caused.
    pub index: u32,
    /// The source event's aggregate type.
    pub source: String,
    /// The source event's position in its log.
    pub position: Position,
}

impl ReactionKey {
    const PREFIX: &'static str = "reaction:";

    /// Reads a key written by [`ReactionKey`]'s `Display`; `None` for any
    /// other idempotency key.
    pub fn parse(key: &str) -> Option<Self> {
        let rest = key.strip_prefix(Self::PREFIX)?;
        let (head, tail) = rest.rsplit_once('@')?;
        let mut head_parts = head.splitn(3, ':');
        let reaction = head_parts.next()?;
        let event_id = Uuid::parse_str(head_parts.next()?).ok()?;
        let index = head_parts.next()?.parse().ok()?;
        let mut tail_parts = tail.splitn(3, ':');
        let source = tail_parts.next()?;
        let partition = tail_parts.next()?.parse().ok()?;
        let offset = tail_parts.next()?.parse().ok()?;
        if !crate::is_plain_name(reaction) || !crate::is_plain_name(source) {
            return None;
        }
        Some(Self {
            reaction: reaction.to_owned(),
            event_id,
            index,
            source: source.to_owned(),
            position: Position::new(partition, offset),
        })
    }

    /// The sequence this key belongs to: one reaction's commands caused by
    /// one partition of one source log, which the reaction sends in
    /// [`ReactionKey::order`].
    pub fn sequence(&self) -> String {
        format!("{}:{}:{}", self.reaction, self.source, self.position.partition)
    }

    /// Where the command stands in its [`ReactionKey::sequence`]: a
    /// reaction sends the commands of one source partition meant for one
    /// aggregate in this order, one after another, so a stream that holds
    /// a command of a sequence at `order` has seen every earlier command of
    /// that sequence meant for it.
    pub fn order(&self) -> (u64, u32) {
        (self.position.offset, self.index)
    }
}

impl fmt::Display for ReactionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}:{}:{}@{}:{}:{}",
            Self::PREFIX,
            self.reaction,
            self.event_id,
            self.index,
            self.source,
            self.position.partition,
            self.position.offset
        )
    }
}

/// Runs commands on aggregates of type `T`: what a reaction's commands go
/// through. [`CommandBus`] is one; wrap it in an `Arc`.
#[async_trait]
pub trait CommandSink<T: Aggregate>: Send + Sync {
    /// Runs `command` on aggregate `id` (see [`CommandBus::execute`]).
    async fn execute(
        &self,
        id: &str,
        command: T::Command,
        expected: ExpectedVersion,
        metadata: Metadata,
    ) -> Result<CommandOutcome<T>, CommandError<T::Error>>;
}

#[async_trait]
impl<T: Aggregate, S: EventStore<T>> CommandSink<T> for CommandBus<T, S> {
    async fn execute(
        &self,
        id: &str,
        command: T::Command,
        expected: ExpectedVersion,
        metadata: Metadata,
    ) -> Result<CommandOutcome<T>, CommandError<T::Error>> {
        CommandBus::execute(self, id, command, expected, metadata).await
    }
}

/// The command buses reactions may send to, one per aggregate type.
#[derive(Clone, Default)]
pub struct CommandRouter {
    sinks: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl CommandRouter {
    /// A router that knows no aggregate type yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes commands for `T` to `sink` (replacing an earlier one).
    pub fn route<T: Aggregate>(mut self, sink: Arc<dyn CommandSink<T>>) -> Self {
        self.sinks.insert(TypeId::of::<T>(), Arc::new(sink));
        self
    }

    fn sink<T: Aggregate>(&self) -> Option<&Arc<dyn CommandSink<T>>> {
        self.sinks.get(&TypeId::of::<T>())?.downcast_ref::<Arc<dyn CommandSink<T>>>()
    }
}

impl fmt::Debug for CommandRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandRouter").field("types", &self.sinks.len()).finish()
    }
}

/// What became of one command a reaction sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// Appended (or decided no events).
    Done,
    /// A replay: the command had been appended before.
    Deduplicated,
    /// The target refused it; recorded and skipped.
    Refused(String),
    /// Retrying later may work (the store is unavailable).
    Transient(String),
}

/// One command a reaction asked for, not yet sent.
trait Pending: Send {
    fn target(&self) -> &'static str;
    fn id(&self) -> &str;
    fn describe(&self) -> String;
    fn as_any(&self) -> &dyn Any;
    /// Sends a copy of the command (it may be sent again after a transient
    /// failure).
    fn send(&self, router: &CommandRouter, metadata: Metadata) -> BoxFuture<'static, Sent>;
}

struct PendingCommand<T: Aggregate> {
    id: String,
    command: T::Command,
    expected: ExpectedVersion,
}

impl<T: Aggregate> Pending for PendingCommand<T> {
    fn target(&self) -> &'static str {
        T::NAME
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn describe(&self) -> String {
        format!("{:?}", self.command)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn send(&self, router: &CommandRouter, metadata: Metadata) -> BoxFuture<'static, Sent> {
        let Some(sink) = router.sink::<T>().cloned() else {
            let why = format!("no command bus for aggregate type {} is routed", T::NAME);
            return Box::pin(async move { Sent::Refused(why) });
        };
        let (id, command, expected) = (self.id.clone(), self.command.clone(), self.expected);
        Box::pin(async move {
            match sink.execute(&id, command, expected, metadata).await {
                Ok(outcome) if outcome.deduplicated => Sent::Deduplicated,
                Ok(_) => Sent::Done,
                Err(CommandError::Store(e)) if e.is_transient() => Sent::Transient(e.to_string()),
                Err(e) => Sent::Refused(e.to_string()),
            }
        })
    }
}

/// The commands a reaction asks for in answer to one event, sent in the
/// order they were asked for.
#[derive(Default)]
pub struct Commands {
    pending: Vec<Box<dyn Pending>>,
}

impl Commands {
    /// No commands yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks for `command` on aggregate `id` of type `T`, whatever its
    /// version.
    pub fn send<T: Aggregate>(&mut self, id: impl Into<String>, command: T::Command) {
        self.send_expecting::<T>(id, command, ExpectedVersion::Any);
    }

    /// Asks for `command` on aggregate `id` of type `T`, expecting it at
    /// `expected`.
    pub fn send_expecting<T: Aggregate>(
        &mut self,
        id: impl Into<String>,
        command: T::Command,
        expected: ExpectedVersion,
    ) {
        self.pending.push(Box::new(PendingCommand::<T> { id: id.into(), command, expected }));
    }

    /// How many commands were asked for.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether none were.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The commands for aggregates of type `T`, with their ids, in order
    /// (for tests).
    pub fn of<T: Aggregate>(&self) -> Vec<(String, T::Command)> {
        self.pending
            .iter()
            .filter_map(|p| p.as_any().downcast_ref::<PendingCommand<T>>())
            .map(|p| (p.id.clone(), p.command.clone()))
            .collect()
    }

    /// Every command as (aggregate type, id, the command's `Debug`), in
    /// order.
    pub fn describe(&self) -> Vec<(&'static str, String, String)> {
        self.pending.iter().map(|p| (p.target(), p.id().to_owned(), p.describe())).collect()
    }
}

impl fmt::Debug for Commands {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.describe()).finish()
    }
}

/// Why a reaction could not decide on an event. Either way the event is not
/// skipped: the batch is retried (with backoff, then by the runner).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReactionError {
    /// Something the reaction reads is unavailable now.
    #[error("reaction input unavailable: {0}")]
    Unavailable(String),
    /// The reaction cannot decide on this event (a bug, or data it cannot
    /// read): it stops here until fixed.
    #[error("reaction failed: {0}")]
    Failed(String),
}

impl From<StoreError> for ReactionError {
    fn from(e: StoreError) -> Self {
        if e.is_transient() { Self::Unavailable(e.to_string()) } else { Self::Failed(e.to_string()) }
    }
}

impl From<ViewError> for ReactionError {
    fn from(e: ViewError) -> Self {
        match e {
            ViewError::Unavailable(m) => Self::Unavailable(m),
            other => Self::Failed(other.to_string()),
        }
    }
}

/// A process manager: decides commands from the events of aggregate type
/// `A`. Implement it once per source type for a reaction to several.
///
/// `react` may read (list views, other aggregates' current states) but
/// should not write: every effect goes through [`Commands`], so that it is
/// deduplicated on replay. The runner decides on several events of a
/// batch at once ([`ReactionConfig::concurrency`]) (their commands are then sent in log order per target
/// aggregate), so a decision must not count on the commands asked for an
/// earlier event having run. It is called again for the same event after a
/// crash or a failed batch, and should then ask for the same commands
/// (decide from the event and from current states, which a replayed
/// command did not change in a way that alters the decision, e.g. "cancel
/// the open tasks").
#[async_trait]
pub trait Reaction<A: Aggregate>: Send + Sync + 'static {
    /// The reaction's name: lower-case letters, digits and `_`, starting
    /// with a letter; it names its journal view, its commands' principal
    /// and their idempotency keys. Never rename a running reaction: its
    /// checkpoint and its commands' keys go by it.
    fn name(&self) -> &str;

    /// The commands `event` calls for, added to `commands`.
    async fn react(&self, event: &Envelope<A::Event>, commands: &mut Commands) -> Result<(), ReactionError>;
}

/// The journal view schema of reaction `reaction` over the events of
/// aggregate type `source` (named `reaction_{reaction}_{source}`; a
/// reaction over several types has one journal, hence one checkpoint, per
/// type): one row per refused command (id `{event_id}:{index}`), with its
/// source event, target and reason.
///
/// Fields: `reaction`, `source_event`, `source_id`, `target`, `target_id`,
/// `command`, `error`, `at`.
pub fn journal_schema(reaction: &str, source: &str) -> ViewSchema {
    ViewSchema::new(format!("reaction_{reaction}_{source}"), 1)
        .field(Field::keyword("reaction").filterable())
        .field(Field::keyword("source_event").filterable())
        .field(Field::keyword("source_id").filterable())
        .field(Field::keyword("target").filterable())
        .field(Field::keyword("target_id").filterable())
        .field(Field::text("command"))
        .field(Field::text("error"))
        .field(Field::timestamp("at").sortable())
}

/// Tunables of a [`ReactionProjection`].
#[derive(Debug, Clone)]
pub struct ReactionConfig {
    /// The first pause before a transient failure is retried; doubled on
    /// every further attempt.
    pub retry_first: Duration,
    /// How many times a transient failure is retried within a batch before
    /// the batch fails (and the runner retries it from the checkpoint).
    pub retry_attempts: u32,
    /// How many events of a batch the reaction decides on at once, and
    /// how many target aggregates' commands it sends at once. Deciding
    /// often waits on a read (a Kafka store's `load_current` waits for its
    /// follower to reach the head of the log), so a lagging reaction
    /// catches up by overlapping those waits.
    pub concurrency: usize,
    /// Where a reaction that never ran starts: at the log's beginning (the
    /// default: it acts on every event ever stored), or at its head (it
    /// acts only on what happens from its first start on). A reaction that
    /// has run goes on from its checkpoint either way.
    pub start: ReactionStart,
}

impl Default for ReactionConfig {
    fn default() -> Self {
        Self {
            retry_first: Duration::from_millis(50),
            retry_attempts: 6,
            concurrency: 64,
            start: ReactionStart::Beginning,
        }
    }
}

/// Where a reaction with no checkpoint yet starts ([`ReactionConfig::start`]).
///
/// A reaction added to a system that has been running decides on today's
/// states: started at the beginning, it would send commands for events of
/// long ago (a welcome message for every customer ever registered).
/// `Head` makes it act on new events only; its journal stores the log's
/// head as its first checkpoint, so a restart does not go back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReactionStart {
    /// Every event in the log, oldest first.
    #[default]
    Beginning,
    /// Only events stored after the reaction first started.
    Head,
}

/// Counters of one reaction, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct ReactionStats {
    events: AtomicU64,
    sent: AtomicU64,
    deduplicated: AtomicU64,
    refused: AtomicU64,
    retries: AtomicU64,
}

/// A snapshot of [`ReactionStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReactionCounts {
    /// Source events looked at.
    pub events: u64,
    /// Commands appended (or deciding nothing).
    pub sent: u64,
    /// Commands found appended before (replays).
    pub deduplicated: u64,
    /// Commands the target refused (recorded in the journal).
    pub refused: u64,
    /// Transient failures retried.
    pub retries: u64,
}

impl ReactionStats {
    /// The counters now.
    pub fn counts(&self) -> ReactionCounts {
        ReactionCounts {
            events: self.events.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            deduplicated: self.deduplicated.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
        }
    }
}

/// Runs a [`Reaction`] of source type `A` as a projection: register it with
/// a [`ProjectionRunner`](crate::ProjectionRunner) over `A`'s store (a
/// runner of its own, so that reads waiting for views never wait for
/// reactions). Its journal view (built from [`journal_schema`]) keeps the
/// checkpoint, the lease and the refused commands.
pub struct ReactionProjection<A: Aggregate> {
    reaction: Arc<dyn Reaction<A>>,
    router: CommandRouter,
    journal: Arc<dyn ViewStore>,
    config: ReactionConfig,
    stats: Arc<ReactionStats>,
}

impl<A: Aggregate> ReactionProjection<A> {
    /// Runs `reaction`, sending its commands through `router` and keeping
    /// its progress in `journal` (a view built from
    /// [`journal_schema`]`(reaction.name(), A::NAME)`).
    ///
    /// # Errors
    /// [`ViewError::Backend`] when the reaction's name is not a plain name
    /// (or too long for its journal's name) or the journal's schema is not
    /// its journal schema.
    pub fn new(
        reaction: Arc<dyn Reaction<A>>,
        router: CommandRouter,
        journal: Arc<dyn ViewStore>,
        config: ReactionConfig,
    ) -> Result<Self, ViewError> {
        let name = reaction.name();
        let schema = journal_schema(name, A::NAME);
        if !crate::is_plain_name(name) || schema.validate().is_err() {
            return Err(ViewError::Backend(format!(
                "reaction name {name:?}: use lower-case letters, digits and '_', starting with a letter \
                 (its journal's name {:?} must fit a view name)",
                schema.name
            )));
        }
        if *journal.schema() != schema {
            return Err(ViewError::Backend(format!(
                "the journal of reaction {name:?} must be built from journal_schema({name:?}, {:?})",
                A::NAME
            )));
        }
        Ok(Self { reaction, router, journal, config, stats: Arc::new(ReactionStats::default()) })
    }

    /// The reaction's counters.
    pub fn stats(&self) -> Arc<ReactionStats> {
        Arc::clone(&self.stats)
    }

    /// The reaction's name.
    pub fn reaction_name(&self) -> &str {
        self.reaction.name()
    }

    /// The journal: its refused commands are listed by
    /// [`ListView::list`].
    pub fn journal(&self) -> Arc<dyn ListView> {
        Arc::clone(&self.journal) as Arc<dyn ListView>
    }

    /// The metadata of the `index`-th command caused by `event`.
    fn metadata(&self, event: &Envelope<A::Event>, index: u32) -> Metadata {
        let name = self.reaction.name();
        let key = ReactionKey {
            reaction: name.to_owned(),
            event_id: event.event_id,
            index,
            source: A::NAME.to_owned(),
            position: event.position,
        };
        let mut metadata = Metadata {
            correlation_id: Some(event.metadata.correlation_id.clone().unwrap_or_else(|| event.event_id.to_string())),
            causation_id: Some(event.event_id.to_string()),
            principal: Some(name.to_owned()),
            idempotency_key: Some(key.to_string()),
            extra: Default::default(),
        };
        metadata.extra.insert(REACTION_METADATA_KEY.to_owned(), name.to_owned());
        metadata
    }

    /// The commands `event` calls for; an unavailable input is retried
    /// with backoff.
    async fn decide(&self, event: &Envelope<A::Event>) -> Result<Commands, ProjectionError> {
        let mut attempt = 0;
        loop {
            let mut commands = Commands::new();
            match self.reaction.react(event, &mut commands).await {
                Ok(()) => {
                    self.stats.events.fetch_add(1, Ordering::Relaxed);
                    return Ok(commands);
                }
                Err(ReactionError::Unavailable(why)) if attempt < self.config.retry_attempts => {
                    self.pause(&mut attempt, &why).await;
                }
                Err(e) => return Err(self.failed(event, &e.to_string())),
            }
        }
    }

    /// Sends the commands of one target, in order; the refused ones come
    /// back as journal rows.
    async fn send_all(&self, commands: Vec<Outgoing<'_, A>>) -> Result<Vec<RowChange>, ProjectionError> {
        let mut journal = Vec::new();
        for Outgoing { event, index, pending } in commands {
            let metadata = self.metadata(event, index);
            let mut attempt = 0;
            loop {
                match pending.send(&self.router, metadata.clone()).await {
                    Sent::Done => {
                        self.stats.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Sent::Deduplicated => {
                        self.stats.deduplicated.fetch_add(1, Ordering::Relaxed);
                    }
                    Sent::Refused(why) => {
                        self.stats.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            reaction = self.reaction.name(),
                            event = %event.event_id,
                            target = pending.target(),
                            id = pending.id(),
                            error = %why,
                            "a reaction's command was refused; recorded and skipped"
                        );
                        journal.push(self.refusal(event, index, pending.as_ref(), &why));
                    }
                    Sent::Transient(why) if attempt < self.config.retry_attempts => {
                        self.pause(&mut attempt, &why).await;
                        continue;
                    }
                    Sent::Transient(why) => return Err(StoreError::Unavailable(why).into()),
                }
                break;
            }
        }
        Ok(journal)
    }

    async fn pause(&self, attempt: &mut u32, why: &str) {
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        let pause = self.config.retry_first.saturating_mul(1 << (*attempt).min(10));
        tracing::debug!(reaction = self.reaction.name(), attempt = *attempt, error = why, "retrying a reaction");
        *attempt += 1;
        tokio::time::sleep(pause).await;
    }

    fn failed(&self, event: &Envelope<A::Event>, why: &str) -> ProjectionError {
        ProjectionError::View(ViewError::Backend(format!(
            "reaction {} stopped at event {} of {} {} (version {}): {why}",
            self.reaction.name(),
            event.event_id,
            A::NAME,
            event.aggregate_id,
            event.version
        )))
    }

    fn refusal(&self, event: &Envelope<A::Event>, index: u32, pending: &dyn Pending, why: &str) -> RowChange {
        let at: DateTime<Utc> = Utc::now();
        let mut row = Row::new();
        row.insert("reaction".into(), FieldValue::from(self.reaction.name()));
        row.insert("source_event".into(), FieldValue::from(event.event_id.to_string()));
        row.insert("source_id".into(), FieldValue::from(event.aggregate_id.as_str()));
        row.insert("target".into(), FieldValue::from(pending.target()));
        row.insert("target_id".into(), FieldValue::from(pending.id()));
        row.insert("command".into(), FieldValue::from(truncate(&pending.describe(), 1000)));
        row.insert("error".into(), FieldValue::from(truncate(why, 1000)));
        row.insert("at".into(), FieldValue::from(at));
        let state = serde_json::json!({ "source_event_type": event.event_type, "source_version": event.version });
        // A tree of a text and a number always serialises.
        let state = RowChange::state_of(&state).unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned());
        RowChange { id: format!("{}:{index}", event.event_id), version: 1, state, row: Some(row) }
    }

    /// Decides on every event of `batch` (several at once, answers in log
    /// order), then sends the commands: those for one aggregate one after
    /// another in log order, different aggregates' at once.
    async fn run_batch(&self, batch: &[Envelope<A::Event>]) -> Result<Vec<RowChange>, ProjectionError> {
        // Boxed with their lifetime spelled out: the futures are built
        // before they are streamed (an iterator adaptor would make the
        // compiler ask for them for any lifetime).
        let deciding: Vec<BoxFuture<'_, Result<Commands, ProjectionError>>> =
            batch.iter().map(|event| Box::pin(self.decide(event)) as BoxFuture<'_, _>).collect();
        // Up to the first event it cannot decide on: the commands of the
        // events before it are still sent (a replay finds them sent), then
        // the batch fails there.
        let mut decisions = futures::stream::iter(deciding).buffered(self.config.concurrency.max(1));
        let mut decided = Vec::with_capacity(batch.len());
        let mut stopped = None;
        while let Some(decision) = decisions.next().await {
            match decision {
                Ok(commands) => decided.push(commands),
                Err(e) => {
                    stopped = Some(e);
                    break;
                }
            }
        }
        drop(decisions);
        // Commands are numbered per log record: the events of one command
        // share a record (and a position) on Kafka, so the numbers of one
        // record's commands go on from event to event.
        let mut by_target: Vec<Vec<Outgoing<'_, A>>> = Vec::new();
        let mut slot_of: HashMap<(&'static str, String), usize> = HashMap::new();
        let mut record = None;
        let mut index = 0u32;
        for (event, commands) in batch.iter().zip(decided) {
            if record != Some(event.position) {
                record = Some(event.position);
                index = 0;
            }
            for pending in commands.pending {
                let target = (pending.target(), pending.id().to_owned());
                let slot = *slot_of.entry(target).or_insert_with(|| {
                    by_target.push(Vec::new());
                    by_target.len() - 1
                });
                by_target[slot].push(Outgoing { event, index, pending });
                index = index.saturating_add(1);
            }
        }
        let sending: Vec<BoxFuture<'_, Result<Vec<RowChange>, ProjectionError>>> =
            by_target.into_iter().map(|c| Box::pin(self.send_all(c)) as BoxFuture<'_, _>).collect();
        let sent: Vec<Vec<RowChange>> =
            futures::stream::iter(sending).buffer_unordered(self.config.concurrency.max(1)).try_collect().await?;
        match stopped {
            Some(e) => Err(e),
            None => Ok(sent.into_iter().flatten().collect()),
        }
    }
}

/// A command on its way, with the event that caused it and its number.
struct Outgoing<'a, A: Aggregate> {
    event: &'a Envelope<A::Event>,
    index: u32,
    pending: Box<dyn Pending>,
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

#[async_trait]
impl<A: Aggregate> Projection<A::Event> for ReactionProjection<A> {
    fn name(&self) -> &str {
        &self.journal.schema().name
    }

    fn version(&self) -> u32 {
        self.journal.schema().version
    }

    fn starts_at_head(&self) -> bool {
        self.config.start == ReactionStart::Head
    }

    async fn progress(&self, copy: ViewCopy) -> Result<Option<ViewProgress>, ProjectionError> {
        Ok(self.journal.progress(copy).await?)
    }

    async fn apply(
        &self,
        copy: ViewCopy,
        batch: &[Envelope<A::Event>],
        checkpoint: &Checkpoint,
    ) -> Result<(), ProjectionError> {
        if copy == ViewCopy::Shadow {
            return Err(ProjectionError::NotRebuildable(self.name().to_owned()));
        }
        let journal = self.run_batch(batch).await?;
        self.journal.write(copy, &journal, checkpoint).await?;
        Ok(())
    }

    async fn apply_fenced(
        &self,
        copy: ViewCopy,
        batch: &[Envelope<A::Event>],
        checkpoint: &Checkpoint,
        lease: &Lease,
    ) -> Result<(), ProjectionError> {
        if copy == ViewCopy::Shadow {
            return Err(ProjectionError::NotRebuildable(self.name().to_owned()));
        }
        let journal = self.run_batch(batch).await?;
        self.journal.write_fenced(copy, &journal, checkpoint, lease).await?;
        Ok(())
    }

    async fn begin_rebuild(&self) -> Result<(), ProjectionError> {
        Err(ProjectionError::NotRebuildable(self.name().to_owned()))
    }

    async fn begin_rebuild_fenced(&self, _lease: &Lease) -> Result<(), ProjectionError> {
        Err(ProjectionError::NotRebuildable(self.name().to_owned()))
    }

    async fn swap(&self) -> Result<(), ProjectionError> {
        Err(ProjectionError::NotRebuildable(self.name().to_owned()))
    }

    async fn swap_fenced(&self, _lease: &Lease) -> Result<(), ProjectionError> {
        Err(ProjectionError::NotRebuildable(self.name().to_owned()))
    }

    async fn acquire_lease(&self, owner: &str, ttl: Duration) -> Result<Option<Lease>, ProjectionError> {
        Ok(self.journal.acquire_lease(owner, ttl).await?)
    }

    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<bool, ProjectionError> {
        Ok(self.journal.renew_lease(lease, ttl).await?)
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), ProjectionError> {
        Ok(self.journal.release_lease(lease).await?)
    }
}

/// One refused command, as the journal keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// The source event.
    pub source_event: String,
    /// The source aggregate.
    pub source_id: String,
    /// The target's aggregate type.
    pub target: String,
    /// The target aggregate.
    pub target_id: String,
    /// The command (its `Debug`).
    pub command: String,
    /// Why it was refused.
    pub error: String,
    /// When.
    pub at: Option<DateTime<Utc>>,
}

/// How one reaction over one source type is doing.
#[derive(Debug, Clone, PartialEq)]
pub struct ReactionStatus {
    /// The reaction.
    pub reaction: String,
    /// The aggregate type whose events it reads here.
    pub source: String,
    /// Its progress, lag, lease and last error (a stopped reaction's
    /// error stays here until the batch goes through).
    pub status: ProjectionStatus,
    /// What it did since this process started.
    pub counts: ReactionCounts,
    /// How many refused commands its journal holds.
    pub refused_total: u64,
    /// The most recent refused commands, newest first.
    pub recent_refusals: Vec<Refusal>,
}

struct RunnerEntry {
    reaction: String,
    journal: Arc<dyn ListView>,
    stats: Arc<ReactionStats>,
}

/// Runs the reactions over one source type `A` in a
/// [`ProjectionRunner`] of their own (so that reads waiting for list views
/// never wait for reactions), and reports on them.
pub struct ReactionRunner<A: Aggregate, S> {
    runner: Arc<ProjectionRunner<A, S>>,
    entries: Vec<RunnerEntry>,
}

impl<A: Aggregate, S: EventStore<A> + Clone> ReactionRunner<A, S> {
    /// A runner of `reactions` over `store`; nothing runs until
    /// [`ReactionRunner::start`].
    pub fn new(store: S, reactions: Vec<ReactionProjection<A>>, config: RunnerConfig) -> Self {
        let entries = reactions
            .iter()
            .map(|r| RunnerEntry { reaction: r.reaction_name().to_owned(), journal: r.journal(), stats: r.stats() })
            .collect();
        let projections =
            reactions.into_iter().map(|r| Arc::new(r) as Arc<dyn Projection<A::Event>>).collect::<Vec<_>>();
        Self { runner: ProjectionRunner::new(store, projections, config), entries }
    }

    /// Starts following the log from each reaction's checkpoint (where this
    /// process takes the reaction's lease; otherwise it stands by).
    pub async fn start(&self) -> Result<(), ProjectionError> {
        self.runner.start().await
    }

    /// Stops after the batches in flight and releases the leases.
    pub async fn shutdown(&self) {
        self.runner.shutdown().await;
    }

    /// Stops at once, as a crash would (for tests of failover).
    pub fn abort(&self) {
        self.runner.abort();
    }

    /// The runner underneath.
    pub fn projections(&self) -> &Arc<ProjectionRunner<A, S>> {
        &self.runner
    }

    /// How each reaction is doing, with up to `recent` of its latest
    /// refused commands.
    pub async fn status(&self, recent: u32) -> Result<Vec<ReactionStatus>, StoreError> {
        let statuses = self.runner.status().await?;
        let mut out = Vec::with_capacity(self.entries.len());
        for (entry, status) in self.entries.iter().zip(statuses) {
            let (refused_total, recent_refusals) = match refusals(entry.journal.as_ref(), recent).await {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(reaction = %entry.reaction, error = %e, "the reaction's journal cannot be read");
                    (0, Vec::new())
                }
            };
            out.push(ReactionStatus {
                reaction: entry.reaction.clone(),
                source: A::NAME.to_owned(),
                status,
                counts: entry.stats.counts(),
                refused_total,
                recent_refusals,
            });
        }
        Ok(out)
    }
}

/// The number of refusals `journal` holds, and the latest `recent`.
async fn refusals(journal: &dyn ListView, recent: u32) -> Result<(u64, Vec<Refusal>), ViewError> {
    let size = recent.clamp(1, journal.schema().max_page_size);
    let page = journal.list(&ListQuery::new().sort_by("-at").page_size(size)).await?;
    let text = |row: &Row, field: &str| match row.get(field) {
        Some(FieldValue::Text(t)) => t.clone(),
        _ => String::new(),
    };
    let items = page
        .items
        .iter()
        .take(recent as usize)
        .map(|i| Refusal {
            source_event: text(&i.row, "source_event"),
            source_id: text(&i.row, "source_id"),
            target: text(&i.row, "target"),
            target_id: text(&i.row, "target_id"),
            command: text(&i.row, "command"),
            error: text(&i.row, "error"),
            at: match i.row.get("at") {
                Some(FieldValue::Timestamp(t)) => Some(*t),
                _ => None,
            },
        })
        .collect();
    Ok((page.total, items))
}

/// Given / when / then tests for reactions, without stores: feed one event,
/// look at the commands it asks for.
///
/// ```ignore
/// ReactionTest::new(CancelTasks { .. })
///     .when::<Project>("p-1", 3, ProjectEvent::Archived)
///     .await
///     .then_expect::<Task>(vec![("t-1".into(), TaskCommand::Cancel)]);
/// ```
pub struct ReactionTest<R> {
    reaction: R,
}

impl<R> ReactionTest<R> {
    /// A test of `reaction`.
    pub fn new(reaction: R) -> Self {
        Self { reaction }
    }

    /// Lets the reaction decide on `event`, the `version`-th event of
    /// aggregate `id` of type `A`.
    pub async fn when<A: Aggregate>(&self, id: &str, version: u64, event: A::Event) -> ReactionOutcome
    where
        R: Reaction<A>,
    {
        let envelope = Envelope {
            event_id: Uuid::new_v4(),
            aggregate_type: A::NAME.to_owned(),
            aggregate_id: id.to_owned(),
            version,
            event_type: crate::DomainEvent::event_type(&event).to_owned(),
            revision: crate::DomainEvent::revision(&event),
            recorded_at: Utc::now(),
            metadata: Metadata::default(),
            position: Position::new(0, version),
            payload: event,
        };
        self.when_envelope(&envelope).await
    }

    /// Lets the reaction decide on `envelope`.
    pub async fn when_envelope<A: Aggregate>(&self, envelope: &Envelope<A::Event>) -> ReactionOutcome
    where
        R: Reaction<A>,
    {
        let mut commands = Commands::new();
        let result = self.reaction.react(envelope, &mut commands).await;
        ReactionOutcome { commands, result }
    }
}

/// What a reaction decided in a [`ReactionTest`].
#[derive(Debug)]
pub struct ReactionOutcome {
    /// The commands it asked for.
    pub commands: Commands,
    /// Whether it could decide.
    pub result: Result<(), ReactionError>,
}

impl ReactionOutcome {
    /// Asserts that it decided, asking for exactly `expected` of type `T`
    /// (and nothing of other types).
    #[track_caller]
    pub fn then_expect<T: Aggregate>(self, expected: Vec<(String, T::Command)>) -> Self
    where
        T::Command: PartialEq,
    {
        assert_eq!(self.result, Ok(()), "the reaction failed");
        assert_eq!(self.commands.of::<T>(), expected, "commands for {}", T::NAME);
        assert_eq!(self.commands.len(), expected.len(), "commands for other types too: {:?}", self.commands);
        self
    }

    /// Asserts that it decided and asked for nothing.
    #[track_caller]
    pub fn then_expect_nothing(self) -> Self {
        assert_eq!(self.result, Ok(()), "the reaction failed");
        assert!(self.commands.is_empty(), "expected no commands, got {:?}", self.commands);
        self
    }

    /// Asserts that it could not decide, with `expected`.
    #[track_caller]
    pub fn then_expect_error(self, expected: ReactionError) -> Self {
        assert_eq!(self.result, Err(expected));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reaction_keys_round_trip_and_order_within_their_sequence() {
        let key = ReactionKey {
            reaction: "cancel_tasks".into(),
            event_id: Uuid::new_v4(),
            index: 7,
            source: "project".into(),
            position: Position::new(2, 41),
        };
        let text = key.to_string();
        assert!(text.starts_with("reaction:cancel_tasks:"));
        assert_eq!(ReactionKey::parse(&text), Some(key.clone()));
        assert_eq!(key.sequence(), "cancel_tasks:project:2");
        assert_eq!(key.order(), (41, 7));
        for bad in ["", "reaction:", "k-1", "reaction:x:not-a-uuid:1@p:0:1", &text.replace("@project", "@Project")] {
            assert_eq!(ReactionKey::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn truncate_cuts_on_characters() {
        assert_eq!(truncate("äöü", 2), "äö…");
        assert_eq!(truncate("ab", 2), "ab");
    }
}
