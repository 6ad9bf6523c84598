//! Group commit and the state cache, on SQLite and PostgreSQL: appends that
//! arrive together are written in one transaction yet answered one by one
//! as if each had run alone; a second store on the same database (another
//! process, as far as this one can tell) is seen within the cache's
//! time-to-live.
//!
//! To make a batch on purpose, a test queues its appends from one task of a
//! single-threaded runtime in one go (see [`in_one_batch`]): the store's
//! writer cannot run before they are all queued, and takes them together.
//! The cache tests move the cache's clock by hand.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::StreamExt;
use futures::future::join_all;
use kes_core::conformance::{Ledger, LedgerEvent};
use kes_core::{Appended, Checkpoint, EventStore, ExpectedVersion, Metadata, StoreError};
use kes_store_sql::{SqlStore, SqlStoreConfig};

use common::HandClock;

const WAIT: Duration = Duration::from_secs(30);

fn meta() -> Metadata {
    Metadata::default()
}

fn keyed(key: &str) -> Metadata {
    Metadata { idempotency_key: Some(key.into()), ..meta() }
}

fn add(amount: i64) -> Vec<LedgerEvent> {
    vec![LedgerEvent::Added { amount }]
}

/// A store under test and the way to reach its database beside it.
struct Db {
    store: SqlStore<Ledger>,
    place: Place,
}

enum Place {
    Sqlite { url: String, _dir: tempfile::TempDir },
    Postgres { schema: String },
}

impl Db {
    async fn sqlite() -> Self {
        Self::sqlite_with(|b| b).await
    }

    async fn sqlite_with(configure: impl FnOnce(SqlStoreConfig) -> SqlStoreConfig) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = common::sqlite_url(&dir);
        let store = SqlStore::open(configure(SqlStoreConfig::from_url(&url))).await.expect("open sqlite store");
        Self { store, place: Place::Sqlite { url, _dir: dir } }
    }

    async fn postgres() -> Option<Self> {
        Self::postgres_with(|b| b).await
    }

    async fn postgres_with(configure: impl FnOnce(SqlStoreConfig) -> SqlStoreConfig) -> Option<Self> {
        let schema = common::fresh_schema();
        let store = common::postgres_with::<Ledger>(&schema, configure).await?;
        Some(Self { store, place: Place::Postgres { schema } })
    }

    /// Another store on the same database, as another process would open it.
    async fn second_store(&self, configure: impl FnOnce(SqlStoreConfig) -> SqlStoreConfig) -> SqlStore<Ledger> {
        let config = match &self.place {
            Place::Sqlite { url, .. } => SqlStoreConfig::from_url(url),
            Place::Postgres { schema } => SqlStoreConfig::from_url(&common::database_url()).schema(schema),
        };
        SqlStore::open(configure(config)).await.expect("open the second store")
    }

    /// PostgreSQL only: the transaction that wrote each event, by aggregate
    /// id and version.
    async fn transactions(&self) -> Option<HashMap<(String, u64), String>> {
        let Place::Postgres { schema } = &self.place else { return None };
        let mut c = common::postgres_connection(schema).await;
        let rows: Vec<(String, i64, String)> =
            sqlx::query_as("SELECT aggregate_id, version, xmin::text FROM kes_events").fetch_all(&mut c).await.ok()?;
        Some(rows.into_iter().map(|(id, v, tx)| ((id, v as u64), tx)).collect())
    }
}

/// The whole log read through a subscription: every event once, positions
/// contiguous from 0.
async fn whole_log(store: &SqlStore<Ledger>) -> Vec<kes_core::Envelope<LedgerEvent>> {
    let head = store.head().await.expect("head");
    let mut stream = store.subscribe(Checkpoint::start()).await.expect("subscribe");
    let mut checkpoint = Checkpoint::start();
    let mut events = Vec::new();
    while !checkpoint.covers_all(&head) {
        let item = tokio::time::timeout(WAIT, stream.next()).await.expect("in time").expect("endless").expect("item");
        for e in item {
            assert_eq!(e.position.offset, events.len() as u64, "positions have a gap");
            checkpoint.advance(e.position);
            events.push(e);
        }
    }
    events
}

