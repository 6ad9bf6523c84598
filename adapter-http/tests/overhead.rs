//! The adapter's cost per request, without a network: `GET /projects/{id}`
//! through the whole API (the [`kes_http::App`] that `serve` serves, and
//! the same behind a router, [`kes_http::Api::into_router`]) against a bare
//! axum handler that answers the same bytes from a map. A measurement, not a check of behaviour: run it
//! with `cargo test --release -p kes-http --test overhead -- --ignored --nocapture`.
//!
//! For an instruction count (`valgrind --tool=callgrind`, repeatable where
//! timings are not), `OVERHEAD_REQUESTS=20000` makes it one round of that
//! many requests and `OVERHEAD_ONLY=app`, `router` or `bare` runs one of
//! the three only.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::routing::get;
use common::*;
use http::{StatusCode, header};
use http_body_util::BodyExt;
use tower::ServiceExt;

const ROUNDS: usize = 5;
const PER_ROUND: usize = 50_000;

/// Requests per second of `app` answering `GET {uri}`, best of a round.
async fn rate<S>(app: &S, uri: &str, requests: usize) -> f64
where
    S: tower::Service<http::Request<axum::body::Body>, Response = axum::response::Response, Error = Infallible> + Clone,
{
    let started = Instant::now();
    for _ in 0..requests {
        let response = app.clone().oneshot(empty("GET", uri)).await.expect("infallible");
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.expect("body").to_bytes();
        assert!(!body.is_empty());
    }
    requests as f64 / started.elapsed().max(Duration::from_nanos(1)).as_secs_f64()
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "a measurement; run in release with --ignored --nocapture"]
async fn get_by_id_costs_little_more_than_a_bare_handler() {
    let h = harness().await;
    let (id, _) = create(&h.app, "Measured", 7).await;
    let uri = format!("/projects/{id}");
    let bytes = h.app.clone().oneshot(empty("GET", &uri)).await.expect("infallible");
    let bytes = bytes.into_body().collect().await.expect("body").to_bytes();
    let bodies: Arc<HashMap<String, Bytes>> = Arc::new([(id.clone(), bytes)].into());
    let bare = Router::new()
        .route(
            "/raw/{id}",
            get(|State(bodies): State<Arc<HashMap<String, Bytes>>>, Path(id): Path<String>| async move {
                match bodies.get(&id) {
                    Some(b) => ([(header::CONTENT_TYPE, "application/json")], b.clone()).into_response(),
                    None => StatusCode::NOT_FOUND.into_response(),
                }
            }),
        )
        .with_state(bodies);
    let raw_uri = format!("/raw/{id}");
    // The same API as the harness's router, served as `serve` serves it.
    let app = kes_http::Api::new(kes_http::HttpConfig::default())
        .mount(resource(), Arc::new(kes_core::CommandBus::new(h.store.clone())), h.view.clone(), h.runner.clone())
        .expect("mount")
        .into_app();
    let requests = std::env::var("OVERHEAD_REQUESTS").ok().and_then(|n| n.parse().ok());
    let (rounds, requests) = requests.map_or((ROUNDS, PER_ROUND), |n| (1, n));
    let only = std::env::var("OVERHEAD_ONLY").unwrap_or_default();
    let runs = |side: &str| only.is_empty() || only == side;
    let (mut served, mut routed, mut raw) = (0f64, 0f64, 0f64);
    for _ in 0..rounds {
        if runs("app") {
            served = served.max(rate(&app, &uri, requests).await);
        }
        if runs("router") {
            routed = routed.max(rate(&h.app, &uri, requests).await);
        }
        if runs("bare") {
            raw = raw.max(rate(&bare, &raw_uri, requests).await);
        }
    }
    println!(
        "kes app {served:.0} req/s (ratio {:.2}), kes behind a router {routed:.0} req/s ({:.2}), bare {raw:.0} req/s",
        served / raw,
        routed / raw
    );
}
