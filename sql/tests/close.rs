//! `Pool::close` closes every connection the pool opened, including one
//! that was on its way back to the pool when the close began (sqlx pings a
//! returning connection before it queues it as idle; a close in between
//! used to leave that session open until the pool was dropped).

use std::time::{Duration, Instant};

use kes_sql::{Durability, Pool, Statement};
use sqlx::{Connection, PgConnection};

/// Closes made right after a burst of queries: the rounds that would leave
/// a returning connection behind.
const ROUNDS: usize = 20;

/// Pool size: one connection per query of a burst.
const CONNECTIONS: u32 = 4;

/// Four queries at once, so that the pool lends several connections.
async fn burst(pool: &Pool) {
    let query = || async {
        let one = pool.fetch_scalar::<i64>(&Statement::new("SELECT CAST(1 AS BIGINT)")).await.expect("a query");
        assert_eq!(one, Some(1));
    };
    tokio::join!(query(), query(), query(), query());
}

/// The sessions of the current database other than the asking one.
async fn other_sessions(watcher: &mut PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_one(watcher)
    .await
    .expect("read the sessions")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_postgres_pool_leaves_no_session_open() {
    let Some(url) = kes_test_support::fresh_postgres_database("pool_close").await else { return };
    let mut watcher = PgConnection::connect(&url).await.expect("connect the watcher");
    for round in 0..ROUNDS {
        let sqlx_pool =
            sqlx::postgres::PgPoolOptions::new().max_connections(CONNECTIONS).connect(&url).await.expect("connect");
        let pool = Pool::Postgres(sqlx_pool.clone());
        burst(&pool).await;
        pool.close().await;
        assert_eq!(sqlx_pool.size(), 0, "round {round}: connections left in the closed pool");
        // The server ends a session once it reads the client's goodbye: a
        // moment after the close returns, never later.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let open = other_sessions(&mut watcher).await;
            if open == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "round {round}: {open} sessions still open after the close");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_sqlite_pool_leaves_no_connection_open() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let url = format!("sqlite://{}", dir.path().join("db.sqlite").display());
    for round in 0..ROUNDS {
        let target = kes_sql::sqlite_options(&url, Durability::Log).expect("sqlite options");
        let sqlx_pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(CONNECTIONS)
            .connect_with(target.options)
            .await
            .expect("open sqlite");
        let pool = Pool::Sqlite(sqlx_pool.clone());
        burst(&pool).await;
        pool.close().await;
        assert_eq!(sqlx_pool.size(), 0, "round {round}: connections left in the closed pool");
    }
}
