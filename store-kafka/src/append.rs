//! Appending one command's events: checked against the in-memory table,
//! sent as one events record, and applied to the table once the broker
//! acknowledged it. A send whose outcome is unknown marks its partition
//! uncertain, so the next operation on it reads the partition again.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kes_core::codec::encode_all;
use kes_core::{Aggregate, Appended, ExpectedVersion, Metadata, Position, StoreError};
use rdkafka::Message;
use rdkafka::producer::FutureRecord;

use crate::error::KafkaStoreError;
use crate::record::{EventsDoc, OutgoingEvent};
use crate::store::Inner;
use crate::table::{Row, encode_state, typed_state};

/// Where a stream stands when a command arrives.
enum StreamBefore<A> {
    /// The command's idempotency key was used before: its first answer.
    Recalled(Appended),
    /// The stream's version and state.
    At(u64, A),
}

/// An events record the broker acknowledged.
struct SentRecord {
    /// Its send's id, still in its partition's `in_flight` (removed when
    /// the record is applied, in the same turn of the table lock).
    send_id: u64,
    /// Where it landed.
    position: Position,
}

/// One command's events record, ready to send, and the row it leads to.
struct PreparedRecord {
    /// The stream's version before the command.
    actual: u64,
    doc: EventsDoc,
    /// `doc` serialised: the record's value.
    value: Vec<u8>,
    /// The command's idempotency key.
    key: Option<String>,
    /// The state after the command, as the table keeps it.
    state: Box<[u8]>,
    /// [`Aggregate::is_deleted`] of that state.
    deleted: bool,
}

impl<A: Aggregate> Inner<A> {
    /// [`EventStore::append`](kes_core::EventStore::append): one command's
    /// events as one record, answered once the broker acknowledged it.
    pub(crate) async fn append(
        self: &Arc<Self>,
        id: &str,
        expected: ExpectedVersion,
        events: Vec<A::Event>,
        metadata: Metadata,
    ) -> Result<Appended, StoreError> {
        if events.is_empty() {
            return Err(StoreError::Invalid("an append needs at least one event".into()));
        }
        let p = self.partition_checked(id)?;
        let _turn = self.id_locks.lock(id).await;
        self.resync_if_uncertain(p).await?;
        let (actual, state) = match self.stream_before(id, p, metadata.idempotency_key.as_deref())? {
            StreamBefore::Recalled(first) => return Ok(first),
            StreamBefore::At(actual, state) => (actual, state),
        };
        if !expected.admits(actual) {
            return Err(StoreError::Conflict { aggregate: A::NAME.into(), id: id.into(), expected, actual });
        }
        let prepared = self.prepare_record(id, actual, state, &events, metadata)?;
        let sent = self.send_events_record(p, id, &prepared).await?;
        let (version, position) = (prepared.doc.last_version, sent.position);
        self.record_acknowledged(p, id, prepared, sent);
        Ok(Appended { version, position, deduplicated: false })
    }

    /// The stream's version and typed state from the table, or the first
    /// answer to idempotency key `key` when the stream remembers it.
    fn stream_before(&self, id: &str, p: u32, key: Option<&str>) -> Result<StreamBefore<A>, StoreError> {
        let (actual, state) = {
            let table = self.table();
            let row = table.rows.get(id);
            let first = key.zip(row).and_then(|(key, row)| row.key(key));
            if let Some(k) = first {
                let first = Appended { version: k.version, position: Position::new(p, k.offset), deduplicated: true };
                return Ok(StreamBefore::Recalled(first));
            }
            // The bytes are copied out and typed after the table is unlocked.
            (row.map_or(0, |r| r.version), row.filter(|r| r.version > 0).map(|r| r.state.clone()))
        };
        let state = match state {
            Some(bytes) => typed_state::<A>(id, &bytes)?,
            None => A::default(),
        };
        Ok(StreamBefore::At(actual, state))
    }

    /// The events record of a command on stream `id` at version `actual`,
    /// and the state its `events` lead `state` to.
    fn prepare_record(
        &self,
        id: &str,
        actual: u64,
        mut state: A,
        events: &[A::Event],
        metadata: Metadata,
    ) -> Result<PreparedRecord, StoreError> {
        let encoded = encode_all(&*self.codec, events)?;
        let outgoing = encoded
            .into_iter()
            .map(|e| OutgoingEvent { event_type: e.event_type.to_owned(), revision: e.revision, payload: e.payload })
            .collect();
        let key = metadata.idempotency_key.clone();
        let doc = EventsDoc::new(A::NAME, id, actual + 1, self.codec.content_type(), outgoing, metadata)
            .map_err(StoreError::Invalid)?;
        let value = serde_json::to_vec(&doc).map_err(|e| StoreError::Invalid(e.to_string()))?;
        for e in events {
            state.apply(e);
        }
        let (state, deleted) = encode_state(&state, &mut Vec::new())
            .map_err(|e| StoreError::Invalid(format!("the new state cannot be serialised as JSON: {e}")))?;
        Ok(PreparedRecord { actual, doc, value, key, state, deleted })
    }

