//! Rows changed behind the store's back: a payload that no longer decodes is
//! a typed `Corrupt` naming aggregate, id and version (never a panic), and a
//! table row that is missing or of an older shape is rebuilt from the log.
//!
//! The stores run without their state cache, which would answer `load` from
//! memory until its time-to-live passes; the last tests show that it does,
//! and no longer.

mod common;

use std::time::Duration;

use futures::StreamExt;
use kes_core::conformance::{Ledger, LedgerEvent};
use kes_core::{Checkpoint, EventStore, ExpectedVersion, Metadata, StoreError};
use kes_store_sql::{SqlStore, SqlStoreConfig};
use sqlx::{Connection, Executor, PgConnection, SqliteConnection};

use common::HandClock;

/// A connection beside the store's, to damage its tables.
enum Direct {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

impl Direct {
    async fn exec(&mut self, sql: &str) {
        let changed = match self {
            Self::Sqlite(c) => c.execute(sql).await.expect("statement").rows_affected(),
            Self::Postgres(c) => c.execute(sql).await.expect("statement").rows_affected(),
        };
        assert!(changed > 0, "{sql} changed nothing");
    }

    async fn state_of(&mut self, id: &str) -> Option<String> {
        let sql = "SELECT CAST(state AS TEXT) FROM kes_aggregates WHERE aggregate_id = $1";
        match self {
            Self::Sqlite(c) => sqlx::query_scalar(sql).bind(id).fetch_optional(c).await.expect("query"),
            Self::Postgres(c) => sqlx::query_scalar(sql).bind(id).fetch_optional(c).await.expect("query"),
        }
    }
}

async fn sqlite() -> (common::TempStore<Ledger>, Direct) {
    sqlite_with(|b| b.state_cache(0)).await
}

async fn sqlite_with(configure: impl FnOnce(SqlStoreConfig) -> SqlStoreConfig) -> (common::TempStore<Ledger>, Direct) {
    let store = common::sqlite_with::<Ledger>(configure).await;
    let conn = SqliteConnection::connect(&store.url()).await.expect("connect");
    (store, Direct::Sqlite(conn))
}

async fn postgres() -> Option<(SqlStore<Ledger>, Direct)> {
    postgres_with(|b| b.state_cache(0)).await
}

async fn postgres_with(configure: impl FnOnce(SqlStoreConfig) -> SqlStoreConfig) -> Option<(SqlStore<Ledger>, Direct)> {
    let schema = common::fresh_schema();
    let store = common::postgres_with::<Ledger>(&schema, configure).await?;
    Some((store, Direct::Postgres(common::postgres_connection(&schema).await)))
}

fn meta() -> Metadata {
    Metadata::default()
}

/// l-1 at version 3, one event per command.
async fn three_commands<S: EventStore<Ledger>>(store: &S) {
    store.append("l-1", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], meta()).await.expect("append");
    store
        .append("l-1", ExpectedVersion::Exact(1), vec![LedgerEvent::Added { amount: 5 }], meta())
        .await
        .expect("append");
    store
        .append("l-1", ExpectedVersion::Exact(2), vec![LedgerEvent::Added { amount: 6 }], meta())
        .await
        .expect("append");
}

fn assert_corrupt_at<T: std::fmt::Debug>(result: Result<T, StoreError>, version: u64) {
    match result {
        Err(StoreError::Corrupt { aggregate, id, version: v, reason }) => {
            assert_eq!((aggregate.as_str(), id.as_str(), v), ("ledger", "l-1", version), "{reason}");
        }
        other => panic!("expected Corrupt at ledger l-1 version {version}, got {other:?}"),
    }
}

