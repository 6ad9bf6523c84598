//! The audit history of one aggregate, page by page: read from the
//! [`EventStore`] or from a projection kept for it.
//!
//! A store answers [`EventStore::read_page`] directly. That is the right
//! source when the store can seek by version (the SQL stores, in memory).
//! A log that can only be read by offset (Kafka) pays per record fetched,
//! and on some brokers per record stored after it: there the history is
//! better served by a [`HistoryProjection`], which copies every event's
//! history record into a list backend ([`ViewStore`]) keyed by aggregate id
//! and version. A page then costs one indexed query whose size grows with
//! the page, never with the log. Such a history is as current as its
//! projection: the HTTP adapter waits for a `KES-Position` token on it the
//! way it does for list reads.
//!
//! Both sources produce the same [`HistoryPage`] of the same
//! [`HistoryRecord`]s.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::aggregate::Aggregate;
use crate::envelope::{Checkpoint, Envelope, Metadata};
use crate::projection::{Projection, ProjectionError};
use crate::store::{EventStore, StoreError};
use crate::view::{
    Field, FieldValue, FilterOp, ID_FIELD, Lease, ListQuery, ListView, Row, RowChange, ViewCopy, ViewError,
    ViewProgress, ViewSchema, ViewStore,
};

/// One event as the audit history shows it: the envelope, with the payload
/// as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryRecord {
    /// Unique id of the event.
    pub event_id: Uuid,
    /// Its version in the aggregate's stream.
    pub version: u64,
    /// The event's type name.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The schema revision of the payload.
    pub revision: u32,
    /// When the command was accepted.
    pub recorded_at: DateTime<Utc>,
    /// Where it sits in the log (`PARTITION:OFFSET`).
    pub position: String,
    /// Who, why, under which retry key.
    pub metadata: Metadata,
    /// The event itself.
    pub payload: serde_json::Value,
}

