//! The keys of personal data in SQLite or PostgreSQL: a [`KeyStore`] in
//! a database of its own (a file beside the log's, or a schema).
//!
//! Three tables:
//! - `kes_subject_keys`: a subject's wrapped key and the person reference
//!   it was made for; the row is deleted when the subject is erased;
//! - `kes_subject_erasures`: one row per erased subject, never deleted,
//!   so that a missing key is told apart from an erased one;
//! - `kes_subject_aggregates`: which aggregates hold a subject's data,
//!   until each has recorded the subject's erasure.
//!
//! Bytes left behind: SQLite runs with `secure_delete` and truncates its
//! write-ahead log after an erasure; PostgreSQL vacuums the key table
//! after an erasure. Backups, replicas and WAL archives of the key
//! database keep erased keys until they age out: keep them short-lived.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::Utc;
use kes_core::{AggregateRef, Erasure, KeyLookup, KeyRequest, KeyStore, KeyStoreError, WrappedKey};
use kes_sql::{Arg, Dialect, Pool, Statement, Tx};
use sqlx::Executor;
use sqlx::sqlite::SqlitePoolOptions;

use crate::config::postgres_options;
use crate::error::{SqlStoreError, redact};

/// How a [`SqlKeyStore`] is configured.
#[derive(Clone)]
pub struct SqlKeyStoreConfig {
    url: String,
    schema: Option<String>,
    max_connections: u32,
}

impl fmt::Debug for SqlKeyStoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlKeyStoreConfig")
            .field("url", &redact(&self.url))
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

kes_sql::config_from_url!(SqlKeyStoreConfig);

impl SqlKeyStoreConfig {
    /// The key store at `url` (`sqlite:PATH` or `postgres://…`). Keep it
    /// apart from the log: another SQLite file, another schema or database.
    pub fn from_url(url: &str) -> Self {
        Self { url: url.trim().to_owned(), schema: None, max_connections: 4 }
    }

    /// The PostgreSQL schema of the tables (created when missing).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// Most connections of the pool.
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max.max(1);
        self
    }
}

/// A [`KeyStore`] in SQLite or PostgreSQL.
#[derive(Debug, Clone)]
pub struct SqlKeyStore {
    pool: Pool,
}

