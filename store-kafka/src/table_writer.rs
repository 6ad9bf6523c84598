//! Writing table records: one per aggregate at a time, a short delay after
//! its row changed, retried in the background until acknowledged; and
//! `flush`, which cuts the delays short and waits for every record. An
//! acknowledged record lets its partition's catch-up mark move on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use kes_core::Aggregate;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::error::KafkaStoreError;
use crate::record::{TableDoc, partition_for};
use crate::rows::WriteMarks;
use crate::store::Inner;
use crate::table::{PartitionLog, Table};

/// The table writer's bookkeeping, shared by its background tasks and
/// `flush`.
pub(crate) struct TableWrites {
    /// Bumped by `flush` to end every table record's wait at once: each
    /// waiting record watches it and is written as soon as it changes.
    flush_requests: tokio::sync::watch::Sender<u64>,
    /// How many `flush` calls are running: while any is, table records are
    /// written without delay.
    flushes_running: AtomicUsize,
    /// Table records waiting for their delay or for their acknowledgement
    /// (`flush` waits for this to reach zero).
    pending_records: AtomicUsize,
}

impl TableWrites {
    pub(crate) fn new() -> Self {
        Self {
            flush_requests: tokio::sync::watch::Sender::new(0),
            flushes_running: AtomicUsize::new(0),
            pending_records: AtomicUsize::new(0),
        }
    }
}

impl<A: Aggregate> Inner<A> {
    /// [`KafkaStore::flush`](crate::KafkaStore::flush): ends every table
    /// record's wait, writes them and waits for the acknowledgements.
    pub(crate) async fn flush(self: &Arc<Self>, timeout: Duration) -> Result<(), KafkaStoreError> {
        let writes = &self.table_writes;
        writes.flushes_running.fetch_add(1, Ordering::AcqRel);
        writes.flush_requests.send_modify(|n| *n = n.wrapping_add(1));
        let deadline = Instant::now() + timeout;
        // Right after start the owners' group may not have assigned this
        // instance its partitions yet: a flush waits for that, so that a
        // single instance's flush writes every partition's records.
        let mut settled = self.owners_settled.subscribe();
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(left, settled.wait_for(|s| *s)).await;
        let result = self.flush_until(deadline).await;
        writes.flushes_running.fetch_sub(1, Ordering::AcqRel);
        result
    }