/// 32 writers each on an aggregate of its own (a create, then appends at
/// exact versions) and 16 writers on one hot aggregate (any version, with
/// retry keys), all at once: every acknowledged append is in the log where
/// its answer says, versions are contiguous, positions gap-free and rising
/// with the versions of each aggregate, and states are right in the cache
/// and in the table.
async fn many_concurrent_appends(db: Db) {
    const OWN: usize = 32;
    const HOT: usize = 16;
    const EACH: usize = 10;
    let writers: Vec<_> = (0..OWN + HOT)
        .map(|w| {
            let store = db.store.clone();
            tokio::spawn(async move {
                let mut acks = Vec::new();
                for i in 0..EACH {
                    let amount = (w * 100 + i) as i64;
                    let (id, expected, events, metadata) = if w < OWN {
                        let expected =
                            if i == 0 { ExpectedVersion::NoStream } else { ExpectedVersion::Exact(i as u64) };
                        let events = if i == 0 { vec![LedgerEvent::Opened] } else { add(amount) };
                        (format!("own-{w}"), expected, events, meta())
                    } else {
                        ("hot".to_owned(), ExpectedVersion::Any, add(amount), keyed(&format!("hot-{w}-{i}")))
                    };
                    let ack = store.append(&id, expected, events, metadata).await.expect("append");
                    assert!(!ack.deduplicated);
                    acks.push((id, ack, if w < OWN && i == 0 { 0 } else { amount }));
                }
                acks
            })
        })
        .collect();
    let mut acks: Vec<(String, Appended, i64)> = Vec::new();
    for w in join_all(writers).await {
        acks.extend(w.expect("writer"));
    }
    assert_eq!(acks.len(), (OWN + HOT) * EACH);

    let log = whole_log(&db.store).await;
    assert_eq!(log.len(), acks.len(), "every append is one event");
    let at: HashMap<(String, u64), u64> =
        log.iter().map(|e| ((e.aggregate_id.clone(), e.version), e.position.offset)).collect();
    for (id, ack, _) in &acks {
        assert_eq!(at.get(&(id.clone(), ack.version)), Some(&ack.position.offset), "{id} v{}", ack.version);
    }
    let mut by_id: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
    for e in &log {
        by_id.entry(&e.aggregate_id).or_default().push((e.version, e.position.offset));
    }
    for (id, versions) in &by_id {
        let expected: Vec<u64> = (1..=versions.len() as u64).collect();
        assert_eq!(versions.iter().map(|v| v.0).collect::<Vec<_>>(), expected, "{id}: versions in log order");
    }
    assert_eq!(by_id.len(), OWN + 1);

    let mut totals: HashMap<&str, (u64, i64)> = HashMap::new();
    for (id, _, amount) in &acks {
        let t = totals.entry(id).or_default();
        t.0 += 1;
        t.1 += amount;
    }
    let table = db.second_store(|b| b.state_cache(0)).await;
    for (id, (version, total)) in totals {
        for store in [&db.store, &table] {
            let snapshot = store.load(id).await.expect("load").expect("exists");
            assert_eq!((snapshot.version, snapshot.state.total), (version, total), "{id}");
        }
    }
    if let Some(transactions) = db.transactions().await {
        let distinct: std::collections::HashSet<&String> = transactions.values().collect();
        assert!(distinct.len() < acks.len(), "no two appends shared a transaction: nothing was batched");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_many_concurrent_appends() {
    many_concurrent_appends(Db::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_many_concurrent_appends() {
    let Some(db) = Db::postgres().await else { return };
    many_concurrent_appends(db).await;
}

/// Appends `first` on its own, then queues `rest` in order so that the
/// store's writer takes them as one batch, and returns the answers:
/// `first`'s, then those of `rest` in order.
///
/// Callers run on a single-threaded runtime. There `first`'s writer has
/// answered and stopped before this task goes on, and the writer that the
/// first of `rest` starts cannot run before this task waits; polling the
/// appends once queues all of them (an append is queued before it first
/// waits), so that writer finds every one of them queued.
async fn in_one_batch<'a>(
    db: &'a Db,
    first: (&'a str, ExpectedVersion, Vec<LedgerEvent>, Metadata),
    rest: Vec<(&'a str, ExpectedVersion, Vec<LedgerEvent>, Metadata)>,
) -> (Result<Appended, StoreError>, Vec<Result<Appended, StoreError>>) {
    assert_eq!(
        tokio::runtime::Handle::current().runtime_flavor(),
        tokio::runtime::RuntimeFlavor::CurrentThread,
        "in_one_batch needs a single-threaded runtime"
    );
    let (id, expected, events, metadata) = first;
    let first = db.store.append(id, expected, events, metadata).await;
    let rest = join_all(rest.into_iter().map(|(id, expected, events, metadata)| {
        let store = &db.store;
        async move { store.append(id, expected, events, metadata).await }
    }));
    (first, rest.await)
}

/// Asserts that the events at `keys` were written by one transaction
/// (PostgreSQL only; SQLite has no trace of it).
async fn one_transaction(db: &Db, keys: &[(&str, u64)]) {
    let Some(transactions) = db.transactions().await else { return };
    let found: std::collections::HashSet<&String> =
        keys.iter().map(|(id, v)| transactions.get(&((*id).to_owned(), *v)).expect("event written")).collect();
    assert_eq!(found.len(), 1, "{keys:?} were written by {} transactions", found.len());
}

/// One batch where two appends conflict (one with an earlier append of the
/// same batch, one with the database) and the others succeed, with
/// positions consecutive in request order.
async fn conflicts_in_a_batch_fail_alone(db: Db) {
    let (first, answers) = in_one_batch(
        &db,
        ("first", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], meta()),
        vec![
            ("x", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], meta()),
            ("y", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], meta()),
            ("x", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], meta()),
            ("first", ExpectedVersion::Exact(5), add(1), meta()),
            ("x", ExpectedVersion::Exact(1), vec![LedgerEvent::Added { amount: 2 }; 2], meta()),
            ("y", ExpectedVersion::Any, add(7), meta()),
        ],
    )
    .await;
    let first = first.expect("first append");
    let p = first.position.offset;
    let ok = |r: &Result<Appended, StoreError>| r.as_ref().map(|a| (a.version, a.position.offset)).ok();
    assert_eq!(ok(&answers[0]), Some((1, p + 1)));
    assert_eq!(ok(&answers[1]), Some((1, p + 2)));
    assert!(
        matches!(&answers[2], Err(StoreError::Conflict { id, actual: 1, .. }) if id == "x"),
        "x was created earlier in the batch: {:?}",
        answers[2]
    );
    assert!(matches!(&answers[3], Err(StoreError::Conflict { actual: 1, .. })), "{:?}", answers[3]);
    assert_eq!(ok(&answers[4]), Some((3, p + 4)), "two events, positions p+3 and p+4");
    assert_eq!(ok(&answers[5]), Some((2, p + 5)));
    one_transaction(&db, &[("x", 1), ("y", 1), ("x", 3), ("y", 2)]).await;

    let log = whole_log(&db.store).await;
    assert_eq!(log.len() as u64, p + 6);
    let x = db.store.load("x").await.expect("load").expect("x");
    assert_eq!((x.version, x.state.total, x.state.entries), (3, 4, 2));
    let table = db.second_store(|b| b.state_cache(0)).await;
    let y = table.load("y").await.expect("load").expect("y");
    assert_eq!((y.version, y.state.total), (2, 7), "the table row holds the last state of the batch");
}

// Single-threaded: see `in_one_batch`.
#[tokio::test]
async fn sqlite_conflicts_in_a_batch_fail_alone() {
    conflicts_in_a_batch_fail_alone(Db::sqlite().await).await;
}

// Single-threaded: see `in_one_batch`.
#[tokio::test]
async fn postgres_conflicts_in_a_batch_fail_alone() {
    let Some(db) = Db::postgres().await else { return };
    conflicts_in_a_batch_fail_alone(db).await;
}

/// Retries inside one batch repeat the first answer, whether the first
/// append is in the same batch or an earlier one, and a retry key belongs
/// to one aggregate only.
async fn retries_in_a_batch_append_once(db: Db) {
    let (first, answers) = in_one_batch(
        &db,
        ("a", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], keyed("k-open")),
        vec![
            ("a", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], keyed("k-open")),
            ("a", ExpectedVersion::Exact(1), add(5), keyed("k-add")),
            ("a", ExpectedVersion::Exact(1), add(5), keyed("k-add")),
            ("b", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], keyed("k-add")),
            ("a", ExpectedVersion::Exact(2), add(6), meta()),
            ("a", ExpectedVersion::Exact(1), add(5), keyed("k-add")),
        ],
    )
    .await;
    let first = first.expect("first append");
    let p = first.position.offset;
    assert_eq!(answers[0], Ok(Appended { deduplicated: true, ..first }), "retry of an earlier batch's append");
    let added = Appended { version: 2, position: kes_core::Position::new(0, p + 1), deduplicated: false };
    assert_eq!(answers[1], Ok(added));
    assert_eq!(answers[2], Ok(Appended { deduplicated: true, ..added }), "retry within the batch");
    assert_eq!(answers[3].as_ref().map(|a| (a.version, a.deduplicated)), Ok((1, false)), "another aggregate's key");
    assert_eq!(answers[4].as_ref().map(|a| a.version), Ok(3));
    assert_eq!(answers[5], Ok(Appended { deduplicated: true, ..added }), "a retry after the stream moved on");
    one_transaction(&db, &[("a", 2), ("b", 1), ("a", 3)]).await;

    let history = db.store.read("a").await.expect("read");
    assert_eq!(history.len(), 3, "each key appended once");
    assert_eq!(db.store.recall("a", "k-add").await.expect("recall"), Some(Appended { deduplicated: true, ..added }));
    assert_eq!(whole_log(&db.store).await.len() as u64, p + 4);
}

