//! `GET /{plural}/{id}/events`: pages by version from the store, or from a
//! history view kept by a projection (then `KES-Position` waits for it).

mod common;

use std::sync::Arc;

use common::*;
use http::StatusCode;
use kes_core::{
    CommandBus, HistoryProjection, InMemoryStore, InMemoryView, ProjectionRunner, RunnerConfig, ViewHistory,
    ViewProjection, history_schema,
};
use kes_http::{Api, HttpConfig};
use serde_json::{Value, json};

/// Creates a project and renames it `renames` times; its id and the last
/// write's position.
async fn busy_project(app: &axum::Router, renames: usize) -> (String, String) {
    let (id, _) = create(app, "P", 1).await;
    let mut position = String::new();
    for i in 0..renames {
        let reply = send(app, json("PATCH", &format!("/projects/{id}"), json!({ "name": format!("n{i}") }))).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        position = reply.header("kes-position").to_owned();
    }
    (id, position)
}

fn versions(body: &Value) -> Vec<u64> {
    body["items"].as_array().expect("items").iter().map(|e| e["version"].as_u64().expect("a version")).collect()
}

/// Walks every page of `id`'s history `size` at a time: the versions seen.
async fn walk(app: &axum::Router, id: &str, size: u32, position: &str) -> Vec<u64> {
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let uri = format!("/projects/{id}/events?page[size]={size}&page[after]={after}");
        let reply = send(app, with_header(empty("GET", &uri), "kes-position", position)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert_eq!(reply.header("kes-consistency"), "caught-up");
        let page = versions(&reply.body);
        assert!(page.len() <= size as usize);
        seen.extend(&page);
        match reply.body["next"].as_u64() {
            Some(next) => {
                assert_eq!(Some(&next), page.last(), "next is the last version of the page");
                after = next;
            }
            None => return seen,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn history_from_the_store_comes_in_pages_by_version() {
    let h = harness().await;
    let (id, position) = busy_project(&h.app, 24).await;
    let whole = send(&h.app, empty("GET", &format!("/projects/{id}/events"))).await;
    assert_eq!(versions(&whole.body), (1..=25).collect::<Vec<_>>());
    assert_eq!(whole.body["next"], Value::Null, "one page holds it all by default");
    assert_eq!(whole.header("kes-consistency"), "caught-up", "the store is the log");
    assert_eq!(walk(&h.app, &id, 7, &position).await, (1..=25).collect::<Vec<_>>());
    let page = send(&h.app, empty("GET", &format!("/projects/{id}/events?page[after]=20&page[size]=3"))).await;
    assert_eq!(versions(&page.body), [21, 22, 23]);
    assert_eq!(page.body["next"], 23);
    let past = send(&h.app, empty("GET", &format!("/projects/{id}/events?page[after]=25"))).await;
    assert_eq!(past.status, StatusCode::OK, "after the end of an existing history: an empty page");
    assert_eq!(versions(&past.body), Vec::<u64>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_paging_parameters_are_400_and_change_nothing() {
    let h = harness().await;
    let (id, _) = busy_project(&h.app, 1).await;
    for query in [
        "page[size]=0",
        "page[size]=10001",
        "page[size]=ten",
        "page[after]=-1",
        "page[after]=1.5",
        "page[after]=99999999999999999999999",
        "sort=-version",
        "page%5Bsize",
    ] {
        let reply = send(&h.app, empty("GET", &format!("/projects/{id}/events?{query}"))).await;
        reply.assert_problem(400, "invalid-query");
    }
    let whole = send(&h.app, empty("GET", &format!("/projects/{id}/events"))).await;
    assert_eq!(versions(&whole.body), [1, 2]);
    send(&h.app, empty("GET", "/projects/nope/events?page[size]=5")).await.assert_problem(404, "not-found");
}

/// A mount whose history comes from a history view fed by the runner.
async fn with_history_view(start: bool) -> (axum::Router, Arc<ProjectionRunner<Project, InMemoryStore<Project>>>) {
    let store = InMemoryStore::<Project>::new();
    let view = Arc::new(InMemoryView::new(view_schema()).expect("valid schema"));
    let history = Arc::new(InMemoryView::new(history_schema("project")).expect("the history schema"));
    let runner = ProjectionRunner::new(
        store.clone(),
        vec![
            Arc::new(ViewProjection::<Project>::new(view.clone(), row)),
            Arc::new(HistoryProjection::<Project>::new(history.clone()).expect("a history projection")),
        ],
        RunnerConfig::default(),
    );
    if start {
        runner.start().await.expect("projections start");
    }
    let app = Api::new(HttpConfig::default())
        .mount(resource(), Arc::new(CommandBus::new(store)), view, runner.clone())
        .expect("mount")
        .history("projects", Arc::new(ViewHistory::new::<Project>(history)))
        .expect("a history for a mounted resource")
        .into_router();
    (app, runner)
}

#[tokio::test(flavor = "multi_thread")]
async fn history_from_a_history_view_waits_for_a_position_token() {
    let (app, _runner) = with_history_view(true).await;
    let (id, position) = busy_project(&app, 30).await;
    assert_eq!(walk(&app, &id, 4, &position).await, (1..=31).collect::<Vec<_>>());
    let reply =
        send(&app, with_header(empty("GET", &format!("/projects/{id}/events")), "kes-position", &position)).await;
    assert_eq!(reply.header("kes-consistency"), "caught-up");
    let first = &reply.body["items"][0];
    assert_eq!(first["type"], "ProjectCreated");
    assert_eq!(first["payload"], json!({ "Created": { "name": "P", "budget": 1 } }));
    assert_eq!(first["position"], "0:0");
    let untokened = send(&app, empty("GET", &format!("/projects/{id}/events"))).await;
    assert_eq!(untokened.header("kes-consistency"), "eventual", "without a token the view says it may lag");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_history_view_that_lags_says_stale() {
    // The runner is never started: the history view stays empty.
    let (app, _runner) = with_history_view(false).await;
    let (id, position) = busy_project(&app, 1).await;
    let config = HttpConfig::default();
    let started = std::time::Instant::now();
    let reply =
        send(&app, with_header(empty("GET", &format!("/projects/{id}/events")), "kes-position", &position)).await;
    assert!(started.elapsed() >= config.consistency_timeout, "the read waited for the view");
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.body);
    assert_eq!(reply.header("kes-consistency"), "stale");
}

#[test]
fn a_history_needs_a_mounted_resource() {
    let error = Api::new(HttpConfig::default())
        .history(
            "projects",
            Arc::new(ViewHistory::new::<Project>(Arc::new(InMemoryView::new(history_schema("project")).unwrap()))),
        )
        .expect_err("nothing is mounted under /projects");
    assert!(error.to_string().contains("/projects"), "{error}");
}
