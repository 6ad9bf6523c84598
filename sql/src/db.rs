//! One code path for two databases: a pool, a transaction and a row of
//! either dialect, and statements whose arguments are data.
//!
//! The SQL backends write each operation once, against [`Pool`], [`Tx`]
//! and [`DbRow`]; the one `match` on the dialect per primitive lives here.
//! Arguments are a list of [`Arg`] values bound in order, so the code that
//! builds a statement is ordinary code, not a generic body compiled per
//! driver. Statements themselves use `$n` placeholders and syntax both
//! databases share; what differs (how a write transaction starts) is a
//! method of its own.

use std::borrow::Cow;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgArguments, PgPool, PgRow};
use sqlx::sqlite::{SqliteArguments, SqlitePool, SqliteRow};
use sqlx::types::Json;
use sqlx::{Decode, Postgres, Row, Sqlite, Transaction, Type};
use uuid::Uuid;

use crate::Dialect;

/// One argument of a statement, bound in order to `$1`, `$2`, ….
#[derive(Debug, Clone)]
pub enum Arg<'a> {
    /// Text, or `NULL`.
    Text(Option<&'a str>),
    /// Owned text, or `NULL`.
    String(Option<String>),
    /// An integer, or `NULL`.
    Int(Option<i64>),
    /// A float, or `NULL`.
    Float(Option<f64>),
    /// A boolean, or `NULL`.
    Bool(Option<bool>),
    /// A UUID (a native `uuid` on PostgreSQL, a blob on SQLite).
    Uuid(Uuid),
    /// A JSON document (`jsonb` on PostgreSQL, text on SQLite).
    Json(&'a serde_json::Value),
    /// A point in time (`timestamptz` on PostgreSQL, text on SQLite).
    Time(DateTime<Utc>),
}

impl From<&'static str> for Arg<'static> {
    fn from(v: &'static str) -> Self {
        Arg::Text(Some(v))
    }
}

impl From<i64> for Arg<'_> {
    fn from(v: i64) -> Self {
        Arg::Int(Some(v))
    }
}

/// A statement and its arguments.
#[derive(Debug, Clone)]
pub struct Statement<'a> {
    sql: Cow<'a, str>,
    args: Vec<Arg<'a>>,
}

impl<'a> Statement<'a> {
    /// `sql` with no arguments yet.
    pub fn new(sql: impl Into<Cow<'a, str>>) -> Self {
        Self { sql: sql.into(), args: Vec::new() }
    }

    /// `sql` with room for `n` arguments.
    pub fn with_capacity(sql: impl Into<Cow<'a, str>>, n: usize) -> Self {
        Self { sql: sql.into(), args: Vec::with_capacity(n) }
    }

    /// The text of the statement.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// The arguments bound so far.
    pub fn args(&self) -> &[Arg<'a>] {
        &self.args
    }

    /// Appends `text` to the statement.
    pub fn push_sql(&mut self, text: &str) -> &mut Self {
        self.sql.to_mut().push_str(text);
        self
    }

    /// Binds the next argument.
    pub fn arg(mut self, arg: Arg<'a>) -> Self {
        self.args.push(arg);
        self
    }

    /// Binds the next argument in place.
    pub fn push(&mut self, arg: Arg<'a>) {
        self.args.push(arg);
    }

    /// Binds text.
    pub fn text(self, v: &'a str) -> Self {
        self.arg(Arg::Text(Some(v)))
    }

    /// Binds text or `NULL`.
    pub fn opt_text(self, v: Option<&'a str>) -> Self {
        self.arg(Arg::Text(v))
    }

    /// Binds an integer.
    pub fn int(self, v: i64) -> Self {
        self.arg(Arg::Int(Some(v)))
    }

    fn sqlite(&self) -> sqlx::query::Query<'_, Sqlite, SqliteArguments<'_>> {
        let mut query = sqlx::query::<Sqlite>(&self.sql);
        for arg in &self.args {
            query = match arg {
                Arg::Text(v) => query.bind(*v),
                Arg::String(v) => query.bind(v.as_deref()),
                Arg::Int(v) => query.bind(*v),
                Arg::Float(v) => query.bind(*v),
                Arg::Bool(v) => query.bind(*v),
                Arg::Uuid(v) => query.bind(*v),
                Arg::Json(v) => query.bind(Json(*v)),
                Arg::Time(v) => query.bind(*v),
            };
        }
        query
    }

