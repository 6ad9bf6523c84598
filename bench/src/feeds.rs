//! Change feeds under write load: 200 open `GET /projects/changes` while
//! 64 clients PATCH, against the same load with no feed open. Every feed
//! must end at the last acknowledged version of every project; the
//! delivery latency (acknowledgement → SSE event) goes in the note.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{Measured, Plan, median};

/// Feeds open during the measured rounds.
pub const FEEDS: usize = 200;
const CLIENTS: usize = 64;

/// When each (project, version) was acknowledged.
type Acks = Arc<Mutex<HashMap<(String, u64), Instant>>>;

/// The written projects' ids, each with its index in [`Seen`].
type Ids = Arc<HashMap<String, usize>>;

/// What one feed saw: the latest version of each project (by its index in
/// [`Ids`]), and when each (project, version) event arrived.
#[derive(Default)]
struct Seen {
    /// The server answered: the feed is subscribed (it is before the
    /// answer's headers are sent).
    connected: bool,
    latest: Vec<u64>,
    arrived: Vec<(usize, u64, Instant)>,
}

/// `clients` loops of `PATCH {"name"}` for `duration`: requests per
/// second; each acknowledged version is recorded in `acks`.
async fn patch_round(
    client: &reqwest::Client,
    urls: &[String],
    duration: Duration,
    acks: &Acks,
) -> anyhow::Result<f64> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let (client, url, done, acks) = (client.clone(), urls[i % urls.len()].clone(), done.clone(), acks.clone());
        let id = url.rsplit('/').next().unwrap_or_default().to_owned();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let n = COUNTER.fetch_add(1, Ordering::Relaxed);
                let r = client
                    .patch(&url)
                    .header("content-type", "application/json")
                    .body(format!("{{\"name\":\"f{n}\"}}"))
                    .send()
                    .await?;
                let at = Instant::now();
                if !r.status().is_success() {
                    bail!("{url} answered {}", r.status());
                }
                let version = r
                    .headers()
                    .get("etag")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|t| t.trim_matches('"').parse::<u64>().ok())
                    .context("an ETag")?;
                let _ = r.bytes().await?;
                acks.lock().unwrap_or_else(|p| p.into_inner()).insert((id.clone(), version), at);
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await.context("a load task panicked")??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// The byte patterns a feed reader looks for, compiled once.
struct Patterns {
    end: memchr::memmem::Finder<'static>,
    reset: memchr::memmem::Finder<'static>,
    data: memchr::memmem::Finder<'static>,
    id: memchr::memmem::Finder<'static>,
    version: memchr::memmem::Finder<'static>,
}

impl Patterns {
    fn new() -> Self {
        use memchr::memmem::Finder;
        Self {
            end: Finder::new(b"\n\n"),
            reset: Finder::new(b"event: reset"),
            data: Finder::new(b"data:"),
            id: Finder::new(b"\"id\":\""),
            version: Finder::new(b"\"version\":"),
        }
    }

    /// The (id, version) an event block reports; `Err` for a reset.
    fn event<'b>(&self, block: &'b [u8]) -> anyhow::Result<Option<(&'b [u8], u64)>> {
        if self.reset.find(block).is_some() {
            bail!("a feed was reset (too slow a reader)");
        }
        // The two fields the check needs, without decoding the row.
        let Some(data) = self.data.find(block).map(|at| &block[at..]) else { return Ok(None) };
        let Some(id) = self.id.find(data).map(|at| &data[at + self.id.needle().len()..]) else { return Ok(None) };
        let Some(id) = memchr::memchr(b'"', id).map(|end| &id[..end]) else { return Ok(None) };
        let Some(digits) = self.version.find(data).map(|at| &data[at + self.version.needle().len()..]) else {
            return Ok(None);
        };
        let digits = &digits[..digits.iter().position(|b| !b.is_ascii_digit()).unwrap_or(digits.len())];
        let version = std::str::from_utf8(digits).ok().and_then(|d| d.parse::<u64>().ok());
        Ok(version.map(|v| (id, v)))
    }
}

/// Opens a feed and reads it into `seen` until the connection ends.
///
/// The readers share the machine with the server they measure, so each
/// chunk is scanned once, front to back, nothing is allocated per event,
/// and `seen` is locked once per chunk.
async fn read_feed(client: reqwest::Client, url: String, ids: Ids, seen: Arc<Mutex<Seen>>) -> anyhow::Result<()> {
    let mut r = client.get(&url).timeout(Duration::from_secs(3600)).send().await?;
    if !r.status().is_success() {
        bail!("{url} answered {}", r.status());
    }
    seen.lock().unwrap_or_else(|p| p.into_inner()).connected = true;
    let patterns = Patterns::new();
    let mut buffer: Vec<u8> = Vec::new();
    let mut found: Vec<(usize, u64)> = Vec::new();
    while let Some(chunk) = r.chunk().await? {
        let at = Instant::now();
        buffer.extend_from_slice(&chunk);
        let mut start = 0;
        while let Some(len) = patterns.end.find(&buffer[start..]) {
            let block = &buffer[start..start + len];
            start += len + 2;
            let Some((id, version)) = patterns.event(block)? else { continue };
            if let Some(&index) = std::str::from_utf8(id).ok().and_then(|id| ids.get(id)) {
                found.push((index, version));
            }
        }
        buffer.drain(..start);
        if found.is_empty() {
            continue;
        }
        let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.latest.len() < ids.len() {
            seen.latest.resize(ids.len(), 0);
        }
        for (index, version) in found.drain(..) {
            seen.latest[index] = version;
            seen.arrived.push((index, version, at));
        }
    }
    Ok(())
}

