//! The admin endpoints: absent without a token, refused without the right
//! one, and a rebuild started through them runs where the projection is
//! led, reports its progress and swaps in a copy equal to a fresh replay.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use common::*;
use http::{Request, StatusCode};
use kes_core::{CommandBus, InMemoryView, ListQuery, ListView, ProjectionRunner, RunnerConfig, ViewProjection};
use kes_http::{AdminToken, Api, HttpConfig};

const TOKEN: &str = "an-admin-token-of-some-length";

fn admin_request(method: &str, uri: &str, token: Option<&str>) -> Request<Body> {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    request.body(Body::empty()).expect("request")
}

/// The harness's API with the admin endpoints on.
async fn with_admin(start: bool) -> (Harness, Router) {
    let h = build(HttpConfig::default(), start, Default::default()).await;
    let app = Api::new(HttpConfig::default())
        .mount(resource(), Arc::new(CommandBus::new(h.store.clone())), h.view.clone(), h.runner.clone())
        .expect("mount")
        .projections(h.runner.clone())
        .admin(AdminToken::new(TOKEN).expect("token"))
        .into_router();
    (h, app)
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_token_configured_the_routes_do_not_exist() {
    let h = harness().await;
    send(&h.app, admin_request("GET", "/admin/projections", Some(TOKEN))).await.assert_problem(404, "not-found");
    send(&h.app, admin_request("POST", "/admin/projections/projects/rebuild", Some(TOKEN)))
        .await
        .assert_problem(404, "not-found");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_or_wrong_token_is_401_with_a_challenge() {
    let (_h, app) = with_admin(true).await;
    for token in [None, Some("not-the-admin-token-at-all"), Some("")] {
        let reply = send(&app, admin_request("GET", "/admin/projections", token)).await;
        reply.assert_problem(401, "unauthorized");
        let challenge = match token {
            None => "Bearer realm=\"kes-admin\"",
            // A token was sent and refused (RFC 6750 §3.1).
            Some(_) => "Bearer realm=\"kes-admin\", error=\"invalid_token\"",
        };
        assert_eq!(reply.header("www-authenticate"), challenge);
        let reply = send(&app, admin_request("POST", "/admin/projections/projects/rebuild", token)).await;
        reply.assert_problem(401, "unauthorized");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_names_each_projection_with_its_lead_and_lag() {
    let (h, app) = with_admin(true).await;
    create(&app, "Apollo", 1).await;
    let reply = send(&app, admin_request("GET", "/admin/projections", Some(TOKEN))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let projections = reply.body["projections"].as_array().expect("a list");
    assert_eq!(projections.len(), 1);
    assert_eq!(projections[0]["name"], "projects");
    assert_eq!(projections[0]["leads"], true);
    assert!(projections[0]["lag"].is_u64());
    assert_eq!(projections[0]["rebuild"], serde_json::Value::Null);
    drop(h);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_runs_reports_progress_and_swaps_in_an_equal_copy() {
    let (h, app) = with_admin(true).await;
    for i in 0..40 {
        create(&app, &format!("P{i}"), i).await;
    }
    let reply = send(&app, admin_request("POST", "/admin/projections/projects/rebuild", Some(TOKEN))).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    assert_eq!(reply.header("location"), "/admin/projections");
    assert_eq!(reply.body["name"], "projects");

    // Writes go on during the rebuild.
    for i in 40..60 {
        create(&app, &format!("P{i}"), i).await;
    }
    let started = Instant::now();
    let rebuild = loop {
        let reply = send(&app, admin_request("GET", "/admin/projections", Some(TOKEN))).await;
        let rebuild = reply.body["projections"][0]["rebuild"].clone();
        if rebuild["state"] != "running" {
            break rebuild;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the rebuild never finished: {rebuild}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(rebuild["state"], "done", "{rebuild}");
    assert!(rebuild["events"].as_u64().is_some_and(|n| n >= 40), "{rebuild}");
    assert!(rebuild["total"].as_u64().is_some_and(|n| n >= 40), "the log's size was not reported: {rebuild}");
    assert_eq!(rebuild["done"], rebuild["total"], "{rebuild}");
    assert_eq!(rebuild["error"], serde_json::Value::Null);

    // The live copy equals a fresh replay of the log.
    let last = create(&app, "last", 1).await.1;
    let position = last.header("kes-position").to_owned();
    let mut request = admin_request("GET", "/projects?page[size]=100", None);
    request.headers_mut().insert("kes-position", position.parse().expect("header"));
    let listed = send(&app, request).await;
    assert_eq!(listed.header("kes-consistency"), "caught-up");
    let fresh = Arc::new(InMemoryView::new(view_schema()).expect("schema"));
    let replay = ProjectionRunner::new(
        h.store.clone(),
        vec![Arc::new(ViewProjection::<Project>::new(fresh.clone(), row))],
        RunnerConfig::default(),
    );
    replay.start().await.expect("replay");
    let at = position.strip_prefix("project@").expect("a token of the project log").parse().expect("position");
    let caught_up = kes_core::CatchUp::wait_for(replay.as_ref(), at, Duration::from_secs(10));
    assert!(caught_up.await, "the replay did not catch up");
    let query = ListQuery::new().page_size(100);
    let fresh_page = fresh.list(&query).await.expect("list");
    let ours = h.view.list(&query).await.expect("list");
    assert_eq!(ours.items, fresh_page.items, "the rebuilt copy differs from a fresh replay");
    assert_eq!(listed.body["items"].as_array().map(Vec::len), Some(61));
    replay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_projections_are_404_and_a_process_that_does_not_lead_says_409() {
    let (_h, app) = with_admin(true).await;
    send(&app, admin_request("POST", "/admin/projections/nope/rebuild", Some(TOKEN)))
        .await
        .assert_problem(404, "not-found");
    // Projections not started: this process leads nothing.
    let (_h, app) = with_admin(false).await;
    let reply = send(&app, admin_request("POST", "/admin/projections/projects/rebuild", Some(TOKEN))).await;
    reply.assert_problem(409, "conflict");
    assert!(reply.body["detail"].as_str().is_some_and(|d| d.contains("led by another process")), "{}", reply.body);
}
