//! The event log contract every store backend fulfils.

use std::fmt;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::aggregate::Aggregate;
use crate::envelope::{Checkpoint, Envelope, Metadata, Position};

/// What the caller believes the stream's version to be when appending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpectedVersion {
    /// Append whatever the current version is.
    Any,
    /// The stream must not exist yet (a create).
    NoStream,
    /// The stream must exist (at any version).
    Exists,
    /// The stream must be exactly at this version (from `If-Match`).
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream currently at `actual` (0 = no stream) satisfies this.
    pub fn admits(self, actual: u64) -> bool {
        match self {
            Self::Any => true,
            Self::NoStream => actual == 0,
            Self::Exists => actual > 0,
            Self::Exact(v) => actual == v,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any version"),
            Self::NoStream => f.write_str("no stream"),
            Self::Exists => f.write_str("an existing stream"),
            Self::Exact(v) => write!(f, "version {v}"),
        }
    }
}

/// What a successful append reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appended {
    /// The stream's version after the append (its last event's version).
    pub version: u64,
    /// Where the last event of the append sits in the log.
    pub position: Position,
    /// True when the idempotency key was seen before: nothing was appended
    /// and `version`/`position` are those of the first append with that key.
    pub deduplicated: bool,
}

/// The latest state of one aggregate, as the table holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot<A> {
    /// The state after the last event.
    pub state: A,
    /// The version of the last event (≥ 1).
    pub version: u64,
}

/// The latest state of one aggregate as its JSON document (what
/// `serde_json` makes of the state, compact), for readers that only pass it
/// on, such as `GET` by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDocument {
    /// The state as compact JSON. A shared buffer: a store that keeps the
    /// document (the SQL store's state cache) hands out a reference to it,
    /// and a response body can be the same buffer, not a copy.
    pub json: bytes::Bytes,
    /// The version of the last event (≥ 1).
    pub version: u64,
    /// [`Aggregate::is_deleted`] of the state.
    pub deleted: bool,
}

/// Why a store operation failed. Backends sort their own failures into
/// these portable kinds; the HTTP edge maps each kind to one status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The stream is not at the expected version; nothing was appended.
    #[error("{aggregate} {id}: expected {expected}, but the stream is at version {actual}")]
    Conflict {
        /// Aggregate type.
        aggregate: String,
        /// Aggregate id.
        id: String,
        /// What the caller expected.
        expected: ExpectedVersion,
        /// The stream's actual version (0 = no stream).
        actual: u64,
    },
    /// The backend cannot be reached or timed out; retrying later may work.
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    /// A stored record could not be decoded.
    #[error("stored event of {aggregate} {id} at version {version} cannot be read: {reason}")]
    Corrupt {
        /// Aggregate type.
        aggregate: String,
        /// Aggregate id.
        id: String,
        /// Version of the unreadable event (0 when it is the table row).
        version: u64,
        /// What was wrong.
        reason: String,
    },
    /// The request itself is unacceptable (empty append, bad id).
    #[error("invalid request to the event store: {0}")]
    Invalid(String),
    /// The backend failed in a way that retrying will not fix.
    #[error("event store failure: {0}")]
    Backend(String),
}

impl StoreError {
    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// An endless stream of the log's records in log order, one item per
/// record (all events of one command together, so that a reader never
/// stores a checkpoint in the middle of a command).
pub type EventStream<E> = BoxStream<'static, Result<Logged<E>, StoreError>>;

/// One record of the log as a subscription delivers it: where it is, and
/// the events of the command it holds.
///
/// `events` is empty when the record is *void*: a log that arbitrates
/// concurrent writers by a validity rule (the Kafka store with several
/// instances) keeps records that lost a race, and every reader skips them.
/// A void record still moves a reader's checkpoint past its position, so
/// that a reader waiting for the head of the log reaches it.
#[derive(Debug, Clone, PartialEq)]
pub struct Logged<E> {
    /// Where the record is in the log: the position of its last event, in
    /// logs that give each event a position of its own (SQL), so that a
    /// checkpoint advanced to it passes the whole record.
    pub position: Position,
    /// Its events, in version order; empty for a void record.
    pub events: Vec<Envelope<E>>,
}

impl<E> Logged<E> {
    /// The record holding `events` (all of one append, in order); `None`
    /// when there are none.
    pub fn of(events: Vec<Envelope<E>>) -> Option<Self> {
        let position = events.last()?.position;
        Some(Self { position, events })
    }

    /// A void record at `position`: no events, only progress.
    pub fn void(position: Position) -> Self {
        Self { position, events: Vec::new() }
    }

    /// Whether the record lost to another under the log's validity rule.
    pub fn is_void(&self) -> bool {
        self.events.is_empty()
    }
}

impl<E> std::ops::Deref for Logged<E> {
    type Target = [Envelope<E>];

