//! Per-key async locks: one turn at a time per key (an aggregate id), never
//! a global lock. The [`CommandBus`](crate::CommandBus) takes an aggregate's
//! turn here, and so do stores that serialise their own writes per aggregate.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};

/// One shard of the lock table: key → its lock.
type LockShard = Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>;

/// Per-key async locks whose table entries disappear when unused.
///
/// [`KeyedLocks::lock`] waits until no other guard holds the same key;
/// different keys never wait for each other. The table is sharded by key,
/// and a shard is locked only for a map lookup, never across an `.await`,
/// so a key waiting for its turn holds up no other key. An entry lives only
/// while a guard holds it or a task waits for it: the table stays as small
/// as the number of keys in use.
pub struct KeyedLocks {
    hasher: RandomState,
    shards: Box<[LockShard]>,
}

/// A key's turn in a [`KeyedLocks`]; the turn ends when the guard is dropped.
#[must_use = "the key's turn ends as soon as the guard is dropped"]
pub struct KeyedGuard<'a> {
    locks: &'a KeyedLocks,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    /// A lock table with `shards` shards (at least one). More shards mean
    /// less contention on the table itself between unrelated keys.
    pub fn new(shards: usize) -> Self {
        Self { hasher: RandomState::new(), shards: (0..shards.max(1)).map(|_| Mutex::new(HashMap::new())).collect() }
    }

    fn shard(&self, key: &str) -> &LockShard {
        let i = self.hasher.hash_one(key) as usize % self.shards.len();
        &self.shards[i]
    }

    /// Waits for `key`'s turn: until every guard taken earlier on `key` is
    /// dropped (waiters are served in the order they asked).
    pub async fn lock(&self, key: &str) -> KeyedGuard<'_> {
        let lock = {
            let mut shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
            shard.entry(key.to_owned()).or_default().clone()
        };
        KeyedGuard { locks: self, key: key.to_owned(), guard: Some(lock.lock_owned().await) }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map(|m| m.len()).unwrap_or(0)).sum()
    }
}

impl std::fmt::Debug for KeyedLocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedLocks").field("shards", &self.shards.len()).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for KeyedGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedGuard").field("key", &self.key).finish_non_exhaustive()
    }
}

impl Drop for KeyedGuard<'_> {
    fn drop(&mut self) {
        let mut shard = self.locks.shard(&self.key).lock().unwrap_or_else(|p| p.into_inner());
        // The table and this guard hold the only references: nobody else
        // waits for this key, so the entry can go.
        if shard.get(&self.key).is_some_and(|entry| Arc::strong_count(entry) == 2) {
            shard.remove(&self.key);
        }
        self.guard.take();
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    #[tokio::test]
    async fn keyed_locks_forget_unused_keys() {
        let locks = KeyedLocks::new(4);
        {
            let _a = locks.lock("a").await;
            let _b = locks.lock("b").await;
            assert_eq!(locks.len(), 2);
        }
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn a_key_has_one_turn_at_a_time_and_other_keys_do_not_wait() {
        let locks = KeyedLocks::new(1);
        let held = locks.lock("a").await;
        assert!(locks.lock("a").now_or_never().is_none(), "a second turn on a held key waits");
        assert!(locks.lock("b").now_or_never().is_some(), "another key, even in the same shard, does not");
        drop(held);
        assert!(locks.lock("a").now_or_never().is_some(), "the turn is free once the guard is dropped");
        assert_eq!(locks.len(), 0);
    }
}
