//! The crate's one error type and how it maps onto the core's portable
//! [`StoreError`].

use std::path::PathBuf;

use kes_core::StoreError;
use kes_sql::is_transient;
pub(crate) use kes_sql::redact;

/// Why opening or using a [`crate::SqlStore`] failed.
///
/// Every variant maps into [`StoreError`] (see the `From` impl), which is
/// what the `EventStore` methods return; `open` returns this type so that a
/// caller can tell a bad URL from an unreachable server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqlStoreError {
    /// The URL is not `sqlite:…` or `postgres://…`, or does not parse.
    #[error("unsupported or malformed store URL {url}: {reason}")]
    Url {
        /// The URL with any password removed.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The PostgreSQL schema name is not a plain identifier.
    #[error(
        "invalid schema name {0:?}: use a lower-case letter, then lower-case letters, digits and underscores, at most 48"
    )]
    SchemaName(String),
    /// The folder of the SQLite file could not be created.
    #[error("cannot create the folder {path} for the SQLite file: {source}")]
    CreateDir {
        /// The folder.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The database could not be reached or refused the connection.
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    /// The embedded migrations could not be applied.
    #[error("cannot migrate the event store tables: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// A statement failed.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// The state version of the table could not be checked or recorded.
    #[error("cannot check the state version of the table of latest states: {0}")]
    StateVersion(#[source] kes_core::StoreError),
}

impl SqlStoreError {
    /// Whether retrying later may succeed (the server is down, busy or
    /// timed out).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect(_) | Self::CreateDir { .. } => true,
            Self::Database(e) => is_transient(e),
            Self::StateVersion(e) => e.is_transient(),
            Self::Url { .. } | Self::SchemaName(_) | Self::Migrate(_) => false,
        }
    }
}

impl From<SqlStoreError> for StoreError {
    fn from(e: SqlStoreError) -> Self {
        match &e {
            SqlStoreError::Url { .. } | SqlStoreError::SchemaName(_) => StoreError::Invalid(e.to_string()),
            _ if e.is_transient() => StoreError::Unavailable(e.to_string()),
            _ => StoreError::Backend(e.to_string()),
        }
    }
}

/// A failed statement as a portable error (no SQL text in it: the message of
/// the driver only).
pub(crate) fn db(e: sqlx::Error) -> StoreError {
    SqlStoreError::Database(e).into()
}

/// Whether the driver error is a unique-key violation (a stale append that
/// slipped past the version check, e.g. from another process).
pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.kind() == sqlx::error::ErrorKind::UniqueViolation)
}