    /// Sends the events record to partition `p` and waits for the broker's
    /// acknowledgement. While it is in flight, the partition's catch-up
    /// mark stays below it; when the outcome is unknown, the partition is
    /// marked uncertain from there.
    async fn send_events_record(&self, p: u32, id: &str, prepared: &PreparedRecord) -> Result<SentRecord, StoreError> {
        let send_id = self.next_send_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut table = self.table();
            let log = &mut table.logs[p as usize];
            let floor = log.end;
            log.in_flight.insert(send_id, floor);
        }
        let producer = self.producer();
        let record = FutureRecord::to(&self.events_topic)
            .key(id)
            .payload(&prepared.value)
            .partition(p as i32)
            .timestamp(prepared.doc.recorded_at.timestamp_millis())
            .headers(prepared.doc.headers());
        let timeout = self.config.request_timeout;
        let sent = tokio::time::timeout(timeout * 2 + Duration::from_secs(1), producer.send(record, timeout)).await;
        let delivery = match sent {
            Ok(Ok(delivery)) => delivery,
            failed => {
                let mut table = self.table();
                let log = &mut table.logs[p as usize];
                let floor = log.in_flight.remove(&send_id).unwrap_or(log.end);
                log.uncertain_from = Some(log.uncertain_from.map_or(floor, |u| u.min(floor)));
                drop(table);
                let error: StoreError = match failed {
                    Ok(Err((e, _))) => KafkaStoreError::from_kafka("append", &e).into(),
                    _ => StoreError::Unavailable(format!("append: no acknowledgement within {:?}", timeout * 2)),
                };
                self.heal_producer(&producer, error.is_transient());
                return Err(error);
            }
        };
        let position = match u64::try_from(delivery.offset) {
            Ok(offset) => Position::new(u32::try_from(delivery.partition).unwrap_or(p), offset),
            // Delivered without an offset: the broker had stored a resent
            // batch already (Tansu answers DUPLICATE_SEQUENCE_NUMBER, which
            // librdkafka reports as a delivery at -1). The record is in the
            // log; find where by its first event id.
            Err(_) => match self.locate_delivered(p, id, send_id, prepared).await {
                Ok(Some(position)) => position,
                located => {
                    let mut table = self.table();
                    let log = &mut table.logs[p as usize];
                    let floor = log.in_flight.remove(&send_id).unwrap_or(log.end);
                    log.uncertain_from = Some(log.uncertain_from.map_or(floor, |u| u.min(floor)));
                    drop(table);
                    let why = match located {
                        Err(e) => e.to_string(),
                        _ => "the record is not between its send's floor and the high watermark".to_owned(),
                    };
                    return Err(StoreError::Unavailable(format!(
                        "append: the broker acknowledged the record without its offset and it could not be found ({why})"
                    )));
                }
            },
        };
        Ok(SentRecord { send_id, position })
    }

    /// Where an acknowledged record whose offset the broker did not say
    /// landed: read from the offset the partition had when it was sent
    /// (nothing of this send lies below it) to the high watermark, looking
    /// for the record of `id` whose first event is `prepared`'s. Never
    /// guessed: `None` when it is not there.
    async fn locate_delivered(
        &self,
        p: u32,
        id: &str,
        send_id: u64,
        prepared: &PreparedRecord,
    ) -> Result<Option<Position>, KafkaStoreError> {
        let Some(first_event) = prepared.doc.events.first().map(|e| e.event_id) else { return Ok(None) };
        let floor = {
            let table = self.table();
            let log = &table.logs[p as usize];
            log.in_flight.get(&send_id).copied().unwrap_or(0)
        };
        let high = self.high_watermarks(&self.events_topic, self.partitions).await?;
        let high = high.get(p as usize).copied().unwrap_or(0);
        let topic = self.events_topic.clone();
        let mut found = None;
        self.scan(&topic, &[(p, floor, high)], |m| {
            if found.is_some() || m.key() != Some(id.as_bytes()) {
                return Ok(());
            }
            let Ok(offset) = u64::try_from(m.offset()) else { return Ok(()) };
            let at = Position::new(p, offset);
            // Another record of the stream that does not decode is not ours.
            if let Ok(doc) = EventsDoc::decode(&topic, at, m.key(), m.payload())
                && doc.events.first().map(|e| e.event_id) == Some(first_event)
            {
                found = Some(at);
            }
            Ok(())
        })
        .await?;
        if let Some(at) = found {
            tracing::info!(topic = %topic, position = %at, aggregate_id = id,
                "acknowledged without an offset (a resent batch); found in the log");
        }
        Ok(found)
    }

    /// Applies an acknowledged events record to the table and schedules its
    /// table record. Ending the send and applying the record happen under
    /// one lock of the table, so that the partition's catch-up mark never
    /// passes the record before a table record reflects it.
    fn record_acknowledged(self: &Arc<Self>, p: u32, id: &str, prepared: PreparedRecord, sent: SentRecord) {
        let PreparedRecord { actual, doc, value, key, state, deleted } = prepared;
        let position = sent.position;
        let mut table = self.table();
        let log = &mut table.logs[p as usize];
        log.in_flight.remove(&sent.send_id);
        if position.offset + 1 >= log.end {
            log.end = position.offset + 1;
            log.last_id = Some(id.to_owned());
        }
        log.unsaved.insert(position.offset, id.to_owned());
        let capacity = self.config.idempotency_keys_per_aggregate;
        let row = table.rows.entry(id.into()).or_insert_with(|| Box::new(Row::new(position)));
        // A resynchronisation may have read this very record already.
        if row.version == actual {
            row.advance(state, deleted, doc.last_version, position, (id.len() + value.len()) as u64);
            if let Some(key) = key {
                row.remember_key(key, doc.last_version, position.offset, capacity);
            }
            table.cache(id, &value, self.config.read_cache_bytes);
        }
        self.save_row(&mut table, id);
    }
}
