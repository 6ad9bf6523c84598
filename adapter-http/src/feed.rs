//! Change feeds: Server-Sent Events of what the projections applied.
//!
//! - `GET /{plural}/changes` streams list rows as the view has them after
//!   each stretch of the log it applied (changes of one row within a
//!   stretch arrive as one event, at the row's latest version): `change` (`{id, version, row}`),
//!   `remove` (`{id, version}`: deleted, or no longer matching the feed's
//!   `filter[...]`/`q`), `progress` (nothing visible changed; it only moves
//!   the resume token) and `reset` (`{reason}`: reload the list, then
//!   reconnect). The SSE `id` is a resume token, a checkpoint of the log
//!   (`PARTITION:NEXT_OFFSET` per partition, comma-separated): sent back as
//!   `Last-Event-ID` (or `?after=`), the feed replays the log from there.
//! - `GET /{plural}/{id}/changes` streams one aggregate's new versions:
//!   `state` (`{version, etag, state}`, SSE `id` = the version) and
//!   `deleted`; `Last-Event-ID` (a version) skips what the client has.
//!
//! One pump per resource follows the log, waits until the views applied
//! each stretch, reads the rows it touched once and broadcasts them; every
//! feed filters that broadcast in memory. A feed that falls behind the
//! broadcast (a slow client) gets `reset` and is closed: it never slows
//! the pump, the projections or other clients.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use http::HeaderMap;
use kes_core::ValidQuery;
use kes_core::{
    Aggregate, CatchUp, Checkpoint, CommandBus, EventStore, FilterOp, ListQuery, ListView, Logged, Position, Row,
    StoreError,
};
use serde_json::json;
use tokio::sync::{Mutex, broadcast, mpsc, watch};

use crate::error::HttpError;
use crate::metrics::Metrics;
use crate::request::header_text;

/// Stretches of the log the broadcast keeps for feeds that read slowly;
/// a feed further behind is reset.
const BROADCAST_CAPACITY: usize = 1024;
/// Frames a feed's connection may have queued before it counts as slow.
const FEED_BUFFER: usize = 4096;
/// Bytes of events a feed's connection may have queued before it counts
/// as slow.
const FEED_BYTES: usize = 256 * 1024;
/// Records the pump takes from the log at once.
const PUMP_BATCH: usize = 512;
/// Most records one broadcast gathers: enough that the linger, not this
/// bound, sets the pace at several thousand appends a second (the 200 ms
/// linger of 200 open feeds at 10,000 appends a second is 2,000 records).
const PUMP_GATHER: usize = 8192;
/// How long the pump gathers records after a broadcast before the next
/// one, so that a busy log reaches every feed in fewer, larger writes:
/// [`LINGER_PER_FEED`] per open feed, within these bounds. Every broadcast
/// costs one write per feed, so the writes per second stay near
/// `1 / LINGER_PER_FEED` (1,000) however many feeds are open; after a
/// quiet spell nothing waits.
const LINGER_MIN: Duration = Duration::from_millis(10);
const LINGER_MAX: Duration = Duration::from_millis(200);
const LINGER_PER_FEED: Duration = Duration::from_millis(1);

/// How long the pump gathers records with `feeds` feeds open.
fn linger(feeds: usize) -> Duration {
    LINGER_PER_FEED.saturating_mul(u32::try_from(feeds).unwrap_or(u32::MAX)).clamp(LINGER_MIN, LINGER_MAX)
}
/// Most rows looked up in the view per query.
const LOOKUP: usize = 100;
/// How often a feed whose filter hides everything still moves its token.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How long the client waits before reconnecting (the SSE `retry`).
const RETRY_MS: u64 = 2_000;

/// A list row as the view had it after a stretch of the log.
#[derive(Debug, Clone)]
pub(crate) struct RowChange {
    id: String,
    version: u64,
    /// `None`: no longer listed (deleted).
    row: Option<Row>,
    /// The data of its `change` event, made once for every feed.
    change: Arc<str>,
    /// The data of its `remove` event.
    remove: Arc<str>,
}

impl RowChange {
    fn new(id: &str, version: u64, row: Option<Row>) -> Self {
        let change = match &row {
            Some(row) => json!({ "id": id, "version": version, "row": row }).to_string(),
            None => String::new(),
        };
        let remove = json!({ "id": id, "version": version }).to_string();
        Self { id: id.to_owned(), version, row, change: change.into(), remove: remove.into() }
    }
}

