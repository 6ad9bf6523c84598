//! Who writes table records: one owner per events partition, chosen by a
//! Kafka consumer group of the service's instances, with fenced tenures.
//!
//! Every instance follows every partition and could write table records
//! for all of them; with N instances that would be N copies of each. So
//! the instances join one consumer group (`{prefix}.{aggregate}.table-owners`)
//! on the events topic, and the partitions the group assigns to an instance
//! are the ones it writes table records for. The consumer only holds the
//! membership: its partitions are paused at once, it never reads them (the
//! follower does) and never commits.
//!
//! Group membership alone does not fence: an owner that lost its partitions
//! (it stalled, or the group rebalanced) may still have table records in
//! flight, and compaction keeps the last record of a key, so a stale
//! owner's late record would outlive the new owner's. Each tenure therefore
//! starts with an **epoch marker** in the table topic, under a key of its
//! own per partition and epoch (never compacted away): the new owner reads
//! the table topic, writes a marker for the next epoch, and holds the epoch
//! only if the first marker of that epoch is its own (the log decides, not
//! "highest seen plus one"). Every table record carries its writer's epoch;
//! a reader distrusts a record placed after a marker of a newer epoch than
//! its own and rebuilds that aggregate from the events topic (see
//! [`TableScan`]). A new owner writes the rows its predecessors may not
//! have written (those that changed since the partition's last trusted
//! claim) before anything else.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use kes_core::{Aggregate, Position};
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::client::{Reach, client_config};
use crate::error::KafkaStoreError;
use crate::record::TableDoc;
use crate::store::Inner;

/// Keys of epoch markers start with a NUL byte, which aggregate ids never
/// contain (the store refuses such ids), so a marker never shares a key
/// with an aggregate's table record.
const MARKER_KEY_PREFIX: &str = "\u{0}kes.epoch/";
/// The `format` of epoch markers.
const MARKER_FORMAT: &str = "kes.epoch.v1";
/// How often a claim is tried again when another instance took the epoch.
const CLAIM_ATTEMPTS: usize = 5;

/// The value of an epoch marker: the start of one owner's tenure over an
/// events partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct EpochMarker {
    pub format: String,
    pub events_partition: u32,
    pub epoch: u64,
    /// The instance that wrote it (a random id per store).
    pub owner: Uuid,
    pub claimed_at: DateTime<Utc>,
}

impl EpochMarker {
    /// The marker's key: one per partition and epoch.
    pub(crate) fn key(&self) -> String {
        format!("{MARKER_KEY_PREFIX}{}/{}", self.events_partition, self.epoch)
    }

    /// Whether a table topic key is a marker's.
    pub(crate) fn is_marker_key(key: Option<&[u8]>) -> bool {
        key.is_some_and(|k| k.starts_with(MARKER_KEY_PREFIX.as_bytes()))
    }

    /// Reads a marker record's value; `None` when it is not one.
    pub(crate) fn decode(value: Option<&[u8]>) -> Option<Self> {
        let marker: Self = serde_json::from_slice(value?).ok()?;
        (marker.format == MARKER_FORMAT).then_some(marker)
    }
}

/// This instance's tenure over one events partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tenure {
    pub(crate) epoch: u64,
}

/// What a read of the table topic found, by the fencing rule: the latest
/// trusted record of each aggregate, the aggregates whose latest record is
/// distrusted, and per events partition the highest epoch and the highest
/// trusted claim (`reflected_below`).
///
/// A scan can go on from where it stopped ([`Inner::read_table_topic`]):
/// the start-up load hands its scan, without the records, to the owners'
/// task ([`TableScan::for_claims`]), whose claims then read only what the
/// table topic gained since, not the whole topic again.
#[derive(Default)]
pub(crate) struct TableScan {
    /// Latest trusted record per aggregate id.
    pub(crate) docs: HashMap<String, TableDoc>,
    /// Aggregates whose last record came from a fenced-off tenure: events
    /// partition and first offset, to rebuild them from the events topic.
    pub(crate) distrusted: HashMap<String, (u32, u64)>,
    /// Per events partition, the highest epoch a marker names.
    pub(crate) epochs: HashMap<u32, u64>,
    /// Per events partition, the highest `reflected_below` of a trusted
    /// record.
    pub(crate) claims: HashMap<u32, u64>,
    /// Per (table partition, events partition, epoch), the owner of the
    /// first marker of that epoch.
    pub(crate) first_markers: HashMap<(u32, u32, u64), Uuid>,
    /// Per (table partition, events partition), the newest epoch whose
    /// marker was read so far (what later records are judged against).
    newest_marker: HashMap<(u32, u32), u64>,
    /// Records of KES's table that could not be read.
    pub(crate) unreadable: usize,
    /// Per table partition, the offset the next read starts at (what the
    /// scan read so far ends before).
    ends: Vec<u64>,
    /// Only the markers and claims are kept (`docs` and `distrusted` stay
    /// empty): a claim's scan needs no records.
    claims_only: bool,
}

