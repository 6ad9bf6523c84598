//! Every route and every error status, through `oneshot` (no server).

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use common::*;
use http::{Request, StatusCode};
use kes_core::{EventStore, ListView};
use kes_http::{HttpConfig, IdStrategy};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn create_answers_201_with_location_etag_position_and_state() {
    let h = harness().await;
    let (id, reply) = create(&h.app, "Apollo", 10).await;
    assert!(uuid::Uuid::parse_str(&id).is_ok_and(|u| u.get_version_num() == 7), "{id}");
    assert_eq!(reply.header("etag"), "\"1\"");
    assert_eq!(reply.header("kes-position"), "project@0:0");
    assert_eq!(reply.body["name"], "Apollo");
    assert_eq!(reply.body["budget"], 10);
    let stored = h.store.load(&id).await.unwrap().unwrap();
    assert_eq!((stored.version, stored.state.name.as_str()), (1, "Apollo"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_post_without_content_type_creates_an_unnamed_draft_even_with_a_trailing_slash() {
    let h = harness().await;
    // `curl -X POST http://localhost:8080/projects/`
    let reply = send(&h.app, empty("POST", "/projects/")).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert_eq!(reply.body["name"], "");
    let location = reply.header("location").to_owned();
    let fetched = send(&h.app, empty("GET", &format!("{location}/"))).await;
    assert_eq!(fetched.status, StatusCode::OK);
    assert_eq!(fetched.header("etag"), "\"1\"");
}

#[tokio::test(flavor = "multi_thread")]
async fn form_bodies_are_read_and_numbers_given_as_text_are_numbers() {
    let h = harness().await;
    // `curl -d name=x -d budget=12 http://localhost:8080/projects`
    let request = Request::post("/projects")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from("name=Gemini+2&budget=12"))
        .unwrap();
    let reply = send(&h.app, request).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert_eq!(
        reply.body,
        json!({ "name": "Gemini 2", "budget": 12, "archived": false, "deleted": false, "changes": 1 })
    );
    let bad = Request::post("/projects")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from("budget=twelve"))
        .unwrap();
    send(&h.app, bad).await.assert_problem(400, "malformed-body");
}

#[tokio::test(flavor = "multi_thread")]
async fn get_by_id_answers_with_etag_and_304_when_unchanged() {
    let h = harness().await;
    let (id, _) = create(&h.app, "Mercury", 1).await;
    let reply = send(&h.app, empty("GET", &format!("/projects/{id}"))).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("etag"), "\"1\"");
    assert_eq!(reply.body["name"], "Mercury");
    let cached = send(&h.app, with_header(empty("GET", &format!("/projects/{id}")), "if-none-match", "\"1\"")).await;
    assert_eq!(cached.status, StatusCode::NOT_MODIFIED);
    assert_eq!(cached.header("etag"), "\"1\"");
    let older =
        send(&h.app, with_header(empty("GET", &format!("/projects/{id}")), "if-none-match", "\"0\", W/\"7\"")).await;
    assert_eq!(older.status, StatusCode::OK);
}

