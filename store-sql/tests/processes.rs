//! Several processes on one database: each opens its own store (its own
//! state cache) and runs its own command bus. A client that sends no
//! expected version never gets a conflict, and one that sends the version
//! it saw through any process gets a conflict only when the log moved past
//! it — however stale a process's cache.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kes_core::conformance::{Ledger, LedgerCommand};
use kes_core::{CommandBus, CommandError, EventStore, ExpectedVersion, Metadata};
use kes_store_sql::SqlStore;

/// Three "processes" on the stores of `open`, 12 clients writing one
/// ledger through them in turn: plain commands, then commands carrying the
/// version the client last saw.
async fn several_processes(stores: Vec<SqlStore<Ledger>>) {
    let buses: Vec<_> = stores.iter().map(|s| Arc::new(CommandBus::new(s.clone()))).collect();
    buses[0].execute("l-1", LedgerCommand::Open, ExpectedVersion::NoStream, Metadata::default()).await.expect("open");
    let refused = Arc::new(AtomicUsize::new(0));
    let conflicts = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..12)
        .map(|c| {
            let buses = buses.clone();
            let (refused, conflicts) = (Arc::clone(&refused), Arc::clone(&conflicts));
            tokio::spawn(async move {
                let mut seen = 1;
                for i in 0..15 {
                    let bus = &buses[(c + i) % buses.len()];
                    // Plain commands must always land.
                    match bus.execute("l-1", LedgerCommand::Add(1), ExpectedVersion::Any, Metadata::default()).await {
                        Ok(done) => seen = done.version,
                        Err(_) => {
                            refused.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    // With the version this client saw (through another
                    // process): a conflict only if the log really moved.
                    let bus = &buses[(c + i + 1) % buses.len()];
                    match bus
                        .execute("l-1", LedgerCommand::Add(1), ExpectedVersion::Exact(seen), Metadata::default())
                        .await
                    {
                        Ok(done) => seen = done.version,
                        Err(CommandError::Conflict { actual, .. }) => {
                            assert!(actual > seen, "a conflict at {actual} for a client that saw {seen}");
                            conflicts.fetch_add(1, Ordering::SeqCst);
                            seen = actual;
                        }
                        Err(e) => panic!("unexpected failure: {e}"),
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.await.expect("a client");
    }
    assert_eq!(refused.load(Ordering::SeqCst), 0, "plain commands were refused");
    let history = stores[0].read("l-1").await.expect("history");
    let versions: Vec<u64> = history.iter().map(|e| e.version).collect();
    assert_eq!(versions, (1..=versions.len() as u64).collect::<Vec<_>>());
    // Every plain command landed, and every If-Match write that was not refused.
    let expected = 1 + 12 * 15 + (12 * 15 - conflicts.load(Ordering::SeqCst));
    assert_eq!(history.len(), expected, "appended commands and history disagree");
    // Each process in turn, its cache behind the others' writes, admits the
    // version the log is at.
    let mut latest = history.len() as u64;
    for bus in &buses {
        let done = bus.execute("l-1", LedgerCommand::Add(1), ExpectedVersion::Exact(latest), Metadata::default()).await;
        latest = done.expect("the version the log is at").version;
    }
    assert_eq!(latest, history.len() as u64 + 3);
}

fn long_ttl(builder: kes_store_sql::SqlStoreConfig) -> kes_store_sql::SqlStoreConfig {
    // A cache trusted for a minute: every process's view of the others is stale.
    builder.state_cache(10_000).state_cache_ttl(Duration::from_secs(60))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_processes_on_sqlite() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = common::sqlite_url(&dir);
    let mut stores = Vec::new();
    for _ in 0..3 {
        stores.push(SqlStore::open(long_ttl(kes_store_sql::SqlStoreConfig::from_url(&url))).await.expect("open"));
    }
    several_processes(stores).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_processes_on_postgres() {
    let schema = common::fresh_schema();
    let mut stores = Vec::new();
    for _ in 0..3 {
        let Some(store) = common::postgres_with(&schema, long_ttl).await else { return };
        stores.push(store);
    }
    several_processes(stores).await;
}

/// Pitfall: a read by id carrying a position token from another process
/// must not be answered from a state cached before that write (the HTTP
/// adapter calls `wait_for_position`, then reads). The cache is trusted for
/// a minute here, so only the token can make the read current.
async fn a_token_from_another_process_skips_older_cached_states(a: SqlStore<Ledger>, b: SqlStore<Ledger>) {
    let bus_a = CommandBus::new(a.clone());
    let bus_b = CommandBus::new(b.clone());
    bus_a.execute("l-1", LedgerCommand::Open, ExpectedVersion::NoStream, Metadata::default()).await.expect("open");
    bus_a.execute("l-2", LedgerCommand::Open, ExpectedVersion::NoStream, Metadata::default()).await.expect("open");
    // B caches both ledgers (and writes one itself).
    assert_eq!(b.load_document("l-1").await.expect("load").expect("l-1").version, 1);
    let own = bus_b.execute("l-2", LedgerCommand::Add(5), ExpectedVersion::Any, Metadata::default()).await;
    assert_eq!(own.expect("add through b").version, 2);
    // A writes l-1: B's cache does not know.
    let done = bus_a.execute("l-1", LedgerCommand::Add(1), ExpectedVersion::Any, Metadata::default()).await;
    let done = done.expect("add through a");
    assert_eq!(b.load_document("l-1").await.expect("load").expect("l-1").version, 1, "the cache is not stale: no test");
    let position = done.position.expect("a position");
    assert!(b.wait_for_position(position, Duration::from_secs(1)).await.expect("wait"));
    assert_eq!(
        b.load_document("l-1").await.expect("load").expect("l-1").version,
        2,
        "served a state older than the token"
    );
    assert_eq!(b.load("l-2").await.expect("load").expect("l-2").version, 2);
    // A token already covered costs nothing and changes nothing.
    assert!(b.wait_for_position(position, Duration::from_secs(1)).await.expect("wait"));
    // A made-up token past the log's end does not mark later writes as seen.
    let far = kes_core::Position::new(0, position.offset + 1_000);
    assert!(b.wait_for_position(far, Duration::from_secs(1)).await.expect("wait"));
    let done = bus_a.execute("l-1", LedgerCommand::Add(1), ExpectedVersion::Any, Metadata::default()).await;
    let position = done.expect("add through a").position.expect("a position");
    assert!(b.wait_for_position(position, Duration::from_secs(1)).await.expect("wait"));
    assert_eq!(b.load_document("l-1").await.expect("load").expect("l-1").version, 3, "a far token hid a later write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_another_process_skips_older_cached_states_on_sqlite() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = common::sqlite_url(&dir);
    let a = SqlStore::open(long_ttl(kes_store_sql::SqlStoreConfig::from_url(&url))).await.expect("open a");
    let b = SqlStore::open(long_ttl(kes_store_sql::SqlStoreConfig::from_url(&url))).await.expect("open b");
    a_token_from_another_process_skips_older_cached_states(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_another_process_skips_older_cached_states_on_postgres() {
    let schema = common::fresh_schema();
    let Some(a) = common::postgres_with(&schema, long_ttl).await else { return };
    let Some(b) = common::postgres_with(&schema, long_ttl).await else { return };
    a_token_from_another_process_skips_older_cached_states(a, b).await;
}
