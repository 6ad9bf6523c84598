//! Indexing rate of the projection write path against raw Tantivy, the rate
//! of a `ProjectionRunner` rebuild against raw Tantivy, and the latency of a
//! `q` + filter + sort page. Prints figures; asserts nothing about speed.
//! Run with
//!
//! ```text
//! KES_BENCH_ROWS=100000 cargo test -p kes-view-search --release --test bench -- --ignored --nocapture
//! ```

use std::time::{Duration, Instant};

use kes_core::{
    Checkpoint, Field, FieldValue, FilterOp, ListQuery, ListView, Position, Row, RowChange, ViewCopy, ViewSchema,
    ViewStore,
};
use kes_view_search::{SearchView, index_document, index_schema};
use tantivy::{Index, IndexWriter, TantivyDocument};

const WORDS: [&str; 16] = [
    "alpha", "bridge", "harbour", "river", "station", "north", "south", "library", "tower", "garden", "market",
    "school", "canal", "museum", "depot", "plaza",
];
const STATUSES: [&str; 4] = ["active", "paused", "done", "draft"];

fn schema() -> ViewSchema {
    ViewSchema::new("projects", 1)
        .field(Field::text("name").filterable().sortable().searchable())
        .field(Field::keyword("status").filterable().sortable().searchable())
        .field(Field::integer("budget").filterable().sortable())
        .field(Field::float("score").filterable().sortable())
        .field(Field::bool("active").filterable())
        .field(Field::timestamp("created").filterable().sortable())
        .field(Field::text("notes"))
}

