//! Several instances of the projects service on one Kafka broker and one
//! topic prefix, as a deployment behind a load balancer would run them,
//! beside the same load on a single instance.
//!
//! Every instance is a whole [`Service`] of its own (its own Kafka stores,
//! its own SQLite views in its own directory) served on its own listener;
//! they share only the topics. On this one host three instances add no
//! CPU: the ratio shows what sharing the log costs (every instance follows
//! every partition, and an append that finds other instances' records in
//! its partition is checked against them), not how a deployment on
//! separate hosts scales.

use std::time::{Duration, Instant};

use anyhow::Context;
use kes_core::{Aggregate, EventStore, ExpectedVersion, Metadata};
use kes_examples::domain::{Project, ProjectCommand, ProjectFields};
use kes_examples::service::{Service, Settings};
use kes_store_kafka::KafkaStoreConfig;

use crate::backends::Kafka;
use crate::load::{self, Server};
use crate::{Measured, Missing, Plan, median};

/// Concurrent clients, each PATCHing a project of its own.
const CLIENTS: usize = 64;
/// Instances of the measured deployment.
pub const INSTANCES: usize = 3;
/// How long every instance may take to see every created project.
const VISIBLE_WITHIN: Duration = Duration::from_secs(60);

/// One instance: a service, its listener, its view directory.
struct Instance {
    service: Service,
    server: Server,
    _dir: tempfile::TempDir,
}

/// `n` instances on one topic prefix, with one project per client: client
/// `i` PATCHes project `i` on instance `i % n`, where it was created.
struct Deployment {
    instances: Vec<Instance>,
    ids: Vec<String>,
    events_topic: String,
}

impl Deployment {
    async fn open(brokers: &str, n: usize, tag: &str) -> anyhow::Result<Self> {
        let store = format!("kafka://{brokers}?prefix={}", Kafka::prefix(tag));
        let events_topic = KafkaStoreConfig::from_url(&store)?.events_topic(Project::NAME);
        let mut instances = Vec::with_capacity(n);
        // One after the other: the first creates the topics.
        for k in 0..n {
            let dir = tempfile::tempdir()?;
            let view = format!("sqlite://{}/views.db", dir.path().display());
            let service = Service::open(&Settings::new(store.clone(), view))
                .await
                .with_context(|| format!("opening instance {k}"))?;
            let server = load::serve(service.app()?).await?;
            instances.push(Instance { service, server, _dir: dir });
        }
        let ids: Vec<String> = (0..CLIENTS).map(|i| format!("{tag}{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            let fields = ProjectFields { name: Some(id.clone()), ..ProjectFields::default() };
            instances[i % n]
                .service
                .projects
                .bus
                .execute(id, ProjectCommand::Create(fields), ExpectedVersion::NoStream, Metadata::default())
                .await
                .with_context(|| format!("creating project {id} on instance {}", i % n))?;
        }
        // Every instance follows every partition: each sees every project.
        let deadline = Instant::now() + VISIBLE_WITHIN;
        for (k, instance) in instances.iter().enumerate() {
            for id in &ids {
                while instance.service.projects.store.load(id).await?.is_none() {
                    anyhow::ensure!(
                        Instant::now() < deadline,
                        "instance {k} of {n} did not see project {id} within {VISIBLE_WITHIN:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        Ok(Self { instances, ids, events_topic })
    }

    fn urls(&self) -> Vec<String> {
        let n = self.instances.len();
        self.ids
            .iter()
            .enumerate()
            .map(|(i, id)| format!("{}/projects/{id}", self.instances[i % n].server.base))
            .collect()
    }

    /// Records of the events topic that are not valid events of the
    /// projects (each command appends one record: the projects' versions
    /// summed): lost races the command bus decided again, or anything
    /// else a store writes there.
    async fn records_beyond_events(&self, kafka: &Kafka) -> anyhow::Result<u64> {
        let n = self.instances.len();
        let mut events = 0u64;
        for (i, id) in self.ids.iter().enumerate() {
            let snapshot = self.instances[i % n].service.projects.store.load(id).await?;
            events += snapshot.with_context(|| format!("project {id} is gone"))?.version;
        }
        let records = kafka.records(&self.events_topic).await?;
        Ok(records.saturating_sub(events))
    }

    async fn shutdown(self) {
        for instance in self.instances {
            instance.service.shutdown().await;
        }
    }
}

/// `HTTP PATCH, 64 clients, Kafka, 3 instances vs 1`: the same PATCH load
/// (one project per client, no `If-Match`) on three instances sharing one
/// topic prefix and on one instance alone (its own prefix on the same
/// broker), in alternating rounds.
pub async fn kafka_patch_instances(plan: Plan, client: &reqwest::Client, kafka: &Kafka) -> Result<Measured, Missing> {
    let limit = Duration::from_secs(if plan.quick { 300 } else { 900 });
    match tokio::time::timeout(limit, measure(plan, client, kafka)).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(Missing::Failed(anyhow::anyhow!("timed out after {} s", limit.as_secs()))),
    }
}

async fn measure(plan: Plan, client: &reqwest::Client, kafka: &Kafka) -> anyhow::Result<Measured> {
    let many = Deployment::open(&kafka.brokers, INSTANCES, "inst3").await?;
    let one = Deployment::open(&kafka.brokers, 1, "inst1").await?;
    let (many_urls, one_urls) = (many.urls(), one.urls());
    // Warm-up of both.
    load::concurrent_patch_counting_conflicts(client, &many_urls, CLIENTS, Duration::from_millis(500)).await?;
    load::concurrent_patch_counting_conflicts(client, &one_urls, CLIENTS, Duration::from_millis(500)).await?;
    let (mut many_rates, mut one_rates) = (Vec::new(), Vec::new());
    let (mut many_conflicts, mut one_conflicts) = (0u64, 0u64);
    for round in 0..plan.rounds {
        // Alternate which side goes first so drift hits both alike.
        for side in [round % 2, 1 - round % 2] {
            let urls = if side == 0 { &many_urls } else { &one_urls };
            let (rate, conflicts) =
                load::concurrent_patch_counting_conflicts(client, urls, CLIENTS, plan.round).await?;
            let label = if side == 0 { "3 instances" } else { "1 instance" };
            eprintln!("  {label}: {rate:.0} req/s, {conflicts} answered 409/412");
            if side == 0 {
                many_rates.push(rate);
                many_conflicts += conflicts;
            } else {
                one_rates.push(rate);
                one_conflicts += conflicts;
            }
        }
    }
    let many_void = many.records_beyond_events(kafka).await?;
    let one_void = one.records_beyond_events(kafka).await?;
    many.shutdown().await;
    one.shutdown().await;
    anyhow::ensure!(
        many_conflicts == 0 && one_conflicts == 0,
        "PATCH without If-Match answered 409/412: {many_conflicts} times on 3 instances, {one_conflicts} on 1"
    );
    Ok(Measured {
        smaller: None,
        kes: median(many_rates),
        baseline: median(one_rates),
        note: format!(
            "PATCH {{\"name\"}} (one Renamed) on 64 projects, one per client, no If-Match; kes: three projects \
             services (each with its own Kafka stores and SQLite views, the command path only) on one broker and \
             topic prefix, served on three listeners, client i on instance i % 3, which created project i, every \
             instance following every partition; baseline: the same 64 clients on one such service alone on a \
             prefix of its own, same broker, same process; ratio = 3 instances / 1. Answers 409/412: 0 on either \
             side (any would fail the line). Records in the events topic beyond the projects' events (lost races \
             re-decided by the bus): {many_void} with 3 instances, {one_void} with 1"
        ),
    })
}
