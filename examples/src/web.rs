//! The demo single-page app, embedded in the binary: `/` (and
//! `/index.html`), `/app.js` and `/app.css`, from `examples/web/`.
//!
//! Plain HTML, CSS and JavaScript with no build step. The page uses only
//! the public REST API (lists with filters, sort, search and paging;
//! writes with `If-Match`, `Idempotency-Key` and `KES-Position`; named
//! commands; audit history) and the Server-Sent Events feeds
//! (`/projects/changes`, `/projects/{id}/changes`), and works without the
//! feeds. It is served from the API's origin, so it needs no CORS.
//!
//! Mount it beside the API, behind the API's edge (as the `projects`
//! binary does):
//!
//! ```no_run
//! # async fn run(service: kes_examples::service::Service) -> anyhow::Result<()> {
//! use kes_examples::service::Role;
//! let app = service.api_for(Role::All)?.merge(kes_examples::web::router()).into_app();
//! # Ok(()) }
//! ```
//!
//! `scripts/browser-test.sh` drives it in Chromium (`examples/browser/`).

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// The page.
pub const INDEX_HTML: &str = include_str!("../web/index.html");
/// Its script.
pub const APP_JS: &str = include_str!("../web/app.js");
/// Its style sheet.
pub const APP_CSS: &str = include_str!("../web/app.css");

/// What the page may load and talk to: itself only.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; \
     script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// The routes of the page and its two assets; no fallback, so it merges
/// into the API's router (whose fallback answers every other path).
pub fn router() -> Router {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/index.html", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/app.css", get(|| async { asset("text/css; charset=utf-8", APP_CSS) }))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Revalidated on every load: a new binary serves its own page at once.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{Service, Settings};

    #[test]
    fn the_page_loads_what_is_served() {
        assert!(INDEX_HTML.contains(r#"src="/app.js""#));
        assert!(INDEX_HTML.contains(r#"href="/app.css""#));
    }

    /// Mounted beside the API, the page answers at `/` and the API keeps
    /// every other path (and its problem answers for unknown ones).
    #[tokio::test]
    async fn served_beside_the_api() {
        let dir = tempfile::tempdir().unwrap();
        let url = |name: &str| format!("sqlite://{}", dir.path().join(name).display());
        let service = Service::open(&Settings::new(url("events.db"), url("views.db"))).await.unwrap();
        let app = service.router().unwrap().merge(router());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let client = reqwest::Client::new();
        for (path, media, body) in [
            ("/", "text/html", INDEX_HTML),
            ("/index.html", "text/html", INDEX_HTML),
            ("/app.js", "text/javascript", APP_JS),
            ("/app.css", "text/css", APP_CSS),
        ] {
            let response = client.get(format!("{base}{path}")).send().await.unwrap();
            assert_eq!(response.status(), 200, "{path}");
            let content_type = response.headers()[header::CONTENT_TYPE].to_str().unwrap().to_owned();
            assert!(content_type.starts_with(media), "{path}: {content_type}");
            assert!(response.headers().contains_key(header::CONTENT_SECURITY_POLICY), "{path}");
            assert_eq!(response.text().await.unwrap(), body, "{path}");
        }
        let list = client.get(format!("{base}/projects")).send().await.unwrap();
        assert_eq!(list.status(), 200);
        let unknown = client.get(format!("{base}/no-such-page")).send().await.unwrap();
        assert_eq!(unknown.status(), 404);
        assert_eq!(unknown.headers()[header::CONTENT_TYPE], "application/problem+json");
        server.abort();
    }
}
