//! Appending one command's events: decided on the table's state of the
//! stream, sent as one events record that names the event it was decided
//! on, and answered only once the log's validity rule says the record
//! counts. The verdict is immediate when every record below it is applied
//! already (the fast path: one writer per partition at a time); otherwise
//! the follower delivers it when it reaches the record. A void record (another
//! writer's record took the version first) is a `Conflict`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kes_core::encode_all;
use kes_core::{Aggregate, Appended, ExpectedVersion, Metadata, Position, StoreError};
use rdkafka::producer::FutureRecord;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::error::KafkaStoreError;
use crate::follower::Applied;
use crate::record::{EventsDoc, OutgoingEvent};
use crate::store::Inner;
use crate::table::{OwnRecord, Verdict, encode_state, typed_state};

/// Where a stream stands when a command arrives.
enum StreamBefore<A> {
    /// The command's idempotency key was used before: its first answer.
    Recalled(Appended),
    /// The stream's version, state and last event.
    At(u64, A, Option<Uuid>),
}

/// One command's events record, ready to send, and the row it leads to.
struct PreparedRecord {
    doc: EventsDoc,
    /// `doc` serialised: the record's value.
    value: Vec<u8>,
    /// The state after the command, as the table keeps it.
    state: Box<[u8]>,
    /// [`Aggregate::is_deleted`] of that state.
    deleted: bool,
}

impl<A: Aggregate> Inner<A> {
    /// [`EventStore::append`](kes_core::EventStore::append): one command's
    /// events as one record, answered once the log says it is valid.
    pub(crate) async fn append(
        self: &Arc<Self>,
        id: &str,
        expected: ExpectedVersion,
        events: Vec<A::Event>,
        metadata: Metadata,
    ) -> Result<Appended, StoreError> {
        // Encoded before the stream's turn: nothing of it needs the lock.
        let encoded = encode_all(&*self.codec, &events)?;
        let p = self.partition_checked(id)?;
        let _turn = self.id_locks.lock(id).await;
        self.partition_ready(p)?;
        let (actual, state, last_event) = match self.stream_before(id, p, metadata.idempotency_key.as_deref())? {
            StreamBefore::Recalled(first) => return Ok(first),
            StreamBefore::At(actual, state, last_event) => (actual, state, last_event),
        };
        if !expected.admits(actual) {
            return Err(StoreError::Conflict { aggregate: A::NAME.into(), id: id.into(), expected, actual });
        }
        let prepared = self.prepare_record(id, actual, last_event, state, &events, encoded, metadata)?;
        let first_event = prepared.doc.first_event_id().ok_or_else(|| StoreError::Invalid("no events".into()))?;
        let (verdict_tx, verdict) = oneshot::channel();
        self.table().logs[p as usize].waiting.insert(first_event, verdict_tx);
        let offset = match self.send_events_record(p, id, &prepared).await {
            Ok(offset) => offset,
            Err(e) => {
                // The record may still land; the follower judges it then,
                // and a retry with the same idempotency key finds it.
                self.table().logs[p as usize].waiting.remove(&first_event);
                return Err(e);
            }
        };
        let version = prepared.doc.last_version;
        match self.verdict(p, first_event, offset, prepared, verdict).await? {
            Verdict::Valid(position) => Ok(Appended { version, position, deduplicated: false }),
            Verdict::Void => {
                self.counters.lost_races.fetch_add(1, Ordering::Relaxed);
                let actual = self.table().rows.get(id).map_or(0, |r| r.version);
                Err(StoreError::Conflict { aggregate: A::NAME.into(), id: id.into(), expected, actual })
            }
        }
    }

