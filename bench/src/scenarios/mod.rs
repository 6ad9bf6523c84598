//! The scenarios, each beside its baseline: the harness (a running
//! service, seeded data, the run order) here, the scenarios of each backend
//! in their own module.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, patch};
use kes_core::{Aggregate, EventStore, ExpectedVersion, Metadata};
use kes_examples::domain::{Project, ProjectCommand, ProjectEvent, ProjectFields};
use kes_examples::service::{Service, Settings};

use kafka::{
    kafka_get, kafka_history, kafka_patch, kafka_patch_instances, kafka_projections, kafka_seed_loop, kafka_table,
};
use postgres::{personal_rebuild, pg_feeds, pg_get, pg_jwt, pg_lag, pg_patch, pg_personal, pg_seed_loop, sql_rebuild};
use search::tantivy_rebuild;

use crate::backends::{Kafka, Postgres};
use crate::load::{self, Server, Verb};
use crate::{Better, Measured, Missing, Outcome, Plan, Spec, median, outcome};

pub(crate) const CLIENTS: usize = 64;

/// A running projects service with 64 created projects.
pub(crate) struct Live {
    pub(crate) service: Service,
    pub(crate) server: Server,
    pub(crate) ids: Vec<String>,
    pub(crate) _dir: tempfile::TempDir,
}

impl Live {
    pub(crate) async fn open(store: String, view: Option<String>, tag: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let view = view.unwrap_or_else(|| format!("sqlite://{}/views.db", dir.path().display()));
        let service = Service::open(&Settings::new(store, view)).await?;
        let server = load::serve(service.app()?).await?;
        let ids = create_projects(&service, tag).await?;
        Ok(Self { service, server, ids, _dir: dir })
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        self.ids.iter().map(|id| format!("{}/projects/{id}", self.server.base)).collect()
    }
}

/// Creates 64 projects named `{tag}0`…`{tag}63` through `service`'s bus;
/// their ids.
pub(crate) async fn create_projects(service: &Service, tag: &str) -> anyhow::Result<Vec<String>> {
    let ids: Vec<String> = (0..CLIENTS).map(|i| format!("{tag}{i}")).collect();
    for id in &ids {
        service
            .projects
            .bus
            .execute(id, ProjectCommand::Create(named(id)), ExpectedVersion::NoStream, Metadata::default())
            .await
            .with_context(|| format!("creating project {id}"))?;
    }
    Ok(ids)
}

pub(crate) fn named(name: &str) -> ProjectFields {
    ProjectFields { name: Some(name.to_owned()), ..ProjectFields::default() }
}

/// The services, opened once and shared by the scenarios.
pub(crate) struct Ctx {
    pub(crate) plan: Plan,
    pub(crate) client: reqwest::Client,
    pub(crate) pg: Result<Postgres, String>,
    pub(crate) kafka: Result<Kafka, String>,
    pub(crate) pg_live: Option<Live>,
    pub(crate) kafka_live: Option<Live>,
    pub(crate) seeded: Option<Seeded>,
}

/// A PostgreSQL database holding `plan.aggregates` created projects.
pub(crate) struct Seeded {
    pub(crate) url: String,
    pub(crate) states: Vec<(String, Project)>,
}

impl Ctx {
    pub(crate) fn pg(&mut self) -> Result<&mut Postgres, Missing> {
        self.pg.as_mut().map_err(|why| Missing::Skip(why.clone()))
    }

    pub(crate) fn kafka(&self) -> Result<&Kafka, Missing> {
        self.kafka.as_ref().map_err(|why| Missing::Skip(why.clone()))
    }

    pub(crate) async fn pg_live(&mut self) -> Result<&Live, Missing> {
        if self.pg_live.is_none() {
            let url = self.pg()?.fresh("live").await?;
            self.pg_live = Some(Live::open(url.clone(), Some(url), "p").await?);
        }
        self.pg_live.as_ref().ok_or_else(|| Missing::Failed(anyhow::anyhow!("no service")))
    }

