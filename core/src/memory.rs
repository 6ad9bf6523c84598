//! In-memory backends: a real event store with its table, and a real list
//! view, for unit tests and prototypes. Nothing survives the process.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use chrono::Utc;
use futures::stream;
use tokio::sync::watch;
use uuid::Uuid;

use crate::aggregate::{Aggregate, DomainEvent};
use crate::codec::{JsonCodec, encode_all};
use crate::envelope::{Checkpoint, Envelope, Metadata, Position};
use crate::store::{Appended, EventStore, EventStream, ExpectedVersion, Logged, Snapshot, StoreError};
use crate::view::{
    Cursor, ListItem, ListQuery, ListView, Page, Row, RowChange, StoredState, ViewCopy, ViewError, ViewProgress,
    ViewSchema, ViewStore,
};

struct Stream<A: Aggregate> {
    version: u64,
    state: A,
    events: Vec<usize>,
    keys: HashMap<String, Appended>,
}

struct Log<A: Aggregate> {
    events: Vec<Envelope<A::Event>>,
    /// `[start, end)` of each append in `events`, in log order.
    appends: Vec<(usize, usize)>,
    streams: HashMap<String, Stream<A>>,
}

/// An event store and table held in memory; cheap to clone (clones share
/// the log). One partition; positions are event indexes.
pub struct InMemoryStore<A: Aggregate> {
    log: Arc<Mutex<Log<A>>>,
    length: watch::Sender<usize>,
}

impl<A: Aggregate> Clone for InMemoryStore<A> {
    fn clone(&self) -> Self {
        Self { log: Arc::clone(&self.log), length: self.length.clone() }
    }
}

impl<A: Aggregate> Default for InMemoryStore<A> {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: Aggregate> InMemoryStore<A> {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            log: Arc::new(Mutex::new(Log { events: Vec::new(), appends: Vec::new(), streams: HashMap::new() })),
            length: watch::channel(0).0,
        }
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log<A>> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The appends starting at or after event index `from`.
    fn appends_from(&self, from: usize) -> Vec<Vec<Envelope<A::Event>>> {
        let log = self.log();
        let first = log.appends.partition_point(|(_, end)| *end <= from);
        log.appends[first..].iter().map(|(start, end)| log.events[(*start).max(from)..*end].to_vec()).collect()
    }
}

#[async_trait]
impl<A: Aggregate> EventStore<A> for InMemoryStore<A> {
    async fn append(
        &self,
        id: &str,
        expected: ExpectedVersion,
        events: Vec<A::Event>,
        metadata: Metadata,
    ) -> Result<Appended, StoreError> {
        // Nothing is kept encoded here, but an event that no store could
        // encode is refused like a durable store would refuse it.
        encode_all(&JsonCodec::default(), &events)?;
        let mut log = self.log();
        let log = &mut *log;
        if let Some(key) = &metadata.idempotency_key
            && let Some(first) = log.streams.get(id).and_then(|s| s.keys.get(key))
        {
            return Ok(Appended { deduplicated: true, ..*first });
        }
        let actual = log.streams.get(id).map_or(0, |s| s.version);
        if !expected.admits(actual) {
            return Err(StoreError::Conflict { aggregate: A::NAME.into(), id: id.into(), expected, actual });
        }
        let stream = log.streams.entry(id.to_owned()).or_insert_with(|| Stream {
            version: 0,
            state: A::default(),
            events: Vec::new(),
            keys: HashMap::new(),
        });
        let start = log.events.len();
        let recorded_at = Utc::now();
        for event in events {
            stream.version += 1;
            stream.state.apply(&event);
            stream.events.push(log.events.len());
            log.events.push(Envelope {
                event_id: Uuid::now_v7(),
                aggregate_type: A::NAME.to_owned(),
                aggregate_id: id.to_owned(),
                version: stream.version,
                event_type: event.event_type().to_owned(),
                revision: event.revision(),
                recorded_at,
                metadata: metadata.clone(),
                position: Position::new(0, log.events.len() as u64),
                payload: event,
            });
        }
        let end = log.events.len();
        log.appends.push((start, end));
        let appended =
            Appended { version: stream.version, position: Position::new(0, end as u64 - 1), deduplicated: false };
        if let Some(key) = metadata.idempotency_key {
            stream.keys.insert(key, appended);
        }
        self.length.send_replace(end);
        Ok(appended)
    }

