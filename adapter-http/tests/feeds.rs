//! Change feeds over Server-Sent Events: every change in order, resumed
//! exactly from `Last-Event-ID`, filtered, with heartbeats; a slow client
//! is cut off without holding back others; feeds end at shutdown.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use kes_http::{HttpConfig, IdStrategy};
use serde_json::{Value, json};
use tower::ServiceExt;

/// One server-sent event.
#[derive(Debug, Clone, Default)]
struct Sse {
    event: String,
    id: Option<String>,
    data: Value,
    comment: bool,
}

/// An open feed: its body, read frame by frame.
struct Feed {
    body: Body,
    buffer: String,
}

const PATIENCE: Duration = Duration::from_secs(10);

async fn open(app: &Router, uri: &str, last_event_id: Option<&str>) -> Feed {
    let mut request = Request::get(uri);
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    let response = app.clone().oneshot(request.body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{uri}");
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    Feed { body: response.into_body(), buffer: String::new() }
}

impl Feed {
    /// The next event or comment; `None` when the stream ended.
    async fn next(&mut self) -> Option<Sse> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut sse = Sse::default();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        sse.comment = true;
                        sse.event = c.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        sse.event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        sse.id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if !data.is_empty() {
                    sse.data = serde_json::from_str(&data).unwrap_or(Value::String(data));
                }
                if sse.event.is_empty() && sse.id.is_none() && !sse.comment {
                    continue; // the retry hint alone
                }
                return Some(sse);
            }
            let frame = tokio::time::timeout(PATIENCE, self.body.frame()).await.expect("the feed went quiet")?;
            let frame = frame.expect("a frame");
            if let Ok(data) = frame.into_data() {
                self.buffer.push_str(std::str::from_utf8(&data).expect("utf-8"));
            }
        }
    }

    /// The next event that is not a comment or `progress`.
    async fn next_change(&mut self) -> Sse {
        loop {
            let sse = self.next().await.expect("the feed ended");
            if !sse.comment && sse.event != "progress" {
                return sse;
            }
        }
    }
}

