//! Rebuild rate on PostgreSQL against a raw batched insert of the same rows,
//! in the same run, with the time the rebuild spends in each `ViewStore`
//! call. Prints figures; asserts nothing about speed. Run with
//!
//! ```text
//! CI=true KES_BENCH_ROWS=5000 cargo test -p kes-view-sql --release --test rebuild_rate -- --ignored --nocapture
//! ```

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kes_core::{
    Aggregate, Checkpoint, DomainEvent, EventStore, ExpectedVersion, Field, FieldValue, InMemoryStore, Lease,
    ListQuery, ListView, Metadata, Page, ProjectionRunner, Row, RowChange, RunnerConfig, StoredState, ViewCopy,
    ViewError, ViewProgress, ViewProjection, ViewSchema, ViewStore,
};
use kes_view_sql::SqlView;
use serde::{Deserialize, Serialize};

fn schema() -> ViewSchema {
    ViewSchema::new("items", 1)
        .field(Field::text("name").filterable().sortable().searchable())
        .field(Field::text("description").searchable())
        .field(Field::keyword("status").filterable().sortable())
        .field(Field::integer("budget").filterable().sortable())
        .field(Field::keyword("owner").filterable().sortable().searchable())
        .field(Field::integer("members").filterable().sortable())
        .field(Field::text("tags").searchable())
        .field(Field::timestamp("due").filterable().sortable())
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Item {
    n: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Created {
    n: u64,
}

impl DomainEvent for Created {
    fn event_type(&self) -> &'static str {
        "Created"
    }
}

impl Aggregate for Item {
    const NAME: &'static str = "item";
    type Command = Created;
    type Event = Created;
    type Error = std::convert::Infallible;
    fn handle(&self, command: Created) -> Result<Vec<Created>, Self::Error> {
        Ok(vec![command])
    }
    fn apply(&mut self, event: &Created) {
        self.n = event.n;
    }
}

fn text(n: u64, what: &str) -> String {
    format!("{what} {n} of group {} with some words", n % 97)
}

fn row_of(n: u64) -> Row {
    let mut row = Row::new();
    row.insert("name".into(), text(n, "Project").into());
    row.insert("description".into(), text(n, "A longer description of project").into());
    row.insert("status".into(), ["open", "done", "late"][(n % 3) as usize].into());
    row.insert("budget".into(), FieldValue::Integer(((n * 7919) % 100_003) as i64));
    row.insert("owner".into(), format!("owner{}", n % 31).into());
    row.insert("members".into(), FieldValue::Integer((n % 9) as i64));
    row.insert("tags".into(), "alpha beta".into());
    let due = chrono::DateTime::from_timestamp(1_767_225_600 + (n as i64 * 3_607) % 31_536_000, 0).expect("due");
    row.insert("due".into(), due.into());
    row
}

fn to_row(item: &Item) -> Row {
    row_of(item.n)
}

/// Time spent in each call of the wrapped view.
#[derive(Default)]
struct Spent(Mutex<HashMap<&'static str, (u32, Duration)>>);

impl Spent {
    fn add(&self, what: &'static str, since: Instant) {
        let mut map = self.0.lock().expect("lock");
        let entry = map.entry(what).or_default();
        entry.0 += 1;
        entry.1 += since.elapsed();
    }
}

struct Timed {
    view: Arc<SqlView>,
    spent: Arc<Spent>,
}

#[async_trait]
impl ListView for Timed {
    fn schema(&self) -> &ViewSchema {
        self.view.schema()
    }
    async fn list(&self, query: &ListQuery) -> Result<Page, ViewError> {
        self.view.list(query).await
    }
    async fn position(&self) -> Result<Checkpoint, ViewError> {
        self.view.position().await
    }
}

#[async_trait]
impl ViewStore for Timed {
    async fn progress(&self, copy: ViewCopy) -> Result<Option<ViewProgress>, ViewError> {
        self.view.progress(copy).await
    }
    async fn states(&self, copy: ViewCopy, ids: &[String]) -> Result<HashMap<String, StoredState>, ViewError> {
        let t = Instant::now();
        let r = self.view.states(copy, ids).await;
        self.spent.add("states", t);
        r
    }
    async fn write(&self, copy: ViewCopy, changes: &[RowChange], checkpoint: &Checkpoint) -> Result<(), ViewError> {
        let t = Instant::now();
        let r = self.view.write(copy, changes, checkpoint).await;
        self.spent.add("write", t);
        r
    }
    async fn write_shadow_fenced(
        &self,
        new: Vec<RowChange>,
        known: Vec<RowChange>,
        checkpoint: &Checkpoint,
        lease: &Lease,
    ) -> Result<(), ViewError> {
        let t = Instant::now();
        let r = self.view.write_shadow_fenced(new, known, checkpoint, lease).await;
        self.spent.add("write", t);
        r
    }
    async fn begin_rebuild(&self) -> Result<(), ViewError> {
        let t = Instant::now();
        let r = self.view.begin_rebuild().await;
        self.spent.add("begin_rebuild", t);
        r
    }
    async fn swap(&self) -> Result<(), ViewError> {
        let t = Instant::now();
        let r = self.view.swap().await;
        self.spent.add("swap", t);
        r
    }
    async fn acquire_lease(&self, owner: &str, ttl: Duration) -> Result<Option<Lease>, ViewError> {
        self.view.acquire_lease(owner, ttl).await
    }
    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<bool, ViewError> {
        self.view.renew_lease(lease, ttl).await
    }
    async fn release_lease(&self, lease: &Lease) -> Result<(), ViewError> {
        self.view.release_lease(lease).await
    }
    async fn begin_rebuild_fenced(&self, lease: &Lease) -> Result<(), ViewError> {
        let t = Instant::now();
        let r = self.view.begin_rebuild_fenced(lease).await;
        self.spent.add("begin_rebuild", t);
        r
    }
    async fn prepare_swap(&self) -> Result<(), ViewError> {
        let t = Instant::now();
        let r = self.view.prepare_swap().await;
        self.spent.add("prepare_swap", t);
        r
    }
    async fn swap_fenced(&self, lease: &Lease) -> Result<(), ViewError> {
        let t = Instant::now();
        let r = self.view.swap_fenced(lease).await;
        self.spent.add("swap", t);
        r
    }
}

fn opt_text(row: &Row, key: &str) -> Option<String> {
    match row.get(key)? {
        FieldValue::Text(s) => Some(s.clone()),
        _ => None,
    }
}

fn opt_int(row: &Row, key: &str) -> Option<i64> {
    match row.get(key)? {
        FieldValue::Integer(i) => Some(*i),
        FieldValue::Timestamp(_) => row[key].as_micros(),
        _ => None,
    }
}

/// Seconds to create a table of the view's shape and indexes and insert
/// `rows` rows with `INSERT … SELECT FROM UNNEST`, 1000 rows a statement.
async fn raw_insert(pool: &sqlx::PgPool, rows: u64) -> f64 {
    let started = Instant::now();
    sqlx::query("DROP TABLE IF EXISTS raw_items").execute(pool).await.expect("drop");
    sqlx::query(
        "CREATE TABLE raw_items (id TEXT COLLATE \"C\" PRIMARY KEY, _version BIGINT NOT NULL, _state TEXT NOT NULL, \
         _live BOOLEAN NOT NULL, name TEXT COLLATE \"C\", description TEXT COLLATE \"C\", status TEXT COLLATE \"C\", \
         budget BIGINT, owner TEXT COLLATE \"C\", members BIGINT, tags TEXT COLLATE \"C\", due BIGINT, \
         _lc_name TEXT COLLATE \"C\", _lc_description TEXT COLLATE \"C\", _lc_owner TEXT COLLATE \"C\", \
         _lc_tags TEXT COLLATE \"C\")",
    )
    .execute(pool)
    .await
    .expect("create");
    for column in ["name", "status", "budget", "owner", "members", "due"] {
        sqlx::query(&format!("CREATE INDEX ON raw_items ({column}, id)")).execute(pool).await.expect("index");
    }
    let all: Vec<(String, String, Row)> =
        (0..rows).map(|n| (format!("i{n:07}"), serde_json::json!({ "n": n }).to_string(), row_of(n))).collect();
    for chunk in all.chunks(1000) {
        let col = |key: &str| chunk.iter().map(|r| opt_text(&r.2, key)).collect::<Vec<_>>();
        let int = |key: &str| chunk.iter().map(|r| opt_int(&r.2, key)).collect::<Vec<_>>();
        let lower = |v: &[Option<String>]| v.iter().map(|s| s.as_ref().map(|s| s.to_lowercase())).collect::<Vec<_>>();
        let (names, descriptions, owners, tags) = (col("name"), col("description"), col("owner"), col("tags"));
        sqlx::query(
            "INSERT INTO raw_items (id, _version, _state, _live, name, description, status, budget, owner, members, \
             tags, due, _lc_name, _lc_description, _lc_owner, _lc_tags) \
             SELECT id, 1, st, true, n, d, s, b, o, m, t, du, ln, ld, lo, lt FROM UNNEST($1::text[], $2::text[], \
             $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[], $8::bigint[], $9::text[], $10::bigint[], \
             $11::text[], $12::text[], $13::text[], $14::text[]) AS u(id, st, n, d, s, b, o, m, t, du, ln, ld, lo, lt)",
        )
        .bind(chunk.iter().map(|r| r.0.as_str()).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.1.as_str()).collect::<Vec<_>>())
        .bind(&names)
        .bind(&descriptions)
        .bind(col("status"))
        .bind(int("budget"))
        .bind(&owners)
        .bind(int("members"))
        .bind(&tags)
        .bind(int("due"))
        .bind(lower(&names))
        .bind(lower(&descriptions))
        .bind(lower(&owners))
        .bind(lower(&tags))
        .execute(pool)
        .await
        .expect("insert");
    }
    started.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measures for a while and prints figures"]
async fn postgres_rebuild_rate_against_a_raw_insert() {
    let rows: u64 = std::env::var("KES_BENCH_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(5_000);
    let rounds: usize = std::env::var("KES_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let pg_schema = common::fresh_pg_schema();
    let Some(view) = common::pg_in(&pg_schema, schema()).await else { return };
    let view = Arc::new(view);
    let spent = Arc::new(Spent::default());
    let timed: Arc<dyn ViewStore> = Arc::new(Timed { view: Arc::clone(&view), spent: Arc::clone(&spent) });
    let store = InMemoryStore::<Item>::new();
    for n in 0..rows {
        store
            .append(&format!("i{n:07}"), ExpectedVersion::NoStream, vec![Created { n }], Metadata::default())
            .await
            .expect("append");
    }
    let projection = Arc::new(ViewProjection::<Item>::new(timed, to_row));
    let runner = ProjectionRunner::new(
        store.clone(),
        vec![projection],
        RunnerConfig { batch_size: 512, retry_delay: Duration::from_millis(50), ..RunnerConfig::default() },
    );
    let raw = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(
            common::pg_url()
                .parse::<sqlx::postgres::PgConnectOptions>()
                .expect("url")
                .options([("search_path", &pg_schema)]),
        )
        .await
        .expect("connect");
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let report = runner.rebuild("items", &|_, _| {}).await.expect("rebuild");
        assert_eq!(report.events, rows);
        ours.push(rows as f64 / report.elapsed.as_secs_f64());
        theirs.push(rows as f64 / raw_insert(&raw, rows).await);
    }
    assert_eq!(view.list(&ListQuery::new()).await.expect("list").total, rows);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (ours, theirs) = (median(&mut ours), median(&mut theirs));
    println!("rows: {rows}, rounds: {rounds} (medians)");
    println!("view rebuild (in-memory log): {ours:.0} rows/s");
    println!("raw CREATE TABLE + INSERT … UNNEST: {theirs:.0} rows/s");
    println!("ratio: {:.2}", ours / theirs);
    let mut calls: Vec<_> = spent.0.lock().expect("lock").iter().map(|(w, c)| (*w, *c)).collect();
    calls.sort();
    for (what, (count, total)) in calls {
        println!("  {what}: {count} calls, {:.1} ms per rebuild", total.as_secs_f64() * 1e3 / rounds as f64);
    }
    view.close().await;
    raw.close().await;
    common::drop_pg_schema(&pg_schema).await;
}
