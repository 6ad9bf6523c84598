//! A table of latest states built by another `Aggregate::STATE_VERSION` is
//! rebuilt from the log when a store opens, on SQLite and PostgreSQL, and
//! the store says so in its gauges.

mod common;

use kes_core::conformance::{Ledger, LedgerEvent, LedgerV2};
use kes_core::{Aggregate, EventStore, ExpectedVersion, Metadata, StoreGauge};
use kes_store_sql::SqlStore;

fn gauge(gauges: &[StoreGauge], name: &str) -> f64 {
    gauges.iter().find(|g| g.name == name).map(|g| g.value).unwrap_or_else(|| panic!("no gauge {name}"))
}

/// Two ledgers written by the version-1 aggregate.
async fn write_v1(store: &SqlStore<Ledger>) {
    for (id, amounts) in [("a", vec![5, 40, 7]), ("b", vec![3])] {
        let mut events = vec![LedgerEvent::Opened];
        events.extend(amounts.into_iter().map(|amount| LedgerEvent::Added { amount }));
        store.append(id, ExpectedVersion::NoStream, events, Metadata::default()).await.expect("append");
    }
    let stale = store.load("a").await.expect("load").expect("a");
    assert_eq!((stale.state.total, stale.version), (52, 4));
    assert_eq!(gauge(&store.gauges(), "table_rebuilt_from_state_version"), 0.0, "a new table is current");
}

/// What a version-2 store opened over [`write_v1`]'s table answers;
/// `rows_after_open` is how many table rows the type had right after open.
async fn open_v2_and_check(store: SqlStore<LedgerV2>, rows_after_open: i64) {
    assert_eq!(rows_after_open, 2, "the table is rebuilt at open, not row by row later");
    let gauges = store.gauges();
    assert_eq!(gauge(&gauges, "table_state_version"), 2.0);
    assert_eq!(gauge(&gauges, "table_rebuilt_from_state_version"), 1.0);
    let a = store.load("a").await.expect("load").expect("a");
    assert_eq!((a.state.largest, a.state.total, a.version), (40, 52, 4), "a state of the new meaning");
    let b = store.load("b").await.expect("load").expect("b");
    assert_eq!(b.state.largest, 3);
    // It keeps working: the next append builds on the rebuilt state.
    let appended = store
        .append("a", ExpectedVersion::Exact(4), vec![LedgerEvent::Added { amount: 90 }], Metadata::default())
        .await
        .expect("append on the rebuilt table");
    assert_eq!(appended.version, 5);
    assert_eq!(store.load("a").await.expect("load").expect("a").state.largest, 90);
}

#[tokio::test]
async fn sqlite_rebuilds_a_table_of_another_state_version_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = common::sqlite_url(&dir);
    let v1 =
        SqlStore::<Ledger>::open(kes_store_sql::SqlStoreConfig::from_url(&url).state_cache(0)).await.expect("open v1");
    write_v1(&v1).await;
    v1.close().await;

    let v2 = SqlStore::<LedgerV2>::open(kes_store_sql::SqlStoreConfig::from_url(&url).state_cache(0))
        .await
        .expect("open v2");
    let rows = count_sqlite_rows(&url).await;
    assert_eq!(stored_largest_sqlite(&url, "a").await, Some(40), "the row itself holds the new state");
    open_v2_and_check(v2.clone(), rows).await;
    v2.close().await;

    // Recorded: the next open of the same version rebuilds nothing.
    let again = SqlStore::<LedgerV2>::open(kes_store_sql::SqlStoreConfig::from_url(&url).state_cache(0))
        .await
        .expect("reopen v2");
    assert_eq!(gauge(&again.gauges(), "table_rebuilt_from_state_version"), 0.0);
    assert_eq!(again.load("a").await.expect("load").expect("a").state.largest, 90);
    again.close().await;

    // Going back to version 1 (a rollback) rebuilds too: the table never
    // holds states of a meaning the code does not have.
    let back = SqlStore::<Ledger>::open(kes_store_sql::SqlStoreConfig::from_url(&url).state_cache(0))
        .await
        .expect("open v1 again");
    assert_eq!(gauge(&back.gauges(), "table_rebuilt_from_state_version"), 2.0);
    assert_eq!(stored_largest_sqlite(&url, "a").await, None, "version 1 states have no `largest`");
    assert_eq!(back.load("a").await.expect("load").expect("a").state.total, 142);
}

#[tokio::test]
async fn an_empty_table_records_its_version_without_a_rebuild() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = common::sqlite_url(&dir);
    let v1 = SqlStore::<Ledger>::open(&url).await.expect("open v1");
    v1.close().await;
    let v2 = SqlStore::<LedgerV2>::open(&url).await.expect("open v2");
    assert_eq!(gauge(&v2.gauges(), "table_rebuilt_from_state_version"), 0.0, "nothing to rebuild");
}

#[tokio::test]
async fn postgres_rebuilds_a_table_of_another_state_version_once() {
    let schema = common::fresh_schema();
    let Some(v1) = common::postgres_with::<Ledger>(&schema, |b| b.state_cache(0)).await else { return };
    write_v1(&v1).await;
    v1.close().await;

    let v2 = common::postgres_with::<LedgerV2>(&schema, |b| b.state_cache(0)).await.expect("open v2");
    let mut conn = common::postgres_connection(&schema).await;
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM kes_aggregates WHERE aggregate_type = $1")
        .bind(LedgerV2::NAME)
        .fetch_one(&mut conn)
        .await
        .expect("count");
    let largest: Option<i64> =
        sqlx::query_scalar("SELECT CAST(state->>'largest' AS BIGINT) FROM kes_aggregates WHERE aggregate_id = 'a'")
            .fetch_one(&mut conn)
            .await
            .expect("row");
    assert_eq!(largest, Some(40), "the row itself holds the new state");
    open_v2_and_check(v2.clone(), rows).await;
    v2.close().await;

    let again = common::postgres_with::<LedgerV2>(&schema, |b| b.state_cache(0)).await.expect("reopen v2");
    assert_eq!(gauge(&again.gauges(), "table_rebuilt_from_state_version"), 0.0);
}

async fn count_sqlite_rows(url: &str) -> i64 {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(url).await.expect("connect");
    sqlx::query_scalar("SELECT COUNT(*) FROM kes_aggregates WHERE aggregate_type = $1")
        .bind(LedgerV2::NAME)
        .fetch_one(&mut conn)
        .await
        .expect("count")
}

async fn stored_largest_sqlite(url: &str, id: &str) -> Option<i64> {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(url).await.expect("connect");
    sqlx::query_scalar("SELECT json_extract(state, '$.largest') FROM kes_aggregates WHERE aggregate_id = $1")
        .bind(id)
        .fetch_one(&mut conn)
        .await
        .expect("row")
}