/// The payload at version 2 is damaged: reads and subscriptions stop there
/// with a typed error; the table still serves the state; an append that
/// needs a replay refuses rather than build on a broken history.
async fn damaged_payload<S: EventStore<Ledger>>(store: S, direct: &mut Direct, damage: &str) {
    three_commands(&store).await;
    direct.exec(damage).await;

    assert_corrupt_at(store.read("l-1").await, 2);

    let mut stream = store.subscribe(Checkpoint::start()).await.expect("subscribe");
    let wait = Duration::from_secs(30);
    let first = tokio::time::timeout(wait, stream.next()).await.expect("in time");
    assert_eq!(first.expect("an item").expect("version 1 is fine")[0].version, 1);
    let second = tokio::time::timeout(wait, stream.next()).await.expect("in time");
    assert_corrupt_at(second.expect("an item"), 2);
    let end = tokio::time::timeout(wait, stream.next()).await.expect("in time");
    assert!(end.is_none(), "the stream ends after a corrupt event instead of skipping it");

    // The table row is intact, so load does not need the log.
    assert_eq!(store.load("l-1").await.expect("load").expect("exists").version, 3);

    // Once the table row is gone too, the replay meets the damage.
    direct.exec("DELETE FROM kes_aggregates WHERE aggregate_id = 'l-1'").await;
    assert_corrupt_at(store.load("l-1").await, 2);
    assert_corrupt_at(
        store.append("l-1", ExpectedVersion::Exact(3), vec![LedgerEvent::Added { amount: 1 }], meta()).await,
        2,
    );
    assert_eq!(store.head().await.expect("head").next_offset(0), 3, "the refused append wrote nothing");
}

/// Undecodable JSON for the event type.
const WRONG_SHAPE: &str =
    r#"UPDATE kes_events SET payload = '{"Added":{"amount":"five"}}' WHERE aggregate_id = 'l-1' AND version = 2"#;