    async fn recall(&self, id: &str, idempotency_key: &str) -> Result<Option<Appended>, StoreError> {
        Ok(self
            .log()
            .streams
            .get(id)
            .and_then(|s| s.keys.get(idempotency_key))
            .map(|a| Appended { deduplicated: true, ..*a }))
    }

    async fn load(&self, id: &str) -> Result<Option<Snapshot<A>>, StoreError> {
        Ok(self.log().streams.get(id).map(|s| Snapshot { state: s.state.clone(), version: s.version }))
    }

    async fn read(&self, id: &str) -> Result<Vec<Envelope<A::Event>>, StoreError> {
        let log = self.log();
        Ok(log.streams.get(id).map(|s| s.events.iter().map(|i| log.events[*i].clone()).collect()).unwrap_or_default())
    }

    async fn read_page(&self, id: &str, after: u64, limit: usize) -> Result<Vec<Envelope<A::Event>>, StoreError> {
        let log = self.log();
        let Some(stream) = log.streams.get(id) else { return Ok(Vec::new()) };
        // Versions start at 1 without gaps: version v is the v-th event.
        let skip = usize::try_from(after).unwrap_or(usize::MAX);
        Ok(stream.events.iter().skip(skip).take(limit).map(|i| log.events[*i].clone()).collect())
    }

    async fn subscribe(&self, from: Checkpoint) -> Result<EventStream<A::Event>, StoreError> {
        let start = usize::try_from(from.next_offset(0)).unwrap_or(usize::MAX);
        let store = self.clone();
        let rx = self.length.subscribe();
        let stream =
            stream::unfold((store, rx, start, Vec::new()), |(store, mut rx, mut next, mut pending)| async move {
                loop {
                    if let Some(record) = pending.pop().and_then(Logged::of) {
                        return Some((Ok(record), (store, rx, next, pending)));
                    }
                    let found = store.appends_from(next);
                    if let Some(last) = found.last().and_then(|a: &Vec<Envelope<A::Event>>| a.last()) {
                        next = last.position.offset as usize + 1;
                        pending = found;
                        pending.reverse();
                        continue;
                    }
                    // Nothing new: wait for the next append.
                    rx.changed().await.ok()?;
                }
            });
        Ok(Box::pin(stream))
    }

    async fn head(&self) -> Result<Checkpoint, StoreError> {
        let mut head = Checkpoint::start();
        let len = self.log().events.len() as u64;
        if len > 0 {
            head.set_next(0, len);
        }
        Ok(head)
    }
}

#[derive(Default)]
struct ViewData {
    rows: BTreeMap<String, (StoredState, Option<Row>)>,
    progress: Option<ViewProgress>,
}

/// A list view held in memory, with the same query semantics as the SQL
/// and search backends (it runs the same conformance suite).
///
/// It keeps no lease: [`ViewStore::acquire_lease`] grants every runner at
/// once (the trait's default) and fenced writes are plain writes. A view in
/// memory has its writers in one process; rows still never move back to an
/// older version.
pub struct InMemoryView {
    schema: ViewSchema,
    live: RwLock<ViewData>,
    shadow: RwLock<Option<ViewData>>,
}

impl InMemoryView {
    /// An empty view; fails when the schema is invalid.
    pub fn new(schema: ViewSchema) -> Result<Self, ViewError> {
        schema.validate()?;
        Ok(Self { schema, live: RwLock::default(), shadow: RwLock::default() })
    }

    fn with_copy<T>(&self, copy: ViewCopy, f: impl FnOnce(&mut ViewData) -> T) -> Result<T, ViewError> {
        match copy {
            ViewCopy::Live => Ok(f(&mut self.live.write().unwrap_or_else(|p| p.into_inner()))),
            ViewCopy::Shadow => {
                let mut shadow = self.shadow.write().unwrap_or_else(|p| p.into_inner());
                let data = shadow.as_mut().ok_or_else(|| ViewError::Backend("no rebuild in progress".into()))?;
                Ok(f(data))
            }
        }
    }
}

