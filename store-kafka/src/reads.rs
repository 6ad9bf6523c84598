//! Reading the topics: high watermarks, bounded reads (a scan of offset
//! ranges, a fetch of given offsets, a stream's page of events built from
//! its records), and the endless subscription to the events topic.
//! Nothing here changes the table.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use futures::stream;
use kes_core::{Aggregate, Checkpoint, Codec, Envelope, EventStream, Logged, Position, StoreError};
use rdkafka::TopicPartitionList;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::Producer;
use rdkafka::util::Timeout;

use crate::client::{BOUNDED_FETCH_WAIT_MS, Detached, Reach, Reader, create_consumer, start_at};
use crate::error::{KafkaStoreError, is_transient};
use crate::record::EventsDoc;
use crate::store::Inner;
use crate::tail::{Standing, TailRecord};

/// `read` fetches a stream's records by offset; from one of them to the
/// next it reads through up to this many other records rather than seek.
/// A seek costs a new fetch round trip, and on brokers that answer every
/// fetch with up to `fetch.max.bytes` whatever the partition bound (Tansu
/// 0.6: about 2,000 records of a few hundred bytes, each looked up on its
/// own) a seek costs as much as reading that far ahead. On Apache Kafka
/// reading through 2,048 small records costs about a megabyte of transfer.
const READ_THROUGH_RECORDS: u64 = 2048;

impl<A: Aggregate> Inner<A> {
    /// High watermarks of the events topic's partitions (or, at start, of
    /// the table topic's): `partitions` of them, of `topic`. Each partition
    /// is asked on a thread of its own, so the answers' round trips overlap.
    pub(crate) async fn high_watermarks(&self, topic: &str, partitions: u32) -> Result<Vec<u64>, KafkaStoreError> {
        futures::future::try_join_all((0..partitions).map(|p| self.high_watermark(topic, p))).await
    }

    /// The high watermark of partition `p` of `topic`.
    pub(crate) async fn high_watermark(&self, topic: &str, p: u32) -> Result<u64, KafkaStoreError> {
        let producer = self.producer();
        let topic = topic.to_owned();
        let timeout = self.config.request_timeout;
        let high = tokio::task::spawn_blocking(move || {
            producer.client().fetch_watermarks(&topic, p as i32, Timeout::After(timeout)).map(|(_, high)| high)
        })
        .await
        .map_err(|e| KafkaStoreError::Broker(format!("watermark: {e}")))?
        .map_err(|e| KafkaStoreError::from_kafka("watermark", &e))?;
        Ok(u64::try_from(high).unwrap_or(0))
    }

    /// The events topic's head: the next offset of every partition that
    /// holds records.
    pub(crate) async fn head(&self) -> Result<Checkpoint, StoreError> {
        let marks = self.high_watermarks(&self.events_topic, self.partitions).await?;
        let mut head = Checkpoint::start();
        for (p, high) in marks.into_iter().enumerate() {
            if high > 0 {
                head.set_next(p as u32, high);
            }
        }
        Ok(head)
    }

