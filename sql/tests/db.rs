//! The one code path for two databases: every argument type goes in and
//! comes back out the same on SQLite and PostgreSQL, and the transaction
//! kinds keep their promises on both.

use chrono::{DateTime, TimeZone, Utc};
use kes_sql::{Arg, Dialect, Durability, Pool, Statement};
use serde_json::json;
use uuid::Uuid;

async fn sqlite_pool(dir: &tempfile::TempDir) -> Pool {
    let url = format!("sqlite://{}", dir.path().join("db.sqlite").display());
    let target = kes_sql::sqlite_options(&url, Durability::Log).expect("sqlite options");
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(target.options)
        .await
        .expect("open sqlite");
    Pool::Sqlite(pool)
}

async fn postgres_pool() -> Option<Pool> {
    let url = kes_test_support::postgres().await?;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&url).await.expect("connect");
    Some(Pool::Postgres(pool))
}

/// A table name no other test run uses.
fn table() -> String {
    format!("kes_sql_db_{}", &Uuid::new_v4().simple().to_string()[..12])
}

fn create(dialect: Dialect, table: &str) -> String {
    let (uuid, json, time, float) = match dialect {
        Dialect::Postgres => ("UUID", "JSONB", "TIMESTAMPTZ", "DOUBLE PRECISION"),
        Dialect::Sqlite => ("BLOB", "TEXT", "TEXT", "REAL"),
    };
    format!(
        "CREATE TABLE {table} (k BIGINT PRIMARY KEY, t TEXT, s TEXT, f {float}, b BOOLEAN, u {uuid}, j {json}, \
         ts {time})"
    )
}

async fn every_argument_round_trips(pool: &Pool) {
    let table = table();
    pool.execute(&Statement::new(create(pool.dialect(), &table))).await.expect("create");
    let id = Uuid::new_v4();
    let doc = json!({ "name": "Ada", "tags": ["a", "b"], "n": 3 });
    let at: DateTime<Utc> = Utc.with_ymd_and_hms(2026, 3, 1, 12, 30, 5).single().expect("a time");
    let insert = format!("INSERT INTO {table} (k, t, s, f, b, u, j, ts) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)");
    let written = pool
        .execute(
            &Statement::new(insert.as_str())
                .int(1)
                .text("it's a 'quote'; DROP TABLE x; --")
                .arg(Arg::String(Some("owned".into())))
                .arg(Arg::Float(Some(2.5)))
                .arg(Arg::Bool(Some(true)))
                .arg(Arg::Uuid(id))
                .arg(Arg::Json(&doc))
                .arg(Arg::Time(at)),
        )
        .await
        .expect("insert");
    assert_eq!(written, 1);
    let null_json = serde_json::Value::Null;
    let nulls = Statement::new(insert.as_str())
        .int(2)
        .opt_text(None)
        .arg(Arg::String(None))
        .arg(Arg::Float(None))
        .arg(Arg::Bool(None))
        .arg(Arg::Uuid(Uuid::nil()))
        .arg(Arg::Json(&null_json))
        .arg(Arg::Time(at));
    pool.execute(&nulls).await.expect("insert nulls");

    let select = format!("SELECT t, s, f, b, u, j, ts FROM {table} WHERE k = $1");
    let row = pool.fetch_optional(&Statement::new(select.as_str()).int(1)).await.expect("select").expect("a row");
    assert_eq!(row.get::<String>(0).expect("t"), "it's a 'quote'; DROP TABLE x; --");
    assert_eq!(row.get::<String>(1).expect("s"), "owned");
    assert_eq!(row.get::<f64>(2).expect("f"), 2.5);
    assert!(row.get::<bool>(3).expect("b"));
    assert_eq!(row.get::<Uuid>(4).expect("u"), id);
    assert_eq!(row.get::<sqlx::types::Json<serde_json::Value>>(5).expect("j").0, doc);
    assert_eq!(row.get::<DateTime<Utc>>(6).expect("ts"), at);

    let row = pool.fetch_optional(&Statement::new(select.as_str()).int(2)).await.expect("select").expect("a row");
    assert_eq!(row.get::<Option<String>>(0).expect("t"), None);
    assert_eq!(row.get::<Option<String>>(1).expect("s"), None);
    assert_eq!(row.get::<Option<f64>>(2).expect("f"), None);
    assert_eq!(row.get::<Option<bool>>(3).expect("b"), None);

    let count = format!("SELECT COUNT(*) FROM {table}");
    assert_eq!(pool.fetch_scalar::<i64>(&Statement::new(count.as_str())).await.expect("count"), Some(2));
    let none = pool.fetch_scalar::<i64>(&Statement::new(select.as_str()).int(99)).await.expect("no row");
    assert_eq!(none, None);
    pool.execute(&Statement::new(format!("DROP TABLE {table}"))).await.expect("drop");
}