impl HistoryRecord {
    /// The record of `envelope`. A payload that does not serialise (a bug
    /// in the event type's `Serialize`) is shown as `null` rather than
    /// hiding the rest of the history.
    pub fn of<E: Serialize>(envelope: &Envelope<E>) -> Self {
        Self {
            event_id: envelope.event_id,
            version: envelope.version,
            event_type: envelope.event_type.clone(),
            revision: envelope.revision,
            recorded_at: envelope.recorded_at,
            position: envelope.position.to_string(),
            metadata: envelope.metadata.clone(),
            payload: serde_json::to_value(&envelope.payload).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// One page of an aggregate's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryPage {
    /// The aggregate id.
    pub id: String,
    /// Its events, oldest first.
    pub items: Vec<HistoryRecord>,
    /// The version to pass as `after` for the next page; `None` on the last
    /// page known now.
    pub next: Option<u64>,
}

/// Why a history page could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HistoryError {
    /// The event store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The history view failed.
    #[error(transparent)]
    View(#[from] ViewError),
}

/// Where pages of history come from.
#[async_trait]
pub trait History: Send + Sync {
    /// At most `limit` records of `id` after version `after`, oldest first.
    async fn page(&self, id: &str, after: u64, limit: u32) -> Result<HistoryPage, HistoryError>;

    /// Whether this source lags behind the log (a projection), so that a
    /// reader with a position token should wait for it.
    fn is_projected(&self) -> bool;
}

/// History read from the event store itself: always current.
pub struct StoreHistory<A: Aggregate, S> {
    store: S,
    model: std::marker::PhantomData<fn() -> A>,
}

impl<A: Aggregate, S: EventStore<A>> StoreHistory<A, S> {
    /// History straight from `store`.
    pub fn new(store: S) -> Self {
        Self { store, model: std::marker::PhantomData }
    }
}

#[async_trait]
impl<A: Aggregate, S: EventStore<A>> History for StoreHistory<A, S> {
    async fn page(&self, id: &str, after: u64, limit: u32) -> Result<HistoryPage, HistoryError> {
        Ok(store_page(&self.store, id, after, limit).await?)
    }

    fn is_projected(&self) -> bool {
        false
    }
}

/// One page of `id`'s history read from `store` with
/// [`EventStore::read_page`].
pub async fn store_page<A: Aggregate, S: EventStore<A> + ?Sized>(
    store: &S,
    id: &str,
    after: u64,
    limit: u32,
) -> Result<HistoryPage, StoreError> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    // One more than asked tells whether another page follows.
    let mut events = store.read_page(id, after, limit.saturating_add(1)).await?;
    let more = events.len() > limit;
    events.truncate(limit);
    let items: Vec<HistoryRecord> = events.iter().map(HistoryRecord::of).collect();
    let next = if more { items.last().map(|r| r.version) } else { None };
    Ok(HistoryPage { id: id.to_owned(), items, next })
}

/// The field holding the aggregate id in a history view.
pub const HISTORY_AGGREGATE_FIELD: &str = "aggregate_id";
/// The field holding the event's version in a history view.
pub const HISTORY_VERSION_FIELD: &str = "version";
/// The field holding the [`HistoryRecord`] as JSON text in a history view.
pub const HISTORY_RECORD_FIELD: &str = "record";

/// Largest page a history view serves in one query.
pub const HISTORY_MAX_PAGE: u32 = 10_000;

/// The schema of the history view of aggregate type `aggregate`
/// (named `{aggregate}_history`): one row per event, filterable by
/// aggregate id, holding the event's version and its record's JSON.
///
/// Row ids are `{aggregate id}@{version:020}`, so that id order within one
/// aggregate is version order: a page is `aggregate_id = X AND id > X@after
/// ORDER BY id`, which the `(aggregate_id, id)` index of a SQL view (and
/// Tantivy's term and fast fields) answer without sorting the aggregate's
/// events, however many it has.
pub fn history_schema(aggregate: &str) -> ViewSchema {
    ViewSchema::new(format!("{aggregate}_history"), 1)
        .field(Field::keyword(HISTORY_AGGREGATE_FIELD).filterable())
        .field(Field::integer(HISTORY_VERSION_FIELD))
        .field(Field::text(HISTORY_RECORD_FIELD))
        .page_sizes(100, HISTORY_MAX_PAGE)
}

/// The projection that fills a history view: every event becomes one row.
/// Rows are never changed once written (a replay writes the same row
/// again), and a deleted aggregate keeps its history.
pub struct HistoryProjection<A: Aggregate> {
    view: Arc<dyn ViewStore>,
    model: std::marker::PhantomData<fn() -> A>,
}

impl<A: Aggregate> HistoryProjection<A> {
    /// A projection writing into `view`, whose schema must be
    /// [`history_schema`]`(A::NAME)`.
    pub fn new(view: Arc<dyn ViewStore>) -> Result<Self, ViewError> {
        let expected = history_schema(A::NAME);
        if view.schema() != &expected {
            return Err(ViewError::Backend(format!(
                "a history view of {} needs the schema from history_schema({:?})",
                A::NAME,
                A::NAME
            )));
        }
        Ok(Self { view, model: std::marker::PhantomData })
    }
}

/// The row id of one event in a history view.
fn history_row_id(aggregate_id: &str, version: u64) -> String {
    format!("{aggregate_id}@{version:020}")
}

#[async_trait]
impl<A: Aggregate> Projection<A::Event> for HistoryProjection<A> {
    fn name(&self) -> &str {
        &self.view.schema().name
    }

    fn version(&self) -> u32 {
        self.view.schema().version
    }

    async fn progress(&self, copy: ViewCopy) -> Result<Option<ViewProgress>, ProjectionError> {
        Ok(self.view.progress(copy).await?)
    }

    async fn apply(
        &self,
        copy: ViewCopy,
        batch: &[Envelope<A::Event>],
        checkpoint: &Checkpoint,
    ) -> Result<(), ProjectionError> {
        self.view.write(copy, &Self::changes(batch)?, checkpoint).await?;
        Ok(())
    }

    async fn apply_fenced(
        &self,
        copy: ViewCopy,
        batch: &[Envelope<A::Event>],
        checkpoint: &Checkpoint,
        lease: &Lease,
    ) -> Result<(), ProjectionError> {
        self.view.write_fenced(copy, &Self::changes(batch)?, checkpoint, lease).await?;
        Ok(())
    }

