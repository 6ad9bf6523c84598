//! Who may do what: where the principal comes from (anonymous by default,
//! a trusted header when asked for) and the resource rules that answer 403
//! before a command runs, with nothing appended.

mod common;

use common::*;
use http::{HeaderName, StatusCode};
use kes_core::EventStore;
use kes_http::{Api, HttpConfig, Resource};
use serde_json::json;

/// The test resource with rules: archiving is ann's (or an auditor's); an
/// archived project changes only by an admin; reads need a name.
fn guarded() -> Resource<Project> {
    resource()
        .allow("archive", "only ann or an auditor may archive", |who, _| {
            who.subject == "ann" || who.has_role("auditor")
        })
        .allow("patch", "an archived project is changed only by an admin", |who, p: &Project| {
            !p.archived || who.has_role("admin")
        })
        .allow_reads("only callers with a name may read", |who| who.subject != kes_http::ANONYMOUS)
}

fn trusted(api: Api) -> Api {
    api.trust_principal_header(HeaderName::from_static("x-principal"))
}

fn as_(request: http::Request<axum::body::Body>, who: &str) -> http::Request<axum::body::Body> {
    with_header(request, "x-principal", who)
}

async fn events_of(h: &Harness, id: &str) -> usize {
    h.store.read(id).await.expect("read").len()
}

