//! The command path: one command at a time per aggregate, checked, decided,
//! appended.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::aggregate::Aggregate;
use crate::envelope::{Metadata, Position};
use crate::locks::KeyedLocks;
use crate::store::{Appended, EventStore, ExpectedVersion, StoreError};
use crate::vault::{AggregateRef, Vault};

/// Why a command produced no events.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError<E> {
    /// The aggregate refused the command (a business rule); nothing appended.
    #[error("rejected: {0}")]
    Rejected(#[source] E),
    /// The command needs an existing aggregate and there is none (or it was
    /// deleted).
    #[error("{aggregate} {id} not found")]
    NotFound {
        /// Aggregate type.
        aggregate: &'static str,
        /// Aggregate id.
        id: String,
    },
    /// The aggregate is not at the version the caller expected.
    #[error("{aggregate} {id}: expected {expected}, but it is at version {actual}")]
    Conflict {
        /// Aggregate type.
        aggregate: &'static str,
        /// Aggregate id.
        id: String,
        /// What the caller expected.
        expected: ExpectedVersion,
        /// The actual version.
        actual: u64,
    },
    /// The caller may not run this command on the aggregate as it is (a
    /// guard given to [`CommandBus::execute_guarded`] refused it, with this
    /// reason); nothing appended.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The store failed; see [`StoreError::is_transient`].
    #[error(transparent)]
    Store(StoreError),
}

impl<E> CommandError<E> {
    fn from_store(aggregate: &'static str, e: StoreError) -> Self {
        match e {
            StoreError::Conflict { id, expected, actual, .. } => Self::Conflict { aggregate, id, expected, actual },
            other => Self::Store(other),
        }
    }
}

/// What a successful command answers.
#[derive(Debug, Clone)]
pub struct CommandOutcome<A> {
    /// The aggregate's state after the command.
    pub state: A,
    /// Its version after the command (the ETag).
    pub version: u64,
    /// Where the command's last event sits in the log; `None` when the
    /// command decided no events.
    pub position: Option<Position>,
    /// How many events the command appended (0 for a replay of a retry).
    pub events: usize,
    /// True when this answer is the replay of an earlier command with the
    /// same idempotency key.
    pub deduplicated: bool,
}

/// Tunables of a [`CommandBus`].
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// How many idempotency keys the bus remembers in memory.
    pub idempotency_capacity: usize,
    /// How long an idempotency key is remembered in memory. Stores remember
    /// keys on their own terms too (see each store's docs).
    pub idempotency_ttl: Duration,
    /// How many lock shards the per-aggregate lock table has.
    pub lock_shards: usize,
    /// How long a command that keeps losing races against other writers
    /// (other processes on the same store) is decided again before the
    /// caller gets [`CommandError::Conflict`].
    pub conflict_retry_for: Duration,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            idempotency_capacity: 100_000,
            idempotency_ttl: Duration::from_secs(24 * 3600),
            lock_shards: 64,
            conflict_retry_for: Duration::from_secs(5),
        }
    }
}

/// The pause before the `race`-th new decision on a contended aggregate:
/// up to 1, 2, 4 … 64 ms, drawn at random so that racing writers spread out.
fn contention_pause(race: u32) -> Duration {
    let ceiling_us = 1_000u64 << race.saturating_sub(2).min(6);
    // A fresh `RandomState` is seeded at random: enough to spread writers.
    let draw = RandomState::new().hash_one(race);
    Duration::from_micros(ceiling_us / 2 + draw % (ceiling_us / 2 + 1))
}

/// Decides whether a command may run on the aggregate's current state
/// (see [`CommandBus::execute_guarded`]), from that state and the command
/// itself: `Err` holds the reason told to the caller.
pub type CommandGuard<'a, A> = &'a (dyn Fn(&A, &<A as Aggregate>::Command) -> Result<(), String> + Send + Sync);