// Single-threaded: see `in_one_batch`.
#[tokio::test]
async fn sqlite_retries_in_a_batch_append_once() {
    retries_in_a_batch_append_once(Db::sqlite().await).await;
}

// Single-threaded: see `in_one_batch`.
#[tokio::test]
async fn postgres_retries_in_a_batch_append_once() {
    let Some(db) = Db::postgres().await else { return };
    retries_in_a_batch_append_once(db).await;
}

/// An append that makes the batch's statements fail (PostgreSQL refuses a
/// NUL character in text) fails alone: the others of its batch are written
/// one by one.
// Single-threaded: see `in_one_batch`.
#[tokio::test]
async fn postgres_a_failing_append_does_not_fail_its_batch() {
    let Some(db) = Db::postgres().await else { return };
    let (first, answers) = in_one_batch(
        &db,
        ("first", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], meta()),
        vec![
            ("p", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], meta()),
            ("bad\0id", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], meta()),
            ("q", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], meta()),
        ],
    )
    .await;
    let p = first.expect("first").position.offset;
    assert_eq!(answers[0].as_ref().map(|a| a.position.offset), Ok(p + 1));
    assert!(matches!(answers[1], Err(StoreError::Backend(_))), "{:?}", answers[1]);
    assert_eq!(answers[2].as_ref().map(|a| a.position.offset), Ok(p + 2), "no gap where the failed append was");
    assert_eq!(whole_log(&db.store).await.len() as u64, p + 3);
}

