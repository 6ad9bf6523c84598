//! What KES writes to its two topics, and how it reads it back.
//!
//! Both topics carry plain JSON documents so that any Kafka client (a
//! console consumer, a Python script, Kafka Connect) can read them without
//! KES. The shapes below are a contract with those readers and with the
//! future: fields may be added, none may change meaning.
//!
//! ## Events topic: one record per command
//!
//! Key: the aggregate id (UTF-8). Value:
//!
//! ```json
//! {
//!   "format": "kes.events.v1",
//!   "aggregate_type": "project",
//!   "aggregate_id": "p-1",
//!   "first_version": 3,
//!   "last_version": 4,
//!   "previous_event_id": "0190…",
//!   "recorded_at": "2026-01-01T12:00:00Z",
//!   "metadata": { "correlation_id": "req-9", "idempotency_key": "k-1" },
//!   "events": [
//!     { "event_id": "0190…", "version": 3, "event_type": "Renamed", "revision": 1,
//!       "content_type": "application/json", "payload": { "name": "x" } },
//!     { "event_id": "0190…", "version": 4, "event_type": "Closed", "revision": 1,
//!       "content_type": "application/json", "payload": null }
//!   ]
//! }
//! ```
//!
//! A codec whose content type is not JSON stores `payload_base64` instead of
//! `payload`. One header, `kes`, repeats what a router needs without parsing
//! the value: `v=3-4;t=Renamed,Closed;c=req-9` (the version range, the event
//! types, and the correlation id when there is one, always last). The
//! aggregate type is the topic's; the value is always JSON.
//!
//! ## Table topic: latest state per aggregate
//!
//! Key: the aggregate id. Value (never a null tombstone; a deleted
//! aggregate says `"deleted": true`):
//!
//! ```json
//! {
//!   "format": "kes.table.v1", "aggregate_type": "project", "aggregate_id": "p-1",
//!   "version": 4, "deleted": false, "state": { "name": "x" },
//!   "events_partition": 0, "first_offset": 3, "last_offset": 17, "offsets": [3, 9, 17],
//!   "max_record_bytes": 512, "reflected_below": 15,
//!   "last_event_id": "0190…",
//!   "idempotency_keys": [{ "key": "k-1", "version": 2, "offset": 9, "recorded_ms": 1767268800000 }],
//!   "reaction_marks": [{ "sequence": "project_tasks:project:0", "source_offset": 41, "index": 0,
//!                        "version": 2, "offset": 9 }],
//!   "updated_at": "2026-01-01T12:00:00Z"
//! }
//! ```
//!
//! `reflected_below`: every events record of `events_partition` below it
//! had its table record acknowledged before this one was written (where the
//! catch-up at start begins; see the crate docs).
//!
//! `previous_event_id` (events) and `last_event_id` (table) carry the
//! validity rule: a record counts only if it names the stream's last valid
//! event. `epoch` (table) is the writer's tenure over the partition.
//!
//! ## Table topic: epoch markers
//!
//! Each tenure of an instance over an events partition starts with a marker
//! in the table topic (header `kes.marker: epoch`), keyed `\0kes.epoch/{partition}/{epoch}`
//! (a NUL byte first, which no aggregate id contains), so compaction never
//! removes it:
//!
//! ```json
//! { "format": "kes.epoch.v1", "events_partition": 0, "epoch": 3,
//!   "owner": "5f0c…", "claimed_at": "2026-01-01T12:00:00Z" }
//! ```

use std::collections::VecDeque;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use kes_core::{Envelope, Metadata, Position, RawEnvelope};
use rdkafka::message::{Header, OwnedHeaders};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::error::KafkaStoreError;

/// The `format` of events records written by this version.
pub(crate) const EVENTS_FORMAT: &str = "kes.events.v1";
/// The `format` of table records written by this version.
pub(crate) const TABLE_FORMAT: &str = "kes.table.v1";
const JSON: &str = "application/json";

/// The key of the one header of an events record (see `EventsDoc::headers`).
pub const EVENTS_HEADER: &str = "kes";

