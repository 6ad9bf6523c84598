//! PostgreSQL: the store's appends and reads touch a handful of index
//! entries per stream, and the key store's lookups a handful per key,
//! whatever the tables held when their session planned them.
//!
//! A session caches the plans of its prepared statements and of a
//! function's statements. A plan made while `kes_events` was empty
//! (never analysed, or analysed empty) and kept after the table grew can
//! scan every event of the aggregate type on each call: with autovacuum
//! off, or before its first analyse of a table growing from nothing, each
//! append then costs as much as the log is long, under the type's append
//! lock. These tests make the sessions keep the plans they make on an
//! empty log (`plan_cache_mode = force_generic_plan`, where the plan cache
//! settles after a few executions), or leave the log without statistics,
//! grow it behind their backs, and count the tuples the next calls read:
//! in the calls' own transaction for the server functions, from the
//! table's statistics once the sessions report them for the stores. The
//! tables are never vacuumed, so index-only scans fetch from the heap too
//! and every tuple read is counted.

use kes_core::conformance::Ledger;
use kes_store_sql::{SqlKeyStore, SqlKeyStoreConfig, SqlStore, SqlStoreConfig};
use sqlx::{Connection, Executor, PgConnection};

/// Events written behind the planning session's back.
const GROWN: i64 = 20_000;

/// Streams per batch call: the writer's batches are of this order.
const BATCH: i64 = 64;

/// A fresh database with the store's schema, where autovacuum never
/// analyses the log (so only the test decides what the planner knows).
async fn unanalysed_database(tag: &str) -> Option<(String, PgConnection)> {
    let url = kes_test_support::fresh_postgres_database(tag).await?;
    let store = SqlStore::<Ledger>::open(url.as_str()).await.expect("open the store (migrations)");
    drop(store);
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    for table in ["kes_events", "kes_aggregates"] {
        conn.execute(format!("ALTER TABLE {table} SET (autovacuum_enabled = false)").as_str())
            .await
            .expect("turn autovacuum off for the table");
    }
    Some((url, conn))
}

/// One call of `kes_append_batch` creating `BATCH` streams named
/// `{prefix}{n}`, each with one event carrying a retry key.
async fn append_batch(conn: &mut PgConnection, prefix: &str) {
    let first: i64 = sqlx::query_scalar(
        "SELECT kes_append_batch('ledger', ids, zeros, keys, states, ones, times, \
                                 ids, ones, ones, event_ids, types, ones, payloads, metadata, times, keys) \
         FROM (SELECT array_agg($1 || g) AS ids, array_agg(0::bigint) AS zeros, array_agg('key-' || $1 || g) AS keys, \
                      array_agg('{}'::jsonb) AS states, array_agg(1::bigint) AS ones, array_agg(now()) AS times, \
                      array_agg(gen_random_uuid()) AS event_ids, array_agg('Opened'::text) AS types, \
                      array_agg('\"Opened\"'::text) AS payloads, array_agg('{}'::jsonb) AS metadata \
               FROM generate_series(1, $2::bigint) AS g) AS a",
    )
    .bind(prefix)
    .bind(BATCH)
    .fetch_one(&mut *conn)
    .await
    .expect("a batch call");
    assert!(first >= 0, "the batch's checks failed on new streams");
}

/// One call of `kes_append_current` creating the stream `id`, with a retry key.
async fn append_current(conn: &mut PgConnection, id: &str) {
    let first: i64 = sqlx::query_scalar(
        "SELECT kes_append_current('ledger', $1, 0, 'key-' || $1, ARRAY[gen_random_uuid()], ARRAY['Opened'], \
                                   ARRAY[1::bigint], ARRAY['\"Opened\"'], '{}'::jsonb, now(), '{}'::jsonb)",
    )
    .bind(id)
    .fetch_one(&mut *conn)
    .await
    .expect("a single call");
    assert!(first >= 0, "the single call's checks failed on a new stream");
}

/// `GROWN` events of other streams, each with a retry key, written by
/// another session.
async fn grow(url: &str) {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    sqlx::query(
        "INSERT INTO kes_events (aggregate_type, position, aggregate_id, version, command_end, event_id, event_type, \
                                 revision, payload, metadata, recorded_at, idempotency_key) \
         SELECT 'ledger', 1000000 + g, 'grown-' || g, 1, 1, gen_random_uuid(), 'Opened', 1, '\"Opened\"', '{}', now(), \
                'grown-key-' || g \
         FROM generate_series(1, $1::bigint) AS g",
    )
    .bind(GROWN)
    .execute(&mut conn)
    .await
    .expect("grow the log");
    conn.close().await.expect("close");
}