    pub(crate) async fn kafka_live(&mut self) -> Result<&Live, Missing> {
        if self.kafka_live.is_none() {
            let brokers = self.kafka()?.brokers.clone();
            let url = format!("kafka://{brokers}?prefix={}", Kafka::prefix("live"));
            self.kafka_live = Some(Live::open(url, None, "k").await?);
        }
        self.kafka_live.as_ref().ok_or_else(|| Missing::Failed(anyhow::anyhow!("no service")))
    }

    pub(crate) async fn seeded(&mut self) -> Result<&Seeded, Missing> {
        if self.seeded.is_none() {
            let url = self.pg()?.fresh("rebuild").await?;
            let store = kes_examples::service::open_store::<Project>(&url).await?;
            let states = seed(store, self.plan.aggregates, "r").await?;
            self.seeded = Some(Seeded { url, states });
        }
        self.seeded.as_ref().ok_or_else(|| Missing::Failed(anyhow::anyhow!("no seed")))
    }
}

/// The Created event of the `i`-th seeded project: a realistic row, without
/// an owner: an owner is personal data, sealed by a command bus's vault,
/// and these events go to the store directly.
pub(crate) fn created(i: usize) -> ProjectEvent {
    ProjectEvent::Created {
        name: Some(format!("project {i}")),
        description: format!("the {i}th project of the benchmark, with a few words to search"),
        budget: kes_examples::domain::Money { amount: (i as i64 % 1000) * 100, currency: "EUR".into() },
        owner: None,
        tags: BTreeSet::from([format!("t{}", i % 7), "bench".to_owned()]),
        due: None,
    }
}

/// Appends `n` Created events (64 in flight); the states they made.
pub(crate) async fn seed(
    store: Arc<dyn EventStore<Project>>,
    n: usize,
    tag: &str,
) -> anyhow::Result<Vec<(String, Project)>> {
    let started = Instant::now();
    let items: Vec<usize> = (0..n).collect();
    load::in_parallel(items, CLIENTS, |i| {
        let store = Arc::clone(&store);
        let id = format!("{tag}{i}");
        async move {
            store.append(&id, ExpectedVersion::NoStream, vec![created(i)], Metadata::default()).await?;
            Ok(())
        }
    })
    .await?;
    eprintln!("  seeded {n} aggregates in {:.1} s", started.elapsed().as_secs_f64());
    Ok((0..n)
        .map(|i| {
            let mut p = Project::default();
            p.apply(&created(i));
            (format!("{tag}{i}"), p)
        })
        .collect())
}