/// The value of one events record: all events of one command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct EventsDoc {
    #[serde(default)]
    pub format: Option<String>,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub first_version: u64,
    pub last_version: u64,
    /// The id of the last event of the valid stream this record was decided
    /// on (`None` for a stream's first record, and in records of older
    /// versions). Part of the validity rule (see the crate docs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_event_id: Option<Uuid>,
    pub recorded_at: DateTime<Utc>,
    #[serde(default)]
    pub metadata: Metadata,
    pub events: Vec<EventDoc>,
}

/// One event inside an [`EventsDoc`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct EventDoc {
    pub event_id: Uuid,
    pub version: u64,
    pub event_type: String,
    pub revision: u32,
    pub content_type: String,
    /// `Some(Value::Null)` when the payload is JSON `null`; `None` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
    pub payload: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
}

impl EventDoc {
    /// The payload as its codec encoded it.
    pub fn payload_bytes(&self) -> Result<Vec<u8>, String> {
        match (&self.payload, &self.payload_base64) {
            (Some(value), _) => serde_json::to_vec(value).map_err(|err| err.to_string()),
            (None, Some(b64)) => {
                base64::engine::general_purpose::STANDARD.decode(b64.as_bytes()).map_err(|err| err.to_string())
            }
            (None, None) => Err("the event has no payload".to_owned()),
        }
    }
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// One encoded event on its way into an [`EventsDoc`].
pub(crate) struct OutgoingEvent {
    pub event_type: String,
    pub revision: u32,
    pub payload: Vec<u8>,
}

impl EventsDoc {
    /// The document for one command whose events start at `first_version`,
    /// decided on the stream whose last event is `previous_event_id`.
    pub fn new(
        aggregate_type: &str,
        aggregate_id: &str,
        first_version: u64,
        previous_event_id: Option<Uuid>,
        content_type: &str,
        events: Vec<OutgoingEvent>,
        metadata: Metadata,
    ) -> Result<Self, String> {
        let n = events.len() as u64;
        let events = events
            .into_iter()
            .zip(first_version..)
            .map(|(e, version)| {
                let (payload, payload_base64) = if content_type == JSON {
                    let value: Value = serde_json::from_slice(&e.payload).map_err(|err| {
                        format!("{} payload is not the JSON its codec announces: {err}", e.event_type)
                    })?;
                    (Some(value), None)
                } else {
                    (None, Some(base64::engine::general_purpose::STANDARD.encode(&e.payload)))
                };
                Ok(EventDoc {
                    event_id: Uuid::now_v7(),
                    version,
                    event_type: e.event_type,
                    revision: e.revision,
                    content_type: content_type.to_owned(),
                    payload,
                    payload_base64,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self {
            format: Some(EVENTS_FORMAT.to_owned()),
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            first_version,
            last_version: first_version + n - 1,
            previous_event_id,
            recorded_at: Utc::now(),
            metadata,
            events,
        })
    }

    /// The one header that travels with the record, `kes`: what a router
    /// needs without parsing the value, as
    /// `v=FIRST-LAST;t=TYPE,TYPE…` and, when the command had one,
    /// `;c=CORRELATION` (last, so that it may hold any character). One
    /// short header, because some brokers (Tansu 0.6.0) store each header
    /// as a row of its own and pay for every one on every record they
    /// write and serve. The retry key stays in the value's metadata.
    pub fn headers(&self) -> OwnedHeaders {
        let mut value = String::with_capacity(64);
        value.push_str("v=");
        value.push_str(&self.first_version.to_string());
        value.push('-');
        value.push_str(&self.last_version.to_string());
        value.push_str(";t=");
        for (i, event) in self.events.iter().enumerate() {
            if i > 0 {
                value.push(',');
            }
            value.push_str(&event.event_type);
        }
        if let Some(c) = &self.metadata.correlation_id {
            value.push_str(";c=");
            value.push_str(c);
        }
        OwnedHeaders::new_with_capacity(1).insert(Header { key: EVENTS_HEADER, value: Some(&value) })
    }

    /// Reads a record's key and value, checking everything a reader relies
    /// on: the key matches the document, versions are contiguous, payloads
    /// are present.
    pub fn decode(
        topic: &str,
        at: Position,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<Self, KafkaStoreError> {
        let key = key.map(|k| String::from_utf8_lossy(k).into_owned());
        let corrupt = |id: Option<String>, version: u64, reason: String| KafkaStoreError::Corrupt {
            topic: topic.to_owned(),
            position: at,
            aggregate_id: id,
            version,
            reason,
        };
        let value = value.ok_or_else(|| corrupt(key.clone(), 0, "the record has no value".into()))?;
        let doc: EventsDoc = serde_json::from_slice(value)
            .map_err(|e| corrupt(key.clone(), 0, format!("the value is not a KES events document: {e}")))?;
        let id = Some(doc.aggregate_id.clone());
        if let Some(format) = doc.format.as_deref().filter(|f| *f != EVENTS_FORMAT) {
            return Err(corrupt(id, doc.first_version, format!("unknown format {format:?}")));
        }
        if key.as_deref() != Some(doc.aggregate_id.as_str()) {
            return Err(corrupt(id, doc.first_version, format!("record key {key:?} differs from the aggregate id")));
        }
        if doc.events.is_empty() || doc.first_version == 0 {
            return Err(corrupt(id, doc.first_version, "a record must carry events from version 1 on".into()));
        }
        for (event, expected) in doc.events.iter().zip(doc.first_version..) {
            if event.version != expected {
                return Err(corrupt(id, event.version, format!("versions are not contiguous (expected {expected})")));
            }
            if event.payload.is_none() && event.payload_base64.is_none() {
                return Err(corrupt(id, event.version, "the event has no payload".into()));
            }
        }
        if doc.last_version != doc.first_version + doc.events.len() as u64 - 1 {
            return Err(corrupt(id, doc.last_version, "last_version does not match the events carried".into()));
        }
        Ok(doc)
    }

    /// The id of its first event (how an append recognises its own record).
    pub fn first_event_id(&self) -> Option<Uuid> {
        self.events.first().map(|e| e.event_id)
    }

    /// The id of its last event (what the stream's next record names as
    /// its `previous_event_id`).
    pub fn last_event_id(&self) -> Option<Uuid> {
        self.events.last().map(|e| e.event_id)
    }

    /// The events as envelopes at `position`, payloads still encoded.
    pub fn into_raw(self, topic: &str, position: Position) -> Result<Vec<RawEnvelope>, KafkaStoreError> {
        let EventsDoc { aggregate_type, aggregate_id, recorded_at, metadata, events, .. } = self;
        events
            .into_iter()
            .map(|e| {
                let payload = e.payload_bytes().map_err(|reason| KafkaStoreError::Corrupt {
                    topic: topic.to_owned(),
                    position,
                    aggregate_id: Some(aggregate_id.clone()),
                    version: e.version,
                    reason,
                })?;
                Ok(Envelope {
                    event_id: e.event_id,
                    aggregate_type: aggregate_type.clone(),
                    aggregate_id: aggregate_id.clone(),
                    version: e.version,
                    event_type: e.event_type,
                    revision: e.revision,
                    recorded_at,
                    metadata: metadata.clone(),
                    position,
                    payload,
                })
            })
            .collect()
    }
}

/// An idempotency key remembered in a table record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KeyDoc {
    pub key: String,
    pub version: u64,
    pub offset: u64,
    /// When its record was written (Unix milliseconds; 0 in records of
    /// older versions): keys are remembered for a time window.
    #[serde(default)]
    pub recorded_ms: i64,
}

/// How far one reaction's sequence of commands (a `kes_core::ReactionKey`
/// sequence: one reaction, one partition of one source log) reached on a
/// row: the [`kes_core::ReactionKey::order`] of the furthest command of
/// the sequence the row holds, and the version and record offset that
/// command's append answered. A reaction sends a sequence's commands for
/// one aggregate one after another in that order, so a command at or
/// before the mark was appended (or refused) before: a replay from any old
/// checkpoint appends nothing, long after the recent keys moved on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MarkDoc {
    pub sequence: String,
    pub source_offset: u64,
    pub index: u32,
    pub version: u64,
    pub offset: u64,
}

/// An aggregate's state in a table record, as JSON text: read without
/// building a tree of it, typed only when the table takes the record, and
/// written from the table's bytes without parsing them into one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct StateJson(Box<RawValue>);

impl StateJson {
    /// The state JSON `bytes` hold; `null` when they are not JSON.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Self {
        let text = std::str::from_utf8(bytes).ok().and_then(|s| RawValue::from_string(s.to_owned()).ok());
        Self(text.unwrap_or_else(|| RawValue::NULL.to_owned()))
    }

    /// The JSON text.
    pub(crate) fn get(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for StateJson {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

/// The value of one table record.
///
/// A deleted aggregate is written like any other (with `deleted: true`),
/// never as a Kafka null tombstone: compaction removes a tombstoned key,
/// and with it the version that keeps the id from being created again at
/// version 1 and the progress marker the catch-up relies on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TableDoc {
    #[serde(default)]
    pub format: Option<String>,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub version: u64,
    #[serde(default)]
    pub deleted: bool,
    pub state: StateJson,
    /// The [`kes_core::Aggregate::STATE_VERSION`] that made `state` (1 in
    /// records of versions that did not record it).
    #[serde(default = "first_state_version")]
    pub state_version: u32,
    /// The events partition of this aggregate.
    pub events_partition: u32,
    /// Offset of its first events record (where `read` starts scanning).
    pub first_offset: u64,
    /// Offset of its last events record.
    pub last_offset: u64,
    /// Offsets of all its events records, so that `read` fetches just those.
    #[serde(default)]
    pub offsets: Vec<u64>,
    /// Size (key + value) of its largest events record.
    #[serde(default)]
    pub max_record_bytes: u64,
    /// Every events record of `events_partition` below this offset had its
    /// table record acknowledged before this one was written.
    #[serde(default)]
    pub reflected_below: u64,
    /// The tenure epoch of the instance that wrote it (0 in records of
    /// older versions; see `ownership`).
    #[serde(default)]
    pub epoch: u64,
    /// The id of its last valid event (absent in records of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_id: Option<Uuid>,
    #[serde(default)]
    pub idempotency_keys: VecDeque<KeyDoc>,
    /// How far each reaction's commands reached on the row (absent when
    /// none did, and in records of older versions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reaction_marks: Vec<MarkDoc>,
    pub updated_at: DateTime<Utc>,
}

fn first_state_version() -> u32 {
    1
}

impl TableDoc {
    /// Headers of a table record: only `kes.deleted: true` on deleted
    /// aggregates, so that a reader can skip them without parsing.
    pub fn headers(&self) -> Option<OwnedHeaders> {
        self.deleted.then(|| OwnedHeaders::new().insert(Header { key: "kes.deleted", value: Some("true") }))
    }

    /// Reads a table record's value; `None` for a null tombstone.
    pub fn decode(
        topic: &str,
        at: Position,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<Option<Self>, KafkaStoreError> {
        let Some(value) = value else { return Ok(None) };
        // The key is only copied into an error: every table record of a
        // start-up passes through here.
        let corrupt = |reason: String| KafkaStoreError::Corrupt {
            topic: topic.to_owned(),
            position: at,
            aggregate_id: key.map(|k| String::from_utf8_lossy(k).into_owned()),
            version: 0,
            reason,
        };
        let doc: TableDoc = serde_json::from_slice(value)
            .map_err(|e| corrupt(format!("the value is not a KES table document: {e}")))?;
        if let Some(format) = doc.format.as_deref().filter(|f| *f != TABLE_FORMAT) {
            return Err(corrupt(format!("unknown format {format:?}")));
        }
        if key != Some(doc.aggregate_id.as_bytes()) {
            return Err(corrupt("record key differs from the aggregate id".into()));
        }
        if doc.version == 0 || doc.first_offset > doc.last_offset {
            return Err(corrupt("version or offsets out of range".into()));
        }
        Ok(Some(doc))
    }
}

/// Kafka's default partitioner (murmur2 of the key, as the Java client and
/// librdkafka's `murmur2_random` compute it), so that every client agrees
/// which partition holds an aggregate.
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    (murmur2(key.as_bytes()) & 0x7fff_ffff) % partitions.max(1)
}

fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // Test vectors of Kafka's own UtilsTest.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            (b"abc", 479_470_107),
        ];
        for (input, expected) in cases {
            assert_eq!(murmur2(input) as i32, expected, "{}", String::from_utf8_lossy(input));
        }
    }