/// How the first store learns of the second's write.
enum Learns {
    /// Its append meets the database's version.
    ByConflict,
    /// Its entry outlives the time-to-live.
    ByExpiry,
}

/// A second store writes an aggregate the first has cached: the first's
/// `load` is stale until the time-to-live has passed on its cache's clock
/// (moved by hand here), and fresh once it has or once its own append met
/// the database's version (a conflict, which drops the entry).
async fn a_second_store_is_seen(db: Db, clock: HandClock, ttl: Duration, learns: Learns) {
    let store = &db.store;
    let other = db.second_store(|b| b).await;
    store.append("s", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], meta()).await.expect("open");
    assert_eq!(store.load("s").await.expect("load").expect("s").version, 1);
    other.append("s", ExpectedVersion::Exact(1), add(3), meta()).await.expect("the other store appends");

    clock.advance(ttl - Duration::from_nanos(1));
    let stale = store.load("s").await.expect("load").expect("s");
    assert_eq!(stale.version, 1, "within the time-to-live the cache answers");
    match learns {
        Learns::ByConflict => {
            let err = store.append("s", ExpectedVersion::Exact(1), add(1), meta()).await.unwrap_err();
            assert!(matches!(err, StoreError::Conflict { actual: 2, .. }), "{err:?}");
        }
        Learns::ByExpiry => clock.advance(Duration::from_nanos(1)),
    }
    let fresh = store.load("s").await.expect("load").expect("s");
    assert_eq!((fresh.version, fresh.state.total), (2, 3), "the next load reads the table");
    store.append("s", ExpectedVersion::Exact(2), add(4), meta()).await.expect("append on the fresh version");
    let other_view = other.load("s").await.expect("load").expect("s").version;
    assert!(other_view == 2 || other_view == 3, "the other store may still answer from its cache");
}