/// What the pump found in one stretch of the log.
#[derive(Debug)]
pub(crate) struct Stretch {
    /// Per record of the stretch, in log order: the checkpoint past it and
    /// the rows whose last change in the stretch it made, as the view had
    /// them after the whole stretch.
    steps: Vec<Step>,
    /// The stretch's events for a feed with no filter that has sent
    /// nothing it could repeat: made once, shared by every such feed.
    plain: Bytes,
    /// The aggregates it touched, with their last version in it.
    touched: Vec<(String, u64)>,
    /// Its last position.
    last: Position,
}

/// One record's share of a stretch.
#[derive(Debug)]
struct Step {
    after: Checkpoint,
    rows: Vec<RowChange>,
}

/// Splits the rows of a stretch starting at `from` into one step per
/// record, each row going to the last record that touched it, so that each
/// event's token says exactly which records the client has seen.
fn steps_of<E>(from: &Checkpoint, records: &[Logged<E>], rows: Vec<RowChange>) -> Vec<Step> {
    let mut last_record: HashMap<&str, usize> = HashMap::new();
    for (i, record) in records.iter().enumerate() {
        for event in &record.events {
            last_record.insert(event.aggregate_id.as_str(), i);
        }
    }
    let mut per_record: Vec<Vec<RowChange>> = (0..records.len()).map(|_| Vec::new()).collect();
    for row in rows {
        if let Some(&i) = last_record.get(row.id.as_str()) {
            per_record[i].push(row);
        }
    }
    let mut at = from.clone();
    records
        .iter()
        .zip(per_record)
        .map(|(record, rows)| {
            at.advance(record.position);
            Step { after: at.clone(), rows }
        })
        .collect()
}

/// The resume token of `checkpoint`.
pub(crate) fn token(checkpoint: &Checkpoint) -> String {
    let parts: Vec<String> = checkpoint.iter().map(|(p, next)| format!("{p}:{next}")).collect();
    parts.join(",")
}

/// Reads a resume token (empty: the start of the log).
pub(crate) fn parse_token(text: &str) -> Result<Checkpoint, HttpError> {
    let bad = |reason: &str| HttpError::InvalidHeader { name: "last-event-id", reason: reason.to_owned() };
    let mut checkpoint = Checkpoint::start();
    if text.trim().is_empty() {
        return Ok(checkpoint);
    }
    if text.len() > 4096 {
        return Err(bad("longer than 4096 bytes"));
    }
    for part in text.split(',') {
        let (p, next) = part.split_once(':').ok_or_else(|| bad("expected PARTITION:OFFSET[,…]"))?;
        let p: u32 = p.trim().parse().map_err(|_| bad("a partition is a number"))?;
        let next: u64 = next.trim().parse().map_err(|_| bad("an offset is a number"))?;
        checkpoint.set_next(p, next);
    }
    Ok(checkpoint)
}

/// Looks up the rows of `ids` in `view` (one query per [`LOOKUP`] ids).
async fn lookup(view: &dyn ListView, ids: &[&str]) -> Result<HashMap<String, (u64, Row)>, kes_core::ViewError> {
    let mut found = HashMap::with_capacity(ids.len());
    let (plain, odd): (Vec<&str>, Vec<&str>) = ids.iter().partition(|id| !id.contains(','));
    for chunk in plain.chunks(LOOKUP) {
        let query = ListQuery::new().filter("id", FilterOp::In, chunk.join(",")).page_size(chunk.len() as u32);
        for item in view.list(&query).await?.items {
            found.insert(item.id, (item.version, item.row));
        }
    }
    for id in odd {
        let query = ListQuery::new().filter("id", FilterOp::Eq, id).page_size(1);
        for item in view.list(&query).await?.items {
            found.insert(item.id, (item.version, item.row));
        }
    }
    Ok(found)
}

