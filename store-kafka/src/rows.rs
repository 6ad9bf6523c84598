//! The table's rows, packed. The table holds every aggregate of its type in
//! memory, so each row is one allocation of bytes: a few flags, its id, its
//! numbers as variable-length integers, its last event id, the list of its
//! records when it has more than one, and its state's JSON last. An index
//! of 4-byte slots finds a row by its id. A row of one record costs about
//! 30 bytes beside its id and state, and 24 bytes of slots, where a struct
//! per row in a map of boxed ids cost about 165.
//!
//! What most rows lack and some change on every command, their recent
//! idempotency keys and reaction marks, live beside the packed rows, by
//! slot: a command on a row with a thousand recent keys moves them, it does
//! not decode and encode them.
//!
//! [`RowView`] reads a row in place; [`Rows::take`] takes a row out as a
//! [`TableRow`] to be changed, and [`Rows::insert`] puts it back. The cached
//! history of a row is not part of it (see `Table::histories`).
//!
//! Layout of a packed row:
//!
//! ```text
//! flags      u8       DELETED, WRITING, STALE, EVENT_ID, EXTRAS, offsets kind (2 bits)
//! id         varint length, UTF-8 bytes
//! version, partition, first_offset, zigzag(last_offset - first_offset), max_bytes   varints
//! event id   16 bytes                         when EVENT_ID
//! offsets    varint count, count × u64 LE     when the kind is Many
//! state      the rest
//! ```

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;
use uuid::Uuid;

use crate::record::{KeyDoc, MarkDoc};
use crate::table::{Offsets, TableRow, recall_in};
use crate::validity::StreamTip;

const DELETED: u8 = 1;
const WRITING: u8 = 1 << 1;
const STALE: u8 = 1 << 2;
const EVENT_ID: u8 = 1 << 3;
/// The row has keys or marks in `Rows::extras`.
const EXTRAS: u8 = 1 << 4;
const OFFSETS_SHIFT: u8 = 6;
const OFFSETS_FIRST: u8 = 0;
const OFFSETS_UNKNOWN: u8 = 1;
const OFFSETS_MANY: u8 = 2;

/// Every row of a table, packed, found by id. Rows are never removed.
#[derive(Default)]
pub(crate) struct Rows {
    /// The packed rows, in the order they first came.
    packed: Vec<Box<[u8]>>,
    /// Indexes into `packed`, by the hash of the row's id.
    index: HashTable<u32>,
    /// The keys and marks of the rows that have any, by index.
    extras: HashMap<u32, Extras>,
    hasher: RandomState,
}

/// A row's recent idempotency keys (oldest first) and reaction marks.
#[derive(Debug, Default)]
pub(crate) struct Extras {
    keys: VecDeque<KeyDoc>,
    marks: Vec<MarkDoc>,
}

impl Rows {
    /// An empty table with room for `n` rows.
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self {
            packed: Vec::with_capacity(n),
            index: HashTable::with_capacity(n),
            extras: HashMap::new(),
            hasher: RandomState::new(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.packed.is_empty()
    }

    fn slot(&self, id: &str) -> Option<usize> {
        let hash = self.hasher.hash_one(id);
        self.index.find(hash, |&i| id_of(&self.packed[i as usize]) == id).map(|&i| i as usize)
    }

    fn view(&self, i: usize) -> RowView<'_> {
        let packed = &self.packed[i];
        let extras = if packed[0] & EXTRAS != 0 { self.extras.get(&(i as u32)) } else { None };
        RowView::parse(packed, extras)
    }