/// Not JSON at all.
const NOT_JSON: &str = "UPDATE kes_events SET payload = '{\"Added\":' WHERE aggregate_id = 'l-1' AND version = 2";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_payload_of_wrong_shape_is_corrupt() {
    let (store, mut direct) = sqlite().await;
    damaged_payload(store, &mut direct, WRONG_SHAPE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_payload_not_json_is_corrupt() {
    let (store, mut direct) = sqlite().await;
    damaged_payload(store, &mut direct, NOT_JSON).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_payload_not_text_is_corrupt() {
    let (store, mut direct) = sqlite().await;
    let damage = "UPDATE kes_events SET payload = X'FF00FE' WHERE aggregate_id = 'l-1' AND version = 2";
    damaged_payload(store, &mut direct, damage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_metadata_not_json_is_corrupt() {
    let (store, mut direct) = sqlite().await;
    let damage = "UPDATE kes_events SET metadata = 'principal=alice' WHERE aggregate_id = 'l-1' AND version = 2";
    damaged_payload(store, &mut direct, damage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_revision_out_of_range_is_corrupt() {
    let (store, mut direct) = sqlite().await;
    let damage = "UPDATE kes_events SET revision = -1 WHERE aggregate_id = 'l-1' AND version = 2";
    damaged_payload(store, &mut direct, damage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_payload_of_wrong_shape_is_corrupt() {
    let Some((store, mut direct)) = postgres().await else { return };
    damaged_payload(store, &mut direct, WRONG_SHAPE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_payload_not_json_is_corrupt() {
    let Some((store, mut direct)) = postgres().await else { return };
    damaged_payload(store, &mut direct, NOT_JSON).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_metadata_of_wrong_shape_is_corrupt() {
    let Some((store, mut direct)) = postgres().await else { return };
    let damage = r#"UPDATE kes_events SET metadata = '{"extra": 5}' WHERE aggregate_id = 'l-1' AND version = 2"#;
    damaged_payload(store, &mut direct, damage).await;
}

/// The table row is of an older shape of the aggregate, or gone: `load`
/// rebuilds it from the log and writes it back; appends go on.
async fn table_is_rebuilt<S: EventStore<Ledger>>(store: S, direct: &mut Direct) {
    three_commands(&store).await;
    let expected = Ledger { open: true, closed: false, total: 11, entries: 2 };

    direct.exec(r#"UPDATE kes_aggregates SET state = '{"opened": "yes"}' WHERE aggregate_id = 'l-1'"#).await;
    let snapshot = store.load("l-1").await.expect("load").expect("exists");
    assert_eq!((snapshot.version, &snapshot.state), (3, &expected));
    let written: Ledger = serde_json::from_str(&direct.state_of("l-1").await.expect("row")).expect("current shape");
    assert_eq!(written, expected, "the rebuilt row was written back");

    direct.exec(r#"UPDATE kes_aggregates SET state = '{"opened": "yes"}' WHERE aggregate_id = 'l-1'"#).await;
    store
        .append("l-1", ExpectedVersion::Exact(3), vec![LedgerEvent::Added { amount: 1 }], meta())
        .await
        .expect("append");
    assert_eq!(store.load("l-1").await.expect("load").expect("exists").state.total, 12);

    direct.exec("DELETE FROM kes_aggregates").await;
    let snapshot = store.load("l-1").await.expect("load").expect("the log still has it");
    assert_eq!((snapshot.version, snapshot.state.total), (4, 12));
    assert!(direct.state_of("l-1").await.is_some(), "the missing row was written back");
    assert!(store.load("nobody").await.expect("load").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_table_is_rebuilt_from_the_log() {
    let (store, mut direct) = sqlite().await;
    table_is_rebuilt(store, &mut direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_table_is_rebuilt_from_the_log() {
    let Some((store, mut direct)) = postgres().await else { return };
    table_is_rebuilt(store, &mut direct).await;
}

/// With the state cache on, `load` answers from memory for the time-to-live
/// after the store last saw the state, even though the rows were damaged
/// meanwhile; after it, the table (and here the damaged log) decides. The
/// cache's clock moves only when `clock` is advanced.
async fn cache_hides_damage_for_its_ttl_only<S: EventStore<Ledger>>(store: S, direct: &mut Direct, clock: &HandClock) {
    three_commands(&store).await;
    direct.exec(WRONG_SHAPE).await;
    direct.exec("DELETE FROM kes_aggregates WHERE aggregate_id = 'l-1'").await;
    let cached = store.load("l-1").await.expect("served from the cache").expect("exists");
    assert_eq!((cached.version, cached.state.total), (3, 11));
    clock.advance(CACHE_TTL - Duration::from_nanos(1));
    let cached = store.load("l-1").await.expect("still served from the cache").expect("exists");
    assert_eq!((cached.version, cached.state.total), (3, 11), "within the time-to-live the cache answers");
    assert!(direct.state_of("l-1").await.is_none(), "the cache answered: the row was not rebuilt");
    clock.advance(Duration::from_nanos(1));
    assert_corrupt_at(store.load("l-1").await, 2);
}

const CACHE_TTL: Duration = Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_cache_hides_damage_for_its_ttl_only() {
    let clock = HandClock::new();
    let configure = |b: SqlStoreConfig| {
        b.state_cache(100).state_cache_ttl(Duration::from_secs(60)).state_cache_clock(clock.reader())
    };
    let (store, mut direct) = sqlite_with(configure).await;
    // A long time-to-live: the damage stays hidden.
    three_commands(&store).await;
    direct.exec("DELETE FROM kes_aggregates WHERE aggregate_id = 'l-1'").await;
    clock.advance(Duration::from_secs(59));
    assert_eq!(store.load("l-1").await.expect("load").expect("cached").version, 3);
    assert!(direct.state_of("l-1").await.is_none(), "the cache answered: the row was not rebuilt");

    let clock = HandClock::new();
    let (store, mut direct) = sqlite_with(|b| b.state_cache_ttl(CACHE_TTL).state_cache_clock(clock.reader())).await;
    cache_hides_damage_for_its_ttl_only(store, &mut direct, &clock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cache_hides_damage_for_its_ttl_only() {
    let clock = HandClock::new();
    let configure = |b: SqlStoreConfig| b.state_cache_ttl(CACHE_TTL).state_cache_clock(clock.reader());
    let Some((store, mut direct)) = postgres_with(configure).await else { return };
    cache_hides_damage_for_its_ttl_only(store, &mut direct, &clock).await;
}