/// Runs commands against one aggregate type.
///
/// Commands on the same aggregate id run one after another; commands on
/// different ids run in parallel (the lock table is sharded and its locks
/// are held only for a map lookup, never across I/O).
pub struct CommandBus<A: Aggregate, S> {
    store: S,
    conflict_retry_for: Duration,
    locks: KeyedLocks,
    recent: Mutex<IdempotencyCache>,
    vault: Option<Arc<Vault>>,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A: Aggregate, S: EventStore<A>> CommandBus<A, S> {
    /// A bus over `store` with the default configuration.
    pub fn new(store: S) -> Self {
        Self::with_config(store, BusConfig::default())
    }

    /// A bus over `store` configured by `config`.
    pub fn with_config(store: S, config: BusConfig) -> Self {
        Self {
            store,
            conflict_retry_for: config.conflict_retry_for,
            locks: KeyedLocks::new(config.lock_shards),
            recent: Mutex::new(IdempotencyCache::new(config.idempotency_capacity, config.idempotency_ttl)),
            vault: None,
            _aggregate: PhantomData,
        }
    }

    /// Seals and opens the aggregate's personal data with `vault` (see
    /// [`Aggregate::PERSONAL_DATA`]).
    pub fn with_vault(mut self, vault: Arc<Vault>) -> Self {
        self.vault = Some(vault);
        self
    }

    /// The vault this bus seals personal data with, if any.
    pub fn vault(&self) -> Option<&Arc<Vault>> {
        self.vault.as_ref()
    }

    /// The store behind this bus.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Runs `command` on aggregate `id`.
    ///
    /// Loads the latest state, checks `expected`, lets the aggregate decide,
    /// and appends its events atomically. A domain error appends nothing.
    /// When `metadata.idempotency_key` was used before on `id`, nothing runs
    /// and the first answer is repeated (with the current state).
    ///
    /// **Races with other writers.** The state the bus decides on may be a
    /// cache of the log (a store's state cache, another process's appends
    /// not seen yet), so the store's answer is what counts:
    /// - before refusing a command because the expected version or the
    ///   aggregate's existence does not match, or because `handle` rejected
    ///   it, the bus looks again with [`EventStore::load_current`];
    /// - when the append meets a [`StoreError::Conflict`], another writer
    ///   got there first: a retried command (same idempotency key) answers
    ///   as the first one did, and otherwise the bus loads the current state
    ///   and decides again — so a caller without an expected version never
    ///   sees a conflict that only a stale cache made, and a caller with one
    ///   gets [`CommandError::Conflict`] only when the log really moved past
    ///   it. Retries stop after [`BusConfig::conflict_retry_for`] (with
    ///   jittered pauses between them on a contended aggregate).
    pub async fn execute(
        &self,
        id: &str,
        command: A::Command,
        expected: ExpectedVersion,
        metadata: Metadata,
    ) -> Result<CommandOutcome<A>, CommandError<A::Error>> {
        self.execute_guarded(id, command, expected, metadata, &|_, _| Ok(())).await
    }

    /// Like [`CommandBus::execute`], with `guard` asked before `handle`
    /// whether the command may run on the state it is decided on: an
    /// authorization rule that depends on the aggregate (only its owner may
    /// archive it). A refusal is [`CommandError::Forbidden`] and appends
    /// nothing.
    ///
    /// The guard sees exactly the state the events are appended after: an
    /// append conditioned on that state's version, so a command allowed on
    /// a state that another writer has since changed is decided (and
    /// guarded) again on the new one, never appended on an old permission.
    /// Like a rejection, a refusal on a state that may be stale is checked
    /// again on [`EventStore::load_current`]. A retry whose idempotency key
    /// already landed replays the first answer without asking the guard.
    // Kept in one piece: One retry loop on purpose: every `continue` decides again on the log's current state,
    // and the three reasons to retry (stale read, stale refusal, lost race) share the loop's state.
    pub async fn execute_guarded(
        &self,
        id: &str,
        command: A::Command,
        expected: ExpectedVersion,
        metadata: Metadata,
        guard: CommandGuard<'_, A>,
    ) -> Result<CommandOutcome<A>, CommandError<A::Error>> {
        let _turn = self.locks.lock(id).await;
        let key = metadata.idempotency_key.clone();
        if let Some(key) = &key
            && let Some(first) = self.recall(id, key).await?
        {
            return self.replay(id, first).await;
        }
        let deadline = Instant::now() + self.conflict_retry_for;
        let mut current = false;
        let mut races: u32 = 0;
        loop {
            let snapshot = if current { self.store.load_current(id).await } else { self.store.load(id).await };
            let (state, version) = snapshot
                .map_err(|e| CommandError::from_store(A::NAME, e))?
                .map(|s| (s.state, s.version))
                .unwrap_or_default();
            if let Err(refused) = Self::check(id, expected, &state, version) {
                if current {
                    return Err(refused);
                }
                // What `load` gave may be stale: refuse only what the log says.
                current = true;
                continue;
            }
            // Guards and `handle` see personal values opened; the state
            // the events are applied to stays sealed.
            let opened = self.open(id, &state).await?;
            let decided_on = opened.as_ref().unwrap_or(&state);
            if let Err(reason) = guard(decided_on, &command) {
                if current {
                    return Err(CommandError::Forbidden(reason));
                }
                current = true;
                continue;
            }
            let events = match decided_on.handle(command.clone()) {
                Ok(events) => events,
                // Decided on what `load` gave, which may be stale (another
                // process's appends not seen yet): reject only on what the
                // log says.
                Err(_) if !current => {
                    current = true;
                    continue;
                }
                Err(rejected) => return Err(CommandError::Rejected(rejected)),
            };
            if events.is_empty() {
                return Ok(CommandOutcome { state, version, position: None, events: 0, deduplicated: false });
            }
            let events = self.seal(id, events).await?;
            let mut next = state;
            for event in &events {
                next.apply(event);
            }
            let count = events.len();
            let appended = match self.store.append(id, ExpectedVersion::Exact(version), events, metadata.clone()).await
            {
                Ok(appended) => appended,
                Err(StoreError::Conflict { actual, .. }) => {
                    // Another writer appended first. A retry of a command
                    // that did land (through another process) answers as
                    // that one did.
                    if let Some(key) = &key
                        && let Some(first) = self.recall(id, key).await?
                    {
                        return self.replay(id, first).await;
                    }
                    if Instant::now() >= deadline {
                        return Err(CommandError::Conflict { aggregate: A::NAME, id: id.to_owned(), expected, actual });
                    }
                    races += 1;
                    if races > 1 {
                        tokio::time::sleep(contention_pause(races)).await;
                    }
                    current = true;
                    continue;
                }
                Err(e) => return Err(CommandError::from_store(A::NAME, e)),
            };
            if appended.deduplicated {
                // Another process used the key first; answer as it did.
                return self.replay(id, appended).await;
            }
            if let Some(key) = key {
                self.remember(id, key, appended);
            }
            return Ok(CommandOutcome {
                state: next,
                version: appended.version,
                position: Some(appended.position),
                events: count,
                deduplicated: false,
            });
        }
    }

    /// `state` with its personal values opened, when the aggregate has any
    /// and the bus a vault.
    async fn open(&self, id: &str, state: &A) -> Result<Option<A>, CommandError<A::Error>> {
        match &self.vault {
            Some(vault) if A::PERSONAL_DATA => vault
                .open(&AggregateRef::new(A::NAME, id), state)
                .await
                .map(Some)
                .map_err(|e| CommandError::Store(e.into())),
            _ => Ok(None),
        }
    }

    /// `events` with their new personal values sealed.
    async fn seal(&self, id: &str, events: Vec<A::Event>) -> Result<Vec<A::Event>, CommandError<A::Error>> {
        match &self.vault {
            Some(vault) if A::PERSONAL_DATA => {
                vault.seal(&AggregateRef::new(A::NAME, id), events).await.map_err(|e| CommandError::Store(e.into()))
            }
            _ => Ok(events),
        }
    }

    /// Records in aggregate `id` that `subject` was erased: appends the
    /// event [`crate::DomainEvent::subject_erased`] makes, so that the
    /// aggregate's version (its ETag), table row, list rows and feeds move
    /// with the erasure, and tells the key store it is done. Answers
    /// `None` when the aggregate does not exist or was deleted (nothing to
    /// move). Retrying is safe: the append carries the idempotency key
    /// `erase:{subject}`.
    pub async fn record_erasure(&self, id: &str, subject: &str) -> Result<Option<Appended>, CommandError<A::Error>> {
        let event = <A::Event as crate::DomainEvent>::subject_erased(subject).ok_or_else(|| {
            CommandError::Store(StoreError::Invalid(format!("{} declares no subject-erased event", A::NAME)))
        })?;
        let _turn = self.locks.lock(id).await;
        let key = format!("erase:{subject}");
        let metadata = Metadata { idempotency_key: Some(key.clone()), ..Metadata::default() };
        let deadline = Instant::now() + self.conflict_retry_for;
        let mut races = 0;
        let appended = loop {
            if let Some(first) = self.recall(id, &key).await? {
                break Some(first);
            }
            let snapshot = self.store.load_current(id).await.map_err(|e| CommandError::from_store(A::NAME, e))?;
            let Some(snapshot) = snapshot.filter(|s| s.version > 0 && !s.state.is_deleted()) else { break None };
            match self
                .store
                .append(id, ExpectedVersion::Exact(snapshot.version), vec![event.clone()], metadata.clone())
                .await
            {
                Ok(appended) => break Some(appended),
                Err(StoreError::Conflict { .. }) if Instant::now() < deadline => {
                    races += 1;
                    tokio::time::sleep(contention_pause(races)).await;
                }
                Err(e) => return Err(CommandError::from_store(A::NAME, e)),
            }
        };
        if let Some(vault) = &self.vault {
            vault
                .key_store()
                .erasure_recorded(subject, &AggregateRef::new(A::NAME, id))
                .await
                .map_err(|e| CommandError::Store(crate::VaultError::from(e).into()))?;
        }
        Ok(appended)
    }

    /// Whether a command expecting `expected` may run on `state` at
    /// `version`.
    fn check(id: &str, expected: ExpectedVersion, state: &A, version: u64) -> Result<(), CommandError<A::Error>> {
        let exists = version > 0 && !state.is_deleted();
        match expected {
            ExpectedVersion::Exists if !exists => Err(CommandError::NotFound { aggregate: A::NAME, id: id.to_owned() }),
            ExpectedVersion::Exact(_) if !exists && version > 0 => {
                Err(CommandError::NotFound { aggregate: A::NAME, id: id.to_owned() })
            }
            e if !e.admits(version) => {
                Err(CommandError::Conflict { aggregate: A::NAME, id: id.to_owned(), expected, actual: version })
            }
            _ => Ok(()),
        }
    }

    async fn recall(&self, id: &str, key: &str) -> Result<Option<Appended>, CommandError<A::Error>> {
        let cached = self.recent.lock().map(|mut c| c.get(id, key)).unwrap_or(None);
        if cached.is_some() {
            return Ok(cached);
        }
        self.store.recall(id, key).await.map_err(|e| CommandError::from_store(A::NAME, e))
    }

    fn remember(&self, id: &str, key: String, appended: Appended) {
        if let Ok(mut cache) = self.recent.lock() {
            cache.put(id.to_owned(), key, appended);
        }
    }

    async fn replay(&self, id: &str, first: Appended) -> Result<CommandOutcome<A>, CommandError<A::Error>> {
        let state = self
            .store
            .load(id)
            .await
            .map_err(|e| CommandError::from_store(A::NAME, e))?
            .map(|s| s.state)
            .unwrap_or_default();
        Ok(CommandOutcome {
            state,
            version: first.version,
            position: Some(first.position),
            events: 0,
            deduplicated: true,
        })
    }
}

/// Recently used idempotency keys, bounded in count and age.
struct IdempotencyCache {
    capacity: usize,
    ttl: Duration,
    entries: HashMap<(String, String), (Instant, Appended)>,
    order: VecDeque<(Instant, (String, String))>,
}

impl IdempotencyCache {
    fn new(capacity: usize, ttl: Duration) -> Self {
        Self { capacity, ttl, entries: HashMap::new(), order: VecDeque::new() }
    }

