//! The PostgreSQL scenarios: writes against cqrs-es and bare inserts,
//! reads, change feeds, and the SQL view rebuild against a batched insert.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use kes_core::FieldValue;
use kes_examples::domain::ProjectCommand;
use kes_examples::resources;
use kes_examples::service::{Service, Settings};
use sqlx::PgPool;

use crate::backends::{CqrsProject, cqrs_tables, peer_pool, pool};
use crate::load::{self, Verb};
use crate::{Measured, Missing, median};

use super::*;

pub(crate) async fn pg_patch(ctx: &mut Ctx) -> Result<Measured, Missing> {
    let plan = ctx.plan;
    let client = ctx.client.clone();
    let cqrs_url = ctx.pg()?.fresh("cqrs").await?;
    let urls = ctx.pg_live().await?.urls();
    let cqrs_pool: PgPool = peer_pool(&cqrs_url, 10).await?;
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
        smaller: None,
        kes: k,
        baseline: b,
        note: "PATCH {\"name\"} over HTTP on 64 projects (store and view in one fresh database, pool of 10); \
               baseline: cqrs-es 0.5 + postgres-es 0.5 (aggregate store: latest state persisted like the KES table, \
               pool of 10), CqrsFramework::execute of the same ProjectCommand::Update on the same Project rules, \
               64 concurrent tasks, no HTTP"
            .into(),
    })
}

/// The cost of personal data on the command path: PATCHes of a personal
/// field (sealed with the owner's key before the append, opened for the
/// answer) against PATCHes of a plain field with the same bytes, on the
/// same service in the same run.
pub(crate) async fn pg_personal(ctx: &mut Ctx) -> Result<Measured, Missing> {
    let (plan, client) = (ctx.plan, ctx.client.clone());
    // A service of its own: the projects get owners here, and the scenarios
    // after this one act as a caller who owns none of them.
    let url = ctx.pg()?.fresh("personal").await?;
    let live = Live::open(url.clone(), Some(url), "o").await?;
    let measured = personal_inner(plan, &client, &live.urls()).await;
    live.service.shutdown().await;
    Ok(measured?)
}

async fn personal_inner(plan: Plan, client: &reqwest::Client, urls: &[String]) -> anyhow::Result<Measured> {
    for verb in [Verb::PatchOwner, Verb::PatchDescription] {
        // Warm-up: every person gets its key, and every (person, project)
        // pair its link in the key store, here: a first use pays a key-store
        // round trip once.
        load::concurrent(client, verb, urls, CLIENTS, Duration::from_secs(10), CLIENTS as u64 * 32).await?;
    }
    let (k, b) = interleave!(
        plan.rounds,
        load::concurrent(client, Verb::PatchOwner, urls, CLIENTS, plan.round, u64::MAX).await?,
        load::concurrent(client, Verb::PatchDescription, urls, CLIENTS, plan.round, u64::MAX).await?
    );
    Ok(Measured {
        smaller: None,
        kes: k,
        baseline: b,
        note: "PATCH {\"owner\": \"person N\"} (personal data: sealed with XChaCha20-Poly1305 under one of 10 \
               persons' keys, their keys cached, and opened for the answer) on 64 projects over HTTP; baseline: \
               PATCH {\"description\": \"person N\"}, the same bytes in a plain field, same service"
            .into(),
    })
}

pub(crate) async fn pg_feeds(ctx: &mut Ctx) -> Result<Measured, Missing> {
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

pub(crate) async fn pg_lag(ctx: &mut Ctx) -> Result<Measured, Missing> {
    let plan = ctx.plan;
    let single = ctx.pg()?.fresh("lag1").await?;
    let split = ctx.pg()?.fresh("lag2").await?;
    Ok(crate::lag::measure(plan, single, split).await?)
}

pub(crate) async fn pg_seed_loop(ctx: &mut Ctx) -> Result<Measured, Missing> {
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
        smaller: None,
        kes: k,
        baseline: b,
        note: format!(
            "{} PATCH one after the other on one keep-alive connection, mean per request; baseline: bare axum \
             handler doing one awaited INSERT of the body into a table (same server)",
            ctx.plan.sequential
        ),
    })
}

pub(crate) async fn pg_get(ctx: &mut Ctx) -> Result<Measured, Missing> {
    ctx.pg_live().await?;
    let live = ctx.pg_live.take().ok_or_else(|| Missing::Failed(anyhow::anyhow!("no service")))?;
    let result = get_by_id(ctx, &live).await;
    ctx.pg_live = Some(live);
    Ok(result?)
}

