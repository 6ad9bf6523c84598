//! The cost of bearer JWT verification: the projects routes behind
//! `Api::authenticate` (HS256, issuer checked) against the same routes
//! without it, over one service (the same store, bus and view), with 64
//! keep-alive clients; GET by id and PATCH, rounds alternated.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kes_http::{Api, HttpConfig, JwtAuth};

use crate::load::{self, Verb};
use crate::{Measured, Plan, median};

const CLIENTS: usize = 64;
const SECRET: &[u8] = b"the-secret-of-the-authentication-scenario";
const ISSUER: &str = "https://login.example";

/// Requests per second with a token verified on every request, against
/// none; `verb` on the projects `ids` of `service`.
// Kept in one piece: A scenario reads top to bottom (seed, measure KES, measure the baseline, clean up); split,
// its steps would hand each other every local.
pub async fn measure(
    plan: Plan,
    service: &kes_examples::service::Service,
    ids: &[String],
    verb: Verb,
) -> anyhow::Result<Measured> {
    let app = |auth: Option<JwtAuth>| -> anyhow::Result<kes_http::App> {
        let api = Api::new(HttpConfig::default()).mount(
            kes_examples::resources::projects(),
            Arc::clone(&service.projects.bus),
            service.projects.view.clone(),
            service.projects.runner.clone(),
        )?;
        Ok(match auth {
            Some(auth) => api.authenticate(auth),
            None => api,
        }
        .into_app())
    };
    let auth = JwtAuth::hs256(SECRET)?.issuer(ISSUER);
    let guarded = load::serve(app(Some(auth))?).await?;
    let open = load::serve(app(None)?).await?;
    let exp = chrono::Utc::now().timestamp() + 24 * 3600;
    let claims = serde_json::json!({ "sub": "bench", "iss": ISSUER, "exp": exp, "roles": ["member"] });
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET),
    )?;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse().context("a header value")?);
    let with_token = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .default_headers(headers)
        .build()?;
    let without = load::client(CLIENTS)?;
    let guarded_urls: Vec<String> = ids.iter().map(|id| format!("{}/projects/{id}", guarded.base)).collect();
    let open_urls: Vec<String> = ids.iter().map(|id| format!("{}/projects/{id}", open.base)).collect();
    let warm = Duration::from_millis(500);
    load::concurrent(&with_token, verb, &guarded_urls, CLIENTS, warm, u64::MAX).await?;
    load::concurrent(&without, verb, &open_urls, CLIENTS, warm, u64::MAX).await?;
    let mut kes = Vec::new();
    let mut baseline = Vec::new();
    for round in 0..plan.rounds {
        let k = || load::concurrent(&with_token, verb, &guarded_urls, CLIENTS, plan.round, u64::MAX);
        let b = || load::concurrent(&without, verb, &open_urls, CLIENTS, plan.round, u64::MAX);
        if round % 2 == 0 {
            kes.push(k().await?);
            baseline.push(b().await?);
        } else {
            baseline.push(b().await?);
            kes.push(k().await?);
        }
    }
    let what = match verb {
        Verb::Get => "GET /projects/{id}",
        Verb::PatchName => "PATCH /projects/{id} {\"name\"}",
        Verb::PatchOwner => "PATCH /projects/{id} {\"owner\"}",
        Verb::PatchDescription => "PATCH /projects/{id} {\"description\"}",
    };
    Ok(Measured {
        smaller: None,
        kes: median(kes),
        baseline: median(baseline),
        note: format!(
            "{what}, 64 clients, PostgreSQL store: every request carries a bearer JWT (HS256, issuer and expiry \
             checked, subject recorded as the principal) against the same routes without authentication"
        ),
    })
}
