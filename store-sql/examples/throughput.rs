//! Append throughput of the SQL event store, single writer and 16 writers,
//! on SQLite (a temp file) and on PostgreSQL (a fresh schema at
//! `KES_TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`;
//! skipped when unreachable).
//!
//! ```text
//! cargo run --release -p kes-store-sql --example throughput
//! KES_BENCH_APPENDS=4000 cargo run --release -p kes-store-sql --example throughput
//! ```
//!
//! Every append is one command of one event with `ExpectedVersion::Any`,
//! acknowledged only after commit. Each figure is printed with a baseline
//! measured in the same run on the same database: a bare single-row
//! `INSERT` committed on its own, with the same durability settings.
//! Concurrent appends of one store are written in batches (group commit),
//! so with 16 writers one transaction carries many appends. On PostgreSQL a
//! third line spreads the 16 writers over 16 aggregate types (16 logs and
//! 16 stores, so 16 advisory locks and nothing to batch within each).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kes_core::conformance::{Ledger, LedgerCommand, LedgerError, LedgerEvent};
use kes_core::{Aggregate, EventStore, ExpectedVersion, Metadata};
use kes_store_sql::SqlStore;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Executor, Pool};

const WRITERS: usize = 16;

fn appends_per_run() -> usize {
    std::env::var("KES_BENCH_APPENDS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
}

/// Runs `writers` tasks that together perform `total` operations (`op(writer,
/// i)`) and returns operations per second.
async fn measure<F, Fut>(writers: usize, total: usize, op: F) -> f64
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let per_writer = total / writers;
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let op = Arc::clone(&op);
            tokio::spawn(async move {
                for i in 0..per_writer {
                    op(w, i).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("writer task");
    }
    (per_writer * writers) as f64 / started.elapsed().as_secs_f64()
}

async fn store_rate<A: Aggregate<Event = LedgerEvent>>(store: SqlStore<A>, writers: usize, total: usize) -> f64 {
    measure(writers, total, move |w, i| {
        let store = store.clone();
        async move {
            let event = if i == 0 { LedgerEvent::Opened } else { LedgerEvent::Added { amount: 1 } };
            store
                .append(&format!("w-{w}"), ExpectedVersion::Any, vec![event], Metadata::default())
                .await
                .expect("append");
        }
    })
    .await
}

async fn baseline_rate<DB: sqlx::Database>(pool: Pool<DB>, writers: usize, total: usize) -> f64
where
    for<'c> &'c Pool<DB>: Executor<'c, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    pool.execute("DELETE FROM bench_baseline").await.expect("clear baseline");
    measure(writers, total, move |w, i| {
        let pool = pool.clone();
        async move {
            sqlx::query("INSERT INTO bench_baseline (writer, n, payload) VALUES ($1, $2, $3)")
                .bind(w as i64)
                .bind(i as i64)
                .bind(r#"{"Added":{"amount":1}}"#.to_owned())
                .execute(&pool)
                .await
                .expect("insert");
        }
    })
    .await
}

fn report(what: &str, writers: usize, rate: f64, baseline: f64) {
    println!(
        "{what:<44} {writers:>2} writer{} {rate:>9.0} appends/s   baseline {baseline:>9.0} inserts/s   ratio {:.2}",
        if writers == 1 { " " } else { "s" },
        rate / baseline
    );
}

/// The 16 aggregate types of the "16 logs" line: the ledger under 16 names.
macro_rules! ledger_types {
    ($($t:ident = $name:literal),* $(,)?) => {
        $(
            #[derive(Debug, Default, Clone, Serialize, Deserialize)]
            struct $t(Ledger);
            impl Aggregate for $t {
                const NAME: &'static str = $name;
                type Command = LedgerCommand;
                type Event = LedgerEvent;
                type Error = LedgerError;
                fn handle(&self, command: LedgerCommand) -> Result<Vec<LedgerEvent>, LedgerError> {
                    self.0.handle(command)
                }
                fn apply(&mut self, event: &LedgerEvent) {
                    self.0.apply(event)
                }
            }
        )*
        /// One writer on each type's own log, all at once.
        async fn sixteen_logs(url: &str, schema: &str, total: usize) -> f64 {
            let per = total / WRITERS;
            let started = Instant::now();
            let mut tasks = Vec::new();
            $(
                let store = SqlStore::<$t>::open(kes_store_sql::SqlStoreConfig::from_url(url).schema(schema).max_connections(2)).await.expect("open");
                tasks.push(tokio::spawn(async move { store_rate(store, 1, per).await }));
            )*
            for t in tasks {
                t.await.expect("task");
            }
            (per * WRITERS) as f64 / started.elapsed().as_secs_f64()
        }
    };
}

ledger_types!(
    L0 = "ledger0",
    L1 = "ledger1",
    L2 = "ledger2",
    L3 = "ledger3",
    L4 = "ledger4",
    L5 = "ledger5",
    L6 = "ledger6",
    L7 = "ledger7",
    L8 = "ledger8",
    L9 = "ledger9",
    L10 = "ledger10",
    L11 = "ledger11",
    L12 = "ledger12",
    L13 = "ledger13",
    L14 = "ledger14",
    L15 = "ledger15",
);

async fn sqlite(total: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("events.db").display());
    let store = SqlStore::<Ledger>::open(&url).await.expect("open sqlite store");
    // The baseline gets what the store gets: WAL, synchronous FULL, one
    // writer connection.
    let options = url
        .parse::<SqliteConnectOptions>()
        .expect("url")
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.expect("baseline pool");
    pool.execute("CREATE TABLE bench_baseline (writer INTEGER, n INTEGER, payload TEXT)").await.expect("table");
    for writers in [1, WRITERS] {
        let base = baseline_rate(pool.clone(), writers, total).await;
        let rate = store_rate(store.clone(), writers, total).await;
        report("SQLite file (WAL, synchronous=FULL)", writers, rate, base);
    }
}

async fn postgres(total: usize) {
    let url =
        std::env::var("KES_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let schema = format!("kes_bench_{}", std::process::id());
    let store = match SqlStore::<Ledger>::open(
        kes_store_sql::SqlStoreConfig::from_url(&url).schema(&schema).max_connections(20),
    )
    .await
    {
        Ok(store) => store,
        Err(e) => {
            println!("PostgreSQL skipped: {e}");
            return;
        }
    };
    let set_path = format!("SET search_path TO {schema}");
    let pool = PgPoolOptions::new()
        .max_connections(WRITERS as u32)
        .after_connect(move |conn, _| {
            let set_path = set_path.clone();
            Box::pin(async move { conn.execute(set_path.as_str()).await.map(drop) })
        })
        .connect(&url)
        .await
        .expect("baseline pool");
    pool.execute("CREATE TABLE bench_baseline (writer BIGINT, n BIGINT, payload TEXT)").await.expect("table");
    let mut sixteen_base = 0.0;
    for writers in [1, WRITERS] {
        let base = baseline_rate(pool.clone(), writers, total).await;
        let rate = store_rate(store.clone(), writers, total).await;
        report("PostgreSQL, one log (one advisory lock)", writers, rate, base);
        sixteen_base = base;
    }
    let rate = sixteen_logs(&url, &schema, total).await;
    report("PostgreSQL, 16 logs (16 aggregate types)", WRITERS, rate, sixteen_base);
    let _ = pool.execute(format!("DROP SCHEMA {schema} CASCADE").as_str()).await;
}

#[tokio::main]
async fn main() {
    let total = appends_per_run();
    println!(
        "{total} appends per line (one event each), {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    sqlite(total).await;
    postgres(total).await;
}
