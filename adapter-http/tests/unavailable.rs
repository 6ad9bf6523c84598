//! Backends that fail: the client sees a clean problem with the right
//! status, never the backend's own words.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use http::StatusCode;
use kes_core::{
    Appended, Checkpoint, CommandBus, Envelope, EventStore, EventStream, ExpectedVersion, ListQuery, ListView,
    Metadata, Page, Position, ProjectionRunner, QueryError, RunnerConfig, Snapshot, StoreError, ViewError, ViewSchema,
};
use kes_http::{Api, HttpConfig};
use serde_json::json;

mockall::mock! {
    pub Store {}
    #[async_trait]
    impl EventStore<Project> for Store {
        async fn append(
            &self,
            id: &str,
            expected: ExpectedVersion,
            events: Vec<ProjectEvent>,
            metadata: Metadata,
        ) -> Result<Appended, StoreError>;
        async fn recall(&self, id: &str, idempotency_key: &str) -> Result<Option<Appended>, StoreError>;
        async fn load(&self, id: &str) -> Result<Option<Snapshot<Project>>, StoreError>;
        async fn read(&self, id: &str) -> Result<Vec<Envelope<ProjectEvent>>, StoreError>;
        async fn subscribe(&self, from: Checkpoint) -> Result<EventStream<ProjectEvent>, StoreError>;
        async fn head(&self) -> Result<Checkpoint, StoreError>;
        async fn ping(&self) -> Result<(), StoreError>;
    }
}

mockall::mock! {
    pub View {}
    #[async_trait]
    impl ListView for View {
        fn schema(&self) -> &ViewSchema;
        async fn list(&self, query: &ListQuery) -> Result<Page, ViewError>;
        async fn position(&self) -> Result<Checkpoint, ViewError>;
    }
}

const SECRET: &str = "connection refused by 10.1.2.3:5432 (pg_hba.conf)";

/// An API whose store is `store` (chosen at run time, as a trait object)
/// and whose list view is `view`.
fn app_with(store: MockStore, view: Arc<dyn ListView>, config: HttpConfig) -> axum::Router {
    let store: Arc<dyn EventStore<Project>> = Arc::new(store);
    let runner = ProjectionRunner::new(store.clone(), Vec::new(), RunnerConfig::default());
    Api::new(config).mount(resource(), Arc::new(CommandBus::new(store)), view, runner).expect("mount").into_router()
}

fn healthy_view() -> MockView {
    let mut view = MockView::new();
    view.expect_schema().return_const(view_schema());
    view.expect_position().returning(|| Ok(Checkpoint::start()));
    view
}