    fn postgres(&self) -> sqlx::query::Query<'_, Postgres, PgArguments> {
        let mut query = sqlx::query::<Postgres>(&self.sql);
        for arg in &self.args {
            query = match arg {
                Arg::Text(v) => query.bind(*v),
                Arg::String(v) => query.bind(v.as_deref()),
                Arg::Int(v) => query.bind(*v),
                Arg::Float(v) => query.bind(*v),
                Arg::Bool(v) => query.bind(*v),
                Arg::Uuid(v) => query.bind(*v),
                Arg::Json(v) => query.bind(Json(*v)),
                Arg::Time(v) => query.bind(*v),
            };
        }
        query
    }
}

/// A value a row's column can be read as, on both databases.
pub trait Column:
    Sized + for<'r> Decode<'r, Sqlite> + Type<Sqlite> + for<'r> Decode<'r, Postgres> + Type<Postgres>
{
}

impl<T> Column for T where
    T: Sized + for<'r> Decode<'r, Sqlite> + Type<Sqlite> + for<'r> Decode<'r, Postgres> + Type<Postgres>
{
}

/// A row of either database.
pub enum DbRow {
    /// A SQLite row.
    Sqlite(SqliteRow),
    /// A PostgreSQL row.
    Postgres(PgRow),
}

impl std::fmt::Debug for DbRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(row) => f.debug_struct("DbRow::Sqlite").field("columns", &row.len()).finish(),
            Self::Postgres(row) => f.debug_struct("DbRow::Postgres").field("columns", &row.len()).finish(),
        }
    }
}

impl DbRow {
    /// Column `index` (from 0) read as `T`. Read a column that may be
    /// `NULL` as an `Option`: as a plain value, PostgreSQL refuses a
    /// `NULL` while SQLite's driver may hand out a default.
    pub fn get<T: Column>(&self, index: usize) -> Result<T, sqlx::Error> {
        match self {
            Self::Sqlite(row) => row.try_get(index),
            Self::Postgres(row) => row.try_get(index),
        }
    }
}

/// A connection pool of either database.
#[derive(Debug, Clone)]
pub enum Pool {
    /// SQLite.
    Sqlite(SqlitePool),
    /// PostgreSQL.
    Postgres(PgPool),
}

impl Pool {
    /// The database the pool connects to.
    pub fn dialect(&self) -> Dialect {
        match self {
            Self::Sqlite(_) => Dialect::Sqlite,
            Self::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Runs `statement`; the number of rows it changed.
    pub async fn execute(&self, statement: &Statement<'_>) -> Result<u64, sqlx::Error> {
        Ok(match self {
            Self::Sqlite(pool) => statement.sqlite().execute(pool).await?.rows_affected(),
            Self::Postgres(pool) => statement.postgres().execute(pool).await?.rows_affected(),
        })
    }

    /// Every row `statement` returns.
    pub async fn fetch_all(&self, statement: &Statement<'_>) -> Result<Vec<DbRow>, sqlx::Error> {
        Ok(match self {
            Self::Sqlite(pool) => statement.sqlite().fetch_all(pool).await?.into_iter().map(DbRow::Sqlite).collect(),
            Self::Postgres(pool) => {
                statement.postgres().fetch_all(pool).await?.into_iter().map(DbRow::Postgres).collect()
            }
        })
    }

    /// The first row `statement` returns, if any.
    pub async fn fetch_optional(&self, statement: &Statement<'_>) -> Result<Option<DbRow>, sqlx::Error> {
        Ok(match self {
            Self::Sqlite(pool) => statement.sqlite().fetch_optional(pool).await?.map(DbRow::Sqlite),
            Self::Postgres(pool) => statement.postgres().fetch_optional(pool).await?.map(DbRow::Postgres),
        })
    }

    /// The first column of the first row `statement` returns, if any.
    pub async fn fetch_scalar<T: Column>(&self, statement: &Statement<'_>) -> Result<Option<T>, sqlx::Error> {
        self.fetch_optional(statement).await?.map(|row| row.get(0)).transpose()
    }

    /// A plain transaction (`BEGIN`).
    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Self::Sqlite(pool) => Tx::Sqlite(pool.begin().await?),
            Self::Postgres(pool) => Tx::Postgres(pool.begin().await?),
        })
    }

    /// A transaction that is to write. On SQLite it starts with `BEGIN
    /// IMMEDIATE`, so it holds the database's write lock from its first
    /// statement: a busy database waits in `busy_timeout` instead of
    /// failing on a lock upgrade (a deferred transaction that reads first
    /// and writes later fails at once when another connection wrote
    /// meanwhile). On PostgreSQL it is `BEGIN`, then `then_on_postgres` in
    /// the same round trip when given (a simple-query batch, e.g. taking an
    /// advisory lock).
    pub async fn begin_write(&self, then_on_postgres: Option<&str>) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Self::Sqlite(pool) => Tx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?),
            Self::Postgres(pool) => Tx::Postgres(match then_on_postgres {
                Some(then) => pool.begin_with(format!("BEGIN; {then}")).await?,
                None => pool.begin().await?,
            }),
        })
    }

    /// A read-only transaction whose statements all see one snapshot:
    /// `REPEATABLE READ, READ ONLY` on PostgreSQL; on SQLite a deferred
    /// transaction, which in WAL mode reads one snapshot from its first
    /// statement on.
    pub async fn begin_snapshot(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Self::Sqlite(pool) => Tx::Sqlite(pool.begin().await?),
            Self::Postgres(pool) => {
                Tx::Postgres(pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY").await?)
            }
        })
    }

    /// Closes the pool and every connection it opened; later operations
    /// fail.
    ///
    /// sqlx's own `close` can return while a connection is still on its
    /// way back to the pool (it pings the server before it queues itself as
    /// idle), and that connection then stays open, with whatever its
    /// session has not reported to the server, until the pool is dropped.
    /// This close repeats sqlx's until no connection is left, for at most
    /// [`CLOSE_WAIT`]; a closed pool lends and opens none, so only the
    /// connections already out can keep it waiting.
    pub async fn close(&self) {
        match self {
            Self::Sqlite(pool) => close_all(pool).await,
            Self::Postgres(pool) => close_all(pool).await,
        }
    }
}