impl TableScan {
    /// The scan without its records, to go on with for claims.
    pub(crate) fn for_claims(mut self) -> Self {
        self.docs = HashMap::new();
        self.distrusted = HashMap::new();
        self.claims_only = true;
        self
    }

    /// Takes one table topic record (in offset order per partition):
    /// a marker, a table record, or something else. Taking a record twice
    /// (a read that failed half-way is read again) changes nothing.
    pub(crate) fn take(&mut self, topic: &str, at: Position, key: Option<&[u8]>, value: Option<&[u8]>) {
        let table_partition = at.partition;
        if EpochMarker::is_marker_key(key) {
            let Some(m) = EpochMarker::decode(value) else {
                self.unreadable += 1;
                return;
            };
            let p = m.events_partition;
            let newest = self.newest_marker.entry((table_partition, p)).or_default();
            *newest = (*newest).max(m.epoch);
            let highest = self.epochs.entry(p).or_default();
            *highest = (*highest).max(m.epoch);
            self.first_markers.entry((table_partition, p, m.epoch)).or_insert(m.owner);
            return;
        }
        let doc = match TableDoc::decode(topic, at, key, value) {
            Ok(Some(doc)) => doc,
            Ok(None) | Err(_) => {
                self.unreadable += 1;
                return;
            }
        };
        let p = doc.events_partition;
        let newest = self.newest_marker.get(&(table_partition, p)).copied().unwrap_or(0);
        if doc.epoch < newest {
            if self.claims_only {
                return;
            }
            // Written by an owner whose tenure had ended: whatever it says
            // may be older than what the new owner wrote before it.
            tracing::info!(topic, position = %at, aggregate_id = %doc.aggregate_id, epoch = doc.epoch, newer = newest,
                "table record of an ended tenure; the aggregate is rebuilt from the events topic");
            self.docs.remove(&doc.aggregate_id);
            self.distrusted.insert(doc.aggregate_id, (p, doc.first_offset));
            return;
        }
        if !self.distrusted.is_empty() {
            self.distrusted.remove(&doc.aggregate_id);
        }
        let claim = self.claims.entry(p).or_default();
        *claim = (*claim).max(doc.reflected_below);
        if self.claims_only {
            return;
        }
        // The id is copied only for an aggregate seen for the first time.
        match self.docs.get_mut(&doc.aggregate_id) {
            Some(old) if old.version <= doc.version => *old = doc,
            Some(_) => {}
            None => {
                self.docs.insert(doc.aggregate_id.clone(), doc);
            }
        }
    }
}

/// The rebalance callbacks of the owners' group: a revoked partition stops
/// being written at once; an assigned one is paused (the follower reads it)
/// and handed to the task that claims its epoch.
struct OwnerContext<A: Aggregate> {
    store: Weak<Inner<A>>,
    assigned: mpsc::UnboundedSender<Vec<u32>>,
}

impl<A: Aggregate> ClientContext for OwnerContext<A> {}

impl<A: Aggregate> ConsumerContext for OwnerContext<A> {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance
            && let Some(inner) = self.store.upgrade()
        {
            for e in tpl.elements() {
                if let Ok(p) = u32::try_from(e.partition()) {
                    inner.end_tenure(p);
                }
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            if let Err(e) = consumer.pause(tpl) {
                tracing::warn!(error = %e, "could not pause the owned partitions; their records are read and dropped");
            }
            let partitions = tpl.elements().iter().filter_map(|e| u32::try_from(e.partition()).ok()).collect();
            let _ = self.assigned.send(partitions);
        }
    }
}