fn down_store() -> MockStore {
    let mut store = MockStore::new();
    store.expect_load().returning(|_| Err(StoreError::Unavailable(SECRET.into())));
    store.expect_read().returning(|_| Err(StoreError::Unavailable(SECRET.into())));
    store.expect_ping().returning(|| Err(StoreError::Unavailable(SECRET.into())));
    store.expect_append().never();
    store
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_is_down_gives_503_with_retry_after_and_no_detail() {
    let app = app_with(down_store(), Arc::new(healthy_view()), HttpConfig::default());
    for request in [
        empty("GET", "/projects/p-1"),
        json("PATCH", "/projects/p-1", json!({ "budget": 1 })),
        json("POST", "/projects", json!({ "name": "x" })),
        empty("GET", "/projects/p-1/events"),
    ] {
        let reply = send(&app, request).await;
        reply.assert_problem(503, "unavailable");
        assert_eq!(reply.header("retry-after"), "1");
        assert!(!reply.body.to_string().contains("10.1.2.3"), "{}", reply.body);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_is_503_when_the_store_is_down() {
    let app = app_with(down_store(), Arc::new(healthy_view()), HttpConfig::default());
    let reply = send(&app, empty("GET", "/health")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.header("retry-after"), "1");
    assert_eq!(reply.body["checks"], json!({ "projects.store": "down", "projects.view": "up" }));
    assert!(!reply.body.to_string().contains("10.1.2.3"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_view_that_is_down_gives_503_on_lists_and_health() {
    let mut view = MockView::new();
    view.expect_schema().return_const(view_schema());
    view.expect_list().returning(|_| Err(ViewError::Unavailable(SECRET.into())));
    view.expect_position().returning(|| Err(ViewError::Unavailable(SECRET.into())));
    let mut store = MockStore::new();
    store.expect_ping().returning(|| Ok(()));
    let app = app_with(store, Arc::new(view), HttpConfig::default());
    let reply = send(&app, empty("GET", "/projects")).await;
    reply.assert_problem(503, "unavailable");
    assert!(!reply.body.to_string().contains("pg_hba"));
    let health = send(&app, empty("GET", "/health")).await;
    assert_eq!(health.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health.body["checks"]["projects.view"], "down");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_search_the_backend_cannot_parse_is_400_invalid_search() {
    let mut view = healthy_view();
    view.expect_list().returning(|_| Err(ViewError::Query(QueryError::BadSearch("unbalanced quote".into()))));
    let app = app_with(MockStore::new(), Arc::new(view), HttpConfig::default());
    send(&app, empty("GET", "/projects?q=%22open")).await.assert_problem(400, "invalid-search");
}

/// Another process appends version 2 between this process's load and its
/// append. Without `If-Match` the command is decided again on version 2 and
/// lands (no 409 for a race the client never took part in); with
/// `If-Match: "1"` the log really moved past the client's version: 412.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_race_is_decided_again_without_if_match_and_412_with_it() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let mut store = MockStore::new();
    // The log's version: 1 until the other process's append lands.
    let log = Arc::new(AtomicU64::new(1));
    let at = |version: u64| Snapshot {
        state: Project { name: "p".into(), changes: version, ..Project::default() },
        version,
    };
    let (seen, first_load) = (Arc::clone(&log), Arc::new(std::sync::atomic::AtomicBool::new(true)));
    store.expect_load().returning(move |_| {
        // The first load of each command sees version 1 (a stale read).
        if first_load.swap(false, Ordering::SeqCst) {
            Ok(Some(at(1)))
        } else {
            Ok(Some(at(seen.load(Ordering::SeqCst))))
        }
    });
    store.expect_recall().returning(|_, _| Ok(None));
    let moved = Arc::clone(&log);
    store.expect_append().returning(move |id, expected, events, _| {
        // The other process's version 2 lands just before our first append.
        let actual = moved.fetch_max(2, Ordering::SeqCst).max(2);
        if expected != ExpectedVersion::Exact(actual) {
            return Err(StoreError::Conflict { aggregate: "project".into(), id: id.into(), expected, actual });
        }
        let version = actual + events.len() as u64;
        moved.store(version, Ordering::SeqCst);
        Ok(Appended { version, position: Position::new(0, version), deduplicated: false })
    });
    let app = app_with(store, Arc::new(healthy_view()), HttpConfig::default());
    let plain = send(&app, json("PATCH", "/projects/p-1", json!({ "budget": 1 }))).await;
    assert_eq!(plain.status, StatusCode::OK, "{}", plain.body);
    assert_eq!(plain.header("etag"), "\"3\"", "decided again on version 2");
    let with_if_match = with_header(json("PATCH", "/projects/p-1", json!({ "budget": 1 })), "if-match", "\"1\"");
    send(&app, with_if_match).await.assert_problem(412, "precondition-failed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_backend_is_500_without_its_message() {
    let mut store = MockStore::new();
    store.expect_load().returning(|_| Err(StoreError::Backend("syntax error at or near \"SELECT\"".into())));
    let app = app_with(store, Arc::new(healthy_view()), HttpConfig::default());
    let reply = send(&app, empty("GET", "/projects/p-1")).await;
    reply.assert_problem(500, "internal");
    assert!(!reply.body.to_string().contains("SELECT"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_answers_the_version_and_position_the_store_reports() {
    let mut store = MockStore::new();
    store.expect_load().returning(|_| Ok(None));
    store
        .expect_append()
        .withf(|_, expected, events, meta| {
            *expected == ExpectedVersion::Exact(0)
                && events.len() == 1
                && meta.principal.as_deref() == Some("anonymous")
        })
        .returning(|_, _, _, _| Ok(Appended { version: 1, position: Position::new(3, 41), deduplicated: false }));
    let app = app_with(store, Arc::new(healthy_view()), HttpConfig::default());
    // Without identities, a principal header is not believed.
    let reply = send(&app, with_header(json("POST", "/projects", json!({ "name": "k" })), "x-principal", "ann")).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert_eq!(reply.header("kes-position"), "project@3:41");
    assert_eq!(reply.header("etag"), "\"1\"");
}

/// A list view that takes longer than any request may.
struct SlowView(ViewSchema);

#[async_trait]
impl ListView for SlowView {
    fn schema(&self) -> &ViewSchema {
        &self.0
    }
    async fn list(&self, _: &ListQuery) -> Result<Page, ViewError> {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok(Page { items: Vec::new(), next: None, total: 0 })
    }
    async fn position(&self) -> Result<Checkpoint, ViewError> {
        Ok(Checkpoint::start())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_runs_out_of_time_is_503_timeout() {
    let config = HttpConfig { request_timeout: Duration::from_millis(100), ..HttpConfig::default() };
    let app = app_with(MockStore::new(), Arc::new(SlowView(view_schema())), config);
    let started = std::time::Instant::now();
    let reply = send(&app, empty("GET", "/projects")).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    reply.assert_problem(503, "timeout");
    assert_eq!(reply.header("retry-after"), "1");
}
