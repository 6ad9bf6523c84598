//! 100k rows on PostgreSQL: the planner uses the view's indexes, and (run
//! with `--ignored`) page latency and rebuild rate against a raw batched
//! INSERT of the same rows.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use kes_core::{
    Aggregate, Checkpoint, DomainEvent, EventStore, ExpectedVersion, Field, FieldValue, FilterOp, InMemoryStore,
    ListQuery, ListView, Metadata, Position, ProjectionRunner, Row, RowChange, RunnerConfig, ViewCopy, ViewError,
    ViewProjection, ViewSchema, ViewStore,
};
use kes_view_sql::SqlView;
use serde::{Deserialize, Serialize};

const ROWS: usize = 100_000;
const BATCH: usize = 512;
const STATUSES: [&str; 5] = ["open", "done", "late", "held", "gone"];

fn schema() -> ViewSchema {
    ViewSchema::new("tasks", 1)
        .field(Field::text("title").filterable().sortable().searchable())
        .field(Field::integer("budget").filterable().sortable())
        .field(Field::keyword("status").filterable().sortable())
        .field(Field::timestamp("due").filterable().sortable())
        .page_sizes(20, 100)
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Task {
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

impl Aggregate for Task {
    const NAME: &'static str = "task";
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

/// The row of task number `n`: every value derived from `n`, so the raw
/// insert, the direct load and the projection all write the same rows.
fn row_of(n: u64) -> Row {
    let mut row = Row::new();
    row.insert("title".into(), format!("Task {n:06} of project {}", n % 97).into());
    row.insert("budget".into(), FieldValue::Integer(((n * 7919) % 100_003) as i64));
    row.insert("status".into(), STATUSES[(n % 5) as usize].into());
    let due = Utc.timestamp_opt(1_767_225_600 + (n as i64 * 3_607) % 31_536_000, 0).single().expect("due date");
    row.insert("due".into(), due.into());
    row
}

fn id_of(n: u64) -> String {
    format!("t{n:06}")
}

fn to_row(task: &Task) -> Row {
    row_of(task.n)
}

/// The page the figures and the plan are about: a filter and a sort.
fn page_query() -> ListQuery {
    ListQuery::new().filter("status", FilterOp::Eq, "open").sort_by("budget").page_size(20)
}

/// Loads the rows through the view's own write path, into a shadow copy
/// that is then swapped in (the copy gets analysed on the way).
async fn load_directly(view: &SqlView) {
    view.begin_rebuild().await.expect("begin");
    let changes: Vec<RowChange> = (0..ROWS as u64)
        .map(|n| RowChange {
            id: id_of(n),
            version: 1,
            state: kes_core::RowChange::state_of(&serde_json::json!({ "n": n })).expect("state JSON"),
            row: Some(row_of(n)),
        })
        .collect();
    let mut checkpoint = Checkpoint::start();
    for chunk in changes.chunks(2_000) {
        checkpoint.set_next(0, checkpoint.next_offset(0) + chunk.len() as u64);
        view.write(ViewCopy::Shadow, chunk, &checkpoint).await.expect("write");
    }
    view.swap().await.expect("swap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_filtered_sorted_page_uses_an_index_at_100k_rows() {
    let pg_schema = common::fresh_pg_schema();
    let Some(view) = common::pg_in(&pg_schema, schema()).await else { return };
    load_directly(&view).await;
    let page = view.list(&page_query()).await.expect("list");
    assert_eq!(page.total, ROWS as u64 / 5);
    assert_eq!(page.items.len(), 20);
    let budgets: Vec<i64> = page
        .items
        .iter()
        .map(|i| match i.row["budget"] {
            FieldValue::Integer(b) => b,
            _ => panic!("budget is not an integer"),
        })
        .collect();
    assert!(budgets.windows(2).all(|w| w[0] <= w[1]), "not sorted: {budgets:?}");

    for query in [page_query(), page_query().after(page.next.expect("a second page"))] {
        let plan = view.explain(&query).await.expect("explain");
        let of_view = plan.split_whitespace().any(|word| word.starts_with("ix_") && word.ends_with("_tasks"));
        assert!(plan.contains("Index") && of_view, "no index of the view in the plan:\n{plan}");
        assert!(!plan.contains("Seq Scan"), "the plan scans the whole table:\n{plan}");
    }
    // The swap left planner statistics for the columns lists filter and
    // sort on. (Autovacuum may analyse the rest at any time, so their
    // absence is not asserted.)
    let pool = sqlx::PgPool::connect(&common::pg_url()).await.expect("connect");
    let analysed: Vec<String> = sqlx::query_scalar(
        "SELECT attname::text FROM pg_stats WHERE schemaname = $1 AND tablename = 'view_tasks' ORDER BY attname",
    )
    .bind(&pg_schema)
    .fetch_all(&pool)
    .await
    .expect("pg_stats");
    for column in ["_live", "budget", "due", "id", "status", "title"] {
        assert!(analysed.iter().any(|c| c == column), "no statistics for {column}: {analysed:?}");
    }
    pool.close().await;
    view.close().await;
    common::drop_pg_schema(&pg_schema).await;
}

/// A list query that no index serves (a full-text search and its total
/// over 100k rows) is cut off by the view's `list_timeout` and answered as
/// unavailable, instead of scanning for as long as it takes; the same
/// query within the default bound is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_list_queries_are_bounded_in_time() {
    let pg_schema = common::fresh_pg_schema();
    let Some(view) = common::pg_in(&pg_schema, schema()).await else { return };
    load_directly(&view).await;
    let config = kes_view_sql::SqlViewConfig::from_url(&common::pg_url())
        .schema(&pg_schema)
        .list_timeout(Duration::from_millis(1));
    let hasty = SqlView::open(config, schema()).await.expect("open");
    let scan = ListQuery::new().search("project").filter("budget", FilterOp::Ne, "3");
    match hasty.list(&scan).await {
        Err(ViewError::Unavailable(reason)) => assert!(reason.contains("statement timeout"), "{reason}"),
        other => panic!("a 1 ms bound let a 100k-row scan through: {:?}", other.map(|p| p.total)),
    }
    let page = view.list(&scan).await.expect("within the default bound");
    assert!(page.total > 0);
    hasty.close().await;
    view.close().await;
    common::drop_pg_schema(&pg_schema).await;
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Prints figures; run with
/// `CI=true cargo test -p kes-view-sql --all-features --test scale -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measures for a while and prints figures"]
async fn postgres_100k_figures() {
    let pg_schema = common::fresh_pg_schema();
    let Some(view) = common::pg_in(&pg_schema, schema()).await else { return };

    // Baseline: a raw batched INSERT of the same rows into a table of the
    // same shape and indexes, one transaction per batch like the projection.
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
    sqlx::query(
        "CREATE TABLE raw_tasks (id TEXT COLLATE \"C\" PRIMARY KEY, _version BIGINT NOT NULL, _state TEXT NOT NULL, \
         _live BOOLEAN NOT NULL, title TEXT COLLATE \"C\", budget BIGINT, status TEXT COLLATE \"C\", due BIGINT, \
         _lc_title TEXT COLLATE \"C\")",
    )
    .execute(&raw)
    .await
    .expect("create raw table");
    for col in ["title", "budget", "status", "due"] {
        sqlx::query(&format!("CREATE INDEX ON raw_tasks ({col}, id)")).execute(&raw).await.expect("index");
    }
    let started = Instant::now();
    for chunk in (0..ROWS as u64).collect::<Vec<_>>().chunks(BATCH) {
        let mut insert = sqlx::QueryBuilder::<sqlx::Postgres>::new(
            "INSERT INTO raw_tasks (id, _version, _state, _live, title, budget, status, due, _lc_title) ",
        );
        insert.push_values(chunk, |mut b, n| {
            let row = row_of(*n);
            let text = |f: &str| match &row[f] {
                FieldValue::Text(t) => t.clone(),
                _ => unreachable!("text field"),
            };
            let FieldValue::Integer(budget) = row["budget"] else { unreachable!("integer field") };
            b.push_bind(id_of(*n))
                .push_bind(1_i64)
                .push_bind(serde_json::json!({ "n": n }).to_string())
                .push_bind(true)
                .push_bind(text("title"))
                .push_bind(budget)
                .push_bind(text("status"))
                .push_bind(row["due"].as_micros())
                .push_bind(text("title").to_lowercase());
        });
        let mut tx = raw.begin().await.expect("begin");
        insert.build().execute(&mut *tx).await.expect("raw insert");
        tx.commit().await.expect("commit");
    }
    let raw_elapsed = started.elapsed();

    // The rebuild: ProjectionRunner over an in-memory log of one Created
    // event per task, into a shadow copy, then the swap.
    let store = InMemoryStore::<Task>::new();
    let mut last = Position::new(0, 0);
    for n in 0..ROWS as u64 {
        last = store
            .append(&id_of(n), ExpectedVersion::NoStream, vec![Created { n }], Metadata::default())
            .await
            .expect("append")
            .position;
    }
    let view = Arc::new(view);
    let projection = Arc::new(ViewProjection::<Task>::new(view.clone(), to_row));
    let runner = ProjectionRunner::new(
        store.clone(),
        vec![projection],
        RunnerConfig { batch_size: BATCH, retry_delay: Duration::from_millis(50), ..RunnerConfig::default() },
    );
    let report = runner.rebuild("tasks", &|_, _| {}).await.expect("rebuild");
    assert_eq!(report.events, ROWS as u64);
    assert!(view.position().await.expect("position").covers(last));

    // Page latency, first page and a deep keyset page.
    let first = view.list(&page_query()).await.expect("list");
    assert_eq!(first.total, ROWS as u64 / 5);
    let mut deep = page_query();
    for _ in 0..200 {
        let page = view.list(&deep).await.expect("list");
        deep = page_query().after(page.next.expect("next"));
    }
    let mut figures = Vec::new();
    for (label, query) in [("first page", page_query()), ("page 201", deep)] {
        let mut times = Vec::with_capacity(200);
        for _ in 0..200 {
            let t = Instant::now();
            view.list(&query).await.expect("list");
            times.push(t.elapsed());
        }
        times.sort();
        figures.push(format!(
            "{label}: median {:.2} ms, p95 {:.2} ms",
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            percentile(&times, 0.95).as_secs_f64() * 1e3
        ));
    }
    let raw_rate = ROWS as f64 / raw_elapsed.as_secs_f64();
    let rebuild_rate = ROWS as f64 / report.elapsed.as_secs_f64();
    println!("rows: {ROWS}, batch: {BATCH} per transaction");
    println!("raw batched INSERT: {raw_rate:.0} rows/s ({:.2} s)", raw_elapsed.as_secs_f64());
    println!(
        "view rebuild (ProjectionRunner, shadow + swap): {rebuild_rate:.0} rows/s ({:.2} s)",
        report.elapsed.as_secs_f64()
    );
    println!("rebuild / raw insert: {:.2}", rebuild_rate / raw_rate);
    println!("filter[status]=open&sort=budget&page[size]=20 (total {}):", first.total);
    for f in figures {
        println!("  {f}");
    }
    println!("plan:\n{}", view.explain(&page_query()).await.expect("explain"));
    view.close().await;
    raw.close().await;
    common::drop_pg_schema(&pg_schema).await;
}
