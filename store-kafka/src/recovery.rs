//! Start-up recovery: the table is loaded from the table topic, caught up
//! from the events topic past what its records claim (by the same applier
//! as the follower's, so by the same validity rule), and repaired before
//! the store takes commands.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use kes_core::{Aggregate, Position};
use rdkafka::message::Message;

use crate::client::Reach;
use crate::error::KafkaStoreError;
use crate::follower::Applied;
use crate::ownership::TableScan;
use crate::record::{EventsDoc, TableDoc};
use crate::rows::Rows;
use crate::store::Inner;
use crate::table::{TableRow, encode_state};

/// The rows read from the table topic, and per events partition the offset
/// from which the events topic must be replayed.
type LoadedRows = (Rows, Vec<u64>);

impl<A: Aggregate> Inner<A> {
    /// Start-up: the table from the table topic (by the fencing rule of
    /// `ownership`), then every events record it does not reflect yet. The
    /// rows this changed are written to the table topic by each
    /// partition's owner when its tenure starts. Returns the scan of the
    /// table topic, which the owners' claims go on from.
    pub(crate) async fn recover(self: &Arc<Self>) -> Result<TableScan, KafkaStoreError> {
        let mut scan = TableScan::default();
        // The events topic's heads are asked while the table topic is read.
        let (read, events_high) =
            tokio::join!(self.read_table_topic(&mut scan), self.high_watermarks(&self.events_topic, self.partitions));
        read?;
        let events_high = events_high?;
        // The records leave the scan, which goes on to the claims with only
        // its markers and claims.
        let distrusted = std::mem::take(&mut scan.distrusted);
        let docs = self.trusted_docs(std::mem::take(&mut scan.docs), scan.unreadable);
        let (rows, from) = self.rows_from_table_records(docs);
        let rebuild_all = rows.is_empty();
        self.table().rows = rows;
        let distrusted = if rebuild_all { HashMap::new() } else { distrusted };
        let changed = self.catch_up_from_events(&from, events_high, distrusted).await?;
        {
            let mut table = self.table();
            table.rows.shrink_to_fit();
            for (log, claimed) in table.logs.iter_mut().zip(&from) {
                log.unsaved.clear();
                log.claimed = *claimed;
                log.rewrite_all = rebuild_all;
            }
        }
        if !changed.is_empty() {
            tracing::info!(aggregates = changed.len(), topic = %self.events_topic, "table caught up from the events topic");
        }
        Ok(scan.for_claims())
    }

    /// The table records a start can build on; `None` when one cannot be
    /// trusted at all (unreadable, not written by KES, or for a partition
    /// the events topic lacks), so that the table is rebuilt from the
    /// events topic.
    fn trusted_docs(&self, docs: HashMap<String, TableDoc>, unreadable: usize) -> Option<HashMap<String, TableDoc>> {
        if unreadable > 0 {
            tracing::warn!(topic = %self.table_topic, records = unreadable,
                "table records KES cannot read; rebuilding the table from the events topic");
            return None;
        }
        if docs.values().any(|d| d.events_partition >= self.partitions) {
            tracing::warn!(topic = %self.table_topic, "table records for partitions the events topic lacks; rebuilding");
            return None;
        }
        Some(docs)
    }

    /// The rows the table records describe, and per events partition the
    /// highest catch-up mark they carry. No rows and marks at 0 (a rebuild
    /// from the whole events topic) when there are no trustworthy records, a
    /// record was made by another [`Aggregate::STATE_VERSION`], or a state
    /// no longer fits the aggregate's model.
    fn rows_from_table_records(&self, docs: Option<HashMap<String, TableDoc>>) -> LoadedRows {
        let mut from = vec![0u64; self.partitions as usize];
        let Some(docs) = docs else { return (Rows::default(), from) };
        if let Some(other) = docs.values().map(|d| d.state_version).find(|v| *v != A::STATE_VERSION) {
            tracing::info!(topic = %self.table_topic, from = other, to = A::STATE_VERSION,
                "table records were built by another state version; rebuilding the table from the events topic");
            self.table_rebuilt_from.store(other.max(1), std::sync::atomic::Ordering::Relaxed);
            return (Rows::default(), from);
        }
        let mut rows = Rows::with_capacity(docs.len());
        let mut scratch = Vec::with_capacity(1024);
        for (id, doc) in docs {
            // Typed once to check that it fits the model, then kept as
            // the JSON the model writes.
            let encoded =
                serde_json::from_str::<A>(doc.state.get()).and_then(|state| encode_state(&state, &mut scratch));
            let Ok((state, deleted)) = encoded else {
                tracing::warn!(%id, "table state does not fit the aggregate's model; rebuilding from the events topic");
                rows.clear();
                from.iter_mut().for_each(|f| *f = 0);
                break;
            };
            let slot = &mut from[doc.events_partition as usize];
            *slot = (*slot).max(doc.reflected_below);
            rows.insert(&id, TableRow::from_table_doc(doc, state, deleted));
        }
        (rows, from)
    }

