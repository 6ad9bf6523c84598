//! The in-memory table: one row per aggregate (its state as compact JSON,
//! version, record offsets, recent idempotency keys, cached history) and,
//! per events partition, what this process knows of the partition's
//! progress. Pure data and its rules; no I/O.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use kes_core::{Aggregate, Position, StoreError};

use crate::record::{KeyDoc, TableDoc};

/// The in-memory table and, per events partition, what this process knows
/// about the partition's progress.
pub(crate) struct Table<A: Aggregate> {
    /// Every aggregate of the type; a row is boxed so that the map's empty
    /// slots (up to half of them, as the map grows by doubling) cost a
    /// pointer rather than a whole row.
    pub(crate) rows: HashMap<Box<str>, Box<Row>>,
    /// What this process knows of each events partition, by partition.
    pub(crate) logs: Vec<PartitionLog>,
    /// Bytes held by the rows' `history` caches.
    cache_bytes: usize,
    /// Ids whose history is cached, oldest first (evicted first).
    cache_order: VecDeque<String>,
    model: std::marker::PhantomData<fn() -> A>,
}

impl<A: Aggregate> Table<A> {
    /// An empty table for an events topic of `partitions` partitions.
    pub(crate) fn new(partitions: u32) -> Self {
        Self {
            rows: HashMap::new(),
            logs: (0..partitions).map(|_| PartitionLog::default()).collect(),
            cache_bytes: 0,
            cache_order: VecDeque::new(),
            model: std::marker::PhantomData,
        }
    }

    /// Adds one events record to the cached history of `id` (if it holds
    /// the whole history), then evicts whole histories down to `budget`.
    pub(crate) fn cache(&mut self, id: &str, value: &[u8], budget: usize) {
        let Some(row) = self.rows.get_mut(id) else { return };
        let Some(history) = row.history.as_mut() else { return };
        if history.is_empty() {
            self.cache_order.push_back(id.to_owned());
        }
        history.push(Arc::from(value));
        self.cache_bytes += value.len();
        while self.cache_bytes > budget {
            let Some(victim) = self.cache_order.pop_front() else { break };
            if let Some(dropped) = self.rows.get_mut(victim.as_str()).and_then(|r| r.history.take()) {
                self.cache_bytes -= dropped.iter().map(|v| v.len()).sum::<usize>();
            }
        }
    }
}

/// One aggregate of the table. The table holds every aggregate of its type,
/// so a row is kept small: the state as its compact JSON (a typed state
/// with strings and sets takes several times the bytes of its JSON; `load`
/// and `append` deserialise it), and what most rows lack (idempotency
/// keys, several records, a cached history) behind a pointer or not at all.
#[expect(
    clippy::box_collection,
    reason = "a boxed collection takes 8 bytes of every row instead of 24 or 32; most rows have none"
)]
pub(crate) struct Row {
    /// The state, serialised with `serde_json` (compact).
    pub(crate) state: Box<[u8]>,
    pub(crate) version: u64,
    pub(crate) first_offset: u64,
    pub(crate) last_offset: u64,
    /// Its events partition.
    pub(crate) partition: u32,
    /// Size of its largest events record, saturated at `u32::MAX` (kept in
    /// table records; reads no longer size fetches by it).
    pub(crate) max_bytes: u32,
    pub(crate) offsets: Offsets,
    /// Its recent idempotency keys, oldest first; `None` when it has none.
    pub(crate) keys: Option<Box<VecDeque<KeyDoc>>>,
    /// Its events records' values, all of them, while they fit the read
    /// cache; `None` once evicted or for rows loaded from the table topic.
    pub(crate) history: Option<Box<Vec<Arc<[u8]>>>>,
    /// [`Aggregate::is_deleted`] of the state.
    pub(crate) deleted: bool,
    /// A table record of this row is in flight (see `save_row`).
    pub(crate) table_writing: bool,
    /// The row moved since the record in flight was built.
    pub(crate) table_stale: bool,
}

/// The offsets of a row's events records.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Offsets {
    /// Not known: a table record from an older writer did not list them
    /// (`read` scans the partition then).
    Unknown,
    /// One record, at the row's `first_offset` (most aggregates).
    First,
    /// All of them, ascending, the first one included.
    Many(Vec<u64>),
}

impl Offsets {
    /// The list a table record carries (empty when unknown).
    pub(crate) fn to_vec(&self, first: u64) -> Vec<u64> {
        match self {
            Self::Unknown => Vec::new(),
            Self::First => vec![first],
            Self::Many(all) => all.clone(),
        }
    }

    /// The list read from a table record.
    pub(crate) fn from_vec(all: Vec<u64>, first: u64) -> Self {
        match all.as_slice() {
            [] => Self::Unknown,
            [only] if *only == first => Self::First,
            _ => Self::Many(all),
        }
    }