/// The rows a stretch of records changed, read from `view` once it has
/// applied them.
async fn rows_of<E>(
    view: &dyn ListView,
    catch_up: &dyn CatchUp,
    records: &[Logged<E>],
    touched: &[(String, u64)],
    stop: &mut watch::Receiver<bool>,
) -> Option<Vec<RowChange>> {
    let last = records.last()?.position;
    // The view decides what a feed shows: wait until it has the stretch.
    loop {
        if *stop.borrow() {
            return None;
        }
        if catch_up.wait_for(last, Duration::from_secs(2)).await {
            break;
        }
    }
    let ids: Vec<&str> = touched.iter().map(|(id, _)| id.as_str()).collect();
    let found = loop {
        match lookup(view, &ids).await {
            Ok(found) => break found,
            Err(e) => {
                tracing::warn!(error = %e, "change feed: the view cannot be read; retrying");
                tokio::select! {
                    _ = stop.changed() => return None,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    };
    Some(
        touched
            .iter()
            .map(|(id, version)| match found.get(id) {
                Some((v, row)) => RowChange::new(id, *v, Some(row.clone())),
                None => RowChange::new(id, *version, None),
            })
            .collect(),
    )
}

/// Moves the records of a chunk of the subscription into `records`;
/// `false` when the subscription failed (the caller resubscribes).
fn take_chunk<E>(chunk: Vec<Result<Logged<E>, StoreError>>, records: &mut Vec<Logged<E>>) -> bool {
    for item in chunk {
        match item {
            Ok(record) => records.push(record),
            Err(e) => {
                tracing::warn!(error = %e, "change feed: the log subscription failed; resubscribing");
                return false;
            }
        }
    }
    true
}

/// The aggregates `records` touched, with their last version in them.
fn touched_by<E>(records: &[Logged<E>]) -> Vec<(String, u64)> {
    let mut last: HashMap<&str, u64> = HashMap::new();
    for record in records {
        for event in &record.events {
            let v = last.entry(event.aggregate_id.as_str()).or_insert(0);
            *v = (*v).max(event.version);
        }
    }
    let mut touched: Vec<(String, u64)> = last.into_iter().map(|(id, v)| (id.to_owned(), v)).collect();
    touched.sort();
    touched
}

/// The feeds of one resource: its pump, started by the first feed.
pub(crate) struct Hub<A: Aggregate, S> {
    bus: Arc<CommandBus<A, S>>,
    view: Arc<dyn ListView>,
    catch_up: Arc<dyn CatchUp>,
    sender: broadcast::Sender<Arc<Stretch>>,
    started: Mutex<bool>,
    stop: watch::Receiver<bool>,
    metrics: Metrics,
    heartbeat: Duration,
    _aggregate: std::marker::PhantomData<fn() -> A>,
}

impl<A: Aggregate, S: EventStore<A> + 'static> Hub<A, S> {
    pub(crate) fn new(
        bus: Arc<CommandBus<A, S>>,
        view: Arc<dyn ListView>,
        catch_up: Arc<dyn CatchUp>,
        stop: watch::Receiver<bool>,
        metrics: Metrics,
        heartbeat: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            bus,
            view,
            catch_up,
            sender: broadcast::channel(BROADCAST_CAPACITY).0,
            started: Mutex::new(false),
            stop,
            metrics,
            heartbeat,
            _aggregate: std::marker::PhantomData,
        })
    }

    /// Starts the pump from the log's head unless it runs; returns once it
    /// has read the head, so that a feed subscribing afterwards misses
    /// nothing the log holds past that head.
    async fn ensure_started(self: &Arc<Self>) -> Result<(), StoreError> {
        let mut started = self.started.lock().await;
        if *started {
            return Ok(());
        }
        let head = self.bus.store().head().await?;
        let hub = Arc::clone(self);
        tokio::spawn(async move { hub.pump(head).await });
        *started = true;
        Ok(())
    }

    /// Follows the log from `from`, broadcasting what each stretch changed
    /// once the view applied it, until the API shuts down.
    // Kept in one piece: One loop with two exits (shutdown, or a log failure retried by subscribing again): the
    // labelled `continue` is its point.
    async fn pump(&self, from: Checkpoint) {
        let mut stop = self.stop.clone();
        let mut checkpoint = from;
        // The version each row was last broadcast at.
        let mut sent: HashMap<String, u64> = HashMap::new();
        let mut last_broadcast = tokio::time::Instant::now();
        'subscribe: loop {
            let stream = match self.bus.store().subscribe(checkpoint.clone()).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "change feed: cannot follow the log; retrying");
                    tokio::select! {
                        _ = stop.changed() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            let mut stream = stream.ready_chunks(PUMP_BATCH);
            loop {
                let chunk = tokio::select! {
                    _ = stop.changed() => return,
                    chunk = stream.next() => chunk,
                };
                let Some(chunk) = chunk else { continue 'subscribe };
                let mut records = Vec::with_capacity(chunk.len());
                if !take_chunk(chunk, &mut records) {
                    continue 'subscribe;
                }
                // Under load, what arrives within the linger of the last
                // broadcast goes out with it: every feed then gets fewer,
                // larger writes. After a quiet spell nothing waits.
                let until = last_broadcast + linger(self.sender.receiver_count());
                while records.len() < PUMP_GATHER {
                    match tokio::time::timeout_at(until, stream.next()).await {
                        Ok(Some(chunk)) => {
                            if !take_chunk(chunk, &mut records) {
                                continue 'subscribe;
                            }
                        }
                        Ok(None) => continue 'subscribe,
                        Err(_) => break,
                    }
                }
                let Some(last) = records.last().map(|r| r.position) else { continue };
                let touched = touched_by(&records);
                let rows = if touched.is_empty() {
                    Vec::new()
                } else {
                    match rows_of(self.view.as_ref(), self.catch_up.as_ref(), &records, &touched, &mut stop).await {
                        Some(rows) => self.removed_versions(rows).await,
                        None => return,
                    }
                };
                // A row the view was already ahead with, sent before, is
                // not sent again.
                let rows: Vec<RowChange> =
                    rows.into_iter().filter(|r| sent.get(&r.id).is_none_or(|v| *v < r.version)).collect();
                if sent.len() > 100_000 {
                    sent.clear();
                }
                for r in &rows {
                    sent.insert(r.id.clone(), r.version);
                }
                let steps = steps_of(&checkpoint, &records, rows);
                for record in &records {
                    checkpoint.advance(record.position);
                }
                let plain = plain_events(&steps);
                // Nobody listening is fine: feeds come and go.
                let _ = self.sender.send(Arc::new(Stretch { steps, plain, touched, last }));
                last_broadcast = tokio::time::Instant::now();
            }
        }
    }

    /// Gives each row no longer listed the version its aggregate has in
    /// the store (its deletion), rather than the last version the stretch
    /// held of it.
    async fn removed_versions(&self, mut rows: Vec<RowChange>) -> Vec<RowChange> {
        for row in rows.iter_mut().filter(|r| r.row.is_none()) {
            if let Ok(Some(document)) = self.bus.store().load_document(&row.id).await
                && document.version > row.version
            {
                *row = RowChange::new(&row.id, document.version, None);
            }
        }
        rows
    }

    /// `GET /{plural}/changes`.
    pub(crate) async fn list_feed(
        self: &Arc<Self>,
        query: ValidQuery,
        resume: Option<Checkpoint>,
    ) -> Result<Response, HttpError> {
        self.ensure_started().await?;
        let live = self.sender.subscribe();
        let head = self.bus.store().head().await?;
        let (tx, rx) = queue();
        let hub = Arc::clone(self);
        tokio::spawn(async move {
            let _open = hub.metrics.feed_opened(A::NAME);
            let mut feed = ListFeed { query, sent: HashMap::new(), tx, last_id: Instant::now() };
            if hub.run_list_feed(&mut feed, live, head, resume).await == Err(FeedEnd::Slow) {
                hub.metrics.feed_dropped(A::NAME);
                let reset =
                    Event::default().event("reset").data(json!({ "reason": "the client fell behind" }).to_string());
                feed.tx.reset(reset);
            }
        });
        Ok(sse(rx, self.heartbeat))
    }

    async fn run_list_feed(
        &self,
        feed: &mut ListFeed,
        mut live: broadcast::Receiver<Arc<Stretch>>,
        head: Checkpoint,
        resume: Option<Checkpoint>,
    ) -> Result<(), FeedEnd> {
        let mut stop = self.stop.clone();
        let mut at = match resume {
            // Replay what the client missed from the log, up to the head
            // read after joining the broadcast: nothing falls in between.
            Some(from) => self.replay(feed, from, &head, &mut stop).await?,
            None => head,
        };
        loop {
            let stretch = tokio::select! {
                _ = stop.changed() => return Err(FeedEnd::Shutdown),
                _ = feed.tx.closed() => return Err(FeedEnd::Gone),
                s = live.recv() => s,
            };
            let stretch = match stretch {
                Ok(s) => s,
                Err(broadcast::error::RecvError::Lagged(_)) => return Err(FeedEnd::Slow),
                Err(broadcast::error::RecvError::Closed) => return Err(FeedEnd::Shutdown),
            };
            let fresh = stretch.steps.first().is_some_and(|s| !at.covers_all(&s.after));
            if fresh && feed.is_plain() {
                if let Some(end) = stretch.steps.last() {
                    at = end.after.clone();
                }
                if !stretch.plain.is_empty() {
                    feed.send_plain(stretch.plain.clone())?;
                }
                continue;
            }
            for step in &stretch.steps {
                if at.covers_all(&step.after) {
                    continue;
                }
                for (p, next) in step.after.iter() {
                    if next > at.next_offset(p) {
                        at.set_next(p, next);
                    }
                }
                feed.send_rows(self.view.schema(), &step.rows, &at)?;
            }
        }
    }

    /// Replays the log from `from` until `head`, reading the rows each
    /// stretch touched from the view (which has them: it is at or past the
    /// head, once caught up).
    async fn replay(
        &self,
        feed: &mut ListFeed,
        from: Checkpoint,
        head: &Checkpoint,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Checkpoint, FeedEnd> {
        let mut at = from.clone();
        if at.covers_all(head) {
            return Ok(at);
        }
        let stream = self.bus.store().subscribe(from).await.map_err(|_| FeedEnd::Unavailable)?;
        let mut stream = stream.ready_chunks(PUMP_BATCH);
        while !at.covers_all(head) {
            let chunk = tokio::select! {
                _ = stop.changed() => return Err(FeedEnd::Shutdown),
                chunk = stream.next() => chunk.ok_or(FeedEnd::Unavailable)?,
            };
            let records: Vec<Logged<A::Event>> =
                chunk.into_iter().collect::<Result<_, _>>().map_err(|_| FeedEnd::Unavailable)?;
            let touched = touched_by(&records);
            let rows = if touched.is_empty() {
                Vec::new()
            } else {
                let rows = rows_of(self.view.as_ref(), self.catch_up.as_ref(), &records, &touched, stop)
                    .await
                    .ok_or(FeedEnd::Shutdown)?;
                self.removed_versions(rows).await
            };
            for step in steps_of(&at, &records, rows) {
                feed.send_rows(self.view.schema(), &step.rows, &step.after)?;
                at = step.after;
            }
        }
        Ok(at)
    }

    /// `GET /{plural}/{id}/changes`.
    pub(crate) async fn item_feed(self: &Arc<Self>, id: String, seen: Option<u64>) -> Result<Response, HttpError> {
        self.ensure_started().await?;
        let live = self.sender.subscribe();
        let (tx, rx) = queue();
        let hub = Arc::clone(self);
        tokio::spawn(async move {
            let _open = hub.metrics.feed_opened(A::NAME);
            if hub.run_item_feed(&id, seen.unwrap_or(0), live, &tx).await == Err(FeedEnd::Slow) {
                hub.metrics.feed_dropped(A::NAME);
                let reset =
                    Event::default().event("reset").data(json!({ "reason": "the client fell behind" }).to_string());
                tx.reset(reset);
            }
        });
        Ok(sse(rx, self.heartbeat))
    }

    async fn run_item_feed(
        &self,
        id: &str,
        mut sent: u64,
        mut live: broadcast::Receiver<Arc<Stretch>>,
        tx: &Queue,
    ) -> Result<(), FeedEnd> {
        let mut stop = self.stop.clone();
        // What the client lacks now, then every later version.
        sent = self.send_state(id, sent, tx).await?;
        loop {
            let stretch = tokio::select! {
                _ = stop.changed() => return Err(FeedEnd::Shutdown),
                _ = tx.closed() => return Err(FeedEnd::Gone),
                s = live.recv() => s,
            };
            let stretch = match stretch {
                Ok(s) => s,
                Err(broadcast::error::RecvError::Lagged(_)) => return Err(FeedEnd::Slow),
                Err(broadcast::error::RecvError::Closed) => return Err(FeedEnd::Shutdown),
            };
            if !stretch.touched.iter().any(|(t, v)| t == id && *v > sent) {
                continue;
            }
            // Reads by id come from the store's table: wait until it has the write.
            let _ = self.bus.store().wait_for_position(stretch.last, Duration::from_secs(2)).await;
            sent = self.send_state(id, sent, tx).await?;
        }
    }

    /// Sends the aggregate's current state when it is newer than `sent`;
    /// returns the version the client now has.
    async fn send_state(&self, id: &str, sent: u64, tx: &Queue) -> Result<u64, FeedEnd> {
        let document = self.bus.store().load_document(id).await.map_err(|_| FeedEnd::Unavailable)?;
        let Some(document) = document else { return Ok(sent) };
        if document.version <= sent {
            return Ok(sent);
        }
        let event = if document.deleted {
            Event::default()
                .event("deleted")
                .id(document.version.to_string())
                .data(json!({ "version": document.version }).to_string())
        } else {
            // Personal values opened, or erased, as every read shows them.
            let json = match self.bus.vault().filter(|_| A::PERSONAL_DATA) {
                Some(vault) => vault
                    .render_bytes(&kes_core::AggregateRef::new(A::NAME, id), &document.json)
                    .await
                    .map_err(|_| FeedEnd::Unavailable)?
                    .map_or(document.json, Bytes::from),
                None => document.json,
            };
            let state: serde_json::Value = serde_json::from_slice(&json).map_err(|_| FeedEnd::Unavailable)?;
            let data =
                json!({ "version": document.version, "etag": format!("\"{}\"", document.version), "state": state });
            Event::default().event("state").id(document.version.to_string()).data(data.to_string())
        };
        tx.push(Frame::One(event))?;
        Ok(document.version)
    }
}

/// Why a feed ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FeedEnd {
    /// The client went away.
    Gone,
    /// The client read too slowly.
    Slow,
    /// The API shuts down.
    Shutdown,
    /// The store or view failed; the client reconnects and resumes.
    Unavailable,
}

