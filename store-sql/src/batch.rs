//! Group commit: how the appends of one batch are decided, in request
//! order, from one read of the database made inside the batch's
//! transaction.
//!
//! Each request is decided as if it ran alone after the ones before it in
//! the batch: its retry key is looked up in the log and among the batch's
//! earlier appends, its expected version is checked against the stream's
//! version in the database moved on by the batch's earlier appends to the
//! same id, and its state is built on the state those left. Positions are
//! handed out consecutively in request order. Nothing here touches the
//! database; `store.rs` runs the statements.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use kes_core::{Aggregate, Appended, ExpectedVersion, Position, StoreError};
use kes_sql::DbRow;
use serde_json::Value;
use uuid::Uuid;

use crate::cache::StateCache;

/// One append waiting for, or in, a batch: everything needed to write it,
/// encoded before it was queued.
pub(crate) struct Request<A: Aggregate> {
    pub(crate) id: String,
    pub(crate) expected: ExpectedVersion,
    pub(crate) events: Vec<A::Event>,
    pub(crate) encoded: Vec<EncodedRow>,
    pub(crate) metadata: Value,
    pub(crate) key: Option<String>,
    pub(crate) recorded_at: DateTime<Utc>,
}

/// One event of a request as it is inserted.
pub(crate) struct EncodedRow {
    pub(crate) event_id: Uuid,
    pub(crate) event_type: &'static str,
    pub(crate) revision: u32,
    pub(crate) payload: String,
}

/// One row of the batch's prepare query (see `sql::append_prepare`), in
/// the order of its columns.
#[derive(Debug, Clone, Default)]
pub(crate) struct PrepareRow {
    /// The index of the request the row answers.
    pub(crate) n: i64,
    /// The stream's version (0: no stream).
    pub(crate) stream_version: i64,
    /// The log's next position.
    pub(crate) next_position: i64,
    /// The version an earlier append with the request's retry key ended at.
    pub(crate) key_version: Option<i64>,
    /// The log position of that append.
    pub(crate) key_position: Option<i64>,
    /// The version of the aggregate's table row.
    pub(crate) table_version: Option<i64>,
    /// The state of the aggregate's table row (JSON text).
    pub(crate) table_state: Option<String>,
}

impl PrepareRow {
    pub(crate) fn read(row: &DbRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            n: row.get(0)?,
            stream_version: row.get(1)?,
            next_position: row.get(2)?,
            key_version: row.get(3)?,
            key_position: row.get(4)?,
            table_version: row.get(5)?,
            table_state: row.get(6)?,
        })
    }
}

/// What the database said about one request.
struct Prepared {
    stream_version: u64,
    recalled: Option<Appended>,
    table: Option<(u64, String)>,
}

/// An event row to insert: event `index` of request `request`.
pub(crate) struct EventRow {
    pub(crate) request: usize,
    pub(crate) index: usize,
    pub(crate) position: u64,
    pub(crate) version: u64,
    /// The version of the last event of the same request.
    pub(crate) end: u64,
}

/// A table row to write: the state an aggregate ends the batch with.
pub(crate) struct StateRow<'a> {
    pub(crate) id: &'a str,
    pub(crate) version: u64,
    pub(crate) state: &'a Value,
    pub(crate) updated_at: DateTime<Utc>,
}

/// What the batch did to one aggregate.
pub(crate) struct Settled<'a, A> {
    pub(crate) id: &'a str,
    /// The version and state after the batch's appends, if it had any.
    pub(crate) appended: Option<(u64, A)>,
    /// A request on it found the stream elsewhere than expected.
    pub(crate) conflicted: bool,
}

/// The state an aggregate's appends build on.
enum Base<A> {
    /// Not looked for yet (no request on the id was admitted so far).
    Unresolved,
    Known(A),
    /// The replay of its log failed; every admitted request on it fails so.
    Broken(StoreError),
}

struct Stream<'a, A> {
    id: &'a str,
    version: u64,
    base: Base<A>,
    /// Retry keys appended by this batch, with their answers.
    keys: HashMap<&'a str, Appended>,
    /// The table row after the batch's last append to the stream.
    written: Option<(Value, DateTime<Utc>)>,
    conflicted: bool,
}

/// Decides the requests of one batch in order.
pub(crate) struct Decider<'a, A: Aggregate> {
    requests: &'a [Request<A>],
    prepared: Vec<Prepared>,
    next_position: u64,
    streams: Vec<Stream<'a, A>>,
    by_id: HashMap<&'a str, usize>,
    outcomes: Vec<Option<Result<Appended, StoreError>>>,
    /// The next request to decide.
    cursor: usize,
    rows: Vec<EventRow>,
}