    /// One more record after those listed (nothing when they are unknown).
    pub(crate) fn push(&mut self, first: u64, offset: u64) {
        match self {
            Self::Unknown => {}
            Self::First => *self = Self::Many(vec![first, offset]),
            Self::Many(all) => all.push(offset),
        }
    }
}

impl Row {
    /// A row for an aggregate whose first events record is at `at`, before
    /// that record is applied (version 0, the default state).
    pub(crate) fn new(at: Position) -> Self {
        Self {
            state: Box::default(),
            version: 0,
            first_offset: at.offset,
            last_offset: at.offset,
            partition: at.partition,
            max_bytes: 0,
            offsets: Offsets::First,
            keys: None,
            history: Some(Box::default()),
            deleted: false,
            table_writing: false,
            table_stale: false,
        }
    }

    /// The state, typed (the default one for a row no record reached yet).
    pub(crate) fn typed<A: Aggregate>(&self) -> Result<A, serde_json::Error> {
        if self.version == 0 { Ok(A::default()) } else { serde_json::from_slice(&self.state) }
    }

    /// Moves the row by one events record (`size` bytes of key and value,
    /// at `at`) that brought it to `version` and `state`.
    pub(crate) fn advance(&mut self, state: Box<[u8]>, deleted: bool, version: u64, at: Position, size: u64) {
        if self.version > 0 {
            self.offsets.push(self.first_offset, at.offset);
        }
        self.state = state;
        self.deleted = deleted;
        self.version = version;
        self.last_offset = at.offset;
        self.partition = at.partition;
        self.max_bytes = self.max_bytes.max(u32::try_from(size).unwrap_or(u32::MAX));
    }

    /// A row as a table record describes it, with its state already checked
    /// against the model and encoded as the table keeps it.
    pub(crate) fn from_table_doc(doc: TableDoc, state: Box<[u8]>, deleted: bool) -> Self {
        let keys = doc.idempotency_keys;
        Self {
            state,
            version: doc.version,
            first_offset: doc.first_offset,
            last_offset: doc.last_offset,
            partition: doc.events_partition,
            max_bytes: u32::try_from(doc.max_record_bytes).unwrap_or(u32::MAX),
            offsets: Offsets::from_vec(doc.offsets, doc.first_offset),
            keys: (!keys.is_empty()).then(|| Box::new(keys)),
            history: None,
            deleted,
            table_writing: false,
            table_stale: false,
        }
    }

    /// The recent idempotency key `key`, when the row remembers it.
    pub(crate) fn key(&self, key: &str) -> Option<&KeyDoc> {
        self.keys.as_deref().and_then(|keys| keys.iter().find(|k| k.key == key))
    }

    /// Remembers idempotency key `key` of the record at `offset` that
    /// brought the row to `version`, keeping the last `capacity` keys (a key
    /// already remembered keeps its first answer).
    pub(crate) fn remember_key(&mut self, key: String, version: u64, offset: u64, capacity: usize) {
        if capacity == 0 || self.key(&key).is_some() {
            return;
        }
        let keys = self.keys.get_or_insert_default();
        keys.push_back(KeyDoc { key, version, offset });
        while keys.len() > capacity {
            keys.pop_front();
        }
    }
}

/// A state the table holds, typed; [`StoreError::Corrupt`] when it does
/// not fit the aggregate's model.
pub(crate) fn typed_state<A: Aggregate>(id: &str, bytes: &[u8]) -> Result<A, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        aggregate: A::NAME.to_owned(),
        id: id.to_owned(),
        version: 0,
        reason: format!("the table's state does not fit the aggregate's model: {e}"),
    })
}

/// A state as the table keeps it: its compact JSON, and whether it is
/// deleted. The JSON is written into `scratch` (cleared first; reused
/// across many states by the start-up load) and copied into an allocation
/// of its exact size.
pub(crate) fn encode_state<A: Aggregate>(
    state: &A,
    scratch: &mut Vec<u8>,
) -> Result<(Box<[u8]>, bool), serde_json::Error> {
    scratch.clear();
    serde_json::to_writer(&mut *scratch, state)?;
    Ok((Box::from(scratch.as_slice()), state.is_deleted()))
}

/// What this process knows of one events partition's progress: how far the
/// table has applied it, and which of those records a table record does
/// not reflect yet.
#[derive(Default)]
pub(crate) struct PartitionLog {
    /// Offset after the highest events record applied to the table.
    pub(crate) end: u64,
    /// Applied events records whose table record is not acknowledged yet
    /// (offset → aggregate id).
    pub(crate) unsaved: BTreeMap<u64, String>,
    /// Sends in flight (send id → the partition's `end` when sent: the
    /// record's offset will not be lower).
    pub(crate) in_flight: HashMap<u64, u64>,
    /// Lowest offset a failed send may have landed at: the send timed out or
    /// failed without telling whether the broker wrote it.
    pub(crate) uncertain_from: Option<u64>,
    /// The highest `reflected_below` an acknowledged table record claims.
    pub(crate) claimed: u64,
    /// The aggregate of the latest events record applied.
    pub(crate) last_id: Option<String>,
}

