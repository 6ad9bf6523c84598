//! What the log stores around each event, and where in the log it sits.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Context recorded with every event of one command: who asked, as part of
/// what, and under which retry key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Ties together everything caused by one user action (request id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The message (command or event) that directly caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// The authenticated user or service that issued the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// The client's retry key; the same key on the same aggregate appends once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Anything else the application wants kept with the events.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, String>,
}

/// Where a record sits in the log.
///
/// The log is split into partitions; order holds within a partition. The SQL
/// stores have one partition (0) and the offset is the global sequence
/// number; on Kafka it is the topic partition and the record's offset (all
/// events of one command share one record, hence one position).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    /// The log partition.
    pub partition: u32,
    /// The offset within the partition.
    pub offset: u64,
}

impl Position {
    /// A position in partition `partition` at `offset`.
    pub const fn new(partition: u32, offset: u64) -> Self {
        Self { partition, offset }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.partition, self.offset)
    }
}

/// A [`Position`] written as text could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a log position (expected PARTITION:OFFSET): {0:?}")]
pub struct BadPosition(pub String);

/// Reads `PARTITION:OFFSET` as [`Display`](std::fmt::Display) writes it:
/// decimal digits only (no sign, no spaces), within range.
impl FromStr for Position {
    type Err = BadPosition;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadPosition(s.chars().take(64).collect());
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        let (p, o) = s.split_once(':').filter(|(p, o)| digits(p) && digits(o)).ok_or_else(bad)?;
        Ok(Self { partition: p.parse().map_err(|_| bad())?, offset: o.parse().map_err(|_| bad())? })
    }
}

/// How far a reader has consumed the log: for each partition, the offset of
/// the next record to read. Owned by the reader (a projection stores it with
/// its data), never by the log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    next: BTreeMap<u32, u64>,
}

impl Checkpoint {
    /// The start of the log.
    pub fn start() -> Self {
        Self::default()
    }

    /// The offset of the next record to read in `partition` (0 when nothing
    /// of it was read).
    pub fn next_offset(&self, partition: u32) -> u64 {
        self.next.get(&partition).copied().unwrap_or(0)
    }

    /// Records that everything up to and including `position` was consumed.
    /// Never moves backwards.
    pub fn advance(&mut self, position: Position) {
        let next = self.next.entry(position.partition).or_insert(0);
        *next = (*next).max(position.offset + 1);
    }

    /// Sets the next offset of a partition directly (used by stores that
    /// report the head of the log).
    pub fn set_next(&mut self, partition: u32, next: u64) {
        self.next.insert(partition, next);
    }

    /// Whether the record at `position` has been consumed.
    pub fn covers(&self, position: Position) -> bool {
        self.next_offset(position.partition) > position.offset
    }

    /// Whether everything `other` has consumed, this one has too.
    pub fn covers_all(&self, other: &Checkpoint) -> bool {
        other.next.iter().all(|(p, n)| self.next_offset(*p) >= *n)
    }

    /// The partitions and next offsets.
    pub fn iter(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.next.iter().map(|(p, n)| (*p, *n))
    }

    /// How many records `head` holds that this checkpoint has not consumed.
    pub fn lag_behind(&self, head: &Checkpoint) -> u64 {
        head.iter().map(|(p, n)| n.saturating_sub(self.next_offset(p))).sum()
    }

    /// JSON text of this checkpoint, as projections store it.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.next).unwrap_or_else(|_| "{}".to_owned())
    }

    /// Reads a checkpoint stored by [`Checkpoint::to_json`].
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        Ok(Self { next: serde_json::from_str(text)? })
    }
}

/// One stored event with everything the log keeps around it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<E> {
    /// Unique id of this event.
    pub event_id: Uuid,
    /// The aggregate type ([`crate::Aggregate::NAME`]).
    pub aggregate_type: String,
    /// The aggregate instance.
    pub aggregate_id: String,
    /// 1, 2, 3… per aggregate, without gaps.
    pub version: u64,
    /// The event's type name ([`crate::DomainEvent::event_type`]).
    pub event_type: String,
    /// The schema revision of `payload`: the one it was written with while
    /// the payload is still bytes ([`crate::RawEnvelope`]), the current one
    /// once decoded (an upcaster raised it).
    pub revision: u32,
    /// When the command that caused it was accepted.
    pub recorded_at: DateTime<Utc>,
    /// Who, why and under which retry key.
    pub metadata: Metadata,
    /// Where it sits in the log.
    pub position: Position,
    /// The event itself.
    pub payload: E,
}

impl<E> Envelope<E> {
    /// The same envelope around another payload.
    pub fn map<F>(self, f: impl FnOnce(E) -> F) -> Envelope<F> {
        Envelope {
            event_id: self.event_id,
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            version: self.version,
            event_type: self.event_type,
            revision: self.revision,
            recorded_at: self.recorded_at,
            metadata: self.metadata,
            position: self.position,
            payload: f(self.payload),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_round_trips_through_text_and_rejects_garbage() {
        let p = Position::new(3, 42);
        assert_eq!(p.to_string().parse::<Position>(), Ok(p));
        assert!("3".parse::<Position>().is_err());
        assert!("x:1".parse::<Position>().is_err());
        assert!("1:-1".parse::<Position>().is_err());
        for loose in ["+1:2", "1:+2", " 1:2", "1:2 ", ":2", "1:", "1:2:3"] {
            assert!(loose.parse::<Position>().is_err(), "{loose:?}");
        }
    }

    #[test]
    fn checkpoint_advances_monotonically_and_reports_lag() {
        let mut c = Checkpoint::start();
        c.advance(Position::new(0, 4));
        c.advance(Position::new(0, 2));
        assert_eq!(c.next_offset(0), 5);
        assert!(c.covers(Position::new(0, 4)));
        assert!(!c.covers(Position::new(0, 5)));
        assert!(!c.covers(Position::new(1, 0)));
        let mut head = Checkpoint::start();
        head.set_next(0, 9);
        head.set_next(1, 2);
        assert_eq!(c.lag_behind(&head), 6);
        assert!(!c.covers_all(&head));
        assert_eq!(Checkpoint::from_json(&c.to_json()).unwrap(), c);
    }
}
