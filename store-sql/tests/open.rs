//! Opening and reopening stores, and how failures to do so are typed.

mod common;

use std::time::Duration;

use futures::StreamExt;
use kes_core::conformance::{Ledger, LedgerEvent};
use kes_core::{Checkpoint, EventStore, ExpectedVersion, Metadata, StoreError};
use kes_store_sql::{Dialect, SqlStore, SqlStoreConfig, SqlStoreError};

fn meta() -> Metadata {
    Metadata::default()
}

#[tokio::test]
async fn unsupported_urls_and_schema_names_are_refused() {
    let err = SqlStore::<Ledger>::open("mysql://root:pw@localhost/db").await.unwrap_err();
    assert!(matches!(err, SqlStoreError::Url { .. }), "{err:?}");
    assert!(!err.to_string().contains("pw"), "the password leaked: {err}");
    assert!(matches!(StoreError::from(err), StoreError::Invalid(_)));

    let err =
        SqlStore::<Ledger>::open(SqlStoreConfig::from_url("postgres://postgres@127.0.0.1/test").schema("x; DROP"))
            .await
            .unwrap_err();
    assert!(matches!(err, SqlStoreError::SchemaName(_)), "{err:?}");
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable() {
    // Port 1 on the loopback: nothing listens there.
    let config =
        SqlStoreConfig::from_url("postgres://postgres@127.0.0.1:1/test").acquire_timeout(Duration::from_secs(2));
    let err = SqlStore::<Ledger>::open(config).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(matches!(StoreError::from(err), StoreError::Unavailable(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_file_and_folder_are_created_and_reopened() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("deep").join("er").join("events.db").display());
    let store = SqlStore::<Ledger>::open(&url).await.expect("open creates the folders");
    assert_eq!(store.dialect(), Dialect::Sqlite);
    let keyed = Metadata { idempotency_key: Some("k-1".into()), ..meta() };
    let first =
        store.append("l-1", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], keyed.clone()).await.expect("append");
    store.close().await;
    assert!(matches!(store.ping().await, Err(StoreError::Unavailable(_))), "a closed store is unavailable");

    // Reopened: migrations are not applied twice, data and retry keys survive.
    let store = SqlStore::<Ledger>::open(&url).await.expect("reopen");
    assert_eq!(store.load("l-1").await.expect("load").expect("exists").version, 1);
    let again = store.append("l-1", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], keyed).await.expect("retry");
    assert!(again.deduplicated, "the retry key was forgotten by the restart");
    assert_eq!(again.position, first.position);
    assert_eq!(store.recall("l-1", "k-1").await.expect("recall").map(|a| a.version), Some(1));
}

#[tokio::test]
async fn in_memory_sqlite_works() {
    let store = SqlStore::<Ledger>::open("sqlite::memory:").await.expect("open");
    store.append("l-1", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], meta()).await.expect("append");
    assert_eq!(store.read("l-1").await.expect("read").len(), 1);
}

/// Commands larger than the subscription's page arrive whole, and pages
/// that end inside a command do not split it.
async fn commands_larger_than_a_page<S: EventStore<Ledger>>(store: S) {
    let sizes = [1usize, 7, 3, 10, 1, 4];
    let mut version = 0;
    for (i, size) in sizes.iter().enumerate() {
        let events = if i == 0 {
            vec![LedgerEvent::Opened]
        } else {
            (0..*size).map(|n| LedgerEvent::Added { amount: n as i64 }).collect()
        };
        version = store.append("big", ExpectedVersion::Exact(version), events, meta()).await.expect("append").version;
    }
    let mut stream = store.subscribe(Checkpoint::start()).await.expect("subscribe");
    let mut got = Vec::new();
    let mut next = 0;
    while got.len() < sizes.len() {
        let item = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("in time")
            .expect("endless")
            .expect("item");
        for e in &item {
            assert_eq!(e.position.offset, next);
            next += 1;
        }
        got.push(item.len());
    }
    assert_eq!(got, sizes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_commands_larger_than_a_page_arrive_whole() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store =
        SqlStore::<Ledger>::open(SqlStoreConfig::from_url(&common::sqlite_url(&dir)).page_size(4)).await.expect("open");
    commands_larger_than_a_page(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_commands_larger_than_a_page_arrive_whole() {
    if !common::postgres_available().await {
        return;
    }
    let config = SqlStoreConfig::from_url(&common::database_url()).schema(common::fresh_schema()).page_size(4);
    let store = SqlStore::<Ledger>::open(config).await.expect("open");
    assert_eq!(store.dialect(), Dialect::Postgres);
    commands_larger_than_a_page(store).await;
}

/// Two stores of the same type in different schemas are separate logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_schemas_are_separate() {
    let Some(a) = common::postgres::<Ledger>().await else { return };
    let Some(b) = common::postgres::<Ledger>().await else { return };
    a.append("l-1", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], meta()).await.expect("append");
    assert!(b.load("l-1").await.expect("load").is_none());
    assert_eq!(b.head().await.expect("head"), Checkpoint::start());
}