pub(crate) async fn pg_jwt(ctx: &mut Ctx, verb: Verb) -> Result<Measured, Missing> {
    ctx.pg_live().await?;
    let live = ctx.pg_live.take().ok_or_else(|| Missing::Failed(anyhow::anyhow!("no service")))?;
    let result = crate::auth::measure(ctx.plan, &live.service, &live.ids, verb).await;
    ctx.pg_live = Some(live);
    Ok(result?)
}

pub(crate) async fn sql_rebuild(ctx: &mut Ctx) -> Result<Measured, Missing> {
    let rounds = ctx.plan.short_rebuild_rounds();
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
        smaller: None,
        kes: k,
        baseline: b,
        note: "ProjectionRunner::rebuild of the projects view (a fresh copy, filled from the log, swapped in); \
               one Created event per aggregate; baseline: CREATE TABLE with the same columns and indexes, then \
               INSERT … SELECT FROM UNNEST in batches of 1000 rows of the same ids, states and row values"
            .into(),
    })
}

/// The cost of personal data on a rebuild: the projects view rebuilt from a
/// log whose every project has a sealed owner (opened with keys fetched in
/// one lookup per batch, then cached) against the same log without owners.
pub(crate) async fn personal_rebuild(ctx: &mut Ctx) -> Result<Measured, Missing> {
    let (rounds, n) = (ctx.plan.short_rebuild_rounds(), ctx.plan.aggregates);
    let plain_url = ctx.seeded().await?.url.clone();
    let sealed_url = ctx.pg()?.fresh("sealed").await?;
    let settings = Settings::new(sealed_url.clone(), sealed_url.clone());
    let vault = kes_examples::service::open_vault(&settings).await?;
    let store = kes_examples::service::open_store::<Project>(&sealed_url).await?;
    let started = Instant::now();
    load::in_parallel((0..n).collect(), CLIENTS, |i| {
        let (store, vault) = (Arc::clone(&store), Arc::clone(&vault));
        async move {
            let id = format!("r{i}");
            let mut event = created(i);
            if let ProjectEvent::Created { owner, .. } = &mut event {
                let person = format!("owner{}", i % 50);
                *owner = Some(kes_core::Personal::new(person.clone(), person));
            }
            let sealed = vault.seal(&kes_core::AggregateRef::new("project", &id), vec![event]).await?;
            store.append(&id, ExpectedVersion::NoStream, sealed, Metadata::default()).await?;
            Ok(())
        }
    })
    .await?;
    eprintln!("  seeded {n} sealed aggregates in {:.1} s", started.elapsed().as_secs_f64());
    let with_owners = Service::open(&settings).await?;
    let without = Service::open(&Settings::new(plain_url.clone(), plain_url)).await?;
    let (k, b) = interleave!(rounds, rebuild_rate(&with_owners).await?, rebuild_rate(&without).await?);
    with_owners.shutdown().await;
    without.shutdown().await;
    Ok(Measured {
        smaller: None,
        kes: k,
        baseline: b,
        note: "ProjectionRunner::rebuild of the projects view from a log whose every Created event carries an owner \
               sealed with one of 50 persons' keys (opened for each row; keys looked up once per batch, then \
               cached); baseline: the same rebuild of the same events without an owner"
            .into(),
    })
}

/// Rows per second of one rebuild of the projects view.
async fn rebuild_rate(service: &Service) -> anyhow::Result<f64> {
    let report = service.rebuild("projects", &|_, _| {}).await?;
    Ok(report.events as f64 / report.elapsed.as_secs_f64())
}

pub(crate) fn text(row: &kes_core::Row, key: &str) -> Option<String> {
    match row.get(key)? {
        FieldValue::Text(s) => Some(s.clone()),
        other => Some(format!("{other:?}")),
    }
}

pub(crate) fn int(row: &kes_core::Row, key: &str) -> Option<i64> {
    match row.get(key)? {
        FieldValue::Integer(i) => Some(*i),
        _ => None,
    }
}

/// Seconds to (re)create the baseline table and batch-insert `rows`.
pub(crate) async fn raw_insert(pool: &PgPool, rows: &[(String, String, kes_core::Row)]) -> anyhow::Result<f64> {
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