/// `/projects/changes` is the list's change feed, so no aggregate may
/// take the id `changes`: `GET /projects/{id}` could never reach it. An id
/// strategy that makes it is a server error and writes nothing; the other
/// routes of an id refuse it as they refuse any malformed id.
#[tokio::test(flavor = "multi_thread")]
async fn the_id_changes_is_refused_since_it_is_the_change_feeds_path() {
    let h = build(HttpConfig::default(), true, IdStrategy::Custom(Arc::new(|| "changes".to_owned()))).await;
    send(&h.app, json("POST", "/projects", json!({ "name": "Feed" }))).await.assert_problem(500, "internal");
    assert!(h.store.read("changes").await.unwrap().is_empty(), "nothing was appended");
    send(&h.app, empty("GET", "/projects/changes/events")).await.assert_problem(400, "bad-request");
    send(&h.app, empty("GET", "/projects/changes/changes")).await.assert_problem(400, "bad-request");
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_ids_and_routes_are_404_problems() {
    let h = harness().await;
    send(&h.app, empty("GET", "/projects/nope")).await.assert_problem(404, "not-found");
    send(&h.app, empty("GET", "/projects/nope/events")).await.assert_problem(404, "not-found");
    send(&h.app, empty("GET", "/nothing-here")).await.assert_problem(404, "not-found");
    // Updates need an existing aggregate when no If-Match is sent.
    send(&h.app, json("PATCH", "/projects/nope", json!({ "budget": 1 }))).await.assert_problem(404, "not-found");
    assert!(h.store.read("nope").await.unwrap().is_empty(), "nothing was appended");
}

#[tokio::test(flavor = "multi_thread")]
async fn put_replaces_and_answers_the_new_etag_and_position() {
    let h = harness().await;
    let (id, _) = create(&h.app, "Old", 1).await;
    let reply = send(&h.app, json("PUT", &format!("/projects/{id}"), json!({ "name": "New", "budget": 2 }))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.header("etag"), "\"2\"");
    assert_eq!(reply.header("kes-position"), "project@0:1");
    assert_eq!((reply.body["name"].as_str(), reply.body["budget"].as_i64()), (Some("New"), Some(2)));
    // A replace needs every field.
    send(&h.app, json("PUT", &format!("/projects/{id}"), json!({ "name": "x" })))
        .await
        .assert_problem(400, "malformed-body");
}

#[tokio::test(flavor = "multi_thread")]
async fn patch_with_a_current_if_match_succeeds_and_a_stale_one_is_412_and_appends_nothing() {
    let h = harness().await;
    let (id, _) = create(&h.app, "P", 1).await;
    let ok = send(
        &h.app,
        with_header(json("PATCH", &format!("/projects/{id}"), json!({ "budget": 5 })), "if-match", "\"1\""),
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    assert_eq!(ok.header("etag"), "\"2\"");
    let stale = send(
        &h.app,
        with_header(json("PATCH", &format!("/projects/{id}"), json!({ "budget": 9 })), "if-match", "\"1\""),
    )
    .await;
    stale.assert_problem(412, "precondition-failed");
    assert_eq!(stale.header("etag"), "\"2\"", "a 412 names the version to re-read");
    let history = h.store.read(&id).await.unwrap();
    assert_eq!(history.len(), 2, "the stale write appended nothing");
    assert_eq!(h.store.load(&id).await.unwrap().unwrap().state.budget, 5);
    // `*` only asks for existence.
    let any = send(&h.app, with_header(json("PATCH", &format!("/projects/{id}"), json!({})), "if-match", "*")).await;
    assert_eq!(any.header("etag"), "\"3\"");
}

#[tokio::test(flavor = "multi_thread")]
async fn unreadable_headers_are_400_invalid_header() {
    let h = harness().await;
    let (id, _) = create(&h.app, "P", 1).await;
    for bad in ["\"abc\"", "W/\"1\"", "\"0\"", "\"1\", \"2\""] {
        let reply =
            send(&h.app, with_header(json("PATCH", &format!("/projects/{id}"), json!({})), "if-match", bad)).await;
        reply.assert_problem(400, "invalid-header");
    }
    let reply = send(&h.app, with_header(empty("GET", "/projects"), "kes-position", "yesterday")).await;
    reply.assert_problem(400, "invalid-header");
    let long_key = "k".repeat(300);
    let reply =
        send(&h.app, with_header(json("PATCH", &format!("/projects/{id}"), json!({})), "idempotency-key", &long_key))
            .await;
    reply.assert_problem(400, "invalid-header");
    assert_eq!(h.store.read(&id).await.unwrap().len(), 1, "no refused request appended anything");
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_answers_204_then_reads_are_404_but_the_history_stays() {
    let h = harness().await;
    let (id, _) = create(&h.app, "Doomed", 1).await;
    let reply = send(&h.app, empty("DELETE", &format!("/projects/{id}"))).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.body);
    assert_eq!(reply.header("etag"), "\"2\"");
    let position = reply.header("kes-position").to_owned();
    send(&h.app, empty("GET", &format!("/projects/{id}"))).await.assert_problem(404, "not-found");
    send(&h.app, empty("DELETE", &format!("/projects/{id}"))).await.assert_problem(404, "not-found");
    let list = send(&h.app, with_header(empty("GET", "/projects"), "kes-position", &position)).await;
    assert_eq!(list.body["total"], 0, "the row left the list: {}", list.body);
    let history = send(&h.app, empty("GET", &format!("/projects/{id}/events"))).await;
    assert_eq!(history.status, StatusCode::OK);
    let types: Vec<&str> =
        history.body["items"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["ProjectCreated", "ProjectDeleted"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn named_commands_run_and_unknown_ones_are_404() {
    let h = harness().await;
    let (id, _) = create(&h.app, "A", 1).await;
    let reply = send(&h.app, json("POST", &format!("/projects/{id}/archive"), json!({ "reason": "done" }))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["archived"], true);
    assert_eq!(reply.header("etag"), "\"2\"");
    send(&h.app, json("POST", &format!("/projects/{id}/launch"), json!({}))).await.assert_problem(404, "not-found");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_business_rule_is_422_with_the_domain_message() {
    let h = harness().await;
    let reply = send(&h.app, json("POST", "/projects", json!({ "name": "x", "budget": -1 }))).await;
    reply.assert_problem(422, "rejected");
    assert_eq!(reply.body["detail"], "a budget cannot be negative");
    let (id, _) = create(&h.app, "A", 1).await;
    send(&h.app, json("POST", &format!("/projects/{id}/archive"), json!({}))).await;
    let reply = send(&h.app, json("PATCH", &format!("/projects/{id}"), json!({ "name": "y" }))).await;
    reply.assert_problem(422, "rejected");
    assert_eq!(reply.body["detail"], "an archived project cannot change");
    assert_eq!(h.store.read(&id).await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_idempotency_key_twice_appends_once_and_replays_the_first_answer() {
    let h = harness().await;
    let (id, _) = create(&h.app, "I", 1).await;
    let request =
        || with_header(json("PATCH", &format!("/projects/{id}"), json!({ "budget": 7 })), "idempotency-key", "k-1");
    let first = send(&h.app, request()).await;
    let second = send(&h.app, request()).await;
    assert_eq!((first.status, second.status), (StatusCode::OK, StatusCode::OK));
    assert_eq!(first.header("etag"), second.header("etag"));
    assert_eq!(first.header("kes-position"), second.header("kes-position"));
    assert_eq!(second.header("idempotent-replayed"), "true");
    assert_eq!(first.header("idempotent-replayed"), "");
    assert_eq!(h.store.read(&id).await.unwrap().len(), 2, "create + one patch");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_create_with_an_idempotency_key_reaches_the_same_aggregate() {
    let h = build_with(HttpConfig::default(), true, resource(), |api| {
        api.trust_principal_header(http::HeaderName::from_static("x-principal"))
    })
    .await;
    let request = || with_header(json("POST", "/projects", json!({ "name": "Once" })), "idempotency-key", "create-1");
    let first = send(&h.app, request()).await;
    let second = send(&h.app, request()).await;
    assert_eq!((first.status, second.status), (StatusCode::CREATED, StatusCode::CREATED), "{}", second.body);
    assert_eq!(first.header("location"), second.header("location"));
    assert_eq!(second.header("idempotent-replayed"), "true");
    let id = first.header("location").trim_start_matches("/projects/").to_owned();
    assert_eq!(h.store.read(&id).await.unwrap().len(), 1);
    let other = send(&h.app, with_header(request(), "x-principal", "someone-else")).await;
    assert_ne!(other.header("location"), first.header("location"), "keys are scoped by principal");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_create_on_a_taken_id_is_409_conflict() {
    let h = build(HttpConfig::default(), true, IdStrategy::Custom(Arc::new(|| "fixed".to_owned()))).await;
    let (id, _) = create(&h.app, "First", 1).await;
    assert_eq!(id, "fixed");
    let reply = send(&h.app, json("POST", "/projects", json!({ "name": "Second" }))).await;
    reply.assert_problem(409, "conflict");
    assert_eq!(h.store.load("fixed").await.unwrap().unwrap().state.name, "First");
}

#[tokio::test(flavor = "multi_thread")]
async fn list_filters_sorts_and_pages_with_cursors() {
    let h = harness().await;
    let mut position = String::new();
    for (name, budget) in [("alpha", 5), ("beta", 50), ("gamma", 500), ("delta", 5000), ("epsilon", 7)] {
        position = create(&h.app, name, budget).await.1.header("kes-position").to_owned();
    }
    let uri = "/projects?filter[budget][gte]=6&sort=-budget&page[size]=2";
    let first = send(&h.app, with_header(empty("GET", uri), "kes-position", &position)).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(first.header("kes-consistency"), "caught-up");
    assert_eq!(first.body["total"], 4);
    let names = |page: &Value| -> Vec<String> {
        page["items"].as_array().unwrap().iter().map(|i| i["row"]["name"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(names(&first.body), ["delta", "gamma"]);
    assert_eq!(first.body["items"][0]["version"], 1);
    let cursor = first.body["next"].as_str().unwrap().to_owned();
    let second = send(&h.app, empty("GET", &format!("{uri}&page[after]={cursor}"))).await;
    assert_eq!(names(&second.body), ["beta", "epsilon"]);
    assert_eq!(second.body["next"], Value::Null);
    let searched = send(&h.app, empty("GET", "/projects?q=ALPH")).await;
    assert_eq!(names(&searched.body), ["alpha"]);
    let in_list = send(&h.app, empty("GET", "/projects/?filter[name][in]=beta,gamma&sort=name")).await;
    assert_eq!(names(&in_list.body), ["beta", "gamma"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_list_read_without_a_token_says_it_is_eventual() {
    let h = harness().await;
    let reply = send(&h.app, empty("GET", "/projects")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("kes-consistency"), "eventual");
    assert_eq!(reply.body, json!({ "items": [], "next": null, "total": 0 }));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_list_read_whose_views_do_not_catch_up_in_time_answers_stale() {
    let config = HttpConfig { consistency_timeout: Duration::from_millis(100), ..HttpConfig::default() };
    let h = build(config, false, IdStrategy::default()).await;
    let (_, created) = create(&h.app, "Late", 1).await;
    let started = std::time::Instant::now();
    let reply =
        send(&h.app, with_header(empty("GET", "/projects"), "kes-position", created.header("kes-position"))).await;
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("kes-consistency"), "stale");
    assert_eq!(reply.body["total"], 0, "what the view had");
    // Once the projections run, the same token is reached.
    h.runner.start().await.unwrap();
    let reply =
        send(&h.app, with_header(empty("GET", "/projects"), "kes-position", created.header("kes-position"))).await;
    assert_eq!(reply.header("kes-consistency"), "caught-up");
    assert_eq!(reply.body["total"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn list_query_errors_have_their_own_problem_types() {
    let h = harness().await;
    send(&h.app, empty("GET", "/projects?filter[colour]=red")).await.assert_problem(400, "invalid-query");
    send(&h.app, empty("GET", "/projects?filter[budget]=lots")).await.assert_problem(400, "invalid-query");
    send(&h.app, empty("GET", "/projects?sort=archived")).await.assert_problem(400, "invalid-query");
    send(&h.app, empty("GET", "/projects?page[size]=1000")).await.assert_problem(400, "invalid-query");
    send(&h.app, empty("GET", "/projects?limit=3")).await.assert_problem(400, "invalid-query");
    send(&h.app, empty("GET", "/projects?filter[budget][near]=3")).await.assert_problem(400, "invalid-query");
    send(&h.app, empty("GET", "/projects?page[after]=bm90LWEtY3Vyc29y")).await.assert_problem(422, "invalid-cursor");
    send(&h.app, empty("GET", "/projects?page[after]=%%%")).await.assert_problem(422, "invalid-cursor");
    let long = "x".repeat(300);
    send(&h.app, empty("GET", &format!("/projects?q={long}"))).await.assert_problem(400, "invalid-search");
    send(&h.app, empty("GET", "/projects?q=a%00b")).await.assert_problem(400, "invalid-search");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cursor_of_another_sort_is_refused() {
    let h = harness().await;
    let mut position = String::new();
    for n in 0..3 {
        position = create(&h.app, &format!("p{n}"), n).await.1.header("kes-position").to_owned();
    }
    let page =
        send(&h.app, with_header(empty("GET", "/projects?sort=budget&page[size]=1"), "kes-position", &position)).await;
    let cursor = page.body["next"].as_str().unwrap().to_owned();
    let reply = send(&h.app, empty("GET", &format!("/projects?sort=-name&page[after]={cursor}"))).await;
    reply.assert_problem(422, "invalid-cursor");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_json_is_400_and_a_wrong_media_type_415() {
    let h = harness().await;
    let bad =
        Request::post("/projects").header("content-type", "application/json").body(Body::from("{\"name\": ")).unwrap();
    send(&h.app, bad).await.assert_problem(400, "malformed-body");
    let wrong_shape = json("POST", "/projects", json!({ "name": 42 }));
    send(&h.app, wrong_shape).await.assert_problem(400, "malformed-body");
    let xml = Request::post("/projects").header("content-type", "application/xml").body(Body::from("<p/>")).unwrap();
    send(&h.app, xml).await.assert_problem(415, "unsupported-media-type");
    assert_eq!(h.store.head().await.unwrap().lag_behind(&kes_core::Checkpoint::start()), 0, "nothing appended");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_body_is_413() {
    let config = HttpConfig { body_limit: 64, ..HttpConfig::default() };
    let h = build(config, true, IdStrategy::default()).await;
    let big = json!({ "name": "x".repeat(200) });
    send(&h.app, json("POST", "/projects", big.clone())).await.assert_problem(413, "payload-too-large");
    // Without a Content-Length (a streamed body) the limit holds too.
    let chunks = futures::stream::iter(vec![Ok::<_, std::io::Error>(big.to_string().into_bytes())]);
    let streamed =
        Request::post("/projects").header("content-type", "application/json").body(Body::from_stream(chunks)).unwrap();
    send(&h.app, streamed).await.assert_problem(413, "payload-too-large");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_method_the_route_lacks_is_405() {
    let h = harness().await;
    let reply = send(&h.app, empty("PUT", "/projects")).await;
    reply.assert_problem(405, "method-not-allowed");
    assert!(reply.header("allow").contains("GET"), "{:?}", reply.headers);
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_without_an_id_get_a_fresh_one_and_no_cors_headers_by_default() {
    let h = harness().await;
    let first = send(&h.app, empty("GET", "/projects")).await;
    let second = send(&h.app, empty("GET", "/projects")).await;
    let (a, b) = (first.header("x-request-id"), second.header("x-request-id"));
    assert!(!a.is_empty() && !b.is_empty(), "{:?}", first.headers);
    assert_ne!(a, b, "each request gets its own id");
    assert_eq!(first.header("access-control-allow-origin"), "", "no origin is allowed unless configured");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_made_request_id_is_recorded_by_writes_and_echoed_by_reads() {
    let h = harness().await;
    let created = send(&h.app, json("POST", "/projects", json!({ "name": "Traced" }))).await;
    let made = created.header("x-request-id").to_owned();
    assert!(!made.is_empty(), "{:?}", created.headers);
    let id = created.header("location").trim_start_matches("/projects/").to_owned();
    let read = send(&h.app, empty("GET", &format!("/projects/{id}"))).await;
    let read_id = read.header("x-request-id");
    assert!(!read_id.is_empty() && read_id != made, "a read gets an id of its own: {read_id:?}");
    let history = send(&h.app, empty("GET", &format!("/projects/{id}/events"))).await;
    assert_eq!(history.body["items"][0]["metadata"]["correlation_id"], json!(made), "the write saw the made id");
    assert_eq!(history.body["items"][0]["metadata"]["extra"]["request_id"], json!(made));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_history_carries_versions_types_times_and_metadata() {
    let h = build_with(HttpConfig::default(), true, resource(), |api| {
        api.trust_principal_header(http::HeaderName::from_static("x-principal"))
    })
    .await;
    let request = with_header(
        with_header(json("POST", "/projects", json!({ "name": "Audited" })), "x-principal", "ann"),
        "x-request-id",
        "req-1",
    );
    let created = send(&h.app, request).await;
    assert_eq!(created.header("x-request-id"), "req-1", "the request id is echoed");
    let id = created.header("location").trim_start_matches("/projects/").to_owned();
    let patch = with_header(
        with_header(json("PATCH", &format!("/projects/{id}"), json!({ "budget": 3 })), "x-correlation-id", "flow-9"),
        "idempotency-key",
        "key-1",
    );
    send(&h.app, patch).await;
    let history = send(&h.app, empty("GET", &format!("/projects/{id}/events"))).await;
    assert_eq!(history.status, StatusCode::OK);
    let items = history.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["version"], 1);
    assert_eq!(items[0]["type"], "ProjectCreated");
    assert_eq!(items[0]["payload"], json!({ "Created": { "name": "Audited", "budget": 0 } }));
    assert_eq!(items[0]["metadata"]["principal"], "ann");
    assert_eq!(items[0]["metadata"]["correlation_id"], "req-1", "the request id stands in for a correlation id");
    assert!(items[0]["recorded_at"].as_str().is_some_and(|t| t.contains('T')));
    assert_eq!(items[1]["version"], 2);
    assert_eq!(items[1]["metadata"]["correlation_id"], "flow-9");
    // The key is kept as its digest, never as sent (an anonymous caller:
    // the key alone).
    assert_eq!(items[1]["metadata"]["idempotency_key"], stored_key("key-1"));
    assert!(
        items[1]["metadata"]["extra"]["request_id"].as_str().is_some_and(|r| !r.is_empty()),
        "a request id was made"
    );
    assert_eq!(items[1]["position"], "0:1");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_concurrent_patches_end_at_version_1001() {
    let h = harness().await;
    let (id, _) = create(&h.app, "Busy", 0).await;
    let tasks: Vec<_> = (0..1000)
        .map(|n| {
            let app = h.app.clone();
            let uri = format!("/projects/{id}");
            tokio::spawn(async move { send(&app, json("PATCH", &uri, json!({ "budget": n }))).await.status })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    let history = h.store.read(&id).await.unwrap();
    assert_eq!(history.len(), 1001);
    assert!(history.iter().enumerate().all(|(i, e)| e.version == i as u64 + 1), "contiguous versions");
    let reply = send(&h.app, empty("GET", &format!("/projects/{id}"))).await;
    assert_eq!(reply.header("etag"), "\"1001\"");
    assert_eq!(reply.body["changes"], 1001);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_handler_is_a_500_without_its_message_and_the_service_goes_on() {
    let h = harness().await;
    let (id, _) = create(&h.app, "Stable", 1).await;
    let reply = send(&h.app, json("POST", &format!("/projects/{id}/explode"), json!({}))).await;
    reply.assert_problem(500, "internal");
    assert!(!reply.body.to_string().contains("secret detail"), "{}", reply.body);
    let after = send(&h.app, empty("GET", &format!("/projects/{id}"))).await;
    assert_eq!(after.status, StatusCode::OK);
}

// On this thread's runtime, so that the log of this thread is the request's.
#[tokio::test]
async fn a_failed_requests_log_record_names_the_request_id_its_client_got() {
    let (log, _guard) = kes_test_support::CapturedLog::start();
    let h = harness().await;
    let (id, _) = create(&h.app, "Stable", 1).await;
    let explode = || json("POST", &format!("/projects/{id}/explode"), json!({}));
    let made = send(&h.app, explode()).await;
    made.assert_problem(500, "internal");
    let made = made.header("x-request-id").to_owned();
    assert!(!made.is_empty());
    let given = send(&h.app, with_header(explode(), "x-request-id", "client-chose-7")).await;
    given.assert_problem(500, "internal");
    assert_eq!(given.header("x-request-id"), "client-chose-7");
    // Through the compression layer too.
    let compressed =
        send(&h.app, with_header(with_header(explode(), "x-request-id", "zipped-8"), "accept-encoding", "gzip")).await;
    assert_eq!(compressed.status, StatusCode::INTERNAL_SERVER_ERROR);
    let records = log.lines_with("a request handler panicked");
    assert_eq!(records.len(), 3, "{}", log.text());
    for (record, request_id) in records.iter().zip([&made, "client-chose-7", "zipped-8"]) {
        assert!(record.contains("ERROR") && record.contains(request_id), "{record}");
        // The operator reads the cause; the client did not.
        assert!(record.contains("secret detail 42"), "{record}");
    }
    // One record per failure: no second, vaguer one.
    assert!(log.lines_with("request failed").is_empty(), "{}", log.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn health_is_200_when_store_and_views_answer() {
    let h = harness().await;
    let reply = send(&h.app, empty("GET", "/health")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, json!({ "status": "ok", "checks": { "projects.store": "up", "projects.view": "up" } }));
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_commands_by_outcome_and_show_projection_lag() {
    let h = harness().await;
    let (id, _) = create(&h.app, "M", 1).await;
    send(&h.app, json("PATCH", &format!("/projects/{id}"), json!({ "budget": -5 }))).await;
    let reply = send(&h.app, empty("GET", "/metrics")).await;
    assert_eq!(reply.status, StatusCode::OK);
    let text = reply.body.as_str().unwrap().to_owned();
    assert!(text.contains("kes_commands_total{aggregate=\"project\",command=\"create\",outcome=\"ok\"} 1"), "{text}");
    assert!(
        text.contains("kes_commands_total{aggregate=\"project\",command=\"patch\",outcome=\"rejected\"} 1"),
        "{text}"
    );
    assert!(text.contains("kes_command_duration_seconds_bucket{aggregate=\"project\",command=\"create\""), "{text}");
    assert!(text.contains("kes_projection_lag{projection=\"projects\"}"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn projection_lag_reports_what_the_runner_has_not_applied() {
    let h = build(HttpConfig::default(), false, IdStrategy::default()).await;
    create(&h.app, "a", 1).await;
    create(&h.app, "b", 1).await;
    let text = send(&h.app, empty("GET", "/metrics")).await.body.as_str().unwrap().to_owned();
    assert!(text.contains("kes_projection_lag{projection=\"projects\"} 2"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_allows_the_configured_origin_only() {
    let config = HttpConfig { cors_origins: vec!["http://localhost:5173".into()], ..HttpConfig::default() };
    let h = build(config, true, IdStrategy::default()).await;
    let preflight = |origin: &str| {
        Request::builder()
            .method("OPTIONS")
            .uri("/projects")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type,if-match,idempotency-key")
            .body(Body::empty())
            .unwrap()
    };
    let allowed = send(&h.app, preflight("http://localhost:5173")).await;
    assert_eq!(allowed.header("access-control-allow-origin"), "http://localhost:5173");
    assert!(allowed.header("access-control-allow-headers").contains("if-match"));
    let refused = send(&h.app, preflight("http://evil.example")).await;
    assert_eq!(refused.header("access-control-allow-origin"), "");
    let (_, created) = {
        let reply =
            send(&h.app, with_header(json("POST", "/projects", json!({})), "origin", "http://localhost:5173")).await;
        (0, reply)
    };
    assert!(created.header("access-control-expose-headers").contains("etag"), "{:?}", created.headers);
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_are_gzip_compressed_when_asked() {
    let h = harness().await;
    let request = with_header(empty("GET", "/openapi.json"), "accept-encoding", "gzip");
    let response = tower::ServiceExt::oneshot(h.app.clone(), request).await.unwrap();
    assert_eq!(response.headers()["content-encoding"], "gzip");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_list_view_trait_object_is_what_the_route_reads() {
    let h = harness().await;
    let (_, created) = create(&h.app, "Seen", 3).await;
    let position: kes_core::Position = created.header("kes-position").trim_start_matches("project@").parse().unwrap();
    use kes_core::CatchUp;
    assert!(h.runner.wait_for(position, Duration::from_secs(2)).await);
    let page = h.view.list(&kes_core::ListQuery::new()).await.unwrap();
    let reply = send(&h.app, empty("GET", "/projects")).await;
    assert_eq!(reply.body["total"], page.total);
    assert_eq!(reply.body["items"][0]["id"], page.items[0].id);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pluggable_extractor_supplies_the_principal() {
    let store = kes_core::InMemoryStore::<Project>::new();
    let view = Arc::new(kes_core::InMemoryView::new(view_schema()).unwrap());
    let runner = kes_core::ProjectionRunner::new(store.clone(), Vec::new(), kes_core::RunnerConfig::default());
    let app = kes_http::Api::new(HttpConfig::default())
        .mount(resource(), Arc::new(kes_core::CommandBus::new(store.clone())), view, runner)
        .unwrap()
        // What an authentication layer left behind, e.g. a verified token subject.
        .principal(|parts| {
            parts.headers.get("authorization")?.to_str().ok()?.strip_prefix("Bearer user:").map(str::to_owned)
        })
        .into_router();
    let request = with_header(
        with_header(json("POST", "/projects", json!({ "name": "Mine" })), "authorization", "Bearer user:zoe"),
        "x-principal",
        "ignored",
    );
    let created = send(&app, request).await;
    let id = created.header("location").trim_start_matches("/projects/").to_owned();
    let history = store.read(&id).await.unwrap();
    assert_eq!(history[0].metadata.principal.as_deref(), Some("zoe"));
}

#[tokio::test(flavor = "multi_thread")]
async fn position_tokens_name_their_log_and_a_foreign_one_is_not_waited_for() {
    let h = harness().await;
    let (_, reply) = create(&h.app, "Apollo", 1).await;
    let token = reply.header("kes-position").to_owned();
    assert_eq!(token, "project@0:0");
    let read = |token: &str| with_header(empty("GET", "/projects"), "kes-position", token);
    assert_eq!(send(&h.app, read(&token)).await.header("kes-consistency"), "caught-up");
    // A bare position (as earlier versions wrote) is taken to be this log's.
    assert_eq!(send(&h.app, read("0:0")).await.header("kes-consistency"), "caught-up");
    // Another aggregate type's log: its offsets say nothing about this one,
    // so the read neither waits for them nor claims to have caught up.
    let started = std::time::Instant::now();
    let foreign = send(&h.app, read("task@0:5000")).await;
    assert_eq!(foreign.status, StatusCode::OK);
    assert_eq!(foreign.header("kes-consistency"), "eventual");
    assert!(started.elapsed() < Duration::from_secs(1), "a foreign token was waited for");
    for bad in ["project@", "@0:1", "project@0", "project@a:b"] {
        send(&h.app, read(bad)).await.assert_problem(400, "invalid-header");
    }
}