    /// Reads `topic` partition by partition from each start offset up to
    /// (excluding) each end offset, calling `f` on every record in order.
    /// `reach` says whether the ends are the partitions' heads (larger
    /// fetches then bring nothing unwanted). Fails with `Unavailable` when
    /// no record arrives for the request timeout.
    pub(crate) async fn scan(
        &self,
        topic: &str,
        ranges: &[(u32, u64, u64)],
        reach: Reach,
        f: impl FnMut(&BorrowedMessage<'_>) -> Result<(), KafkaStoreError>,
    ) -> Result<(), KafkaStoreError> {
        let open: HashMap<i32, u64> =
            ranges.iter().filter(|(_, from, to)| from < to).map(|(p, _, to)| (*p as i32, *to)).collect();
        if open.is_empty() {
            return Ok(());
        }
        let consumer = Detached::new(create_consumer(&self.config, true, BOUNDED_FETCH_WAIT_MS, reach)?);
        assign_ranges(&consumer, topic, ranges)?;
        self.consume_ranges(&consumer, topic, open, f).await
    }

    /// Reads `partitions` partitions of `topic` from their first records to
    /// their current heads, calling `f` on every record in order, and
    /// returns the heads it read to (high watermarks). The reader connects
    /// and starts fetching while the heads are asked for, so a start-up
    /// pays one round trip less than [`Inner::scan`] after
    /// [`Inner::high_watermarks`]; records past a head, fetched meanwhile,
    /// are skipped.
    pub(crate) async fn scan_to_heads(
        &self,
        topic: &str,
        partitions: u32,
        f: impl FnMut(&BorrowedMessage<'_>) -> Result<(), KafkaStoreError>,
    ) -> Result<Vec<u64>, KafkaStoreError> {
        let consumer = Detached::new(create_consumer(&self.config, true, BOUNDED_FETCH_WAIT_MS, Reach::ToTheHead)?);
        let unbounded: Vec<_> = (0..partitions).map(|p| (p, 0, u64::MAX)).collect();
        assign_ranges(&consumer, topic, &unbounded)?;
        let high = self.high_watermarks(topic, partitions).await?;
        let open: HashMap<i32, u64> =
            high.iter().enumerate().filter(|(_, to)| **to > 0).map(|(p, to)| (p as i32, *to)).collect();
        if !open.is_empty() {
            self.consume_ranges(&consumer, topic, open, f).await?;
        }
        Ok(high)
    }

    /// The reading loop of [`Inner::scan`]: records of the partitions in
    /// `open` (partition → end offset, exclusive) until each reached its end.
    async fn consume_ranges(
        &self,
        consumer: &Reader,
        topic: &str,
        mut open: HashMap<i32, u64>,
        mut f: impl FnMut(&BorrowedMessage<'_>) -> Result<(), KafkaStoreError>,
    ) -> Result<(), KafkaStoreError> {
        let idle = self.config.request_timeout;
        let mut deadline = Instant::now() + idle;
        while !open.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = tokio::time::timeout(left, consumer.recv()).await;
            match next {
                Err(_) => {
                    return Err(KafkaStoreError::Unavailable(format!(
                        "reading {topic}: nothing received for {idle:?} ({} partitions unfinished)",
                        open.len()
                    )));
                }
                Ok(Ok(message)) => {
                    deadline = Instant::now() + idle;
                    let p = message.partition();
                    let Some(end) = open.get(&p).copied() else { continue };
                    let offset = u64::try_from(message.offset()).unwrap_or(0);
                    if offset >= end {
                        open.remove(&p);
                        continue;
                    }
                    f(&message)?;
                    if offset + 1 >= end {
                        open.remove(&p);
                    }
                }
                Ok(Err(KafkaError::PartitionEOF(p))) => {
                    open.remove(&p);
                }
                Ok(Err(e)) if e.rdkafka_error_code().is_some_and(is_transient) => {
                    tracing::debug!(topic, error = %e, "transient error while reading; librdkafka retries");
                }
                Ok(Err(e)) => return Err(KafkaStoreError::from_kafka(&format!("reading {topic}"), &e)),
            }
        }
        Ok(())
    }

    /// Reads the records at `offsets` (ascending) of one partition: reads
    /// through gaps of up to [`READ_THROUGH_RECORDS`] other records and
    /// seeks over longer ones, so a stream whose records lie close together
    /// costs a few sequential fetches, and one spread thin costs a fetch
    /// per stretch, never one per record of the partition.
    async fn fetch_at(
        &self,
        topic: &str,
        partition: u32,
        offsets: &[u64],
        mut f: impl FnMut(&BorrowedMessage<'_>) -> Result<(), KafkaStoreError>,
    ) -> Result<(), KafkaStoreError> {
        let Some(first) = offsets.first() else { return Ok(()) };
        let consumer = Detached::new(create_consumer(&self.config, false, BOUNDED_FETCH_WAIT_MS, Reach::Within)?);
        assign_at(&consumer, topic, partition, *first)?;
        let idle = self.config.request_timeout;
        let mut deadline = Instant::now() + idle;
        let mut i = 0;
        let mut retries = 0;
        while i < offsets.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = match tokio::time::timeout(left, consumer.recv()).await {
                Err(_) => {
                    return Err(KafkaStoreError::Unavailable(format!(
                        "reading {topic}: record {partition}:{} not received within {idle:?}",
                        offsets[i]
                    )));
                }
                Ok(Err(e)) if e.rdkafka_error_code().is_some_and(is_transient) => continue,
                Ok(Err(e)) => return Err(KafkaStoreError::from_kafka(&format!("reading {topic}"), &e)),
                Ok(Ok(m)) => m,
            };
            deadline = Instant::now() + idle;
            let offset = u64::try_from(message.offset()).unwrap_or(0);
            let wanted = offsets[i];
            if offset < wanted {
                continue;
            }
            if offset > wanted {
                // Stale prefetch from before a jump, or the record is gone.
                retries += 1;
                if retries > 3 {
                    return Err(missing_record(topic, Position::new(partition, wanted)));
                }
                assign_at(&consumer, topic, partition, wanted)?;
                continue;
            }
            retries = 0;
            f(&message)?;
            i += 1;
            if let Some(next) = offsets.get(i).filter(|n| **n > offset + READ_THROUGH_RECORDS) {
                assign_at(&consumer, topic, partition, *next)?;
            }
        }
        Ok(())
    }

    /// At most `limit` events of `id` after version `after`, oldest first.
    ///
    /// The row knows the offsets of the aggregate's records, so only they
    /// are fetched (see [`Inner::fetch_at`]), and only those that can hold
    /// the page: record `i` (from 0) holds versions from `i + 1` on, so
    /// records from index `after + limit` on are never needed; when every
    /// record holds one event (most aggregates), record `i` is version
    /// `i + 1` and the page is exactly records `after..after + limit`.
    /// While the row's records are all in the read cache, nothing is
    /// fetched.
    pub(crate) async fn read_stream(
        self: &Arc<Self>,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Envelope<A::Event>>, StoreError> {
        let p = self.partition_checked(id)?;
        self.partition_ready(p)?;
        let Some(records) = self.stream_records(id) else { return Ok(Vec::new()) };
        if after >= records.version || limit == 0 {
            return Ok(Vec::new());
        }
        let pick = PageSelection::new(after, limit, records.version, records.offsets.len());
        let topic = &self.events_topic;
        let mut page = PageCollector {
            id,
            topic,
            codec: &*self.codec,
            after,
            wanted_end: pick.wanted_end,
            have: if pick.one_per_record { after } else { 0 },
            last_event: None,
            events: Vec::new(),
        };
        let offsets = &records.offsets;
        let cached = records.history.filter(|h| h.len() == offsets.len() && !h.is_empty());
        if let Some(history) = cached {
            for (value, offset) in history.iter().zip(offsets).skip(pick.skip).take(pick.take.saturating_sub(pick.skip))
            {
                page.keep(Position::new(p, *offset), Some(id.as_bytes()), Some(value))?;
            }
        } else if offsets.is_empty() {
            let range = [(p, records.from, records.to)];
            self.scan(topic, &range, Reach::Within, |m| {
                page.keep(Position::new(p, m.offset() as u64), m.key(), m.payload())
            })
            .await?;
        } else {
            let selected = offsets.get(pick.skip..pick.take).unwrap_or_default();
            self.fetch_at(topic, p, selected, |m| page.keep(Position::new(p, m.offset() as u64), m.key(), m.payload()))
                .await?;
        }
        Ok(page.events)
    }

    /// What the table knows of the records of `id`, copied out so that the
    /// table is unlocked while they are read.
    fn stream_records(&self, id: &str) -> Option<StreamRecords> {
        let table = self.table();
        table.rows.get(id).map(|r| StreamRecords {
            from: r.first_offset,
            to: r.last_offset + 1,
            version: r.version,
            offsets: r.offsets_vec(),
            history: table.histories.get(id).cloned(),
        })
    }

    /// An endless stream of the events topic's records from `from` on (see
    /// [`Subscription`]).
    pub(crate) fn subscribe(self: &Arc<Self>, from: &Checkpoint) -> Result<EventStream<A::Event>, StoreError> {
        let reader = Subscription {
            next: (0..self.partitions).map(|p| from.next_offset(p)).collect(),
            ready: VecDeque::new(),
            turn: 0,
            below: None,
            progress: self.progress.subscribe(),
            store: Arc::clone(self),
        };
        let stream = stream::unfold(reader, |mut reader| async move {
            let item = reader.next().await;
            Some((item, reader))
        });
        Ok(Box::pin(stream))
    }

    /// Whether the record at `at` (of `id`, up to `last_version`) is one of
    /// the valid records the table applied; waits until the table applied
    /// it (the follower judges every record first). A halted partition
    /// makes the wait an `Unavailable` error after a while, retried by the
    /// caller.
    async fn judged_valid(&self, at: Position, id: &str, last_version: u64) -> Result<bool, StoreError> {
        while !self.wait_applied(at, self.config.request_timeout).await {
            self.partition_ready(at.partition)?;
        }
        let table = self.table();
        Ok(table.rows.get(id).is_some_and(|row| row.holds_record(at.offset, last_version)))
    }
}

/// Assigns `consumer` to `ranges` (partition, from, to) of `topic`, each
/// from its start; empty ranges are left out.
fn assign_ranges(consumer: &Reader, topic: &str, ranges: &[(u32, u64, u64)]) -> Result<(), KafkaStoreError> {
    let mut tpl = TopicPartitionList::new();
    for (p, from, _) in ranges.iter().filter(|(_, from, to)| from < to) {
        tpl.add_partition_offset(topic, *p as i32, start_at(*from))
            .map_err(|e| KafkaStoreError::from_kafka("assign", &e))?;
    }
    consumer.assign(&tpl).map_err(|e| KafkaStoreError::from_kafka("assign", &e))
}

/// Assigns `consumer` to `partition` of `topic` alone, from offset `at`
/// (a seek that drops what was prefetched).
fn assign_at(consumer: &Reader, topic: &str, partition: u32, at: u64) -> Result<(), KafkaStoreError> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition as i32, start_at(at))
        .and_then(|()| consumer.assign(&tpl))
        .map_err(|e| KafkaStoreError::from_kafka("assign", &e))
}

/// The record the table lists at `at` is not in the partition.
fn missing_record(topic: &str, at: Position) -> KafkaStoreError {
    KafkaStoreError::Corrupt {
        topic: topic.to_owned(),
        position: at,
        aggregate_id: None,
        version: 0,
        reason: "the record is missing from the partition".into(),
    }
}

/// A row's records as `read_stream` needs them.
struct StreamRecords {
    /// The row's first and (excluding) past its last records' offsets.
    from: u64,
    to: u64,
    version: u64,
    /// Every record's offset, ascending (empty when unknown).
    offsets: Vec<u64>,
    /// The records' values, while the read cache holds them.
    history: Option<Vec<Arc<[u8]>>>,
}

/// Which of a stream's records one page needs: records `skip..take` of
/// the row's list.
struct PageSelection {
    /// The page ends at this version (included).
    wanted_end: u64,
    /// Every record holds one event: record `i` is version `i + 1`.
    one_per_record: bool,
    skip: usize,
    take: usize,
}

impl PageSelection {
    /// The records that can hold the events after `after`, at most `limit`
    /// of them, of a stream at `version` with `records` records.
    fn new(after: u64, limit: usize, version: u64, records: usize) -> Self {
        let wanted_end = after.saturating_add(u64::try_from(limit).unwrap_or(u64::MAX)).min(version);
        let one_per_record = records as u64 == version;
        let skip = if one_per_record { usize::try_from(after).unwrap_or(usize::MAX) } else { 0 };
        let take = usize::try_from(wanted_end).unwrap_or(usize::MAX).min(records);
        Self { wanted_end, one_per_record, skip, take }
    }
}

/// Builds one page of a stream from its records, in log order.
struct PageCollector<'a, E> {
    id: &'a str,
    topic: &'a str,
    codec: &'a dyn Codec<E>,
    /// The page starts after this version.
    after: u64,
    /// The page ends at this version (included).
    wanted_end: u64,
    /// The last version seen, kept or not: records continue it.
    have: u64,
    /// The last event seen (when the page reads from the stream's start):
    /// a record decided on another one is void.
    last_event: Option<uuid::Uuid>,
    events: Vec<Envelope<E>>,
}