/// Runs every scenario; never panics on a missing service.
// Kept in one piece: The table of every scenario, one entry each: its length is the list's.
pub async fn run_all(plan: Plan) -> Vec<Outcome> {
    let client = match load::client(CLIENTS * 2) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e:#}");
            std::process::exit(2);
        }
    };
    let mut ctx = Ctx {
        plan,
        client,
        pg: Postgres::connect().await,
        kafka: Kafka::connect().await,
        pg_live: None,
        kafka_live: None,
        seeded: None,
    };
    for (name, service) in [("PostgreSQL", ctx.pg.as_ref().err()), ("Kafka", ctx.kafka.as_ref().err())] {
        if let Some(why) = service {
            eprintln!("{name}: {why}");
        }
    }
    let n = plan.aggregates;
    let thousands = format!("{}k", n / 1000);
    let mut out = Vec::new();
    macro_rules! run {
        ($name:expr, $unit:expr, $better:expr, $goal:expr, $f:expr) => {{
            let spec = Spec { name: $name.to_string(), unit: $unit, better: $better, goal: $goal };
            if crate::selected(&spec.name) {
                eprintln!("== {}", spec.name);
                let started = Instant::now();
                let result = $f.await;
                let o = outcome(spec, result);
                eprintln!(
                    "   kes {:?} baseline {:?} ratio {:?}: {} ({:.1} s)",
                    o.kes,
                    o.baseline,
                    o.ratio,
                    o.status,
                    started.elapsed().as_secs_f64()
                );
                out.push(o);
            }
        }};
    }
    // First on the broker: Tansu's reads slow down with everything it
    // stores (each record's headers are looked up across all topics), for
    // KES and the raw consumer alike; on a fresh broker the rounds stay
    // within the scenario's time bound.
    run!(
        format!("Kafka table rebuild, {thousands} aggregates"),
        "records/s",
        Better::Higher,
        0.9,
        kafka_table(&mut ctx, &mut out)
    );
    run!(
        "audit history, 1,000 events, Kafka: GET history (history view)",
        "ms",
        Better::Lower,
        0.5,
        kafka_history(&mut ctx, &mut out)
    );
    run!("HTTP PATCH, 64 clients, Kafka store", "req/s", Better::Higher, 0.7, kafka_patch(&mut ctx));
    run!(
        format!("HTTP PATCH, 64 clients, Kafka, {} instances vs 1", crate::instances::INSTANCES),
        "req/s",
        Better::Higher,
        0.5,
        kafka_patch_instances(&mut ctx)
    );
    run!(
        "HTTP PATCH, 64 clients, Kafka: projections running vs none",
        "req/s",
        Better::Higher,
        0.0,
        kafka_projections(&mut ctx)
    );
    run!("HTTP PATCH, 64 clients, PostgreSQL store", "req/s", Better::Higher, 3.0, pg_patch(&mut ctx));
    run!(
        format!("HTTP PATCH, 64 clients, PostgreSQL, {} change feeds open vs none", crate::feeds::FEEDS),
        "req/s",
        Better::Higher,
        0.9,
        pg_feeds(&mut ctx)
    );
    run!(
        "projection lag p99 at 50 % of write capacity, PostgreSQL: split roles vs one process",
        "ms",
        Better::Lower,
        0.0,
        pg_lag(&mut ctx)
    );
    run!(
        "HTTP PATCH, 64 clients, PostgreSQL: a personal field vs a plain one",
        "req/s",
        Better::Higher,
        0.9,
        pg_personal(&mut ctx)
    );
    run!("seed loop: sequential PATCH, PostgreSQL", "ms/req", Better::Lower, 0.8, pg_seed_loop(&mut ctx));
    run!("seed loop: sequential PATCH, Kafka", "ms/req", Better::Lower, 0.9, kafka_seed_loop(&mut ctx));
    run!("GET by id, 64 clients, PostgreSQL store", "req/s", Better::Higher, 0.9, pg_get(&mut ctx));
    run!("GET by id, 64 clients, Kafka store", "req/s", Better::Higher, 0.9, kafka_get(&mut ctx));
    run!(
        "JWT verification: GET by id, 64 clients, PostgreSQL",
        "req/s",
        Better::Higher,
        0.9,
        pg_jwt(&mut ctx, Verb::Get)
    );
    run!(
        "JWT verification: PATCH, 64 clients, PostgreSQL",
        "req/s",
        Better::Higher,
        0.9,
        pg_jwt(&mut ctx, Verb::PatchName)
    );
    // The services the request scenarios shared stop before the rebuilds:
    // their followers and projection runners would otherwise keep polling
    // on the same 2 cores while rebuilds are timed.
    if let Some(live) = ctx.pg_live.take() {
        live.service.shutdown().await;
    }
    if let Some(live) = ctx.kafka_live.take() {
        live.service.shutdown().await;
    }
    run!(
        format!("SQL view rebuild (PostgreSQL), {thousands} rows"),
        "rows/s",
        Better::Higher,
        0.8,
        sql_rebuild(&mut ctx)
    );
    run!(
        format!("SQL view rebuild (PostgreSQL), {thousands} rows: sealed owners vs none"),
        "rows/s",
        Better::Higher,
        0.8,
        personal_rebuild(&mut ctx)
    );
    run!(format!("Tantivy view rebuild, {thousands} rows"), "rows/s", Better::Higher, 0.7, tantivy_rebuild(&mut ctx));
    if let Ok(pg) = ctx.pg.as_mut() {
        pg.drop_all().await;
    }
    out
}

