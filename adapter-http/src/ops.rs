//! The operations endpoints: the OpenAPI document, `/health` and
//! `/metrics`, and the type-erased side of each mount they report on.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use kes_core::{Aggregate, CommandBus, CommandError, EventStore, ListView, StoreError, StoreGauge};
use schemars::JsonSchema;
use serde_json::{Map, Value, json};

use crate::api::{Mount, ProjectionStatusSource, ReactionStatusSource, Readiness, Shared};
use crate::error::{HttpError, RETRY_AFTER_SECS};
use crate::request::json_response;
use crate::resource::Resource;

pub(crate) async fn openapi_json(document: Arc<Value>) -> Response {
    json_response(StatusCode::OK, document.as_ref())
}

/// What `/health` and `/metrics` need.
pub(crate) struct Service {
    pub(crate) mounts: Vec<Arc<dyn Mount>>,
    pub(crate) sources: Vec<Arc<dyn ProjectionStatusSource>>,
    pub(crate) reactions: Vec<Arc<dyn ReactionStatusSource>>,
    pub(crate) checks: Vec<(String, Arc<dyn Readiness>)>,
    pub(crate) shared: Arc<Shared>,
}

pub(crate) async fn health(State(service): State<Arc<Service>>) -> Response {
    let checks = futures::future::join_all(service.mounts.iter().map(|m| m.readiness())).await;
    let extra = futures::future::join_all(service.checks.iter().map(|(name, check)| async move {
        let up = tokio::time::timeout(Duration::from_secs(2), check.ready()).await.unwrap_or(false);
        (name.clone(), up)
    }))
    .await;
    let mut ok = true;
    let mut out = Map::new();
    for (name, up) in checks.into_iter().flatten().chain(extra) {
        ok &= up;
        out.insert(name, json!(if up { "up" } else { "down" }));
    }
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let mut response =
        json_response(status, &json!({ "status": if ok { "ok" } else { "unavailable" }, "checks": out }));
    if !ok {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    }
    response
}

pub(crate) async fn metrics_text(State(service): State<Arc<Service>>) -> Response {
    for source in &service.sources {
        let polled = tokio::time::timeout(Duration::from_secs(2), source.projection_status()).await;
        match polled {
            Ok(Ok(statuses)) => service.shared.metrics.projections(&statuses),
            Ok(Err(e)) => tracing::warn!(error = %e, "projection status unavailable for /metrics"),
            Err(_) => tracing::warn!("projection status timed out for /metrics"),
        }
    }
    for source in &service.reactions {
        match tokio::time::timeout(Duration::from_secs(2), source.reaction_status(0)).await {
            Ok(Ok(statuses)) => service.shared.metrics.reactions(&statuses),
            Ok(Err(e)) => tracing::warn!(error = %e, "reaction status unavailable for /metrics"),
            Err(_) => tracing::warn!("reaction status timed out for /metrics"),
        }
    }
    for mount in &service.mounts {
        let (aggregate, gauges) = mount.store_gauges();
        service.shared.metrics.store(aggregate, &gauges);
    }
    let mut response = service.shared.metrics.render().into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    response
}

/// The bus of a mount, without knowing `S`: pings its store, records
/// erasures.
#[async_trait]
pub(crate) trait Ping: Send + Sync {
    async fn ping(&self) -> Result<(), StoreError>;
    fn gauges(&self) -> Vec<StoreGauge>;
    /// Appends the erasure of `subject` to aggregate `id`: the position
    /// token of the append, `None` when the aggregate does not exist or
    /// was deleted.
    async fn record_erasure(&self, id: &str, subject: &str) -> Result<Option<String>, HttpError>;
}

pub(crate) struct StorePing<A: Aggregate, S> {
    pub(crate) bus: Arc<CommandBus<A, S>>,
}

#[async_trait]
impl<A: Aggregate, S: EventStore<A>> Ping for StorePing<A, S> {
    async fn ping(&self) -> Result<(), StoreError> {
        self.bus.store().ping().await
    }

    fn gauges(&self) -> Vec<StoreGauge> {
        self.bus.store().gauges()
    }

    async fn record_erasure(&self, id: &str, subject: &str) -> Result<Option<String>, HttpError> {
        match self.bus.record_erasure(id, subject).await {
            Ok(appended) => Ok(appended.map(|a| crate::request::position_text(A::NAME, a.position))),
            Err(CommandError::Store(e)) => Err(HttpError::from(e)),
            Err(other) => Err(HttpError::Internal(other.to_string())),
        }
    }
}

/// The type-erased side of a mount: docs and readiness.
pub(crate) struct MountedDescription<A: Aggregate> {
    pub(crate) resource: Resource<A>,
    pub(crate) schema: kes_core::ViewSchema,
    pub(crate) bus_store: Arc<dyn Ping>,
    pub(crate) view: Arc<dyn ListView>,
}

#[async_trait]
impl<A: Aggregate + JsonSchema> Mount for MountedDescription<A> {
    fn plural(&self) -> &str {
        &self.resource.plural
    }

    fn store_gauges(&self) -> (&'static str, Vec<StoreGauge>) {
        (A::NAME, self.bus_store.gauges())
    }

    async fn record_erasure(
        &self,
        aggregate: &str,
        id: &str,
        subject: &str,
    ) -> Option<Result<Option<String>, HttpError>> {
        if aggregate != A::NAME {
            return None;
        }
        Some(self.bus_store.record_erasure(id, subject).await)
    }

    async fn readiness(&self) -> Vec<(String, bool)> {
        let probe = Duration::from_secs(2);
        let store = tokio::time::timeout(probe, self.bus_store.ping()).await;
        let view = tokio::time::timeout(probe, self.view.position()).await;
        if let Ok(Err(e)) = &store {
            tracing::warn!(aggregate = A::NAME, error = %e, "store not ready");
        }
        if let Ok(Err(e)) = &view {
            tracing::warn!(aggregate = A::NAME, error = %e, "list view not ready");
        }
        vec![
            (format!("{}.store", self.resource.plural), matches!(store, Ok(Ok(_)))),
            (format!("{}.view", self.resource.plural), matches!(view, Ok(Ok(_)))),
        ]
    }
}