    /// The row of `id`, read in place.
    pub(crate) fn get(&self, id: &str) -> Option<RowView<'_>> {
        self.slot(id).map(|i| self.view(i))
    }

    /// The row of `id`, taken out to be changed and put back with
    /// [`Rows::insert`]: its keys and marks move out of the table meanwhile.
    pub(crate) fn take(&mut self, id: &str) -> Option<TableRow> {
        let i = self.slot(id)?;
        let mut row = RowView::parse(&self.packed[i], None).to_row();
        if let Some(extras) = self.extras.remove(&(i as u32)) {
            row.keys = (!extras.keys.is_empty()).then(|| Box::new(extras.keys));
            row.marks = (!extras.marks.is_empty()).then(|| Box::new(extras.marks));
        }
        Some(row)
    }

    /// Puts `row` as the row of `id`, in place of the one it had.
    ///
    /// # Panics
    /// When the table would hold more than `u32::MAX` rows.
    pub(crate) fn insert(&mut self, id: &str, mut row: TableRow) {
        let keys = row.keys.take().map(|k| *k).unwrap_or_default();
        let marks = row.marks.take().map(|m| *m).unwrap_or_default();
        let extras = (!keys.is_empty() || !marks.is_empty()).then_some(Extras { keys, marks });
        let packed = pack(id, &row, extras.is_some());
        let i = match self.slot(id) {
            Some(i) => {
                self.packed[i] = packed;
                i as u32
            }
            None => {
                let i = u32::try_from(self.packed.len()).expect("a table holds at most u32::MAX rows");
                self.packed.push(packed);
                let (packed, hasher) = (&self.packed, &self.hasher);
                self.index.insert_unique(hasher.hash_one(id), i, |&j| hasher.hash_one(id_of(&packed[j as usize])));
                i
            }
        };
        match extras {
            Some(extras) => self.extras.insert(i, extras),
            None => self.extras.remove(&i),
        };
    }

    /// Changes the table-record marks of the row of `id` in place; what `f`
    /// answers, or `None` when there is no such row.
    pub(crate) fn mark_writes<R>(&mut self, id: &str, f: impl FnOnce(&mut WriteMarks) -> R) -> Option<R> {
        let i = self.slot(id)?;
        let flags = &mut self.packed[i][0];
        let mut marks = WriteMarks { writing: *flags & WRITING != 0, stale: *flags & STALE != 0 };
        let answer = f(&mut marks);
        *flags = (*flags & !(WRITING | STALE))
            | if marks.writing { WRITING } else { 0 }
            | if marks.stale { STALE } else { 0 };
        Some(answer)
    }

    /// Every row, in the order they first came.
    pub(crate) fn iter(&self) -> impl Iterator<Item = RowView<'_>> {
        (0..self.packed.len()).map(|i| self.view(i))
    }

    pub(crate) fn clear(&mut self) {
        self.packed.clear();
        self.index.clear();
        self.extras.clear();
    }

    /// Gives back the room grown beyond the rows held (after a start-up
    /// load, which grows the table by doubling).
    pub(crate) fn shrink_to_fit(&mut self) {
        self.packed.shrink_to_fit();
        let (packed, hasher) = (&self.packed, &self.hasher);
        self.index.shrink_to_fit(|&j| hasher.hash_one(id_of(&packed[j as usize])));
        self.extras.shrink_to_fit();
    }
}

/// A row's table-record marks (see `table_writer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WriteMarks {
    /// A table record of the row is waiting or in flight.
    pub(crate) writing: bool,
    /// The row moved since that record was built.
    pub(crate) stale: bool,
}

/// A packed row, read in place.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowView<'a> {
    pub(crate) id: &'a str,
    pub(crate) version: u64,
    pub(crate) first_offset: u64,
    pub(crate) last_offset: u64,
    pub(crate) partition: u32,
    pub(crate) max_bytes: u32,
    pub(crate) last_event_id: Option<Uuid>,
    pub(crate) deleted: bool,
    pub(crate) table_writing: bool,
    pub(crate) table_stale: bool,
    /// The state's compact JSON (empty before the first record).
    pub(crate) state: &'a [u8],
    offsets_kind: u8,
    /// `count × u64 LE` when the kind is Many.
    offsets: &'a [u8],
    extras: Option<&'a Extras>,
}

impl<'a> RowView<'a> {
    fn parse(bytes: &'a [u8], extras: Option<&'a Extras>) -> Self {
        let flags = bytes[0];
        let mut r = Reader { bytes, at: 1 };
        let id = r.str();
        let version = r.varint();
        let partition = r.varint() as u32;
        let first_offset = r.varint();
        let last_offset = (first_offset as i64).wrapping_add(unzigzag(r.varint())) as u64;
        let max_bytes = r.varint() as u32;
        let last_event_id = (flags & EVENT_ID != 0).then(|| Uuid::from_bytes(r.array()));
        let offsets_kind = flags >> OFFSETS_SHIFT;
        let offsets = if offsets_kind == OFFSETS_MANY {
            let n = r.varint() as usize;
            r.take(n * 8)
        } else {
            &[]
        };
        Self {
            id,
            version,
            first_offset,
            last_offset,
            partition,
            max_bytes,
            last_event_id,
            deleted: flags & DELETED != 0,
            table_writing: flags & WRITING != 0,
            table_stale: flags & STALE != 0,
            state: &bytes[r.at..],
            offsets_kind,
            offsets,
            extras,
        }
    }