impl<A: Aggregate> Inner<A> {
    /// Joins the owners' group; partitions it is assigned are claimed and
    /// then written by this instance. The task ends with the store.
    /// `scan` is the start-up load's ([`TableScan::for_claims`]), which the
    /// claims go on from.
    pub(crate) fn start_owning(self: &Arc<Self>, scan: TableScan) -> Result<(), KafkaStoreError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let context = OwnerContext { store: Arc::downgrade(self), assigned: tx };
        let mut c = client_config(&self.config);
        c.set("group.id", format!("{}.{}.table-owners", self.config.topic_prefix, A::NAME))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "latest")
            .set("session.timeout.ms", self.config.owner_session_timeout.as_millis().to_string())
            .set("heartbeat.interval.ms", (self.config.owner_session_timeout.as_millis() / 4).max(100).to_string());
        let consumer: StreamConsumer<OwnerContext<A>> =
            c.create_with_context(context).map_err(|e| KafkaStoreError::from_kafka("owners' group", &e))?;
        consumer.subscribe(&[&self.events_topic]).map_err(|e| KafkaStoreError::from_kafka("owners' group", &e))?;
        tokio::spawn(own(Arc::downgrade(self), consumer, rx, scan));
        Ok(())
    }

    /// This instance no longer owns partition `p`: it stops writing its
    /// table records (those in flight may still land; readers fence them).
    pub(crate) fn end_tenure(&self, p: u32) {
        let mut table = self.table();
        if let Some(log) = table.logs.get_mut(p as usize)
            && log.tenure.take().is_some()
        {
            log.unsaved.clear();
            tracing::info!(topic = %self.events_topic, partition = p, "table records of this partition: no longer the owner");
        }
    }

    /// The table partitions that hold table records of events partition
    /// `p`: the same partition when both topics have as many (the same
    /// partitioner places an id alike in both), otherwise all of them.
    fn table_partitions_of(&self, p: u32) -> Vec<u32> {
        if self.table_partitions == self.partitions { vec![p] } else { (0..self.table_partitions).collect() }
    }

    /// Reads the table topic by the fencing rule into `scan`, from where
    /// `scan` stopped (the beginning, for a new one) to the partitions'
    /// current ends.
    pub(crate) async fn read_table_topic(&self, scan: &mut TableScan) -> Result<(), KafkaStoreError> {
        let topic = self.table_topic.clone();
        let mut read = 0u64;
        let ends = scan.ends.clone();
        let mut take = |m: &BorrowedMessage<'_>| {
            let at = Position::new(m.partition() as u32, m.offset() as u64);
            scan.take(&topic, at, m.key(), m.payload());
            read += 1;
            Ok(())
        };
        let high = if ends.is_empty() {
            // The start-up's read of the whole topic: the reader connects
            // while the heads are asked for.
            self.scan_to_heads(&topic, self.table_partitions, &mut take).await?
        } else {
            // A claim's read goes on from where the last stopped and often
            // finds nothing new: no reader unless there is something to read.
            let high = self.high_watermarks(&topic, self.table_partitions).await?;
            let ranges: Vec<_> = high
                .iter()
                .zip(ends.iter().chain(std::iter::repeat(&0)))
                .enumerate()
                .map(|(tp, (h, e))| (tp as u32, *e, *h))
                .collect();
            self.scan(&topic, &ranges, Reach::ToTheHead, &mut take).await?;
            high
        };
        scan.ends.resize(high.len(), 0);
        self.counters.table_records_scanned.fetch_add(read, std::sync::atomic::Ordering::Relaxed);
        // A partition's end only moves forward (a compacted topic keeps its
        // offsets), so the next read starts where this one stopped.
        for (end, h) in scan.ends.iter_mut().zip(high) {
            *end = (*end).max(h);
        }
        Ok(())
    }

    /// Claims the next epoch of each partition in `partitions` and starts
    /// writing their table records: first every row that changed since the
    /// partition's last trusted claim. One read of the table topic before
    /// the markers and one after, whatever the number of partitions, each
    /// going on with `scan` from where it stopped (so only what the topic
    /// gained since is read); a partition whose epoch another instance took
    /// first is tried again with the next one.
    async fn claim_tenures(self: &Arc<Self>, scan: &mut TableScan, partitions: &[u32]) -> Result<(), KafkaStoreError> {
        let mut todo: Vec<u32> = partitions.to_vec();
        for _ in 0..CLAIM_ATTEMPTS {
            if todo.is_empty() {
                return Ok(());
            }
            self.read_table_topic(scan).await?;
            let mut claims = Vec::new();
            for &p in &todo {
                let epoch = scan.epochs.get(&p).copied().unwrap_or(0) + 1;
                self.write_marker(p, epoch).await?;
                claims.push((p, epoch));
            }
            // The first marker of an epoch in every table partition decides.
            self.read_table_topic(scan).await?;
            todo.clear();
            for (p, epoch) in claims {
                let won = self
                    .table_partitions_of(p)
                    .iter()
                    .all(|tp| scan.first_markers.get(&(*tp, p, epoch)) == Some(&self.instance));
                if won {
                    self.begin_tenure(p, epoch, scan.claims.get(&p).copied().unwrap_or(0));
                } else {
                    tracing::info!(topic = %self.events_topic, partition = p, epoch,
                        "epoch taken by another instance; trying the next");
                    todo.push(p);
                }
            }
        }
        if todo.is_empty() {
            return Ok(());
        }
        Err(KafkaStoreError::Unavailable(format!(
            "partitions {todo:?}: no epoch could be claimed in {CLAIM_ATTEMPTS} attempts"
        )))
    }

    /// Writes the marker of this instance's tenure `epoch` over partition
    /// `p` to every table partition holding `p`'s records.
    async fn write_marker(&self, p: u32, epoch: u64) -> Result<(), KafkaStoreError> {
        let marker = EpochMarker {
            format: MARKER_FORMAT.to_owned(),
            events_partition: p,
            epoch,
            owner: self.instance,
            claimed_at: Utc::now(),
        };
        let value = serde_json::to_vec(&marker).map_err(|e| KafkaStoreError::Broker(format!("marker: {e}")))?;
        let key = marker.key();
        for tp in self.table_partitions_of(p) {
            let headers = OwnedHeaders::new().insert(Header { key: "kes.marker", value: Some("epoch") });
            let record =
                FutureRecord::to(&self.table_topic).key(&key).payload(&value).partition(tp as i32).headers(headers);
            self.producer()
                .send(record, self.config.request_timeout)
                .await
                .map_err(|(e, _)| KafkaStoreError::from_kafka("epoch marker", &e))?;
        }
        Ok(())
    }

    /// Starts the tenure: every row of `p` that changed at or after the
    /// partition's last trusted claim `claim` is written again (a
    /// predecessor may have applied it without writing it); every row of
    /// `p` when start-up rebuilt the table.
    fn begin_tenure(self: &Arc<Self>, p: u32, epoch: u64, claim: u64) {
        let mut table = self.table();
        let log = &mut table.logs[p as usize];
        log.tenure = Some(Tenure { epoch });
        log.claimed = claim;
        log.unsaved.clear();
        // After a rebuild from the events topic every row is written again.
        let claim = if std::mem::take(&mut log.rewrite_all) { 0 } else { claim };
        let stale: Vec<(u64, String)> = table
            .rows
            .iter()
            .filter(|r| r.partition == p && r.version > 0 && r.last_offset >= claim)
            .map(|r| (r.last_offset, r.id.to_owned()))
            .collect();
        let log = &mut table.logs[p as usize];
        for (offset, id) in &stale {
            log.unsaved.insert(*offset, id.clone());
        }
        for (_, id) in &stale {
            self.save_row(&mut table, id);
        }
        tracing::info!(topic = %self.events_topic, partition = p, epoch, rewritten = stale.len(),
            "table records of this partition: owner");
    }
}

