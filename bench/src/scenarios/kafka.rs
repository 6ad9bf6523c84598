//! The Kafka scenarios: writes against the raw producer, reads, the
//! table rebuild and its memory, and cold history reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kes_core::{Aggregate, EventStore, ExpectedVersion, Metadata};
use kes_examples::domain::{Project, ProjectEvent};
use kes_examples::service::{Service, Settings};
use kes_store_kafka::{KafkaStore, KafkaStoreConfig};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::alloc::Region;
use crate::backends::Kafka;
use crate::ladder::{Served, largest_served, thousands};
use crate::load::{self, Verb};
use crate::{Better, Measured, Missing, Outcome, Plan, Spec, median};

use super::*;

pub(crate) async fn raw_produce(
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

pub(crate) fn events_topic(store_url: &str) -> anyhow::Result<String> {
    Ok(KafkaStoreConfig::from_url(store_url)?.events_topic(Project::NAME))
}

pub(crate) async fn kafka_patch(ctx: &mut Ctx) -> Result<Measured, Missing> {
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
        smaller: None,
        kes: k,
        baseline: b,
        note: format!(
            "PATCH {{\"name\"}} (one Renamed) on 64 projects, one per client; baseline: rdkafka FutureProducer \
             (idempotent, acks=all, linger.ms=0, {in_flight} requests in flight per broker, as KES's), 64 sends in \
             flight, records of {key_len} + {value_len} bytes (the size of a KES events record), same broker, 3 \
             partitions",
            in_flight = kes_store_kafka::PRODUCER_IN_FLIGHT
        ),
    })
}

/// Kafka PATCH through a service whose projections run (the list views of
/// projects and tasks, the history views and the reactions, on SQLite)
/// against the same service without them, each on topics of its own: what
/// a deployment that runs its projections in the HTTP process pays for
/// them. Their subscriptions take the records from the partitions' tails
/// in memory; a regression there (a subscription fetching every record
/// again, or looping) shows here as a falling ratio.
pub(crate) async fn kafka_projections(ctx: &mut Ctx) -> Result<Measured, Missing> {
    let plan = ctx.plan;
    let brokers = ctx.kafka()?.brokers.clone();
    let store_url = |tag: &str| format!("kafka://{brokers}?prefix={}", Kafka::prefix(tag));
    let projected = Live::open(store_url("projected"), None, "kj").await?;
    projected.service.start_projections().await?;
    let plain = Live::open(store_url("plain"), None, "kn").await?;
    let (with, without) = (projected.urls(), plain.urls());
    let client = ctx.client.clone();
    for urls in [&with, &without] {
        load::concurrent(&client, Verb::PatchName, urls, CLIENTS, Duration::from_secs(10), CLIENTS as u64 * 4).await?;
    }
    let (k, b) = interleave!(
        plan.rounds,
        load::concurrent(&client, Verb::PatchName, &with, CLIENTS, plan.round, u64::MAX).await?,
        load::concurrent(&client, Verb::PatchName, &without, CLIENTS, plan.round, u64::MAX).await?
    );
    projected.service.shutdown().await;
    plain.service.shutdown().await;
    Ok(Measured {
        smaller: None,
        kes: k,
        baseline: b,
        note: "PATCH {\"name\"} (one Renamed) on 64 projects, one per client, through the projects service on Kafka \
               with its projections running (list and history views on SQLite, reactions); baseline: the same \
               service on topics of its own without them, rounds alternated"
            .into(),
    })
}

pub(crate) async fn kafka_patch_instances(ctx: &mut Ctx) -> Result<Measured, Missing> {
    let kafka = Kafka { brokers: ctx.kafka()?.brokers.clone() };
    crate::instances::kafka_patch_instances(ctx.plan, &ctx.client, &kafka).await
}

pub(crate) async fn kafka_seed_loop(ctx: &mut Ctx) -> Result<Measured, Missing> {
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
        smaller: None,
        kes: k,
        baseline: b,
        note: format!(
            "{} PATCH one after the other on one keep-alive connection, mean per request; baseline: bare axum \
             handler doing one awaited idempotent acks=all produce of the body (same broker)",
            ctx.plan.sequential
        ),
    })
}

pub(crate) async fn kafka_get(ctx: &mut Ctx) -> Result<Measured, Missing> {
    ctx.kafka_live().await?;
    let live = ctx.kafka_live.take().ok_or_else(|| Missing::Failed(anyhow::anyhow!("no service")))?;
    let result = get_by_id(ctx, &live).await;
    ctx.kafka_live = Some(live);
    Ok(result?)
}