async fn transactions_keep_their_promises(pool: &Pool) {
    let table = table();
    pool.execute(&Statement::new(format!("CREATE TABLE {table} (k BIGINT PRIMARY KEY)"))).await.expect("create");
    let insert = format!("INSERT INTO {table} (k) VALUES ($1)");
    let count = format!("SELECT COUNT(*) FROM {table}");

    // Dropped without a commit: nothing stays.
    let mut tx = pool.begin_write(None).await.expect("begin");
    tx.execute(&Statement::new(insert.as_str()).int(1)).await.expect("insert");
    assert_eq!(tx.fetch_scalar::<i64>(&Statement::new(count.as_str())).await.expect("count"), Some(1));
    drop(tx);
    assert_eq!(pool.fetch_scalar::<i64>(&Statement::new(count.as_str())).await.expect("count"), Some(0));

    // Rolled back: nothing stays; committed: it does.
    let mut tx = pool.begin_write(None).await.expect("begin");
    tx.execute(&Statement::new(insert.as_str()).int(1)).await.expect("insert");
    tx.rollback().await.expect("rollback");
    let mut tx = pool.begin_write(Some("SELECT 1")).await.expect("begin with a follow-up on PostgreSQL");
    tx.execute(&Statement::new(insert.as_str()).int(2)).await.expect("insert");
    tx.commit().await.expect("commit");
    assert_eq!(pool.fetch_scalar::<i64>(&Statement::new(count.as_str())).await.expect("count"), Some(1));

    // A snapshot transaction does not see what commits after its first read.
    let mut snapshot = pool.begin_snapshot().await.expect("snapshot");
    assert_eq!(snapshot.fetch_scalar::<i64>(&Statement::new(count.as_str())).await.expect("count"), Some(1));
    pool.execute(&Statement::new(insert.as_str()).int(3)).await.expect("insert meanwhile");
    assert_eq!(snapshot.fetch_scalar::<i64>(&Statement::new(count.as_str())).await.expect("count"), Some(1));
    let rows = snapshot.fetch_all(&Statement::new(format!("SELECT k FROM {table} ORDER BY k"))).await.expect("rows");
    assert_eq!(rows.iter().map(|r| r.get::<i64>(0).expect("k")).collect::<Vec<_>>(), vec![2]);
    snapshot.commit().await.expect("end the snapshot");
    assert_eq!(pool.fetch_scalar::<i64>(&Statement::new(count.as_str())).await.expect("count"), Some(2));

    // A failed statement is an error, not a panic, and the pool goes on.
    let duplicate = pool.execute(&Statement::new(insert.as_str()).int(2)).await;
    let error = duplicate.expect_err("a duplicate key fails");
    assert!(!kes_sql::is_transient(&error), "a constraint is no reason to retry");
    pool.execute(&Statement::new(format!("DROP TABLE {table}"))).await.expect("drop");
    pool.close().await;
    assert!(pool.execute(&Statement::new("SELECT 1")).await.is_err(), "a closed pool refuses");
}

#[tokio::test]
async fn sqlite_round_trips_every_argument() {
    let dir = tempfile::tempdir().expect("tempdir");
    every_argument_round_trips(&sqlite_pool(&dir).await).await;
}

#[tokio::test]
async fn postgres_round_trips_every_argument() {
    let Some(pool) = postgres_pool().await else { return };
    every_argument_round_trips(&pool).await;
}

#[tokio::test]
async fn sqlite_transactions() {
    let dir = tempfile::tempdir().expect("tempdir");
    transactions_keep_their_promises(&sqlite_pool(&dir).await).await;
}

#[tokio::test]
async fn postgres_transactions() {
    let Some(pool) = postgres_pool().await else { return };
    transactions_keep_their_promises(&pool).await;
}

#[test]
fn a_statement_grows_without_losing_its_arguments() {
    let mut statement = Statement::with_capacity("SELECT $1", 2).text("a");
    statement.push_sql(" || $2");
    statement.push(Arg::Int(Some(7)));
    assert_eq!(statement.sql(), "SELECT $1 || $2");
    assert_eq!(statement.args().len(), 2);
    assert!(matches!(statement.args()[1], Arg::Int(Some(7))));
}
