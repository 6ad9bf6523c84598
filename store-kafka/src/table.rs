//! The in-memory table: one row per aggregate (its state as compact JSON,
//! version, record offsets, recent idempotency keys, cached history) and,
//! per events partition, what this process knows of the partition's
//! progress. Pure data and its rules; no I/O.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use kes_core::{Aggregate, Position, ReactionKey, StoreError};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::record::{KeyDoc, MarkDoc, TableDoc};
use crate::rows::Rows;
use crate::tail::{KeptRecord, TAIL_BYTES, Tail, TailRecord};
use crate::validity::StreamTip;

/// The in-memory table and, per events partition, what this process knows
/// about the partition's progress.
pub(crate) struct Table<A: Aggregate> {
    /// Every aggregate of the type, packed (see `rows`).
    pub(crate) rows: Rows,
    /// The values of every events record of the rows whose whole history
    /// is in the read cache (rows created since this process started, until
    /// evicted).
    pub(crate) histories: HashMap<Box<str>, Vec<Arc<[u8]>>>,
    /// What this process knows of each events partition, by partition.
    pub(crate) logs: Vec<PartitionLog>,
    /// Bytes held by the rows' `history` caches.
    cache_bytes: usize,
    /// Ids whose history is cached, oldest first (evicted first).
    cache_order: VecDeque<String>,
    /// Whether applied records go to the partitions' tails (from the
    /// moment the follower starts; not during start-up).
    keeps_tails: bool,
    model: std::marker::PhantomData<fn() -> A>,
}

impl<A: Aggregate> Table<A> {
    /// An empty table for an events topic of `partitions` partitions.
    pub(crate) fn new(partitions: u32) -> Self {
        Self {
            rows: Rows::default(),
            histories: HashMap::new(),
            logs: (0..partitions).map(|_| PartitionLog::default()).collect(),
            cache_bytes: 0,
            cache_order: VecDeque::new(),
            keeps_tails: false,
            model: std::marker::PhantomData,
        }
    }

    /// From now on every record applied goes to its partition's tail.
    pub(crate) fn keep_tails(&mut self) {
        self.keeps_tails = true;
    }

    /// The valid record of `id` at `at` (its value `value`) was applied:
    /// into the cached history of `id` (if it holds the whole history, then
    /// whole histories are evicted down to `budget`) and the partition's
    /// tail.
    pub(crate) fn applied_valid(&mut self, id: &str, at: Position, value: &[u8], budget: usize) {
        let cached = self.histories.contains_key(id);
        if !cached && !self.keeps_tails {
            return;
        }
        let value: Arc<[u8]> = Arc::from(value);
        if self.keeps_tails {
            let record = Some(Arc::new(KeptRecord { key: id.into(), value: Arc::clone(&value) }));
            self.push_tail(at, record);
        }
        if cached {
            self.cache(id, value, budget);
        }
    }

    /// The void record at `at` was applied: into the partition's tail.
    pub(crate) fn applied_void(&mut self, at: Position) {
        if self.keeps_tails {
            self.push_tail(at, None);
        }
    }

    fn push_tail(&mut self, at: Position, record: TailRecord) {
        let share = TAIL_BYTES / self.logs.len().max(1);
        if let Some(log) = self.logs.get_mut(at.partition as usize) {
            log.tail.push(at.offset, record, share);
        }
    }

    /// Adds one events record to the cached history of `id` (if it holds
    /// the whole history), then evicts whole histories down to `budget`.
    fn cache(&mut self, id: &str, value: Arc<[u8]>, budget: usize) {
        let Some(history) = self.histories.get_mut(id) else { return };
        if history.is_empty() {
            self.cache_order.push_back(id.to_owned());
        }
        let len = value.len();
        history.push(value);
        self.cache_bytes += len;
        while self.cache_bytes > budget {
            let Some(victim) = self.cache_order.pop_front() else { break };
            self.forget_history(&victim);
        }
    }

    /// The read cache no longer holds the history of `id` (and never will
    /// again).
    pub(crate) fn forget_history(&mut self, id: &str) {
        if let Some(dropped) = self.histories.remove(id) {
            self.cache_bytes -= dropped.iter().map(|v| v.len()).sum::<usize>();
        }
    }
}