/// The Kafka table rebuild, and the table-memory line it also measures. A
/// full run climbs to `plan.aggregates` through smaller sizes and keeps the
/// largest the broker serves (see [`crate::ladder`]).
pub(crate) async fn kafka_table(ctx: &mut Ctx, out: &mut Vec<Outcome>) -> Result<Measured, Missing> {
    let plan = ctx.plan;
    let memory_spec = Spec {
        name: format!("table memory, {}k aggregates (Kafka store)", plan.aggregates / 1000),
        unit: "bytes",
        better: Better::Lower,
        goal: 0.8,
    };
    let kafka = ctx.kafka().map(|k| Kafka { brokers: k.brokers.clone() });
    let sizes = if plan.quick { vec![plan.aggregates] } else { ladder_to(plan.aggregates, &[5_000, 20_000, 50_000]) };
    // Bounded: a broker that stops answering must not hang the run.
    let bound = Duration::from_secs(if plan.quick { 60 } else { 300 });
    let doing = "seeding, waiting for the table topic, or reopening";
    paired(kafka, memory_spec, out, bound * sizes.len() as u32, doing, |kafka| async move {
        let kafka = &kafka;
        let served = largest_served(&sizes, bound, table_pauses(plan), |n| kafka_table_inner(kafka, plan, n)).await?;
        Ok(smaller(served))
    })
    .await
}

/// `sizes` below `target`, then `target`.
fn ladder_to(target: usize, sizes: &[usize]) -> Vec<usize> {
    sizes.iter().copied().filter(|s| *s < target).chain([target]).collect()
}

/// The two lines of a laddered scenario, each saying at which size it ran
/// when that is not the largest.
fn smaller(served: Served<(Measured, Measured)>) -> (Measured, Measured) {
    let (mut first, mut second) = served.value;
    let note = served.short.map(|why| format!("ran at {} ({why})", thousands(served.size)));
    first.smaller.clone_from(&note);
    second.smaller = note;
    (first, second)
}

/// The pause after each round of the table rebuild, outside its timing:
/// long enough for a dropped store's background tasks to notice and end.
const SETTLE: Duration = Duration::from_millis(700);

/// The pauses of one size of the table scenario ([`SETTLE`] after every
/// timed round and every memory round): time that does not grow with the
/// size, which the ladder leaves out of its projection.
fn table_pauses(plan: Plan) -> Duration {
    SETTLE * u32::try_from(2 * plan.short_rebuild_rounds() + plan.rebuild_rounds).unwrap_or(u32::MAX)
}

