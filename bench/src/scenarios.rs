//! The scenarios, each beside its baseline.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, patch};
use kes_core::{Aggregate, EventStore, ExpectedVersion, FieldValue, Metadata};
use kes_examples::domain::{Project, ProjectCommand, ProjectEvent, ProjectFields};
use kes_examples::resources;
use kes_examples::service::{Service, Settings};
use kes_store_kafka::{KafkaConfig, KafkaStore};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgPool;
use stats_alloc::Region;

use crate::backends::{CqrsProject, Kafka, Postgres, cqrs_tables, pool};
use crate::load::{self, Server, Verb};
use crate::{Better, GLOBAL, Measured, Missing, Outcome, Plan, Spec, median, outcome};

const CLIENTS: usize = 64;

/// A running projects service with 64 created projects.
struct Live {
    service: Service,
    server: Server,
    ids: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Live {
    async fn open(store: String, view: Option<String>, tag: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let view = view.unwrap_or_else(|| format!("sqlite://{}/views.db", dir.path().display()));
        let service = Service::open(&Settings::new(store, view)).await?;
        let server = load::serve(service.router()?).await?;
        let ids: Vec<String> = (0..CLIENTS).map(|i| format!("{tag}{i}")).collect();
        for id in &ids {
            service
                .projects
                .bus
                .execute(id, ProjectCommand::Create(named(id)), ExpectedVersion::NoStream, Metadata::default())
                .await
                .with_context(|| format!("creating project {id}"))?;
        }
        Ok(Self { service, server, ids, _dir: dir })
    }

    fn urls(&self) -> Vec<String> {
        self.ids.iter().map(|id| format!("{}/projects/{id}", self.server.base)).collect()
    }
}

fn named(name: &str) -> ProjectFields {
    ProjectFields { name: Some(name.to_owned()), ..ProjectFields::default() }
}

/// The services, opened once and shared by the scenarios.
struct Ctx {
    plan: Plan,
    client: reqwest::Client,
    pg: Result<Postgres, String>,
    kafka: Result<Kafka, String>,
    pg_live: Option<Live>,
    kafka_live: Option<Live>,
    seeded: Option<Seeded>,
}

/// A PostgreSQL database holding `plan.aggregates` created projects.
struct Seeded {
    url: String,
    states: Vec<(String, Project)>,
}

impl Ctx {
    fn pg(&mut self) -> Result<&mut Postgres, Missing> {
        self.pg.as_mut().map_err(|why| Missing::Skip(why.clone()))
    }

    fn kafka(&self) -> Result<&Kafka, Missing> {
        self.kafka.as_ref().map_err(|why| Missing::Skip(why.clone()))
    }

    async fn pg_live(&mut self) -> Result<&Live, Missing> {
        if self.pg_live.is_none() {
            let url = self.pg()?.fresh("live").await?;
            self.pg_live = Some(Live::open(url.clone(), Some(url), "p").await?);
        }
        self.pg_live.as_ref().ok_or_else(|| Missing::Failed(anyhow::anyhow!("no service")))
    }

    async fn kafka_live(&mut self) -> Result<&Live, Missing> {
        if self.kafka_live.is_none() {
            let brokers = self.kafka()?.brokers.clone();
            let url = format!("kafka://{brokers}?prefix={}", Kafka::prefix("live"));
            self.kafka_live = Some(Live::open(url, None, "k").await?);
        }
        self.kafka_live.as_ref().ok_or_else(|| Missing::Failed(anyhow::anyhow!("no service")))
    }

