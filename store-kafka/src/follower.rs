//! Following the log: the one in-order applier of each events partition.
//!
//! Every record of the events topic, this process's own included, is
//! judged by the validity rule ([`crate::validity`]) in log order and, when
//! valid, applied to the table. The start-up catch-up, the follower task
//! that keeps the table current while the store runs, and an append that
//! finds everything below its record already applied (the fast path) all
//! apply records through here, so they cannot disagree.
//!
//! - A valid record moves its row; a void one only moves the partition's
//!   progress, is counted and logged.
//! - A record whose first version is past its stream's next one (a gap)
//!   means this process's row is incomplete: the stream is rebuilt from the
//!   log before the record is judged again.
//! - A valid record whose events this version's codec cannot decode halts
//!   its partition: it is neither applied nor voided, and the partition's
//!   aggregates answer `Unavailable` until a version that can read it runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kes_core::{Aggregate, Position, StoreError};
use rdkafka::TopicPartitionList;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;

use crate::client::{Reach, Reader, create_consumer, follow_wait_ms, start_at};
use crate::error::{KafkaStoreError, is_transient};
use crate::record::EventsDoc;
use crate::store::Inner;
use crate::table::{Halt, KeyRetention, Table, TableRow, Verdict, encode_state};
use crate::validity::{Judgement, StreamTip, judge};

/// Most idempotency keys one aggregate remembers, whatever their age.
const KEYS_AT_MOST: usize = 1024;

/// What applying one record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    /// It was valid: its row moved.
    Valid,
    /// It was void: only the partition's progress moved.
    Void,
    /// Already applied, or reflected by the table record its row came from.
    Skipped,
    /// Its stream lacks versions before it: rebuild the stream, then apply
    /// it again. Nothing moved.
    Gap,
    /// Its partition is halted (by this record or an earlier one).
    Halted,
}

/// Counters of the follower and the appends, for `/metrics` and tests.
#[derive(Default)]
pub(crate) struct FollowerCounters {
    pub(crate) void_records: AtomicU64,
    pub(crate) fast_path_appends: AtomicU64,
    pub(crate) awaited_appends: AtomicU64,
    pub(crate) lost_races: AtomicU64,
    pub(crate) subscribed_from_tail: AtomicU64,
    pub(crate) subscribed_from_broker: AtomicU64,
    pub(crate) table_records_scanned: AtomicU64,
    pub(crate) subscription_seeks: AtomicU64,
}

/// What a [`crate::KafkaStore`] reports of its follower and its appends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowerStats {
    /// Per events partition, the offset after the last record the table
    /// applied (valid or void).
    pub applied: Vec<u64>,
    /// Records judged void (lost a race, or decided on one that did) since
    /// the store started, start-up catch-up included.
    pub void_records: u64,
    /// Appends whose record was judged as soon as it was acknowledged,
    /// because every record below it was applied already.
    pub fast_path_appends: u64,
    /// Appends that waited for the follower to reach their record.
    pub awaited_appends: u64,
    /// Appends answered `Conflict` because their record was void.
    pub lost_races: u64,
    /// Records subscriptions took from the partitions' tails in memory.
    pub subscribed_from_tail: u64,
    /// Records subscriptions read from the broker (below the tails: old
    /// checkpoints, rebuilds, subscribers that fell behind).
    pub subscribed_from_broker: u64,
    /// Times a subscription pointed its broker reader at the partitions
    /// below their tails, each from its next record (dropping what it had
    /// fetched ahead): once when it starts reading from the broker, then
    /// once per partition that reaches its tail.
    pub subscription_seeks: u64,
    /// Records read from the table topic: the start-up load, then what the
    /// claims of tenures read past it (each goes on from where the reading
    /// before it stopped).
    pub table_records_scanned: u64,
    /// Partitions stopped at a record this version cannot read.
    pub halted: Vec<HaltedPartition>,
}

