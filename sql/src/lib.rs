//! # kes-sql
//!
//! The SQL plumbing that `kes-store-sql` (the event log and table) and
//! `kes-view-sql` (list views) share, so that each rule has one home and
//! one behaviour:
//!
//! - [`Dialect`]: which database a URL names.
//! - [`sqlite_options`]: how a SQLite file is opened — WAL, a busy timeout,
//!   the folder created, and the one setting that differs by what the file
//!   holds ([`Durability`]).
//! - [`is_transient`]: which driver errors mean "the database cannot serve
//!   us now, retry later" (503 and back-off rather than a failure).
//! - [`redact`]: a URL without its password, for messages and logs.
//! - [`pg_pool_options`]: how a PostgreSQL pool checks its connections.
//! - [`Pool`], [`Tx`], [`DbRow`] and [`Statement`]: one code path for both
//!   databases — each operation is written once, and the `match` on the
//!   dialect per primitive lives here.
//!
//! It is an internal crate of KES: its API follows what the two backends
//! need.

mod db;

pub use db::{Arg, CLOSE_WAIT, Column, DbRow, Pool, Statement, Tx};

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};

/// Which database a SQL backend runs on. The two backends match on it
/// exhaustively: a third dialect is a change to both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// An embedded SQLite file (or an in-memory database).
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

impl Dialect {
    /// The dialect a URL names: `sqlite:…`, `postgres://…` or
    /// `postgresql://…`; `None` for anything else.
    pub fn of_url(url: &str) -> Option<Self> {
        if url.starts_with("sqlite:") {
            Some(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Self::Postgres)
        } else {
            None
        }
    }
}

/// What a SQLite file holds, which decides how hard a commit waits for the
/// disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The event log: `synchronous = FULL`, so an acknowledged append is on
    /// disk and survives a power cut, not only a crash of the process.
    Log,
    /// Data rebuilt from the log (list views): `synchronous = NORMAL`. In
    /// WAL mode a crash of the process loses nothing; a power cut may lose
    /// the last commits, and since a view's checkpoint is written in the
    /// same transaction as its rows, it then simply projects them again.
    Rebuildable,
}

/// A connection idle for longer than this is pinged before a PostgreSQL
/// pool hands it out. Short, so that connections a server restart or an
/// outage left dead are caught by the ping rather than by a request;
/// a busy pool reuses its connections far more often than this.
pub const PG_PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// The options every PostgreSQL pool of KES starts from. sqlx pings each
/// connection before handing it out by default, a round trip that costs a
/// lone append or read as much as one of its statements; here only a
/// connection idle for longer than [`PG_PING_AFTER_IDLE`] is pinged (one
/// that fails is closed and another taken), which is where a server restart
/// or a dropped link leaves dead connections. A connection that dies within
/// that second of its last use fails the statement on it as transient (a
/// 503 that the client may retry), and the pool drops it.
pub fn pg_pool_options() -> sqlx::postgres::PgPoolOptions {
    sqlx::postgres::PgPoolOptions::new().test_before_acquire(false).before_acquire(|conn, meta| {
        Box::pin(async move {
            if meta.idle_for > PG_PING_AFTER_IDLE {
                sqlx::Connection::ping(conn).await?;
            }
            Ok(true)
        })
    })
}

/// How long a SQLite connection waits for another writer before `BUSY`.
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// A SQLite database as KES opens it.
#[derive(Debug, Clone)]
pub struct SqliteTarget {
    /// The connect options: created when missing, WAL (files only), busy
    /// timeout [`SQLITE_BUSY_TIMEOUT`], `synchronous` by [`Durability`].
    pub options: SqliteConnectOptions,
    /// An in-memory database: it lives as long as one connection to it, so
    /// the caller must keep exactly one open and never close it.
    pub in_memory: bool,
}

/// Why a SQLite database could not be prepared.
#[derive(Debug)]
pub enum SqliteSetupError {
    /// The URL does not parse.
    Url(sqlx::Error),
    /// The folder of the file could not be created.
    Folder {
        /// The folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The options KES opens the SQLite database at `url` with, its folder
/// created when missing. One rule for both backends: `sqlite::memory:` or a
/// URL with `mode=memory` is in memory (no WAL, no folder); anything else
/// is a file.
pub fn sqlite_options(url: &str, durability: Durability) -> Result<SqliteTarget, SqliteSetupError> {
    let synchronous = match durability {
        Durability::Log => SqliteSynchronous::Full,
        Durability::Rebuildable => SqliteSynchronous::Normal,
    };
    let mut options = SqliteConnectOptions::from_str(url)
        .map_err(SqliteSetupError::Url)?
        .create_if_missing(true)
        .busy_timeout(SQLITE_BUSY_TIMEOUT)
        .synchronous(synchronous);
    let in_memory = url.contains(":memory:") || url.contains("mode=memory");
    if !in_memory {
        options = options.journal_mode(SqliteJournalMode::Wal);
        create_folder_of(options.get_filename())?;
    }
    Ok(SqliteTarget { options, in_memory })
}

fn create_folder_of(file: &Path) -> Result<(), SqliteSetupError> {
    match file.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|source| SqliteSetupError::Folder { path: dir.to_owned(), source })
        }
        None => Ok(()),
    }
}

