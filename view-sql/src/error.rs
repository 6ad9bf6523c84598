//! The crate's one error type and its mapping into the core's portable
//! [`ViewError`].

use kes_core::SchemaError;
use kes_core::{QueryError, ViewError};

/// Why a SQL list view operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqlViewError {
    /// The URL names no supported database or cannot be parsed.
    #[error("unsupported view database URL: {0}")]
    BadUrl(String),
    /// The PostgreSQL schema name is not a plain identifier.
    #[error("invalid PostgreSQL schema name {0:?}: lower-case ASCII letters, digits and _ only")]
    BadSchemaName(String),
    /// The view schema is invalid, or a row does not fit it.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// The query is not valid for this view.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// A shadow copy was written, read or swapped in while no rebuild runs.
    #[error("no rebuild in progress for view {0}")]
    NoRebuild(String),
    /// Stored data could not be read back.
    #[error("stored data of {id} cannot be read: {reason}")]
    Corrupt {
        /// The aggregate id of the unreadable row (or what else was unreadable).
        id: String,
        /// What was wrong.
        reason: String,
    },
    /// Creating the directory of a SQLite file failed.
    #[error("cannot create the directory of {path}: {source}")]
    Directory {
        /// The directory.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A write by a runner that no longer holds the view's lease (another
    /// took it over and bumped the fence), or one that would move the
    /// checkpoint back; nothing was written.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The database refused or failed an operation.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl SqlViewError {
    /// Whether the failure is the database being out of reach (retrying
    /// later may help) rather than a fault of the data or the request.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Database(e) if kes_sql::is_transient(e))
    }

    /// Whether the database refused a row that a unique index already
    /// holds (PostgreSQL's `unique_violation`).
    pub(crate) fn is_unique_violation(&self) -> bool {
        let Self::Database(sqlx::Error::Database(db)) = self else { return false };
        db.code().as_deref() == Some("23505")
    }

    /// Whether the database said a table does not exist (a copy that was
    /// dropped or never created).
    pub(crate) fn is_missing_table(&self) -> bool {
        let Self::Database(sqlx::Error::Database(db)) = self else { return false };
        db.code().as_deref() == Some("42P01") || db.message().contains("no such table")
    }
}

impl From<SqlViewError> for ViewError {
    fn from(e: SqlViewError) -> Self {
        if e.is_transient() {
            return ViewError::Unavailable(e.to_string());
        }
        match e {
            SqlViewError::Schema(s) => ViewError::Schema(s),
            SqlViewError::Query(q) => ViewError::Query(q),
            SqlViewError::Corrupt { id, reason } => ViewError::Corrupt { id, reason },
            SqlViewError::Fenced(reason) => ViewError::Fenced(reason),
            SqlViewError::Database(
                sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) | sqlx::Error::ColumnNotFound(_),
            ) => ViewError::Corrupt { id: "(row)".into(), reason: e.to_string() },
            other => ViewError::Backend(other.to_string()),
        }
    }
}
