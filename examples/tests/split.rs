//! CQRS for real (issue 21): the command side and the query side in
//! separate `projects serve` processes, under load, through the failures
//! a projector meets in production.
//!
//! Every scenario runs one `api` process and two `projector` processes on
//! one store and one view location (`KES_LEASE_TTL_MS=2000`); 16 clients
//! create projects and tasks and PATCH them through the api for at least
//! 10 s, and read every second write of theirs back with its
//! `KES-Position`. Then:
//!
//! - **failover**: the projector that leads the `projects` projection is
//!   killed (SIGKILL); the standby takes over. A fresh standby is started,
//!   and the new leader is stopped (SIGSTOP) past its lease; the standby
//!   takes over; the stalled one is resumed (SIGCONT) while writes go on,
//!   and must stand by without writing a row or a checkpoint. On SQLite a
//!   projector stopped inside its view transaction keeps the file's write
//!   lock, so nobody can take over until it resumes: the test recognises
//!   that case by the lock, says so, and checks the recovery after SIGCONT
//!   instead.
//! - **rebuild**: `POST /admin/projections/projects/rebuild` on the leader
//!   while the clients write and read (and the refusals: no or a wrong
//!   token, the standby, an unknown projection); `GET /admin/projections`
//!   until it is done, with its progress reported.
//!
//! What every scenario asserts:
//! - no write fails, and no read through the api fails;
//! - a read carrying a write's position answers `caught-up` with the row at
//!   least at the written version, except while no projector leads (from
//!   the kill or stop until a write made after it reads back caught up),
//!   when it may answer `stale`; it then retries until caught up;
//! - versions read through the api for an id never decrease, neither in a
//!   client's reads of its own rows nor in a reader walking the whole list;
//! - at the end the api's `/projects` and `/tasks` equal, page by page, row
//!   by row (id, version, row), the lists of a separate `projects serve`
//!   that replayed the whole log into a brand-new view location, and every
//!   row is at the last version a write of it was acknowledged with.
//!
//! Figures for operators are printed (`--nocapture`): projection lag under
//! the write load (from a write's acknowledgement until a read carrying its
//! position, sent right after the ack, answers caught-up; p50 and p99), and
//! the failover times (until the successor's `kes_projection_leader` gauge
//! says it leads, and until a write made after the failure reads back
//! caught up).
//!
//! The scenarios run one at a time (they load the machine, and the figures
//! would mean nothing otherwise).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_projects");

/// The views' lease time of every process: short, so that failover is quick.
const LEASE_TTL_MS: u64 = 2_000;
/// How many clients write at once.
const CLIENTS: usize = 16;
/// The least time the clients write for.
const LOAD_FOR: Duration = Duration::from_secs(10);
/// A client reads back every n-th of its writes with the write's position.
const READ_EVERY: u64 = 2;
/// How long a process may take to answer `/health`.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// How long a read carrying a position may keep answering `stale`, even
/// while nobody leads, before the test gives up.
const CATCH_UP_WITHIN: Duration = Duration::from_secs(30);
/// How long a takeover or a rebuild may take before the test gives up.
const TAKEOVER_WITHIN: Duration = Duration::from_secs(30);
/// Writes acknowledged before the rebuild starts.
const REBUILD_AFTER: usize = 1_500;
/// Rows per page when lists are compared.
const PAGE: usize = 100;

/// The scenarios load the machine; they run one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(30)).build().expect("an HTTP client")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

/// The last lines of a process's log, for a failure message.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    // Without the frames of a backtrace, which would hide the error above it.
    let frame = |l: &&str| {
        let t = l.trim_start();
        t.starts_with("at ") || t.split_once(": ").is_some_and(|(n, _)| n.chars().all(|c| c.is_ascii_digit()))
    };
    let lines: Vec<&str> = text.lines().filter(|l| !frame(l)).collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// One `projects serve` process, with its output in a log file; killed when
/// dropped (and its log's tail printed when the test fails).
struct Proc {
    name: String,
    child: Child,
    base: String,
    log: PathBuf,
}

impl Proc {
    /// Starts `projects serve` as `role` and waits until `/health` answers.
    async fn start(name: &str, dir: &Path, role: &str, store: &str, view: &str, env: &[(&str, String)]) -> Self {
        let port = free_port();
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).expect("a log dir");
        let log = logs.join(format!("{name}.log"));
        let out = File::create(&log).expect("a log file");
        let err = out.try_clone().expect("a log file");
        let mut command = Command::new(BIN);
        command
            .arg("serve")
            .current_dir(dir)
            .env("KES_ROLE", role)
            .env("KES_LISTEN", format!("127.0.0.1:{port}"))
            .env("KES_STORE", store)
            .env("KES_VIEW", view)
            .env("KES_LEASE_TTL_MS", LEASE_TTL_MS.to_string())
            // Five processes share one PostgreSQL (max_connections 100 by
            // default): each keeps its pools small, as a deployment would.
            .env("KES_DB_CONNECTIONS", "3")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("start the projects binary");
        let mut proc = Self { name: name.to_owned(), child, base: format!("http://127.0.0.1:{port}"), log };
        let c = client();
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Ok(r) = c.get(proc.url("/health")).send().await
                && r.status() == StatusCode::OK
            {
                return proc;
            }
            if let Ok(Some(status)) = proc.child.try_wait() {
                panic!("{name} exited with {status} before it was ready:\n{}", tail(&proc.log));
            }
            assert!(Instant::now() < deadline, "{name} was not ready within {READY_WITHIN:?}:\n{}", tail(&proc.log));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `kill -SIG pid`.
    fn signal(&self, signal: &str) {
        let status =
            Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status().expect("run kill");
        assert!(status.success(), "kill -{signal} {} ({}) failed", self.child.id(), self.name);
    }

