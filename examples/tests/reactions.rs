//! The `project_tasks` reaction of the `projects` service, end to end on
//! each store: archiving a project cancels its open tasks exactly once,
//! with the archive as their cause, across a kill -9 in the middle; a task
//! created outside a live project is cancelled; a refused command is
//! recorded and the reaction moves on; a store outage is retried.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

mod common;

use common::{Server, fresh_database, json_of, kafka_brokers};

const ADMIN_TOKEN: &str = "a-token-for-the-reaction-tests";

/// How long the tests wait for the reaction before they fail.
const PATIENCE: Duration = Duration::from_secs(60);

struct Setup {
    dir: tempfile::TempDir,
    store: String,
    view: String,
    token_file: String,
}

impl Setup {
    fn new(store: &str, view: &str) -> Self {
        let dir = tempfile::tempdir().expect("a work dir");
        let token = dir.path().join("admin.token");
        std::fs::write(&token, ADMIN_TOKEN).expect("token file");
        let token_file = token.to_str().expect("utf-8 path").to_owned();
        Self { dir, store: store.into(), view: view.into(), token_file }
    }

    async fn start(&self, role: &str) -> Server {
        // A short lease, so that a restarted process takes the killed one's
        // reaction over quickly.
        let env = [("KES_ADMIN_TOKEN_FILE", self.token_file.as_str()), ("KES_LEASE_TTL_MS", "2000")];
        Server::start_with(self.dir.path(), &self.store, &self.view, role, &env).await
    }
}

async fn post(c: &Client, s: &Server, path: &str, body: Value) -> Value {
    let r = c.post(s.url(path)).json(&body).send().await.expect("POST");
    let status = r.status();
    let body = json_of(r).await;
    assert!(status.is_success(), "POST {path} answered {status}: {body}");
    body
}

/// Creates at `plural`; the new id.
async fn create(c: &Client, s: &Server, plural: &str, body: Value) -> String {
    let r = c.post(s.url(plural)).json(&body).send().await.expect("POST");
    assert_eq!(r.status(), StatusCode::CREATED, "POST {plural}");
    let location = r.headers()["location"].to_str().expect("a location");
    location.rsplit('/').next().expect("an id").to_owned()
}

/// An active project; its id.
async fn project(c: &Client, s: &Server, name: &str) -> String {
    let id = create(c, s, "/projects", json!({ "name": name })).await;
    post(c, s, &format!("/projects/{id}/activate"), json!({})).await;
    id
}

async fn task(c: &Client, s: &Server, project: &str, title: &str) -> String {
    create(c, s, "/tasks", json!({ "project_id": project, "title": title })).await
}

async fn get(c: &Client, s: &Server, path: &str) -> Value {
    let r = c.get(s.url(path)).send().await.expect("GET");
    assert_eq!(r.status(), StatusCode::OK, "GET {path}");
    json_of(r).await
}

/// Every task of `project` with `status`, through the list.
async fn tasks_with(c: &Client, s: &Server, project: &str, status: &str) -> u64 {
    let page = get(c, s, &format!("/tasks?filter[project_id]={project}&filter[status]={status}&page[size]=1")).await;
    page["total"].as_u64().expect("a total")
}