    /// Waits until no table record is waiting or unacknowledged.
    async fn await_table_records(&self, deadline: Instant) -> Result<(), KafkaStoreError> {
        let pending = &self.table_writes.pending_records;
        while pending.load(Ordering::Acquire) > 0 {
            if Instant::now() >= deadline {
                return Err(KafkaStoreError::Unavailable(format!(
                    "flush: {} table records not acknowledged in time",
                    pending.load(Ordering::Acquire)
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// [`KafkaStore::flush`](crate::KafkaStore::flush) once the waits are
    /// cut short.
    async fn flush_until(self: &Arc<Self>, deadline: Instant) -> Result<(), KafkaStoreError> {
        self.await_table_records(deadline).await?;
        let producer = self.producer();
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::task::spawn_blocking(move || producer.flush(left))
            .await
            .map_err(|e| KafkaStoreError::Broker(format!("flush: {e}")))?
            .map_err(|e| KafkaStoreError::from_kafka("flush", &e))?;
        // Every row is written now, but the records claim only what was
        // acknowledged when each was built. One more record per partition
        // claims the whole partition, so the next start replays nothing.
        let mut marks = Vec::new();
        {
            let mut table = self.table();
            for p in 0..table.logs.len() {
                let log = &table.logs[p];
                let behind = log.tenure.is_some() && log.reflected_below() > log.claimed;
                if let Some(id) = log.last_id.clone().filter(|_| behind)
                    && table.rows.mark_writes(&id, |m| !std::mem::replace(&mut m.writing, true)) == Some(true)
                {
                    self.table_writes.pending_records.fetch_add(1, Ordering::AcqRel);
                    marks.push(id);
                }
            }
            for id in &marks {
                self.send_row(&mut table, id);
            }
        }
        self.await_table_records(deadline).await
    }

    /// The table record of `id` as the table holds it now, and its events
    /// partition.
    pub(crate) fn table_doc(&self, table: &Table<A>, id: &str) -> Option<(TableDoc, u32)> {
        let row = table.rows.get(id)?;
        let p = row.partition;
        // The table wrote these bytes from a typed state: they are JSON.
        let state = crate::record::StateJson::from_bytes(row.state);
        Some((
            TableDoc {
                format: Some(crate::record::TABLE_FORMAT.to_owned()),
                aggregate_type: A::NAME.to_owned(),
                aggregate_id: id.to_owned(),
                version: row.version,
                deleted: row.deleted,
                state,
                state_version: A::STATE_VERSION,
                events_partition: p,
                first_offset: row.first_offset,
                last_offset: row.last_offset,
                offsets: row.offsets_vec(),
                max_record_bytes: u64::from(row.max_bytes),
                reflected_below: table.logs.get(p as usize).map_or(0, PartitionLog::reflected_below),
                last_event_id: row.last_event_id,
                epoch: table.logs.get(p as usize).and_then(|l| l.tenure).map_or(0, |t| t.epoch),
                idempotency_keys: row.keys().clone(),
                reaction_marks: row.marks().to_vec(),
                updated_at: chrono::Utc::now(),
            },
            p,
        ))
    }

    /// Hands a table record to the producer. Called with the table locked,
    /// so that two records of one id enter the producer in the order their
    /// states were reached.
    pub(crate) fn send_table_doc(
        &self,
        doc: TableDoc,
    ) -> Result<(rdkafka::producer::DeliveryFuture, Arc<FutureProducer>), KafkaStoreError> {
        let value = serde_json::to_vec(&doc).map_err(|e| KafkaStoreError::Broker(format!("table record: {e}")))?;
        let partition = partition_for(&doc.aggregate_id, self.table_partitions) as i32;
        let mut record =
            FutureRecord::to(&self.table_topic).key(&doc.aggregate_id).payload(&value).partition(partition);
        if let Some(headers) = doc.headers() {
            record = record.headers(headers);
        }
        let producer = self.producer();
        let sent = producer.send_result(record).map_err(|(e, _)| KafkaStoreError::from_kafka("table record", &e))?;
        Ok((sent, producer))
    }

    /// After [`KafkaStoreConfig::table_write_delay`](crate::KafkaStoreConfig::table_write_delay),
    /// writes the current table record of `id` and, once the broker has it,
    /// forgets the events records it reflects; retries in the background
    /// until it succeeds or the store is dropped.
    ///
    /// One table record per id is waiting or in flight at a time: commands
    /// arriving meanwhile only mark the row stale, and the next record
    /// carries the latest state (a busy aggregate writes far fewer table
    /// records than events records, and its records can never overtake each
    /// other).
    pub(crate) fn save_row(self: &Arc<Self>, table: &mut Table<A>, id: &str) {
        let Some(row) = table.rows.get(id) else { return };
        // Only the partition's owner writes its table records.
        if table.logs.get(row.partition as usize).is_none_or(|l| l.tenure.is_none()) {
            return;
        }
        let started = table.rows.mark_writes(id, |m| {
            if m.writing {
                m.stale = true;
                false
            } else {
                *m = WriteMarks { writing: true, stale: false };
                true
            }
        });
        if started != Some(true) {
            return;
        }
        self.table_writes.pending_records.fetch_add(1, Ordering::AcqRel);
        let delay = self.config.table_write_delay;
        if delay.is_zero() || self.table_writes.flushes_running.load(Ordering::Acquire) > 0 {
            self.send_row(table, id);
            return;
        }
        let weak = Arc::downgrade(self);
        let id = id.to_owned();
        let mut flush_requested = self.table_writes.flush_requests.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = flush_requested.changed() => {}
            }
            let Some(inner) = weak.upgrade() else { return };
            let mut table = inner.table();
            inner.send_row(&mut table, &id);
        });
    }

    /// Hands the table record of `id`, built now, to the producer, and
    /// follows it up: `row_saved` once acknowledged, retries otherwise.
    /// The row is marked `table_writing` and counted in
    /// `pending_records` already.
    fn send_row(self: &Arc<Self>, table: &mut Table<A>, id: &str) {
        let owned = table.rows.get(id).is_some_and(|r| table.logs[r.partition as usize].tenure.is_some());
        table.rows.mark_writes(id, |m| {
            // The record carries whatever arrived while it waited.
            m.stale = false;
            if !owned {
                // The tenure ended while it waited: the new owner writes it.
                m.writing = false;
            }
        });
        if !owned {
            self.table_writes.pending_records.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let Some((doc, p)) = self.table_doc(table, id) else {
            self.table_writes.pending_records.fetch_sub(1, Ordering::AcqRel);
            return;
        };
        let (last, claims) = (doc.last_offset, doc.reflected_below);
        let sent = self.send_table_doc(doc);
        let weak = Arc::downgrade(self);
        let id = id.to_owned();
        tokio::spawn(async move {
            let outcome = match sent {
                Ok((delivery, producer)) => match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    _ => Err(Some(producer)),
                },
                Err(_) => Err(None),
            };
            let Some(inner) = weak.upgrade() else { return };
            match outcome {
                Ok(()) => inner.row_saved(p, &id, last, claims),
                Err(producer) => {
                    if let Some(producer) = producer {
                        inner.heal_producer(&producer, true);
                    }
                    drop(inner);
                    retry_save(weak.clone(), id).await;
                }
            }
            if let Some(inner) = weak.upgrade() {
                inner.table_writes.pending_records.fetch_sub(1, Ordering::AcqRel);
            }
        });
    }

    /// The table record of `id` up to events offset `last` is acknowledged.
    /// The record claimed every events record below `claims`.
    fn row_saved(self: &Arc<Self>, p: u32, id: &str, last: u64, claims: u64) {
        let mut table = self.table();
        let log = &mut table.logs[p as usize];
        log.claimed = log.claimed.max(claims);
        log.forget_saved(id, last);
        let again = table.rows.mark_writes(id, |m| {
            m.writing = false;
            std::mem::take(&mut m.stale)
        }) == Some(true);
        if again {
            self.save_row(&mut table, id);
        }
    }
}

/// Writes the table record of `id` again (built anew each time) with a
/// growing pause, until the broker acknowledges one or the store is dropped.
async fn retry_save<A: Aggregate>(weak: Weak<Inner<A>>, id: String) {
    let mut delay = Duration::from_millis(500);
    loop {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
        let Some(inner) = weak.upgrade() else { return };
        let sent = {
            let table = inner.table();
            inner
                .table_doc(&table, &id)
                .map(|(doc, p)| (doc.last_offset, doc.reflected_below, p, inner.send_table_doc(doc)))
        };
        let Some((last, claims, p, sent)) = sent else { return };
        if let Ok((delivery, producer)) = sent {
            if matches!(delivery.await, Ok(Ok(_))) {
                inner.row_saved(p, &id, last, claims);
                return;
            }
            inner.heal_producer(&producer, true);
        }
        tracing::debug!(%id, "table record still not written; retrying");
    }
}
