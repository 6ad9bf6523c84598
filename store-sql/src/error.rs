//! The crate's one error type and how it maps onto the core's portable
//! [`StoreError`].

use std::path::PathBuf;

use kes_core::StoreError;

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
    #[error("invalid schema name {0:?}: use letters, digits and underscores, at most 63, not starting with a digit")]
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

/// Whether the driver error means "the database cannot serve us right now"
/// rather than "this request is wrong".
fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|code| transient_code(&code)),
        _ => false,
    }
}

/// SQLite: BUSY (5), LOCKED (6) and their extended codes, IOERR (10), FULL (13)
/// and CANTOPEN (14). PostgreSQL: connection exceptions (08), serialisation
/// failures and deadlocks (40001, 40P01), insufficient resources (53) and
/// operator intervention such as a shutdown (57P01..57P03).
fn transient_code(code: &str) -> bool {
    // PostgreSQL answers five-character SQLSTATEs; SQLite its numeric
    // (extended) result codes, which never reach five digits.
    if code.len() != 5 {
        return code.parse::<u32>().is_ok_and(|n| matches!(n & 0xff, 5 | 6 | 10 | 13 | 14));
    }
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(code, "40001" | "40P01" | "57P01" | "57P02" | "57P03" | "55P03")
}

/// Whether the driver error is a unique-key violation (a stale append that
/// slipped past the version check, e.g. from another process).
pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.kind() == sqlx::error::ErrorKind::UniqueViolation)
}

/// `url` without its password, for error messages and logs.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = rest.split_once('/').map_or((rest, ""), |(a, t)| (a, t));
    match authority.rsplit_once('@') {
        Some((user_info, host)) => {
            let user = user_info.split_once(':').map_or(user_info, |(u, _)| u);
            let slash = if rest.contains('/') { "/" } else { "" };
            format!("{scheme}://{user}:***@{host}{slash}{tail}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redact("postgres://app:s3cret@db:5432/x"), "postgres://app:***@db:5432/x");
        assert_eq!(redact("postgres://db/x"), "postgres://db/x");
        assert_eq!(redact("sqlite://data/events.db"), "sqlite://data/events.db");
    }

    #[test]
    fn codes_sort_into_transient_and_not() {
        assert!(transient_code("5"));
        assert!(transient_code("517")); // SQLITE_BUSY_SNAPSHOT
        assert!(transient_code("08006"));
        assert!(transient_code("57P01"));
        assert!(!transient_code("23505"));
        assert!(!transient_code("2067")); // SQLITE_CONSTRAINT_UNIQUE
        assert!(!transient_code("42P01"));
    }
}