/// One aggregate of the table, taken out of it to be changed (the table
/// holds its rows packed: see `rows`). The state is kept as its compact
/// JSON: a typed state with strings and sets takes several times the bytes
/// of its JSON; `load` and `append` deserialise it.
#[expect(
    clippy::box_collection,
    reason = "an absent collection takes 8 bytes of a row instead of 24 or 32; most rows have none"
)]
#[derive(Clone)]
pub(crate) struct TableRow {
    /// The state, serialised with `serde_json` (compact).
    pub(crate) state: Box<[u8]>,
    pub(crate) version: u64,
    pub(crate) first_offset: u64,
    pub(crate) last_offset: u64,
    /// Its events partition.
    pub(crate) partition: u32,
    /// The id of its last valid event: the next record must name it as
    /// its `previous_event_id` (`None` before the first record, or for a
    /// row read from a table record of an older version).
    pub(crate) last_event_id: Option<Uuid>,
    /// Size of its largest events record, saturated at `u32::MAX` (kept in
    /// table records; reads no longer size fetches by it).
    pub(crate) max_bytes: u32,
    pub(crate) offsets: Offsets,
    /// Its recent idempotency keys, oldest first; `None` when it has none.
    pub(crate) keys: Option<Box<VecDeque<KeyDoc>>>,
    /// How far each reaction's commands reached on it; `None` when no
    /// reaction's did.
    pub(crate) marks: Option<Box<Vec<MarkDoc>>>,
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

impl TableRow {
    /// A row for an aggregate whose first events record is at `at`, before
    /// that record is applied (version 0, the default state).
    pub(crate) fn new(at: Position) -> Self {
        Self {
            state: Box::default(),
            version: 0,
            first_offset: at.offset,
            last_offset: at.offset,
            partition: at.partition,
            last_event_id: None,
            max_bytes: 0,
            offsets: Offsets::First,
            keys: None,
            marks: None,
            deleted: false,
            table_writing: false,
            table_stale: false,
        }
    }

    /// Where the row's valid stream stands.
    pub(crate) fn tip(&self) -> StreamTip {
        StreamTip { version: self.version, last_event_id: self.last_event_id }
    }

    /// The state, typed (the default one for a row no record reached yet).
    #[cfg(test)]
    pub(crate) fn typed<A: Aggregate>(&self) -> Result<A, serde_json::Error> {
        if self.version == 0 { Ok(A::default()) } else { serde_json::from_slice(&self.state) }
    }