fn hand_clocked(clock: &HandClock, ttl: Duration) -> impl FnOnce(SqlStoreConfig) -> SqlStoreConfig + use<> {
    let now = clock.reader();
    move |b| b.state_cache_ttl(ttl).state_cache_clock(now)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_second_store_is_seen_after_a_conflict() {
    let (clock, ttl) = (HandClock::new(), Duration::from_secs(60));
    let db = Db::sqlite_with(hand_clocked(&clock, ttl)).await;
    a_second_store_is_seen(db, clock, ttl, Learns::ByConflict).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_second_store_is_seen_after_the_ttl() {
    let (clock, ttl) = (HandClock::new(), Duration::from_millis(300));
    let db = Db::sqlite_with(hand_clocked(&clock, ttl)).await;
    a_second_store_is_seen(db, clock, ttl, Learns::ByExpiry).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_second_store_is_seen_after_a_conflict() {
    let (clock, ttl) = (HandClock::new(), Duration::from_secs(60));
    let Some(db) = Db::postgres_with(hand_clocked(&clock, ttl)).await else { return };
    a_second_store_is_seen(db, clock, ttl, Learns::ByConflict).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_second_store_is_seen_after_the_ttl() {
    let (clock, ttl) = (HandClock::new(), Duration::from_millis(300));
    let Some(db) = Db::postgres_with(hand_clocked(&clock, ttl)).await else { return };
    a_second_store_is_seen(db, clock, ttl, Learns::ByExpiry).await;
}

/// With the cache off, every append and load goes to the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_cache_off_still_appends_and_loads() {
    let db = Db::sqlite_with(|b| b.state_cache(0)).await;
    let mut version = 0;
    for i in 0..20 {
        let events = if i == 0 { vec![LedgerEvent::Opened] } else { add(i) };
        version = db.store.append("c", ExpectedVersion::Exact(version), events, meta()).await.expect("append").version;
        assert_eq!(db.store.load("c").await.expect("load").expect("c").version, version);
    }
    assert_eq!(db.store.load("c").await.expect("load").expect("c").state.total, (1..20).sum::<i64>());
}