/// The longest [`Pool::close`] waits for connections that are out of the
/// pool to come back and be closed.
pub const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// See [`Pool::close`].
async fn close_all<DB: sqlx::Database>(pool: &sqlx::Pool<DB>) {
    let deadline = tokio::time::Instant::now() + CLOSE_WAIT;
    loop {
        pool.close().await;
        if pool.size() == 0 {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(open = pool.size(), "connections still out of the pool after it closed; left to the server");
            return;
        }
        // sqlx tells no one when a returning connection lands in the idle
        // queue: look again shortly.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A transaction of either database. Dropped without [`Tx::commit`], it
/// rolls back.
#[derive(Debug)]
pub enum Tx {
    /// SQLite.
    Sqlite(Transaction<'static, Sqlite>),
    /// PostgreSQL.
    Postgres(Transaction<'static, Postgres>),
}

impl Tx {
    /// Runs `statement`; the number of rows it changed.
    pub async fn execute(&mut self, statement: &Statement<'_>) -> Result<u64, sqlx::Error> {
        Ok(match self {
            Self::Sqlite(tx) => statement.sqlite().execute(&mut **tx).await?.rows_affected(),
            Self::Postgres(tx) => statement.postgres().execute(&mut **tx).await?.rows_affected(),
        })
    }

    /// Every row `statement` returns.
    pub async fn fetch_all(&mut self, statement: &Statement<'_>) -> Result<Vec<DbRow>, sqlx::Error> {
        Ok(match self {
            Self::Sqlite(tx) => statement.sqlite().fetch_all(&mut **tx).await?.into_iter().map(DbRow::Sqlite).collect(),
            Self::Postgres(tx) => {
                statement.postgres().fetch_all(&mut **tx).await?.into_iter().map(DbRow::Postgres).collect()
            }
        })
    }

    /// The first row `statement` returns, if any.
    pub async fn fetch_optional(&mut self, statement: &Statement<'_>) -> Result<Option<DbRow>, sqlx::Error> {
        Ok(match self {
            Self::Sqlite(tx) => statement.sqlite().fetch_optional(&mut **tx).await?.map(DbRow::Sqlite),
            Self::Postgres(tx) => statement.postgres().fetch_optional(&mut **tx).await?.map(DbRow::Postgres),
        })
    }

    /// The first column of the first row `statement` returns, if any.
    pub async fn fetch_scalar<T: Column>(&mut self, statement: &Statement<'_>) -> Result<Option<T>, sqlx::Error> {
        self.fetch_optional(statement).await?.map(|row| row.get(0)).transpose()
    }

    /// Commits.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Self::Sqlite(tx) => tx.commit().await,
            Self::Postgres(tx) => tx.commit().await,
        }
    }

    /// Rolls back.
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        match self {
            Self::Sqlite(tx) => tx.rollback().await,
            Self::Postgres(tx) => tx.rollback().await,
        }
    }
}