#[tokio::test(flavor = "multi_thread")]
async fn without_identities_everyone_is_anonymous_and_no_rule_is_asked() {
    let h = build_with(HttpConfig::default(), true, guarded(), |api| api).await;
    let created = send(&h.app, as_(json("POST", "/projects", json!({ "name": "Open" })), "ann")).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let id = created.header("location").trim_start_matches("/projects/").to_owned();
    let archived = send(&h.app, json("POST", &format!("/projects/{id}/archive"), json!({}))).await;
    assert_eq!(archived.status, StatusCode::OK, "no rule is asked of anonymous callers: {}", archived.body);
    let history = h.store.read(&id).await.unwrap();
    assert!(
        history.iter().all(|e| e.metadata.principal.as_deref() == Some("anonymous")),
        "a forged principal header is not believed: {:?}",
        history.iter().map(|e| &e.metadata.principal).collect::<Vec<_>>()
    );
    let read = send(&h.app, empty("GET", &format!("/projects/{id}"))).await;
    assert_eq!(read.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_write_is_403_naming_the_rule_and_appends_nothing() {
    let h = build_with(HttpConfig::default(), true, guarded(), trusted).await;
    let created = send(&h.app, as_(json("POST", "/projects", json!({ "name": "Guarded" })), "bob")).await;
    assert_eq!(created.status, StatusCode::CREATED, "create has no rule: {}", created.body);
    let id = created.header("location").trim_start_matches("/projects/").to_owned();

    let refused = send(&h.app, as_(json("POST", &format!("/projects/{id}/archive"), json!({})), "bob")).await;
    refused.assert_problem(403, "forbidden");
    assert!(
        refused.body["detail"].as_str().unwrap().contains("only ann or an auditor may archive"),
        "{}",
        refused.body
    );
    assert_eq!(events_of(&h, &id).await, 1, "nothing appended");

    let allowed = send(&h.app, as_(json("POST", &format!("/projects/{id}/archive"), json!({})), "ann")).await;
    assert_eq!(allowed.status, StatusCode::OK, "{}", allowed.body);
    let history = h.store.read(&id).await.unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[1].metadata.principal.as_deref(), Some("ann"), "the principal is the trusted header");
}

/// Trusted-header mode with roles from `x-roles` (named before the
/// principal header, which the builder accepts in either order).
fn trusted_with_roles(api: Api) -> Api {
    api.trust_roles_header(HeaderName::from_static("x-roles"))
        .trust_principal_header(HeaderName::from_static("x-principal"))
}

fn with_roles(request: http::Request<axum::body::Body>, roles: &str) -> http::Request<axum::body::Body> {
    with_header(request, "x-roles", roles)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trusted_roles_header_gives_the_named_caller_its_roles() {
    let h = build_with(HttpConfig::default(), true, guarded(), trusted_with_roles).await;
    let created = send(&h.app, as_(json("POST", "/projects", json!({ "name": "Roles" })), "bob")).await;
    let id = created.header("location").trim_start_matches("/projects/").to_owned();
    let archive = || as_(json("POST", &format!("/projects/{id}/archive"), json!({})), "bob");

    // Without the role bob may not archive; with another role neither.
    send(&h.app, archive()).await.assert_problem(403, "forbidden");
    send(&h.app, with_roles(archive(), "viewer, editor")).await.assert_problem(403, "forbidden");
    assert_eq!(events_of(&h, &id).await, 1);
    // As an auditor (among other roles, spaces around commas) he may.
    let allowed = send(&h.app, with_roles(archive(), " viewer ,auditor")).await;
    assert_eq!(allowed.status, StatusCode::OK, "{}", allowed.body);
    // An archived project changes only by an admin: the admin passes the
    // rule and meets the aggregate's own (archived projects do not change).
    let patch = || as_(json("PATCH", &format!("/projects/{id}"), json!({ "budget": 5 })), "bob");
    send(&h.app, patch()).await.assert_problem(403, "forbidden");
    send(&h.app, with_roles(patch(), "admin")).await.assert_problem(422, "rejected");
    assert_eq!(events_of(&h, &id).await, 2);

    // Roles belong to a named caller: without the principal header the
    // request is anonymous, with none, whatever the roles header says.
    let anonymous = with_roles(json("PATCH", &format!("/projects/{id}"), json!({ "budget": 6 })), "admin");
    send(&h.app, anonymous).await.assert_problem(403, "forbidden");
    assert_eq!(events_of(&h, &id).await, 2, "nothing appended");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_roles_header_is_refused_whole_and_runs_nothing() {
    let h = build_with(HttpConfig::default(), true, guarded(), trusted_with_roles).await;
    let created = send(&h.app, as_(json("POST", "/projects", json!({ "name": "Roles" })), "bob")).await;
    let id = created.header("location").trim_start_matches("/projects/").to_owned();
    let many = (0..33).map(|i| format!("r{i}")).collect::<Vec<_>>().join(",");
    let long = format!("auditor,{}", "x".repeat(65));
    for bad in ["auditor,,admin", "auditor, ", "aud itor", "auditor;admin", "admin,\"", long.as_str(), many.as_str()] {
        let request = with_roles(as_(json("POST", &format!("/projects/{id}/archive"), json!({})), "bob"), bad);
        let r = send(&h.app, request).await;
        r.assert_problem(400, "invalid-header");
        assert!(r.body["detail"].as_str().is_some_and(|d| d.contains("roles")), "{bad:?}: {}", r.body);
    }
    // Bytes that are not visible ASCII.
    let mut request = as_(json("POST", &format!("/projects/{id}/archive"), json!({})), "bob");
    request.headers_mut().insert("x-roles", http::HeaderValue::from_bytes(b"audit\xc3\xa9r").expect("a header value"));
    send(&h.app, request).await.assert_problem(400, "invalid-header");
    assert_eq!(events_of(&h, &id).await, 1, "nothing appended");
    // Thirty-two distinct roles (repeats counted once) and an empty header
    // are fine.
    let most = (0..32).map(|i| format!("r{i}")).chain(["r0".to_owned()]).collect::<Vec<_>>().join(",");
    let read = with_roles(as_(empty("GET", &format!("/projects/{id}")), "bob"), &most);
    assert_eq!(send(&h.app, read).await.status, StatusCode::OK);
    let read = with_roles(as_(empty("GET", &format!("/projects/{id}")), "bob"), "");
    assert_eq!(send(&h.app, read).await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_key_replays_only_its_own_callers_write() {
    let h = build_with(HttpConfig::default(), true, guarded(), trusted).await;
    let created = send(&h.app, as_(json("POST", "/projects", json!({ "name": "Keyed" })), "ann")).await;
    let id = created.header("location").trim_start_matches("/projects/").to_owned();
    let archive = |who: &str| {
        let request = as_(json("POST", &format!("/projects/{id}/archive"), json!({})), who);
        with_header(request, "idempotency-key", "archive-1")
    };
    let first = send(&h.app, archive("ann")).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    // Bob may not archive: the same key does not make ann's write his.
    let other = send(&h.app, archive("bob")).await;
    other.assert_problem(403, "forbidden");
    assert!(other.headers.get("idempotent-replayed").is_none());
    // Ann's retry is one.
    let retry = send(&h.app, archive("ann")).await;
    assert_eq!(retry.status, StatusCode::OK, "{}", retry.body);
    assert_eq!(retry.header("idempotent-replayed"), "true");
    assert_eq!(retry.header("etag"), first.header("etag"));
    assert_eq!(events_of(&h, &id).await, 2, "created, archived once");
    // The log keeps a digest of the key the client sent and whose it is,
    // never the key itself.
    let history = h.store.read(&id).await.unwrap();
    assert_eq!(history[1].metadata.idempotency_key, Some(stored_key("archive-1\u{b7}ann")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_create_makes_one_aggregate_per_caller() {
    let h = build_with(HttpConfig::default(), true, guarded(), trusted).await;
    let create = |who: &str| {
        with_header(as_(json("POST", "/projects", json!({ "name": "Once" })), who), "idempotency-key", "create-1")
    };
    let first = send(&h.app, create("ann")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let again = send(&h.app, create("ann")).await;
    assert_eq!(again.header("location"), first.header("location"));
    assert_eq!(again.header("idempotent-replayed"), "true");
    let bobs = send(&h.app, create("bob")).await;
    assert_eq!(bobs.status, StatusCode::CREATED, "{}", bobs.body);
    assert_ne!(bobs.header("location"), first.header("location"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rule_decides_on_the_aggregates_current_state() {
    let h = build_with(HttpConfig::default(), true, guarded(), trusted).await;
    let created = send(&h.app, as_(json("POST", "/projects", json!({ "name": "Moving" })), "ann")).await;
    let id = created.header("location").trim_start_matches("/projects/").to_owned();
    let patch = || as_(json("PATCH", &format!("/projects/{id}"), json!({ "budget": 5 })), "bob");
    assert_eq!(send(&h.app, patch()).await.status, StatusCode::OK, "not archived: anyone may change it");
    let archived = send(&h.app, as_(json("POST", &format!("/projects/{id}/archive"), json!({})), "ann")).await;
    assert_eq!(archived.status, StatusCode::OK);
    let before = events_of(&h, &id).await;
    let refused = send(&h.app, patch()).await;
    refused.assert_problem(403, "forbidden");
    assert!(refused.body["detail"].as_str().unwrap().contains("archived"), "{}", refused.body);
    assert_eq!(events_of(&h, &id).await, before, "nothing appended");
    // A stale If-Match is still a 412 (the version is checked before the rule).
    let stale = send(&h.app, with_header(patch(), "if-match", "\"1\"")).await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED, "{}", stale.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_rule_guards_every_read_route() {
    let h = build_with(HttpConfig::default(), true, guarded(), trusted).await;
    let created = send(&h.app, as_(json("POST", "/projects", json!({ "name": "Seen" })), "ann")).await;
    let id = created.header("location").trim_start_matches("/projects/").to_owned();
    for route in [
        format!("/projects/{id}"),
        "/projects".to_owned(),
        format!("/projects/{id}/events"),
        "/projects/changes".to_owned(),
        format!("/projects/{id}/changes"),
    ] {
        let refused = send(&h.app, empty("GET", &route)).await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{route}: {}", refused.body);
        assert!(refused.body["detail"].as_str().unwrap().contains("only callers with a name may read"));
    }
    for route in [format!("/projects/{id}"), "/projects".to_owned(), format!("/projects/{id}/events")] {
        let read = send(&h.app, as_(empty("GET", &route), "zoe")).await;
        assert_eq!(read.status, StatusCode::OK, "{route}: {}", read.body);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_document_lists_each_rule_as_the_403_of_its_operation() {
    let h = build_with(HttpConfig::default(), true, guarded(), trusted).await;
    let doc = send(&h.app, empty("GET", "/openapi.json")).await.body;
    let forbidden = |path: &str, method: &str| doc["paths"][path][method]["responses"]["403"]["description"].clone();
    assert!(forbidden("/projects/{id}/archive", "post").as_str().unwrap().contains("only ann or an auditor"));
    assert!(forbidden("/projects/{id}", "patch").as_str().unwrap().contains("archived"));
    assert!(forbidden("/projects/{id}", "get").as_str().unwrap().contains("with a name"));
    assert!(forbidden("/projects", "get").as_str().unwrap().contains("with a name"));
    assert!(forbidden("/projects/changes", "get").as_str().unwrap().contains("with a name"));
    assert!(forbidden("/projects", "post").is_null(), "create has no rule, so no 403");
    assert!(forbidden("/projects/{id}", "delete").is_null());
}

#[test]
fn a_rule_on_an_operation_the_resource_lacks_fails_at_mount() {
    let store = kes_core::InMemoryStore::<Project>::new();
    let view = std::sync::Arc::new(kes_core::InMemoryView::new(view_schema()).unwrap());
    let runner = kes_core::ProjectionRunner::new(store.clone(), Vec::new(), kes_core::RunnerConfig::default());
    let bus = std::sync::Arc::new(kes_core::CommandBus::new(store));
    let typo = resource().allow("achive", "nobody", |_, _| false);
    let mounted = Api::new(HttpConfig::default()).mount(typo, bus.clone(), view.clone(), runner.clone());
    assert!(matches!(mounted, Err(kes_http::ConfigError(m)) if m.contains("achive")));
    let shadowing = resource().command("patch", |_: Explode| -> ProjectCommand { unreachable!() });
    let mounted = Api::new(HttpConfig::default()).mount(shadowing, bus, view, runner);
    assert!(matches!(mounted, Err(kes_http::ConfigError(m)) if m.contains("patch")));
}