    /// Where the row's valid stream stands.
    pub(crate) fn tip(&self) -> StreamTip {
        StreamTip { version: self.version, last_event_id: self.last_event_id }
    }

    fn offset_at(&self, i: usize) -> u64 {
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.offsets[i * 8..i * 8 + 8]);
        u64::from_le_bytes(word)
    }

    /// The offsets of its records, as [`TableRow::offsets`] holds them.
    pub(crate) fn offsets(&self) -> Offsets {
        match self.offsets_kind {
            OFFSETS_FIRST => Offsets::First,
            OFFSETS_MANY => Offsets::Many((0..self.offsets.len() / 8).map(|i| self.offset_at(i)).collect()),
            _ => Offsets::Unknown,
        }
    }

    /// The offsets a table record lists (empty when unknown).
    pub(crate) fn offsets_vec(&self) -> Vec<u64> {
        self.offsets().to_vec(self.first_offset)
    }

    /// Whether the valid record at `offset` is one of this row's.
    /// A row from a table record that did not list its records can only
    /// tell by versions (records of one version are judged the same way by
    /// the follower, which never passes a void one).
    pub(crate) fn holds_record(&self, offset: u64, last_version: u64) -> bool {
        match self.offsets_kind {
            OFFSETS_FIRST => self.version > 0 && offset == self.first_offset,
            OFFSETS_MANY => {
                let (mut low, mut high) = (0, self.offsets.len() / 8);
                while low < high {
                    let mid = low + (high - low) / 2;
                    match self.offset_at(mid).cmp(&offset) {
                        std::cmp::Ordering::Equal => return true,
                        std::cmp::Ordering::Less => low = mid + 1,
                        std::cmp::Ordering::Greater => high = mid,
                    }
                }
                false
            }
            _ => last_version <= self.version && offset <= self.last_offset,
        }
    }

    /// Its recent idempotency keys, oldest first.
    pub(crate) fn keys(&self) -> &'a VecDeque<KeyDoc> {
        static NONE: VecDeque<KeyDoc> = VecDeque::new();
        self.extras.map_or(&NONE, |e| &e.keys)
    }

    /// Its reaction marks.
    pub(crate) fn marks(&self) -> &'a [MarkDoc] {
        self.extras.map_or(&[], |e| &e.marks)
    }

    /// [`recall_in`] on this row.
    pub(crate) fn recall(&self, key: &str) -> Option<(u64, u64)> {
        recall_in(self.keys().iter(), self.marks(), key)
    }

    /// The packed part of the row, copied out (no keys or marks: see
    /// [`Rows::take`]).
    fn to_row(self) -> TableRow {
        TableRow {
            state: Box::from(self.state),
            version: self.version,
            first_offset: self.first_offset,
            last_offset: self.last_offset,
            partition: self.partition,
            last_event_id: self.last_event_id,
            max_bytes: self.max_bytes,
            offsets: self.offsets(),
            keys: None,
            marks: None,
            deleted: self.deleted,
            table_writing: self.table_writing,
            table_stale: self.table_stale,
        }
    }
}

/// The id of a packed row.
fn id_of(packed: &[u8]) -> &str {
    Reader { bytes: packed, at: 1 }.str()
}