    fn deref(&self) -> &[Envelope<E>] {
        &self.events
    }
}

impl<E> IntoIterator for Logged<E> {
    type Item = Envelope<E>;
    type IntoIter = std::vec::IntoIter<Envelope<E>>;

    fn into_iter(self) -> Self::IntoIter {
        self.events.into_iter()
    }
}

impl<'a, E> IntoIterator for &'a Logged<E> {
    type Item = &'a Envelope<E>;
    type IntoIter = std::slice::Iter<'a, Envelope<E>>;

    fn into_iter(self) -> Self::IntoIter {
        self.events.iter()
    }
}

/// One figure a store reports for monitoring (see [`EventStore::gauges`]),
/// exported by the HTTP adapter as `kes_store_{name}` with the aggregate
/// type as a label.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreGauge {
    /// Metric name without the `kes_store_` prefix (`void_records`).
    pub name: &'static str,
    /// What it counts.
    pub help: &'static str,
    /// Extra labels (`partition`).
    pub labels: Vec<(&'static str, String)>,
    /// Its value now.
    pub value: f64,
}

impl StoreGauge {
    /// What a store with a table of latest states reports about its state
    /// version: `table_state_version` (the [`Aggregate::STATE_VERSION`] the
    /// table is built by) and `table_rebuilt_from_state_version` (the
    /// version the table held when the store found it outdated at start and
    /// rebuilt it from the log; 0 when it did not).
    pub fn state_version<A: Aggregate>(rebuilt_from: u32) -> Vec<StoreGauge> {
        vec![
            StoreGauge {
                name: "table_state_version",
                help: "the state version (Aggregate::STATE_VERSION) the table of latest states is built by",
                labels: Vec::new(),
                value: f64::from(A::STATE_VERSION),
            },
            StoreGauge {
                name: "table_rebuilt_from_state_version",
                help: "the state version of the table this process found at start and rebuilt from the log \
                       (0: the table was current)",
                labels: Vec::new(),
                value: f64::from(rebuilt_from),
            },
        ]
    }
}

/// The append-only event log of one aggregate type plus its table of latest
/// states.
///
/// Every backend runs the conformance suite in `kes_core::conformance`
/// (feature `testing`).
#[async_trait]
pub trait EventStore<A: Aggregate>: Send + Sync + 'static {
    /// Appends the events of one command to stream `id`, all or none, after
    /// checking `expected`. The table row of `id` moves in the same step.
    ///
    /// When `metadata.idempotency_key` was already used on this stream, it
    /// appends nothing and answers what the first append answered, with
    /// `deduplicated` set.
    async fn append(
        &self,
        id: &str,
        expected: ExpectedVersion,
        events: Vec<A::Event>,
        metadata: Metadata,
    ) -> Result<Appended, StoreError>;

    /// What the append that used `idempotency_key` on stream `id` answered,
    /// if one did (with `deduplicated` set). How long keys are remembered is
    /// the backend's retention, documented by each backend.
    async fn recall(&self, id: &str, idempotency_key: &str) -> Result<Option<Appended>, StoreError>;

    /// The latest state and version of `id` from the table, without replay;
    /// `None` when the stream does not exist.
    async fn load(&self, id: &str) -> Result<Option<Snapshot<A>>, StoreError>;

    /// [`EventStore::load`] past whatever this process keeps in memory: the
    /// state as the log has it now. The command bus calls it after a
    /// conflict, and before it refuses a command whose expected version or
    /// existence does not match what `load` gave, so that a stale cache
    /// never turns into a false conflict. Stores that keep no state apart
    /// from the log's answer with `load` (the default).
    async fn load_current(&self, id: &str) -> Result<Option<Snapshot<A>>, StoreError> {
        self.load(id).await
    }

    /// [`EventStore::load`] as a JSON document. Stores that keep states as
    /// JSON answer without decoding and encoding them again; the default
    /// serialises what `load` returns.
    async fn load_document(&self, id: &str) -> Result<Option<StateDocument>, StoreError> {
        let Some(snapshot) = self.load(id).await? else { return Ok(None) };
        let json = serde_json::to_vec(&snapshot.state)
            .map_err(|e| StoreError::Backend(format!("{} {id}: the state does not serialise: {e}", A::NAME)))?;
        Ok(Some(StateDocument { json: json.into(), version: snapshot.version, deleted: snapshot.state.is_deleted() }))
    }

    /// The whole stream of `id`, oldest first (the audit history).
    async fn read(&self, id: &str) -> Result<Vec<Envelope<A::Event>>, StoreError>;