/// The `p`-th percentile of sorted `values` (milliseconds).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One round with [`FEEDS`] feeds open: its write rate; the feeds'
/// delivery latencies are added to `latencies`.
// Kept in one piece: One measured round reads top to bottom (open the feeds, write, collect the latencies,
// close); split, its steps would hand each other every local.
async fn with_feeds(
    client: &reqwest::Client,
    base: &str,
    urls: &[String],
    duration: Duration,
    latencies: &mut Vec<f64>,
) -> anyhow::Result<f64> {
    let ids: Ids = Arc::new(
        urls.iter().enumerate().map(|(i, url)| (url.rsplit('/').next().unwrap_or_default().to_owned(), i)).collect(),
    );
    let feeds: Vec<Arc<Mutex<Seen>>> = (0..FEEDS).map(|_| Arc::default()).collect();
    let readers: Vec<_> = feeds
        .iter()
        .map(|seen| {
            let url = format!("{base}/projects/changes");
            tokio::spawn(read_feed(client.clone(), url, ids.clone(), seen.clone()))
        })
        .collect();
    let acks: Acks = Arc::default();
    let connected = Instant::now() + Duration::from_secs(30);
    while feeds.iter().any(|f| !f.lock().unwrap_or_else(|p| p.into_inner()).connected) {
        if Instant::now() > connected {
            bail!("the feeds did not all connect within 30 s");
        }
        if let Some(done) = readers.iter().find(|r| r.is_finished()) {
            let _ = done;
            bail!("a feed could not be opened");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = patch_round(client, urls, duration, &acks).await?;
    let acks: HashMap<(usize, u64), Instant> = acks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter_map(|((id, version), at)| Some(((*ids.get(id)?, *version), *at)))
        .collect();
    let mut last: HashMap<usize, u64> = HashMap::new();
    for (index, version) in acks.keys() {
        let v = last.entry(*index).or_insert(0);
        *v = (*v).max(*version);
    }
    // Every feed ends at every project's last acknowledged version.
    let converged = Instant::now() + Duration::from_secs(30);
    loop {
        let behind = feeds
            .iter()
            .filter(|f| {
                let seen = f.lock().unwrap_or_else(|p| p.into_inner());
                last.iter().any(|(index, v)| seen.latest.get(*index).copied().unwrap_or(0) < *v)
            })
            .count();
        if behind == 0 {
            break;
        }
        if Instant::now() > converged {
            bail!("{behind} of {FEEDS} feeds lack acknowledged changes 30 s after the writes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for reader in &readers {
        if reader.is_finished() {
            bail!("a feed ended during the round");
        }
    }
    for seen in &feeds {
        let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        for (index, version, at) in &seen.arrived {
            if let Some(acked) = acks.get(&(*index, *version)) {
                latencies.push(at.saturating_duration_since(*acked).as_secs_f64() * 1000.0);
            }
        }
    }
    for reader in readers {
        reader.abort();
    }
    Ok(rate)
}

/// The scenario: write rate with [`FEEDS`] feeds open against none.
pub async fn measure(plan: Plan, client: &reqwest::Client, base: &str, urls: &[String]) -> anyhow::Result<Measured> {
    let none: Acks = Arc::default();
    patch_round(client, urls, Duration::from_secs(1), &none).await?;
    let mut latencies = Vec::new();
    let mut kes = Vec::new();
    let mut baseline = Vec::new();
    for round in 0..plan.rounds {
        let without = |acks: Acks| async move { patch_round(client, urls, plan.round, &acks).await };
        if round % 2 == 0 {
            kes.push(with_feeds(client, base, urls, plan.round, &mut latencies).await?);
            baseline.push(without(Arc::default()).await?);
        } else {
            baseline.push(without(Arc::default()).await?);
            kes.push(with_feeds(client, base, urls, plan.round, &mut latencies).await?);
        }
    }
    latencies.sort_by(f64::total_cmp);
    Ok(Measured {
        smaller: None,
        kes: median(kes),
        baseline: median(baseline),
        note: format!(
            "PATCH {{\"name\"}} over HTTP on 64 projects (PostgreSQL store and views), with {FEEDS} open \
             GET /projects/changes feeds vs none; every feed ended at every project's last acknowledged \
             version; delivery latency acknowledgement → SSE event over {} events: p50 {:.1} ms, p99 {:.1} ms",
            latencies.len(),
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99)
        ),
    })
}