    /// SIGKILL, and reap it.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What its `kes_projection_leader{projection=…}` gauge says: whether
    /// it leads `projection`; `None` while `/metrics` does not answer or
    /// has no such gauge.
    async fn leads(&self, c: &Client, projection: &str) -> Option<bool> {
        let r = c.get(self.url("/metrics")).timeout(Duration::from_secs(2)).send().await.ok()?;
        let text = r.text().await.ok()?;
        let label = format!("projection=\"{projection}\"");
        text.lines()
            .filter(|l| l.starts_with("kes_projection_leader{") && l.contains(&label))
            .find_map(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
            .map(|v| v == 1.0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- last lines of {} ({}):\n{}", self.name, self.log.display(), tail(&self.log));
        }
    }
}

/// Waits until exactly one of `procs` leads `projection` (by its gauge)
/// and the others report standing by; the leader's index.
async fn leader_of(c: &Client, procs: &[&Proc], projection: &str) -> usize {
    let deadline = Instant::now() + TAKEOVER_WITHIN;
    loop {
        let mut states = Vec::with_capacity(procs.len());
        for p in procs {
            states.push(p.leads(c, projection).await);
        }
        let leaders: Vec<usize> = (0..procs.len()).filter(|i| states[*i] == Some(true)).collect();
        if leaders.len() == 1 && states.iter().all(Option::is_some) {
            return leaders[0];
        }
        assert!(
            Instant::now() < deadline,
            "no single leader of {projection} within {TAKEOVER_WITHIN:?}: {:?}",
            procs.iter().zip(&states).map(|(p, s)| (p.name.as_str(), *s)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An acknowledged write.
#[derive(Debug, Clone)]
struct Ack {
    plural: &'static str,
    id: String,
    version: u64,
    position: String,
}

/// A read through the api that answered `stale`: when it was sent and
/// when it answered.
#[derive(Debug, Clone, Copy)]
struct Span {
    from: Instant,
    to: Instant,
}

impl Span {
    fn overlaps(&self, other: &Span) -> bool {
        self.from < other.to && other.from < self.to
    }
}

/// What the clients, the list walker and the controller share.
struct Run {
    c: Client,
    /// The api's base URL: every write and read of the clients goes there.
    api: String,
    /// Set when the clients and the list walker are to stop.
    stop: AtomicBool,
    /// How many writes were acknowledged, for the controller to wait on.
    acks: tokio::sync::watch::Sender<usize>,
    /// Every acknowledged write, for the final comparison.
    acked: Mutex<Vec<Ack>>,
    /// Reads right after a write's ack that answered caught-up at once:
    /// ack → answer, and when.
    lags: Mutex<Vec<Span>>,
    /// Reads that answered `stale`.
    stale: Mutex<Vec<Span>>,
    /// While no projector leads: from the kill or stop until a write made
    /// after it reads back caught-up.
    windows: Mutex<Vec<Span>>,
    /// The rebuild's span, for the lag figures.
    rebuilds: Mutex<Vec<Span>>,
    /// Reads that answered caught-up only after retries: ack → caught-up.
    late: Mutex<Vec<Span>>,
    /// What went wrong in a client or the walker (they keep no panics).
    violations: Mutex<Vec<String>>,
    /// Whole walks of both lists by the walker.
    walks: AtomicU64,
}

impl Run {
    fn new(c: Client, api: &str) -> Arc<Self> {
        Arc::new(Self {
            c,
            api: api.to_owned(),
            stop: AtomicBool::new(false),
            acks: tokio::sync::watch::channel(0).0,
            acked: Mutex::default(),
            lags: Mutex::default(),
            stale: Mutex::default(),
            windows: Mutex::default(),
            rebuilds: Mutex::default(),
            late: Mutex::default(),
            violations: Mutex::default(),
            walks: AtomicU64::new(0),
        })
    }

    fn violation(&self, what: String) {
        let mut v = lock(&self.violations);
        if v.len() < 1_000 {
            v.push(what);
        }
    }

    fn acked_count(&self) -> usize {
        *self.acks.borrow()
    }

    /// Waits until `n` writes were acknowledged in all.
    async fn wait_acks(&self, n: usize) {
        let mut rx = self.acks.subscribe();
        // Only whether the count was reached is kept: the guard `wait_for`
        // returns holds the channel's lock.
        let reached =
            matches!(tokio::time::timeout(Duration::from_secs(120), rx.wait_for(|a| *a >= n)).await, Ok(Ok(_)));
        assert!(
            reached,
            "only {} of {n} writes acknowledged within 120 s; violations: {:?}",
            self.acked_count(),
            lock(&self.violations).iter().take(5).collect::<Vec<_>>()
        );
    }

    /// A write through the api: 201 for a POST, 200 otherwise.
    async fn write(&self, plural: &'static str, method: Method, path: &str, body: Value) -> Result<Ack, String> {
        let r = self
            .c
            .request(method.clone(), format!("{}{path}", self.api))
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("{method} {path} failed: {e}"))?;
        let status = r.status();
        let expected = if method == Method::POST { StatusCode::CREATED } else { StatusCode::OK };
        if status != expected {
            let text = r.text().await.unwrap_or_default();
            return Err(format!("{method} {path} answered {status}: {text}"));
        }
        let header = |name: &str| r.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let id = (if method == Method::POST { header("location") } else { Some(path.to_owned()) })
            .and_then(|l| l.rsplit('/').next().map(str::to_owned))
            .ok_or_else(|| format!("{method} {path}: no Location"))?;
        let version = header("etag")
            .and_then(|e| e.trim_start_matches("W/").trim_matches('"').parse::<u64>().ok())
            .ok_or_else(|| format!("{method} {path}: no version in the ETag"))?;
        let position = header("kes-position").ok_or_else(|| format!("{method} {path}: no KES-Position"))?;
        let ack = Ack { plural, id, version, position };
        lock(&self.acked).push(ack.clone());
        self.acks.send_modify(|n| *n += 1);
        Ok(ack)
    }

    /// One list read of `ack`'s row carrying its position: the consistency
    /// it answered and the row's version (`None`: no row).
    async fn read_row(&self, ack: &Ack) -> Result<(String, Option<u64>), String> {
        let url = format!("{}/{}?filter[id]={}", self.api, ack.plural, ack.id);
        let r = self
            .c
            .get(&url)
            .header("KES-Position", &ack.position)
            .send()
            .await
            .map_err(|e| format!("GET {url} failed: {e}"))?;
        if r.status() != StatusCode::OK {
            let status = r.status();
            return Err(format!("GET {url} answered {status}: {}", r.text().await.unwrap_or_default()));
        }
        let consistency = r.headers().get("kes-consistency").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let body: Value = r.json().await.map_err(|e| format!("GET {url}: {e}"))?;
        Ok((consistency, body["items"][0]["version"].as_u64()))
    }

    /// Reads `ack`'s row with its position until the answer is caught up
    /// (stale answers are recorded, to be judged against the windows
    /// without a leader); checks the row's version against the write and
    /// against what this client read of it before (`seen`). The time from
    /// `acked` to the caught-up answer, and whether it took retries.
    async fn read_back(
        &self,
        ack: &Ack,
        acked: Instant,
        seen: &mut HashMap<String, u64>,
        within: Duration,
    ) -> Result<(Duration, bool), String> {
        let mut retried = false;
        loop {
            let sent = Instant::now();
            let (consistency, version) = self.read_row(ack).await?;
            let answered = Instant::now();
            if let Some(v) = version {
                let before = seen.entry(format!("{}/{}", ack.plural, ack.id)).or_insert(0);
                if v < *before {
                    return Err(format!("/{}/{} moved back from version {before} to {v}", ack.plural, ack.id));
                }
                *before = v;
            }
            match consistency.as_str() {
                "caught-up" => {
                    if version.is_none_or(|v| v < ack.version) {
                        return Err(format!(
                            "a read of /{}/{} carrying {} answered caught-up with version {version:?}, \
                             below the written {}",
                            ack.plural, ack.id, ack.position, ack.version
                        ));
                    }
                    let span = Span { from: acked, to: answered };
                    if retried {
                        lock(&self.late).push(span);
                    } else {
                        lock(&self.lags).push(span);
                    }
                    return Ok((answered - acked, retried));
                }
                "stale" => {
                    lock(&self.stale).push(Span { from: sent, to: answered });
                    if acked.elapsed() > within {
                        return Err(format!(
                            "/{}/{} did not catch up with {} within {within:?}",
                            ack.plural, ack.id, ack.position
                        ));
                    }
                    retried = true;
                }
                other => return Err(format!("a read carrying a position answered KES-Consistency {other:?}")),
            }
        }
    }
}

/// One client: creates a project, PATCHes it three times, creates a task
/// of it and PATCHes that, and again, until told to stop; reads every
/// [`READ_EVERY`]-th write back with its position.
async fn client_loop(run: Arc<Run>, client: usize) {
    let mut seen = HashMap::new();
    let mut writes = 0u64;
    let mut round = 0u64;
    let (mut project, mut task) = (String::new(), String::new());
    while !run.stop.load(Ordering::SeqCst) {
        let step = writes % 6;
        if step == 0 {
            round += 1;
        }
        let name = format!("c{client:02} p{round}");
        let (plural, method, path, body) = match step {
            0 => {
                let body = json!({ "name": name, "budget": round, "owner": format!("owner{}", client % 4) });
                ("projects", Method::POST, "/projects".to_owned(), body)
            }
            1..=3 => {
                let body = json!({ "budget": round * 10 + step, "name": format!("{name} v{step}") });
                ("projects", Method::PATCH, format!("/projects/{project}"), body)
            }
            4 => (
                "tasks",
                Method::POST,
                "/tasks".to_owned(),
                json!({ "project_id": project, "title": format!("{name} t") }),
            ),
            _ => ("tasks", Method::PATCH, format!("/tasks/{task}"), json!({ "title": format!("{name} t done") })),
        };
        let ack = match run.write(plural, method, &path, body).await {
            Ok(ack) => ack,
            Err(e) => {
                run.violation(format!("client {client}: {e}"));
                return;
            }
        };
        let acked = Instant::now();
        match step {
            0 => project = ack.id.clone(),
            4 => task = ack.id.clone(),
            _ => {}
        }
        writes += 1;
        if writes.is_multiple_of(READ_EVERY)
            && let Err(e) = run.read_back(&ack, acked, &mut seen, CATCH_UP_WITHIN).await
        {
            run.violation(format!("client {client}: {e}"));
            return;
        }
    }
}

/// Every page of `/{plural}` (sorted by id), from `base`.
async fn list_all(c: &Client, base: &str, plural: &str) -> Result<Vec<Value>, String> {
    let mut items = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut url = format!("{base}/{plural}?page[size]={PAGE}");
        if let Some(cursor) = &after {
            url.push_str(&format!("&page[after]={cursor}"));
        }
        let r = c.get(&url).send().await.map_err(|e| format!("GET {url} failed: {e}"))?;
        if r.status() != StatusCode::OK {
            let status = r.status();
            return Err(format!("GET {url} answered {status}: {}", r.text().await.unwrap_or_default()));
        }
        let body: Value = r.json().await.map_err(|e| format!("GET {url}: {e}"))?;
        items.extend(body["items"].as_array().cloned().unwrap_or_default());
        match body["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return Ok(items),
        }
    }
}

/// Walks both lists over and over while the clients write: a row's
/// version never decreases from one walk to the next (a stale projector
/// that wrote an old row, or a swap to a copy behind the live one, would).
async fn walk_lists(run: Arc<Run>) {
    let mut seen: HashMap<String, u64> = HashMap::new();
    while !run.stop.load(Ordering::SeqCst) {
        for plural in ["projects", "tasks"] {
            match list_all(&run.c, &run.api, plural).await {
                Ok(items) => {
                    for item in items {
                        let (Some(id), Some(version)) = (item["id"].as_str(), item["version"].as_u64()) else {
                            run.violation(format!("a /{plural} item without id or version: {item}"));
                            return;
                        };
                        let before = seen.entry(format!("{plural}/{id}")).or_insert(0);
                        if version < *before {
                            run.violation(format!("/{plural}/{id} moved back from version {before} to {version}"));
                        }
                        *before = (*before).max(version);
                    }
                }
                Err(e) => {
                    run.violation(format!("list walker: {e}"));
                    return;
                }
            }
        }
        run.walks.fetch_add(1, Ordering::SeqCst);
    }
}

/// A project and a task written only by the failover probes, so that a
/// probe's write is always made after the event it measures from.
struct Probe {
    project: String,
    task: String,
    n: AtomicU64,
}

impl Probe {
    async fn create(run: &Run) -> Self {
        let project = run.write("projects", Method::POST, "/projects", json!({ "name": "probe" })).await;
        let project = project.expect("create the probe project").id;
        let task = run.write("tasks", Method::POST, "/tasks", json!({ "project_id": project, "title": "probe" })).await;
        Self { task: task.expect("create the probe task").id, project, n: AtomicU64::new(0) }
    }

    /// A PATCH of the probe project and of the probe task (so that every
    /// view is covered), acknowledged.
    async fn write(&self, run: &Run) -> [Ack; 2] {
        let n = self.n.fetch_add(1, Ordering::SeqCst) + 1;
        let (project_path, task_path) = (format!("/projects/{}", self.project), format!("/tasks/{}", self.task));
        let project = run.write("projects", Method::PATCH, &project_path, json!({ "budget": n }));
        let task = run.write("tasks", Method::PATCH, &task_path, json!({ "title": format!("probe {n}") }));
        let (project, task) = tokio::join!(project, task);
        [project.expect("a probe write"), task.expect("a probe write")]
    }

    /// From `since` (a kill or stop of the leader): how long until one of
    /// `successors` says by its gauge that it leads `projects` (and which),
    /// and how long until writes made after `since` read back caught up
    /// through the api. `Err` when that did not happen within `within`
    /// of `since`.
    async fn takeover(
        &self,
        run: &Run,
        since: Instant,
        successors: &[&Proc],
        within: Duration,
    ) -> Result<(usize, Duration, Duration), String> {
        // Written before the deadline runs: a write is never cut off
        // after the api may have taken it.
        let acks = self.write(run).await;
        let leads = async {
            loop {
                for (i, p) in successors.iter().enumerate() {
                    if p.leads(&run.c, "projects").await == Some(true) {
                        return (i, since.elapsed());
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let readable = async {
            let mut seen = HashMap::new();
            for ack in &acks {
                run.read_back(ack, Instant::now(), &mut seen, Duration::MAX).await?;
            }
            Ok::<_, String>(since.elapsed())
        };
        let left = within.saturating_sub(since.elapsed());
        match tokio::time::timeout(left, async { tokio::join!(leads, readable) }).await {
            Ok(((who, leads), Ok(readable))) => Ok((who, leads, readable)),
            Ok((_, Err(e))) => Err(e),
            Err(_) => Err(format!("no takeover within {within:?}")),
        }
    }
}

/// Whether a connection other than ours holds the write lock of the SQLite
/// database `url` names (relative to `dir`).
async fn sqlite_write_locked(dir: &Path, url: &str) -> bool {
    use sqlx::Connection;
    let path = dir.join(url.trim_start_matches("sqlite://"));
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&path).busy_timeout(Duration::ZERO);
    let Ok(mut conn) = sqlx::SqliteConnection::connect_with(&options).await else { return false };
    let locked = match sqlx::query("BEGIN IMMEDIATE").execute(&mut conn).await {
        Ok(_) => {
            let _ = sqlx::query("ROLLBACK").execute(&mut conn).await;
            false
        }
        Err(e) => e.to_string().contains("locked"),
    };
    let _ = conn.close().await;
    locked
}

/// The clients and the list walker, started.
fn start_load(run: &Arc<Run>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks: Vec<_> = (0..CLIENTS).map(|i| tokio::spawn(client_loop(Arc::clone(run), i))).collect();
    tasks.push(tokio::spawn(walk_lists(Arc::clone(run))));
    tasks
}

async fn stop_load(run: &Run, tasks: Vec<tokio::task::JoinHandle<()>>) {
    run.stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.expect("a client task panicked");
    }
}

/// For each list and log partition, the position of the last write (a
/// token reads `LOG@PARTITION:OFFSET`, or `PARTITION:OFFSET`): a read
/// carrying all of them has seen every write.
fn last_positions(acked: &[Ack]) -> Vec<(&'static str, String)> {
    let mut last: BTreeMap<(&'static str, String, u32), u64> = BTreeMap::new();
    for a in acked {
        let (log, position) = match a.position.rsplit_once('@') {
            Some((log, position)) => (format!("{log}@"), position),
            None => (String::new(), a.position.as_str()),
        };
        let (partition, offset) = position.split_once(':').expect("PARTITION:OFFSET");
        let key = (a.plural, log, partition.parse().expect("a partition"));
        let offset: u64 = offset.parse().expect("an offset");
        let entry = last.entry(key).or_insert(offset);
        *entry = (*entry).max(offset);
    }
    last.into_iter().map(|((plural, log, p), o)| (plural, format!("{log}{p}:{o}"))).collect()
}

/// Waits until reads from `base` carrying every one of `positions` answer
/// caught-up; how long it took.
async fn wait_caught_up(c: &Client, base: &str, positions: &[(&'static str, String)], within: Duration) -> Duration {
    let started = Instant::now();
    for (plural, position) in positions {
        loop {
            let r = c.get(format!("{base}/{plural}?page[size]=1")).header("KES-Position", position).send().await;
            let r = r.expect("a read carrying a position");
            assert_eq!(r.status(), StatusCode::OK, "/{plural} from {base}");
            if r.headers().get("kes-consistency").is_some_and(|v| v == "caught-up") {
                break;
            }
            assert!(started.elapsed() < within, "{base} did not catch up with /{plural} {position} within {within:?}");
        }
    }
    started.elapsed()
}

/// The end of every scenario: the api's lists equal those of a process
/// that replayed the whole log into `replay_view`, page by page, and every
/// row is at the last version a write of it was acknowledged with.
async fn compare_with_replay(run: &Run, dir: &Path, store: &str, replay_view: &str) {
    let acked = lock(&run.acked).clone();
    let positions = last_positions(&acked);
    let api_wait = wait_caught_up(&run.c, &run.api, &positions, CATCH_UP_WITHIN).await;
    let started = Instant::now();
    let replay = Proc::start("replay", dir, "all", store, replay_view, &[]).await;
    let replay_wait = wait_caught_up(&run.c, &replay.base, &positions, Duration::from_secs(180)).await;
    eprintln!(
        "  final: api caught up in {:.0} ms after the load; a fresh replay of {} writes caught up {:.1} s after its start",
        ms(api_wait),
        acked.len(),
        started.elapsed().as_secs_f64().max(replay_wait.as_secs_f64())
    );
    let mut last: HashMap<(&str, &str), u64> = HashMap::new();
    for a in &acked {
        let v = last.entry((a.plural, a.id.as_str())).or_insert(0);
        *v = (*v).max(a.version);
    }
    for plural in ["projects", "tasks"] {
        let mut after: Option<String> = None;
        let mut rows = 0usize;
        let mut page = 0usize;
        loop {
            let mut query = format!("/{plural}?page[size]={PAGE}");
            if let Some(cursor) = &after {
                query.push_str(&format!("&page[after]={cursor}"));
            }
            let mut bodies = Vec::new();
            for base in [&run.api, &replay.base] {
                let r = run.c.get(format!("{base}{query}")).send().await.expect("a list page");
                assert_eq!(r.status(), StatusCode::OK, "{base}{query}");
                bodies.push(r.json::<Value>().await.expect("a JSON page"));
            }
            let (ours, replayed) = (&bodies[0], &bodies[1]);
            let (a, b) = (ours["items"].as_array().expect("items"), replayed["items"].as_array().expect("items"));
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_eq!(
                    x, y,
                    "/{plural} page {page} row {i}: the api's view differs from a fresh replay of the log"
                );
            }
            assert_eq!(a.len(), b.len(), "/{plural} page {page}: the api has {} rows, the replay {}", a.len(), b.len());
            assert_eq!(ours["total"], replayed["total"], "/{plural}: totals differ");
            for item in a {
                let id = item["id"].as_str().expect("an id");
                let version = item["version"].as_u64().expect("a version");
                assert_eq!(
                    last.get(&(plural, id)).copied(),
                    Some(version),
                    "/{plural}/{id} is at version {version}, not at its last acknowledged write"
                );
            }
            rows += a.len();
            page += 1;
            assert_eq!(ours["next"], replayed["next"], "/{plural} page {page}: cursors differ");
            match ours["next"].as_str() {
                Some(next) => after = Some(next.to_owned()),
                None => break,
            }
        }
        let written = last.keys().filter(|(p, _)| *p == plural).count();
        assert_eq!(rows, written, "/{plural} has {rows} rows; {written} were written");
        eprintln!("  final: /{plural}: {rows} rows in {page} pages equal a fresh replay of the log, row by row");
    }
    drop(replay);
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Prints the lag figures of reads that answered caught-up at once,
/// split by whether they overlapped `during`.
fn print_lags(run: &Run, label: &str, during_name: &str, during: &[Span]) {
    let lags = lock(&run.lags).clone();
    let (mut inside, mut outside): (Vec<Duration>, Vec<Duration>) = (Vec::new(), Vec::new());
    for s in &lags {
        let d = s.to - s.from;
        if during.iter().any(|w| w.overlaps(s)) { inside.push(d) } else { outside.push(d) }
    }
    for (what, mut v) in [("steady", outside), (during_name, inside)] {
        if v.is_empty() {
            continue;
        }
        v.sort_unstable();
        eprintln!(
            "  {label}: lag ack → caught-up read ({what}): n={}, p50={:.1} ms, p99={:.1} ms, max={:.1} ms",
            v.len(),
            ms(percentile(&v, 0.50)),
            ms(percentile(&v, 0.99)),
            ms(v[v.len() - 1]),
        );
    }
}

/// The judgment every scenario ends with: no violation, and no `stale`
/// answer outside a window without a leader.
fn assert_clean(run: &Run) {
    let violations = lock(&run.violations).clone();
    assert!(
        violations.is_empty(),
        "{} violations, the first: {:#?}",
        violations.len(),
        &violations[..violations.len().min(10)]
    );
    let windows = lock(&run.windows).clone();
    let stale = lock(&run.stale).clone();
    let unexcused: Vec<&Span> = stale.iter().filter(|s| !windows.iter().any(|w| w.overlaps(s))).collect();
    let start = lock(&run.lags).first().map(|s| s.from);
    assert!(
        unexcused.is_empty(),
        "{} of {} stale answers came while a projector led (first at {:?} into the run)",
        unexcused.len(),
        stale.len(),
        start.map(|t| unexcused[0].from.saturating_duration_since(t))
    );
}

fn admin_env(dir: &Path) -> (String, Vec<(&'static str, String)>) {
    let token = uuid::Uuid::new_v4().simple().to_string();
    let file = dir.join("admin-token");
    std::fs::write(&file, format!("{token}\n")).expect("write the admin token");
    (token, vec![("KES_ADMIN_TOKEN_FILE", file.display().to_string())])
}

/// The failover scenario on one store: kill the leader, stall the next
/// one past its lease and resume it, all under load.
async fn failover_under_load(label: &str, store: &str, view: &str, replay_view: &str) {
    let dir = tempfile::tempdir().expect("a work dir");
    let dir = dir.path();
    let (_, admin) = admin_env(dir);
    let mut projectors = vec![
        Proc::start("projector-1", dir, "projector", store, view, &admin).await,
        Proc::start("projector-2", dir, "projector", store, view, &admin).await,
    ];
    let api = Proc::start("api", dir, "api", store, view, &[]).await;
    let run = Run::new(client(), &api.base);
    let probe = Probe::create(&run).await;
    let leader = leader_of(&run.c, &[&projectors[0], &projectors[1]], "projects").await;
    let standby = 1 - leader;

    let started = Instant::now();
    let load = start_load(&run);
    run.wait_acks(150).await;

    // SIGKILL the leader.
    let killed_at = Instant::now();
    projectors[leader].kill();
    let (_, kill_leads, kill_readable) = probe
        .takeover(&run, killed_at, &[&projectors[standby]], TAKEOVER_WITHIN)
        .await
        .unwrap_or_else(|e| panic!("after SIGKILL of the leader: {e}"));
    lock(&run.windows).push(Span { from: killed_at, to: Instant::now() });
    eprintln!(
        "  {label}: SIGKILL of the leader after {} writes; the standby leads after {:.0} ms; \
         a write made after the kill reads back caught-up after {:.0} ms (lease {LEASE_TTL_MS} ms)",
        run.acked_count(),
        ms(kill_leads),
        ms(kill_readable)
    );

    // A new standby, then a stall of the leader past its lease.
    projectors.push(Proc::start("projector-3", dir, "projector", store, view, &admin).await);
    let (leader, standby) = (standby, 2);
    let now = leader_of(&run.c, &[&projectors[leader], &projectors[standby]], "projects").await;
    assert_eq!(now, 0, "the survivor of the kill leads, the new process stands by");
    run.wait_acks(run.acked_count() + 150).await;
    let stopped_at = Instant::now();
    projectors[leader].signal("STOP");
    // A SQLite writer stopped inside its transaction keeps the write lock
    // of the file: nobody can take its lease over until it resumes. The
    // test tells that case (found by the lock) from a failed takeover.
    let sqlite_views = view.starts_with("sqlite:");
    let within = if sqlite_views { Duration::from_millis(4 * LEASE_TTL_MS) } else { TAKEOVER_WITHIN };
    let stalled = match probe.takeover(&run, stopped_at, &[&projectors[standby]], within).await {
        Ok((_, leads, readable)) => Ok((leads, readable)),
        Err(e) if sqlite_views && sqlite_write_locked(dir, view).await => Err(e),
        Err(e) => panic!("after SIGSTOP of the leader: {e}"),
    };
    if stalled.is_ok() {
        lock(&run.windows).push(Span { from: stopped_at, to: Instant::now() });
    }
    let resumed_at = Instant::now();
    projectors[leader].signal("CONT");
    let held_the_lock = match stalled {
        Ok((stall_leads, stall_readable)) => {
            // The resumed one finds its lease taken and stands by.
            let stands_by = loop {
                if projectors[leader].leads(&run.c, "projects").await == Some(false) {
                    break resumed_at.elapsed();
                }
                assert!(resumed_at.elapsed() < TAKEOVER_WITHIN, "the resumed projector never stood by");
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            assert_eq!(projectors[standby].leads(&run.c, "projects").await, Some(true), "the successor still leads");
            eprintln!(
                "  {label}: SIGSTOP of the leader; the standby leads after {:.0} ms; a write made after the stop \
                 reads back caught-up after {:.0} ms; after SIGCONT the stalled one stands by within {:.0} ms",
                ms(stall_leads),
                ms(stall_readable),
                ms(stands_by)
            );
            false
        }
        Err(e) => {
            let successors = [&projectors[leader], &projectors[standby]];
            let (who, leads, readable) = probe
                .takeover(&run, resumed_at, &successors, TAKEOVER_WITHIN)
                .await
                .unwrap_or_else(|e| panic!("after SIGCONT of the stalled leader: {e}"));
            lock(&run.windows).push(Span { from: stopped_at, to: Instant::now() });
            eprintln!(
                "  {label}: NOTE: SIGSTOP hit the leader inside its view transaction: it held the SQLite write \
                 lock of the views, and no projector could take over while it was stopped ({e}, {:.0} ms); \
                 after SIGCONT {} leads after {:.0} ms and a write reads back caught-up after {:.0} ms",
                ms(resumed_at - stopped_at),
                successors[who].name,
                ms(leads),
                ms(readable)
            );
            true
        }
    };

    // Writes go on past the resumed projector.
    run.wait_acks(run.acked_count() + 300).await;
    tokio::time::sleep_until((started + LOAD_FOR).into()).await;
    stop_load(&run, load).await;
    let elapsed = started.elapsed();
    if !held_the_lock {
        assert_eq!(
            projectors[leader].leads(&run.c, "projects").await,
            Some(false),
            "the resumed projector stands by to the end"
        );
    }

    let fenced = std::fs::read_to_string(&projectors[leader].log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("lost the lease"))
        .count();
    eprintln!("  {label}: the resumed projector logged \"lost the lease\" {fenced} times");
    let writes = run.acked_count();
    let stale = lock(&run.stale).len();
    let late = lock(&run.late).len();
    eprintln!(
        "  {label}: {writes} writes by {CLIENTS} clients in {:.1} s ({:.0}/s); {} list walks; \
         {stale} stale answers and {late} reads caught up only after retrying, all while no projector led",
        elapsed.as_secs_f64(),
        writes as f64 / elapsed.as_secs_f64(),
        run.walks.load(Ordering::SeqCst)
    );
    let windows = lock(&run.windows).clone();
    print_lags(&run, label, "overlapping a failover", &windows);
    assert_clean(&run);
    compare_with_replay(&run, dir, store, replay_view).await;
    drop(api);
    drop(projectors);
}

/// The rebuild scenario on one store: a rebuild of `projects` on its
/// leader while the clients write and read.
async fn rebuild_under_load(label: &str, store: &str, view: &str, replay_view: &str) {
    let dir = tempfile::tempdir().expect("a work dir");
    let dir = dir.path();
    let (token, admin) = admin_env(dir);
    let projectors = [
        Proc::start("projector-1", dir, "projector", store, view, &admin).await,
        Proc::start("projector-2", dir, "projector", store, view, &admin).await,
    ];
    let api = Proc::start("api", dir, "api", store, view, &[]).await;
    let run = Run::new(client(), &api.base);
    let leader = leader_of(&run.c, &[&projectors[0], &projectors[1]], "projects").await;
    let (leader, standby) = (&projectors[leader], &projectors[1 - leader]);
    let bearer = format!("Bearer {token}");

    let started = Instant::now();
    let load = start_load(&run);
    // A log of some size first, so that the rebuild takes a while.
    run.wait_acks(REBUILD_AFTER).await;

    // What is refused.
    let rebuild = leader.url("/admin/projections/projects/rebuild");
    let r = run.c.post(&rebuild).send().await.expect("rebuild without a token");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "no token");
    let r = run.c.post(&rebuild).header("Authorization", "Bearer 0123456789abcdef0123").send().await;
    assert_eq!(r.expect("rebuild").status(), StatusCode::UNAUTHORIZED, "a wrong token");
    let r = run.c.get(leader.url("/admin/projections")).send().await.expect("status without a token");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "no token");
    let r = run.c.post(leader.url("/admin/projections/nothing/rebuild")).header("Authorization", &bearer).send().await;
    assert_eq!(r.expect("rebuild").status(), StatusCode::NOT_FOUND, "an unknown projection");
    let r =
        run.c.post(standby.url("/admin/projections/projects/rebuild")).header("Authorization", &bearer).send().await;
    assert_eq!(r.expect("rebuild").status(), StatusCode::CONFLICT, "the standby does not lead projects");

    // The rebuild, on the leader.
    let from = Instant::now();
    let written_before = run.acked_count();
    let projects_before = lock(&run.acked).iter().filter(|a| a.plural == "projects").count() as u64;
    let r = run.c.post(&rebuild).header("Authorization", &bearer).send().await.expect("rebuild");
    let status = r.status();
    assert_eq!(status, StatusCode::ACCEPTED, "{}", r.text().await.unwrap_or_default());
    let (report, polls) = {
        let mut polls = 0;
        loop {
            polls += 1;
            let r = run.c.get(leader.url("/admin/projections")).header("Authorization", &bearer).send().await;
            let r = r.expect("the admin status");
            assert_eq!(r.status(), StatusCode::OK);
            let body: Value = r.json().await.expect("a JSON status");
            let projects = body["projections"]
                .as_array()
                .and_then(|all| all.iter().find(|p| p["name"] == "projects"))
                .cloned()
                .unwrap_or_else(|| panic!("no projects projection in {body}"));
            assert_eq!(projects["leads"], true, "the leader still leads during its rebuild: {projects}");
            match projects["rebuild"]["state"].as_str() {
                Some("done") => break (projects["rebuild"].clone(), polls),
                Some("failed") => panic!("the rebuild failed: {}", projects["rebuild"]),
                Some("running") => {}
                other => panic!("rebuild state {other:?} in {projects}"),
            }
            assert!(from.elapsed() < Duration::from_secs(120), "the rebuild did not finish within 120 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let took = from.elapsed();
    lock(&run.rebuilds).push(Span { from, to: Instant::now() });
    let written_during = run.acked_count() - written_before;
    eprintln!(
        "  {label}: rebuild of projects under load: done after {:.0} ms ({polls} polls; reported {} ms, \
         {} events, {}/{} records); {written_during} writes acknowledged meanwhile",
        ms(took),
        report["elapsed_ms"],
        report["events"],
        report["done"],
        report["total"]
    );
    run.wait_acks(run.acked_count() + 300).await;
    tokio::time::sleep_until((started + LOAD_FOR).into()).await;
    stop_load(&run, load).await;
    let elapsed = started.elapsed();
    let writes = run.acked_count();
    eprintln!(
        "  {label}: {writes} writes by {CLIENTS} clients in {:.1} s ({:.0}/s); {} list walks; {} stale answers",
        elapsed.as_secs_f64(),
        writes as f64 / elapsed.as_secs_f64(),
        run.walks.load(Ordering::SeqCst),
        lock(&run.stale).len()
    );
    let rebuilds = lock(&run.rebuilds).clone();
    print_lags(&run, label, "during the rebuild", &rebuilds);
    // No window without a leader here: every stale answer is a fault.
    assert_clean(&run);
    compare_with_replay(&run, dir, store, replay_view).await;
    // What an operator follows the rebuild by.
    let (done, total, events) =
        (report["done"].as_u64(), report["total"].as_u64(), report["events"].as_u64().unwrap_or(0));
    assert!(
        total.is_some_and(|t| t >= projects_before) && done == total,
        "the rebuild reports {done:?} of {total:?} records done; the log held at least {projects_before}"
    );
    assert!(events >= projects_before, "the rebuild reports {events} events; the log held at least {projects_before}");

    drop(api);
}

async fn fresh_database() -> Option<String> {
    kes_test_support::fresh_postgres_database("split").await
}

#[cfg(feature = "kafka")]
fn kafka_store(brokers: &str) -> String {
    let prefix = format!("split{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    format!("kafka://{brokers}?prefix={prefix}")
}

const SQLITE_STORE: &str = "sqlite://data/events.db";
const SQLITE_VIEWS: &str = "sqlite://data/views.db";
const SQLITE_REPLAY: &str = "sqlite://data/replay.db";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_under_load_on_sqlite() {
    let _one = ONE_AT_A_TIME.lock().await;
    failover_under_load("sqlite", SQLITE_STORE, SQLITE_VIEWS, SQLITE_REPLAY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_under_load_on_postgres() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (Some(db), Some(replay)) = (fresh_database().await, fresh_database().await) else { return };
    failover_under_load("postgres", &db, &db, &replay).await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_under_load_on_kafka() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(brokers) = kes_test_support::kafka_brokers() else { return };
    let (Some(views), Some(replay)) = (fresh_database().await, fresh_database().await) else { return };
    failover_under_load("kafka", &kafka_store(&brokers), &views, &replay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_under_load_on_sqlite() {
    let _one = ONE_AT_A_TIME.lock().await;
    rebuild_under_load("sqlite", SQLITE_STORE, SQLITE_VIEWS, SQLITE_REPLAY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_under_load_on_postgres() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (Some(db), Some(replay)) = (fresh_database().await, fresh_database().await) else { return };
    rebuild_under_load("postgres", &db, &db, &replay).await;
}

/// The rebuild of a Tantivy index while the system takes writes: it runs in
/// the projector that holds the index's writer lock, the api reads the
/// index read-only and follows the swap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_under_load_on_search_views() {
    let _one = ONE_AT_A_TIME.lock().await;
    rebuild_under_load("search", SQLITE_STORE, "data/index", "data/replay-index").await;
}
