//! The state cache: the latest `(version, state)` of recently used
//! aggregates, so that `load` and the append path can skip the table.
//!
//! An entry is written when this store commits an append (the state is then
//! known to be current) or reads the table, and is served by `load` for
//! `ttl` after that moment. Another process sharing the database may have
//! appended meanwhile, so an older entry is read again from the table; an
//! append never trusts the cache for its version check (that is done in the
//! database, inside the transaction) and uses a cached state only when its
//! version is exactly the stream's current one. Capacity bounds the entries;
//! the least recently used goes first.
//!
//! Time comes from the cache's [`Clock`]: the monotonic clock, unless the
//! store was built with another (tests move one by hand to decide when an
//! entry expires).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// Where the state cache reads the time.
pub(crate) type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

pub(crate) struct StateCache<A> {
    capacity: usize,
    ttl: Duration,
    clock: Clock,
    slots: Mutex<Slots<A>>,
}

struct Slots<A> {
    by_id: HashMap<Arc<str>, Slot<A>>,
    /// Use stamp → id, oldest first.
    by_use: BTreeMap<u64, Arc<str>>,
    clock: u64,
    /// When the last sweep ([`StateCache::sweep`]) read the log: a read of
    /// the table that started before it may have missed what it evicted,
    /// so it is not cached.
    swept_at: Option<Instant>,
}

/// A cached state and, once a reader asked for it, its JSON document.
pub(crate) struct Cached<A> {
    pub(crate) state: A,
    pub(crate) json: OnceLock<bytes::Bytes>,
}

struct Slot<A> {
    id: Arc<str>,
    version: u64,
    state: Arc<Cached<A>>,
    /// When the state was last known to be the stream's current one.
    known_at: Instant,
    used: u64,
}

impl<A> Slots<A> {
    fn touch(&mut self, id: &str) -> Option<&Slot<A>> {
        self.clock += 1;
        let clock = self.clock;
        let slot = self.by_id.get_mut(id)?;
        self.by_use.remove(&slot.used);
        slot.used = clock;
        self.by_use.insert(clock, Arc::clone(&slot.id));
        Some(slot)
    }
}

impl<A: Clone> StateCache<A> {
    /// A cache of at most `capacity` aggregates (0: no cache) whose entries
    /// `load` trusts for `ttl` on the monotonic clock.
    pub(crate) fn new(capacity: usize, ttl: Duration) -> Self {
        Self::with_clock(capacity, ttl, Arc::new(Instant::now))
    }

    /// [`StateCache::new`] measuring time with `clock`.
    pub(crate) fn with_clock(capacity: usize, ttl: Duration, clock: Clock) -> Self {
        let slots = Mutex::new(Slots { by_id: HashMap::new(), by_use: BTreeMap::new(), clock: 0, swept_at: None });
        Self { capacity, ttl, clock, slots }
    }

    /// The current time on the cache's clock: what `known_at` is taken from.
    pub(crate) fn now(&self) -> Instant {
        (self.clock)()
    }

    fn is_fresh(&self, known_at: Instant, now: Instant) -> bool {
        now.saturating_duration_since(known_at) < self.ttl
    }

    /// Whether the cache keeps anything (capacity above 0).
    pub(crate) fn enabled(&self) -> bool {
        self.capacity > 0
    }

    fn slots(&self) -> MutexGuard<'_, Slots<A>> {
        // Nothing panics while the lock is held (states are cloned outside
        // it), so a poisoned lock still guards consistent maps.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cached version and state of `id` if it was known current less
    /// than the time-to-live ago.
    pub(crate) fn fresh(&self, id: &str) -> Option<(u64, A)> {
        self.fresh_shared(id).map(|(version, cached)| (version, A::clone(&cached.state)))
    }