    /// Moves the row by one valid events record (`size` bytes of key and
    /// value, at `at`, its last event `last_event`) that brought it to
    /// `version` and `state`.
    pub(crate) fn advance(&mut self, state: Box<[u8]>, deleted: bool, version: u64, at: Position, size: u64) {
        if self.version > 0 {
            self.offsets.push(self.first_offset, at.offset);
        } else {
            self.first_offset = at.offset;
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
        let marks = doc.reaction_marks;
        Self {
            state,
            version: doc.version,
            first_offset: doc.first_offset,
            last_offset: doc.last_offset,
            partition: doc.events_partition,
            last_event_id: doc.last_event_id,
            max_bytes: u32::try_from(doc.max_record_bytes).unwrap_or(u32::MAX),
            offsets: Offsets::from_vec(doc.offsets, doc.first_offset),
            keys: (!keys.is_empty()).then(|| Box::new(keys)),
            marks: (!marks.is_empty()).then(|| Box::new(marks)),
            deleted,
            table_writing: false,
            table_stale: false,
        }
    }

    /// The recent idempotency key `key`, when the row remembers it.
    pub(crate) fn key(&self, key: &str) -> Option<&KeyDoc> {
        self.keys.as_deref().and_then(|keys| keys.iter().find(|k| k.key == key))
    }

    /// [`recall_in`] on this row.
    #[cfg(test)]
    pub(crate) fn recall(&self, key: &str) -> Option<(u64, u64)> {
        let marks = self.marks.as_deref().map_or(&[][..], Vec::as_slice);
        recall_in(self.keys.as_deref().into_iter().flatten(), marks, key)
    }

    /// Moves the mark of the reaction sequence of `key` (when it is a
    /// [`ReactionKey`]) to the command of the record at `offset` that
    /// brought the row to `version`, unless it is already further.
    pub(crate) fn mark(&mut self, key: &str, version: u64, offset: u64) {
        let Some(key) = ReactionKey::parse(key) else { return };
        let (source_offset, index) = key.order();
        let sequence = key.sequence();
        let marks = self.marks.get_or_insert_default();
        match marks.iter_mut().find(|m| m.sequence == sequence) {
            Some(m) if (m.source_offset, m.index) >= (source_offset, index) => {}
            Some(m) => *m = MarkDoc { sequence, source_offset, index, version, offset },
            None => marks.push(MarkDoc { sequence, source_offset, index, version, offset }),
        }
    }

    /// Keeps `mark` (from an earlier picture of the row) unless the row's
    /// own mark of its sequence is further.
    pub(crate) fn keep_mark(&mut self, mark: &MarkDoc) {
        let marks = self.marks.get_or_insert_default();
        match marks.iter_mut().find(|m| m.sequence == mark.sequence) {
            Some(m) if (m.source_offset, m.index) >= (mark.source_offset, mark.index) => {}
            Some(m) => *m = mark.clone(),
            None => marks.push(mark.clone()),
        }
    }

    /// Remembers idempotency key `key` of the record at `offset` that
    /// brought the row to `version`, recorded at `recorded_ms` (a key
    /// already remembered keeps its first answer). Keeps every key younger
    /// than `retention.window_ms` (a hot aggregate may see many commands
    /// between a client's first try and its retry through another
    /// instance) and at least the last `retention.at_least`, never more
    /// than `retention.at_most`. A reaction's key also moves its
    /// sequence's mark ([`TableRow::mark`]), which is kept for good.
    pub(crate) fn remember_key(
        &mut self,
        key: String,
        version: u64,
        offset: u64,
        recorded_ms: i64,
        retention: KeyRetention,
    ) {
        self.mark(&key, version, offset);
        if retention.at_most == 0 || self.key(&key).is_some() {
            return;
        }
        let keys = self.keys.get_or_insert_default();
        keys.push_back(KeyDoc { key, version, offset, recorded_ms });
        let newest = recorded_ms;
        while keys.len() > retention.at_most
            || (keys.len() > retention.at_least
                && keys.front().is_some_and(|k| newest.saturating_sub(k.recorded_ms) > retention.window_ms))
        {
            keys.pop_front();
        }
    }
}

/// The version and record offset the append with idempotency key `key`
/// answered, from a row's recent `keys` and reaction `marks`: from the
/// recent keys, or, for a reaction's command ([`ReactionKey`]), from its
/// sequence's mark when the command is at or before it (see [`MarkDoc`]).
pub(crate) fn recall_in<'k>(
    mut keys: impl Iterator<Item = &'k KeyDoc>,
    marks: &[MarkDoc],
    key: &str,
) -> Option<(u64, u64)> {
    if let Some(k) = keys.find(|k| k.key == key) {
        return Some((k.version, k.offset));
    }
    let key = ReactionKey::parse(key)?;
    let sequence = key.sequence();
    let mark = marks.iter().find(|m| m.sequence == sequence)?;
    (key.order() <= (mark.source_offset, mark.index)).then_some((mark.version, mark.offset))
}

/// How long a row remembers idempotency keys (see [`TableRow::remember_key`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyRetention {
    pub(crate) at_least: usize,
    pub(crate) at_most: usize,
    pub(crate) window_ms: i64,
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
/// table has applied it, which of those records a table record does not
/// reflect yet, and the appends of this process waiting for their verdict.
#[derive(Default)]
pub(crate) struct PartitionLog {
    /// Offset after the last events record the table applied (valid or
    /// void): records are applied in log order, one at a time.
    pub(crate) end: u64,
    /// Applied events records whose table record is not acknowledged yet
    /// (offset → aggregate id).
    pub(crate) unsaved: BTreeMap<u64, String>,
    /// Set when start-up rebuilt the table from the events topic (the table
    /// records were unreadable or of another state version): the first
    /// tenure then writes every row of the partition, not only those moved
    /// since the last claim, so that the next start finds records it trusts.
    pub(crate) rewrite_all: bool,
    /// The highest `reflected_below` an acknowledged table record claims.
    pub(crate) claimed: u64,
    /// The aggregate of the latest valid events record applied.
    pub(crate) last_id: Option<String>,
    /// The partition stopped at a record this process cannot apply (its
    /// events do not decode with this version's codec): nothing past it is
    /// applied and its aggregates answer `Unavailable` until a version
    /// that can read it starts.
    pub(crate) halted: Option<Halt>,
    /// Appends of this process waiting for the verdict on their record, by
    /// the id of the record's first event (the record is recognised by it
    /// wherever it landed, even when the broker did not say where).
    pub(crate) waiting: HashMap<Uuid, oneshot::Sender<Verdict>>,
    /// This process's acknowledged records that landed above `end`, by
    /// offset: each is applied as soon as everything below it is (by
    /// whichever append or follower step brings `end` to it), without
    /// waiting for the follower to read it back.
    pub(crate) delivered: BTreeMap<u64, OwnRecord>,
    /// This instance's tenure as the partition's table-record writer
    /// (`None`: another instance writes them; see `ownership`).
    pub(crate) tenure: Option<crate::ownership::Tenure>,
    /// The records applied last, for subscriptions at the head (see
    /// `tail`).
    pub(crate) tail: Tail,
}

/// One of this process's records, acknowledged, with the state it leads to
/// when it is valid (computed when its command was decided).
pub(crate) struct OwnRecord {
    pub(crate) doc: crate::record::EventsDoc,
    pub(crate) value: Vec<u8>,
    pub(crate) state: Box<[u8]>,
    pub(crate) deleted: bool,
}

/// Why and where a partition halted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Halt {
    pub(crate) offset: u64,
    pub(crate) reason: String,
}