async fn patch(app: &Router, id: &str, body: Value) -> Reply {
    let reply = send(app, json("PATCH", &format!("/projects/{id}"), body)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    reply
}

#[tokio::test(flavor = "multi_thread")]
async fn a_feed_delivers_every_change_in_order_with_a_resume_token() {
    let h = harness().await;
    let mut feed = open(&h.app, "/projects/changes", None).await;
    let (a, _) = create(&h.app, "Apollo", 1).await;
    let (b, _) = create(&h.app, "Borealis", 2).await;
    patch(&h.app, &a, json!({ "budget": 5 })).await;
    patch(&h.app, &a, json!({ "name": "Apollo 2" })).await;
    send(&h.app, empty("DELETE", &format!("/projects/{b}"))).await;

    // Changes of one row that the view applied together arrive as one
    // event at the latest version; versions of a row only go up, and the
    // feed ends where the log does.
    let mut last: HashMap<String, (String, u64)> = HashMap::new();
    let mut token = None;
    while last.get(&a).map(|(_, v)| *v) != Some(3) || last.get(&b).map(|(e, _)| e.as_str()) != Some("remove") {
        let e = feed.next_change().await;
        assert!(e.id.is_some(), "every change carries a token when each record touches one row: {e:?}");
        token = e.id.clone();
        let id = e.data["id"].as_str().unwrap().to_owned();
        let version = e.data["version"].as_u64().unwrap();
        if let Some((_, before)) = last.get(&id) {
            assert!(version > *before, "{id} went from version {before} to {version}");
        }
        if e.event == "change" && id == a && version == 3 {
            assert_eq!(e.data["row"]["name"], "Apollo 2");
            assert_eq!(e.data["row"]["budget"], 5);
        }
        last.insert(id, (e.event.clone(), version));
    }
    assert_eq!(last[&b], ("remove".to_owned(), 2));
    // The last token is past the whole log: resuming from it sends nothing
    // old, only what comes next.
    let mut resumed = open(&h.app, "/projects/changes", token.as_deref()).await;
    let (c, _) = create(&h.app, "Cassini", 3).await;
    let e = resumed.next_change().await;
    assert_eq!((e.event.as_str(), e.data["id"].as_str().unwrap()), ("change", c.as_str()));
}

#[tokio::test(flavor = "multi_thread")]
async fn last_event_id_resumes_exactly_where_the_client_stopped() {
    let h = harness().await;
    let mut feed = open(&h.app, "/projects/changes", None).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(create(&h.app, &format!("P{i}"), i).await.0);
    }
    let mut token = None;
    for _ in 0..2 {
        token = feed.next_change().await.id;
    }
    drop(feed);
    let token = token.expect("a token");
    // Written while the client was away.
    patch(&h.app, &ids[0], json!({ "budget": 50 })).await;
    let mut resumed = open(&h.app, "/projects/changes", Some(&token)).await;
    let mut got = Vec::new();
    while got.len() < 3 {
        let e = resumed.next_change().await;
        got.push((e.data["id"].as_str().unwrap().to_owned(), e.data["version"].as_u64().unwrap()));
    }
    // The two not yet seen, then the patch: nothing repeated, nothing lost.
    assert_eq!(got, vec![(ids[2].clone(), 1), (ids[3].clone(), 1), (ids[0].clone(), 2)]);
    // Live changes follow the replay.
    patch(&h.app, &ids[1], json!({ "budget": 9 })).await;
    let e = resumed.next_change().await;
    assert_eq!((e.data["id"].as_str().unwrap(), e.data["version"].as_u64().unwrap()), (ids[1].as_str(), 2));
    // `?after=` does the same as the header.
    let mut after = open(&h.app, &format!("/projects/changes?after={token}"), None).await;
    assert_eq!(after.next_change().await.data["id"], ids[2].as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn filters_narrow_a_feed_and_a_row_that_leaves_them_is_removed() {
    let h = harness().await;
    let mut feed = open(&h.app, "/projects/changes?filter[budget][gt]=10", None).await;
    let (small, _) = create(&h.app, "small", 1).await;
    let (big, _) = create(&h.app, "big", 100).await;
    let e = feed.next_change().await;
    assert_eq!((e.event.as_str(), e.data["id"].as_str().unwrap()), ("remove", small.as_str()));
    let e = feed.next_change().await;
    assert_eq!((e.event.as_str(), e.data["id"].as_str().unwrap()), ("change", big.as_str()));
    patch(&h.app, &big, json!({ "budget": 3 })).await;
    let e = feed.next_change().await;
    assert_eq!(
        (e.event.as_str(), e.data["id"].as_str().unwrap(), e.data["version"].as_u64()),
        ("remove", big.as_str(), Some(2))
    );
    // The list syntax's errors are the list's errors.
    let bad = send(&h.app, empty("GET", "/projects/changes?filter[nope]=1")).await;
    bad.assert_problem(400, "invalid-query");
    let bad = send(&h.app, empty("GET", "/projects/changes?sort=name")).await;
    bad.assert_problem(400, "invalid-query");
    let mut request = empty("GET", "/projects/changes");
    request.headers_mut().insert("last-event-id", "0:x".parse().unwrap());
    send(&h.app, request).await.assert_problem(400, "invalid-header");
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_feeds_send_heartbeats() {
    let config = HttpConfig { feed_heartbeat: Duration::from_millis(50), ..HttpConfig::default() };
    let h = build(config, true, IdStrategy::default()).await;
    let mut feed = open(&h.app, "/projects/changes", None).await;
    let mut beats = 0;
    while beats < 3 {
        let e = feed.next().await.expect("open");
        if e.comment && e.event == "keep-alive" {
            beats += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_client_is_cut_off_and_others_get_everything() {
    let h = harness().await;
    let mut slow = open(&h.app, "/projects/changes", None).await;
    let mut fast = open(&h.app, "/projects/changes", None).await;
    let writes = 3000;
    let reader = tokio::spawn(async move {
        let mut seen = HashMap::new();
        while seen.len() < writes {
            let e = fast.next_change().await;
            assert_eq!(e.event, "change");
            seen.insert(e.data["id"].as_str().unwrap().to_owned(), e.data["version"].as_u64().unwrap());
        }
        seen
    });
    for i in 0..writes {
        create(&h.app, &format!("P{i}"), i as i64).await;
    }
    let seen = tokio::time::timeout(PATIENCE, reader).await.expect("the fast client kept up").expect("reader");
    assert_eq!(seen.len(), writes, "the fast client missed changes");
    // The slow one read nothing meanwhile: its queue filled, it was told
    // to reset and its stream ended.
    let mut last = None;
    while let Some(e) = slow.next().await {
        last = Some(e);
    }
    let last = last.expect("some events");
    assert_eq!(last.event, "reset", "{last:?}");
    let metrics = send(&h.app, empty("GET", "/metrics")).await;
    let text = metrics.body.as_str().unwrap_or_default().to_owned();
    assert!(text.contains("kes_feed_clients_dropped_total{aggregate=\"project\"} 1"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_per_aggregate_feed_streams_new_versions_with_etags() {
    let h = harness().await;
    let (id, _) = create(&h.app, "Apollo", 1).await;
    let mut feed = open(&h.app, &format!("/projects/{id}/changes"), None).await;
    let e = feed.next_change().await;
    assert_eq!((e.event.as_str(), e.id.as_deref()), ("state", Some("1")));
    assert_eq!(e.data["etag"], "\"1\"");
    assert_eq!(e.data["state"]["name"], "Apollo");
    create(&h.app, "other", 1).await;
    patch(&h.app, &id, json!({ "budget": 7 })).await;
    let e = feed.next_change().await;
    assert_eq!((e.event.as_str(), e.id.as_deref()), ("state", Some("2")));
    assert_eq!(e.data["state"]["budget"], 7);
    // A client that has version 2 gets nothing until version 3.
    let mut resumed = open(&h.app, &format!("/projects/{id}/changes"), Some("2")).await;
    send(&h.app, empty("DELETE", &format!("/projects/{id}"))).await;
    let e = resumed.next_change().await;
    assert_eq!((e.event.as_str(), e.id.as_deref()), ("deleted", Some("3")));
}

#[tokio::test(flavor = "multi_thread")]
async fn feeds_end_at_shutdown() {
    let h = harness().await;
    let mut feed = open(&h.app, "/projects/changes", None).await;
    create(&h.app, "x", 1).await;
    assert_eq!(feed.next_change().await.event, "change");
    h.shutdown.shutdown();
    let ended = tokio::time::timeout(PATIENCE, async { while feed.next().await.is_some() {} }).await;
    assert!(ended.is_ok(), "the feed did not end at shutdown");
}
