//! The validity rule: which events records count. Kafka has no
//! conditional append, so several writers may each append a record for the
//! same version of an aggregate. The log arbitrates: every reader
//! (recovery, the follower, `read`, `subscribe`) judges each record by
//! this one rule, from the record's envelope only, against the valid
//! records of its aggregate before it in the partition, so that all
//! readers keep the same records and agree on every stream.
//!
//! A record is **valid** when it continues its stream exactly where the
//! valid records before it left it: its first version is the stream's
//! version plus one, and the event it names as its `previous_event_id` is
//! the stream's last valid event. Otherwise it is **void**: it lost a race
//! (another record took that version first) or was decided on a record
//! that lost one. A record that names no previous event was written by an
//! older version of KES, which had one writer per partition: it is judged
//! by version alone.
//!
//! A record whose first version is *past* the next one is neither: the
//! reader's picture of the stream is incomplete (a table record older than
//! it claimed), and the reader must rebuild the stream from the log before
//! judging (a gap is never a verdict).

use uuid::Uuid;

/// Where an aggregate's valid stream stands before a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct StreamTip {
    /// Its version (0: no valid record yet).
    pub(crate) version: u64,
    /// The id of its last valid event, when known (`None` before its first
    /// record, and for streams read from table records of older versions).
    pub(crate) last_event_id: Option<Uuid>,
}

/// What the rule says about one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Judgement {
    /// It continues its stream.
    Valid,
    /// It does not count; why, for the log line.
    Void(&'static str),
    /// The reader's picture of the stream lacks versions before it.
    Gap,
}

/// Judges a record whose events start at `first_version`, decided on the
/// stream whose last event is `previous_event_id`, against `tip`.
pub(crate) fn judge(tip: StreamTip, first_version: u64, previous_event_id: Option<Uuid>) -> Judgement {
    if first_version <= tip.version {
        return Judgement::Void("its version was taken by an earlier record");
    }
    if first_version > tip.version + 1 {
        return Judgement::Gap;
    }
    match (tip.version, tip.last_event_id, previous_event_id) {
        // A stream's first record follows nothing.
        (0, _, None) => Judgement::Valid,
        (0, _, Some(_)) => Judgement::Void("it was decided on a record that is not in the valid stream"),
        (_, Some(last), Some(previous)) if last != previous => {
            Judgement::Void("it was decided on a record that is not in the valid stream")
        }
        // Same previous event, or one side from an older version of KES.
        _ => Judgement::Valid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tip(version: u64, last: Option<u128>) -> StreamTip {
        StreamTip { version, last_event_id: last.map(Uuid::from_u128) }
    }

    #[test]
    fn a_record_counts_only_where_the_valid_stream_left_off() {
        let a = Some(Uuid::from_u128(1));
        let b = Some(Uuid::from_u128(2));
        assert_eq!(judge(tip(0, None), 1, None), Judgement::Valid, "a stream's first record");
        assert!(matches!(judge(tip(0, None), 1, a), Judgement::Void(_)), "a first record naming a previous one");
        assert_eq!(judge(tip(4, Some(1)), 5, a), Judgement::Valid, "continues the last valid event");
        assert!(matches!(judge(tip(4, Some(1)), 5, b), Judgement::Void(_)), "decided on a losing record");
        assert!(matches!(judge(tip(5, Some(1)), 5, a), Judgement::Void(_)), "lost the race for version 5");
        assert!(matches!(judge(tip(5, Some(1)), 3, a), Judgement::Void(_)), "an old version again");
        assert_eq!(judge(tip(4, Some(1)), 7, a), Judgement::Gap, "versions missing: never a verdict");
        assert_eq!(judge(tip(0, None), 2, None), Judgement::Gap);
    }

    #[test]
    fn records_and_rows_of_older_versions_are_judged_by_version() {
        let a = Some(Uuid::from_u128(1));
        assert_eq!(judge(tip(4, Some(1)), 5, None), Judgement::Valid, "a record without previous_event_id");
        assert_eq!(judge(tip(4, None), 5, a), Judgement::Valid, "a row without last_event_id");
        assert!(matches!(judge(tip(4, None), 4, a), Judgement::Void(_)));
    }
}