/// Waits until `ids` are all cancelled, as read by id.
async fn all_cancelled(c: &Client, s: &Server, ids: &[String]) {
    let deadline = Instant::now() + PATIENCE;
    for id in ids {
        while get(c, s, &format!("/tasks/{id}")).await["status"] != "cancelled" {
            assert!(Instant::now() < deadline, "task {id} was not cancelled within {PATIENCE:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The whole history of `path` (`/tasks/ID`), once it shows `version`
/// events (on Kafka it comes from a history view that follows the log).
async fn history(c: &Client, s: &Server, path: &str, version: u64) -> Vec<Value> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let page = get(c, s, &format!("{path}/events")).await;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        if items.len() as u64 >= version {
            return items;
        }
        assert!(Instant::now() < deadline, "the history of {path} did not reach version {version}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks that each of `ids` was cancelled exactly once, by the reaction,
/// caused by `archive` (the archive event's id) or — when the reaction
/// reached the task's creation only after the archive — by its own
/// creation, which then found the project archived; answers when each was.
async fn cancelled_once_by(c: &Client, s: &Server, ids: &[String], archive: &str) -> Vec<DateTime<Utc>> {
    let mut when = Vec::new();
    for id in ids {
        let events = history(c, s, &format!("/tasks/{id}"), 2).await;
        let cancels: Vec<&Value> = events.iter().filter(|e| e["type"] == "TaskCancelled").collect();
        assert_eq!(cancels.len(), 1, "task {id}: {events:?}");
        assert_eq!(events.len(), 2, "task {id} has more than its creation and its cancellation: {events:?}");
        let cancel = cancels[0];
        assert_eq!(cancel["payload"]["Cancelled"]["reason"], "project archived");
        let cause = cancel["metadata"]["causation_id"].as_str().unwrap_or("");
        assert!(cause == archive || cause == events[0]["event_id"], "task {id}: caused by {cause}, not the archive");
        assert_eq!(cancel["metadata"]["principal"], "project_tasks");
        let at = cancel["recorded_at"].as_str().and_then(|t| t.parse().ok()).expect("recorded_at");
        when.push(at);
    }
    when
}

/// The id of the last event of project `id` (at `version`).
async fn last_event(c: &Client, s: &Server, id: &str, version: u64) -> String {
    let events = history(c, s, &format!("/projects/{id}"), version).await;
    events.last().and_then(|e| e["event_id"].as_str()).expect("an event id").to_owned()
}

async fn admin_reactions(c: &Client, s: &Server) -> Vec<Value> {
    let r = c.get(s.url("/admin/reactions")).bearer_auth(ADMIN_TOKEN).send().await.expect("admin");
    assert_eq!(r.status(), StatusCode::OK);
    json_of(r).await["reactions"].as_array().cloned().expect("reactions")
}

/// Waits until every reaction of `s` has handled everything in its log.
async fn reactions_idle(c: &Client, s: &Server) {
    let deadline = Instant::now() + PATIENCE;
    while admin_reactions(c, s).await.iter().any(|r| r["lag"] != 0 || r["leads"] != true) {
        assert!(Instant::now() < deadline, "the reactions did not catch up: {:?}", admin_reactions(c, s).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Projects with `per_project` open tasks each (and one done task each,
/// which the archive leaves alone); the tasks by project.
async fn projects_with_tasks(
    c: &Client,
    s: &Server,
    tag: &str,
    projects: usize,
    per_project: usize,
) -> Vec<(String, Vec<String>, String)> {
    let mut out = Vec::new();
    for p in 0..projects {
        let id = project(c, s, &format!("{tag}-{p}")).await;
        let mut tasks = Vec::new();
        for t in 0..per_project {
            tasks.push(task(c, s, &id, &format!("{tag}-{p}-{t}")).await);
        }
        let done = task(c, s, &id, &format!("{tag}-{p}-done")).await;
        post(c, s, &format!("/tasks/{done}/complete"), json!({})).await;
        out.push((id, tasks, done));
    }
    out
}

/// The tour: 50 open tasks cancelled by one archive, exactly once, with
/// the chain in their history; a restore resurrects none; a task created
/// in an archived or a missing project is cancelled moments later.
async fn archive_cancels_open_tasks_on(store: &str, view: &str) {
    let setup = Setup::new(store, view);
    let s = setup.start("all").await;
    let c = Client::new();
    let made = projects_with_tasks(&c, &s, "tour", 1, 50).await;
    let (archived, tasks, done) = &made[0];
    post(&c, &s, &format!("/projects/{archived}/archive"), json!({})).await;
    all_cancelled(&c, &s, tasks).await;
    let archive = last_event(&c, &s, archived, 3).await;
    cancelled_once_by(&c, &s, tasks, &archive).await;
    assert_eq!(get(&c, &s, &format!("/tasks/{done}")).await["status"], "done", "a done task stays done");

    // Restoring the project does not bring its tasks back.
    post(&c, &s, &format!("/projects/{archived}/restore"), json!({})).await;
    reactions_idle(&c, &s).await;
    assert_eq!(tasks_with(&c, &s, archived, "open").await, 0);
    assert_eq!(get(&c, &s, &format!("/tasks/{}", tasks[0])).await["status"], "cancelled");

    // A task for a project that does not exist, and one for an archived one.
    let other = project(&c, &s, "archived").await;
    post(&c, &s, &format!("/projects/{other}/archive"), json!({})).await;
    let started = Instant::now();
    let orphan = task(&c, &s, "no-such-project", "orphan").await;
    let late = task(&c, &s, &other, "late").await;
    all_cancelled(&c, &s, &[orphan.clone(), late.clone()]).await;
    eprintln!("tasks outside a live project cancelled {:?} after their creation", started.elapsed());
    assert_eq!(get(&c, &s, &format!("/tasks/{orphan}")).await["cancel_reason"], "project does not exist");
    assert_eq!(get(&c, &s, &format!("/tasks/{late}")).await["cancel_reason"], "project archived");
    reactions_idle(&c, &s).await;
    let statuses = admin_reactions(&c, &s).await;
    assert_eq!(statuses.len(), 2, "{statuses:?}");
    for r in &statuses {
        assert_eq!(r["refused_total"], 0, "nothing was refused: {r}");
        assert!(r["last_error"].is_null(), "{r}");
    }
    let metrics = c.get(s.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("kes_reaction_commands_total"), "{metrics}");
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_cancels_open_tasks_on_sqlite() {
    archive_cancels_open_tasks_on("sqlite://data/events.db", "sqlite://data/views.db").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_cancels_open_tasks_on_postgres() {
    let Some(db) = fresh_database().await else { return };
    archive_cancels_open_tasks_on(&db, &db).await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_cancels_open_tasks_on_kafka() {
    let (Some(brokers), Some(db)) = (kafka_brokers(), fresh_database().await) else { return };
    let prefix = format!("rx{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    archive_cancels_open_tasks_on(&format!("kafka://{brokers}?prefix={prefix}"), &db).await;
}

/// Archives projects of 50 open tasks each and interrupts the service
/// (`interrupt`) as soon as the first task is cancelled; after `resume`,
/// every task is cancelled exactly once. Answers how many cancellations
/// happened before `resume` began, and how many after: a round whose
/// reaction finished before the interruption tested nothing, and is run
/// again (at most three rounds).
async fn interrupted_archive<I, R>(s: Server, interrupt: I, resume: R) -> Server
where
    I: AsyncFn(Server) -> Option<Server>,
    R: AsyncFn(Option<Server>) -> Server,
{
    let c = Client::new();
    let mut s = s;
    for round in 0..3 {
        let made = projects_with_tasks(&c, &s, &format!("r{round}"), 4, 50).await;
        for (project, ..) in &made {
            post(&c, &s, &format!("/projects/{project}/archive"), json!({})).await;
        }
        let first = &made[0].1[0];
        let deadline = Instant::now() + PATIENCE;
        while get(&c, &s, &format!("/tasks/{first}")).await["status"] != "cancelled" {
            assert!(Instant::now() < deadline, "nothing was cancelled within {PATIENCE:?}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let interrupted = interrupt(s).await;
        let resumed_at = Utc::now();
        s = resume(interrupted).await;
        let (mut before, mut after) = (0, 0);
        for (project, tasks, done) in &made {
            all_cancelled(&c, &s, tasks).await;
            let archive = last_event(&c, &s, project, 3).await;
            for at in cancelled_once_by(&c, &s, tasks, &archive).await {
                if at < resumed_at { before += 1 } else { after += 1 }
            }
            assert_eq!(get(&c, &s, &format!("/tasks/{done}")).await["status"], "done");
        }
        eprintln!("round {round}: {before} tasks cancelled before the interruption ended, {after} after");
        if after > 0 {
            return s;
        }
    }
    panic!("in three rounds the reaction always finished before it could be interrupted");
}

async fn kill_9_in_the_middle_on(store: &str, view: &str) {
    let setup = Setup::new(store, view);
    let s = setup.start("all").await;
    let s = interrupted_archive(
        s,
        async |s: Server| {
            s.kill();
            None
        },
        async |_| setup.start("all").await,
    )
    .await;
    let c = Client::new();
    reactions_idle(&c, &s).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_a_reaction_on_sqlite() {
    kill_9_in_the_middle_on("sqlite://data/events.db", "sqlite://data/views.db").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_a_reaction_on_postgres() {
    let Some(db) = fresh_database().await else { return };
    kill_9_in_the_middle_on(&db, &db).await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_a_reaction_on_kafka() {
    let (Some(brokers), Some(db)) = (kafka_brokers(), fresh_database().await) else { return };
    let prefix = format!("rk{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    kill_9_in_the_middle_on(&format!("kafka://{brokers}?prefix={prefix}"), &db).await;
}

/// A command the domain refuses is recorded and skipped: an `api` process
/// takes a task for a missing project and deletes it before any reaction
/// runs; the projector that starts then decides to cancel it, which the
/// deleted task refuses. Later events go on.
async fn refusals_are_recorded_on(store: &str, view: &str) {
    let setup = Setup::new(store, view);
    let api = setup.start("api").await;
    let c = Client::new();
    let orphan = task(&c, &api, "missing", "deleted before anyone looked").await;
    let r = c.delete(api.url(&format!("/tasks/{orphan}"))).send().await.expect("DELETE");
    assert!(r.status().is_success(), "DELETE answered {}", r.status());
    let projector = setup.start("projector").await;
    reactions_idle(&c, &projector).await;
    let statuses = admin_reactions(&c, &projector).await;
    let on_tasks = statuses.iter().find(|r| r["source"] == "task").expect("the reaction to tasks");
    assert_eq!(on_tasks["refused_total"], 1, "{on_tasks}");
    let refusal = &on_tasks["recent_refusals"][0];
    assert_eq!(refusal["target_id"], orphan.as_str());
    assert!(refusal["error"].as_str().unwrap_or("").contains("does not exist"), "{refusal}");
    assert!(refusal["command"].as_str().unwrap_or("").contains("Cancel"), "{refusal}");
    let gone = c.get(api.url(&format!("/tasks/{orphan}"))).send().await.expect("GET");
    assert_eq!(gone.status(), StatusCode::NOT_FOUND, "the refused command changed nothing");
    // The reaction went on past the refusal.
    let next = task(&c, &api, "missing", "later").await;
    all_cancelled(&c, &api, std::slice::from_ref(&next)).await;
    let metrics = c.get(projector.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    let refused = metrics
        .lines()
        .find(|l| {
            l.starts_with("kes_reaction_commands_total")
                && l.contains("outcome=\"refused\"")
                && l.contains("source=\"task\"")
        })
        .unwrap_or_default();
    assert!(refused.ends_with(" 1"), "{metrics}");
    api.stop();
    projector.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_recorded_on_sqlite() {
    refusals_are_recorded_on("sqlite://data/events.db", "sqlite://data/views.db").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_recorded_on_postgres() {
    let Some(db) = fresh_database().await else { return };
    refusals_are_recorded_on(&db, &db).await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_recorded_on_kafka() {
    let (Some(brokers), Some(db)) = (kafka_brokers(), fresh_database().await) else { return };
    let prefix = format!("rr{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    refusals_are_recorded_on(&format!("kafka://{brokers}?prefix={prefix}"), &db).await;
}

/// PostgreSQL goes away (no connections to the service's database) right
/// after the first task was cancelled, for three seconds: the reaction
/// retries and finishes once it is back, each task cancelled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_in_the_middle_is_retried() {
    let Some(db) = fresh_database().await else { return };
    let name = db.rsplit('/').next().and_then(|n| n.split('?').next()).expect("a database name").to_owned();
    let admin = sqlx::PgPool::connect(&kes_test_support::database_url()).await.expect("the admin database");
    let setup = Setup::new(&db, &db);
    let s = setup.start("all").await;
    let outage = async |allow: bool| {
        sqlx::query(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS {allow}"))
            .execute(&admin)
            .await
            .expect("ALTER DATABASE");
        if !allow {
            sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
                .bind(&name)
                .execute(&admin)
                .await
                .expect("end the service's sessions");
        }
    };
    let s = interrupted_archive(
        s,
        async |s: Server| {
            outage(false).await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            Some(s)
        },
        async |s: Option<Server>| {
            outage(true).await;
            s.expect("the service kept running")
        },
    )
    .await;
    let c = Client::new();
    reactions_idle(&c, &s).await;
    let retried: u64 = admin_reactions(&c, &s).await.iter().map(|r| r["retries"].as_u64().unwrap_or(0)).sum();
    eprintln!("transient failures retried during the outage: {retried}");
    s.stop();
}

/// Reaction latency under write load: eight clients PATCH projects as fast
/// as they can while tasks for a missing project are created one after
/// another; each is cancelled by the reaction. Prints p50/p99 of the time
/// from the task's creation (its event's `recorded_at`) to its
/// cancellation's append (the cancel event's `recorded_at`).
async fn reaction_latency_under_load_on(store: &str, view: &str) {
    let setup = Setup::new(store, view);
    let s = setup.start("all").await;
    let c = Client::new();
    let busy: Vec<String> = {
        let mut ids = Vec::new();
        for i in 0..8 {
            ids.push(project(&c, &s, &format!("busy-{i}")).await);
        }
        ids
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = busy
        .iter()
        .map(|id| {
            let (c, url, stop) = (c.clone(), s.url(&format!("/projects/{id}")), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = c.patch(&url).json(&json!({ "budget": n })).send().await.expect("PATCH");
                    assert_eq!(r.status(), StatusCode::OK);
                    n += 1;
                }
                n
            })
        })
        .collect();
    let started = Instant::now();
    let mut orphans = Vec::new();
    for i in 0..200 {
        orphans.push(task(&c, &s, "nowhere", &format!("orphan-{i}")).await);
    }
    all_cancelled(&c, &s, &orphans).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut writes = 0;
    for w in writers {
        writes += w.await.expect("a writer");
    }
    let elapsed = started.elapsed();
    let mut latencies = Vec::new();
    for id in &orphans {
        let events = history(&c, &s, &format!("/tasks/{id}"), 2).await;
        let at = |e: &Value| e["recorded_at"].as_str().and_then(|t| t.parse::<DateTime<Utc>>().ok()).expect("time");
        latencies.push((at(&events[1]) - at(&events[0])).num_microseconds().unwrap_or(i64::MAX));
    }
    latencies.sort_unstable();
    let pick = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    eprintln!(
        "reaction latency on {}: p50 {:.1} ms, p99 {:.1} ms over {} reactions, under {:.0} PATCH/s from 8 clients",
        store.split(':').next().unwrap_or(store),
        pick(0.5),
        pick(0.99),
        latencies.len(),
        writes as f64 / elapsed.as_secs_f64()
    );
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaction_latency_under_load_on_sqlite() {
    reaction_latency_under_load_on("sqlite://data/events.db", "sqlite://data/views.db").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaction_latency_under_load_on_postgres() {
    let Some(db) = fresh_database().await else { return };
    reaction_latency_under_load_on(&db, &db).await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaction_latency_under_load_on_kafka() {
    let (Some(brokers), Some(db)) = (kafka_brokers(), fresh_database().await) else { return };
    let prefix = format!("rl{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    reaction_latency_under_load_on(&format!("kafka://{brokers}?prefix={prefix}"), &db).await;
}

/// An event the store cannot decode stops the reaction there, visibly
/// (`last_error`, a lag that stays), instead of skipping it: the tasks after
/// it are not cancelled until the event reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_event_stops_the_reaction_visibly() {
    use sqlx::{Connection, SqliteConnection};
    let setup = Setup::new("sqlite://data/events.db", "sqlite://data/views.db");
    let c = Client::new();
    // Two tasks for a missing project, taken while no reaction runs.
    let api = setup.start("api").await;
    let broken = task(&c, &api, "missing", "its creation will not read").await;
    let after = task(&c, &api, "missing", "after the broken one").await;
    api.stop();
    let db = format!("sqlite://{}", setup.dir.path().join("data/events.db").display());
    let mut conn = SqliteConnection::connect(&db).await.expect("the events database");
    let find = "SELECT CAST(payload AS TEXT) FROM kes_events WHERE aggregate_id = $1 AND version = 1";
    let original: String = sqlx::query_scalar(find).bind(&broken).fetch_one(&mut conn).await.expect("the event");
    let set = "UPDATE kes_events SET payload = $1 WHERE aggregate_id = $2 AND version = 1";
    sqlx::query(set).bind(r#"{"NoSuchEvent":{}}"#).bind(&broken).execute(&mut conn).await.expect("damage it");

    let s = setup.start("all").await;
    let deadline = Instant::now() + PATIENCE;
    let stopped = loop {
        let statuses = admin_reactions(&c, &s).await;
        let on_tasks = statuses.into_iter().find(|r| r["source"] == "task").expect("the reaction to tasks");
        if !on_tasks["last_error"].is_null() {
            break on_tasks;
        }
        assert!(Instant::now() < deadline, "the reaction did not report the undecodable event");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let error = stopped["last_error"].as_str().unwrap_or("");
    assert!(error.contains(&broken) && error.contains("cannot be read"), "{error}");
    assert!(stopped["lag"].as_u64().unwrap_or(0) >= 1, "{stopped}");
    let metrics = c.get(s.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("kes_reaction_failing") && l.contains("source=\"task\"") && l.ends_with(" 1")),
        "{metrics}"
    );
    assert_eq!(get(&c, &s, &format!("/tasks/{after}")).await["status"], "open", "it skipped the event");

    // Readable again: the reaction goes on from where it stopped.
    sqlx::query(set).bind(&original).bind(&broken).execute(&mut conn).await.expect("repair it");
    all_cancelled(&c, &s, &[broken, after]).await;
    s.stop();
}