    async fn seeded(&mut self) -> Result<&Seeded, Missing> {
        if self.seeded.is_none() {
            let url = self.pg()?.fresh("rebuild").await?;
            let store = kes_examples::service::open_store::<Project>(&url).await?;
            let states = seed(store, self.plan.aggregates, "r").await?;
            self.seeded = Some(Seeded { url, states });
        }
        self.seeded.as_ref().ok_or_else(|| Missing::Failed(anyhow::anyhow!("no seed")))
    }
}

/// The Created event of the `i`-th seeded project: a realistic row.
fn created(i: usize) -> ProjectEvent {
    ProjectEvent::Created {
        name: Some(format!("project {i}")),
        description: format!("the {i}th project of the benchmark, with a few words to search"),
        budget: kes_examples::domain::Money { amount: (i as i64 % 1000) * 100, currency: "EUR".into() },
        owner: Some(format!("owner{}", i % 50)),
        tags: BTreeSet::from([format!("t{}", i % 7), "bench".to_owned()]),
        due: None,
    }
}

/// Appends `n` Created events (64 in flight); the states they made.
async fn seed(store: Arc<dyn EventStore<Project>>, n: usize, tag: &str) -> anyhow::Result<Vec<(String, Project)>> {
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
        0.5,
        kafka_table(&mut ctx, &mut out)
    );
    run!(
        "audit history, 1,000 events, Kafka: GET history (history view)",
        "ms",
        Better::Lower,
        0.5,
        kafka_history(&mut ctx, &mut out)
    );
    run!("HTTP PATCH, 64 clients, Kafka store", "req/s", Better::Higher, 0.5, kafka_patch(&mut ctx));
    run!(
        format!("HTTP PATCH, 64 clients, Kafka, {} instances vs 1", crate::instances::INSTANCES),
        "req/s",
        Better::Higher,
        0.5,
        kafka_patch_instances(&mut ctx)
    );
    run!("HTTP PATCH, 64 clients, PostgreSQL store", "req/s", Better::Higher, 2.0, pg_patch(&mut ctx));
    run!(
        format!("HTTP PATCH, 64 clients, PostgreSQL, {} change feeds open vs none", crate::feeds::FEEDS),
        "req/s",
        Better::Higher,
        0.9,
        pg_feeds(&mut ctx)
    );
    run!("seed loop: sequential PATCH, PostgreSQL", "ms/req", Better::Lower, 0.67, pg_seed_loop(&mut ctx));
    run!("seed loop: sequential PATCH, Kafka", "ms/req", Better::Lower, 0.67, kafka_seed_loop(&mut ctx));
    run!("GET by id, 64 clients, PostgreSQL store", "req/s", Better::Higher, 0.8, pg_get(&mut ctx));
    run!("GET by id, 64 clients, Kafka store", "req/s", Better::Higher, 0.8, kafka_get(&mut ctx));
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
    run!(
        format!("SQL view rebuild (PostgreSQL), {thousands} rows"),
        "rows/s",
        Better::Higher,
        0.5,
        sql_rebuild(&mut ctx)
    );
    run!(format!("Tantivy view rebuild, {thousands} rows"), "rows/s", Better::Higher, 0.5, tantivy_rebuild(&mut ctx));
    if let Some(live) = ctx.pg_live.take() {
        live.service.shutdown().await;
    }
    if let Some(live) = ctx.kafka_live.take() {
        live.service.shutdown().await;
    }
    if let Ok(pg) = ctx.pg.as_mut() {
        pg.drop_all().await;
    }
    out
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

async fn raw_produce(
    producer: &FutureProducer,
    topic: &str,
    duration: Duration,
    key_len: usize,
    value: &[u8],
) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let producer = producer.clone();
        let topic = topic.to_owned();
        let key = format!("{i:0>key_len$}");
        let value = value.to_vec();
        let done = Arc::clone(&done);
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                producer
                    .send(FutureRecord::to(&topic).key(&key).payload(&value), Duration::from_secs(10))
                    .await
                    .map_err(|(e, _)| anyhow::anyhow!("raw produce: {e}"))?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

fn events_topic(store_url: &str) -> anyhow::Result<String> {
    Ok(KafkaConfig::from_url(store_url)?.events_topic(Project::NAME))
}

async fn kafka_patch(ctx: &mut Ctx) -> Result<Measured, Missing> {
    let plan = ctx.plan;
    let kafka = Kafka { brokers: ctx.kafka()?.brokers.clone() };
    let prefix = Kafka::prefix("patch");
    let store_url = format!("kafka://{}?prefix={prefix}", kafka.brokers);
    let live = Live::open(store_url.clone(), None, "kp").await?;
    let urls = live.urls();
    let client = ctx.client.clone();
    // Warm-up, and a Renamed record to size the baseline's records.
    load::concurrent(&client, Verb::PatchName, &urls, CLIENTS, Duration::from_secs(10), CLIENTS as u64 * 4).await?;
    let (key_len, value_len) = kafka.record_size_newest(&events_topic(&store_url)?).await?;
    let topic = format!("{prefix}.raw");
    kafka.create_topic(&topic, 3).await?;
    let producer = kafka.producer()?;
    let value = vec![b'v'; value_len];
    let (k, b) = interleave!(
        plan.rounds,
        load::concurrent(&client, Verb::PatchName, &urls, CLIENTS, plan.round, u64::MAX).await?,
        raw_produce(&producer, &topic, plan.round, key_len, &value).await?
    );
    live.service.shutdown().await;
    Ok(Measured {
        kes: k,
        baseline: b,
        note: format!(
            "PATCH {{\"name\"}} (one Renamed) on 64 projects, one per client; baseline: rdkafka FutureProducer \
             (idempotent, acks=all, linger.ms=0), 64 sends in flight, records of {key_len} + {value_len} bytes \
             (the size of a KES events record), same broker, 3 partitions"
        ),
    })
}

async fn kafka_patch_instances(ctx: &mut Ctx) -> Result<Measured, Missing> {
    let kafka = Kafka { brokers: ctx.kafka()?.brokers.clone() };
    crate::instances::kafka_patch_instances(ctx.plan, &ctx.client, &kafka).await
}

async fn pg_patch(ctx: &mut Ctx) -> Result<Measured, Missing> {
    let plan = ctx.plan;
    let client = ctx.client.clone();
    let cqrs_url = ctx.pg()?.fresh("cqrs").await?;
    let urls = ctx.pg_live().await?.urls();
    let cqrs_pool: PgPool = pool(&cqrs_url, 10).await?;
    cqrs_tables(&cqrs_pool).await?;
    let cqrs = Arc::new(postgres_es::postgres_aggregate_cqrs::<CqrsProject>(cqrs_pool, vec![], ()));
    let ids: Vec<String> = (0..CLIENTS).map(|i| format!("c{i}")).collect();
    for id in &ids {
        cqrs.execute(id, ProjectCommand::Create(named(id))).await.map_err(|e| anyhow::anyhow!("cqrs-es: {e}"))?;
    }
    let counter = Arc::new(AtomicU64::new(0));
    let cqrs_round = |duration: Duration| {
        let cqrs = Arc::clone(&cqrs);
        let ids = ids.clone();
        let counter = Arc::clone(&counter);
        async move {
            let done = Arc::new(AtomicU64::new(0));
            let started = Instant::now();
            let deadline = started + duration;
            let mut tasks = Vec::new();
            for id in ids {
                let cqrs = Arc::clone(&cqrs);
                let done = Arc::clone(&done);
                let counter = Arc::clone(&counter);
                tasks.push(tokio::spawn(async move {
                    while Instant::now() < deadline {
                        let n = counter.fetch_add(1, Ordering::Relaxed);
                        cqrs.execute(&id, ProjectCommand::Update(named(&format!("n{n}"))))
                            .await
                            .map_err(|e| anyhow::anyhow!("cqrs-es: {e}"))?;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    anyhow::Ok(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            anyhow::Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
        }
    };
    load::concurrent(&client, Verb::PatchName, &urls, CLIENTS, Duration::from_secs(10), CLIENTS as u64 * 4).await?;
    cqrs_round(Duration::from_millis(300)).await?;
    let (k, b) = interleave!(
        plan.rounds,
        load::concurrent(&client, Verb::PatchName, &urls, CLIENTS, plan.round, u64::MAX).await?,
        cqrs_round(plan.round).await?
    );
    Ok(Measured {
        kes: k,
        baseline: b,
        note: "PATCH {\"name\"} over HTTP on 64 projects (store and view in one fresh database, pool of 10); \
               baseline: cqrs-es 0.5 + postgres-es 0.5 (aggregate store: latest state persisted like the KES table, \
               pool of 10), CqrsFramework::execute of the same ProjectCommand::Update on the same Project rules, \
               64 concurrent tasks, no HTTP"
            .into(),
    })
}

async fn pg_feeds(ctx: &mut Ctx) -> Result<Measured, Missing> {
    let (plan, client) = (ctx.plan, ctx.client.clone());
    // A service of its own, with its projections running: feeds show what
    // the views applied.
    let url = ctx.pg()?.fresh("feeds").await?;
    let live = Live::open(url.clone(), Some(url), "f").await?;
    live.service.start_projections().await?;
    let measured = crate::feeds::measure(plan, &client, &live.server.base, &live.urls()).await;
    live.service.shutdown().await;
    Ok(measured?)
}

/// One raw append of a request body to stream `id`.
type Append = Arc<dyn Fn(String, Bytes) -> futures::future::BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;

/// A bare axum app: `PATCH /raw/{id}` does one awaited append.
fn raw_append_router(append: Append) -> Router {
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

async fn seed_loop(ctx: &Ctx, kes_url: &str, raw: Router) -> anyhow::Result<(f64, f64)> {
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

async fn pg_seed_loop(ctx: &mut Ctx) -> Result<Measured, Missing> {
    let raw_url = ctx.pg()?.fresh("rawseed").await?;
    let kes_url = ctx.pg_live().await?.urls()[0].clone();
    let raw_pool = pool(&raw_url, 10).await?;
    sqlx::query("CREATE TABLE raw_events (seq BIGSERIAL PRIMARY KEY, stream TEXT NOT NULL, body JSONB NOT NULL)")
        .execute(&raw_pool)
        .await
        .context("creating raw_events")?;
    let append: Append = Arc::new(move |id, body| {
        let pool = raw_pool.clone();
        Box::pin(async move {
            let body = String::from_utf8(body.to_vec())?;
            sqlx::query("INSERT INTO raw_events (stream, body) VALUES ($1, $2::jsonb)")
                .bind(id)
                .bind(body)
                .execute(&pool)
                .await?;
            Ok(())
        })
    });
    let (k, b) = seed_loop(ctx, &kes_url, raw_append_router(append)).await?;
    Ok(Measured {
        kes: k,
        baseline: b,
        note: format!(
            "{} PATCH one after the other on one keep-alive connection, mean per request; baseline: bare axum \
             handler doing one awaited INSERT of the body into a table (same server)",
            ctx.plan.sequential
        ),
    })
}

async fn kafka_seed_loop(ctx: &mut Ctx) -> Result<Measured, Missing> {
    let kafka = Kafka { brokers: ctx.kafka()?.brokers.clone() };
    let kes_url = ctx.kafka_live().await?.urls()[0].clone();
    let topic = format!("{}.rawseed", Kafka::prefix("seed"));
    kafka.create_topic(&topic, 3).await?;
    let producer = kafka.producer()?;
    let append: Append = Arc::new(move |id, body| {
        let producer = producer.clone();
        let topic = topic.clone();
        Box::pin(async move {
            producer
                .send(FutureRecord::to(&topic).key(&id).payload(body.as_ref()), Duration::from_secs(10))
                .await
                .map_err(|(e, _)| anyhow::anyhow!("raw produce: {e}"))?;
            Ok(())
        })
    });
    let (k, b) = seed_loop(ctx, &kes_url, raw_append_router(append)).await?;
    Ok(Measured {
        kes: k,
        baseline: b,
        note: format!(
            "{} PATCH one after the other on one keep-alive connection, mean per request; baseline: bare axum \
             handler doing one awaited idempotent acks=all produce of the body (same broker)",
            ctx.plan.sequential
        ),
    })
}

async fn get_by_id(ctx: &Ctx, live: &Live) -> anyhow::Result<Measured> {
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
        kes: k,
        baseline: b,
        note: "GET /projects/{id} on 64 projects, one per client; baseline: bare axum handler returning the same \
               response bytes from a HashMap (same server setup, same client)"
            .into(),
    })
}

async fn pg_get(ctx: &mut Ctx) -> Result<Measured, Missing> {
    ctx.pg_live().await?;
    let live = ctx.pg_live.take().ok_or_else(|| Missing::Failed(anyhow::anyhow!("no service")))?;
    let result = get_by_id(ctx, &live).await;
    ctx.pg_live = Some(live);
    Ok(result?)
}

async fn pg_jwt(ctx: &mut Ctx, verb: Verb) -> Result<Measured, Missing> {
    ctx.pg_live().await?;
    let live = ctx.pg_live.take().ok_or_else(|| Missing::Failed(anyhow::anyhow!("no service")))?;
    let result = crate::auth::measure(ctx.plan, &live.service, &live.ids, verb).await;
    ctx.pg_live = Some(live);
    Ok(result?)
}

async fn kafka_get(ctx: &mut Ctx) -> Result<Measured, Missing> {
    ctx.kafka_live().await?;
    let live = ctx.kafka_live.take().ok_or_else(|| Missing::Failed(anyhow::anyhow!("no service")))?;
    let result = get_by_id(ctx, &live).await;
    ctx.kafka_live = Some(live);
    Ok(result?)
}

async fn sql_rebuild(ctx: &mut Ctx) -> Result<Measured, Missing> {
    let rounds = ctx.plan.rebuild_rounds;
    let (url, rows) = {
        let seeded = ctx.seeded().await?;
        let rows: Vec<(String, String, kes_core::Row)> = seeded
            .states
            .iter()
            .map(|(id, p)| -> anyhow::Result<_> {
                Ok((id.clone(), serde_json::to_string(p)?, resources::project_row(p)))
            })
            .collect::<anyhow::Result<_>>()?;
        (seeded.url.clone(), rows)
    };
    let service = Service::open(&Settings::new(url.clone(), url.clone())).await?;
    let raw_pool = pool(&url, 10).await?;
    let n = rows.len() as f64;
    let (k, b) = interleave!(
        rounds,
        {
            let report = service.rebuild("projects", &|_, _| {}).await?;
            report.events as f64 / report.elapsed.as_secs_f64()
        },
        raw_insert(&raw_pool, &rows).await.map(|secs| n / secs)?
    );
    service.shutdown().await;
    Ok(Measured {
        kes: k,
        baseline: b,
        note: "ProjectionRunner::rebuild of the projects view (a fresh copy, filled from the log, swapped in); \
               one Created event per aggregate; baseline: CREATE TABLE with the same columns and indexes, then \
               INSERT … SELECT FROM UNNEST in batches of 1000 rows of the same ids, states and row values"
            .into(),
    })
}

fn text(row: &kes_core::Row, key: &str) -> Option<String> {
    match row.get(key)? {
        FieldValue::Text(s) => Some(s.clone()),
        other => Some(format!("{other:?}")),
    }
}

fn int(row: &kes_core::Row, key: &str) -> Option<i64> {
    match row.get(key)? {
        FieldValue::Integer(i) => Some(*i),
        _ => None,
    }
}

/// Seconds to (re)create the baseline table and batch-insert `rows`.
async fn raw_insert(pool: &PgPool, rows: &[(String, String, kes_core::Row)]) -> anyhow::Result<f64> {
    let started = Instant::now();
    sqlx::query("DROP TABLE IF EXISTS raw_projects").execute(pool).await?;
    sqlx::query(
        "CREATE TABLE raw_projects (id TEXT PRIMARY KEY, _version BIGINT NOT NULL, _state TEXT NOT NULL, \
         _live BOOLEAN NOT NULL, name TEXT, description TEXT, status TEXT, budget BIGINT, owner TEXT, members BIGINT, \
         tags TEXT, due TIMESTAMPTZ, _s_name TEXT, _s_description TEXT, _s_owner TEXT, _s_tags TEXT)",
    )
    .execute(pool)
    .await?;
    for column in ["name", "status", "budget", "owner", "members", "due"] {
        sqlx::query(&format!("CREATE INDEX ix_raw_{column} ON raw_projects ({column}, id)")).execute(pool).await?;
    }
    for chunk in rows.chunks(1000) {
        let ids: Vec<&str> = chunk.iter().map(|r| r.0.as_str()).collect();
        let states: Vec<&str> = chunk.iter().map(|r| r.1.as_str()).collect();
        let names: Vec<Option<String>> = chunk.iter().map(|r| text(&r.2, "name")).collect();
        let descriptions: Vec<Option<String>> = chunk.iter().map(|r| text(&r.2, "description")).collect();
        let statuses: Vec<Option<String>> = chunk.iter().map(|r| text(&r.2, "status")).collect();
        let budgets: Vec<Option<i64>> = chunk.iter().map(|r| int(&r.2, "budget")).collect();
        let owners: Vec<Option<String>> = chunk.iter().map(|r| text(&r.2, "owner")).collect();
        let members: Vec<Option<i64>> = chunk.iter().map(|r| int(&r.2, "members")).collect();
        let tags: Vec<Option<String>> = chunk.iter().map(|r| text(&r.2, "tags")).collect();
        let lower = |v: &[Option<String>]| v.iter().map(|s| s.as_ref().map(|s| s.to_lowercase())).collect::<Vec<_>>();
        sqlx::query(
            "INSERT INTO raw_projects (id, _version, _state, _live, name, description, status, budget, owner, members, \
             tags, _s_name, _s_description, _s_owner, _s_tags) \
             SELECT id, 1, st, true, n, d, s, b, o, m, t, ln, ld, lo, lt FROM UNNEST($1::text[], $2::text[], \
             $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[], $8::bigint[], $9::text[], $10::text[], \
             $11::text[], $12::text[], $13::text[]) AS u(id, st, n, d, s, b, o, m, t, ln, ld, lo, lt)",
        )
        .bind(&ids)
        .bind(&states)
        .bind(&names)
        .bind(&descriptions)
        .bind(&statuses)
        .bind(&budgets)
        .bind(&owners)
        .bind(&members)
        .bind(&tags)
        .bind(lower(&names))
        .bind(lower(&descriptions))
        .bind(lower(&owners))
        .bind(lower(&tags))
        .execute(pool)
        .await?;
    }
    Ok(started.elapsed().as_secs_f64())
}

#[cfg(not(feature = "view-search"))]
async fn tantivy_rebuild(_: &mut Ctx) -> Result<Measured, Missing> {
    Err(Missing::Skip("built without feature view-search: run with --features view-search".into()))
}

#[cfg(feature = "view-search")]
async fn tantivy_rebuild(ctx: &mut Ctx) -> Result<Measured, Missing> {
    use kes_core::RowChange;
    use tantivy::{Index, TantivyDocument};

    let rounds = ctx.plan.rebuild_rounds;
    let view = resources::project_view();
    let (url, docs) = {
        let seeded = ctx.seeded().await?;
        let docs: Vec<TantivyDocument> = seeded
            .states
            .iter()
            .map(|(id, p)| -> anyhow::Result<TantivyDocument> {
                let change = RowChange {
                    id: id.clone(),
                    version: 1,
                    state: serde_json::to_value(p)?,
                    row: Some(resources::project_row(p)),
                };
                Ok(kes_view_search::index_document(&view, &change)?)
            })
            .collect::<anyhow::Result<_>>()?;
        (seeded.url.clone(), docs)
    };
    let dir = tempfile::tempdir().map_err(anyhow::Error::from)?;
    let index_dir = dir.path().join("index");
    let service = Service::open(&Settings::new(url, index_dir.display().to_string())).await?;
    let n = docs.len() as f64;
    let raw_round = |round: usize| {
        let docs = docs.clone();
        let path = dir.path().join(format!("raw{round}"));
        let view = view.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
            let started = Instant::now();
            std::fs::create_dir_all(&path)?;
            let index = Index::create_in_dir(&path, kes_view_search::index_schema(&view))?;
            kes_view_search::register_tokenizers(&index);
            let mut writer: tantivy::IndexWriter<TantivyDocument> = index.writer_with_num_threads(1, 50_000_000)?;
            for doc in docs {
                writer.add_document(doc)?;
            }
            writer.commit()?;
            let secs = started.elapsed().as_secs_f64();
            drop(writer);
            let _ = std::fs::remove_dir_all(&path);
            Ok(secs)
        })
    };
    let mut round = 0;
    let (k, b) = interleave!(
        rounds,
        {
            let report = service.rebuild("projects", &|_, _| {}).await?;
            report.events as f64 / report.elapsed.as_secs_f64()
        },
        {
            round += 1;
            n / raw_round(round).await.map_err(anyhow::Error::from)??
        }
    );
    service.shutdown().await;
    Ok(Measured {
        kes: k,
        baseline: b,
        note: "ProjectionRunner::rebuild of the projects view into a Tantivy index (kes-view-search), reading the \
               log from the same PostgreSQL store; baseline: the same documents (built beforehand with \
               kes_view_search::index_document) written with IndexWriter::add_document (1 thread, 50 MB) and one \
               commit into a fresh index"
            .into(),
    })
}

/// The Kafka table rebuild, and the table-memory line it also measures.
async fn kafka_table(ctx: &mut Ctx, out: &mut Vec<Outcome>) -> Result<Measured, Missing> {
    let plan = ctx.plan;
    let memory_spec = Spec {
        name: format!("table memory, {}k aggregates (Kafka store)", plan.aggregates / 1000),
        unit: "bytes",
        better: Better::Lower,
        goal: 0.5,
    };
    let kafka = match ctx.kafka() {
        Ok(k) => Kafka { brokers: k.brokers.clone() },
        Err(e) => {
            let why = match &e {
                Missing::Skip(w) => w.clone(),
                Missing::Failed(e) => e.to_string(),
            };
            out.push(outcome(memory_spec, Err(Missing::Skip(why))));
            return Err(e);
        }
    };
    // Bounded: a broker that stops answering must not hang the run.
    let limit = Duration::from_secs(if plan.quick { 60 } else { 600 });
    let result = match tokio::time::timeout(limit, kafka_table_inner(&kafka, plan)).await {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!(
            "timed out after {} s (seeding, waiting for the table topic, or reopening)",
            limit.as_secs()
        )),
    };
    match result {
        Ok((rebuild, memory)) => {
            out.push(outcome(memory_spec, Ok(memory)));
            Ok(rebuild)
        }
        Err(e) => {
            out.push(outcome(memory_spec, Err(Missing::Failed(anyhow::anyhow!("the table rebuild failed: {e:#}")))));
            Err(Missing::Failed(e))
        }
    }
}

async fn kafka_table_inner(kafka: &Kafka, plan: Plan) -> anyhow::Result<(Measured, Measured)> {
    let config = KafkaConfig::new(kafka.brokers.clone(), Kafka::prefix("table"));
    let table_topic = config.table_topic(Project::NAME);
    let states = {
        let store = KafkaStore::<Project>::connect(config.clone()).await?;
        let states = seed(Arc::new(store.clone()), plan.aggregates, "t").await?;
        // Table records wait a moment before they are written; a planned
        // shutdown writes them.
        store.flush(Duration::from_secs(30)).await?;
        states
    };
    let raw_json: usize =
        states.iter().map(|(_, p)| serde_json::to_vec(p).map(|v| v.len())).sum::<Result<usize, _>>()?;
    // The table topic holds at least one record per aggregate; wait for them.
    let deadline = Instant::now() + Duration::from_secs(30);
    eprintln!("  waiting for the table topic");
    let mut records = kafka.read_all(&table_topic).await?;
    eprintln!("  table topic: {records} records");
    while (records as usize) < states.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        records = kafka.read_all(&table_topic).await?;
    }
    anyhow::ensure!(records as usize >= states.len(), "the table topic holds {records} of {} records", states.len());
    let mut memory = Vec::new();
    let (k, b) = interleave!(
        plan.rebuild_rounds,
        {
            let region = Region::new(GLOBAL);
            let started = Instant::now();
            let store = KafkaStore::<Project>::connect(config.clone()).await?;
            let secs = started.elapsed().as_secs_f64();
            // Everything the open store still holds: allocated minus freed
            // since just before it was opened (stats_alloc already counts
            // a realloc's growth as allocated and its shrinking as freed).
            let change = region.change();
            let held = change.bytes_allocated as f64 - change.bytes_deallocated as f64;
            let last = format!("t{}", states.len() - 1);
            anyhow::ensure!(store.load(&last).await?.is_some(), "the reopened table lacks {last}");
            drop(store);
            memory.push(held);
            eprintln!("  KES reopen: {secs:.2} s");
            records as f64 / secs
        },
        {
            let started = Instant::now();
            let read = kafka.read_all(&table_topic).await?;
            anyhow::ensure!(read == records, "the raw consumer read {read} of {records} records");
            eprintln!("  raw read: {:.2} s", started.elapsed().as_secs_f64());
            records as f64 / started.elapsed().as_secs_f64()
        }
    );
    let rebuild = Measured {
        kes: k,
        baseline: b,
        note: format!(
            "KafkaStore::connect on existing topics ({records} table records for {} aggregates, 3 partitions), \
             until it takes commands; baseline: a plain rdkafka BaseConsumer reading the same table topic from the \
             beginning to its end",
            states.len()
        ),
    };
    let memory = Measured {
        kes: median(memory),
        baseline: raw_json as f64,
        note: "bytes still allocated (counting global allocator, stats_alloc) after KafkaStore::connect rebuilt its \
               table, measured while the store is open; baseline: the summed serde_json bytes of the same states \
               (librdkafka's own C buffers are not counted: they bypass the Rust allocator)"
            .into(),
    };
    Ok((rebuild, memory))
}

/// Audit history of one aggregate with 1,000 events whose records lie among
/// `others` records of other aggregates (the target's every `others/1000`
/// records apart), read cold. Two KES figures, each against the same raw
/// read: the service's `GET /projects/{id}/events` (served by the history
/// view, which the projects service keeps on Kafka), and
/// `KafkaStore::read` on a freshly connected store (no read cache).
async fn kafka_history(ctx: &mut Ctx, out: &mut Vec<Outcome>) -> Result<Measured, Missing> {
    let plan = ctx.plan;
    let store_spec = Spec {
        name: "audit history, 1,000 events, Kafka: KafkaStore::read, cold".into(),
        unit: "ms",
        better: Better::Lower,
        goal: 0.5,
    };
    let kafka = match ctx.kafka() {
        Ok(k) => Kafka { brokers: k.brokers.clone() },
        Err(e) => {
            out.push(outcome(store_spec, Err(Missing::Skip("no Kafka broker".into()))));
            return Err(e);
        }
    };
    let limit = Duration::from_secs(if plan.quick { 180 } else { 900 });
    let result = match tokio::time::timeout(limit, kafka_history_inner(&kafka, plan)).await {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!("timed out after {} s", limit.as_secs())),
    };
    match result {
        Ok((view, store)) => {
            out.push(outcome(store_spec, Ok(store)));
            Ok(view)
        }
        Err(e) => {
            out.push(outcome(store_spec, Err(Missing::Failed(anyhow::anyhow!("{e:#}")))));
            Err(Missing::Failed(e))
        }
    }
}

async fn kafka_history_inner(kafka: &Kafka, plan: Plan) -> anyhow::Result<(Measured, Measured)> {
    const EVENTS: usize = 1_000;
    let others = if plan.quick { 10_000 } else { 50_000 };
    let between = others / EVENTS;
    let url = format!("kafka://{}?prefix={}", kafka.brokers, Kafka::prefix("hist"));
    let config = KafkaConfig::from_url(&url)?;
    let topic = config.events_topic(Project::NAME);
    let target = "history-target";

    // Seed: `between` other aggregates' records, then one of the target's, 1,000 times.
    let started = Instant::now();
    let mut offsets = Vec::with_capacity(EVENTS);
    let mut partition = 0;
    {
        let store: Arc<dyn EventStore<Project>> = Arc::new(KafkaStore::<Project>::connect(config.clone()).await?);
        for step in 0..EVENTS {
            let items: Vec<usize> = (step * between..(step + 1) * between).collect();
            load::in_parallel(items, CLIENTS, |i| {
                let store = Arc::clone(&store);
                async move {
                    store
                        .append(&format!("o{i}"), ExpectedVersion::NoStream, vec![created(i)], Metadata::default())
                        .await?;
                    Ok(())
                }
            })
            .await?;
            let event = if step == 0 { created(0) } else { ProjectEvent::Renamed { name: format!("name {step}") } };
            let done =
                store.append(target, ExpectedVersion::Exact(step as u64), vec![event], Metadata::default()).await?;
            partition = done.position.partition;
            offsets.push(done.position.offset);
        }
        store.flush().await?;
    }
    eprintln!("  seeded {EVENTS} target events among {others} others in {:.1} s", started.elapsed().as_secs_f64());
    let (first, last) = (offsets[0], offsets[EVENTS - 1]);

    // The service as a user runs it on Kafka: its history view caught up.
    let dir = tempfile::tempdir()?;
    let view = format!("sqlite://{}/views.db", dir.path().display());
    let service = Service::open(&Settings::new(url.clone(), view)).await?;
    let server = load::serve(service.router()?).await?;
    let caught = Instant::now();
    service.start_projections().await?;
    let head = kes_core::Position::new(partition, last);
    anyhow::ensure!(
        kes_core::CatchUp::wait_for(&*service.projects.runner, head, Duration::from_secs(300)).await,
        "the history view did not catch up within 300 s"
    );
    eprintln!("  history view caught up in {:.1} s", caught.elapsed().as_secs_f64());
    let client = load::client(1)?;
    let history_url = format!("{}/projects/{target}/events?page[size]={EVENTS}", server.base);

    let raw = || kafka.read_range(&topic, partition, first, last + 1, target.as_bytes());
    let (view_ms, view_raw_ms) = interleave!(
        plan.rebuild_rounds,
        {
            let started = Instant::now();
            let r = client.get(&history_url).send().await?;
            anyhow::ensure!(r.status() == reqwest::StatusCode::OK, "history answered {}", r.status());
            let body: serde_json::Value = r.json().await?;
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            let items = body["items"].as_array().map_or(0, Vec::len);
            anyhow::ensure!(items == EVENTS, "the history view answered {items} of {EVENTS} events");
            eprintln!("  KES history view over HTTP: {ms:.1} ms");
            ms
        },
        {
            let started = Instant::now();
            let read = raw().await?;
            anyhow::ensure!(read == EVENTS as u64, "the raw consumer found {read} of {EVENTS} records");
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            eprintln!("  raw read of the range: {ms:.1} ms");
            ms
        }
    );
    service.shutdown().await;
    drop(server);

    let (store_ms, store_raw_ms) = interleave!(
        plan.rebuild_rounds,
        {
            let store = KafkaStore::<Project>::connect(config.clone()).await?;
            let started = Instant::now();
            let history = store.read(target).await?;
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            anyhow::ensure!(history.len() == EVENTS, "KafkaStore::read gave {} of {EVENTS} events", history.len());
            anyhow::ensure!(
                history.iter().enumerate().all(|(i, e)| e.version == i as u64 + 1),
                "KafkaStore::read gave versions out of order"
            );
            eprintln!("  KES KafkaStore::read, cold: {ms:.1} ms");
            ms
        },
        {
            let started = Instant::now();
            let read = raw().await?;
            anyhow::ensure!(read == EVENTS as u64, "the raw consumer found {read} of {EVENTS} records");
            started.elapsed().as_secs_f64() * 1000.0
        }
    );
    let span = last - first + 1;
    let baseline_note = format!(
        "baseline: a plain rdkafka BaseConsumer (fetch.wait.max.ms={}) assigned at the target's first offset, reading \
         its partition to the last one ({span} records) and keeping the target's {EVENTS} records",
        crate::backends::RAW_FETCH_WAIT_MS
    );
    let view = Measured {
        kes: view_ms,
        baseline: view_raw_ms,
        note: format!(
            "GET /projects/{{id}}/events?page[size]={EVENTS} on the projects service (Kafka store, SQLite views: the \
             history view), {EVENTS} events among {others} other records; {baseline_note}"
        ),
    };
    let store = Measured {
        kes: store_ms,
        baseline: store_raw_ms,
        note: format!(
            "KafkaStore::read of the same aggregate on a freshly connected store (no read cache); {baseline_note}"
        ),
    };
    Ok((view, store))
}
