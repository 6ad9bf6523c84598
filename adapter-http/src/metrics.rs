//! Prometheus metrics through the `metrics` facade.

use std::sync::Arc;
use std::time::Duration;

use kes_core::{ProjectionStatus, ReactionStatus, StoreGauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// Commands handled, by aggregate, command and outcome.
pub const COMMANDS_TOTAL: &str = "kes_commands_total";
/// Command latency in seconds (a histogram), by aggregate, command and outcome.
pub const COMMAND_SECONDS: &str = "kes_command_duration_seconds";
/// Log records a projection has not applied yet, by projection.
pub const PROJECTION_LAG: &str = "kes_projection_lag";
/// 1 while a projection's last batch failed, by projection.
pub const PROJECTION_FAILING: &str = "kes_projection_failing";
/// 1 while this process leads a projection (holds its view's lease), 0
/// while it stands by, by projection; absent where no projection runs.
pub const PROJECTION_LEADER: &str = "kes_projection_leader";

/// Source records a reaction has not handled yet, by reaction and source
/// aggregate type.
pub const REACTION_LAG: &str = "kes_reaction_lag";
/// 1 while a reaction is stopped by a failure (retrying), by reaction and
/// source.
pub const REACTION_FAILING: &str = "kes_reaction_failing";
/// 1 while this process runs a reaction (holds its lease), 0 while it
/// stands by.
pub const REACTION_LEADER: &str = "kes_reaction_leader";
/// Commands a reaction sent since this process started, by reaction,
/// source and outcome (`sent`, `deduplicated`, `refused`).
pub const REACTION_COMMANDS: &str = "kes_reaction_commands_total";
/// Transient failures a reaction retried since this process started.
pub const REACTION_RETRIES: &str = "kes_reaction_retries_total";
/// Refused commands a reaction's journal holds, by reaction and source.
pub const REACTION_REFUSED: &str = "kes_reaction_refused";

/// Change feeds open now, by aggregate.
pub const FEEDS_OPEN: &str = "kes_feeds_open";
/// Change feed clients cut off for reading too slowly, by aggregate.
pub const FEEDS_DROPPED: &str = "kes_feed_clients_dropped_total";

const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// Where the API records: a recorder of its own (so that several APIs in
/// one process, as in tests, do not mix), or the process-wide one.
#[derive(Clone)]
pub(crate) struct Metrics {
    own: Option<Arc<PrometheusRecorder>>,
    handle: PrometheusHandle,
}

impl Metrics {
    pub(crate) fn local() -> Self {
        let builder = PrometheusBuilder::new();
        // Bucket values are constants known to be valid; fall back to summaries otherwise.
        let builder = match builder.set_buckets_for_metric(Matcher::Full(COMMAND_SECONDS.into()), &BUCKETS) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "histogram buckets refused");
                PrometheusBuilder::new()
            }
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        Self { own: Some(Arc::new(recorder)), handle }
    }

    pub(crate) fn global(handle: PrometheusHandle) -> Self {
        Self { own: None, handle }
    }

    fn record(&self, f: impl FnOnce()) {
        match &self.own {
            Some(r) => metrics::with_local_recorder(r.as_ref(), f),
            None => f(),
        }
    }

    pub(crate) fn command(&self, aggregate: &'static str, command: &str, outcome: &'static str, took: Duration) {
        let command = command.to_owned();
        self.record(|| {
            let labels = [("aggregate", aggregate.to_owned()), ("command", command), ("outcome", outcome.to_owned())];
            metrics::counter!(COMMANDS_TOTAL, &labels).increment(1);
            metrics::histogram!(COMMAND_SECONDS, &labels).record(took.as_secs_f64());
        });
    }

    /// Counts a feed as open until the guard is dropped.
    pub(crate) fn feed_opened(&self, aggregate: &'static str) -> FeedOpen {
        self.record(|| metrics::gauge!(FEEDS_OPEN, "aggregate" => aggregate).increment(1.0));
        FeedOpen { metrics: self.clone(), aggregate }
    }

    pub(crate) fn feed_dropped(&self, aggregate: &'static str) {
        self.record(|| metrics::counter!(FEEDS_DROPPED, "aggregate" => aggregate).increment(1));
    }

    pub(crate) fn projections(&self, statuses: &[ProjectionStatus]) {
        self.record(|| {
            for s in statuses {
                let labels = [("projection", s.name.clone())];
                metrics::gauge!(PROJECTION_LAG, &labels).set(s.lag as f64);
                metrics::gauge!(PROJECTION_FAILING, &labels).set(if s.last_error.is_some() { 1.0 } else { 0.0 });
                if let Some(leads) = s.leads {
                    metrics::gauge!(PROJECTION_LEADER, &labels).set(if leads { 1.0 } else { 0.0 });
                }
            }
        });
    }

    pub(crate) fn reactions(&self, statuses: &[ReactionStatus]) {
        self.record(|| {
            for r in statuses {
                let labels = [("reaction", r.reaction.clone()), ("source", r.source.clone())];
                let s = &r.status;
                metrics::gauge!(REACTION_LAG, &labels).set(s.lag as f64);
                metrics::gauge!(REACTION_FAILING, &labels).set(if s.last_error.is_some() { 1.0 } else { 0.0 });
                if let Some(leads) = s.leads {
                    metrics::gauge!(REACTION_LEADER, &labels).set(if leads { 1.0 } else { 0.0 });
                }
                metrics::gauge!(REACTION_REFUSED, &labels).set(r.refused_total as f64);
                metrics::counter!(REACTION_RETRIES, &labels).absolute(r.counts.retries);
                for (outcome, n) in
                    [("sent", r.counts.sent), ("deduplicated", r.counts.deduplicated), ("refused", r.counts.refused)]
                {
                    let labels = [
                        ("reaction", r.reaction.clone()),
                        ("source", r.source.clone()),
                        ("outcome", outcome.to_owned()),
                    ];
                    metrics::counter!(REACTION_COMMANDS, &labels).absolute(n);
                }
            }
        });
    }

    /// What a store reports, as `kes_store_{name}` gauges labelled with
    /// the aggregate type.
    pub(crate) fn store(&self, aggregate: &'static str, gauges: &[StoreGauge]) {
        self.record(|| {
            for g in gauges {
                let mut labels = vec![("aggregate", aggregate.to_owned())];
                labels.extend(g.labels.iter().map(|(k, v)| (*k, v.clone())));
                metrics::gauge!(format!("kes_store_{}", g.name), &labels).set(g.value);
            }
        });
    }

    pub(crate) fn render(&self) -> String {
        self.handle.render()
    }
}

/// An open change feed, counted in [`FEEDS_OPEN`] until dropped.
pub(crate) struct FeedOpen {
    metrics: Metrics,
    aggregate: &'static str,
}

impl Drop for FeedOpen {
    fn drop(&mut self) {
        let aggregate = self.aggregate;
        self.metrics.record(|| metrics::gauge!(FEEDS_OPEN, "aggregate" => aggregate).decrement(1.0));
    }
}
