//! Three `projects` processes on one Kafka broker and one topic prefix, as
//! three service instances behind a load balancer: concurrent PATCHes to
//! random instances, with and without `If-Match`, through a kill -9 and a
//! rolling restart. Every acknowledged write must be in the log, at the
//! version it was acknowledged with, carrying the value it set, and every
//! instance must end up showing the same history.
//!
//! The instances share only the Kafka topics: each runs in its own working
//! directory with its own SQLite list and history views.

#![cfg(feature = "kafka")]

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

const BIN: &str = env!("CARGO_BIN_EXE_projects");

/// How many instances share the broker.
const INSTANCES: usize = 3;
/// How many projects the clients write to.
const PROJECTS: usize = 6;
/// How many concurrent clients send PATCHes.
const CLIENTS: usize = 12;
/// The least time the clients write for.
const LOAD_FOR: Duration = Duration::from_secs(6);
/// How long an instance may take to answer `/health` after a start.
const READY_WITHIN: Duration = Duration::from_secs(120);
/// How long the instances may take to agree once the load stopped.
const CONVERGE_WITHIN: Duration = Duration::from_secs(120);
/// Events per history page read at the end (several pages per project).
const HISTORY_PAGE: usize = 50;

/// One `projects serve` instance: its own working directory (so its own
/// `data/views.db`), a fixed port it keeps across restarts, and the
/// process while it runs (killed when dropped).
struct Instance {
    index: usize,
    dir: tempfile::TempDir,
    port: u16,
    store: String,
    child: Option<Child>,
}

impl Instance {
    fn new(index: usize, store: &str) -> Self {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        Self { index, dir: tempfile::tempdir().expect("a work dir"), port, store: store.to_owned(), child: None }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the process; does not wait for it to be ready.
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "instance {} is already running", self.index);
        let child = spawn_projects(self.dir.path(), self.port, &self.store);
        self.child = Some(child);
    }

    /// Waits until `/health` answers 200.
    async fn ready(&mut self, client: &reqwest::Client) {
        let started = Instant::now();
        loop {
            if let Ok(r) = client.get(format!("{}/health", self.base())).send().await
                && r.status() == StatusCode::OK
            {
                eprintln!("instance {} ready in {:.1} s", self.index, started.elapsed().as_secs_f64());
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("instance {} exited with {status} before it was ready", self.index);
            }
            assert!(started.elapsed() < READY_WITHIN, "instance {} was not ready within {READY_WITHIN:?}", self.index);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: the crash path.
    async fn kill(&mut self) {
        let mut child = self.child.take().expect("a running instance");
        child.kill().await.expect("SIGKILL");
    }

    /// SIGTERM, then wait for a clean exit: the graceful path.
    async fn stop(&mut self) {
        let mut child = self.child.take().expect("a running instance");
        let pid = child.id().expect("a pid");
        let sent = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
            Ok(Ok(status)) => assert!(status.success(), "instance {} exited with {status} on SIGTERM", self.index),
            Ok(Err(e)) => panic!("waiting for instance {}: {e}", self.index),
            Err(_) => panic!("instance {} did not stop within 30 s of SIGTERM", self.index),
        }
    }
}

fn spawn_projects(dir: &Path, port: u16, store: &str) -> Child {
    Command::new(BIN)
        .current_dir(dir)
        .env("KES_ROLE", "all")
        .env("KES_LISTEN", format!("127.0.0.1:{port}"))
        .env("KES_STORE", store)
        .env("KES_VIEW", "sqlite://data/views.db")
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the projects binary")
}

/// A small deterministic generator (xorshift64*), one per client.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }
}

/// One PATCH an instance acknowledged (2xx).
#[derive(Debug, Clone)]
struct Ack {
    project: usize,
    version: u64,
    value: String,
    position: String,
    instance: usize,
    /// The version its `If-Match` named, if it sent one.
    if_match: Option<u64>,
}