impl PartitionLog {
    /// Every events record of this partition below the returned offset is
    /// reflected in an acknowledged table record.
    pub(crate) fn reflected_below(&self) -> u64 {
        let mut low = self.end;
        if let Some((o, _)) = self.unsaved.first_key_value() {
            low = low.min(*o);
        }
        if let Some(f) = self.in_flight.values().min() {
            low = low.min(*f);
        }
        if let Some(u) = self.uncertain_from {
            low = low.min(u);
        }
        low
    }

    /// The table record of `id` reflecting every record of `id` up to offset
    /// `up_to` is acknowledged: those records are no longer unsaved.
    pub(crate) fn forget_saved(&mut self, id: &str, up_to: u64) {
        let saved: Vec<u64> = self.unsaved.range(..=up_to).filter(|(_, i)| i.as_str() == id).map(|(o, _)| *o).collect();
        for o in saved {
            self.unsaved.remove(&o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_lists_round_trip_and_cost_nothing_for_one_record() {
        assert_eq!(Offsets::from_vec(vec![], 5), Offsets::Unknown);
        assert_eq!(Offsets::from_vec(vec![5], 5), Offsets::First);
        assert_eq!(Offsets::from_vec(vec![4], 5), Offsets::Many(vec![4]), "kept as written");
        for list in [vec![], vec![5], vec![5, 9, 12]] {
            assert_eq!(Offsets::from_vec(list.clone(), 5).to_vec(5), list);
        }
        let mut offsets = Offsets::First;
        offsets.push(5, 9);
        offsets.push(5, 12);
        assert_eq!(offsets.to_vec(5), [5, 9, 12]);
        let mut unknown = Offsets::Unknown;
        unknown.push(5, 9);
        assert_eq!(unknown, Offsets::Unknown, "an unknown list stays unknown");
    }

    #[test]
    fn a_row_moves_record_by_record() {
        use kes_core::conformance::Ledger;
        let mut scratch = Vec::new();
        let mut row = Row::new(Position::new(2, 7));
        assert_eq!(row.typed::<Ledger>().unwrap(), Ledger::default());
        let opened = Ledger { open: true, ..Ledger::default() };
        let (state, deleted) = encode_state(&opened, &mut scratch).unwrap();
        row.advance(state, deleted, 1, Position::new(2, 7), 300);
        assert_eq!((row.version, row.first_offset, row.last_offset, row.partition), (1, 7, 7, 2));
        assert_eq!((row.offsets.clone(), row.max_bytes, row.deleted), (Offsets::First, 300, false));
        let closed = Ledger { closed: true, total: 3, entries: 2, ..opened };
        let (state, deleted) = encode_state(&closed, &mut scratch).unwrap();
        assert_eq!(&*state, serde_json::to_vec(&closed).unwrap().as_slice(), "compact JSON, exact size");
        row.advance(state, deleted, 3, Position::new(2, 11), 1 << 40);
        assert_eq!(row.typed::<Ledger>().unwrap(), closed);
        assert_eq!((row.version, row.first_offset, row.last_offset), (3, 7, 11));
        assert_eq!((row.offsets.to_vec(row.first_offset), row.max_bytes, row.deleted), (vec![7, 11], u32::MAX, true));
        let mut keyed = row;
        keyed.remember_key("k".into(), 3, 11, 1);
        keyed.remember_key("k".into(), 3, 11, 1);
        assert_eq!(keyed.key("k").map(|k| (k.version, k.offset)), Some((3, 11)));
        keyed.remember_key("l".into(), 4, 12, 1);
        assert!(keyed.key("k").is_none() && keyed.key("l").is_some(), "only the last keys are remembered");
    }

    #[test]
    fn a_stored_state_that_does_not_fit_the_model_is_a_typed_error() {
        use kes_core::conformance::Ledger;
        for bytes in [&br#"{"open":"yes"}"#[..], b"{not json", b""] {
            match typed_state::<Ledger>("a-1", bytes) {
                Err(StoreError::Corrupt { id, version: 0, reason, .. }) => {
                    assert_eq!(id, "a-1");
                    assert!(reason.contains("model"), "{reason}");
                }
                other => panic!("expected Corrupt, got {other:?}"),
            }
        }
    }

    #[test]
    fn reflected_below_never_passes_unsaved_in_flight_or_uncertain_records() {
        let mut log = PartitionLog { end: 10, ..PartitionLog::default() };
        assert_eq!(log.reflected_below(), 10);
        log.in_flight.insert(1, 8);
        assert_eq!(log.reflected_below(), 8);
        log.unsaved.insert(5, "a".into());
        log.unsaved.insert(7, "b".into());
        assert_eq!(log.reflected_below(), 5);
        log.forget_saved("a", 6);
        assert_eq!(log.reflected_below(), 7);
        log.uncertain_from = Some(2);
        assert_eq!(log.reflected_below(), 2);
    }
}