/// Whether a driver error means "the database cannot serve us right now"
/// rather than "this request is wrong": worth a retry later, shown to
/// clients as unavailable (503).
///
/// - The connection: I/O, TLS and protocol errors, a pool that timed out or
///   closed, a crashed worker.
/// - PostgreSQL SQLSTATEs: connection exceptions (class 08), insufficient
///   resources (53), operator intervention (57: shutdown, a cancelled or
///   timed-out statement), serialisation failures and deadlocks (40001,
///   40P01), a lock not available (55P03).
/// - SQLite result codes (primary part of extended codes): BUSY (5),
///   LOCKED (6), IOERR (10), FULL (13), CANTOPEN (14).
pub fn is_transient(e: &sqlx::Error) -> bool {
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

/// [`is_transient`] for a database's error code.
pub fn transient_code(code: &str) -> bool {
    // PostgreSQL answers five-character SQLSTATEs; SQLite its numeric
    // (extended) result codes, which never reach five digits.
    if code.len() != 5 {
        return code.parse::<u32>().is_ok_and(|n| matches!(n & 0xff, 5 | 6 | 10 | 13 | 14));
    }
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57")
        || matches!(code, "40001" | "40P01" | "55P03")
}

/// `url` without its password, for error messages and logs.
pub fn redact(url: &str) -> String {
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

/// `From<&str>`, `From<String>` and `From<&String>` for a backend's
/// config type through its `from_url`, so that `X::open` takes a bare URL
/// as well as a config.
#[macro_export]
macro_rules! config_from_url {
    ($config:ty) => {
        impl From<&str> for $config {
            fn from(url: &str) -> Self {
                Self::from_url(url)
            }
        }

        impl From<String> for $config {
            fn from(url: String) -> Self {
                Self::from_url(&url)
            }
        }

        impl From<&String> for $config {
            fn from(url: &String) -> Self {
                Self::from_url(url)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialects_by_url() {
        assert_eq!(Dialect::of_url("sqlite://data/x.db"), Some(Dialect::Sqlite));
        assert_eq!(Dialect::of_url("sqlite::memory:"), Some(Dialect::Sqlite));
        assert_eq!(Dialect::of_url("postgres://h/db"), Some(Dialect::Postgres));
        assert_eq!(Dialect::of_url("postgresql://h/db"), Some(Dialect::Postgres));
        assert_eq!(Dialect::of_url("mysql://h/db"), None);
    }

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redact("postgres://app:s3cret@db:5432/x"), "postgres://app:***@db:5432/x");
        assert_eq!(redact("postgres://app:s3cret@db"), "postgres://app:***@db");
        assert_eq!(redact("postgres://db/x"), "postgres://db/x");
        assert_eq!(redact("sqlite://data/events.db"), "sqlite://data/events.db");
    }

    #[test]
    fn codes_sort_into_transient_and_not() {
        for code in ["08006", "53300", "57P01", "57014", "40001", "40P01", "55P03", "5", "517", "6", "10", "13", "14"] {
            assert!(transient_code(code), "{code} is transient");
        }
        for code in ["23505", "42P01", "22P02", "1", "19", "2067", "787"] {
            assert!(!transient_code(code), "{code} is not transient");
        }
    }

    #[test]
    fn memory_and_files_are_told_apart_the_same_way_for_every_url() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nested/folder/x.db");
        let target = sqlite_options(&format!("sqlite://{}", file.display()), Durability::Log).unwrap();
        assert!(!target.in_memory);
        assert!(file.parent().unwrap().is_dir(), "the folder is created");
        assert_eq!(target.options.get_filename(), file.as_path());
        for url in ["sqlite::memory:", "sqlite://x.db?mode=memory"] {
            assert!(sqlite_options(url, Durability::Rebuildable).unwrap().in_memory, "{url}");
        }
        assert!(matches!(
            sqlite_options("sqlite://x.db?mode=nonsense", Durability::Log),
            Err(SqliteSetupError::Url(_))
        ));
    }

    #[tokio::test]
    async fn the_settings_reach_the_connection() {
        use sqlx::{ConnectOptions, Row};
        let dir = tempfile::tempdir().unwrap();
        for (durability, synchronous) in [(Durability::Log, 2), (Durability::Rebuildable, 1)] {
            let url = format!("sqlite://{}", dir.path().join(format!("{durability:?}.db")).display());
            let mut conn = sqlite_options(&url, durability).unwrap().options.connect().await.unwrap();
            let row = sqlx::query("PRAGMA synchronous").fetch_one(&mut conn).await.unwrap();
            assert_eq!(row.get::<i64, _>(0), synchronous, "{durability:?}");
            let row = sqlx::query("PRAGMA journal_mode").fetch_one(&mut conn).await.unwrap();
            assert_eq!(row.get::<String, _>(0), "wal");
            let row = sqlx::query("PRAGMA busy_timeout").fetch_one(&mut conn).await.unwrap();
            assert_eq!(row.get::<i64, _>(0), 10_000);
        }
    }
}