#[async_trait]
impl ListView for InMemoryView {
    fn schema(&self) -> &ViewSchema {
        &self.schema
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, ViewError> {
        let query = query.validate(&self.schema)?;
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        let mut matching: Vec<(&String, &StoredState, &Row)> = live
            .rows
            .iter()
            .filter_map(|(id, (state, row))| row.as_ref().map(|r| (id, state, r)))
            .filter(|(id, _, row)| query.matches(&self.schema, id, row))
            .collect();
        let total = matching.len() as u64;
        matching.sort_by(|a, b| query.compare((a.0, a.2), (b.0, b.2)));
        let size = query.page_size as usize;
        let (skip, keyset) = match &query.after {
            Some(Cursor::Offset(n)) => (usize::try_from(*n).unwrap_or(usize::MAX), None),
            _ => (0, query.keyset()),
        };
        let mut rest =
            matching.into_iter().filter(|(id, _, row)| keyset.as_ref().is_none_or(|c| c.eval(id, row))).skip(skip);
        let items: Vec<ListItem> = rest
            .by_ref()
            .take(size)
            .map(|(id, state, row)| ListItem { id: id.clone(), version: state.version, row: row.clone() })
            .collect();
        let next = match (rest.next(), items.last()) {
            (Some(_), Some(_)) if query.relevance => Some(query.cursor_at_offset((skip + items.len()) as u64)),
            (Some(_), Some(last)) => Some(query.cursor_after(&last.id, &last.row)),
            _ => None,
        };
        Ok(Page { items, next, total })
    }

    async fn position(&self) -> Result<Checkpoint, ViewError> {
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        Ok(live.progress.as_ref().map(|p| p.checkpoint.clone()).unwrap_or_default())
    }
}

#[async_trait]
impl ViewStore for InMemoryView {
    async fn progress(&self, copy: ViewCopy) -> Result<Option<ViewProgress>, ViewError> {
        self.with_copy(copy, |d| d.progress.clone())
    }

    async fn states(&self, copy: ViewCopy, ids: &[String]) -> Result<HashMap<String, StoredState>, ViewError> {
        self.with_copy(copy, |d| {
            ids.iter().filter_map(|id| d.rows.get(id).map(|(s, _)| (id.clone(), s.clone()))).collect()
        })
    }

    async fn write(&self, copy: ViewCopy, changes: &[RowChange], checkpoint: &Checkpoint) -> Result<(), ViewError> {
        for change in changes {
            if let Some(row) = &change.row {
                self.schema.check_row(row)?;
            }
        }
        let version = self.schema.version;
        let states = changes
            .iter()
            .map(|c| {
                serde_json::from_str(c.state.get())
                    .map_err(|e| ViewError::Backend(format!("the state of {} is not JSON: {e}", c.id)))
            })
            .collect::<Result<Vec<serde_json::Value>, ViewError>>()?;
        self.with_copy(copy, |d| {
            for (c, state) in changes.iter().zip(states) {
                // A row never moves back to an older version (a lagging
                // second writer); an equal one is written again.
                if d.rows.get(&c.id).is_some_and(|(stored, _)| stored.version > c.version) {
                    continue;
                }
                d.rows.insert(c.id.clone(), (StoredState { version: c.version, state }, c.row.clone()));
            }
            d.progress = Some(ViewProgress { checkpoint: checkpoint.clone(), schema_version: version });
        })
    }

    async fn begin_rebuild(&self) -> Result<(), ViewError> {
        *self.shadow.write().unwrap_or_else(|p| p.into_inner()) = Some(ViewData::default());
        Ok(())
    }

    async fn swap(&self) -> Result<(), ViewError> {
        let shadow = self.shadow.write().unwrap_or_else(|p| p.into_inner()).take();
        let shadow = shadow.ok_or_else(|| ViewError::Backend("no rebuild in progress".into()))?;
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = shadow;
        Ok(())
    }
}