/// A partition stopped at a record this version of the service cannot read
/// (see the crate docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaltedPartition {
    /// The events partition.
    pub partition: u32,
    /// The offset of the record it stopped at.
    pub offset: u64,
    /// Why the record cannot be applied.
    pub reason: String,
}

impl<A: Aggregate> Inner<A> {
    /// How long rows remember idempotency keys.
    pub(crate) fn key_retention(&self) -> KeyRetention {
        let at_least = self.config.idempotency_keys_per_aggregate;
        KeyRetention {
            at_least,
            at_most: KEYS_AT_MOST.max(at_least),
            window_ms: i64::try_from(self.config.idempotency_window.as_millis()).unwrap_or(i64::MAX),
        }
    }

    /// Judges the record at `at` (read from the log: `size` bytes of key
    /// and value, `value` its value) and applies it to the table, in log
    /// order: a record below the partition's progress is skipped. With
    /// `gap_is_void`, a record that still leaves a gap after its stream was
    /// rebuilt from the log is void (the log itself says it does not
    /// continue its stream).
    pub(crate) fn apply_record(
        &self,
        table: &mut Table<A>,
        doc: &EventsDoc,
        at: Position,
        size: u64,
        value: &[u8],
        gap_is_void: bool,
    ) -> Applied {
        let p = at.partition as usize;
        let log = &table.logs[p];
        if log.halted.is_some() {
            return Applied::Halted;
        }
        if at.offset < log.end {
            return Applied::Skipped;
        }
        let id = doc.aggregate_id.as_str();
        let row = table.rows.get(id);
        // A start-up catch-up begins below records that the table record a
        // row came from reflects already.
        if row.is_some_and(|r| r.version > 0 && at.offset <= r.last_offset) {
            table.logs[p].end = at.offset + 1;
            return Applied::Skipped;
        }
        let tip = row.map_or_else(StreamTip::default, |r| r.tip());
        match judge(tip, doc.first_version, doc.previous_event_id) {
            Judgement::Gap if !gap_is_void => Applied::Gap,
            Judgement::Gap => {
                self.count_awaited(self.void(table, doc, at, "versions before it are missing from its stream"));
                Applied::Void
            }
            Judgement::Void(why) => {
                self.count_awaited(self.void(table, doc, at, why));
                Applied::Void
            }
            Judgement::Valid => match self.fold(table.rows.get(id).filter(|r| r.version > 0).map(|r| r.state), doc) {
                Ok((state, deleted)) => {
                    self.count_awaited(self.settle_valid(table, doc, at, state, deleted, size, value));
                    Applied::Valid
                }
                Err(reason) => {
                    self.halt(table, at, &doc.aggregate_id, reason);
                    Applied::Halted
                }
            },
        }
    }

    /// [`Inner::apply_record`] for this process's own record at `at`, whose
    /// new state was computed when the command was decided: the fast path
    /// of an append, taken when every record below `at` is applied. `None`
    /// when the record leaves a gap (the follower judges it then).
    pub(crate) fn apply_own(
        &self,
        table: &mut Table<A>,
        doc: &EventsDoc,
        at: Position,
        state: Box<[u8]>,
        deleted: bool,
        value: &[u8],
    ) -> Option<Applied> {
        let p = at.partition as usize;
        if table.logs[p].halted.is_some() || table.logs[p].end != at.offset {
            return None;
        }
        let tip = table.rows.get(doc.aggregate_id.as_str()).map_or_else(StreamTip::default, |r| r.tip());
        let applied = match judge(tip, doc.first_version, doc.previous_event_id) {
            Judgement::Gap => return None,
            Judgement::Void(why) => {
                self.void(table, doc, at, why);
                Applied::Void
            }
            Judgement::Valid => {
                let size = (doc.aggregate_id.len() + value.len()) as u64;
                self.settle_valid(table, doc, at, state, deleted, size, value);
                Applied::Valid
            }
        };
        self.counters.fast_path_appends.fetch_add(1, Ordering::Relaxed);
        Some(applied)
    }