    /// [`StateCache::fresh`] without copying the state: the shared entry.
    pub(crate) fn fresh_shared(&self, id: &str) -> Option<(u64, Arc<Cached<A>>)> {
        if self.capacity == 0 {
            return None;
        }
        let mut slots = self.slots();
        let now = self.now();
        slots.touch(id).filter(|s| self.is_fresh(s.known_at, now)).map(|s| (s.version, Arc::clone(&s.state)))
    }

    /// The cached state of `id` if it is the one at `version`, however old
    /// the entry (a version names one history, so the state is right).
    pub(crate) fn at(&self, id: &str, version: u64) -> Option<A> {
        if self.capacity == 0 {
            return None;
        }
        let found = self.slots().touch(id).filter(|s| s.version == version).map(|s| Arc::clone(&s.state));
        found.map(|cached| A::clone(&cached.state))
    }

    /// The cached version and state of `id`, however old the entry: a
    /// guess at the stream's current state, for a write that checks the
    /// version under the append lock before it uses the guess.
    pub(crate) fn latest(&self, id: &str) -> Option<(u64, A)> {
        if self.capacity == 0 {
            return None;
        }
        let found = self.slots().touch(id).map(|s| (s.version, Arc::clone(&s.state)));
        found.map(|(version, cached)| (version, A::clone(&cached.state)))
    }

    /// Records that `id` was at `version` with `state` at `known_at`. An
    /// entry for a later version is kept (a read that started before one of
    /// this store's commits must not overwrite it).
    pub(crate) fn put(&self, id: &str, version: u64, state: A, known_at: Instant) {
        if self.capacity == 0 {
            return;
        }
        let state = Arc::new(Cached { state, json: OnceLock::new() });
        let mut slots = self.slots();
        if slots.swept_at.is_some_and(|swept| known_at < swept) {
            return;
        }
        if let Some(slot) = slots.by_id.get_mut(id) {
            if slot.version > version {
                return;
            }
            if slot.version == version {
                slot.known_at = slot.known_at.max(known_at);
            } else {
                slot.version = version;
                slot.state = state;
                slot.known_at = known_at;
            }
            slots.touch(id);
            return;
        }
        let id: Arc<str> = Arc::from(id);
        slots.by_id.insert(Arc::clone(&id), Slot { id: Arc::clone(&id), version, state, known_at, used: 0 });
        slots.touch(&id);
        while slots.by_id.len() > self.capacity {
            let Some((_, oldest)) = slots.by_use.pop_first() else { break };
            slots.by_id.remove(&oldest);
        }
    }

    /// Forgets every entry older than the version `latest` names for its id
    /// (the log's latest versions of the aggregates written in a stretch of
    /// it, read from `read_at` on), and refuses entries read from the table
    /// before `read_at` from now on.
    pub(crate) fn sweep(&self, latest: &[(String, u64)], read_at: Instant) {
        if self.capacity == 0 {
            return;
        }
        let mut slots = self.slots();
        slots.swept_at = Some(slots.swept_at.map_or(read_at, |t| t.max(read_at)));
        for (id, version) in latest {
            if slots.by_id.get(id.as_str()).is_some_and(|slot| slot.version < *version)
                && let Some(slot) = slots.by_id.remove(id.as_str())
            {
                slots.by_use.remove(&slot.used);
            }
        }
    }