    /// At most `limit` events of stream `id` whose versions follow `after`,
    /// oldest first: one page of the audit history. Paging by version is
    /// stable while the stream grows: every event appears on exactly one
    /// page. Empty when the stream does not exist or has nothing past
    /// `after`.
    ///
    /// The default reads the whole stream and cuts the page out of it;
    /// backends that can seek by version override it.
    async fn read_page(&self, id: &str, after: u64, limit: usize) -> Result<Vec<Envelope<A::Event>>, StoreError> {
        let mut events = self.read(id).await?;
        events.retain(|e| e.version > after);
        events.truncate(limit);
        Ok(events)
    }

    /// Every record after `from`, in log order, then new ones as they are
    /// appended. Per aggregate, events arrive in version order.
    async fn subscribe(&self, from: Checkpoint) -> Result<EventStream<A::Event>, StoreError>;

    /// The end of the log now: a checkpoint that has consumed everything
    /// appended so far. Used to measure projection lag.
    async fn head(&self) -> Result<Checkpoint, StoreError>;

    /// Whether the backend answers now (for readiness probes).
    async fn ping(&self) -> Result<(), StoreError> {
        self.head().await.map(drop)
    }

    /// Waits, at most `timeout`, until what `load` answers reflects the
    /// record at `position` (a position an append of any process answered):
    /// `true` once it does, `false` when the time ran out. A read that
    /// carries a position token calls it, so that a client reads its own
    /// writes through any instance. Stores whose `load` always reads the
    /// log itself answer `true` at once (the default); a store that follows
    /// the log into memory (Kafka) waits for its follower.
    async fn wait_for_position(&self, position: Position, timeout: std::time::Duration) -> Result<bool, StoreError> {
        let _ = (position, timeout);
        Ok(true)
    }

    /// Figures the store reports for monitoring (`/metrics`): name, help
    /// text and value. None by default.
    fn gauges(&self) -> Vec<StoreGauge> {
        Vec::new()
    }

    /// Writes out whatever the store keeps only in memory after an append
    /// has been acknowledged (work it defers, such as coalesced writes of
    /// its table) and waits for it, so that the next start has nothing to
    /// catch up. Call it before a planned shutdown; the store stays usable.
    /// Stores that write everything during `append` have nothing to do
    /// (the default).
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[async_trait]
impl<A: Aggregate, S: EventStore<A> + ?Sized> EventStore<A> for std::sync::Arc<S> {
    async fn append(
        &self,
        id: &str,
        expected: ExpectedVersion,
        events: Vec<A::Event>,
        metadata: Metadata,
    ) -> Result<Appended, StoreError> {
        (**self).append(id, expected, events, metadata).await
    }
    async fn recall(&self, id: &str, idempotency_key: &str) -> Result<Option<Appended>, StoreError> {
        (**self).recall(id, idempotency_key).await
    }
    async fn load(&self, id: &str) -> Result<Option<Snapshot<A>>, StoreError> {
        (**self).load(id).await
    }
    async fn load_current(&self, id: &str) -> Result<Option<Snapshot<A>>, StoreError> {
        (**self).load_current(id).await
    }
    async fn load_document(&self, id: &str) -> Result<Option<StateDocument>, StoreError> {
        (**self).load_document(id).await
    }
    async fn read(&self, id: &str) -> Result<Vec<Envelope<A::Event>>, StoreError> {
        (**self).read(id).await
    }
    async fn read_page(&self, id: &str, after: u64, limit: usize) -> Result<Vec<Envelope<A::Event>>, StoreError> {
        (**self).read_page(id, after, limit).await
    }
    async fn subscribe(&self, from: Checkpoint) -> Result<EventStream<A::Event>, StoreError> {
        (**self).subscribe(from).await
    }
    async fn head(&self) -> Result<Checkpoint, StoreError> {
        (**self).head().await
    }
    async fn wait_for_position(&self, position: Position, timeout: std::time::Duration) -> Result<bool, StoreError> {
        (**self).wait_for_position(position, timeout).await
    }
    fn gauges(&self) -> Vec<StoreGauge> {
        (**self).gauges()
    }
    async fn ping(&self) -> Result<(), StoreError> {
        (**self).ping().await
    }
    async fn flush(&self) -> Result<(), StoreError> {
        (**self).flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_version_admits() {
        assert!(ExpectedVersion::Any.admits(0) && ExpectedVersion::Any.admits(7));
        assert!(ExpectedVersion::NoStream.admits(0) && !ExpectedVersion::NoStream.admits(1));
        assert!(!ExpectedVersion::Exists.admits(0) && ExpectedVersion::Exists.admits(1));
        assert!(ExpectedVersion::Exact(3).admits(3) && !ExpectedVersion::Exact(3).admits(4));
    }
}
