//! Bearer JWT authentication: every kind of bad token is a 401 with a
//! challenge and appends nothing; a good one makes its subject the
//! principal of the events, whatever principal header the client forges;
//! JWKS keys rotate by editing the file.
//!
//! The keys under `tests/fixtures/jwt-*.pem` and `jwks-*.json` were made
//! for these tests only.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use common::*;
use http::StatusCode;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use kes_core::{CommandBus, EventStore, InMemoryStore, InMemoryView, ProjectionRunner, RunnerConfig, ViewProjection};
use kes_http::{Api, HttpConfig, JwtAuth};
use serde_json::{Value, json};

const SECRET: &[u8] = b"a-shared-secret-of-thirty-two-bytes-or-more";
const ISSUER: &str = "https://issuer.example";
const AUDIENCE: &str = "kes-tests";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Claims of a token valid for the next hour, for `sub`.
fn claims(sub: &str) -> Value {
    json!({ "sub": sub, "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 3600, "iat": now(), "roles": ["member"] })
}

fn hs256(claims: &Value) -> String {
    encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(SECRET)).expect("token")
}

fn signed_with(pem: &str, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let pem = std::fs::read(fixture(pem)).expect("key fixture");
    let key = match alg {
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        _ => EncodingKey::from_ec_pem(&pem),
    }
    .expect("signing key");
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, &key).expect("token")
}

struct App {
    app: Router,
    store: InMemoryStore<Project>,
}

async fn app(auth: JwtAuth) -> App {
    app_with(resource(), |api| api.authenticate(auth)).await
}

/// `resource` mounted over a fresh store, with `shape` applied to the API.
async fn app_with(resource: kes_http::Resource<Project>, shape: impl FnOnce(Api) -> Api) -> App {
    let store = InMemoryStore::<Project>::new();
    let view = Arc::new(InMemoryView::new(view_schema()).expect("schema"));
    let runner = ProjectionRunner::new(
        store.clone(),
        vec![Arc::new(ViewProjection::<Project>::new(view.clone(), row))],
        RunnerConfig::default(),
    );
    runner.start().await.expect("projections");
    let api = Api::new(HttpConfig::default())
        .mount(resource, Arc::new(CommandBus::new(store.clone())), view, runner.clone())
        .expect("mount")
        .projections(runner);
    App { app: shape(api).into_router(), store }
}

fn hs_auth() -> JwtAuth {
    JwtAuth::hs256(SECRET).expect("secret").issuer(ISSUER).audience(AUDIENCE)
}

fn bearer(request: http::Request<axum::body::Body>, token: &str) -> http::Request<axum::body::Body> {
    with_header(request, "authorization", &format!("Bearer {token}"))
}

async fn create_with(app: &Router, token: Option<&str>) -> Reply {
    let request = json("POST", "/projects", json!({ "name": "p", "budget": 1 }));
    let request = with_header(request, "x-principal", "mallory");
    send(
        app,
        match token {
            Some(t) => bearer(request, t),
            None => request,
        },
    )
    .await
}