    /// The verdict on this append's record, acknowledged at `offset`
    /// (`None`: the broker did not say where). Taken from the follower when
    /// it got there first; decided here when every record below the
    /// record is applied (the fast path); otherwise awaited.
    async fn verdict(
        self: &Arc<Self>,
        p: u32,
        first_event: Uuid,
        offset: Option<u64>,
        prepared: PreparedRecord,
        mut verdict: oneshot::Receiver<Verdict>,
    ) -> Result<Verdict, StoreError> {
        {
            let mut table = self.table();
            if let Ok(v) = verdict.try_recv() {
                return Ok(v);
            }
            if let Some(offset) = offset {
                let PreparedRecord { doc, value, state, deleted } = prepared;
                let log = &mut table.logs[p as usize];
                if log.end < offset && log.halted.is_none() {
                    // Records below it are not applied yet: it is applied
                    // once they are, by whichever step gets there.
                    log.delivered.insert(offset, OwnRecord { doc, value, state, deleted });
                } else {
                    let at = Position::new(p, offset);
                    if self.apply_own(&mut table, &doc, at, state, deleted, &value) == Some(Applied::Valid) {
                        self.save_row(&mut table, &doc.aggregate_id);
                    }
                    self.apply_delivered(&mut table, p);
                    drop(table);
                    self.progress.send_modify(|n| *n += 1);
                    if let Ok(v) = verdict.try_recv() {
                        return Ok(v);
                    }
                }
            }
        }
        let bound = self.config.request_timeout * 2;
        match tokio::time::timeout(bound, &mut verdict).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => {
                self.partition_ready(p)?;
                Err(StoreError::Unavailable("append: the record's partition stopped before its verdict".into()))
            }
            Err(_) => {
                self.table().logs[p as usize].waiting.remove(&first_event);
                Err(StoreError::Unavailable(format!(
                    "append: the record was acknowledged, but the follower did not reach it within {bound:?}; \
                     a retry with the same idempotency key answers once it does"
                )))
            }
        }
    }

    /// The stream's version, typed state and last event from the table, or
    /// the first answer to idempotency key `key` when the stream remembers
    /// it.
    fn stream_before(&self, id: &str, p: u32, key: Option<&str>) -> Result<StreamBefore<A>, StoreError> {
        let (actual, state, last_event) = {
            let table = self.table();
            let row = table.rows.get(id);
            let first = key.zip(row).and_then(|(key, row)| row.recall(key));
            if let Some((version, offset)) = first {
                let first = Appended { version, position: Position::new(p, offset), deduplicated: true };
                return Ok(StreamBefore::Recalled(first));
            }
            // The bytes are copied out and typed after the table is unlocked.
            (
                row.map_or(0, |r| r.version),
                row.filter(|r| r.version > 0).map(|r| r.state.to_vec()),
                row.and_then(|r| r.last_event_id),
            )
        };
        let state = match state {
            Some(bytes) => typed_state::<A>(id, &bytes)?,
            None => A::default(),
        };
        Ok(StreamBefore::At(actual, state, last_event))
    }

    /// The events record of a command on stream `id` at version `actual`
    /// (last event `last_event`), and the state its `events` (`encoded`)
    /// lead `state` to.
    #[expect(clippy::too_many_arguments, reason = "one command's parts, put together into one record")]
    fn prepare_record(
        &self,
        id: &str,
        actual: u64,
        last_event: Option<Uuid>,
        mut state: A,
        events: &[A::Event],
        encoded: Vec<kes_core::EncodedEvent>,
        metadata: Metadata,
    ) -> Result<PreparedRecord, StoreError> {
        let outgoing = encoded
            .into_iter()
            .map(|e| OutgoingEvent { event_type: e.event_type.to_owned(), revision: e.revision, payload: e.payload })
            .collect();
        let previous = if actual == 0 { None } else { last_event };
        let doc = EventsDoc::new(A::NAME, id, actual + 1, previous, self.codec.content_type(), outgoing, metadata)
            .map_err(StoreError::Invalid)?;
        let value = serde_json::to_vec(&doc).map_err(|e| StoreError::Invalid(e.to_string()))?;
        for e in events {
            state.apply(e);
        }
        let (state, deleted) = encode_state(&state, &mut Vec::new())
            .map_err(|e| StoreError::Invalid(format!("the new state cannot be serialised as JSON: {e}")))?;
        Ok(PreparedRecord { doc, value, state, deleted })
    }

    /// Sends the events record to partition `p` and waits for the broker's
    /// acknowledgement: where it landed, or `None` when the broker stored
    /// it without saying where (Tansu answers a resent batch it already
    /// stored with DUPLICATE_SEQUENCE_NUMBER, which librdkafka reports as a
    /// delivery at offset -1; the follower then finds the record by its
    /// first event id).
    async fn send_events_record(&self, p: u32, id: &str, prepared: &PreparedRecord) -> Result<Option<u64>, StoreError> {
        let producer = self.producer();
        let record = FutureRecord::to(&self.events_topic)
            .key(id)
            .payload(&prepared.value)
            .partition(p as i32)
            .timestamp(prepared.doc.recorded_at.timestamp_millis())
            .headers(prepared.doc.headers());
        let timeout = self.config.request_timeout;
        let sent = tokio::time::timeout(timeout * 2 + Duration::from_secs(1), producer.send(record, timeout)).await;
        match sent {
            Ok(Ok(delivery)) => {
                if delivery.offset < 0 {
                    tracing::info!(topic = %self.events_topic, partition = p, aggregate_id = id,
                        "acknowledged without an offset (a resent batch); the follower locates it");
                }
                Ok(u64::try_from(delivery.offset).ok())
            }
            failed => {
                let error: StoreError = match failed {
                    Ok(Err((e, _))) => KafkaStoreError::from_kafka("append", &e).into(),
                    _ => StoreError::Unavailable(format!("append: no acknowledgement within {:?}", timeout * 2)),
                };
                self.heal_producer(&producer, error.is_transient());
                Err(error)
            }
        }
    }
}
