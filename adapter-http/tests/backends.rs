//! The essential routes on real stores and list views, not only on the
//! in-memory ones: writes, conflicts, idempotent retries, read-your-writes
//! on lists, history pages, deletes, and 503 while a broker is down. The
//! same cases run on SQLite, PostgreSQL and Kafka.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use kes_core::{CommandBus, EventStore, ProjectionRunner, RunnerConfig, ViewProjection, ViewStore};
use kes_http::{Api, HttpConfig};
use kes_store_kafka::{KafkaStore, KafkaStoreConfig};
use kes_store_sql::SqlStore;
use kes_view_sql::SqlView;
use serde_json::{Value, json};

type Store = Arc<dyn EventStore<Project>>;
type Runner = ProjectionRunner<Project, Store>;

/// The API over `store` and `view`, its projection running.
async fn api(store: Store, view: Arc<dyn ViewStore>) -> (axum::Router, Arc<Runner>) {
    let projection = ViewProjection::<Project>::new(Arc::clone(&view), row);
    let runner = ProjectionRunner::new(Arc::clone(&store), vec![Arc::new(projection)], RunnerConfig::default());
    runner.start().await.expect("projections start");
    let app = Api::new(HttpConfig::default())
        .mount(resource(), Arc::new(CommandBus::new(store)), view, runner.clone())
        .expect("mount")
        .projections(runner.clone())
        .into_router();
    (app, runner)
}

fn versions(body: &Value) -> Vec<u64> {
    body["items"].as_array().expect("items").iter().map(|e| e["version"].as_u64().expect("a version")).collect()
}

/// The cases every backend must answer alike.
async fn essential_routes(store: Store, view: Arc<dyn ViewStore>) {
    let (app, runner) = api(store, view).await;

    // Create, update, read.
    let (id, created) = create(&app, "Apollo", 5).await;
    assert_eq!(created.header("etag"), "\"1\"");
    let path = format!("/projects/{id}");
    let patched = send(&app, json("PATCH", &path, json!({ "budget": 7 }))).await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.body);
    assert_eq!(patched.header("etag"), "\"2\"");
    let read = send(&app, empty("GET", &path)).await;
    assert_eq!((read.body["name"].as_str(), read.body["budget"].as_i64()), (Some("Apollo"), Some(7)));

    // A stale If-Match is refused and appends nothing.
    let stale = send(&app, with_header(json("PATCH", &path, json!({ "budget": 9 })), "if-match", "\"1\"")).await;
    stale.assert_problem(412, "precondition-failed");
    assert_eq!(send(&app, empty("GET", &path)).await.header("etag"), "\"2\"");

    // An idempotent retry appends once and repeats the first answer.
    let keyed = || with_header(json("PATCH", &path, json!({ "name": "Artemis" })), "idempotency-key", "retry-1");
    let first = send(&app, keyed()).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    let again = send(&app, keyed()).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert_eq!((first.header("etag"), again.header("etag")), ("\"3\"", "\"3\""));
    assert_eq!(again.header("idempotent-replayed"), "true");

    // Concurrent writes without If-Match: every one lands, versions contiguous.
    let writes: Vec<_> = (0..12)
        .map(|i| {
            let (app, path) = (app.clone(), path.clone());
            tokio::spawn(async move { send(&app, json("PATCH", &path, json!({ "budget": 100 + i }))).await })
        })
        .collect();
    // The token of the write that landed last: the highest offset (one
    // aggregate lives in one partition).
    let mut last: Option<(u64, String)> = None;
    for w in writes {
        let reply = w.await.expect("a writer task");
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        let token = reply.header("kes-position").to_owned();
        let offset = token.rsplit(':').next().and_then(|o| o.parse::<u64>().ok()).expect("PARTITION:OFFSET");
        if last.as_ref().is_none_or(|(highest, _)| offset > *highest) {
            last = Some((offset, token));
        }
    }
    let (_, last) = last.expect("twelve writes");

    // Read-your-writes on the list, then the history in pages.
    let list = send(&app, with_header(empty("GET", "/projects?filter[name]=Artemis"), "kes-position", &last)).await;
    assert_eq!(list.header("kes-consistency"), "caught-up", "{}", list.body);
    assert_eq!(list.body["total"], 1);
    assert_eq!(list.body["items"][0]["version"], 15);
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = send(&app, empty("GET", &format!("{path}/events?page[size]=4&page[after]={after}"))).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        seen.extend(versions(&page.body));
        match page.body["next"].as_u64() {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(seen, (1..=15).collect::<Vec<_>>(), "every event once, in order");

    // Delete: 204, then 404 on reads; the history stays.
    let deleted = send(&app, empty("DELETE", &path)).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.body);
    send(&app, empty("GET", &path)).await.assert_problem(404, "not-found");
    let history = send(&app, empty("GET", &format!("{path}/events"))).await;
    assert_eq!(versions(&history.body).len(), 16);
    runner.shutdown().await;
}