impl<E: kes_core::DomainEvent> PageCollector<'_, E> {
    /// Takes the page's events from the record at `at`; records of other
    /// aggregates, and records before or past the page, are passed over.
    fn keep(&mut self, at: Position, key: Option<&[u8]>, value: Option<&[u8]>) -> Result<(), KafkaStoreError> {
        if key != Some(self.id.as_bytes()) {
            return Ok(());
        }
        let doc = EventsDoc::decode(self.topic, at, key, value)?;
        if doc.last_version <= self.have || self.have >= self.wanted_end {
            return Ok(());
        }
        // The validity rule (see `validity`): a record decided on a record
        // that is not the stream's last valid one is void.
        if let (Some(last), Some(previous)) = (self.last_event, doc.previous_event_id)
            && last != previous
        {
            return Ok(());
        }
        if doc.first_version != self.have + 1 {
            return Err(KafkaStoreError::Corrupt {
                topic: self.topic.to_owned(),
                position: at,
                aggregate_id: Some(self.id.to_owned()),
                version: doc.first_version,
                reason: format!("versions after {} are missing", self.have),
            });
        }
        self.have = doc.last_version;
        self.last_event = doc.last_event_id();
        for raw in doc.into_raw(self.topic, at)? {
            let version = raw.version;
            if version <= self.after || version > self.wanted_end {
                continue;
            }
            self.events.push(raw.decode(self.codec).map_err(|e| KafkaStoreError::Corrupt {
                topic: self.topic.to_owned(),
                position: at,
                aggregate_id: Some(self.id.to_owned()),
                version,
                reason: e.to_string(),
            })?);
        }
        Ok(())
    }
}