/// A scenario that measures two lines in one go on `service`, bounded by
/// `limit` (`doing` says what it was at when time ran out): the first line
/// is its answer, the second goes to `out` as `second`, skipped or failed
/// along with the first.
pub(crate) async fn paired<T, F, Fut>(
    service: Result<T, Missing>,
    second: Spec,
    out: &mut Vec<Outcome>,
    limit: Duration,
    doing: &str,
    run: F,
) -> Result<Measured, Missing>
where
    F: FnOnce(T) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(Measured, Measured)>>,
{
    let service = match service {
        Ok(s) => s,
        Err(e) => {
            let why = match &e {
                Missing::Skip(w) => w.clone(),
                Missing::Failed(e) => e.to_string(),
            };
            out.push(outcome(second, Err(Missing::Skip(why))));
            return Err(e);
        }
    };
    let result = match tokio::time::timeout(limit, run(service)).await {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!("timed out after {} s ({doing})", limit.as_secs())),
    };
    match result {
        Ok((first, measured)) => {
            out.push(outcome(second, Ok(measured)));
            Ok(first)
        }
        Err(e) => {
            out.push(outcome(second, Err(Missing::Failed(anyhow::anyhow!("{e:#}")))));
            Err(Missing::Failed(e))
        }
    }
}

/// Alternates `rounds` rounds of `kes` and `base`; their medians.
macro_rules! interleave {
    ($rounds:expr, $kes:expr, $base:expr) => {{
        let mut k = Vec::new();
        let mut b = Vec::new();
        for round in 0..$rounds {
            // Alternate which side goes first so drift hits both alike.
            if round % 2 == 0 {
                k.push($kes);
                b.push($base);
            } else {
                b.push($base);
                k.push($kes);
            }
        }
        (median(k), median(b))
    }};
}

/// One raw append of a request body to stream `id`.
pub(crate) type Append =
    Arc<dyn Fn(String, Bytes) -> futures::future::BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;

/// A bare axum app: `PATCH /raw/{id}` does one awaited append.
pub(crate) fn raw_append_router(append: Append) -> Router {
    Router::new()
        .route(
            "/raw/{id}",
            patch(|State(append): State<Append>, Path(id): Path<String>, body: Bytes| async move {
                match append(id, body).await {
                    Ok(()) => (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], "{}").into_response(),
                    Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
                }
            }),
        )
        .with_state(append)
}

pub(crate) async fn seed_loop(ctx: &Ctx, kes_url: &str, raw: Router) -> anyhow::Result<(f64, f64)> {
    let plan = ctx.plan;
    let server = load::serve(raw).await?;
    let raw_url = format!("{}/raw/x", server.base);
    // A client of its own: one connection, kept alive.
    let client = load::client(1)?;
    load::sequential(&client, Verb::PatchName, kes_url, 20).await?;
    load::sequential(&client, Verb::PatchName, &raw_url, 20).await?;
    Ok(interleave!(
        plan.rounds,
        load::sequential(&client, Verb::PatchName, kes_url, plan.sequential).await?,
        load::sequential(&client, Verb::PatchName, &raw_url, plan.sequential).await?
    ))
}

pub(crate) async fn get_by_id(ctx: &Ctx, live: &Live) -> anyhow::Result<Measured> {
    let plan = ctx.plan;
    let client = ctx.client.clone();
    let mut bodies = HashMap::new();
    for id in &live.ids {
        let url = format!("{}/projects/{id}", live.server.base);
        let body = client.get(&url).send().await?.error_for_status()?.bytes().await?;
        bodies.insert(id.clone(), body);
    }
    let bodies = Arc::new(bodies);
    let raw = Router::new()
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
    let server = load::serve(raw).await?;
    let kes_urls = live.urls();
    let raw_urls: Vec<String> = live.ids.iter().map(|id| format!("{}/raw/{id}", server.base)).collect();
    load::concurrent(&client, Verb::Get, &kes_urls, CLIENTS, Duration::from_millis(500), u64::MAX).await?;
    load::concurrent(&client, Verb::Get, &raw_urls, CLIENTS, Duration::from_millis(500), u64::MAX).await?;
    let (k, b) = interleave!(
        plan.rounds,
        load::concurrent(&client, Verb::Get, &kes_urls, CLIENTS, plan.round, u64::MAX).await?,
        load::concurrent(&client, Verb::Get, &raw_urls, CLIENTS, plan.round, u64::MAX).await?
    );
    Ok(Measured {
        smaller: None,
        kes: k,
        baseline: b,
        note: "GET /projects/{id} on 64 projects, one per client; baseline: bare axum handler returning the same \
               response bytes from a HashMap (same server setup, same client)"
            .into(),
    })
}

mod kafka;
mod postgres;
mod search;