/// `row` of `id`, packed (its keys and marks are not: `extras` says
/// whether it has any beside).
fn pack(id: &str, row: &TableRow, extras: bool) -> Box<[u8]> {
    let (kind, many) = match &row.offsets {
        Offsets::First => (OFFSETS_FIRST, None),
        Offsets::Unknown => (OFFSETS_UNKNOWN, None),
        Offsets::Many(all) => (OFFSETS_MANY, Some(all)),
    };
    let flags = (kind << OFFSETS_SHIFT)
        | if row.deleted { DELETED } else { 0 }
        | if row.table_writing { WRITING } else { 0 }
        | if row.table_stale { STALE } else { 0 }
        | if row.last_event_id.is_some() { EVENT_ID } else { 0 }
        | if extras { EXTRAS } else { 0 };
    let mut out = Vec::with_capacity(48 + id.len() + row.state.len() + many.map_or(0, |m| 2 + m.len() * 8));
    out.push(flags);
    put_str(&mut out, id);
    put_varint(&mut out, row.version);
    put_varint(&mut out, u64::from(row.partition));
    put_varint(&mut out, row.first_offset);
    put_varint(&mut out, zigzag((row.last_offset as i64).wrapping_sub(row.first_offset as i64)));
    put_varint(&mut out, u64::from(row.max_bytes));
    if let Some(event) = row.last_event_id {
        out.extend_from_slice(event.as_bytes());
    }
    if let Some(all) = many {
        put_varint(&mut out, all.len() as u64);
        for offset in all {
            out.extend_from_slice(&offset.to_le_bytes());
        }
    }
    out.extend_from_slice(&row.state);
    out.into_boxed_slice()
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Reads what [`pack`] wrote. The bytes never leave this process and are
/// only ever written by `pack`.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let b = self.bytes[self.at];
            self.at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return v;
            }
            shift += 7;
        }
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let s = &self.bytes[self.at..self.at + n];
        self.at += n;
        s
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N));
        a
    }

    fn str(&mut self) -> &'a str {
        let n = self.varint() as usize;
        // `pack` wrote it from a `&str`.
        std::str::from_utf8(self.take(n)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kes_core::Position;

    fn row(version: u64, first: u64, last: u64) -> TableRow {
        let mut row = TableRow::new(Position::new(2, first));
        row.state = Box::from(&br#"{"name":"a"}"#[..]);
        row.version = version;
        row.last_offset = last;
        row
    }

    fn same(a: &TableRow, b: &TableRow) {
        assert_eq!(a.state, b.state);
        assert_eq!(
            (a.version, a.first_offset, a.last_offset, a.partition, a.max_bytes, a.last_event_id),
            (b.version, b.first_offset, b.last_offset, b.partition, b.max_bytes, b.last_event_id)
        );
        assert_eq!((&a.offsets, &a.keys, &a.marks), (&b.offsets, &b.keys, &b.marks));
        assert_eq!((a.deleted, a.table_writing, a.table_stale), (b.deleted, b.table_writing, b.table_stale));
    }

    #[test]
    fn every_part_of_a_row_survives_packing() {
        let mut rows = Rows::default();
        let plain = row(1, 7, 7);
        let mut full = row(u64::MAX, u64::MAX - 3, 5);
        full.partition = u32::MAX;
        full.max_bytes = u32::MAX;
        full.last_event_id = Some(Uuid::new_v4());
        full.offsets = Offsets::Many(vec![0, 9, u64::MAX]);
        full.keys = Some(Box::new(VecDeque::from([
            KeyDoc { key: "k1".into(), version: 3, offset: 9, recorded_ms: -5 },
            KeyDoc { key: "ключ".into(), version: 4, offset: 12, recorded_ms: i64::MAX },
        ])));
        full.marks = Some(Box::new(vec![MarkDoc {
            sequence: "r:project:0".into(),
            source_offset: 5,
            index: u32::MAX,
            version: 2,
            offset: 9,
        }]));
        full.deleted = true;
        full.table_writing = true;
        let mut unknown = row(3, 4, 1 << 40);
        unknown.offsets = Offsets::Unknown;
        unknown.state = Box::default();
        unknown.table_stale = true;
        for (id, r) in [("p-1", &plain), ("", &full), ("u", &unknown)] {
            rows.insert(id, r.clone());
        }
        assert_eq!(rows.iter().count(), 3);
        for (id, r) in [("p-1", &plain), ("", &full), ("u", &unknown)] {
            let view = rows.get(id).unwrap();
            assert_eq!(view.id, id);
            assert_eq!(view.keys(), &r.keys.as_deref().cloned().unwrap_or_default());
            assert_eq!(view.marks(), r.marks.as_deref().map_or(&[][..], Vec::as_slice));
            assert_eq!(view.offsets_vec(), r.offsets.to_vec(r.first_offset));
            let taken = rows.take(id).unwrap();
            same(&taken, r);
            rows.insert(id, taken);
        }
        assert!(rows.get("p-2").is_none());
        // A row put again replaces the one it had, keys and marks included.
        rows.insert("p-1", full.clone());
        same(&rows.take("p-1").unwrap(), &full);
        rows.insert("p-1", plain.clone());
        assert!(rows.get("p-1").unwrap().keys().is_empty() && rows.get("p-1").unwrap().marks().is_empty());
        same(&rows.take("p-1").unwrap(), &plain);
        assert_eq!(rows.iter().count(), 3);
        let ids: Vec<&str> = rows.iter().map(|v| v.id).collect();
        assert_eq!(ids, ["p-1", "", "u"]);
    }

    #[test]
    fn a_row_knows_its_own_records() {
        let mut row = TableRow::new(Position::new(0, 4));
        let mut rows = Rows::default();
        rows.insert("a", row.clone());
        assert!(!rows.get("a").unwrap().holds_record(4, 1), "no record applied yet");
        let mut mine = Vec::new();
        for (version, offset) in [(1, 4), (2, 9), (5, 12)] {
            row.advance(Box::from(&b"{}"[..]), false, version, Position::new(0, offset), 10);
            rows.insert("a", row.clone());
            mine.push(offset);
            let view = rows.get("a").unwrap();
            for probe in 0..15 {
                assert_eq!(view.holds_record(probe, version), mine.contains(&probe), "{probe} at {version}");
            }
        }
        // A row from a table record that did not list its records: by
        // versions and its last offset.
        let mut unknown = row;
        unknown.offsets = Offsets::Unknown;
        rows.insert("a", unknown);
        let view = rows.get("a").unwrap();
        assert!(view.holds_record(3, 5) && view.holds_record(12, 4));
        assert!(!view.holds_record(13, 5) && !view.holds_record(3, 6));
    }

    #[test]
    fn a_packed_row_recalls_its_keys() {
        let mut row = row(5, 4, 12);
        let mut rows = Rows::default();
        let retention = crate::table::KeyRetention { at_least: 1, at_most: 2, window_ms: 0 };
        row.remember_key("k".into(), 5, 12, 0, retention);
        rows.insert("a", row.clone());
        let view = rows.get("a").unwrap();
        assert_eq!(view.recall("k"), Some((5, 12)));
        assert_eq!(view.recall("other"), None);
        assert_eq!(view.recall("k"), row.recall("k"));
        // Taken out, changed and put back, the keys move with the row.
        let mut taken = rows.take("a").unwrap();
        assert_eq!(rows.get("a").unwrap().recall("k"), None, "out of the table while taken");
        taken.remember_key("l".into(), 6, 13, 0, retention);
        rows.insert("a", taken);
        let view = rows.get("a").unwrap();
        assert_eq!((view.recall("k"), view.recall("l")), (Some((5, 12)), Some((6, 13))));
    }

    #[test]
    fn write_marks_change_in_place() {
        let mut rows = Rows::default();
        rows.insert("a", row(1, 1, 1));
        let before = rows.get("a").unwrap().to_row();
        let was = rows.mark_writes("a", |m| {
            let was = *m;
            m.writing = true;
            m.stale = true;
            was
        });
        assert_eq!(was, Some(WriteMarks { writing: false, stale: false }));
        let view = rows.get("a").unwrap();
        assert!(view.table_writing && view.table_stale);
        let mut after = view.to_row();
        (after.table_writing, after.table_stale) = (false, false);
        same(&after, &before);
        assert_eq!(rows.mark_writes("b", |_| ()), None);
    }

    #[test]
    fn many_rows_are_found_after_growing_and_shrinking() {
        let mut rows = Rows::default();
        for i in 0..5_000u64 {
            rows.insert(&format!("id-{i}"), row(i + 1, i, i));
        }
        rows.shrink_to_fit();
        for i in (0..5_000u64).step_by(7) {
            let view = rows.get(&format!("id-{i}")).unwrap();
            assert_eq!((view.version, view.first_offset), (i + 1, i));
        }
        rows.clear();
        assert!(rows.is_empty() && rows.get("id-1").is_none());
    }

    #[test]
    fn a_row_of_one_record_costs_little_beside_its_id_and_state() {
        let mut r = row(1, 123_456, 123_456);
        r.last_event_id = Some(Uuid::new_v4());
        r.max_bytes = 400;
        let packed = pack("t1234", &r, false);
        let overhead = packed.len() - "t1234".len() - r.state.len();
        assert!(overhead <= 30, "{overhead} bytes");
    }

    #[test]
    fn varints_and_zigzag_round_trip() {
        for v in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(Reader { bytes: &out, at: 0 }.varint(), v);
        }
        for v in [0, 1, -1, i64::MIN, i64::MAX] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }
}