/// Most records a subscription takes from one partition's tail at a time
/// (under one lock of the table).
const TAKE_AT_ONCE: usize = 256;

/// One subscription. It trails the store's follower: each record is
/// delivered once the follower judged it, with its events when it is valid
/// and without them when it is void (so that projections never see a
/// record that lost a race, yet their checkpoints pass it).
///
/// At the head of the log the records come from the partitions' tails
/// (see `tail`), which the follower and the appends fill: the broker
/// serves them once, to the follower. Only a partition whose next record
/// lies below its tail (a subscription from an old checkpoint, a rebuild,
/// one that fell behind) is read from the broker, by a consumer of the
/// subscription's own that exists while any partition needs it.
struct Subscription<A: Aggregate> {
    store: Arc<Inner<A>>,
    /// Per partition, the offset of the next record to deliver.
    next: Vec<u64>,
    /// Records taken from the tails, delivered in this order.
    ready: VecDeque<(Position, TailRecord)>,
    /// The partition whose tail is taken from first next time (each gets
    /// its turn).
    turn: usize,
    /// The consumer of the partitions below their tails, and which those
    /// are.
    below: Option<(Detached<Reader>, Vec<u32>)>,
    progress: tokio::sync::watch::Receiver<u64>,
}

/// What a subscription waited for.
enum Woken {
    Progress,
    /// A record of a partition below its tail, decoded.
    Record(Result<(Position, Box<Result<EventsDoc, KafkaStoreError>>), KafkaError>),
}

