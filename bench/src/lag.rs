//! Projection lag under sustained write load: how long after a command is
//! acknowledged the projects view has applied it, with commands arriving at
//! half the write capacity measured just before, in one process that
//! writes and projects (role `all`) and in two (an `api` process writes, a
//! `projector` process projects; both on one PostgreSQL database, each
//! with its own connections, as separate processes would be).
//!
//! Commands go through the command bus, not HTTP, so that the load is
//! paced exactly; the lag of a command is from its acknowledgement to the
//! moment the projecting process's runner reports its position applied
//! (`CatchUp::wait_for`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kes_core::{CatchUp, ExpectedVersion, Metadata};
use kes_examples::domain::ProjectCommand;
use kes_examples::service::{Role, Service, Settings};

use crate::scenarios::{create_projects, named};
use crate::{Measured, Plan, median};

const CLIENTS: usize = 64;

/// Lag percentiles of one setup, in milliseconds.
struct Lags {
    p50: f64,
    p99: f64,
    commands: usize,
}

/// Split roles (kes) against one process (baseline), p99 in ms, on two
/// fresh databases `single_url` and `split_url`.
pub async fn measure(plan: Plan, single_url: String, split_url: String) -> anyhow::Result<Measured> {
    let single = Service::open(&Settings::new(single_url.clone(), single_url)).await?;
    single.start_projections().await?;
    let ids = create_projects(&single, "l").await?;
    let capacity = capacity(&single, &ids, plan.round).await?;
    let rate = capacity / 2.0;
    let length = plan.round * plan.rounds as u32;
    let single_lags = paced(&single, single.projects.runner.clone(), &ids, rate, length).await;
    single.shutdown().await;
    let single_lags = single_lags?;

    let mut projector_settings = Settings::new(split_url.clone(), split_url.clone());
    projector_settings.role = Role::Projector;
    let projector = Service::open(&projector_settings).await?;
    projector.start_projections().await?;
    let mut api_settings = Settings::new(split_url.clone(), split_url);
    api_settings.role = Role::Api;
    let api = Service::open(&api_settings).await?;
    let split_lags = match create_projects(&api, "s").await {
        Ok(ids) => paced(&api, projector.projects.runner.clone(), &ids, rate, length).await,
        Err(e) => Err(e),
    };
    api.shutdown().await;
    projector.shutdown().await;
    let split_lags = split_lags?;
    Ok(Measured {
        smaller: None,
        kes: split_lags.p99,
        baseline: single_lags.p99,
        note: format!(
            "PATCH-like ProjectCommand::Update through the command bus on 64 projects at {rate:.0} commands/s (half of \
             the {capacity:.0}/s that 64 unpaced writers reached on the single process), PostgreSQL store and views; \
             lag = acknowledgement → the projecting runner reports the position applied; kes: an api process \
             writing and a projector process projecting (its store learns of the other process's appends by \
             polling), p50 {:.1} ms, p99 {:.1} ms over {} commands; baseline: one process doing both, p50 {:.1} ms, \
             p99 {:.1} ms over {} commands; ratio = baseline p99 / kes p99",
            split_lags.p50, split_lags.p99, split_lags.commands, single_lags.p50, single_lags.p99, single_lags.commands,
        ),
    })
}

/// Commands per second that 64 unpaced writers reach for `length`.
async fn capacity(service: &Service, ids: &[String], length: Duration) -> anyhow::Result<f64> {
    let started = Instant::now();
    let writers: Vec<_> = ids
        .iter()
        .map(|id| {
            let bus = Arc::clone(&service.projects.bus);
            let id = id.clone();
            tokio::spawn(async move {
                let mut done = 0u64;
                while started.elapsed() < length {
                    let command = ProjectCommand::Update(named(&format!("{id} {done}")));
                    bus.execute(&id, command, ExpectedVersion::Any, Metadata::default()).await?;
                    done += 1;
                }
                anyhow::Ok(done)
            })
        })
        .collect();
    let mut total = 0;
    for writer in writers {
        total += writer.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Sends commands at `rate` per second for `length` (writer i sends its
/// k-th command at (k·64 + i) / rate), and measures each one's lag on
/// `projecting`.
// Kept in one piece: the pacing loop and the lag watchers share the schedule, the clock and the sample list; split,
// each half would take all of them as arguments.
async fn paced(
    service: &Service,
    projecting: Arc<dyn CatchUp>,
    ids: &[String],
    rate: f64,
    length: Duration,
) -> anyhow::Result<Lags> {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let start = tokio::time::Instant::now();
    let writers: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let bus = Arc::clone(&service.projects.bus);
            let id = id.clone();
            let projecting = Arc::clone(&projecting);
            let samples = Arc::clone(&samples);
            tokio::spawn(async move {
                let mut watchers = Vec::new();
                for k in 0u64.. {
                    let due = Duration::from_secs_f64((k as f64 * CLIENTS as f64 + i as f64) / rate);
                    if due >= length {
                        break;
                    }
                    tokio::time::sleep_until(start + due).await;
                    let command = ProjectCommand::Update(named(&format!("{id} {k}")));
                    let outcome = bus.execute(&id, command, ExpectedVersion::Any, Metadata::default()).await?;
                    let acknowledged = Instant::now();
                    let position =
                        outcome.position.ok_or_else(|| anyhow::anyhow!("{id}: the command appended nothing"))?;
                    let projecting = Arc::clone(&projecting);
                    let samples = Arc::clone(&samples);
                    watchers.push(tokio::spawn(async move {
                        let applied = projecting.wait_for(position, Duration::from_secs(30)).await;
                        let lag = acknowledged.elapsed().as_secs_f64() * 1000.0;
                        if applied {
                            samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(lag);
                        }
                        applied
                    }));
                }
                for watcher in watchers {
                    anyhow::ensure!(watcher.await?, "{id}: a command was not projected within 30 s");
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for writer in writers {
        writer.await??;
    }
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    anyhow::ensure!(!samples.is_empty(), "no command was measured");
    let commands = samples.len();
    let p99 = percentile(samples.clone(), 0.99);
    Ok(Lags { p50: median(samples), p99, commands })
}

/// The `q` quantile of `values` (nearest rank).
fn percentile(mut values: Vec<f64>, q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let rank = ((values.len() as f64 * q).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}