/// Plans the functions on the empty log in one session, grows the log from
/// another, then counts what one more call of each reads.
async fn tuples_read_after_growth(url: &str, mut planner: PgConnection) -> i64 {
    planner.execute("SET plan_cache_mode = force_generic_plan").await.expect("keep generic plans");
    append_batch(&mut planner, "early-").await;
    append_current(&mut planner, "early-single").await;
    grow(url).await;

    let mut tx = planner.begin().await.expect("begin");
    append_batch(&mut tx, "late-").await;
    append_current(&mut tx, "late-single").await;
    let read: i64 = sqlx::query_scalar(
        "SELECT CAST(seq_tup_read + COALESCE(idx_tup_fetch, 0) AS BIGINT) FROM pg_stat_xact_user_tables \
         WHERE relname = 'kes_events'",
    )
    .fetch_one(&mut *tx)
    .await
    .expect("read the transaction's table statistics");
    tx.commit().await.expect("commit");
    read
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_made_on_a_never_analysed_log_stay_on_the_indexes() {
    let Some((url, planner)) = unanalysed_database("plans_never").await else { return };
    let read = tuples_read_after_growth(&url, planner).await;
    // 65 streams checked, a retry key each, the log's head: a few index
    // entries each. A scan of the type reads the GROWN events.
    assert!(read < 1_000, "two appends read {read} tuples of a log of {GROWN} events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_made_on_a_log_analysed_empty_stay_on_the_indexes() {
    let Some((url, mut planner)) = unanalysed_database("plans_empty").await else { return };
    planner.execute("ANALYZE kes_events").await.expect("analyse the empty log");
    let read = tuples_read_after_growth(&url, planner).await;
    assert!(read < 1_000, "two appends read {read} tuples of a log of {GROWN} events");
}

/// `url` with every session of a pool opened on it keeping the generic
/// plans of its prepared statements, as the plan cache settles on after a
/// few executions.
fn generic_plans(url: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}options=-c%20plan_cache_mode%3Dforce_generic_plan")
}

/// The tuples of `table` read and inserted so far, as the sessions have
/// reported them (a session reports when idle, and when it ends).
async fn table_counters(conn: &mut PgConnection, table: &str) -> (i64, i64) {
    sqlx::query("SELECT pg_stat_clear_snapshot()").execute(&mut *conn).await.expect("clear the snapshot");
    sqlx::query_as(
        "SELECT CAST(seq_tup_read + COALESCE(idx_tup_fetch, 0) AS BIGINT), CAST(n_tup_ins AS BIGINT) \
         FROM pg_stat_user_tables WHERE relname = $1",
    )
    .bind(table)
    .fetch_one(&mut *conn)
    .await
    .expect("read the table statistics")
}

/// The counters of `table` once at least `inserted` insertions are reported.
async fn counters_once_inserted(conn: &mut PgConnection, table: &str, inserted: i64) -> (i64, i64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let counters = table_counters(conn, table).await;
        if counters.1 >= inserted {
            return counters;
        }
        assert!(std::time::Instant::now() < deadline, "only {} of {inserted} insertions reported", counters.1);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Appends that take the store's general path (a stream another store
/// moved, a stream the store never saw) on `id`, three events, then the
/// store's reads of it.
async fn general_path_appends(a: &SqlStore<Ledger>, b: &SqlStore<Ledger>, id: &str) {
    use kes_core::conformance::LedgerEvent;
    use kes_core::{EventStore, ExpectedVersion, Metadata};
    let keyed = |key: String| Metadata { idempotency_key: Some(key), ..Metadata::default() };
    a.append(id, ExpectedVersion::NoStream, vec![LedgerEvent::Opened], Metadata::default()).await.expect("a opens");
    // b never saw the stream; a's cached state is then stale.
    let by_b =
        b.append(id, ExpectedVersion::Exact(1), vec![LedgerEvent::Added { amount: 1 }], keyed(format!("b-{id}")));
    assert_eq!(by_b.await.expect("b appends").version, 2);
    let by_a = a.append(id, ExpectedVersion::Any, vec![LedgerEvent::Added { amount: 2 }], keyed(format!("a-{id}")));
    assert_eq!(by_a.await.expect("a appends again").version, 3);
    // And the reads of the stream, its retry keys and the log's head.
    assert_eq!(a.read(id).await.expect("read the stream").len(), 3);
    assert_eq!(a.read_page(id, 1, 10).await.expect("read a page").len(), 2);
    assert!(a.recall(id, &format!("a-{id}")).await.expect("recall a retry").is_some());
    assert!(a.load_current(id).await.expect("load the current state").is_some());
    a.head().await.expect("the log's head");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stores_sessions_keep_to_the_indexes_after_the_log_grows() {
    let Some((url, mut watcher)) = unanalysed_database("plans_store").await else { return };
    watcher.execute("ANALYZE kes_events").await.expect("analyse the empty log");
    // Every session of both stores keeps the plans it makes first, on the
    // empty log.
    let generic = generic_plans(&url);
    // One session each, so that the later appends meet the plans the first
    // ones made.
    let config = || SqlStoreConfig::from_url(&generic).max_connections(1);
    let a = SqlStore::<Ledger>::open(config()).await.expect("open the first store");
    let b = SqlStore::<Ledger>::open(config()).await.expect("open the second store");
    general_path_appends(&a, &b, "early").await;
    // The growth is reported when its session ends. The early appends'
    // sessions may report them now or only at the end: what they read, on
    // a log of three events, is then counted with the late appends.
    grow(&url).await;
    let before = counters_once_inserted(&mut watcher, "kes_events", GROWN).await;

    general_path_appends(&a, &b, "late").await;
    // Ending the sessions makes them report everything they did.
    a.close().await;
    b.close().await;
    let after = counters_once_inserted(&mut watcher, "kes_events", GROWN + 6).await;
    let read = after.0 - before.0;
    assert!(read < 1_000, "three appends read {read} tuples of a log of {GROWN} events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_on_the_general_path_keeps_to_the_indexes_of_a_never_analysed_log() {
    use kes_core::conformance::LedgerEvent;
    use kes_core::{EventStore, ExpectedVersion, Metadata};
    let Some((url, mut watcher)) = unanalysed_database("plans_batch").await else { return };
    grow(&url).await;
    // Streams the second store creates: the first one's appends on them
    // then take its general path, batched (many clients, one session).
    let streams: Vec<String> = (0..BATCH).map(|n| format!("s-{n}")).collect();
    let b = SqlStore::<Ledger>::open(url.as_str()).await.expect("open the second store");
    for id in &streams {
        b.append(id, ExpectedVersion::NoStream, vec![LedgerEvent::Opened], Metadata::default()).await.expect("b opens");
    }
    b.close().await;
    let a = SqlStore::<Ledger>::open(SqlStoreConfig::from_url(&url).max_connections(1)).await.expect("open");
    let before = counters_once_inserted(&mut watcher, "kes_events", GROWN + BATCH).await;

    let appends = streams.iter().map(|id| {
        let keyed = Metadata { idempotency_key: Some(format!("key-{id}")), ..Metadata::default() };
        a.append(id, ExpectedVersion::Exact(1), vec![LedgerEvent::Added { amount: 1 }], keyed)
    });
    for appended in futures::future::join_all(appends).await {
        assert_eq!(appended.expect("a appends").version, 2);
    }
    a.close().await;
    let after = counters_once_inserted(&mut watcher, "kes_events", before.1 + BATCH).await;
    let read = after.0 - before.0;
    // Per stream: its version, its retry key, the log's head. A join of the
    // batch to the log reads the GROWN events.
    assert!(read < 2_000, "{BATCH} appends read {read} tuples of a log of {GROWN} events");
}

/// The key store of personal data asks one question per key, by subject or
/// by person, on every command that seals or opens a value: each is
/// answered by a unique index, whatever the keys table held when the
/// session planned it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_stores_lookups_stay_on_the_indexes_after_the_keys_grow() {
    use kes_core::{AggregateRef, KeyLookup, KeyRequest, KeyStore, WrappedKey};
    let Some(url) = kes_test_support::fresh_postgres_database("plans_keys").await else { return };
    let generic = generic_plans(&url);
    let keys = SqlKeyStore::open(SqlKeyStoreConfig::from_url(&generic).max_connections(1)).await.expect("open");
    let mut watcher = PgConnection::connect(&url).await.expect("connect");
    for table in ["kes_subject_keys", "kes_subject_erasures", "kes_subject_aggregates"] {
        watcher
            .execute(format!("ALTER TABLE {table} SET (autovacuum_enabled = false); ANALYZE {table}").as_str())
            .await
            .expect("analyse the empty table, autovacuum off");
    }
    let seal = async |n: u32| {
        let person = format!("person {n}");
        let candidate = WrappedKey { subject: format!("s-{n}"), key_id: "k1".into(), wrapped: vec![7; 56] };
        let wanted = [KeyRequest::Person { person, candidate }, KeyRequest::Subject(format!("s-{n}"))];
        let found = keys.keys_for_sealing(&AggregateRef::new("project", "p"), &wanted).await.expect("seal");
        assert!(found.iter().all(|k| matches!(k, KeyLookup::Key(_))), "{found:?}");
        let opened = keys.lookup(&[(format!("s-{n}"), "k1".into()), ("nobody".into(), "k1".into())]).await;
        assert!(matches!(opened.expect("open")[..], [KeyLookup::Key(_), KeyLookup::Missing]));
    };
    // The session's plans settle on the empty tables.
    for n in 0..8 {
        seal(n).await;
    }
    sqlx::query(
        "INSERT INTO kes_subject_keys (subject, person, key_id, wrapped, created_at) \
         SELECT 'grown-' || g, 'grown person ' || g, 'k1', 'AAAA', now() FROM generate_series(1, $1::bigint) AS g",
    )
    .bind(GROWN)
    .execute(&mut watcher)
    .await
    .expect("grow the keys");
    // The key store's session may report its early seals now or only at
    // the end: what they read, on empty tables, is then counted with the
    // late ones.
    let before = counters_once_inserted(&mut watcher, "kes_subject_keys", GROWN).await;

    for n in 100..104 {
        seal(n).await;
    }
    keys.close().await;
    let after = counters_once_inserted(&mut watcher, "kes_subject_keys", GROWN + 12).await;
    let read = after.0 - before.0;
    assert!(read < 1_000, "four seals and opens read {read} tuples of {GROWN} keys");
}