impl<A: Aggregate> Subscription<A> {
    /// The next record. Transient consumer errors are left to librdkafka,
    /// which reconnects by itself; the stream just waits.
    async fn next(&mut self) -> Result<Logged<A::Event>, StoreError> {
        loop {
            if let Some((at, record)) = self.ready.pop_front() {
                self.store.counters.subscribed_from_tail.fetch_add(1, Ordering::Relaxed);
                return self.deliver_taken(at, record);
            }
            let below = self.take_from_tails();
            if !self.ready.is_empty() {
                continue;
            }
            self.read_below(below)?;
            let woken = match &self.below {
                Some((consumer, _)) => tokio::select! {
                    _ = self.progress.changed() => Woken::Progress,
                    m = consumer.recv() => Woken::Record(m.map(|m| {
                        let at = Position::new(m.partition() as u32, m.offset() as u64);
                        (at, Box::new(EventsDoc::decode(&self.store.events_topic, at, m.key(), m.payload())))
                    })),
                },
                None => {
                    // The sender lives as long as the store this holds.
                    let _ = self.progress.changed().await;
                    Woken::Progress
                }
            };
            match woken {
                Woken::Progress => {}
                Woken::Record(Ok((at, doc))) => {
                    let p = at.partition as usize;
                    // Records of a partition that no longer reads from the
                    // broker, or that were fetched before a seek, are
                    // passed over.
                    if self.next.get(p) == Some(&at.offset) {
                        self.next[p] = at.offset + 1;
                        self.store.counters.subscribed_from_broker.fetch_add(1, Ordering::Relaxed);
                        return self.deliver_read(at, (*doc)?).await;
                    }
                }
                Woken::Record(Err(e)) if e.rdkafka_error_code().is_some_and(is_transient) => {
                    tracing::debug!(topic = %self.store.events_topic, error = %e, "subscription waiting for the broker");
                }
                Woken::Record(Err(e)) => return Err(KafkaStoreError::from_kafka("subscription", &e).into()),
            }
        }
    }