fn sqlite_url(dir: &tempfile::TempDir, file: &str) -> String {
    format!("sqlite://{}", dir.path().join(file).display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn essential_routes_on_sqlite() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = SqlStore::<Project>::open(&sqlite_url(&dir, "events.db")).await.expect("a SQLite store");
    let view = SqlView::open(&sqlite_url(&dir, "views.db"), view_schema()).await.expect("a SQLite view");
    essential_routes(Arc::new(store), Arc::new(view)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn essential_routes_on_postgres() {
    let Some(url) = kes_test_support::fresh_postgres_database("http").await else { return };
    let store = SqlStore::<Project>::open(&url).await.expect("a PostgreSQL store");
    let view = SqlView::open(&url, view_schema()).await.expect("a PostgreSQL view");
    essential_routes(Arc::new(store), Arc::new(view)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn essential_routes_on_kafka() {
    let Some(brokers) = kes_test_support::kafka_brokers() else { return };
    let config = KafkaStoreConfig::new(brokers, kes_test_support::unique_prefix("http"));
    let store = KafkaStore::<Project>::open(config).await.expect("a Kafka store");
    let dir = tempfile::tempdir().expect("a temp dir");
    let view = SqlView::open(&sqlite_url(&dir, "views.db"), view_schema()).await.expect("a SQLite view");
    essential_routes(Arc::new(store), Arc::new(view)).await;
}

/// While the broker is down, a write answers 503 with `Retry-After` and a
/// problem body that names no internals; once it is back, the next write
/// lands at the next version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_is_503_then_writes_resume() {
    // Runs wherever broker tests run: it starts a broker of its own.
    let Some(own) = kes_test_support::OwnBroker::start() else { return };
    let mut config = KafkaStoreConfig::new(own.address(), kes_test_support::unique_prefix("outage"));
    config.request_timeout = Duration::from_secs(2);
    let store = KafkaStore::<Project>::open(config).await.expect("a Kafka store");
    let dir = tempfile::tempdir().expect("a temp dir");
    let view = SqlView::open(&sqlite_url(&dir, "views.db"), view_schema()).await.expect("a SQLite view");
    let (app, runner) = api(Arc::new(store), Arc::new(view)).await;
    let (id, _) = create(&app, "Outage", 1).await;
    let path = format!("/projects/{id}");

    own.down();
    let down = send(&app, json("PATCH", &path, json!({ "budget": 2 }))).await;
    down.assert_problem(503, "unavailable");
    assert_eq!(down.header("retry-after"), "1");
    let detail = down.body.to_string();
    assert!(!detail.contains("127.0.0.1") && !detail.contains("rdkafka"), "internals in the answer: {detail}");

    own.up();
    // The client retries as Retry-After says, until the broker serves again.
    let deadline = Instant::now() + Duration::from_secs(120);
    let reply = loop {
        let reply = send(&app, json("PATCH", &path, json!({ "budget": 2 }))).await;
        if reply.status != StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            break reply;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let history = send(&app, empty("GET", &format!("{path}/events"))).await;
    let budgets: Vec<Value> = history.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|e| e["type"] == "BudgetSet")
        .map(|e| e["payload"]["BudgetSet"]["budget"].clone())
        .collect();
    assert!(!budgets.is_empty(), "the write after the outage is in the history");
    assert!(budgets.iter().all(|b| b == 2), "only budget 2 was ever written");
    runner.shutdown().await;
}
