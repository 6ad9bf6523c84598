//! Start-up recovery and catching up: the table is loaded from the table
//! topic, caught up from the events topic past what its records claim, and
//! repaired before the store takes commands; after a send with an unknown
//! outcome, the partition is read again from where the record could be.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kes_core::{Aggregate, Position};
use rdkafka::message::Message;

use crate::error::KafkaStoreError;
use crate::record::{EventsDoc, TableDoc};
use crate::store::Inner;
use crate::table::{Row, Table, encode_state};

/// The rows read from the table topic, and per events partition the offset
/// from which the events topic must be replayed.
type LoadedRows = (HashMap<Box<str>, Box<Row>>, Vec<u64>);

impl<A: Aggregate> Inner<A> {
    /// Start-up: the table from the table topic, then every events record it
    /// does not reflect yet, then table records for what that changed.
    pub(crate) async fn recover(self: &Arc<Self>) -> Result<(), KafkaStoreError> {
        let docs = self.read_table_topic().await?;
        let (rows, from) = self.rows_from_table_records(docs);
        self.table().rows = rows;
        let changed = self.catch_up_from_events(&from).await?;
        // Repair the table topic before taking commands, so that the table
        // records written from now on may claim everything below the head.
        self.repair_table_topic(&changed, &from).await?;
        {
            // Every row the replay moved has an acknowledged record now.
            let mut table = self.table();
            for (log, claimed) in table.logs.iter_mut().zip(&from) {
                log.unsaved.clear();
                log.claimed = *claimed;
            }
        }
        if !changed.is_empty() {
            tracing::info!(aggregates = changed.len(), topic = %self.events_topic, "table caught up from the events topic");
        }
        Ok(())
    }

    /// The latest table record of each aggregate in the table topic; `None`
    /// when a record cannot be trusted (unreadable, or not written by KES),
    /// so that the table is rebuilt from the events topic.
    async fn read_table_topic(&self) -> Result<Option<HashMap<String, TableDoc>>, KafkaStoreError> {
        let table_high = self.high_watermarks(&self.table_topic, self.table_partitions).await?;
        let mut docs: HashMap<String, TableDoc> = HashMap::new();
        let mut trustworthy = true;
        let ranges: Vec<_> = table_high.iter().enumerate().map(|(p, h)| (p as u32, 0, *h)).collect();
        let table_topic = self.table_topic.clone();
        self.scan(&table_topic, &ranges, |m| {
            let at = Position::new(m.partition() as u32, m.offset() as u64);
            match TableDoc::decode(&table_topic, at, m.key(), m.payload()) {
                Ok(Some(doc)) if doc.events_partition < self.partitions => {
                    let newer = docs.get(&doc.aggregate_id).is_none_or(|old| old.version <= doc.version);
                    if newer {
                        docs.insert(doc.aggregate_id.clone(), doc);
                    }
                }
                Ok(other) => {
                    tracing::warn!(topic = %table_topic, position = %at, tombstone = other.is_none(),
                        "table record KES did not write; rebuilding the table from the events topic");
                    trustworthy = false;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable table record; rebuilding the table from the events topic");
                    trustworthy = false;
                }
            }
            Ok(())
        })
        .await?;
        Ok(trustworthy.then_some(docs))
    }

    /// The rows the table records describe, and per events partition the
    /// highest catch-up mark they carry. No rows and marks at 0 (a rebuild
    /// from the whole events topic) when there are no trustworthy records or
    /// a state no longer fits the aggregate's model.
    fn rows_from_table_records(&self, docs: Option<HashMap<String, TableDoc>>) -> LoadedRows {
        let mut rows: HashMap<Box<str>, Box<Row>> = HashMap::new();
        let mut from = vec![0u64; self.partitions as usize];
        let Some(docs) = docs else { return (rows, from) };
        rows.reserve(docs.len());
        let mut scratch = Vec::with_capacity(1024);
        for (id, mut doc) in docs {
            // Typed once to check that it fits the model, then kept as
            // the JSON the model writes.
            let encoded = serde_json::from_value::<A>(std::mem::take(&mut doc.state))
                .and_then(|state| encode_state(&state, &mut scratch));
            let Ok((state, deleted)) = encoded else {
                tracing::warn!(%id, "table state does not fit the aggregate's model; rebuilding from the events topic");
                rows.clear();
                from.iter_mut().for_each(|f| *f = 0);
                break;
            };
            let slot = &mut from[doc.events_partition as usize];
            *slot = (*slot).max(doc.reflected_below);
            rows.insert(id.into_boxed_str(), Box::new(Row::from_table_doc(doc, state, deleted)));
        }
        (rows, from)
    }

    /// Replays the events topic from `from` (per partition) to its head and
    /// returns the ids whose rows moved.
    async fn catch_up_from_events(&self, from: &[u64]) -> Result<HashSet<String>, KafkaStoreError> {
        let events_high = self.high_watermarks(&self.events_topic, self.partitions).await?;
        let ranges: Vec<_> = events_high.iter().enumerate().map(|(p, h)| (p as u32, from[p], *h)).collect();
        let changed = self.replay(&ranges).await?;
        let mut table = self.table();
        for (p, high) in events_high.iter().enumerate() {
            table.logs[p].end = *high;
        }
        Ok(changed)
    }

