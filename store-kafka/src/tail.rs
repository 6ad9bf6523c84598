//! The tail of each events partition in memory: the records the table
//! applied last, with their verdicts, kept so that subscriptions at the
//! head of the log take them from here instead of fetching every record
//! from the broker once more.
//!
//! Every record a subscription delivers has to be judged by the follower
//! first (see `reads`), so a subscription that reads the topic itself
//! fetches what the follower fetched already: with a projection runner, a
//! reaction and a change feed on one topic, the broker served each record
//! four times. Subscriptions now fetch only what lies below the tail (a
//! projection catching up, a rebuild), and the follower's fetch is the
//! only one at the head.
//!
//! The tail of a partition holds contiguous offsets `base..base + len`,
//! pushed by whichever step moves the partition's applied end (the
//! follower, or an append's fast path) and bounded in records and bytes
//! (the oldest go first). A push that does not continue it (records
//! applied without a push, at start-up) starts it again at the pushed
//! offset, so what it holds is always exactly the applied records it
//! claims to hold.

use std::collections::VecDeque;
use std::sync::Arc;

use kes_core::Position;

/// Most records one partition's tail holds.
pub(crate) const TAIL_RECORDS: usize = 4096;

/// Most bytes of record values all partitions' tails of one store hold
/// together (each partition holds its share).
pub(crate) const TAIL_BYTES: usize = 8 << 20;

/// One applied record of the tail: the values of a valid one, nothing of a
/// void one (a subscription only passes its position).
pub(crate) type TailRecord = Option<Arc<KeptRecord>>;

/// A valid record's key and value, as read from the log.
#[derive(Debug)]
pub(crate) struct KeptRecord {
    pub(crate) key: Box<str>,
    pub(crate) value: Arc<[u8]>,
}

/// The last applied records of one events partition.
#[derive(Default)]
pub(crate) struct Tail {
    /// Offset of the first record held.
    base: u64,
    records: VecDeque<TailRecord>,
    /// Bytes of the values held.
    bytes: usize,
}

/// Where an offset stands against a tail.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Standing {
    /// Held: this many records from the offset on were copied out.
    Taken(usize),
    /// Below what the tail holds: read it from the broker.
    Below,
    /// Past what the tail holds: not applied yet, or applied without a
    /// push (the caller tells the two apart by the partition's end).
    Past,
}

impl Tail {
    /// Adds the record applied at `offset`; the tail starts again there
    /// when it does not continue what it holds. Keeps at most
    /// `max_bytes` of values (and always the newest record).
    pub(crate) fn push(&mut self, offset: u64, record: TailRecord, max_bytes: usize) {
        if offset != self.base + self.records.len() as u64 {
            self.records.clear();
            self.bytes = 0;
            self.base = offset;
        }
        self.bytes += record.as_ref().map_or(0, |r| r.value.len());
        self.records.push_back(record);
        while self.records.len() > TAIL_RECORDS || (self.bytes > max_bytes && self.records.len() > 1) {
            if let Some(Some(dropped)) = self.records.pop_front() {
                self.bytes -= dropped.value.len();
            }
            self.base += 1;
        }
    }

    /// Copies up to `max` records from `offset` on into `out`, each with
    /// its position (this tail's partition is `partition`).
    pub(crate) fn take_from(
        &self,
        partition: u32,
        offset: u64,
        max: usize,
        out: &mut VecDeque<(Position, TailRecord)>,
    ) -> Standing {
        if offset < self.base {
            return Standing::Below;
        }
        let Ok(skip) = usize::try_from(offset - self.base) else { return Standing::Past };
        if skip >= self.records.len() {
            return Standing::Past;
        }
        let taken = self.records.range(skip..).take(max);
        let n = taken.len();
        out.extend(taken.enumerate().map(|(i, r)| (Position::new(partition, offset + i as u64), r.clone())));
        Standing::Taken(n)
    }

    /// Bytes of the values held.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(key: &str, value: &[u8]) -> TailRecord {
        Some(Arc::new(KeptRecord { key: key.into(), value: Arc::from(value) }))
    }

    fn offsets(out: &VecDeque<(Position, TailRecord)>) -> Vec<u64> {
        out.iter().map(|(at, _)| at.offset).collect()
    }

    #[test]
    fn a_tail_hands_out_contiguous_records_and_says_where_an_offset_stands() {
        let mut tail = Tail::default();
        let mut out = VecDeque::new();
        assert_eq!(tail.take_from(7, 0, 10, &mut out), Standing::Past, "empty: nothing is held");
        tail.push(5, valid("a", b"one"), usize::MAX);
        tail.push(6, None, usize::MAX);
        tail.push(7, valid("b", b"three"), usize::MAX);
        assert_eq!(tail.take_from(7, 4, 10, &mut out), Standing::Below);
        assert_eq!(tail.take_from(7, 8, 10, &mut out), Standing::Past);
        assert_eq!(tail.take_from(7, 6, 10, &mut out), Standing::Taken(2));
        assert_eq!(offsets(&out), [6, 7]);
        assert!(out[0].1.is_none(), "a void record has no values");
        assert_eq!(out[1].1.as_ref().map(|r| &*r.key), Some("b"));
        out.clear();
        assert_eq!(tail.take_from(7, 5, 1, &mut out), Standing::Taken(1), "at most `max`");
        assert_eq!(offsets(&out), [5]);
        assert_eq!(tail.bytes(), 8);
    }

    #[test]
    fn a_push_that_does_not_continue_the_tail_starts_it_again() {
        let mut tail = Tail::default();
        tail.push(3, valid("a", b"xx"), usize::MAX);
        tail.push(4, valid("a", b"yy"), usize::MAX);
        // Offsets 5..9 were applied without a push.
        tail.push(9, valid("b", b"z"), usize::MAX);
        let mut out = VecDeque::new();
        assert_eq!(tail.take_from(7, 4, 10, &mut out), Standing::Below, "what it held before the break is gone");
        assert_eq!(tail.take_from(7, 9, 10, &mut out), Standing::Taken(1));
        assert_eq!(tail.bytes(), 1);
    }

    #[test]
    fn a_tail_keeps_its_bounds_and_always_the_newest_record() {
        let mut tail = Tail::default();
        for o in 0..(TAIL_RECORDS as u64 + 10) {
            tail.push(o, None, usize::MAX);
        }
        let mut out = VecDeque::new();
        assert_eq!(tail.take_from(7, 9, 1, &mut out), Standing::Below);
        assert_eq!(tail.take_from(7, 10, 1, &mut out), Standing::Taken(1), "exactly TAIL_RECORDS kept");

        let mut tail = Tail::default();
        tail.push(0, valid("a", &[0; 6]), 10);
        tail.push(1, valid("a", &[0; 6]), 10);
        assert_eq!(tail.bytes(), 6, "the older value went");
        assert_eq!(tail.take_from(7, 0, 1, &mut out), Standing::Below);
        tail.push(2, valid("a", &[0; 20]), 10);
        assert_eq!(tail.bytes(), 20, "a record larger than the bound is still kept, alone");
        out.clear();
        assert_eq!(tail.take_from(7, 2, 5, &mut out), Standing::Taken(1));
    }
}