    async fn acquire_lease(&self, owner: &str, ttl: Duration) -> Result<Option<Lease>, ProjectionError> {
        Ok(self.view.acquire_lease(owner, ttl).await?)
    }

    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<bool, ProjectionError> {
        Ok(self.view.renew_lease(lease, ttl).await?)
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), ProjectionError> {
        Ok(self.view.release_lease(lease).await?)
    }

    async fn swap_fenced(&self, lease: &Lease) -> Result<(), ProjectionError> {
        Ok(self.view.swap_fenced(lease).await?)
    }

    async fn begin_rebuild(&self) -> Result<(), ProjectionError> {
        Ok(self.view.begin_rebuild().await?)
    }

    async fn swap(&self) -> Result<(), ProjectionError> {
        Ok(self.view.swap().await?)
    }
}

impl<A: Aggregate> HistoryProjection<A> {
    /// One row per event of `batch`.
    fn changes(batch: &[Envelope<A::Event>]) -> Result<Vec<RowChange>, ProjectionError> {
        let mut changes = Vec::with_capacity(batch.len());
        for envelope in batch {
            let record = HistoryRecord::of(envelope);
            let json = serde_json::to_string(&record).map_err(|e| {
                ViewError::Backend(format!("history record of {} {}: {e}", A::NAME, envelope.aggregate_id))
            })?;
            let version = i64::try_from(envelope.version).map_err(|_| ViewError::Corrupt {
                id: envelope.aggregate_id.clone(),
                reason: format!("version {} does not fit the view", envelope.version),
            })?;
            let mut row = Row::new();
            row.insert(HISTORY_AGGREGATE_FIELD.into(), FieldValue::Text(envelope.aggregate_id.clone()));
            row.insert(HISTORY_VERSION_FIELD.into(), FieldValue::Integer(version));
            row.insert(HISTORY_RECORD_FIELD.into(), FieldValue::Text(json));
            changes.push(RowChange {
                id: history_row_id(&envelope.aggregate_id, envelope.version),
                version: envelope.version,
                state: serde_json::value::RawValue::NULL.to_owned(),
                row: Some(row),
            });
        }
        Ok(changes)
    }
}

/// History read from a history view filled by [`HistoryProjection`].
///
/// The view keeps each event as it was shown when projected. A record of
/// an older revision than the code now writes (the view was filled before
/// an event's shape changed) is brought up to date with the event type's
/// [`crate::DomainEvent::upcasters`] as it is read, so the history shows
/// the same shape as one read from the store, without a rebuild.
pub struct ViewHistory {
    view: Arc<dyn ListView>,
    upcasters: crate::codec::Upcasters,
}

impl ViewHistory {
    /// History of aggregate type `A` served by `view` (its schema is
    /// [`history_schema`]).
    pub fn new<A: Aggregate>(view: Arc<dyn ListView>) -> Self {
        Self { view, upcasters: <A::Event as crate::DomainEvent>::upcasters() }
    }

    fn upcast(&self, record: &mut HistoryRecord) -> Result<(), crate::codec::CodecError> {
        if self.upcasters.applies_to(&record.event_type, record.revision) {
            let payload = std::mem::take(&mut record.payload);
            let (event_type, revision, payload) =
                self.upcasters.upcast(&record.event_type, record.revision, payload)?;
            (record.event_type, record.revision, record.payload) = (event_type, revision, payload);
        }
        Ok(())
    }
}

#[async_trait]
impl History for ViewHistory {
    async fn page(&self, id: &str, after: u64, limit: u32) -> Result<HistoryPage, HistoryError> {
        let limit = limit.clamp(1, HISTORY_MAX_PAGE);
        let query = ListQuery::new()
            .filter(HISTORY_AGGREGATE_FIELD, FilterOp::Eq, id)
            .filter(ID_FIELD, FilterOp::Gt, history_row_id(id, after))
            .sort_by(ID_FIELD)
            .page_size(limit);
        let page = self.view.list(&query).await?;
        let more = page.next.is_some();
        let mut items = Vec::with_capacity(page.items.len());
        for item in page.items {
            let Some(FieldValue::Text(json)) = item.row.get(HISTORY_RECORD_FIELD) else {
                return Err(
                    ViewError::Corrupt { id: item.id, reason: "a history row without its record".into() }.into()
                );
            };
            let mut record: HistoryRecord = serde_json::from_str(json)
                .map_err(|e| ViewError::Corrupt { id: item.id.clone(), reason: format!("history record: {e}") })?;
            self.upcast(&mut record).map_err(|e| ViewError::Corrupt { id: item.id.clone(), reason: e.to_string() })?;
            items.push(record);
        }
        let next = if more { items.last().map(|r| r.version) } else { None };
        Ok(HistoryPage { id: id.to_owned(), items, next })
    }