/// What the log decided about an append's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// It continues its stream: the command is done, at this position.
    Valid(Position),
    /// Another record took its place first.
    Void,
}

impl PartitionLog {
    /// Every events record of this partition below the returned offset is
    /// reflected in an acknowledged table record.
    pub(crate) fn reflected_below(&self) -> u64 {
        let mut low = self.end;
        if let Some((o, _)) = self.unsaved.first_key_value() {
            low = low.min(*o);
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

    /// Hands the verdict on the record whose first event is `first_event`
    /// to the append waiting for it, if one is (`true` then).
    pub(crate) fn decide(&mut self, first_event: Uuid, verdict: Verdict) -> bool {
        match self.waiting.remove(&first_event) {
            Some(waiter) => {
                let _ = waiter.send(verdict);
                true
            }
            None => false,
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

    fn reaction_key(reaction: &str, partition: u32, offset: u64, index: u32) -> String {
        let position = Position::new(partition, offset);
        let (reaction, source, event_id) = (reaction.to_owned(), "project".to_owned(), Uuid::new_v4());
        ReactionKey { reaction, event_id, index, source, position }.to_string()
    }

    #[test]
    fn reaction_marks_recall_every_command_up_to_the_furthest_of_their_sequence() {
        let none = KeyRetention { at_least: 0, at_most: 0, window_ms: 0 };
        let mut row = TableRow::new(Position::new(1, 3));
        row.remember_key(reaction_key("r", 0, 5, 1), 2, 9, 0, none);
        assert!(row.keys.is_none(), "no recent keys kept, yet the mark is");
        // Everything up to (5, 1) of the sequence r/project/0 was appended.
        assert_eq!(row.recall(&reaction_key("r", 0, 5, 1)), Some((2, 9)));
        assert_eq!(row.recall(&reaction_key("r", 0, 5, 0)), Some((2, 9)));
        assert_eq!(row.recall(&reaction_key("r", 0, 3, 7)), Some((2, 9)));
        assert_eq!(row.recall(&reaction_key("r", 0, 5, 2)), None, "a later command of the sequence");
        assert_eq!(row.recall(&reaction_key("r", 0, 6, 0)), None);
        assert_eq!(row.recall(&reaction_key("r", 1, 1, 0)), None, "another source partition");
        assert_eq!(row.recall(&reaction_key("q", 0, 1, 0)), None, "another reaction");
        assert_eq!(row.recall("plain-key"), None);
        // A mark moves forward only.
        row.remember_key(reaction_key("r", 0, 8, 0), 3, 12, 0, none);
        row.remember_key(reaction_key("r", 0, 4, 0), 4, 13, 0, none);
        row.remember_key(reaction_key("q", 2, 1, 0), 5, 14, 0, none);
        assert_eq!(row.recall(&reaction_key("r", 0, 7, 9)), Some((3, 12)));
        assert_eq!(row.recall(&reaction_key("q", 2, 1, 0)), Some((5, 14)));
        // Kept across a rebuilt picture of the row, the furthest winning.
        let mut rebuilt = TableRow::new(Position::new(1, 3));
        rebuilt.remember_key(reaction_key("r", 0, 2, 0), 1, 4, 0, none);
        for m in row.marks.as_deref().into_iter().flatten() {
            rebuilt.keep_mark(m);
        }
        assert_eq!(rebuilt.recall(&reaction_key("r", 0, 8, 0)), Some((3, 12)));
        assert_eq!(rebuilt.recall(&reaction_key("q", 2, 1, 0)), Some((5, 14)));
    }

    #[test]
    fn reaction_marks_survive_a_table_record_and_older_records_have_none() {
        let old = serde_json::json!({
            "aggregate_type": "task", "aggregate_id": "t", "version": 2, "deleted": false, "state": {},
            "events_partition": 1, "first_offset": 3, "last_offset": 9, "updated_at": "2026-01-01T00:00:00Z"
        });
        let doc: TableDoc = serde_json::from_value(old).unwrap();
        assert!(doc.reaction_marks.is_empty());
        assert_eq!(doc.state_version, 1, "records of versions before state versions were built by version 1");
        let mark = MarkDoc { sequence: "r:project:0".into(), source_offset: 5, index: 1, version: 2, offset: 9 };
        let mut doc = doc;
        doc.reaction_marks.push(mark.clone());
        let text = serde_json::to_string(&doc).unwrap();
        let back: TableDoc = serde_json::from_str(&text).unwrap();
        let row = TableRow::from_table_doc(back, Box::default(), false);
        assert_eq!(row.marks.as_deref(), Some(&vec![mark]));
        assert_eq!(row.recall(&reaction_key("r", 0, 5, 0)), Some((2, 9)));
    }

    #[test]
    fn a_row_moves_record_by_record() {
        use kes_core::conformance::Ledger;
        let mut scratch = Vec::new();
        let mut row = TableRow::new(Position::new(2, 7));
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
        let one = KeyRetention { at_least: 1, at_most: 1, window_ms: 0 };
        keyed.remember_key("k".into(), 3, 11, 0, one);
        keyed.remember_key("k".into(), 3, 11, 0, one);
        assert_eq!(keyed.key("k").map(|k| (k.version, k.offset)), Some((3, 11)));
        keyed.remember_key("l".into(), 4, 12, 0, one);
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
    fn reflected_below_never_passes_unsaved_records() {
        let mut log = PartitionLog { end: 10, ..PartitionLog::default() };
        assert_eq!(log.reflected_below(), 10);
        log.unsaved.insert(5, "a".into());
        log.unsaved.insert(7, "b".into());
        assert_eq!(log.reflected_below(), 5);
        log.forget_saved("a", 6);
        assert_eq!(log.reflected_below(), 7);
        log.forget_saved("b", 7);
        assert_eq!(log.reflected_below(), 10);
    }

    #[test]
    fn idempotency_keys_are_kept_for_their_window_within_bounds() {
        let retention = KeyRetention { at_least: 2, at_most: 4, window_ms: 1_000 };
        let mut row = TableRow::new(Position::new(0, 0));
        for (i, at) in [0i64, 100, 200].into_iter().enumerate() {
            row.remember_key(format!("k{i}"), i as u64 + 1, i as u64, at, retention);
        }
        assert!(row.key("k0").is_some(), "young keys stay beyond the minimum");
        row.remember_key("k3".into(), 4, 3, 5_000, retention);
        let kept: Vec<_> = row.keys.as_deref().into_iter().flatten().map(|k| k.key.clone()).collect();
        assert_eq!(kept, ["k2", "k3"], "keys older than the window go, down to the minimum");
        for i in 4..10 {
            row.remember_key(format!("k{i}"), i + 1, i, 5_000, retention);
        }
        assert_eq!(row.keys.as_deref().map(|k| k.len()), Some(4), "never more than the maximum");
        assert!(row.key("k9").is_some());
    }
}
