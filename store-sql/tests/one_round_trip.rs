//! PostgreSQL: an append whose stream state the store already holds (its
//! cache, or a stream it creates) is written by one call of the
//! `kes_append_current` function. These tests check that the call is the
//! path such appends take, and that it never acts on a stale guess: a
//! stream moved by another process, a retry key already used and an
//! expected version that does not hold all fall back to the general path
//! and answer exactly as it does. A batch of such appends (many clients)
//! is one call of `kes_append_batch`, under the same rules.

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
/// called it have reported. A session reports when it ends; while it lives,
/// only when idle, and up to ten seconds late when it reported less than a
/// second before, so the tests close the stores whose calls they count.
async fn calls_reach(url: &str, at_least: i64) -> i64 {
    function_calls_reach(url, "kes_append_current", at_least).await
}

/// How many times the function `name` ran (see [`calls_reach`]).
async fn function_calls_reach(url: &str, name: &str, at_least: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut conn = PgConnection::connect(url).await.expect("connect");
    loop {
        let calls: Option<i64> = sqlx::query_scalar("SELECT calls FROM pg_stat_user_functions WHERE funcname = $1")
            .bind(name)
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

    // A new stream, then appends on the state the store just wrote: each
    // is one call.
    let counted = SqlStore::<Ledger>::open(url.as_str()).await.expect("open the counted store");
    let opened = counted.append("l-1", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], Metadata::default());
    assert_eq!(opened.await.expect("open").version, 1);
    let added = counted.append("l-1", ExpectedVersion::Exact(1), add(5), Metadata::default()).await;
    assert_eq!(added.expect("add").version, 2);
    assert_eq!(counted.append("l-1", ExpectedVersion::Any, add(7), keyed("k-1")).await.expect("add").version, 3);
    counted.close().await;
    let first_calls = calls_reach(&url, 3).await;
    assert!(first_calls >= 3, "the appends on a known state did not take the one-call path");

    // A store that read the stream holds its state too. Another process
    // moves the stream: that cached state is stale, the call finds out,
    // and the general path decides.
    let a = SqlStore::<Ledger>::open(url.as_str()).await.expect("open the first store");
    let b = SqlStore::<Ledger>::open(url.as_str()).await.expect("open the second store");
    assert_eq!(a.load("l-1").await.expect("load").expect("the stream exists").version, 3);
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

    // The state the first store read was the guess its call acted on.
    a.close().await;
    b.close().await;
    let calls = calls_reach(&url, first_calls + 1).await;
    assert!(calls > first_calls, "a state read from the table was not used as the call's guess");
}

/// Appends one `add(amount)` to each of `ids` at once, so that the writer
/// takes them as batches; their answers in the order of `ids`.
async fn add_to_all(
    store: &SqlStore<Ledger>,
    ids: &[String],
    expected: ExpectedVersion,
    amount: i64,
) -> Vec<Result<kes_core::Appended, StoreError>> {
    let appends = ids.iter().map(|id| store.append(id, expected, add(amount), Metadata::default()));
    futures::future::join_all(appends).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_on_known_states_take_one_call_and_a_stale_guess_falls_back() {
    let Some(url) = counted_database("batchcall").await else { return };
    let ids: Vec<String> = (0..40).map(|i| format!("b-{i}")).collect();

    // New streams, then appends on the states the store just wrote.
    let counted = SqlStore::<Ledger>::open(url.as_str()).await.expect("open the counted store");
    let opened = futures::future::join_all(
        ids.iter()
            .map(|id| counted.append(id, ExpectedVersion::NoStream, vec![LedgerEvent::Opened], Metadata::default())),
    )
    .await;
    assert!(opened.iter().all(|o| o.as_ref().is_ok_and(|o| o.version == 1)), "{opened:?}");
    let added = add_to_all(&counted, &ids, ExpectedVersion::Exact(1), 5).await;
    assert!(added.iter().all(|o| o.as_ref().is_ok_and(|o| o.version == 2)), "{added:?}");
    counted.close().await;
    let first_calls = function_calls_reach(&url, "kes_append_batch", 1).await;
    assert!(first_calls >= 1, "no batch took the one-call path");

    // A store that read the streams holds their states too. Another process
    // moves one stream: the batch's guess for it is stale, the call writes
    // nothing, and the general path decides every append.
    let a = SqlStore::<Ledger>::open(url.as_str()).await.expect("open the first store");
    let b = SqlStore::<Ledger>::open(url.as_str()).await.expect("open the second store");
    for id in &ids {
        assert_eq!(a.load(id).await.expect("load").expect("the stream exists").version, 2, "{id}");
    }
    let moved = b.append("b-7", ExpectedVersion::Exact(2), add(100), Metadata::default()).await.expect("b appends");
    assert_eq!(moved.version, 3);
    let again = add_to_all(&a, &ids, ExpectedVersion::Any, 1).await;
    for (id, outcome) in ids.iter().zip(&again) {
        let expected = if id == "b-7" { 4 } else { 3 };
        assert_eq!(outcome.as_ref().map(|o| o.version).ok(), Some(expected), "{id}: {outcome:?}");
    }
    let conflicts = add_to_all(&a, &ids[..4], ExpectedVersion::Exact(2), 1).await;
    assert!(conflicts.iter().all(|o| matches!(o, Err(StoreError::Conflict { actual: 3, .. }))), "{conflicts:?}");

    // What a third process reads: every event once, positions without a
    // gap across all streams, each answer's position its last event's, and
    // table rows that fold every event.
    let c = SqlStore::<Ledger>::open(url.as_str()).await.expect("open the third store");
    let mut positions = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let events = c.read(id).await.expect("read");
        let versions: Vec<u64> = events.iter().map(|e| e.version).collect();
        let (total, count) = if id == "b-7" { (106, 4) } else { (6, 3) };
        assert_eq!(versions, (1..=count).collect::<Vec<_>>(), "{id}");
        assert_eq!(events[1].position, added[i].as_ref().expect("added").position, "{id}");
        positions.extend(events.iter().map(|e| e.position.offset));
        let snapshot = c.load(id).await.expect("load").expect("the stream exists");
        assert_eq!((snapshot.version, snapshot.state.total), (count, total), "{id}");
    }
    positions.sort_unstable();
    assert_eq!(positions, (0..positions.len() as u64).collect::<Vec<_>>(), "positions without gaps or repeats");

    // The states the first store read were the guesses its batch acted on.
    a.close().await;
    b.close().await;
    let calls = function_calls_reach(&url, "kes_append_batch", first_calls + 1).await;
    assert!(calls > first_calls, "states read from the table were not used as the batch's guesses");
}