    /// Takes the next records of every partition its tail holds into
    /// `ready`; returns the partitions whose next record is to be read from
    /// the broker: below the tail, applied without going to it (at
    /// start-up), or where the partition halted (the record then answers
    /// as it did to the follower: `Corrupt` when it is no events record,
    /// `Unavailable` when its events cannot be decoded).
    fn take_from_tails(&mut self) -> Vec<u32> {
        let mut below = Vec::new();
        let table = self.store.table();
        let partitions = self.next.len();
        for i in 0..partitions {
            let p = (self.turn + i) % partitions;
            let log = &table.logs[p];
            let next = self.next[p];
            match log.tail.take_from(p as u32, next, TAKE_AT_ONCE, &mut self.ready) {
                Standing::Taken(n) => self.next[p] = next + n as u64,
                Standing::Below => below.push(p as u32),
                Standing::Past if next < log.end || log.halted.as_ref().is_some_and(|h| h.offset <= next) => {
                    below.push(p as u32);
                }
                Standing::Past => {}
            }
        }
        self.turn = (self.turn + 1) % partitions.max(1);
        // In partition order, whatever the turn: the consumer is pointed
        // again (dropping what it fetched ahead) only when the set changes.
        below.sort_unstable();
        below
    }

    /// Makes the subscription's consumer read exactly the partitions in
    /// `below`, each from its next record; drops it when there are none.
    fn read_below(&mut self, below: Vec<u32>) -> Result<(), StoreError> {
        if self.below.as_ref().is_some_and(|(_, now)| *now == below) {
            return Ok(());
        }
        if below.is_empty() {
            self.below = None;
            return Ok(());
        }
        let consumer = match self.below.take() {
            Some((consumer, _)) => consumer,
            // Its records lie below the partitions' applied ends: they are
            // there, so its fetches need not wait at the head.
            None => Detached::new(create_consumer(&self.store.config, false, BOUNDED_FETCH_WAIT_MS, Reach::Within)?),
        };
        let mut tpl = TopicPartitionList::new();
        for p in &below {
            tpl.add_partition_offset(&self.store.events_topic, *p as i32, start_at(self.next[*p as usize]))
                .map_err(|e| StoreError::from(KafkaStoreError::from_kafka("subscribe", &e)))?;
        }
        consumer.assign(&tpl).map_err(|e| StoreError::from(KafkaStoreError::from_kafka("subscribe", &e)))?;
        self.store.counters.subscription_seeks.fetch_add(1, Ordering::Relaxed);
        self.below = Some((consumer, below));
        Ok(())
    }

    /// A record taken from a tail: judged already.
    fn deliver_taken(&self, at: Position, record: TailRecord) -> Result<Logged<A::Event>, StoreError> {
        let Some(record) = record else { return Ok(Logged::void(at)) };
        let topic = &self.store.events_topic;
        let doc = EventsDoc::decode(topic, at, Some(record.key.as_bytes()), Some(&record.value))?;
        self.events_of(at, doc)
    }

    /// A record read from the broker, delivered once the follower judged it.
    async fn deliver_read(&self, at: Position, doc: EventsDoc) -> Result<Logged<A::Event>, StoreError> {
        if !self.store.judged_valid(at, &doc.aggregate_id, doc.last_version).await? {
            return Ok(Logged::void(at));
        }
        self.events_of(at, doc)
    }

    fn events_of(&self, at: Position, doc: EventsDoc) -> Result<Logged<A::Event>, StoreError> {
        let events = doc
            .into_raw(&self.store.events_topic, at)?
            .into_iter()
            .map(|raw| raw.decode(&*self.store.codec))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Logged { position: at, events })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(after: u64, limit: usize, version: u64, records: usize) -> (u64, bool, usize, usize) {
        let s = PageSelection::new(after, limit, version, records);
        (s.wanted_end, s.one_per_record, s.skip, s.take)
    }

    #[test]
    fn a_page_needs_only_the_records_that_can_hold_it() {
        // One event per record: exactly the page's records.
        assert_eq!(pick(1, 2, 5, 5), (3, true, 1, 3));
        assert_eq!(pick(0, usize::MAX, 4, 4), (4, true, 0, 4), "a whole read");
        assert_eq!(pick(3, 10, 5, 5), (5, true, 3, 5), "a page past the end stops at the version");
        // Records of several events: from the first record up to the one
        // that can hold the page's last version.
        assert_eq!(pick(2, 1, 5, 3), (3, false, 0, 3));
        assert_eq!(pick(0, 1, 5, 3), (1, false, 0, 1));
        // Offsets unknown: nothing selected (the partition is scanned).
        assert_eq!(pick(0, 2, 3, 0), (2, false, 0, 0));
    }
}
