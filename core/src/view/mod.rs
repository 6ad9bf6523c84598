//! List views: schemas, queries, pages, and the traits list backends
//! implement.

mod query;
mod schema;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

pub use query::{Cond, Cursor, Filter, FilterOp, ListQuery, QueryError, SortKey, ValidFilter, ValidQuery, ValidSort};
pub use schema::{
    Field, FieldType, FieldValue, ID_FIELD, Row, SchemaError, ViewSchema, is_plain_name, prefix_upper_bound,
};

use crate::envelope::Checkpoint;

/// One row of a page.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ListItem {
    /// The aggregate id.
    pub id: String,
    /// The aggregate version the row reflects.
    pub version: u64,
    /// The row's fields.
    pub row: Row,
}

/// One page of a list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page {
    /// The rows, in query order.
    pub items: Vec<ListItem>,
    /// The cursor of the next page; `None` on the last page.
    pub next: Option<String>,
    /// How many rows match the query in all.
    pub total: u64,
}

/// Why a list view operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ViewError {
    /// The query is not valid for this view (a client error).
    #[error(transparent)]
    Query(#[from] QueryError),
    /// The schema is not valid, or a row does not fit it.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// The backend cannot be reached now.
    #[error("list view unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be read back.
    #[error("list view data of {id} cannot be read: {reason}")]
    Corrupt {
        /// The aggregate id of the unreadable row.
        id: String,
        /// What was wrong.
        reason: String,
    },
    /// A write refused because the writer no longer holds the view's
    /// lease (another runner took it over: its fence moved on), or because
    /// it would move the checkpoint back. The writer stands by and reloads.
    #[error("view write fenced: {0}")]
    Fenced(String),
    /// Any other backend failure.
    #[error("list view failure: {0}")]
    Backend(String),
}

/// A runner's hold on the write side of a view: who holds it and the fence
/// (generation) its takeover got. A backend that stores leases bumps the
/// fence on every takeover and refuses a [`ViewStore::write_fenced`] whose
/// lease is not the current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The holder: a random id per runner.
    pub owner: String,
    /// The fence its takeover got.
    pub fence: u64,
}

/// The read side of a list view: answers list queries.
#[async_trait]
pub trait ListView: Send + Sync {
    /// The schema the view was built from.
    fn schema(&self) -> &ViewSchema;

    /// One page of rows matching `query`. Implementations validate the query
    /// against [`ListView::schema`] first ([`ListQuery::validate`]).
    async fn list(&self, query: &ListQuery) -> Result<Page, ViewError>;

    /// How far the live copy has consumed the log (for read-your-writes).
    async fn position(&self) -> Result<Checkpoint, ViewError>;
}

/// Which copy of a view a write goes to: the one serving queries, or the
/// one being rebuilt beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ViewCopy {
    /// The copy that answers queries.
    Live,
    /// The copy being rebuilt; it answers nothing until swapped in.
    Shadow,
}

/// The aggregate state a view keeps beside each row, so that the next event
/// can be applied to it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredState {
    /// The version of the last event applied.
    pub version: u64,
    /// The aggregate state as JSON.
    pub state: serde_json::Value,
}

/// A change to one row, produced by a projection.
#[derive(Debug, Clone)]
pub struct RowChange {
    /// The aggregate id (the row's key).
    pub id: String,
    /// The aggregate version after the change.
    pub version: u64,
    /// The aggregate state after the change, as compact JSON text: views
    /// store it as text, so it is written once from the typed state,
    /// without a `serde_json::Value` tree in between ([`RowChange::state_of`]).
    pub state: Box<serde_json::value::RawValue>,
    /// The row to show, or `None` when the aggregate was deleted (the row
    /// disappears from lists; its state is kept).
    pub row: Option<Row>,
}

impl RowChange {
    /// The JSON text of `state`, as [`RowChange::state`] holds it.
    pub fn state_of(state: &impl Serialize) -> Result<Box<serde_json::value::RawValue>, serde_json::Error> {
        serde_json::value::to_raw_value(state)
    }
}

/// Two changes are equal when their ids, versions, rows and state texts
/// are (a state written twice from equal values gives the same text).
impl PartialEq for RowChange {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.version == other.version
            && self.state.get() == other.state.get()
            && self.row == other.row
    }
}

/// What a view copy remembers of its progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewProgress {
    /// How far it has consumed the log.
    pub checkpoint: Checkpoint,
    /// The schema version it was built with.
    pub schema_version: u32,
}

/// The write side of a list backend: rows, the states behind them and the
/// checkpoint, written together.
///
/// Every backend runs the ListView conformance suite
/// (`kes_core::conformance`, feature `testing`).
#[async_trait]
pub trait ViewStore: ListView {
    /// The progress of `copy`; `None` when it was never written.
    async fn progress(&self, copy: ViewCopy) -> Result<Option<ViewProgress>, ViewError>;

    /// The checkpoint of the live copy (the start of the log when it was
    /// never written): what [`ListView::position`] answers for a view that
    /// keeps its progress with its rows.
    async fn live_checkpoint(&self) -> Result<Checkpoint, ViewError> {
        Ok(self.progress(ViewCopy::Live).await?.map(|p| p.checkpoint).unwrap_or_default())
    }