/// The sending end of a feed's queue, bounded in frames and in bytes (the
/// last place is kept for the `reset` that tells a slow client so).
pub(crate) struct Queue {
    tx: mpsc::Sender<Frame>,
    bytes: Arc<AtomicUsize>,
}

/// The receiving end, read by the connection.
pub(crate) struct Outlet {
    rx: mpsc::Receiver<Frame>,
    bytes: Arc<AtomicUsize>,
}

fn queue() -> (Queue, Outlet) {
    let (tx, rx) = mpsc::channel(FEED_BUFFER);
    let bytes = Arc::new(AtomicUsize::new(0));
    (Queue { tx, bytes: Arc::clone(&bytes) }, Outlet { rx, bytes })
}

impl Queue {
    /// Queues `frame` for the client; a full queue is a slow client.
    fn push(&self, frame: Frame) -> Result<(), FeedEnd> {
        if self.tx.is_closed() {
            return Err(FeedEnd::Gone);
        }
        let size = frame.size();
        if self.tx.capacity() <= 1 || self.bytes.load(Ordering::Relaxed) + size > FEED_BYTES {
            return Err(FeedEnd::Slow);
        }
        match self.tx.try_send(frame) {
            Ok(()) => {
                self.bytes.fetch_add(size, Ordering::Relaxed);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(FeedEnd::Slow),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(FeedEnd::Gone),
        }
    }

    /// Tells a slow client to reload and reconnect (in the place kept).
    fn reset(&self, event: Event) {
        let _ = self.tx.try_send(Frame::One(event));
    }

    async fn closed(&self) {
        self.tx.closed().await;
    }
}

impl Outlet {
    async fn recv(&mut self) -> Option<Frame> {
        let frame = self.rx.recv().await?;
        self.bytes.fetch_sub(frame.size().min(self.bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
        Some(frame)
    }

    fn try_recv(&mut self) -> Option<Frame> {
        let frame = self.rx.try_recv().ok()?;
        self.bytes.fetch_sub(frame.size().min(self.bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
        Some(frame)
    }

    fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }
}

/// One list feed's state.
struct ListFeed {
    query: ValidQuery,
    /// The version each row was last sent at, and whether that was its
    /// removal.
    sent: HashMap<String, (u64, bool)>,
    tx: Queue,
    /// When the client's token last moved.
    last_id: Instant,
}

impl ListFeed {
    /// Whether the shared events of a stretch are this feed's: no filter,
    /// nothing sent that they could repeat.
    fn is_plain(&self) -> bool {
        self.query.filters.is_empty() && self.query.q.is_none() && self.sent.is_empty()
    }

    /// Queues a stretch's shared events.
    fn send_plain(&mut self, events: Bytes) -> Result<(), FeedEnd> {
        self.tx.push(Frame::Many(events))?;
        self.last_id = Instant::now();
        Ok(())
    }

    /// Sends the changes of one stretch that this feed shows, the last of
    /// them carrying the token `at`; a stretch with none moves the token
    /// now and then with a `progress` event.
    fn send_rows(&mut self, schema: &kes_core::ViewSchema, rows: &[RowChange], at: &Checkpoint) -> Result<(), FeedEnd> {
        let mut events = Vec::new();
        for change in rows {
            let known = self.sent.get(&change.id).copied();
            if known.is_some_and(|(v, _)| v >= change.version) {
                continue;
            }
            let was_removed = known.is_some_and(|(_, removed)| removed);
            let shown = change.row.as_ref().filter(|row| self.query.matches(schema, &change.id, row));
            let removed = shown.is_none();
            match shown {
                Some(_) => events.push(Event::default().event("change").data(&*change.change)),
                // Removed already: the client has nothing to drop.
                None if was_removed => {}
                // Only a row the client may have seen needs removing: one
                // sent before, or any when the feed is filtered.
                None if known.is_some()
                    || !self.query.filters.is_empty()
                    || self.query.q.is_some()
                    || change.row.is_none() =>
                {
                    events.push(Event::default().event("remove").data(&*change.remove));
                }
                None => {}
            }
            self.sent.insert(change.id.clone(), (change.version, removed));
        }
        if self.sent.len() > 100_000 {
            // Bounded: forgetting only risks sending a row again.
            self.sent.clear();
        }
        let id = token(at);
        match events.pop() {
            Some(last) => {
                for event in events {
                    self.tx.push(Frame::One(event))?;
                }
                self.tx.push(Frame::One(last.id(id)))?;
                self.last_id = Instant::now();
            }
            None if self.last_id.elapsed() >= PROGRESS_EVERY => {
                self.tx.push(Frame::One(Event::default().event("progress").id(id).data("{}")))?;
                self.last_id = Instant::now();
            }
            None => {}
        }
        Ok(())
    }
}

/// What a feed queues for its connection.
#[derive(Debug)]
pub(crate) enum Frame {
    /// One event.
    One(Event),
    /// Events already in their wire form.
    Many(Bytes),
}

impl Frame {
    /// About the bytes it takes on the wire.
    fn size(&self) -> usize {
        match self {
            Self::One(e) => e.name.len() + e.data.len() + e.id.as_ref().map_or(0, String::len) + 24,
            Self::Many(bytes) => bytes.len(),
        }
    }
}

/// The wire form of a stretch's events for a plain feed: per record, its
/// rows' `change`/`remove`, the last carrying the token past the record.
fn plain_events(steps: &[Step]) -> Bytes {
    let mut out = Vec::new();
    for step in steps {
        let count = step.rows.len();
        if count == 0 {
            continue;
        }
        let id = token(&step.after);
        for (i, row) in step.rows.iter().enumerate() {
            let event = match row.row {
                Some(_) => Event::default().event("change").data(&*row.change),
                None => Event::default().event("remove").data(&*row.remove),
            };
            let event = if i + 1 == count { event.id(id.clone()) } else { event };
            event.write_to(&mut out);
        }
    }
    Bytes::from(out)
}

/// One server-sent event.
#[derive(Debug, Default)]
pub(crate) struct Event {
    name: &'static str,
    id: Option<String>,
    data: String,
}

impl Event {
    fn event(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    fn data(mut self, data: impl Into<String>) -> Self {
        self.data = data.into();
        self
    }

    /// Its wire form (`text/event-stream`).
    fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(self.name.as_bytes());
        out.push(b'\n');
        if let Some(id) = &self.id {
            out.extend_from_slice(b"id: ");
            out.extend_from_slice(id.as_bytes());
            out.push(b'\n');
        }
        // JSON text has no raw line breaks; anything else is split.
        for line in self.data.split('\n') {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
        out.push(b'\n');
    }
}

/// Most bytes one write to a feed's connection carries: the events queued
/// while the connection was busy go out together.
const FRAME: usize = 64 * 1024;

/// The SSE answer reading `rx`: a retry hint first, the queued events in
/// as few writes as possible, and a heartbeat comment after each idle
/// `heartbeat`.
fn sse(rx: Outlet, heartbeat: Duration) -> Response {
    let hello = Bytes::from(format!("retry: {RETRY_MS}\n: kes change feed\n\n"));
    let events = futures::stream::unfold(rx, move |mut rx| async move {
        let first = tokio::select! {
            frame = rx.recv() => frame?,
            _ = tokio::time::sleep(heartbeat) => return Some((Bytes::from_static(b": keep-alive\n\n"), rx)),
        };
        let mut out = Vec::new();
        let mut next = Some(first);
        while let Some(frame) = next.take() {
            match frame {
                // A lone shared frame goes out as it is, uncopied.
                Frame::Many(bytes) if out.is_empty() && rx.is_empty() => return Some((bytes, rx)),
                Frame::Many(bytes) => out.extend_from_slice(&bytes),
                Frame::One(event) => event.write_to(&mut out),
            }
            if out.len() < FRAME {
                next = rx.try_recv();
            }
        }
        Some((Bytes::from(out), rx))
    });
    let body = futures::stream::once(async move { hello }).chain(events).map(Ok::<Bytes, Infallible>);
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/event-stream"));
    headers.insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
    // Proxies must not buffer the stream.
    headers.insert("x-accel-buffering", http::HeaderValue::from_static("no"));
    response
}

/// The resume point of a list feed: `Last-Event-ID`, else `?after=`.
pub(crate) fn resume_of(headers: &HeaderMap, after: Option<&str>) -> Result<Option<Checkpoint>, HttpError> {
    header_text(headers, &crate::api::names::LAST_EVENT_ID)?.or(after).map(parse_token).transpose()
}

/// The version a per-aggregate feed resumes after.
pub(crate) fn seen_version(headers: &HeaderMap) -> Result<Option<u64>, HttpError> {
    let Some(text) = header_text(headers, &crate::api::names::LAST_EVENT_ID)?.filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    text.parse().map(Some).map_err(|_| HttpError::InvalidHeader {
        name: "last-event-id",
        reason: "expected the version last received".into(),
    })
}

/// The feed's query: the list syntax's `filter[...]` and `q` (sorting and
/// paging mean nothing to a feed and are refused), and `after`.
pub(crate) fn feed_query(
    query: Option<&str>,
    schema: &kes_core::ViewSchema,
) -> Result<(ValidQuery, Option<String>), HttpError> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query.unwrap_or("")).map_err(|e| HttpError::MalformedQuery(e.to_string()))?;
    let mut after = None;
    let mut rest = Vec::with_capacity(pairs.len());
    for (k, v) in pairs {
        if k == "after" {
            after = Some(v);
        } else if k == "access_token" {
            // Verified by the authentication layer (EventSource sends no
            // header); nothing for the feed.
        } else if k == "q" || k.starts_with("filter[") {
            rest.push((k, v));
        } else {
            return Err(HttpError::Query(kes_core::QueryError::UnknownParameter(k)));
        }
    }
    let query = ListQuery::from_pairs(rest)?.validate(schema)?;
    Ok((query, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_linger_grows_with_the_open_feeds_within_bounds() {
        assert_eq!(linger(0), LINGER_MIN);
        assert_eq!(linger(1), LINGER_MIN);
        assert_eq!(linger(40), Duration::from_millis(40));
        assert_eq!(linger(200), LINGER_MAX);
        assert_eq!(linger(usize::MAX), LINGER_MAX);
    }

    #[test]
    fn tokens_round_trip_and_bad_ones_are_refused() {
        let mut c = Checkpoint::start();
        c.set_next(0, 17);
        c.set_next(3, 2);
        assert_eq!(token(&c), "0:17,3:2");
        assert_eq!(parse_token("0:17,3:2").unwrap(), c);
        assert_eq!(parse_token("").unwrap(), Checkpoint::start());
        for bad in ["x", "0:", ":1", "0:1,", "a:b", "0:-1"] {
            assert!(parse_token(bad).is_err(), "{bad}");
        }
    }
}