/// The owners' group task: keeps the membership alive (the consumer must
/// be polled) and claims the partitions it is assigned.
async fn own<A: Aggregate>(
    store: Weak<Inner<A>>,
    consumer: StreamConsumer<OwnerContext<A>>,
    mut assigned: mpsc::UnboundedReceiver<Vec<u32>>,
    mut scan: TableScan,
) {
    loop {
        tokio::select! {
            polled = tokio::time::timeout(Duration::from_millis(500), consumer.recv()) => {
                if let Ok(Err(e)) = polled {
                    tracing::debug!(error = %e, "owners' group");
                }
            }
            partitions = assigned.recv() => {
                let Some(partitions) = partitions else { return };
                let Some(inner) = store.upgrade() else { return };
                let mut todo = partitions;
                todo.sort_unstable();
                if let Err(e) = inner.claim_tenures(&mut scan, &todo).await {
                    tracing::warn!(partitions = ?todo, error = %e, "could not claim the partitions' table records");
                }
                inner.owners_settled.send_replace(true);
            }
        }
        if store.strong_count() == 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(p: u32, epoch: u64, owner: u128) -> (String, Vec<u8>) {
        let m = EpochMarker {
            format: MARKER_FORMAT.to_owned(),
            events_partition: p,
            epoch,
            owner: Uuid::from_u128(owner),
            claimed_at: Utc::now(),
        };
        (m.key(), serde_json::to_vec(&m).unwrap())
    }

    fn record(id: &str, version: u64, epoch: u64, reflected_below: u64) -> (String, Vec<u8>) {
        let doc = TableDoc {
            format: Some(crate::record::TABLE_FORMAT.to_owned()),
            aggregate_type: "ledger".into(),
            aggregate_id: id.into(),
            version,
            deleted: false,
            state: crate::record::StateJson::from_bytes(b"{}"),
            state_version: 1,
            events_partition: 0,
            first_offset: 3,
            last_offset: 3 + version,
            offsets: Vec::new(),
            max_record_bytes: 0,
            reflected_below,
            epoch,
            last_event_id: None,
            idempotency_keys: Default::default(),
            reaction_marks: Vec::new(),
            updated_at: Utc::now(),
        };
        (id.to_owned(), serde_json::to_vec(&doc).unwrap())
    }

    fn scan(records: &[(String, Vec<u8>)]) -> TableScan {
        let mut scan = TableScan::default();
        for (offset, (key, value)) in records.iter().enumerate() {
            scan.take("t", Position::new(0, offset as u64), Some(key.as_bytes()), Some(value));
        }
        scan
    }

    #[test]
    fn a_stale_owners_late_record_is_distrusted_and_its_claim_ignored() {
        let records = [
            marker(0, 1, 1),
            record("k", 5, 1, 10),
            marker(0, 2, 2),
            record("k", 7, 2, 20),
            // The old owner's record, delivered after the new owner's
            // marker: what compaction would keep for "k".
            record("k", 5, 1, 90),
            record("other", 2, 2, 25),
        ];
        let s = scan(&records);
        assert_eq!(s.distrusted.get("k"), Some(&(0, 3)), "k must be rebuilt from its first offset");
        assert!(!s.docs.contains_key("k"));
        assert_eq!(s.claims.get(&0), Some(&25), "a fenced record's claim does not count");
        assert_eq!(s.epochs.get(&0), Some(&2));
        // Compaction keeps only the last record of "k": still distrusted.
        let compacted = [records[0].clone(), records[2].clone(), records[4].clone(), records[5].clone()];
        assert!(scan(&compacted).distrusted.contains_key("k"));
    }

    #[test]
    fn records_of_a_tenure_before_the_next_marker_and_newer_ones_are_trusted() {
        let s = scan(&[marker(0, 1, 1), record("k", 5, 1, 10), marker(0, 2, 2), record("k", 7, 2, 20)]);
        assert_eq!(s.docs.get("k").map(|d| d.version), Some(7));
        assert!(s.distrusted.is_empty());
        // A distrusted key written again by the current owner is trusted again.
        let s = scan(&[marker(0, 2, 2), record("k", 5, 1, 10), record("k", 8, 2, 30)]);
        assert_eq!(s.docs.get("k").map(|d| d.version), Some(8));
        assert!(s.distrusted.is_empty());
        // Records of older versions (epoch 0, no markers) are trusted.
        assert_eq!(scan(&[record("k", 3, 0, 4)]).docs.len(), 1);
    }

    #[test]
    fn the_first_marker_of_an_epoch_wins() {
        let s = scan(&[marker(0, 1, 7), marker(0, 1, 8), marker(0, 2, 8)]);
        assert_eq!(s.first_markers.get(&(0, 0, 1)), Some(&Uuid::from_u128(7)));
        assert_eq!(s.first_markers.get(&(0, 0, 2)), Some(&Uuid::from_u128(8)));
        assert_eq!(s.epochs.get(&0), Some(&2));
        assert!(EpochMarker::is_marker_key(Some(marker(3, 9, 1).0.as_bytes())));
        assert!(!EpochMarker::is_marker_key(Some(b"kes.epoch/3/9")), "an aggregate id is never a marker key");
    }
}