    fn get(&mut self, id: &str, key: &str) -> Option<Appended> {
        self.expire(Instant::now());
        self.entries.get(&(id.to_owned(), key.to_owned())).map(|(_, a)| *a)
    }

    fn put(&mut self, id: String, key: String, appended: Appended) {
        if self.capacity == 0 {
            return;
        }
        let now = Instant::now();
        self.expire(now);
        while self.entries.len() >= self.capacity {
            match self.order.pop_front() {
                Some((_, k)) => {
                    self.entries.remove(&k);
                }
                None => break,
            }
        }
        self.entries.insert((id.clone(), key.clone()), (now, appended));
        self.order.push_back((now, (id, key)));
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < self.ttl {
                break;
            }
            if let Some((_, k)) = self.order.pop_front() {
                self.entries.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn appended(v: u64) -> Appended {
        Appended { version: v, position: Position::new(0, v), deduplicated: false }
    }

    #[test]
    fn idempotency_cache_is_bounded_by_count_and_age() {
        let mut c = IdempotencyCache::new(2, Duration::from_secs(60));
        c.put("a".into(), "k1".into(), appended(1));
        c.put("a".into(), "k2".into(), appended(2));
        c.put("a".into(), "k3".into(), appended(3));
        assert_eq!(c.get("a", "k1"), None);
        assert_eq!(c.get("a", "k3"), Some(appended(3)));
        assert_eq!(c.get("b", "k3"), None, "keys are per aggregate");
        let mut short = IdempotencyCache::new(10, Duration::ZERO);
        short.put("a".into(), "k".into(), appended(1));
        assert_eq!(short.get("a", "k"), None);
    }
}