// Kept in one piece: A scenario reads top to bottom (seed, measure KES, measure the baseline, clean up); split,
// its steps would hand each other every local.
pub(crate) async fn kafka_table_inner(
    kafka: &Kafka,
    plan: Plan,
    aggregates: usize,
) -> anyhow::Result<(Measured, Measured)> {
    let config = KafkaStoreConfig::new(kafka.brokers.clone(), Kafka::prefix("table"));
    let table_topic = config.table_topic(Project::NAME);
    let states = {
        let store = KafkaStore::<Project>::open(config.clone()).await?;
        let states = seed(Arc::new(store.clone()), aggregates, "t").await?;
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
    let partitions = kafka.partitions(&table_topic).await?;
    let mut records = kafka.read_all(&table_topic, partitions).await?;
    eprintln!("  table topic: {records} records");
    while (records as usize) < states.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        records = kafka.read_all(&table_topic, partitions).await?;
    }
    anyhow::ensure!(records as usize >= states.len(), "the table topic holds {records} of {} records", states.len());
    let last = format!("t{}", states.len() - 1);
    // A reopen reads the table topic in about 0.15 s at the quick size:
    // short rounds (about 17 s in all at the quick size, pauses included).
    // The timed opens count no allocations: counting puts atomic updates of
    // shared counters on every allocation and free, which no service pays
    // and which threads allocating side by side contend on.
    let (k, b) = interleave!(
        plan.short_rebuild_rounds(),
        {
            let started = Instant::now();
            let store = KafkaStore::<Project>::open(config.clone()).await?;
            let secs = started.elapsed().as_secs_f64();
            anyhow::ensure!(store.load(&last).await?.is_some(), "the reopened table lacks {last}");
            drop(store);
            eprintln!("  KES reopen: {secs:.2} s");
            // A dropped store's tasks and clients end in the background (its
            // follower, the owners' group); the next round, of either side,
            // must not read the topic beside them.
            tokio::time::sleep(SETTLE).await;
            records as f64 / secs
        },
        {
            let started = Instant::now();
            let read = kafka.read_all(&table_topic, partitions).await?;
            anyhow::ensure!(read == records, "the raw consumer read {read} of {records} records");
            let secs = started.elapsed().as_secs_f64();
            eprintln!("  raw read: {secs:.2} s");
            tokio::time::sleep(SETTLE).await;
            records as f64 / secs
        }
    );
    // The memory figure comes from opens of their own, untimed.
    let mut memory = Vec::new();
    for _ in 0..plan.rebuild_rounds {
        let region = Region::start();
        let store = KafkaStore::<Project>::open(config.clone()).await?;
        // Everything the open store still holds: allocated minus freed since
        // just before it was opened (a realloc's growth counts as allocated,
        // its shrinking as freed).
        let held = region.held() as f64;
        drop(region);
        anyhow::ensure!(store.load(&last).await?.is_some(), "the reopened table lacks {last}");
        drop(store);
        memory.push(held);
        tokio::time::sleep(SETTLE).await;
    }
    let rebuild = Measured {
        smaller: None,
        kes: k,
        baseline: b,
        note: format!(
            "KafkaStore::open on existing topics ({records} table records for {} aggregates, 3 partitions), \
             until it takes commands; baseline: a plain rdkafka BaseConsumer reading the same table topic from each \
             partition's low watermark to its end (fetch.wait.max.ms=5, as KES's bounded reads; told the partition \
             count instead of asking a new client for the topic's metadata)",
            states.len()
        ),
    };
    let memory = Measured {
        smaller: None,
        kes: median(memory),
        baseline: raw_json as f64,
        note: "bytes still allocated (counting global allocator) after KafkaStore::open rebuilt its \
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
pub(crate) async fn kafka_history(ctx: &mut Ctx, out: &mut Vec<Outcome>) -> Result<Measured, Missing> {
    let plan = ctx.plan;
    let store_spec = Spec {
        name: "audit history, 1,000 events, Kafka: KafkaStore::read, cold".into(),
        unit: "ms",
        better: Better::Lower,
        goal: 0.5,
    };
    let kafka = ctx.kafka().map(|k| Kafka { brokers: k.brokers.clone() });
    let sizes = if plan.quick { vec![10_000] } else { ladder_to(50_000, &[10_000]) };
    let bound = Duration::from_secs(if plan.quick { 180 } else { 600 });
    let doing = "seeding or reading the history";
    paired(kafka, store_spec, out, bound * sizes.len() as u32, doing, |kafka| async move {
        let kafka = &kafka;
        let served =
            largest_served(&sizes, bound, Duration::ZERO, |others| kafka_history_inner(kafka, plan, others)).await?;
        Ok(smaller(served))
    })
    .await
}

// Kept in one piece: A scenario reads top to bottom (seed, measure KES, measure the baseline, clean up); split,
// its steps would hand each other every local.
pub(crate) async fn kafka_history_inner(
    kafka: &Kafka,
    plan: Plan,
    others: usize,
) -> anyhow::Result<(Measured, Measured)> {
    const EVENTS: usize = 1_000;
    let between = others / EVENTS;
    let url = format!("kafka://{}?prefix={}", kafka.brokers, Kafka::prefix("hist"));
    let config = KafkaStoreConfig::from_url(&url)?;
    let topic = config.events_topic(Project::NAME);
    let target = "history-target";

    // Seed: `between` other aggregates' records, then one of the target's, 1,000 times.
    let started = Instant::now();
    let mut offsets = Vec::with_capacity(EVENTS);
    let mut partition = 0;
    {
        let store: Arc<dyn EventStore<Project>> = Arc::new(KafkaStore::<Project>::open(config.clone()).await?);
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
    let server = load::serve(service.app()?).await?;
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
            let store = KafkaStore::<Project>::open(config.clone()).await?;
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
        smaller: None,
        kes: view_ms,
        baseline: view_raw_ms,
        note: format!(
            "GET /projects/{{id}}/events?page[size]={EVENTS} on the projects service (Kafka store, SQLite views: the \
             history view), {EVENTS} events among {others} other records; {baseline_note}"
        ),
    };
    let store = Measured {
        smaller: None,
        kes: store_ms,
        baseline: store_raw_ms,
        note: format!(
            "KafkaStore::read of the same aggregate on a freshly connected store (no read cache); {baseline_note}"
        ),
    };
    Ok((view, store))
}