    /// Writes the table record of every row in `changed`, each claiming its
    /// partition's mark in `from`, and waits for every acknowledgement.
    async fn repair_table_topic(&self, changed: &HashSet<String>, from: &[u64]) -> Result<(), KafkaStoreError> {
        let mut pending = Vec::new();
        {
            let table = self.table();
            for id in changed {
                if let Some((doc, p)) = self.table_doc(&table, id) {
                    let reflected = from[p as usize];
                    pending.push(self.send_table_doc(TableDoc { reflected_below: reflected, ..doc })?.0);
                }
            }
        }
        for delivery in pending {
            match tokio::time::timeout(self.config.request_timeout + Duration::from_secs(1), delivery).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err((e, _)))) => return Err(KafkaStoreError::from_kafka("repairing the table topic", &e)),
                _ => return Err(KafkaStoreError::Unavailable("repairing the table topic: no acknowledgement".into())),
            }
        }
        Ok(())
    }

    /// Applies the events records in `ranges` to the table (skipping those it
    /// already reflects) and returns the ids whose rows moved.
    async fn replay(&self, ranges: &[(u32, u64, u64)]) -> Result<HashSet<String>, KafkaStoreError> {
        let mut changed = HashSet::new();
        let topic = self.events_topic.clone();
        self.scan(&topic, ranges, |m| {
            let at = Position::new(m.partition() as u32, m.offset() as u64);
            let doc = EventsDoc::decode(&topic, at, m.key(), m.payload())?;
            let id = doc.aggregate_id.clone();
            let mut table = self.table();
            if self.apply_from_log(&mut table, doc, at, m.key_len() as u64, m.payload().unwrap_or_default())? {
                table.logs[at.partition as usize].unsaved.insert(at.offset, id.clone());
                changed.insert(id.clone());
            }
            let log = &mut table.logs[at.partition as usize];
            if at.offset + 1 >= log.end {
                log.end = at.offset + 1;
                log.last_id = Some(id);
            }
            Ok(())
        })
        .await?;
        Ok(changed)
    }

    /// Moves a row by one events record read from the log. `false` when the
    /// row already reflects it (a record this process applied on its
    /// acknowledgement, or a duplicate: the first record of a version wins).
    fn apply_from_log(
        &self,
        table: &mut Table<A>,
        doc: EventsDoc,
        at: Position,
        key_len: u64,
        value: &[u8],
    ) -> Result<bool, KafkaStoreError> {
        let size = key_len + value.len() as u64;
        let current = table.rows.get(doc.aggregate_id.as_str()).map_or(0, |r| r.version);
        if doc.last_version <= current {
            return Ok(false);
        }
        if doc.first_version != current + 1 {
            return Err(KafkaStoreError::Corrupt {
                topic: self.events_topic.clone(),
                position: at,
                aggregate_id: Some(doc.aggregate_id),
                version: doc.first_version,
                reason: format!("the stream is at version {current}: versions are missing before this record"),
            });
        }
        let key = doc.metadata.idempotency_key.clone();
        let last_version = doc.last_version;
        let id = doc.aggregate_id.clone();
        let raw = doc.into_raw(&self.events_topic, at)?;
        let mut events = Vec::with_capacity(raw.len());
        for e in raw {
            let event =
                self.codec.decode(&e.event_type, e.revision, &e.payload).map_err(|err| KafkaStoreError::Corrupt {
                    topic: self.events_topic.clone(),
                    position: at,
                    aggregate_id: Some(id.clone()),
                    version: e.version,
                    reason: err.to_string(),
                })?;
            events.push(event);
        }
        let unfit = |what: &str, err: serde_json::Error| KafkaStoreError::Corrupt {
            topic: self.events_topic.clone(),
            position: at,
            aggregate_id: Some(id.clone()),
            version: last_version,
            reason: format!("the aggregate's state {what}: {err}"),
        };
        let row = table.rows.entry(id.as_str().into()).or_insert_with(|| Box::new(Row::new(at)));
        let mut state: A = row.typed().map_err(|e| unfit("held by the table does not fit its model", e))?;
        for e in &events {
            state.apply(e);
        }
        let (state, deleted) = encode_state(&state, &mut Vec::new()).map_err(|e| unfit("cannot be serialised", e))?;
        row.advance(state, deleted, last_version, at, size);
        if let Some(key) = key {
            row.remember_key(key, last_version, at.offset, self.config.idempotency_keys_per_aggregate);
        }
        table.cache(&id, value, self.config.read_cache_bytes);
        Ok(true)
    }

    /// Before using partition `p`: if a send to it ended without knowing
    /// whether the broker wrote the record, read the partition from there to
    /// its head so the table reflects what is really in the log.
    pub(crate) async fn resync_if_uncertain(self: &Arc<Self>, p: u32) -> Result<(), KafkaStoreError> {
        if self.table().logs[p as usize].uncertain_from.is_none() {
            return Ok(());
        }
        let _one = self.resync_locks[p as usize].lock().await;
        let Some(from) = self.table().logs[p as usize].uncertain_from.take() else { return Ok(()) };
        let result = async {
            let high = self.high_watermarks(&self.events_topic, self.partitions).await?[p as usize];
            let changed = self.replay(&[(p, from, high)]).await?;
            let mut table = self.table();
            for id in &changed {
                self.save_row(&mut table, id);
            }
            Ok::<_, KafkaStoreError>(())
        }
        .await;
        if result.is_err() {
            let mut table = self.table();
            let log = &mut table.logs[p as usize];
            log.uncertain_from = Some(log.uncertain_from.map_or(from, |u| u.min(from)));
        }
        result
    }
}