const SQLITE_TABLES: &str = "
CREATE TABLE IF NOT EXISTS kes_subject_keys (
    subject TEXT PRIMARY KEY,
    person TEXT UNIQUE,
    key_id TEXT NOT NULL,
    wrapped TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS kes_subject_erasures (
    subject TEXT PRIMARY KEY,
    erased_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS kes_subject_aggregates (
    subject TEXT NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    PRIMARY KEY (subject, aggregate_type, aggregate_id)
);";

const POSTGRES_TABLES: &str = "
CREATE TABLE IF NOT EXISTS kes_subject_keys (
    subject TEXT PRIMARY KEY,
    person TEXT UNIQUE,
    key_id TEXT NOT NULL,
    wrapped TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS kes_subject_erasures (
    subject TEXT PRIMARY KEY,
    erased_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS kes_subject_aggregates (
    subject TEXT NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    PRIMARY KEY (subject, aggregate_type, aggregate_id)
);";

/// Startup parameters of every PostgreSQL session of the key store.
/// Every statement of the key store looks rows up by a key one of its
/// indexes holds (the subject, the person, a subject's aggregates): a plan
/// a session cached while the tables were empty or analysed empty
/// (prepared statements settle on one after a few executions) would
/// otherwise scan every key on each lookup until the table is analysed
/// again. Bitmap scans stay allowed: erasure's `subject = $1 OR person =
/// $1` is answered by one over both unique indexes.
const KEY_PLANS: &[(&str, &str)] = &[("enable_seqscan", "off")];

fn failed(e: sqlx::Error) -> KeyStoreError {
    if kes_sql::is_transient(&e) {
        KeyStoreError::Unavailable(e.to_string())
    } else {
        KeyStoreError::Backend(e.to_string())
    }
}

impl SqlKeyStore {
    /// Opens (and creates when missing) the key store.
    pub async fn open(config: impl Into<SqlKeyStoreConfig>) -> Result<Self, SqlStoreError> {
        let config = config.into();
        let pool = match Dialect::of_url(&config.url) {
            Some(Dialect::Sqlite) => Self::open_sqlite(&config).await?,
            Some(Dialect::Postgres) => Self::open_postgres(&config).await?,
            None => {
                return Err(SqlStoreError::Url {
                    url: redact(&config.url),
                    reason: "expected sqlite:PATH or postgres://…".into(),
                });
            }
        };
        Ok(Self { pool })
    }

    async fn open_sqlite(config: &SqlKeyStoreConfig) -> Result<Pool, SqlStoreError> {
        let target = kes_sql::sqlite_options(&config.url, kes_sql::Durability::Log).map_err(|e| match e {
            kes_sql::SqliteSetupError::Url(e) => SqlStoreError::Url { url: redact(&config.url), reason: e.to_string() },
            kes_sql::SqliteSetupError::Folder { path, source } => SqlStoreError::CreateDir { path, source },
        })?;
        // Deleted keys are overwritten with zeros, not left in free pages.
        let options = target.options.pragma("secure_delete", "ON");
        let max = if target.in_memory { 1 } else { config.max_connections };
        let pool = SqlitePoolOptions::new()
            .max_connections(max)
            .min_connections(u32::from(target.in_memory))
            .idle_timeout(if target.in_memory { None } else { Some(Duration::from_secs(600)) })
            .max_lifetime(if target.in_memory { None } else { Some(Duration::from_secs(1800)) })
            .connect_with(options)
            .await
            .map_err(SqlStoreError::Connect)?;
        pool.execute(SQLITE_TABLES).await.map_err(SqlStoreError::Database)?;
        Ok(Pool::Sqlite(pool))
    }

    async fn open_postgres(config: &SqlKeyStoreConfig) -> Result<Pool, SqlStoreError> {
        let options = postgres_options(&config.url, config.schema.as_deref(), KEY_PLANS).await?;
        let pool = kes_sql::pg_pool_options()
            .max_connections(config.max_connections)
            .connect_with(options)
            .await
            .map_err(SqlStoreError::Connect)?;
        // Two processes opening a new key store at once must not trip over
        // each other's CREATE TABLE: one at a time, under an advisory lock.
        let mut tx = pool.begin().await.map_err(SqlStoreError::Database)?;
        (&mut *tx).execute("SELECT pg_advisory_xact_lock(7310001)").await.map_err(SqlStoreError::Database)?;
        (&mut *tx).execute(POSTGRES_TABLES).await.map_err(SqlStoreError::Database)?;
        tx.commit().await.map_err(SqlStoreError::Database)?;
        Ok(Pool::Postgres(pool))
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    fn now(&self) -> Arg<'static> {
        Arg::Time(Utc::now())
    }

    /// The key whose `column` (`subject` or `person`) is `value`, if any.
    async fn key_by(tx: &mut Tx, column: KeyColumn, value: &str) -> Result<Option<WrappedKey>, KeyStoreError> {
        let sql = match column {
            KeyColumn::Subject => "SELECT subject, key_id, wrapped FROM kes_subject_keys WHERE subject = $1",
            KeyColumn::Person => "SELECT subject, key_id, wrapped FROM kes_subject_keys WHERE person = $1",
        };
        let row = tx.fetch_optional(&Statement::new(sql).text(value)).await.map_err(failed)?;
        row.map(|row| wrapped_of(&row)).transpose()
    }

    /// What the key store knows of a subject without a key.
    async fn keyless(tx: &mut Tx, subject: &str) -> Result<KeyLookup, KeyStoreError> {
        let erased = tx
            .fetch_optional(
                &Statement::new("SELECT subject FROM kes_subject_erasures WHERE subject = $1").text(subject),
            )
            .await
            .map_err(failed)?;
        Ok(if erased.is_some() { KeyLookup::Erased } else { KeyLookup::Missing })
    }
}

/// The columns a key is looked up by.
#[derive(Debug, Clone, Copy)]
enum KeyColumn {
    Subject,
    Person,
}

fn wrapped_of(row: &kes_sql::DbRow) -> Result<WrappedKey, KeyStoreError> {
    let subject: String = row.get(0).map_err(failed)?;
    let key_id: String = row.get(1).map_err(failed)?;
    let text: String = row.get(2).map_err(failed)?;
    let wrapped = B64
        .decode(text.as_bytes())
        .map_err(|_| KeyStoreError::Backend(format!("the stored key of subject {subject} is not base64")))?;
    Ok(WrappedKey { subject, key_id, wrapped })
}

#[async_trait]
impl KeyStore for SqlKeyStore {
    async fn keys_for_sealing(
        &self,
        aggregate: &AggregateRef,
        wanted: &[KeyRequest],
    ) -> Result<Vec<KeyLookup>, KeyStoreError> {
        let mut tx = self.pool.begin_write(None).await.map_err(failed)?;
        let mut out = Vec::with_capacity(wanted.len());
        for request in wanted {
            let answer = match request {
                KeyRequest::Person { person, candidate } => {
                    // The first writer's key wins; a concurrent writer's
                    // candidate is dropped and it reads the winner back.
                    let insert = Statement::new(
                        "INSERT INTO kes_subject_keys (subject, person, key_id, wrapped, created_at) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (person) DO NOTHING",
                    )
                    .text(&candidate.subject)
                    .text(person)
                    .text(&candidate.key_id)
                    .arg(Arg::String(Some(B64.encode(&candidate.wrapped))))
                    .arg(self.now());
                    tx.execute(&insert).await.map_err(failed)?;
                    match Self::key_by(&mut tx, KeyColumn::Person, person).await? {
                        Some(key) => KeyLookup::Key(key),
                        None => KeyLookup::Missing,
                    }
                }
                KeyRequest::Subject(subject) => match Self::key_by(&mut tx, KeyColumn::Subject, subject).await? {
                    Some(key) => KeyLookup::Key(key),
                    None => Self::keyless(&mut tx, subject).await?,
                },
            };
            if let KeyLookup::Key(key) = &answer {
                let link = Statement::new(
                    "INSERT INTO kes_subject_aggregates (subject, aggregate_type, aggregate_id) VALUES ($1, $2, $3) \
                     ON CONFLICT DO NOTHING",
                )
                .text(&key.subject)
                .text(&aggregate.aggregate)
                .text(&aggregate.id);
                tx.execute(&link).await.map_err(failed)?;
            }
            out.push(answer);
        }
        tx.commit().await.map_err(failed)?;
        Ok(out)
    }

    async fn lookup(&self, wanted: &[(String, String)]) -> Result<Vec<KeyLookup>, KeyStoreError> {
        let mut found = std::collections::HashMap::new();
        let mut tx = self.pool.begin().await.map_err(failed)?;
        for chunk in wanted.chunks(200) {
            let mut sql = String::from("SELECT subject, key_id, wrapped FROM kes_subject_keys WHERE subject IN (");
            for i in 0..chunk.len() {
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!("${}", i + 1));
            }
            sql.push(')');
            let mut statement = Statement::with_capacity(sql, chunk.len());
            for (subject, _) in chunk {
                statement.push(Arg::Text(Some(subject)));
            }
            for row in tx.fetch_all(&statement).await.map_err(failed)? {
                let key = wrapped_of(&row)?;
                found.insert((key.subject.clone(), key.key_id.clone()), key);
            }
        }
        let mut out = Vec::with_capacity(wanted.len());
        for id in wanted {
            out.push(match found.remove(id) {
                Some(key) => KeyLookup::Key(key),
                None => Self::keyless(&mut tx, &id.0).await?,
            });
        }
        tx.commit().await.map_err(failed)?;
        Ok(out)
    }

    async fn erase(&self, reference: &str) -> Result<Option<Erasure>, KeyStoreError> {
        let mut tx = self.pool.begin_write(None).await.map_err(failed)?;
        // A subject id first; a person reference otherwise.
        let row = tx
            .fetch_optional(
                &Statement::new(
                    "SELECT subject FROM kes_subject_keys WHERE subject = $1 OR person = $1 \
                     ORDER BY CASE WHEN subject = $1 THEN 0 ELSE 1 END LIMIT 1",
                )
                .text(reference),
            )
            .await
            .map_err(failed)?;
        let (subject, first) = match row {
            Some(row) => {
                let subject: String = row.get(0).map_err(failed)?;
                tx.execute(
                    &Statement::new(
                        "INSERT INTO kes_subject_erasures (subject, erased_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    )
                    .text(&subject)
                    .arg(self.now()),
                )
                .await
                .map_err(failed)?;
                tx.execute(&Statement::new("DELETE FROM kes_subject_keys WHERE subject = $1").text(&subject))
                    .await
                    .map_err(failed)?;
                (subject, true)
            }
            None => match Self::keyless(&mut tx, reference).await? {
                KeyLookup::Erased => (reference.to_owned(), false),
                _ => return Ok(None),
            },
        };
        let rows = tx
            .fetch_all(
                &Statement::new(
                    "SELECT aggregate_type, aggregate_id FROM kes_subject_aggregates WHERE subject = $1 \
                     ORDER BY aggregate_type, aggregate_id",
                )
                .text(&subject),
            )
            .await
            .map_err(failed)?;
        let mut aggregates = Vec::with_capacity(rows.len());
        for row in rows {
            aggregates
                .push(AggregateRef::new(row.get::<String>(0).map_err(failed)?, row.get::<String>(1).map_err(failed)?));
        }
        tx.commit().await.map_err(failed)?;
        if first {
            self.scrub().await;
        }
        Ok(Some(Erasure { subject, aggregates, first }))
    }

    async fn erasure_recorded(&self, subject: &str, aggregate: &AggregateRef) -> Result<(), KeyStoreError> {
        let statement = Statement::new(
            "DELETE FROM kes_subject_aggregates WHERE subject = $1 AND aggregate_type = $2 AND aggregate_id = $3",
        )
        .text(subject)
        .text(&aggregate.aggregate)
        .text(&aggregate.id);
        self.pool.execute(&statement).await.map_err(failed)?;
        Ok(())
    }
}

impl SqlKeyStore {
    /// Removes the copies of deleted keys the database still holds: the
    /// SQLite write-ahead log (pages are zeroed by `secure_delete`), dead
    /// PostgreSQL tuples. Best effort: the erasure already stands.
    async fn scrub(&self) {
        let sql = match self.pool.dialect() {
            Dialect::Sqlite => "PRAGMA wal_checkpoint(TRUNCATE)",
            Dialect::Postgres => "VACUUM kes_subject_keys",
        };
        if let Err(e) = self.pool.execute(&Statement::new(sql)).await {
            tracing::warn!(error = %e, "could not scrub the key store after an erasure");
        }
    }
}