    /// Replays the events topic from `from` (per partition) to its head,
    /// `events_high` (asked while the table topic was read), and returns the
    /// ids whose rows moved.
    async fn catch_up_from_events(
        &self,
        from: &[u64],
        mut events_high: Vec<u64>,
        distrusted: HashMap<String, (u32, u64)>,
    ) -> Result<HashSet<String>, KafkaStoreError> {
        if from.iter().zip(&events_high).any(|(from, high)| from > high) {
            // A table record written after the heads were asked for (by an
            // instance running meanwhile) reflects events past them. Heads
            // only grow: asked again, they cover every record read.
            events_high = self.high_watermarks(&self.events_topic, self.partitions).await?;
        }
        let ranges: Vec<_> = events_high.iter().enumerate().map(|(p, h)| (p as u32, from[p], *h)).collect();
        // The ranges end at the watermarks just asked for.
        let changed = self.replay(&ranges, Reach::ToTheHead, distrusted).await?;
        let mut table = self.table();
        for (p, high) in events_high.iter().enumerate() {
            // A halted partition stays where it stopped.
            if table.logs[p].halted.is_none() {
                table.logs[p].end = table.logs[p].end.max(*high);
            }
        }
        Ok(changed)
    }

    /// Applies the events records in `ranges` to the table by the validity
    /// rule (skipping those it already reflects) and returns the ids whose
    /// rows moved. A stream whose row turns out incomplete (a gap: its
    /// table record was older than the catch-up mark) is rebuilt from the
    /// log afterwards, as are the `distrusted` ones (id → partition and
    /// first offset); a record that cannot be read halts its partition.
    /// `reach` is where the ranges end, which the caller knows.
    async fn replay(
        &self,
        ranges: &[(u32, u64, u64)],
        reach: Reach,
        distrusted: HashMap<String, (u32, u64)>,
    ) -> Result<HashSet<String>, KafkaStoreError> {
        let mut changed = HashSet::new();
        let mut gaps: HashSet<(u32, String)> = distrusted.iter().map(|(id, (p, _))| (*p, id.clone())).collect();
        let topic = self.events_topic.clone();
        self.scan(&topic, ranges, reach, |m| {
            let at = Position::new(m.partition() as u32, m.offset() as u64);
            let mut table = self.table();
            let doc = match EventsDoc::decode(&topic, at, m.key(), m.payload()) {
                Ok(doc) => doc,
                Err(e) => {
                    let id = m.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
                    self.halt(&mut table, at, &id, e.to_string());
                    return Ok(());
                }
            };
            let id = &doc.aggregate_id;
            if gaps.contains(&(at.partition, id.clone())) {
                // Judged when the stream is rebuilt.
                table.logs[at.partition as usize].end = at.offset + 1;
                return Ok(());
            }
            let size = m.key_len() as u64 + m.payload_len() as u64;
            match self.apply_record(&mut table, &doc, at, size, m.payload().unwrap_or_default(), false) {
                Applied::Valid => {
                    changed.insert(id.clone());
                }
                Applied::Gap => {
                    gaps.insert((at.partition, id.clone()));
                    table.logs[at.partition as usize].end = at.offset + 1;
                }
                Applied::Void | Applied::Skipped | Applied::Halted => {}
            }
            Ok(())
        })
        .await?;
        for (p, id) in gaps {
            let (from, to) = {
                let table = self.table();
                let from = distrusted.get(&id).map(|(_, first)| *first);
                let from = from.or_else(|| table.rows.get(id.as_str()).map(|r| r.first_offset)).unwrap_or(0);
                let end = ranges.iter().find(|(q, ..)| *q == p).map_or(0, |(_, _, to)| *to);
                (from, end.max(table.logs[p as usize].end))
            };
            let rebuilt = self.rebuild_stream(p, &id, from, to).await?;
            let mut table = self.table();
            self.replace_row(&mut table, &id, rebuilt);
            changed.insert(id);
        }
        Ok(changed)
    }
}