/// The log holds nothing: a refused request appended nothing.
async fn log_is_empty(store: &InMemoryStore<Project>) {
    let head = store.head().await.expect("head");
    assert_eq!(head.iter().map(|(_, n)| n).sum::<u64>(), 0, "a refused request appended");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bad_token_is_a_401_with_a_challenge_and_appends_nothing() {
    let a = app(hs_auth()).await;
    let expired = hs256(&json!({ "sub": "ann", "iss": ISSUER, "aud": AUDIENCE, "exp": now() - 3600 }));
    let not_yet =
        hs256(&json!({ "sub": "ann", "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 7200, "nbf": now() + 3600 }));
    let wrong_issuer =
        hs256(&json!({ "sub": "ann", "iss": "https://other.example", "aud": AUDIENCE, "exp": now() + 60 }));
    let wrong_audience = hs256(&json!({ "sub": "ann", "iss": ISSUER, "aud": "someone-else", "exp": now() + 60 }));
    let no_expiry = hs256(&json!({ "sub": "ann", "iss": ISSUER, "aud": AUDIENCE }));
    let no_subject = hs256(&json!({ "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 60 }));
    let wrong_secret = encode(
        &Header::new(Algorithm::HS256),
        &claims("ann"),
        &EncodingKey::from_secret(b"another-secret-of-thirty-two-bytes-at-least"),
    )
    .expect("token");
    // `alg: none`: a header and claims without a signature.
    let b64 = |v: Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let unsigned = format!("{}.{}.", b64(json!({ "alg": "none", "typ": "JWT" })), b64(claims("ann")));
    // Signed with an asymmetric key the HS256 configuration does not take.
    let other_alg = signed_with("jwt-ed-1.pem", Algorithm::EdDSA, Some("ed-1"), &claims("ann"));
    let cases = [
        ("expired", expired),
        ("not yet valid", not_yet),
        ("wrong issuer", wrong_issuer),
        ("wrong audience", wrong_audience),
        ("no expiry", no_expiry),
        ("no subject", no_subject),
        ("wrong signature", wrong_secret),
        ("alg none", unsigned),
        ("another algorithm", other_alg),
        ("garbage", "not.a.token".to_owned()),
    ];
    for (what, token) in &cases {
        let reply = create_with(&a.app, Some(token)).await;
        reply.assert_problem(401, "unauthorized");
        assert_eq!(reply.header("www-authenticate"), "Bearer realm=\"kes\", error=\"invalid_token\"", "{what}");
        let detail = reply.body["detail"].as_str().unwrap_or("");
        assert!(!detail.contains("exp") && !detail.contains("signature"), "{what}: the reason leaked: {detail}");
    }
    let reply = create_with(&a.app, None).await;
    reply.assert_problem(401, "unauthorized");
    assert_eq!(reply.header("www-authenticate"), "Bearer realm=\"kes\"");
    let reads = send(&a.app, empty("GET", "/projects")).await;
    reads.assert_problem(401, "unauthorized");
    log_is_empty(&a.store).await;
    // What stays open without a token.
    for open in ["/health", "/metrics", "/openapi.json"] {
        assert_eq!(send(&a.app, empty("GET", open)).await.status, StatusCode::OK, "{open}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_subject_is_the_principal_and_a_forged_header_is_ignored() {
    let a = app(hs_auth()).await;
    let token = hs256(&claims("ann"));
    let reply = create_with(&a.app, Some(&token)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let id = reply.header("location").trim_start_matches("/projects/").to_owned();
    let events = a.store.read(&id).await.expect("history");
    assert_eq!(events[0].metadata.principal.as_deref(), Some("ann"), "not the forged x-principal");
    let read = send(&a.app, bearer(empty("GET", &format!("/projects/{id}")), &token)).await;
    assert_eq!(read.status, StatusCode::OK);
    // Within the leeway, an expired token still passes; past it, not.
    let lenient = JwtAuth::hs256(SECRET).expect("secret").leeway(Duration::from_secs(120));
    let b = app(lenient).await;
    let just_expired = hs256(&json!({ "sub": "bob", "exp": now() - 30 }));
    assert_eq!(create_with(&b.app, Some(&just_expired)).await.status, StatusCode::CREATED);
    let long_expired = hs256(&json!({ "sub": "bob", "exp": now() - 600 }));
    create_with(&b.app, Some(&long_expired)).await.assert_problem(401, "unauthorized");
}

#[tokio::test(flavor = "multi_thread")]
async fn jwks_keys_verify_by_kid_and_rotate_when_the_file_changes() {
    let dir = tempfile::tempdir().expect("dir");
    let jwks = dir.path().join("jwks.json");
    std::fs::copy(fixture("jwks-1.json"), &jwks).expect("jwks");
    let a = app(JwtAuth::jwks_file(&jwks).expect("jwks").issuer(ISSUER).audience(AUDIENCE)).await;
    let ed1 = signed_with("jwt-ed-1.pem", Algorithm::EdDSA, Some("ed-1"), &claims("ann"));
    let ec1 = signed_with("jwt-ec-1.pem", Algorithm::ES256, Some("ec-1"), &claims("cy"));
    let ed2 = signed_with("jwt-ed-2.pem", Algorithm::EdDSA, Some("ed-2"), &claims("dee"));
    assert_eq!(create_with(&a.app, Some(&ed1)).await.status, StatusCode::CREATED, "EdDSA by kid");
    assert_eq!(create_with(&a.app, Some(&ec1)).await.status, StatusCode::CREATED, "ES256 by kid");
    create_with(&a.app, Some(&ed2)).await.assert_problem(401, "unauthorized");
    // A key under another key's kid, or without a kid among several keys.
    let ed2_as_ed1 = signed_with("jwt-ed-2.pem", Algorithm::EdDSA, Some("ed-1"), &claims("eve"));
    create_with(&a.app, Some(&ed2_as_ed1)).await.assert_problem(401, "unauthorized");
    let no_kid = signed_with("jwt-ed-1.pem", Algorithm::EdDSA, None, &claims("ann"));
    create_with(&a.app, Some(&no_kid)).await.assert_problem(401, "unauthorized");
    // HS256 signed with the public key's bytes must not pass (algorithm confusion).
    let x = std::fs::read_to_string(fixture("jwks-1.json")).expect("jwks");
    let confused =
        encode(&Header::new(Algorithm::HS256), &claims("eve"), &EncodingKey::from_secret(x.as_bytes())).expect("t");
    create_with(&a.app, Some(&confused)).await.assert_problem(401, "unauthorized");

    // Rotation: ed-2 replaces ed-1 in the file; no restart.
    std::fs::copy(fixture("jwks-2.json"), &jwks).expect("rotate");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while create_with(&a.app, Some(&ed2)).await.status != StatusCode::CREATED {
        assert!(std::time::Instant::now() < deadline, "the new key was not picked up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while create_with(&a.app, Some(&ed1)).await.status != StatusCode::UNAUTHORIZED {
        assert!(std::time::Instant::now() < deadline, "the retired key still verifies");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn configurations_that_cannot_be_safe_are_refused() {
    assert!(JwtAuth::hs256(b"short").is_err(), "a short HS256 secret");
    let dir = tempfile::tempdir().expect("dir");
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, r#"{"keys":[]}"#).expect("file");
    assert!(JwtAuth::jwks_file(&empty).is_err(), "a JWKS file without keys");
    let secret = dir.path().join("oct.json");
    std::fs::write(&secret, r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"s"}]}"#).expect("file");
    assert!(JwtAuth::jwks_file(&secret).is_err(), "a shared secret is not a public key");
    assert!(JwtAuth::jwks_file(dir.path().join("missing.json")).is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_document_says_which_operations_need_a_token() {
    let a = app(hs_auth()).await;
    let doc = send(&a.app, empty("GET", "/openapi.json")).await.body;
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    assert_eq!(doc["security"], json!([{ "bearer": [] }]));
    assert_eq!(
        doc["paths"]["/projects"]["post"]["responses"]["401"]["$ref"],
        "#/components/responses/kes.Unauthorized"
    );
    assert_eq!(
        doc["paths"]["/projects/{id}"]["get"]["responses"]["401"]["$ref"],
        "#/components/responses/kes.Unauthorized"
    );
    for open in ["/health", "/metrics", "/openapi.json"] {
        assert_eq!(doc["paths"][open]["get"]["security"], json!([]), "{open}");
    }
    let schema: Value = serde_json::from_str(include_str!("fixtures/oas-3.1-schema.json")).expect("fixture");
    let validator = jsonschema::draft202012::options().should_validate_formats(true).build(&schema).expect("schema");
    let errors: Vec<String> = validator.iter_errors(&doc).map(|e| format!("{e} at {}", e.instance_path())).collect();
    assert!(errors.is_empty(), "{errors:#?}");
    // Without authentication the document asks for nothing.
    let open = send(&harness().await.app, empty("GET", "/openapi.json")).await.body;
    assert!(open.get("security").is_none() && open["components"].get("securitySchemes").is_none());
}

/// Claims of a token for `sub` granting `roles`.
fn with_roles(sub: &str, roles: &[&str]) -> Value {
    let mut c = claims(sub);
    c["roles"] = json!(roles);
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn rules_see_the_tokens_roles_and_admin_endpoints_need_the_admin_role() {
    let guarded = resource().allow("archive", "only an archivist may archive", |who, _| who.has_role("archivist"));
    let App { app, store } = app_with(guarded, |api| {
        api.authenticate(hs_auth())
            .admin_role("operator")
            .admin(kes_http::AdminToken::new("an-operator-token-0123456789").expect("token"))
    })
    .await;

    let member = hs256(&claims("ann"));
    let created = create_with(&app, Some(&member)).await;
    let id = created.header("location").trim_start_matches("/projects/").to_owned();
    let archive = |token: &str| bearer(json("POST", &format!("/projects/{id}/archive"), json!({})), token);
    send(&app, archive(&member)).await.assert_problem(403, "forbidden");
    assert_eq!(store.read(&id).await.expect("read").len(), 1, "a refused command appends nothing");
    let archivist = hs256(&with_roles("ann", &["archivist"]));
    assert_eq!(send(&app, archive(&archivist)).await.status, StatusCode::OK);

    let admin_list = |token: Option<&str>| {
        let request = empty("GET", "/admin/projections");
        match token {
            Some(t) => bearer(request, t),
            None => request,
        }
    };
    send(&app, admin_list(None)).await.assert_problem(401, "unauthorized");
    send(&app, admin_list(Some(&member))).await.assert_problem(403, "forbidden");
    send(&app, admin_list(Some("not.a.token"))).await.assert_problem(401, "unauthorized");
    let operator = hs256(&with_roles("olga", &["operator"]));
    let listed = send(&app, admin_list(Some(&operator))).await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.body);
    assert!(listed.body["projections"].as_array().is_some_and(|p| !p.is_empty()));
    let by_token = send(&app, admin_list(Some("an-operator-token-0123456789"))).await;
    assert_eq!(by_token.status, StatusCode::OK, "the admin token still opens them");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_feed_takes_its_token_from_the_query_where_browsers_cannot_send_headers() {
    use tower::ServiceExt;
    let a = app(hs_auth()).await;
    let token = hs256(&claims("ann"));
    let open = |uri: String| {
        let app = a.app.clone();
        async move { app.oneshot(empty("GET", &uri)).await.expect("answer") }
    };
    let feed = open(format!("/projects/changes?access_token={token}")).await;
    assert_eq!(feed.status(), StatusCode::OK);
    assert!(feed.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    drop(feed);
    let created = create_with(&a.app, Some(&token)).await;
    let id = created.header("location").trim_start_matches("/projects/").to_owned();
    let item = open(format!("/projects/{id}/changes?access_token={token}")).await;
    assert_eq!(item.status(), StatusCode::OK);
    drop(item);
    assert_eq!(open("/projects/changes?access_token=not.a.token".into()).await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(open("/projects/changes".into()).await.status(), StatusCode::UNAUTHORIZED);
    // Only feeds take it: elsewhere a token belongs in the header.
    assert_eq!(open(format!("/projects?access_token={token}")).await.status(), StatusCode::UNAUTHORIZED);
    let doc = send(&a.app, empty("GET", "/openapi.json")).await.body;
    let params = doc["paths"]["/projects/changes"]["get"]["parameters"].as_array().expect("parameters").clone();
    assert!(params.iter().any(|p| p["name"] == "access_token"), "the document names the parameter");
}