    /// Applies this process's acknowledged records waiting in partition
    /// `p`'s `delivered` list, in log order, as far as everything below
    /// each is applied; stops at a gap (the follower judges that one).
    pub(crate) fn apply_delivered(self: &Arc<Self>, table: &mut Table<A>, p: u32) {
        loop {
            let log = &mut table.logs[p as usize];
            // Those the follower applied already.
            while log.delivered.first_key_value().is_some_and(|(o, _)| *o < log.end) {
                log.delivered.pop_first();
            }
            let end = log.end;
            let Some(own) = log.delivered.remove(&end) else { return };
            let at = Position::new(p, end);
            match self.apply_own(table, &own.doc, at, own.state, own.deleted, &own.value) {
                Some(Applied::Valid) => self.save_row(table, &own.doc.aggregate_id),
                Some(_) => {}
                None => return,
            }
        }
    }

    /// Counts an append whose verdict the follower delivered.
    fn count_awaited(&self, decided: bool) {
        if decided {
            self.counters.awaited_appends.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The state after the valid record `doc` on top of the state `held`
    /// (its JSON; `None`: the default state, before a stream's first
    /// record): its events decoded and applied. The reason when they do
    /// not decode or the held state does not fit the model (the partition
    /// halts then).
    fn fold(&self, held: Option<&[u8]>, doc: &EventsDoc) -> Result<(Box<[u8]>, bool), String> {
        let mut state: A = match held {
            Some(bytes) => serde_json::from_slice(bytes)
                .map_err(|e| format!("the table's state does not fit the aggregate's model: {e}"))?,
            None => A::default(),
        };
        for e in &doc.events {
            let payload = e.payload_bytes()?;
            let event = self
                .codec
                .decode(&e.event_type, e.revision, &payload)
                .map_err(|err| format!("event {} (version {}) cannot be decoded: {err}", e.event_type, e.version))?;
            state.apply(&event);
        }
        encode_state(&state, &mut Vec::new()).map_err(|e| format!("the new state cannot be serialised: {e}"))
    }

    /// Moves the row of a valid record and everything that follows from it:
    /// the partition's progress, the record's table record to come, its
    /// idempotency key, the read cache, and the append waiting for it
    /// (`true` when one was).
    #[expect(clippy::too_many_arguments, reason = "one record's parts, applied together under the table lock")]
    fn settle_valid(
        &self,
        table: &mut Table<A>,
        doc: &EventsDoc,
        at: Position,
        state: Box<[u8]>,
        deleted: bool,
        size: u64,
        value: &[u8],
    ) -> bool {
        let id = doc.aggregate_id.as_str();
        let retention = self.key_retention();
        let mut row = match table.rows.take(id) {
            Some(r) => r,
            None => {
                // The read cache holds the whole history of a stream that
                // starts now.
                table.histories.insert(id.into(), Vec::new());
                TableRow::new(at)
            }
        };
        row.advance(state, deleted, doc.last_version, at, size);
        row.last_event_id = doc.last_event_id();
        if let Some(key) = &doc.metadata.idempotency_key {
            let recorded_ms = doc.recorded_at.timestamp_millis();
            row.remember_key(key.clone(), doc.last_version, at.offset, recorded_ms, retention);
        }
        table.rows.insert(id, row);
        table.applied_valid(id, at, value, self.config.read_cache_bytes);
        let log = &mut table.logs[at.partition as usize];
        log.end = at.offset + 1;
        log.last_id = Some(id.to_owned());
        if log.tenure.is_some() {
            log.unsaved.insert(at.offset, id.to_owned());
        }
        doc.first_event_id().is_some_and(|first| log.decide(first, Verdict::Valid(at)))
    }

    /// Records a void record: progress, count, one log line, and the answer
    /// to the append waiting for it (`true` when one was).
    fn void(&self, table: &mut Table<A>, doc: &EventsDoc, at: Position, why: &str) -> bool {
        table.applied_void(at);
        let log = &mut table.logs[at.partition as usize];
        log.end = at.offset + 1;
        let decided = doc.first_event_id().is_some_and(|first| log.decide(first, Verdict::Void));
        self.counters.void_records.fetch_add(1, Ordering::Relaxed);
        tracing::info!(topic = %self.events_topic, position = %at, aggregate_id = %doc.aggregate_id,
            version = doc.first_version, why, "void events record skipped (lost a race)");
        decided
    }

    /// Stops partition `at.partition` at the record at `at`, loudly; the
    /// appends waiting in it fail (their senders are dropped).
    pub(crate) fn halt(&self, table: &mut Table<A>, at: Position, id: &str, reason: String) {
        let log = &mut table.logs[at.partition as usize];
        if log.halted.is_some() {
            return;
        }
        tracing::error!(topic = %self.events_topic, position = %at, aggregate_id = id, %reason,
            "events partition halted: this version cannot read a record (a newer version wrote it?); \
             its aggregates are unavailable until a version that can read it starts");
        log.halted = Some(Halt { offset: at.offset, reason });
        log.waiting.clear();
        log.delivered.clear();
    }

    /// `Unavailable` when partition `p` is halted.
    pub(crate) fn partition_ready(&self, p: u32) -> Result<(), StoreError> {
        match &self.table().logs[p as usize].halted {
            None => Ok(()),
            Some(h) => Err(StoreError::Unavailable(format!(
                "partition {p} of {} halted at offset {}: {}",
                self.events_topic, h.offset, h.reason
            ))),
        }
    }

    /// The valid stream of `id` in partition `p` from offset `from` up to
    /// (excluding) `to`, rebuilt from the log by the validity rule: what a
    /// row must be when a gap shows that the table's picture of it is
    /// incomplete. Keeps the row's idempotency keys.
    pub(crate) async fn rebuild_stream(
        &self,
        p: u32,
        id: &str,
        from: u64,
        to: u64,
    ) -> Result<TableRow, KafkaStoreError> {
        let topic = self.events_topic.clone();
        let retention = self.key_retention();
        let mut row: Option<TableRow> = None;
        let mut unreadable = None;
        self.scan(&topic, &[(p, from, to)], Reach::Within, |m| {
            if m.key() != Some(id.as_bytes()) || unreadable.is_some() {
                return Ok(());
            }
            let at = Position::new(p, m.offset() as u64);
            let Ok(doc) = EventsDoc::decode(&topic, at, m.key(), m.payload()) else { return Ok(()) };
            let tip = row.as_ref().map_or_else(StreamTip::default, TableRow::tip);
            if judge(tip, doc.first_version, doc.previous_event_id) != Judgement::Valid {
                return Ok(());
            }
            match self.fold(row.as_ref().filter(|r| r.version > 0).map(|r| &*r.state), &doc) {
                Ok((state, deleted)) => {
                    let value = m.payload().unwrap_or_default();
                    let r = row.get_or_insert_with(|| TableRow::new(at));
                    r.advance(state, deleted, doc.last_version, at, (id.len() + value.len()) as u64);
                    r.last_event_id = doc.last_event_id();
                    if let Some(key) = doc.metadata.idempotency_key {
                        r.remember_key(key, doc.last_version, at.offset, doc.recorded_at.timestamp_millis(), retention);
                    }
                }
                Err(reason) => unreadable = Some((at, reason)),
            }
            Ok(())
        })
        .await?;
        if let Some((at, reason)) = unreadable {
            return Err(KafkaStoreError::Corrupt {
                topic,
                position: at,
                aggregate_id: Some(id.to_owned()),
                version: 0,
                reason,
            });
        }
        tracing::warn!(topic = %self.events_topic, partition = p, aggregate_id = id, from, to,
            "stream rebuilt from the events topic (the table's row of it was incomplete)");
        Ok(row.unwrap_or_else(|| TableRow::new(Position::new(p, from))))
    }

    /// Puts a rebuilt row in place of the table's, keeping the keys and
    /// reaction marks the table remembered. The read cache no longer holds
    /// its history.
    pub(crate) fn replace_row(&self, table: &mut Table<A>, id: &str, mut rebuilt: TableRow) {
        let retention = self.key_retention();
        if let Some(old) = table.rows.get(id) {
            for k in old.keys() {
                if rebuilt.key(&k.key).is_none() {
                    rebuilt.remember_key(k.key.clone(), k.version, k.offset, k.recorded_ms, retention);
                }
            }
            for m in old.marks() {
                rebuilt.keep_mark(m);
            }
        }
        table.forget_history(id);
        table.rows.insert(id, rebuilt);
    }

    /// Starts the follower: a task that reads every events partition from
    /// where the table stands and applies each record. It ends when the
    /// store is dropped.
    pub(crate) fn start_following(self: &Arc<Self>) -> Result<(), KafkaStoreError> {
        let consumer = create_consumer(&self.config, false, follow_wait_ms(&self.config), Reach::Within)?;
        let mut tpl = TopicPartitionList::new();
        {
            let mut table = self.table();
            table.keep_tails();
            for (p, log) in table.logs.iter().enumerate() {
                tpl.add_partition_offset(&self.events_topic, p as i32, start_at(log.end))
                    .map_err(|e| KafkaStoreError::from_kafka("follow", &e))?;
            }
        }
        consumer.assign(&tpl).map_err(|e| KafkaStoreError::from_kafka("follow", &e))?;
        tokio::spawn(follow(Arc::downgrade(self), consumer));
        Ok(())
    }

    /// Applies one record the follower received; a gap rebuilds the stream
    /// first. Tells everyone waiting for progress.
    async fn follow_record(self: &Arc<Self>, at: Position, key: Option<&[u8]>, value: Option<&[u8]>) {
        let doc = EventsDoc::decode(&self.events_topic, at, key, value);
        let doc = match doc {
            Ok(doc) => doc,
            Err(e) => {
                // Not a KES events record at all: nothing can be judged past
                // it without guessing.
                let id = key.map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
                self.halt(&mut self.table(), at, &id, e.to_string());
                self.progress.send_modify(|n| *n += 1);
                return;
            }
        };
        let size = (key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len)) as u64;
        let bytes = value.unwrap_or_default();
        let applied = self.apply_record(&mut self.table(), &doc, at, size, bytes, false);
        let applied = if applied == Applied::Gap {
            let id = doc.aggregate_id.clone();
            let from = self.table().rows.get(id.as_str()).map_or(0, |r| r.first_offset);
            match self.rebuild_stream(at.partition, &id, from, at.offset).await {
                Ok(row) => {
                    let mut table = self.table();
                    self.replace_row(&mut table, &id, row);
                    self.apply_record(&mut table, &doc, at, size, bytes, true)
                }
                Err(e) => {
                    self.halt(&mut self.table(), at, &id, format!("rebuilding its stream failed: {e}"));
                    Applied::Halted
                }
            }
        } else {
            applied
        };
        {
            let mut table = self.table();
            if applied == Applied::Valid {
                self.save_row(&mut table, &doc.aggregate_id);
            }
            self.apply_delivered(&mut table, at.partition);
        }
        self.progress.send_modify(|n| *n += 1);
    }

    /// Whether the record at `at` is below what the table applied (the
    /// follower then passes it over without reading it).
    fn already_applied(&self, at: Position) -> bool {
        let table = self.table();
        let log = &table.logs[at.partition as usize];
        log.halted.is_some() || at.offset < log.end
    }

    /// Waits, at most `timeout`, until the table applied the record at
    /// `at` (or the partition halted before it: `false`).
    pub(crate) async fn wait_applied(&self, at: Position, timeout: Duration) -> bool {
        let Some(p) = usize::try_from(at.partition).ok().filter(|p| *p < self.partitions as usize) else {
            return false;
        };
        let deadline = Instant::now() + timeout;
        let mut progress = self.progress.subscribe();
        loop {
            progress.borrow_and_update();
            {
                let table = self.table();
                let log = &table.logs[p];
                if log.end > at.offset {
                    return true;
                }
                if log.halted.is_some() {
                    return false;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, progress.changed()).await.is_err() {
                return false;
            }
        }
    }

    /// Waits, at most `timeout`, until partition `p`'s table applied the
    /// whole partition as the broker has it now.
    pub(crate) async fn catch_up_partition(&self, p: u32, timeout: Duration) -> Result<bool, StoreError> {
        let high = self.partition_head(p).await?;
        if high == 0 {
            return Ok(true);
        }
        Ok(self.wait_applied(Position::new(p, high - 1), timeout).await)
    }

    /// The high watermark of events partition `p` as the broker has it at
    /// some moment after this call began. Concurrent callers share reads:
    /// one read runs at a time per partition, and a caller takes the last
    /// one when it started after the caller did (a reaction catching up
    /// asks for the same partition's head dozens of times at once, and a
    /// client serves watermark requests one after another).
    async fn partition_head(&self, p: u32) -> Result<u64, StoreError> {
        let called = std::time::Instant::now();
        let Some(slot) = self.heads.get(p as usize) else {
            return Err(StoreError::Invalid(format!("no events partition {p}")));
        };
        let mut last = slot.lock().await;
        if let Some((started, high)) = *last
            && started >= called
        {
            return Ok(high);
        }
        let started = std::time::Instant::now();
        let high = self.high_watermark(&self.events_topic, p).await?;
        *last = Some((started, high));
        Ok(high)
    }

    /// The figures of [`FollowerStats`].
    pub(crate) fn follower_stats(&self) -> FollowerStats {
        let table = self.table();
        let c = &self.counters;
        FollowerStats {
            applied: table.logs.iter().map(|l| l.end).collect(),
            void_records: c.void_records.load(Ordering::Relaxed),
            fast_path_appends: c.fast_path_appends.load(Ordering::Relaxed),
            awaited_appends: c.awaited_appends.load(Ordering::Relaxed),
            lost_races: c.lost_races.load(Ordering::Relaxed),
            subscribed_from_tail: c.subscribed_from_tail.load(Ordering::Relaxed),
            subscribed_from_broker: c.subscribed_from_broker.load(Ordering::Relaxed),
            table_records_scanned: c.table_records_scanned.load(Ordering::Relaxed),
            subscription_seeks: c.subscription_seeks.load(Ordering::Relaxed),
            halted: table
                .logs
                .iter()
                .enumerate()
                .filter_map(|(p, l)| {
                    l.halted.as_ref().map(|h| HaltedPartition {
                        partition: p as u32,
                        offset: h.offset,
                        reason: h.reason.clone(),
                    })
                })
                .collect(),
        }
    }
}

/// The follower task: receives every record of the events topic and
/// applies it, until the store is dropped. Consumer errors are logged and
/// waited out; librdkafka reconnects by itself.
async fn follow<A: Aggregate>(store: std::sync::Weak<Inner<A>>, consumer: Reader) {
    loop {
        let next = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await;
        let Some(inner) = store.upgrade() else { return };
        match next {
            Err(_) => {}
            Ok(Ok(m)) => {
                let Ok(offset) = u64::try_from(m.offset()) else { continue };
                let Some(p) = u32::try_from(m.partition()).ok().filter(|p| *p < inner.partitions) else { continue };
                let at = Position::new(p, offset);
                if inner.already_applied(at) {
                    continue;
                }
                // Owned, so that a gap's rebuild may await with it.
                let owned = m.detach();
                inner.follow_record(at, owned.key(), owned.payload()).await;
            }
            Ok(Err(e)) if e.rdkafka_error_code().is_some_and(is_transient) => {
                tracing::debug!(topic = %inner.events_topic, error = %e, "follower waiting for the broker");
            }
            Ok(Err(e)) => {
                tracing::warn!(topic = %inner.events_topic, error = %e, "follower: reading failed; retrying");
                drop(inner);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