    fn is_projected(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_history_schema_is_valid_and_row_ids_sort_by_version() {
        history_schema("project").validate().unwrap();
        assert!(history_row_id("p", 9) < history_row_id("p", 10));
        assert!(history_row_id("p", 99_999) < history_row_id("p", 100_000));
    }

    /// An aggregate whose one event gained a unit in revision 2.
    #[derive(Debug, Default, Clone, Serialize, Deserialize)]
    struct Gauge;

    #[derive(Debug, Clone, Serialize, Deserialize)]
    enum GaugeEvent {
        Set { value: i64, unit: String },
    }

    impl crate::DomainEvent for GaugeEvent {
        fn event_type(&self) -> &'static str {
            "GaugeSet"
        }
        fn revision(&self) -> u32 {
            2
        }
        fn upcasters() -> crate::Upcasters {
            crate::Upcasters::new().register("GaugeSet", 1, |mut v| {
                v["Set"]["unit"] = "m".into();
                Ok(crate::Upcast { event_type: "GaugeSet".into(), payload: v })
            })
        }
    }

    impl Aggregate for Gauge {
        const NAME: &'static str = "gauge";
        type Command = ();
        type Event = GaugeEvent;
        type Error = std::convert::Infallible;
        fn handle(&self, _: ()) -> Result<Vec<GaugeEvent>, Self::Error> {
            Ok(Vec::new())
        }
        fn apply(&mut self, _: &GaugeEvent) {}
    }

    #[tokio::test]
    async fn a_history_view_filled_before_an_event_changed_shows_it_upcast() {
        let view = Arc::new(crate::InMemoryView::new(history_schema("gauge")).unwrap());
        let record = |version: u64, revision: u32, payload: serde_json::Value| HistoryRecord {
            event_id: Uuid::new_v4(),
            version,
            event_type: "GaugeSet".into(),
            revision,
            recorded_at: Utc::now(),
            position: format!("0:{version}"),
            metadata: Metadata::default(),
            payload,
        };
        // Projected by the code of revision 1, then by today's.
        let records = [
            record(1, 1, serde_json::json!({ "Set": { "value": 3 } })),
            record(2, 2, serde_json::json!({ "Set": { "value": 4, "unit": "ft" } })),
        ];
        let changes: Vec<RowChange> = records
            .iter()
            .map(|r| {
                let mut row = Row::new();
                row.insert(HISTORY_AGGREGATE_FIELD.into(), FieldValue::Text("g".into()));
                row.insert(HISTORY_VERSION_FIELD.into(), FieldValue::Integer(r.version as i64));
                row.insert(HISTORY_RECORD_FIELD.into(), FieldValue::Text(serde_json::to_string(r).unwrap()));
                RowChange {
                    id: history_row_id("g", r.version),
                    version: r.version,
                    state: serde_json::value::RawValue::NULL.to_owned(),
                    row: Some(row),
                }
            })
            .collect();
        view.write(ViewCopy::Live, &changes, &Checkpoint::default()).await.unwrap();

        let page = ViewHistory::new::<Gauge>(view).page("g", 0, 10).await.unwrap();
        let shown: Vec<(u32, serde_json::Value)> = page.items.iter().map(|r| (r.revision, r.payload.clone())).collect();
        assert_eq!(
            shown,
            [
                (2, serde_json::json!({ "Set": { "value": 3, "unit": "m" } })),
                (2, serde_json::json!({ "Set": { "value": 4, "unit": "ft" } }))
            ]
        );
    }
}