    /// The stored states of `ids` in `copy` (absent ids are left out).
    async fn states(&self, copy: ViewCopy, ids: &[String]) -> Result<HashMap<String, StoredState>, ViewError>;

    /// Applies `changes` and moves the checkpoint of `copy` to `checkpoint`,
    /// atomically: after a crash either all of it is there or none.
    async fn write(&self, copy: ViewCopy, changes: &[RowChange], checkpoint: &Checkpoint) -> Result<(), ViewError>;

    /// Starts an empty shadow copy (dropping any earlier unfinished one).
    async fn begin_rebuild(&self) -> Result<(), ViewError>;

    /// Makes the shadow copy the live one, atomically for readers; the old
    /// live copy is dropped.
    async fn swap(&self) -> Result<(), ViewError>;

    /// Takes the view's lease for `owner` for `ttl` (by the backend's own
    /// clock) when it is free, expired or already `owner`'s, bumping its
    /// fence; `None` when another owner holds it. Only the holder should
    /// write; [`ViewStore::write_fenced`] enforces it.
    ///
    /// The default grants every request at once with fence 0: a backend
    /// that keeps no lease (the in-memory view, a backend that is single
    /// writer by other means) lets every runner write, as before.
    async fn acquire_lease(&self, owner: &str, ttl: Duration) -> Result<Option<Lease>, ViewError> {
        let _ = ttl;
        Ok(Some(Lease { owner: owner.to_owned(), fence: 0 }))
    }

    /// Extends `lease` by `ttl`; `false` when it is no longer the current
    /// lease (taken over). The default always renews.
    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<bool, ViewError> {
        let _ = (lease, ttl);
        Ok(true)
    }

    /// Gives `lease` up (a planned shutdown), so that a standby takes over
    /// at once. The default does nothing.
    async fn release_lease(&self, lease: &Lease) -> Result<(), ViewError> {
        let _ = lease;
        Ok(())
    }

    /// [`ViewStore::write`] by the holder of `lease`: refused with
    /// [`ViewError::Fenced`] (nothing written) when `lease` is no longer
    /// current, checked in the write's own transaction. The default writes
    /// unconditionally.
    async fn write_fenced(
        &self,
        copy: ViewCopy,
        changes: &[RowChange],
        checkpoint: &Checkpoint,
        lease: &Lease,
    ) -> Result<(), ViewError> {
        let _ = lease;
        self.write(copy, changes, checkpoint).await
    }

    /// [`ViewStore::write_fenced`] handed the changes to keep: a backend
    /// that writes off the async executor (on a blocking thread) moves them
    /// there instead of copying every state and row. A rebuild's bulk
    /// writes come this way. The default lends them to
    /// [`ViewStore::write_fenced`].
    async fn write_fenced_owned(
        &self,
        copy: ViewCopy,
        changes: Vec<RowChange>,
        checkpoint: &Checkpoint,
        lease: &Lease,
    ) -> Result<(), ViewError> {
        self.write_fenced(copy, &changes, checkpoint, lease).await
    }

    /// A rebuild's batch for the shadow copy ([`ViewStore::write_fenced_owned`]
    /// into [`ViewCopy::Shadow`]), with the rows of aggregates that the
    /// shadow holds no row of yet (`new`) apart from the rest (`known`).
    /// Most of a rebuild is `new`: each aggregate meets the shadow once.
    ///
    /// A backend may insert `new` with a bulk path that cannot update a row
    /// (PostgreSQL's `COPY`). Should the shadow hold a row of `new` after
    /// all, the write must not keep both: it fails, or it writes the batch
    /// as [`ViewStore::write_fenced_owned`] would. The default does the
    /// latter for every batch.
    async fn write_shadow_fenced(
        &self,
        new: Vec<RowChange>,
        known: Vec<RowChange>,
        checkpoint: &Checkpoint,
        lease: &Lease,
    ) -> Result<(), ViewError> {
        let mut changes = new;
        changes.extend(known);
        self.write_fenced_owned(ViewCopy::Shadow, changes, checkpoint, lease).await
    }

    /// [`ViewStore::swap`] by the holder of `lease`, fenced like
    /// [`ViewStore::write_fenced`]. The default swaps unconditionally.
    async fn swap_fenced(&self, lease: &Lease) -> Result<(), ViewError> {
        let _ = lease;
        self.swap().await
    }

    /// [`ViewStore::begin_rebuild`] by the holder of `lease`, fenced like
    /// [`ViewStore::write_fenced`]: a writer that lost the lease cannot drop
    /// the shadow copy its successor is filling. The default starts the
    /// shadow unconditionally.
    async fn begin_rebuild_fenced(&self, lease: &Lease) -> Result<(), ViewError> {
        let _ = lease;
        self.begin_rebuild().await
    }

    /// Readies the filled shadow copy for its swap (e.g. builds its
    /// secondary indexes), so that the swap itself, which runs while the
    /// live copy's writer is paused, stays short. Called by the holder of
    /// the lease before it pauses the live copy; the default does nothing.
    async fn prepare_swap(&self) -> Result<(), ViewError> {
        Ok(())
    }
}