    /// Forgets `id` (its stream moved on without this store knowing how).
    pub(crate) fn evict(&self, id: &str) {
        if self.capacity == 0 {
            return;
        }
        let mut slots = self.slots();
        if let Some(slot) = slots.by_id.remove(id) {
            slots.by_use.remove(&slot.used);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        let slots = self.slots();
        assert_eq!(slots.by_id.len(), slots.by_use.len());
        slots.by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock that moves only when told.
    struct HandClock(Arc<Mutex<Instant>>);

    impl HandClock {
        fn new() -> Self {
            Self(Arc::new(Mutex::new(Instant::now())))
        }

        fn clock(&self) -> Clock {
            let time = Arc::clone(&self.0);
            Arc::new(move || *time.lock().expect("clock"))
        }

        fn advance(&self, by: Duration) {
            *self.0.lock().expect("clock") += by;
        }
    }

    #[test]
    fn a_sweep_drops_entries_behind_the_log_and_refuses_reads_that_began_before_it() {
        let time = HandClock::new();
        let cache = StateCache::with_clock(10, Duration::from_secs(60), time.clock());
        let before = cache.now();
        cache.put("a", 1, 1u32, before);
        cache.put("b", 3, 3u32, before);
        time.advance(Duration::from_millis(1));
        let read_at = cache.now();
        cache.sweep(&[("a".into(), 2), ("b".into(), 3), ("c".into(), 9)], read_at);
        assert_eq!(cache.fresh("a"), None, "an entry behind the log was kept");
        assert_eq!(cache.fresh("b"), Some((3, 3)), "an entry at the log's version was dropped");
        // A table read that began before the sweep may predate what it saw.
        cache.put("a", 1, 1u32, before);
        assert_eq!(cache.fresh("a"), None);
        cache.put("a", 2, 2u32, cache.now());
        assert_eq!(cache.fresh("a"), Some((2, 2)));
    }

    #[test]
    fn fresh_entries_are_served_and_expire() {
        let time = HandClock::new();
        let ttl = Duration::from_millis(50);
        let cache = StateCache::<String>::with_clock(10, ttl, time.clock());
        let known_at = cache.now();
        cache.put("a", 2, "two".into(), known_at);
        assert_eq!(cache.fresh("a"), Some((2, "two".into())));
        assert_eq!(cache.fresh("b"), None);
        cache.put("a", 1, "one".into(), known_at);
        assert_eq!(cache.fresh("a"), Some((2, "two".into())), "an older version never replaces a newer one");
        time.advance(ttl - Duration::from_nanos(1));
        assert_eq!(cache.fresh("a"), Some((2, "two".into())), "fresh until the time-to-live has passed");
        assert!(cache.fresh_shared("a").is_some());
        time.advance(Duration::from_nanos(1));
        assert_eq!(cache.fresh("a"), None, "expired");
        assert!(cache.fresh_shared("a").is_none());
        assert_eq!(cache.at("a", 2), Some("two".into()), "an expired entry still names version 2");
        assert_eq!(cache.at("a", 3), None);
        cache.put("a", 2, "two".into(), cache.now());
        assert_eq!(cache.fresh("a"), Some((2, "two".into())), "seen current again");
        cache.put("a", 2, "two".into(), known_at);
        assert_eq!(cache.fresh("a"), Some((2, "two".into())), "an older sighting does not age the entry");
        cache.evict("a");
        assert_eq!(cache.at("a", 2), None);
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn the_monotonic_clock_is_the_default() {
        let before = Instant::now();
        let cache = StateCache::<u32>::new(10, Duration::from_secs(3600));
        assert!(cache.now() >= before);
        cache.put("a", 1, 1, cache.now());
        assert!(cache.fresh("a").is_some());
    }

    #[test]
    fn the_least_recently_used_goes_first() {
        let time = HandClock::new();
        let cache = StateCache::<u32>::with_clock(2, Duration::from_secs(60), time.clock());
        let now = cache.now();
        cache.put("a", 1, 1, now);
        cache.put("b", 1, 2, now);
        assert!(cache.fresh("a").is_some());
        cache.put("c", 1, 3, now);
        assert!(cache.fresh("b").is_none(), "b was used least recently");
        assert!(cache.fresh("a").is_some());
        assert!(cache.fresh("c").is_some());
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn capacity_zero_caches_nothing() {
        let cache = StateCache::<u32>::new(0, Duration::from_secs(60));
        cache.put("a", 1, 1, cache.now());
        assert!(cache.fresh("a").is_none());
        assert!(cache.at("a", 1).is_none());
    }
}
