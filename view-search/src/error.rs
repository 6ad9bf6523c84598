//! The crate's error type and its mapping into [`ViewError`].

use std::path::PathBuf;

use kes_core::{QueryError, ViewError};
use tantivy::TantivyError;

/// Why a search-index operation failed. Callers of the [`kes_core::ViewStore`]
/// traits see it as a [`ViewError`] (`From` below sorts each kind).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SearchViewError {
    /// The view schema is invalid, or a row does not fit it.
    #[error(transparent)]
    Schema(#[from] kes_core::SchemaError),
    /// Tantivy refused or failed an operation.
    #[error("search index: {0}")]
    Tantivy(#[from] TantivyError),
    /// A file of the view's directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The index directory holds something that is not a KES view index.
    #[error("not a view index: {0}")]
    NotAViewIndex(String),
    /// The commit payload (checkpoint and schema version) cannot be read.
    #[error("unreadable commit payload: {0}")]
    Payload(String),
    /// A stored document cannot be read back.
    #[error("stored document of {id}: {reason}")]
    CorruptRow {
        /// The aggregate id.
        id: String,
        /// What was wrong.
        reason: String,
    },
    /// A value could not be turned into JSON.
    #[error("json: {0}")]
    Json(serde_json::Error),
    /// A query needs a field this copy of the index lacks (it was built
    /// from an older schema and is being rebuilt).
    #[error("field {0} is not in the index yet; the view is being rebuilt")]
    MissingField(String),
    /// A full-text query Tantivy cannot parse, or that names a field `q`
    /// may not search.
    #[error("{0}")]
    BadSearch(String),
    /// There is no shadow copy to write to or swap in.
    #[error("no rebuild in progress")]
    NoRebuild,
    /// A write to the shadow copy failed midway, after earlier writes were
    /// buffered but not yet committed: the copy would miss them, so it
    /// takes no more writes and cannot be swapped in. Rebuild again.
    #[error("a write to the rebuilt copy failed; the rebuild must start over")]
    BrokenRebuild,
    /// The copy was swapped out and dropped while the operation ran.
    #[error("this copy of the index was retired by a swap")]
    Retired,
    /// A background task of the view failed.
    #[error("index task failed: {0}")]
    Task(String),
    /// A write to a view opened with
    /// [`SearchView::open_read_only`](crate::SearchView::open_read_only),
    /// which never writes.
    #[error("the view {0} was opened read-only: it takes no writes (another process writes it)")]
    ReadOnly(String),
    /// A write to a view that does not hold the writer lock of its
    /// directory (another process holds it, or this view released it): it
    /// stands by until [`ViewStore::acquire_lease`](kes_core::ViewStore::acquire_lease)
    /// takes the lock. Nothing was written.
    #[error("the view {0} does not hold its index writer (another process may): it stands by until it takes the lease")]
    Standby(String),
    /// A fenced write whose lease is not the view's current one. Nothing
    /// was written.
    #[error("{0}")]
    Fenced(String),
}

impl From<SearchViewError> for ViewError {
    fn from(e: SearchViewError) -> Self {
        match e {
            SearchViewError::Tantivy(TantivyError::LockFailure(..)) => ViewError::Unavailable(e.to_string()),
            SearchViewError::Tantivy(TantivyError::DataCorruption(..)) | SearchViewError::NotAViewIndex(_) => {
                ViewError::Corrupt { id: "(index)".into(), reason: e.to_string() }
            }
            SearchViewError::Payload(_) => ViewError::Corrupt { id: "(checkpoint)".into(), reason: e.to_string() },
            SearchViewError::CorruptRow { id, reason } => ViewError::Corrupt { id, reason },
            SearchViewError::MissingField(_) | SearchViewError::Retired => ViewError::Unavailable(e.to_string()),
            SearchViewError::Schema(e) => ViewError::Schema(e),
            SearchViewError::BadSearch(reason) => ViewError::Query(QueryError::BadSearch(reason)),
            SearchViewError::Standby(_) | SearchViewError::Fenced(_) => ViewError::Fenced(e.to_string()),
            other => ViewError::Backend(other.to_string()),
        }
    }
}