fn from_db(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl<'a, A: Aggregate> Decider<'a, A> {
    /// Starts deciding `requests` from the rows of their prepare query; a
    /// read that does not match the requests is an error.
    pub(crate) fn new(requests: &'a [Request<A>], rows: Vec<PrepareRow>) -> Result<Self, StoreError> {
        if rows.len() != requests.len() {
            return Err(StoreError::Backend(format!(
                "{}: the batch read returned {} rows for {} appends",
                A::NAME,
                rows.len(),
                requests.len()
            )));
        }
        let mut next_position = 0;
        let mut prepared = Vec::with_capacity(rows.len());
        for (index, row) in rows.into_iter().enumerate() {
            let PrepareRow {
                n,
                stream_version: stream,
                next_position: next,
                key_version,
                key_position,
                table_version,
                table_state,
            } = row;
            if usize::try_from(n).ok() != Some(index) {
                return Err(StoreError::Backend(format!("{}: the batch read returned its rows out of order", A::NAME)));
            }
            next_position = from_db(next);
            prepared.push(Prepared {
                stream_version: from_db(stream),
                recalled: key_version.zip(key_position).map(|(version, position)| Appended {
                    version: from_db(version),
                    position: Position::new(0, from_db(position)),
                    deduplicated: true,
                }),
                table: table_version.map(from_db).zip(table_state),
            });
        }
        Ok(Self {
            requests,
            prepared,
            next_position,
            streams: Vec::new(),
            by_id: HashMap::new(),
            outcomes: (0..requests.len()).map(|_| None).collect(),
            cursor: 0,
            rows: Vec::new(),
        })
    }

    /// Decides the requests not decided yet, in order, until one of them
    /// needs the state of an aggregate that only a replay of its log can
    /// give: then returns that id (answer with [`Self::replayed`] and call
    /// again). `None` once every request is decided.
    // Kept in one piece: One resumable loop over the batch's cursor: every early return is a point where the
    // caller must replay a log and call again, which a split would hide.
    pub(crate) fn run(&mut self, cache: &StateCache<A>) -> Option<&'a str> {
        while self.cursor < self.requests.len() {
            let i = self.cursor;
            let request = &self.requests[i];
            let id = request.id.as_str();
            let prepared = &self.prepared[i];
            let s = *self.by_id.entry(id).or_insert_with(|| {
                self.streams.push(Stream {
                    id,
                    version: prepared.stream_version,
                    base: Base::Unresolved,
                    keys: HashMap::new(),
                    written: None,
                    conflicted: false,
                });
                self.streams.len() - 1
            });
            let stream = &mut self.streams[s];
            if let Some(key) = request.key.as_deref() {
                let first = stream.keys.get(key).map(|first| Appended { deduplicated: true, ..*first });
                if let Some(first) = first.or(prepared.recalled) {
                    self.outcomes[i] = Some(Ok(first));
                    self.cursor += 1;
                    continue;
                }
            }
            if !request.expected.admits(stream.version) {
                stream.conflicted = true;
                self.outcomes[i] = Some(Err(StoreError::Conflict {
                    aggregate: A::NAME.to_owned(),
                    id: id.to_owned(),
                    expected: request.expected,
                    actual: stream.version,
                }));
                self.cursor += 1;
                continue;
            }
            if matches!(stream.base, Base::Unresolved) {
                // Nothing of this batch was appended to the stream yet, so
                // its version is the database's.
                let version = stream.version;
                let from_table = || {
                    prepared
                        .table
                        .as_ref()
                        .filter(|(v, _)| *v == version)
                        .and_then(|(_, json)| serde_json::from_str::<A>(json).ok())
                };
                match cache.at(id, version).or_else(from_table) {
                    Some(state) => stream.base = Base::Known(state),
                    None if version == 0 => stream.base = Base::Known(A::default()),
                    // The table row is missing, stale or of an older
                    // shape: the log decides.
                    None => return Some(id),
                }
            }
            let outcome = match &stream.base {
                Base::Unresolved => Err(StoreError::Backend(format!("{} {id}: state not resolved", A::NAME))),
                Base::Broken(e) => Err(e.clone()),
                Base::Known(state) => {
                    let mut next = state.clone();
                    for event in &request.events {
                        next.apply(event);
                    }
                    match serde_json::to_value(&next) {
                        Err(e) => Err(StoreError::Backend(format!("{} {id}: state not serialisable: {e}", A::NAME))),
                        Ok(json) => {
                            let count = request.events.len() as u64;
                            let end = stream.version + count;
                            for index in 0..request.events.len() {
                                self.rows.push(EventRow {
                                    request: i,
                                    index,
                                    position: self.next_position + index as u64,
                                    version: stream.version + 1 + index as u64,
                                    end,
                                });
                            }
                            self.next_position += count;
                            let appended = Appended {
                                version: end,
                                position: Position::new(0, self.next_position - 1),
                                deduplicated: false,
                            };
                            if let Some(key) = request.key.as_deref() {
                                stream.keys.insert(key, appended);
                            }
                            stream.version = end;
                            stream.base = Base::Known(next);
                            stream.written = Some((json, request.recorded_at));
                            Ok(appended)
                        }
                    }
                }
            };
            self.outcomes[i] = Some(outcome);
            self.cursor += 1;
        }
        None
    }

    /// The state of `id` rebuilt from its log (or why it could not be).
    pub(crate) fn replayed(&mut self, id: &str, state: Result<A, StoreError>) {
        if let Some(&s) = self.by_id.get(id) {
            self.streams[s].base = match state {
                Ok(state) => Base::Known(state),
                Err(e) => Base::Broken(e),
            };
        }
    }

    /// The events to insert, in position order.
    pub(crate) fn event_rows(&self) -> &[EventRow] {
        &self.rows
    }

    /// The table rows to write: one per aggregate the batch appended to.
    pub(crate) fn state_rows(&self) -> Vec<StateRow<'_>> {
        self.streams
            .iter()
            .filter_map(|s| {
                s.written.as_ref().map(|(state, updated_at)| StateRow {
                    id: s.id,
                    version: s.version,
                    state,
                    updated_at: *updated_at,
                })
            })
            .collect()
    }

    /// The answer of every request, in request order, and what the batch
    /// did to each aggregate.
    pub(crate) fn finish(self) -> (Vec<Result<Appended, StoreError>>, Vec<Settled<'a, A>>) {
        let outcomes = self
            .outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(StoreError::Backend(format!("{}: an append was not decided", A::NAME)))))
            .collect();
        let settled = self
            .streams
            .into_iter()
            .map(|s| Settled {
                id: s.id,
                appended: match (s.written, s.base) {
                    (Some(_), Base::Known(state)) => Some((s.version, state)),
                    _ => None,
                },
                conflicted: s.conflicted,
            })
            .collect();
        (outcomes, settled)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kes_core::conformance::{Ledger, LedgerEvent};

    use super::*;

    fn request(id: &str, expected: ExpectedVersion, events: Vec<LedgerEvent>, key: Option<&str>) -> Request<Ledger> {
        Request {
            id: id.into(),
            expected,
            encoded: events
                .iter()
                .map(|_| EncodedRow { event_id: Uuid::now_v7(), event_type: "x", revision: 1, payload: "{}".into() })
                .collect(),
            events,
            metadata: Value::Null,
            key: key.map(str::to_owned),
            recorded_at: Utc::now(),
        }
    }

    fn add(amount: i64) -> Vec<LedgerEvent> {
        vec![LedgerEvent::Added { amount }]
    }

    fn no_cache() -> StateCache<Ledger> {
        StateCache::new(0, Duration::ZERO)
    }

    /// Rows as the database would answer for streams that do not exist
    /// yet, the log's next position being 7.
    fn empty_rows(n: usize) -> Vec<PrepareRow> {
        (0..n).map(|i| prepared(i as i64, 0, 7)).collect()
    }

    fn prepared(n: i64, stream_version: i64, next_position: i64) -> PrepareRow {
        PrepareRow { n, stream_version, next_position, ..PrepareRow::default() }
    }

    #[test]
    fn appends_to_one_stream_build_on_each_other_in_order() {
        let requests = vec![
            request("a", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], None),
            request("b", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], None),
            request("a", ExpectedVersion::Exact(1), vec![LedgerEvent::Added { amount: 2 }; 2], Some("k")),
            request("a", ExpectedVersion::Exact(1), add(9), None),
            request("a", ExpectedVersion::Exact(1), add(9), Some("k")),
            request("a", ExpectedVersion::Exact(3), add(4), None),
        ];
        let mut decider = Decider::new(&requests, empty_rows(requests.len())).expect("rows");
        assert!(decider.run(&no_cache()).is_none());
        let positions: Vec<(usize, u64, u64)> =
            decider.event_rows().iter().map(|r| (r.request, r.position, r.version)).collect();
        assert_eq!(positions, vec![(0, 7, 1), (1, 8, 1), (2, 9, 2), (2, 10, 3), (5, 11, 4)]);
        let states = decider.state_rows();
        assert_eq!(states.iter().map(|s| (s.id, s.version)).collect::<Vec<_>>(), vec![("a", 4), ("b", 1)]);
        let (outcomes, settled) = decider.finish();
        let first = Appended { version: 3, position: Position::new(0, 10), deduplicated: false };
        assert_eq!(outcomes[2], Ok(first));
        assert!(matches!(outcomes[3], Err(StoreError::Conflict { actual: 3, .. })));
        assert_eq!(outcomes[4], Ok(Appended { deduplicated: true, ..first }), "the retry repeats the first answer");
        assert_eq!(outcomes[5].as_ref().map(|a| a.version), Ok(4));
        let a = settled.iter().find(|s| s.id == "a").expect("a settled");
        assert!(a.conflicted);
        let (version, state) = a.appended.as_ref().expect("a appended");
        assert_eq!((*version, state.total, state.entries), (4, 8, 3));
    }

    #[test]
    fn a_stale_table_row_asks_for_a_replay() {
        let requests = vec![request("a", ExpectedVersion::Any, add(1), None)];
        let rows = vec![PrepareRow {
            table_version: Some(1),
            table_state: Some(r#"{"open":true,"closed":false,"total":0,"entries":0}"#.into()),
            ..prepared(0, 2, 5)
        }];
        let mut decider = Decider::new(&requests, rows).expect("rows");
        assert_eq!(decider.run(&no_cache()), Some("a"));
        decider.replayed("a", Ok(Ledger { open: true, closed: false, total: 10, entries: 1 }));
        assert!(decider.run(&no_cache()).is_none());
        let (outcomes, settled) = decider.finish();
        assert_eq!(outcomes[0].as_ref().map(|a| (a.version, a.position.offset)), Ok((3, 5)));
        assert_eq!(settled[0].appended.as_ref().map(|(_, s)| s.total), Some(11));
    }

    #[test]
    fn a_cached_state_at_the_current_version_spares_the_replay() {
        let cache = StateCache::new(10, Duration::ZERO);
        cache.put("a", 2, Ledger { open: true, closed: false, total: 3, entries: 1 }, std::time::Instant::now());
        let requests = vec![request("a", ExpectedVersion::Exact(2), add(1), None)];
        let mut decider = Decider::new(&requests, vec![prepared(0, 2, 5)]).expect("rows");
        assert!(decider.run(&cache).is_none());
        let (_, settled) = decider.finish();
        assert_eq!(settled[0].appended.as_ref().map(|(v, s)| (*v, s.total)), Some((3, 4)));
    }

    #[test]
    fn a_failed_replay_fails_the_requests_on_that_stream_only() {
        let requests = vec![
            request("a", ExpectedVersion::Any, add(1), None),
            request("b", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], None),
            request("a", ExpectedVersion::Any, add(1), None),
        ];
        let rows = vec![prepared(0, 2, 5), prepared(1, 0, 5), prepared(2, 2, 5)];
        let mut decider = Decider::new(&requests, rows).expect("rows");
        assert_eq!(decider.run(&no_cache()), Some("a"));
        let broken = StoreError::Corrupt { aggregate: "ledger".into(), id: "a".into(), version: 1, reason: "x".into() };
        decider.replayed("a", Err(broken.clone()));
        assert!(decider.run(&no_cache()).is_none());
        assert_eq!(decider.event_rows().len(), 1);
        let (outcomes, _) = decider.finish();
        assert_eq!(outcomes[0], Err(broken.clone()));
        assert_eq!(outcomes[1].as_ref().map(|a| a.position.offset), Ok(5));
        assert_eq!(outcomes[2], Err(broken));
    }

    #[test]
    fn rows_that_do_not_match_the_requests_are_refused() {
        let requests = vec![request("a", ExpectedVersion::Any, add(1), None)];
        assert!(Decider::new(&requests, Vec::new()).is_err());
        assert!(Decider::new(&requests, vec![prepared(3, 0, 0)]).is_err());
    }
}