    fn doc() -> EventsDoc {
        let events = vec![
            OutgoingEvent { event_type: "Opened".into(), revision: 1, payload: br#"{"a":1}"#.to_vec() },
            OutgoingEvent { event_type: "Closed".into(), revision: 2, payload: b"null".to_vec() },
        ];
        let metadata = Metadata { correlation_id: Some("c".into()), ..Metadata::default() };
        EventsDoc::new("ledger", "l-1", 3, Some(Uuid::now_v7()), JSON, events, metadata).unwrap()
    }

    #[test]
    fn an_events_record_carries_one_short_header() {
        use rdkafka::message::Headers as _;
        let headers = doc().headers();
        assert_eq!(headers.count(), 1);
        let header = headers.get(0);
        assert_eq!(header.key, EVENTS_HEADER);
        assert_eq!(header.value, Some(&b"v=3-4;t=Opened,Closed;c=c"[..]));
    }

    #[test]
    fn events_document_round_trips_and_embeds_json_payloads() {
        let d = doc();
        let bytes = serde_json::to_vec(&d).unwrap();
        let text: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(text["events"][0]["payload"]["a"], 1, "payloads are JSON, not strings");
        assert_eq!(text["last_version"], 4);
        let at = Position::new(2, 9);
        let back = EventsDoc::decode("t", at, Some(b"l-1"), Some(&bytes)).unwrap();
        assert_eq!(back, d);
        let raw = back.into_raw("t", at).unwrap();
        assert_eq!(raw.iter().map(|e| e.version).collect::<Vec<_>>(), [3, 4]);
        assert_eq!(raw[0].payload, br#"{"a":1}"#);
        assert!(raw.iter().all(|e| e.position == at && e.metadata.correlation_id.as_deref() == Some("c")));
    }

    #[test]
    fn non_json_payloads_travel_as_base64() {
        let events = vec![OutgoingEvent { event_type: "Bin".into(), revision: 1, payload: vec![0, 159, 255] }];
        let d =
            EventsDoc::new("ledger", "x", 1, None, "application/octet-stream", events, Metadata::default()).unwrap();
        let raw = d.into_raw("t", Position::new(0, 0)).unwrap();
        assert_eq!(raw[0].payload, [0, 159, 255]);
    }

    #[test]
    fn bad_events_records_are_typed_errors() {
        let at = Position::new(1, 5);
        let good = serde_json::to_vec(&doc()).unwrap();
        type Case<'a> = (Option<&'a [u8]>, Option<Vec<u8>>, &'a str);
        let cases: Vec<Case> = vec![
            (Some(b"l-1"), None, "no value"),
            (Some(b"l-1"), Some(b"{not json".to_vec()), "not a KES events document"),
            (Some(b"l-1"), Some(br#"{"aggregate_id":"l-1"}"#.to_vec()), "not a KES events document"),
            (Some(b"other"), Some(good.clone()), "differs"),
            (None, Some(good), "differs"),
        ];
        for (key, value, what) in cases {
            let err = EventsDoc::decode("t", at, key, value.as_deref()).unwrap_err();
            assert!(err.to_string().contains(what), "{err}");
            assert!(matches!(err, KafkaStoreError::Corrupt { position, .. } if position == at));
        }
        let mut gap = doc();
        gap.events[1].version = 7;
        let err = EventsDoc::decode("t", at, Some(b"l-1"), Some(&serde_json::to_vec(&gap).unwrap())).unwrap_err();
        assert!(matches!(err, KafkaStoreError::Corrupt { version: 7, .. }), "{err}");
        let mut missing = doc();
        missing.events[0].payload = None;
        let err = EventsDoc::decode("t", at, Some(b"l-1"), Some(&serde_json::to_vec(&missing).unwrap())).unwrap_err();
        assert!(err.to_string().contains("no payload"), "{err}");
    }

    #[test]
    fn a_table_state_travels_as_the_json_text_it_was_written_from() {
        let written = br#"{"name":"Apollo","tags":["a","b"],"budget":1.5e3}"#;
        let doc = TableDoc {
            format: Some(TABLE_FORMAT.to_owned()),
            aggregate_type: "ledger".into(),
            aggregate_id: "l-1".into(),
            version: 2,
            deleted: false,
            state: StateJson::from_bytes(written),
            state_version: 1,
            events_partition: 0,
            first_offset: 3,
            last_offset: 4,
            offsets: vec![3, 4],
            max_record_bytes: 120,
            reflected_below: 5,
            epoch: 1,
            last_event_id: None,
            idempotency_keys: Default::default(),
            reaction_marks: Vec::new(),
            updated_at: Utc::now(),
        };
        let bytes = serde_json::to_vec(&doc).unwrap();
        let text: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(text["state"]["tags"][1], "b", "the state is embedded as JSON, not as a string");
        let back = TableDoc::decode("t", Position::new(0, 7), Some(b"l-1"), Some(&bytes)).unwrap().unwrap();
        assert_eq!(back.state.get().as_bytes(), written, "read back as the very text");
        assert_eq!(back, doc);
        // Bytes that are not JSON (never written by the table) become null.
        assert_eq!(StateJson::from_bytes(b"{not json").get(), "null");
        assert_eq!(StateJson::from_bytes(&[0xff, 0xfe]).get(), "null");
    }

    #[test]
    fn table_tombstones_and_garbage() {
        let at = Position::new(0, 1);
        assert_eq!(TableDoc::decode("t", at, Some(b"a"), None).unwrap(), None);
        let err = TableDoc::decode("t", at, Some(b"a"), Some(b"[]")).unwrap_err();
        assert!(matches!(err, KafkaStoreError::Corrupt { aggregate_id: Some(ref id), .. } if id == "a"));
    }

    #[test]
    fn a_table_record_is_read_only_under_its_aggregates_exact_id() {
        let at = Position::new(0, 1);
        let value = |id: &str| {
            serde_json::to_vec(&serde_json::json!({
                "format": TABLE_FORMAT, "aggregate_type": "ledger", "aggregate_id": id, "version": 1,
                "state": {}, "events_partition": 0, "first_offset": 0, "last_offset": 0,
                "updated_at": "2026-01-01T00:00:00Z"
            }))
            .unwrap()
        };
        assert!(TableDoc::decode("t", at, Some(b"l-1"), Some(&value("l-1"))).unwrap().is_some());
        let refused = |key: Option<&[u8]>, id: &str| {
            let err = TableDoc::decode("t", at, key, Some(&value(id))).unwrap_err();
            assert!(matches!(err, KafkaStoreError::Corrupt { ref reason, .. } if reason.contains("differs")), "{err}");
            err
        };
        refused(Some(b"l-2"), "l-1");
        refused(None, "l-1");
        // A key that is not UTF-8 never matches, not even an id equal to its
        // lossy reading; the error still names it as best it can.
        let err = refused(Some(b"l-\xff"), "l-\u{fffd}");
        assert!(matches!(err, KafkaStoreError::Corrupt { aggregate_id: Some(ref id), .. } if id == "l-\u{fffd}"));
    }
}
