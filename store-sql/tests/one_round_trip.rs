//! PostgreSQL: an append whose stream state the store already holds (its
//! cache, or a stream it creates) is written by one call of the
//! `kes_append_current` function. These tests check that the call is the
//! path such appends take, and that it never acts on a stale guess: a
//! stream moved by another process, a retry key already used and an
//! expected version that does not hold all fall back to the general path
//! and answer exactly as it does.

use std::time::{Duration, Instant};

use kes_core::conformance::{Ledger, LedgerEvent};
use kes_core::{EventStore, ExpectedVersion, Metadata, StoreError};
use kes_store_sql::SqlStore;
use sqlx::{Connection, Executor, PgConnection};

fn add(amount: i64) -> Vec<LedgerEvent> {
    vec![LedgerEvent::Added { amount }]
}

fn keyed(key: &str) -> Metadata {
    Metadata { idempotency_key: Some(key.into()), ..Metadata::default() }
}

/// A fresh database whose sessions count function calls, and its URL.
async fn counted_database(tag: &str) -> Option<String> {
    let url = kes_test_support::fresh_postgres_database(tag).await?;
    let name = url.rsplit('/').next().and_then(|n| n.split('?').next()).expect("a database name").to_owned();
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    conn.execute(format!("ALTER DATABASE {name} SET track_functions = 'all'").as_str()).await.expect("track calls");
    conn.close().await.expect("close");
    Some(url)
}

/// How many times the one-round-trip function ran, once the sessions that
/// called it have reported (they do so when idle, within about a second).
async fn calls_reach(url: &str, at_least: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut conn = PgConnection::connect(url).await.expect("connect");
    loop {
        let calls: Option<i64> =
            sqlx::query_scalar("SELECT calls FROM pg_stat_user_functions WHERE funcname = 'kes_append_current'")
                .fetch_optional(&mut conn)
                .await
                .expect("read the function statistics");
        let calls = calls.unwrap_or(0);
        if calls >= at_least || Instant::now() >= deadline {
            return calls;
        }
        // Statistics are read in a snapshot per transaction: a new one next time.
        sqlx::query("SELECT pg_stat_clear_snapshot()").execute(&mut conn).await.expect("clear the snapshot");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_on_a_known_state_take_one_call_and_stale_guesses_fall_back() {
    let Some(url) = counted_database("onecall").await else { return };
    let a = SqlStore::<Ledger>::open(url.as_str()).await.expect("open the first store");
    let b = SqlStore::<Ledger>::open(url.as_str()).await.expect("open the second store");

    // A new stream, then appends on the state the store just wrote: each
    // is one call.
    let opened = a.append("l-1", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], Metadata::default()).await;
    assert_eq!(opened.expect("open").version, 1);
    assert_eq!(a.append("l-1", ExpectedVersion::Exact(1), add(5), Metadata::default()).await.expect("add").version, 2);
    assert_eq!(a.append("l-1", ExpectedVersion::Any, add(7), keyed("k-1")).await.expect("add").version, 3);
    assert!(calls_reach(&url, 3).await >= 3, "the appends on a known state did not take the one-call path");

    // Another process moves the stream: the first store's cached state is
    // stale, the call finds out, and the general path decides.
    let by_b = b.append("l-1", ExpectedVersion::Exact(3), add(100), Metadata::default()).await.expect("b appends");
    assert_eq!(by_b.version, 4);
    let after = a.append("l-1", ExpectedVersion::Any, add(1), Metadata::default()).await.expect("a appends again");
    assert_eq!(after.version, 5, "the stale guess was not written over the other process's append");
    let conflict = a.append("l-1", ExpectedVersion::Exact(3), add(1), Metadata::default()).await;
    assert!(matches!(conflict, Err(StoreError::Conflict { actual: 5, .. })), "{conflict:?}");

    // A retry of a keyed append: the call sees the key and writes nothing;
    // the general path answers with the first append.
    let retry = a.append("l-1", ExpectedVersion::Any, add(7), keyed("k-1")).await.expect("retry");
    assert!(retry.deduplicated);
    assert_eq!(retry.version, 3);

    // What a third process reads: every event once, positions without a
    // gap, and a table row that folds all of them.
    let c = SqlStore::<Ledger>::open(url.as_str()).await.expect("open the third store");
    let snapshot = c.load("l-1").await.expect("load").expect("the stream exists");
    assert_eq!(snapshot.version, 5);
    assert_eq!((snapshot.state.total, snapshot.state.entries), (113, 4), "{:?}", snapshot.state);
    let events = c.read("l-1").await.expect("read");
    assert_eq!(events.iter().map(|e| e.version).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    assert_eq!(events.iter().map(|e| e.position.offset).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    let (version, state): (i64, String) = sqlx::query_as(
        "SELECT version, CAST(state AS TEXT) FROM kes_aggregates WHERE aggregate_type = 'ledger' AND aggregate_id = 'l-1'",
    )
    .fetch_one(&mut conn)
    .await
    .expect("the table row");
    let state: Ledger = serde_json::from_str(&state).expect("the table's state");
    assert_eq!((version, state.total, state.entries), (5, 113, 4));
}