fn change(i: u64) -> RowChange {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut row = Row::new();
    let name = format!(
        "{} {} {} {i}",
        WORDS[(next() % 16) as usize],
        WORDS[(next() % 16) as usize],
        WORDS[(next() % 16) as usize]
    );
    row.insert("name".into(), name.into());
    row.insert("status".into(), STATUSES[(next() % 4) as usize].into());
    row.insert("budget".into(), ((next() % 1_000_000) as i64).into());
    row.insert("score".into(), ((next() % 10_000) as f64 / 100.0).into());
    row.insert("active".into(), (next() % 2 == 0).into());
    let micros = 1_700_000_000_000_000 + (next() % 100_000_000_000) as i64;
    row.insert("created".into(), FieldValue::timestamp(chrono::DateTime::from_timestamp_micros(micros).expect("time")));
    row.insert("notes".into(), "nothing to say".into());
    RowChange {
        id: format!("p{i:08}"),
        version: 1,
        state: kes_core::RowChange::state_of(&serde_json::json!({ "name": format!("project {i}"), "budget": i }))
            .expect("state JSON"),
        row: Some(row),
    }
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(times: &mut [Duration], p: f64) -> Duration {
    times.sort();
    times[((times.len() - 1) as f64 * p) as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --release --ignored --nocapture"]
async fn indexing_rate_and_query_latency() {
    let rows = env("KES_BENCH_ROWS", 100_000) as u64;
    let batch = env("KES_BENCH_BATCH", 1_000) as u64;
    let schema = schema();
    let tmp = tempfile::tempdir().expect("temp dir");
    let batches = || (0..rows).step_by(batch as usize).map(move |start| (start..(start + batch).min(rows)).map(change));

    // Raw Tantivy: the same documents (built outside the clock), added and
    // committed every `batch` rows (the same durability), one writer
    // thread with the same memory budget.
    let raw_dir = tmp.path().join("raw");
    std::fs::create_dir_all(&raw_dir).expect("dir");
    let index = Index::create_in_dir(&raw_dir, index_schema(&schema)).expect("raw index");
    kes_view_search::register_tokenizers(&index);
    let mut writer: IndexWriter = index.writer_with_num_threads(1, 50_000_000).expect("writer");
    let mut raw = Duration::ZERO;
    for chunk in batches() {
        let docs: Vec<TantivyDocument> = chunk.map(|c| index_document(&schema, &c).expect("document")).collect();
        let started = Instant::now();
        for doc in docs {
            writer.add_document(doc).expect("add");
        }
        writer.commit().expect("commit");
        raw += started.elapsed();
    }
    drop(writer);

    // The projection write path: RowChange batches (built outside the
    // clock) through `write`: documents, delete-by-id, commit with the
    // checkpoint payload, reader reload.
    let view = SearchView::open(tmp.path().join("view"), schema.clone()).expect("view");
    let mut ours = Duration::ZERO;
    for (n, chunk) in batches().enumerate() {
        let changes: Vec<RowChange> = chunk.collect();
        let mut checkpoint = Checkpoint::start();
        checkpoint.advance(Position::new(0, n as u64));
        let started = Instant::now();
        view.write(ViewCopy::Live, &changes, &checkpoint).await.expect("write");
        ours += started.elapsed();
    }
    let rate = |d: Duration| rows as f64 / d.as_secs_f64();
    println!(
        "indexing {rows} rows in batches of {batch}: write path {:.0} rows/s ({:.2?}), raw add_document+commit {:.0} rows/s ({:.2?}), ratio write/raw time {:.2}",
        rate(ours),
        ours,
        rate(raw),
        raw,
        ours.as_secs_f64() / raw.as_secs_f64()
    );
    assert_eq!(view.list(&ListQuery::new()).await.expect("list").total, rows);

    // Query latency: q + filter + sort, first page and a later page.
    let query = ListQuery::new()
        .search("harbour bridge")
        .filter("status", FilterOp::Eq, "active")
        .filter("budget", FilterOp::Gte, "100000")
        .sort_by("-budget")
        .page_size(20);
    let first = view.list(&query).await.expect("list");
    let later = query.clone().after(first.next.clone().expect("a second page"));
    for (label, q) in [("q+filter+sort, page 1", &query), ("q+filter+sort, page 2", &later)] {
        let mut times = Vec::new();
        for _ in 0..200 {
            let started = Instant::now();
            let page = view.list(q).await.expect("list");
            times.push(started.elapsed());
            assert_eq!(page.total, first.total);
        }
        println!(
            "{label} over {rows} rows ({} matches): median {:.2?}, p95 {:.2?}",
            first.total,
            percentile(&mut times, 0.5),
            percentile(&mut times, 0.95)
        );
    }
    let scan = ListQuery::new().sort_by("name").page_size(20);
    let mut times = Vec::new();
    for _ in 0..50 {
        let started = Instant::now();
        view.list(&scan).await.expect("list");
        times.push(started.elapsed());
    }
    println!(
        "no filter, sort by name (every row is a candidate): median {:.2?}, p95 {:.2?}",
        percentile(&mut times, 0.5),
        percentile(&mut times, 0.95)
    );
}

#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct Doc {
    n: u64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
struct Created {
    n: u64,
}

impl kes_core::DomainEvent for Created {
    fn event_type(&self) -> &'static str {
        "Created"
    }
}

impl kes_core::Aggregate for Doc {
    const NAME: &'static str = "doc";
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

/// A `ProjectionRunner` rebuild from an in-memory log (one event per
/// aggregate, batches of 512) against raw `add_document` of the same
/// documents and one commit, alternating, in the same run. Run with
///
/// ```text
/// KES_BENCH_ROWS=5000 cargo test -p kes-view-search --release --test bench rebuild -- --ignored --nocapture
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --release --ignored --nocapture"]
async fn rebuild_rate_against_raw_indexing() {
    use kes_core::{
        EventStore, ExpectedVersion, InMemoryStore, Metadata, ProjectionRunner, RunnerConfig, ViewProjection,
    };
    use std::sync::Arc;

    let rows = env("KES_BENCH_ROWS", 5_000) as u64;
    let rounds = env("KES_BENCH_ROUNDS", 5);
    let schema = schema();
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = InMemoryStore::<Doc>::new();
    for n in 0..rows {
        store
            .append(&change(n).id, ExpectedVersion::NoStream, vec![Created { n }], Metadata::default())
            .await
            .expect("append");
    }
    let view = Arc::new(SearchView::open(tmp.path().join("view"), schema.clone()).expect("view"));
    let projection = Arc::new(ViewProjection::<Doc>::new(view.clone(), |d: &Doc| change(d.n).row.unwrap_or_default()));
    let runner = ProjectionRunner::new(
        store,
        vec![projection],
        RunnerConfig { batch_size: 512, retry_delay: Duration::from_millis(50), ..RunnerConfig::default() },
    );
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let report = runner.rebuild("projects", &|_, _| {}).await.expect("rebuild");
        ours.push(rows as f64 / report.elapsed.as_secs_f64());
        let docs: Vec<TantivyDocument> = (0..rows)
            .map(|n| {
                let mut c = change(n);
                c.state = kes_core::RowChange::state_of(&serde_json::json!({ "n": n })).expect("state JSON");
                index_document(&schema, &c).expect("document")
            })
            .collect();
        let dir = tmp.path().join(format!("raw{round}"));
        let started = Instant::now();
        std::fs::create_dir_all(&dir).expect("dir");
        let index = Index::create_in_dir(&dir, index_schema(&schema)).expect("raw index");
        kes_view_search::register_tokenizers(&index);
        let mut writer: IndexWriter = index.writer_with_num_threads(1, 50_000_000).expect("writer");
        for doc in docs {
            writer.add_document(doc).expect("add");
        }
        writer.commit().expect("commit");
        raw.push(rows as f64 / started.elapsed().as_secs_f64());
    }
    assert_eq!(view.list(&ListQuery::new()).await.expect("list").total, rows);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (ours, raw) = (median(&mut ours), median(&mut raw));
    println!(
        "rebuild of {rows} rows (in-memory log, batches of 512): {ours:.0} rows/s; raw add_document + commit: \
         {raw:.0} rows/s; ratio {:.2} (medians of {rounds})",
        ours / raw
    );
}