impl Ack {
    fn kind(&self) -> String {
        match self.if_match {
            Some(v) => format!("with If-Match \"{v}\""),
            None => "without If-Match".to_owned(),
        }
    }
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    acked: Mutex<Vec<Ack>>,
    sent: AtomicU64,
    sent_if_match: AtomicU64,
    precondition_failed: AtomicU64,
    connection_errors: AtomicU64,
    timeouts: AtomicU64,
    unavailable: AtomicU64,
    fresh_get_failed: AtomicU64,
    /// Writes read back through another instance with their position.
    read_back: AtomicU64,
    /// Such reads that answered `stale` (the bounded wait ran out).
    stale_reads: AtomicU64,
    /// Answers that must never happen: 409, 412 without If-Match, other
    /// 4xx, 500, or a read with a write's position that misses the write.
    violations: Mutex<Vec<String>>,
}

fn version_of(etag: &str) -> Option<u64> {
    etag.trim_start_matches("W/").trim_matches('"').parse().ok()
}

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// One client: PATCHes of `description` to random projects on random
/// instances until `stop`; every other request (at random) carries
/// `If-Match` from a GET on the same instance just before.
async fn client_loop(
    client_no: usize,
    c: reqwest::Client,
    bases: Arc<Vec<String>>,
    ids: Arc<Vec<String>>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let mut rng = Rng::new(client_no as u64 + 1 + u64::from(std::process::id()));
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let project = rng.below(ids.len());
        let instance = rng.below(bases.len());
        let with_if_match = rng.below(2) == 0;
        let url = format!("{}/projects/{}", bases[instance], ids[project]);
        let value = format!("c{client_no}-{n}");
        let mut request = c.patch(&url).form(&[("description", &value)]);
        let mut if_match = None;
        if with_if_match {
            let etag = match c.get(&url).send().await {
                Ok(r) if r.status() == StatusCode::OK => header(&r, "etag"),
                Ok(_) => None,
                Err(_) => {
                    tally.connection_errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
            let Some((etag, version)) = etag.and_then(|e| version_of(&e).map(|v| (e, v))) else {
                tally.fresh_get_failed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            request = request.header("If-Match", etag);
            if_match = Some(version);
            tally.sent_if_match.fetch_add(1, Ordering::Relaxed);
        }
        tally.sent.fetch_add(1, Ordering::Relaxed);
        let r = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                let counter = if e.is_timeout() { &tally.timeouts } else { &tally.connection_errors };
                counter.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let status = r.status();
        if status.is_success() {
            let etag = header(&r, "etag");
            let position = header(&r, "kes-position");
            match (etag.as_deref().and_then(version_of), position) {
                (Some(version), Some(position)) => {
                    let ack = Ack { project, version, value, position, instance, if_match };
                    // Now and then, read the write back through another
                    // instance with its position token.
                    if rng.below(3) == 0 {
                        let other = (instance + 1 + rng.below(bases.len() - 1)) % bases.len();
                        read_back(&c, &bases[other], other, &ids[project], &ack, &tally).await;
                    }
                    tally.acked.lock().await.push(ack);
                }
                (etag, position) => tally.violations.lock().await.push(format!(
                    "PATCH {value} on instance {instance} answered {status} without a usable ETag ({etag:?}) or \
                     KES-Position ({position:?})"
                )),
            }
            continue;
        }
        // The body is read only to be reported; a connection that drops
        // while it is read changes nothing.
        let body = r.text().await.unwrap_or_default();
        match status {
            StatusCode::PRECONDITION_FAILED if if_match.is_some() => {
                tally.precondition_failed.fetch_add(1, Ordering::Relaxed);
            }
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => {
                tally.unavailable.fetch_add(1, Ordering::Relaxed);
            }
            _ => tally.violations.lock().await.push(format!(
                "PATCH {value} ({}) of {} on instance {instance} answered {status}: {body}",
                if with_if_match { "with If-Match" } else { "without If-Match" },
                ids[project]
            )),
        }
    }
}

/// `GET` of the project `ack` wrote, on instance `other`, with the write's
/// `KES-Position`: once the answer says `caught-up`, it shows the write
/// (or a later version).
async fn read_back(c: &reqwest::Client, base: &str, other: usize, id: &str, ack: &Ack, tally: &Tally) {
    let r = match c.get(format!("{base}/projects/{id}")).header("KES-Position", &ack.position).send().await {
        Ok(r) => r,
        // The other instance is down (killed or restarting).
        Err(_) => return,
    };
    let status = r.status();
    let consistency = header(&r, "kes-consistency");
    let etag = header(&r, "etag").as_deref().and_then(version_of);
    let body: Value = r.json().await.unwrap_or(Value::Null);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        tally.unavailable.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if consistency.as_deref() == Some("stale") {
        tally.stale_reads.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let shows = match etag {
        Some(v) if v > ack.version => true,
        Some(v) if v == ack.version => body["description"] == json!(ack.value),
        _ => false,
    };
    if status != StatusCode::OK || consistency.as_deref() != Some("caught-up") || !shows {
        tally.violations.lock().await.push(format!(
            "instance {} acknowledged {id} v{} ({}) at {}; GET on instance {other} with that position answered \
             {status}, {consistency:?}, version {etag:?}, description {}",
            ack.instance, ack.version, ack.value, ack.position, body["description"]
        ));
    } else {
        tally.read_back.fetch_add(1, Ordering::Relaxed);
    }
}

/// The version (ETag) every instance shows for each project, once they all
/// agree; polled until [`CONVERGE_WITHIN`].
async fn converged_versions(c: &reqwest::Client, bases: &[String], ids: &[String]) -> Vec<u64> {
    let started = Instant::now();
    loop {
        let mut seen: Vec<Vec<Option<u64>>> = Vec::new();
        for id in ids {
            let mut versions = Vec::new();
            for base in bases {
                let version = match c.get(format!("{base}/projects/{id}")).send().await {
                    Ok(r) if r.status() == StatusCode::OK => header(&r, "etag").as_deref().and_then(version_of),
                    _ => None,
                };
                versions.push(version);
            }
            seen.push(versions);
        }
        let agreed: Option<Vec<u64>> = seen
            .iter()
            .map(|versions| match versions.first() {
                Some(Some(v)) if versions.iter().all(|x| *x == Some(*v)) => Some(*v),
                _ => None,
            })
            .collect();
        if let Some(agreed) = agreed {
            eprintln!("instances agree on every ETag after {:.1} s", started.elapsed().as_secs_f64());
            return agreed;
        }
        assert!(
            started.elapsed() < CONVERGE_WITHIN,
            "the instances did not agree on the projects' ETags within {CONVERGE_WITHIN:?} (per project, per \
             instance): {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The whole history of `id` on the instance at `base`, page by page, once
/// it reaches `version`; `token` (the position of the latest acknowledged
/// write) goes with every page, so the answer must say `caught-up`.
async fn history(c: &reqwest::Client, base: &str, id: &str, version: u64, token: Option<&str>) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let mut items: Vec<Value> = Vec::new();
        let mut after = 0u64;
        let mut caught_up = true;
        let mut last_refusal = None;
        loop {
            let mut request =
                c.get(format!("{base}/projects/{id}/events?page[size]={HISTORY_PAGE}&page[after]={after}"));
            if let Some(token) = token {
                request = request.header("KES-Position", token);
            }
            let page = request.send().await.expect("a history page");
            if page.status() != StatusCode::OK {
                // A restarted instance may not have projected the project
                // yet (404) or be catching up (503): wait and read again.
                last_refusal = Some(format!("{} after version {after}", page.status()));
                caught_up = false;
                break;
            }
            if token.is_some() && header(&page, "kes-consistency").as_deref() != Some("caught-up") {
                caught_up = false;
            }
            let page: Value = page.json().await.expect("a JSON history page");
            let got = page["items"].as_array().expect("items");
            assert!(got.len() <= HISTORY_PAGE, "a page of {} items, asked for {HISTORY_PAGE}", got.len());
            items.extend(got.iter().cloned());
            match page["next"].as_u64() {
                Some(next) => {
                    assert!(next > after, "history of {id} on {base}: next {next} after {after}");
                    after = next;
                }
                None => break,
            }
        }
        let last = items.last().and_then(|e| e["version"].as_u64()).unwrap_or(0);
        if caught_up && last >= version {
            return items;
        }
        assert!(
            started.elapsed() < CONVERGE_WITHIN,
            "the history of {id} on {base} reached version {last} of {version} (caught up with the last \
             acknowledged write: {caught_up}; last refusal: {last_refusal:?}) within {CONVERGE_WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_projects_instances_on_one_broker_lose_no_acknowledged_write() {
    let Some(brokers) = kes_test_support::kafka_brokers() else { return };
    let prefix = format!("inst{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let store = format!("kafka://{brokers}?prefix={prefix}");
    let c = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("an HTTP client");

    // The first instance creates the topics; the other two join it.
    let mut instances: Vec<Instance> = (0..INSTANCES).map(|i| Instance::new(i, &store)).collect();
    instances[0].spawn();
    instances[0].ready(&c).await;
    for instance in &mut instances[1..] {
        instance.spawn();
    }
    for instance in &mut instances[1..] {
        instance.ready(&c).await;
    }
    let bases: Arc<Vec<String>> = Arc::new(instances.iter().map(Instance::base).collect());

    // Projects created through random instances.
    let mut rng = Rng::new(u64::from(std::process::id()));
    let mut ids = Vec::new();
    for p in 0..PROJECTS {
        let instance = rng.below(INSTANCES);
        let r = c
            .post(format!("{}/projects", bases[instance]))
            .json(&json!({ "name": format!("p{p}"), "description": "created" }))
            .send()
            .await
            .expect("create");
        assert_eq!(r.status(), StatusCode::CREATED, "creating project {p} on instance {instance}");
        assert_eq!(header(&r, "etag").as_deref().and_then(version_of), Some(1));
        let location = header(&r, "location").expect("a Location");
        ids.push(location.trim_start_matches("/projects/").to_owned());
    }
    // Every instance knows every project before the load starts.
    let known = converged_versions(&c, &bases, &ids).await;
    assert!(known.iter().all(|v| *v == 1), "fresh projects at version 1 everywhere: {known:?}");
    let ids = Arc::new(ids);

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| {
            let (c, bases, ids) = (c.clone(), Arc::clone(&bases), Arc::clone(&ids));
            let (stop, tally) = (Arc::clone(&stop), Arc::clone(&tally));
            tokio::spawn(client_loop(n, c, bases, ids, stop, tally))
        })
        .collect();

    // A crash: instance 0 is killed mid-load and started again on its port.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    eprintln!("SIGKILL instance 0 at {:.1} s", started.elapsed().as_secs_f64());
    instances[0].kill().await;
    instances[0].spawn();
    instances[0].ready(&c).await;
    // A rolling deploy: instance 1 stops gracefully and starts again.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    eprintln!("SIGTERM instance 1 at {:.1} s", started.elapsed().as_secs_f64());
    instances[1].stop().await;
    eprintln!("instance 1 stopped at {:.1} s", started.elapsed().as_secs_f64());
    instances[1].spawn();
    instances[1].ready(&c).await;
    // The load goes on for a while with every instance back.
    let until = (started + LOAD_FOR).max(Instant::now() + Duration::from_secs(1));
    tokio::time::sleep_until(until.into()).await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.expect("a client task panicked");
    }
    let load_secs = started.elapsed().as_secs_f64();

    let acked = tally.acked.lock().await.clone();
    let violations = tally.violations.lock().await.clone();
    let if_match_acked = acked.iter().filter(|a| a.if_match.is_some()).count();
    eprintln!(
        "{load_secs:.1} s of load: {} PATCHes sent ({} with If-Match); {} acknowledged ({} with If-Match, {} \
         without); {} answered 412; {} connection errors; {} timeouts; {} answered 503/504; {} If-Match GETs \
         without an ETag; {} writes read back through another instance with their KES-Position ({} stale); {} \
         forbidden answers",
        tally.sent.load(Ordering::Relaxed),
        tally.sent_if_match.load(Ordering::Relaxed),
        acked.len(),
        if_match_acked,
        acked.len() - if_match_acked,
        tally.precondition_failed.load(Ordering::Relaxed),
        tally.connection_errors.load(Ordering::Relaxed),
        tally.timeouts.load(Ordering::Relaxed),
        tally.unavailable.load(Ordering::Relaxed),
        tally.fresh_get_failed.load(Ordering::Relaxed),
        tally.read_back.load(Ordering::Relaxed),
        tally.stale_reads.load(Ordering::Relaxed),
        violations.len(),
    );
    for v in violations.iter().take(20) {
        eprintln!("  forbidden: {v}");
    }
    assert!(violations.is_empty(), "{} answers that must never happen; first: {}", violations.len(), violations[0]);
    assert!(!acked.is_empty(), "no PATCH was acknowledged");
    assert!(acked.iter().any(|a| a.if_match.is_none()), "no PATCH without If-Match was acknowledged");
    // A write conditional on version N lands at N + 1 or not at all.
    for ack in &acked {
        if let Some(base) = ack.if_match {
            assert_eq!(
                ack.version,
                base + 1,
                "{}: PATCH {} {} was acknowledged by instance {} at version {}",
                ids[ack.project],
                ack.value,
                ack.kind(),
                ack.instance,
                ack.version
            );
        }
    }

    // No version acknowledged twice.
    let mut by_version: BTreeMap<(usize, u64), &Ack> = BTreeMap::new();
    for ack in &acked {
        if let Some(earlier) = by_version.insert((ack.project, ack.version), ack) {
            panic!(
                "version {} of {} was acknowledged twice: {:?} and {:?}",
                ack.version, ids[ack.project], earlier, ack
            );
        }
    }

    let versions = converged_versions(&c, &bases, &ids).await;
    let mut acked_per_project: HashMap<usize, Vec<&Ack>> = HashMap::new();
    for ack in &acked {
        acked_per_project.entry(ack.project).or_default().push(ack);
    }
    let mut events = 0;
    for (p, id) in ids.iter().enumerate() {
        let acks = acked_per_project.remove(&p).unwrap_or_default();
        let latest = acks.iter().max_by_key(|a| a.version);
        let version = versions[p];
        if let Some(latest) = latest {
            assert!(
                latest.version <= version,
                "{id}: version {} was acknowledged (on instance {}) but every instance shows version {version}",
                latest.version,
                latest.instance
            );
        }
        let token = latest.map(|a| a.position.as_str());
        let mut first: Option<Vec<Value>> = None;
        for (i, base) in bases.iter().enumerate() {
            let items = history(&c, base, id, version, token).await;
            let numbers: Vec<u64> = items.iter().map(|e| e["version"].as_u64().unwrap_or(0)).collect();
            assert_eq!(
                numbers,
                (1..=version).collect::<Vec<_>>(),
                "{id} on instance {i}: the versions are not contiguous up to {version}"
            );
            assert!(items[0]["payload"]["Created"].is_object(), "{id} on instance {i}: version 1 is {}", items[0]);
            // Every request set a value of its own: one found twice is a
            // command applied twice.
            let mut set_at: HashMap<&str, u64> = HashMap::new();
            for event in &items[1..] {
                let value = event["payload"]["DescriptionChanged"]["description"].as_str();
                let value = value.unwrap_or_else(|| panic!("{id} on instance {i}: an unexpected event {event}"));
                let version = event["version"].as_u64().unwrap_or(0);
                if let Some(earlier) = set_at.insert(value, version) {
                    panic!(
                        "{id} on instance {i}: description {value:?} was set twice, at versions {earlier} and {version}"
                    );
                }
            }
            for ack in &acks {
                let event = &items[(ack.version - 1) as usize];
                assert_eq!(
                    event["payload"]["DescriptionChanged"]["description"],
                    json!(ack.value),
                    "{id} on instance {i}: version {} was acknowledged by instance {} ({}) for description {:?}, \
                     the history holds {event}",
                    ack.version,
                    ack.instance,
                    ack.kind(),
                    ack.value
                );
                assert_eq!(
                    event["position"],
                    json!(ack.position.trim_start_matches("project@")),
                    "{id} on instance {i}: version {} was acknowledged at position {}, the history has it at {}",
                    ack.version,
                    ack.position,
                    event["position"]
                );
            }
            match &first {
                None => first = Some(items),
                Some(first) => {
                    if let Some(v) = first.iter().zip(&items).position(|(a, b)| a != b) {
                        panic!("{id}: instances 0 and {i} differ at version {}: {} vs {}", v + 1, first[v], items[v]);
                    }
                    assert_eq!(
                        first.len(),
                        items.len(),
                        "{id}: instances 0 and {i} hold histories of different lengths"
                    );
                }
            }
        }
        events += version;
        eprintln!("{id}: {version} versions, {} acknowledged by the clients, identical on every instance", acks.len());
    }
    eprintln!("{events} events in all; every acknowledged write is in place on every instance");

    for instance in &mut instances {
        instance.stop().await;
    }
}
