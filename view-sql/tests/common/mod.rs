//! Fresh views for tests: PostgreSQL (one schema per view) and SQLite (one
//! temporary file per view); fresh event stores in [`stores`]; the
//! projects fixture of the projection tests in [`projects`].

#![allow(dead_code)]

pub mod projects;
pub mod stores;

use std::path::PathBuf;

use kes_core::ViewSchema;
use kes_view_sql::{SqlView, SqlViewConfig, SqlViewError};

/// The PostgreSQL server the tests use.
pub fn pg_url() -> String {
    kes_test_support::database_url()
}

/// A schema name no other test uses.
pub fn fresh_pg_schema() -> String {
    format!("kes_vsql_{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A SQLite URL of a file no other test uses.
pub fn fresh_sqlite_url() -> String {
    let dir: PathBuf = std::env::temp_dir().join(format!("kes-view-sql-{}", uuid::Uuid::new_v4().simple()));
    format!("sqlite://{}", dir.join("views.db").display())
}

/// Skips (returns `None`) when PostgreSQL is unreachable, by the workspace's
/// one rule ([`kes_test_support::missing`]: a failure when `CI` is set);
/// any other failure to open fails the test.
pub fn skip_or_fail(e: SqlViewError) -> Option<SqlView> {
    if e.is_transient() {
        return kes_test_support::missing("PostgreSQL", &format!("{}: {e}", pg_url()));
    }
    panic!("cannot open the view: {e}");
}

/// Opens the view of `schema` in PostgreSQL schema `namespace`.
pub async fn pg_in(namespace: &str, schema: ViewSchema) -> Option<SqlView> {
    match SqlView::open(SqlViewConfig::from_url(&pg_url()).schema(namespace), schema).await {
        Ok(view) => Some(view),
        Err(e) => skip_or_fail(e),
    }
}

/// A fresh, empty PostgreSQL view.
pub async fn pg(schema: ViewSchema) -> Option<SqlView> {
    pg_in(&fresh_pg_schema(), schema).await
}

/// Opens the view of `schema` in the SQLite database at `url`.
pub async fn sqlite_at(url: &str, schema: ViewSchema) -> Option<SqlView> {
    Some(SqlView::open(url, schema).await.unwrap_or_else(|e| panic!("cannot open {url}: {e}")))
}

/// A fresh, empty SQLite view in a temporary file.
pub async fn sqlite(schema: ViewSchema) -> Option<SqlView> {
    sqlite_at(&fresh_sqlite_url(), schema).await
}

/// Where a view lives, so that a test can open it again (a restart).
#[derive(Debug, Clone)]
pub enum Place {
    /// A PostgreSQL schema.
    Postgres(String),
    /// A SQLite URL.
    Sqlite(String),
}

impl Place {
    /// A new place of the given dialect.
    pub fn fresh(postgres: bool) -> Self {
        if postgres { Self::Postgres(fresh_pg_schema()) } else { Self::Sqlite(fresh_sqlite_url()) }
    }

    /// Opens the view of `schema` there.
    pub async fn open(&self, schema: ViewSchema) -> Option<SqlView> {
        match self {
            Self::Postgres(s) => pg_in(s, schema).await,
            Self::Sqlite(url) => sqlite_at(url, schema).await,
        }
    }
}

/// Drops a PostgreSQL schema a test made (large fixtures should not pile
/// up in the shared test database).
pub async fn drop_pg_schema(name: &str) {
    let pool = sqlx::PgPool::connect(&pg_url()).await.expect("connect to drop the test schema");
    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE")).execute(&pool).await.expect("drop schema");
    pool.close().await;
}
