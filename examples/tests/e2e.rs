//! The `projects` binary, started on a free port and driven over HTTP, on
//! each combination of store and list backend.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::Mutex;

mod common;

use common::{BIN, Server, fresh_database, json_of, kafka_brokers};

fn run_rebuild(dir: &Path, store: &str, view: &str) -> String {
    let out = Command::new(BIN)
        .current_dir(dir)
        .args(["rebuild"])
        .env("KES_STORE", store)
        .env("KES_VIEW", view)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run projects rebuild");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "rebuild failed: {}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// The list answers the scenario compares across restarts and rebuilds,
/// read after the views caught up with every write in `positions` (on
/// Kafka, writes to different partitions have independent positions).
async fn lists(c: &reqwest::Client, s: &Server, positions: &[(&str, String)]) -> Vec<Value> {
    for (plural, position) in positions {
        let r = c.get(s.url(&format!("/{plural}"))).header("KES-Position", position).send().await.expect("wait");
        assert_eq!(r.headers()["kes-consistency"], "caught-up", "/{plural} did not catch up with {position}");
    }
    let mut answers = Vec::new();
    for query in [
        "/projects?sort=-budget,name&page[size]=2",
        "/projects?filter[budget][gte]=200&sort=budget",
        "/projects?filter[owner]=ann&sort=-name",
        "/projects?q=alpha&sort=name",
        "/projects?filter[status]=active",
        "/tasks?filter[status]=open&sort=title",
    ] {
        let r = c.get(s.url(query)).send().await.expect("list");
        assert_eq!(r.status(), StatusCode::OK, "{query}");
        let mut body = json_of(r).await;
        // Walk every page so the comparison covers paging too.
        let mut pages = vec![body["items"].clone()];
        while let Some(next) = body["next"].as_str().map(str::to_owned) {
            let r = c.get(s.url(&format!("{query}&page[after]={next}"))).send().await.expect("next page");
            assert_eq!(r.status(), StatusCode::OK);
            body = json_of(r).await;
            pages.push(body["items"].clone());
        }
        answers.push(json!({ "query": query, "pages": pages, "total": body["total"] }));
    }
    answers
}

fn names(page: &Value) -> Vec<String> {
    page.as_array()
        .map(|items| items.iter().map(|i| i["row"]["name"].as_str().unwrap_or("").to_owned()).collect())
        .unwrap_or_default()
}

/// The whole tour on one pair of backends.
async fn scenario(store: &str, view: &str) {
    let dir = tempfile::tempdir().expect("a work dir");
    let c = reqwest::Client::new();
    let s = Server::start(dir.path(), store, view).await;

    // The seed: a bare POST, then PATCHes with form bodies.
    let r = c.post(s.url("/projects/")).send().await.expect("create");
    assert_eq!(r.status(), StatusCode::CREATED);
    let location = r.headers()["location"].to_str().expect("location").to_owned();
    let seed = s.url(&location);
    let mut last = String::new();
    for i in 1..=30 {
        let r = c.patch(&seed).form(&[("name", format!("test{i}"))]).send().await.expect("patch");
        assert_eq!(r.status(), StatusCode::OK, "PATCH {i}");
        assert_eq!(r.headers()["etag"], format!("\"{}\"", i + 1).as_str());
        last = r.headers()["kes-position"].to_str().expect("position").to_owned();
    }
    let state = json_of(c.get(&seed).send().await.expect("get")).await;
    assert_eq!(state["name"], "test30");
    // History may come from a projection (Kafka): the token waits for it.
    let r = c.get(format!("{seed}/events")).header("KES-Position", &last).send().await.expect("history");
    assert_eq!(r.headers()["kes-consistency"], "caught-up");
    let history = json_of(r).await;
    assert_eq!(history["items"].as_array().map(Vec::len), Some(31));
    assert_eq!(history["next"], Value::Null);
    // Pages by version: every event once, in order.
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = c
            .get(format!("{seed}/events?page[size]=7&page[after]={after}"))
            .header("KES-Position", &last)
            .send()
            .await
            .expect("history page");
        assert_eq!(page.status(), StatusCode::OK);
        let page = json_of(page).await;
        let items = page["items"].as_array().expect("items");
        seen.extend(items.iter().map(|e| e["version"].as_u64().expect("version")));
        match page["next"].as_u64() {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(seen, (1..=31).collect::<Vec<u64>>());

    // Projects worth listing, a task, status commands.
    let mut positions = Vec::new();
    for (name, budget, owner) in
        [("Alpha", 500, "ann"), ("alpha two", 200, "bob"), ("Beta", 100, "ann"), ("Gamma", 900, "cy")]
    {
        let r =
            c.post(s.url("/projects")).json(&json!({ "name": name, "budget": budget, "owner": owner })).send().await;
        let r = r.expect("create");
        assert_eq!(r.status(), StatusCode::CREATED);
        let id = r.headers()["location"].to_str().expect("location").to_owned();
        positions.push(("projects", r.headers()["kes-position"].to_str().expect("position").to_owned()));
        if name == "Alpha" {
            let r = c.post(s.url(&format!("{id}/activate"))).send().await.expect("activate");
            assert_eq!(r.status(), StatusCode::OK);
            let r = c.post(s.url(&format!("{id}/add-member"))).json(&json!({ "member": "dee" })).send().await;
            assert_eq!(r.expect("add member").status(), StatusCode::OK);
            let again = c.post(s.url(&format!("{id}/add-member"))).json(&json!({ "member": "dee" })).send().await;
            assert_eq!(again.expect("add member").status(), StatusCode::UNPROCESSABLE_ENTITY, "a member is added once");
            let task = json!({ "project_id": id.trim_start_matches("/projects/"), "title": "write the plan" });
            let r = c.post(s.url("/tasks")).json(&task).send().await.expect("task");
            assert_eq!(r.status(), StatusCode::CREATED);
            positions.push(("tasks", r.headers()["kes-position"].to_str().expect("position").to_owned()));
        }
    }
    let r = c.patch(&seed).json(&json!({ "budget": -1 })).send().await.expect("patch");
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "a budget is never negative");

    // If-Match: a stale version is refused and appends nothing.
    let r = c.patch(&seed).header("If-Match", "\"3\"").form(&[("name", "late")]).send().await.expect("patch");
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    let r = c.patch(&seed).header("If-Match", "\"31\"").form(&[("name", "on time")]).send().await.expect("patch");
    assert_eq!(r.status(), StatusCode::OK);
    let token = r.headers()["kes-position"].to_str().expect("position").to_owned();
    let history =
        json_of(c.get(format!("{seed}/events")).header("KES-Position", &token).send().await.expect("history")).await;
    assert_eq!(history["items"].as_array().map(Vec::len), Some(32));
    positions.push(("projects", r.headers()["kes-position"].to_str().expect("position").to_owned()));

    // Lists: filter, sort, page, search.
    let before = lists(&c, &s, &positions).await;
    assert_eq!(names(&before[0]["pages"][0]), ["Gamma", "Alpha"], "sort=-budget,name, first page");
    assert_eq!(before[0]["total"], 5);
    assert_eq!(names(&before[1]["pages"][0]), ["alpha two", "Alpha", "Gamma"]);
    assert_eq!(names(&before[2]["pages"][0]), ["Beta", "Alpha"]);
    assert_eq!(names(&before[3]["pages"][0]), ["Alpha", "alpha two"]);
    assert_eq!(names(&before[4]["pages"][0]), ["Alpha"]);
    assert_eq!(before[5]["total"], 1);

    // Restart: everything reads back the same.
    s.stop();
    let s = Server::start(dir.path(), store, view).await;
    assert_eq!(json_of(c.get(s.url(&location)).send().await.expect("get")).await["name"], "on time");
    assert_eq!(lists(&c, &s, &positions).await, before, "lists changed across a restart");
    s.stop();

    // Rebuild from the log: identical answers.
    let printed = run_rebuild(dir.path(), store, view);
    assert!(printed.contains("rebuilt projects") && printed.contains("rebuilt tasks"), "{printed}");
    let s = Server::start(dir.path(), store, view).await;
    assert_eq!(lists(&c, &s, &positions).await, before, "lists changed across a rebuild");
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_with_sqlite_views() {
    scenario("sqlite://data/events.db", "sqlite://data/views.db").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_with_postgres_views() {
    if let Some(db) = fresh_database().await {
        scenario(&db, &db).await;
    }
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_store_with_postgres_views() {
    let (Some(brokers), Some(db)) = (kafka_brokers(), fresh_database().await) else { return };
    let prefix = format!("e2e{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    scenario(&format!("kafka://{brokers}?prefix={prefix}"), &db).await;
}

#[cfg(feature = "view-search")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_with_search_views() {
    scenario("sqlite://data/events.db", "data/index").await;
}

/// How many PATCHes the service acknowledges before the kill.
const ACKED_BEFORE_KILL: usize = 200;

/// kill -9 while PATCHes are in flight, once the service has acknowledged
/// [`ACKED_BEFORE_KILL`] of them: after a restart, every version the
/// service acknowledged is in the history, with the name it set, and the
/// versions are contiguous.
async fn acknowledged_writes_survive_kill_9_on(store: &str, view: &str) {
    let dir = tempfile::tempdir().expect("a work dir");
    let s = Server::start(dir.path(), store, view).await;
    let c = reqwest::Client::new();
    let r = c.post(s.url("/projects")).json(&json!({ "name": "crash" })).send().await.expect("create");
    assert_eq!(r.status(), StatusCode::CREATED);
    let location = r.headers()["location"].to_str().expect("location").to_owned();
    let url = s.url(&location);
    let acked: Arc<Mutex<Vec<(u64, String, String)>>> = Arc::default();
    let (progress, mut acks) = tokio::sync::watch::channel(0usize);
    let progress = Arc::new(progress);
    // Set just before the kill: a request that fails after it failed
    // because the service died; one that fails before it is a fault.
    let killed = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (c, url, acked) = (c.clone(), url.clone(), Arc::clone(&acked));
            let (progress, killed) = (Arc::clone(&progress), Arc::clone(&killed));
            tokio::spawn(async move {
                for i in 0..10_000 {
                    let name = format!("w{w}-{i}");
                    let r = match c.patch(&url).form(&[("name", &name)]).send().await {
                        Ok(r) => r,
                        Err(_) if killed.load(Ordering::SeqCst) => return,
                        Err(e) => panic!("PATCH {name} failed while the service was up: {e}"),
                    };
                    let status = r.status();
                    if status != StatusCode::OK {
                        let body = r.text().await.unwrap_or_default();
                        panic!("PATCH {name} answered {status}: {body}");
                    }
                    let etag = r.headers()["etag"].to_str().expect("an ETag").trim_matches('"');
                    let version: u64 = etag.parse().expect("a version in the ETag");
                    let position = r.headers()["kes-position"].to_str().expect("a position").to_owned();
                    acked.lock().await.push((version, name, position));
                    progress.send_modify(|n| *n += 1);
                }
            })
        })
        .collect();
    drop(progress);
    // Writers that all stopped (panicked) close the channel; their panics
    // are reported below.
    // Only whether the count was reached is kept: the guard `wait_for`
    // returns holds the channel's lock, and a writer still answered after
    // the kill must be able to count its write.
    let reached = matches!(
        tokio::time::timeout(Duration::from_secs(300), acks.wait_for(|n| *n >= ACKED_BEFORE_KILL)).await,
        Ok(Ok(_))
    );
    killed.store(true, Ordering::SeqCst);
    s.kill();
    for w in writers {
        w.await.expect("a writer task failed");
    }
    let acked = acked.lock().await.clone();
    assert!(reached, "only {} of {ACKED_BEFORE_KILL} writes were acknowledged within 300 s", acked.len());

    let s = Server::start(dir.path(), store, view).await;
    let history = s.url(&format!("{location}/events"));
    // The latest acknowledged write's position: history served by a
    // projection (Kafka) waits until the restarted process has applied it.
    let token = acked.iter().max_by_key(|(version, ..)| *version).map(|(.., p)| p.clone()).expect("a write");
    // Each read waits for the token up to the service's consistency timeout;
    // the restarted process may need longer to catch up.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let page = c.get(format!("{history}?page[size]=1")).header("KES-Position", &token).send().await;
        let page = page.expect("history");
        let consistency = page.headers().get("kes-consistency").and_then(|v| v.to_str().ok()).unwrap_or("");
        if consistency == "caught-up" {
            assert_eq!(page.status(), StatusCode::OK);
            break;
        }
        // Until the restarted process leads the views (the killed one's
        // lease expires first) the history view may not have the project
        // yet: a stale answer may be a 404.
        assert!(
            page.status() == StatusCode::OK || (page.status() == StatusCode::NOT_FOUND && consistency == "stale"),
            "history answered {} ({consistency})",
            page.status()
        );
        assert!(Instant::now() < deadline, "the history did not catch up with {token} within 300 s");
    }
    // Every page of the history (1,000 events per page by default).
    let mut items: Vec<Value> = Vec::new();
    let mut after = 0;
    loop {
        let page = c.get(format!("{history}?page[after]={after}"));
        let page = page.header("KES-Position", &token).send().await.expect("history");
        assert_eq!(page.status(), StatusCode::OK);
        assert_eq!(page.headers()["kes-consistency"], "caught-up");
        let page = json_of(page).await;
        items.extend(page["items"].as_array().expect("items").iter().cloned());
        match page["next"].as_u64() {
            Some(next) => after = next,
            None => break,
        }
    }
    let versions: Vec<u64> = items.iter().map(|e| e["version"].as_u64().unwrap_or(0)).collect();
    assert_eq!(versions, (1..=versions.len() as u64).collect::<Vec<_>>(), "versions are not contiguous");
    eprintln!("{} writes acknowledged before the kill; {} events after the restart", acked.len(), versions.len());
    for (version, name, _) in &acked {
        let event = items.get((*version - 1) as usize);
        assert_eq!(
            event.map(|e| &e["payload"]["Renamed"]["name"]),
            Some(&json!(name)),
            "acknowledged version {version} is not in the history"
        );
    }
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    acknowledged_writes_survive_kill_9_on("sqlite://data/events.db", "sqlite://data/views.db").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_on_postgres() {
    if let Some(db) = fresh_database().await {
        acknowledged_writes_survive_kill_9_on(&db, &db).await;
    }
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_on_kafka() {
    let (Some(brokers), Some(db)) = (kafka_brokers(), fresh_database().await) else { return };
    let prefix = format!("e2e{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    acknowledged_writes_survive_kill_9_on(&format!("kafka://{brokers}?prefix={prefix}"), &db).await;
}

/// The command side and the query side in separate processes: an `api`
/// process takes the writes and serves the reads, a `projector` process
/// keeps the views. A read through the api carrying a write's position
/// waits for the projector's stored checkpoint; with the projector gone,
/// writes still land and such reads say `stale`.
async fn split_roles_on(store: &str, view: &str) {
    let dir = tempfile::tempdir().expect("a work dir");
    let projector = Server::start_as(dir.path(), store, view, "projector").await;
    let api = Server::start_as(dir.path(), store, view, "api").await;
    let c = reqwest::Client::new();
    // A change feed on the api process, fed by the views' stored checkpoints.
    let mut feed = c.get(api.url("/projects/changes")).send().await.expect("feed");
    assert_eq!(feed.headers()["content-type"], "text/event-stream");

    let r = c.post(api.url("/projects")).json(&json!({ "name": "split", "budget": 1 })).send().await.expect("create");
    assert_eq!(r.status(), StatusCode::CREATED);
    let location = r.headers()["location"].to_str().expect("location").to_owned();
    let id = location.trim_start_matches("/projects/").to_owned();
    for budget in 2..=11 {
        let r = c.patch(api.url(&location)).json(&json!({ "budget": budget })).send().await.expect("patch");
        assert_eq!(r.status(), StatusCode::OK);
        let token = r.headers()["kes-position"].to_str().expect("position").to_owned();
        let list = c
            .get(api.url(&format!("/projects?filter[id]={id}")))
            .header("KES-Position", &token)
            .send()
            .await
            .expect("list");
        assert_eq!(list.headers()["kes-consistency"], "caught-up", "the projector applied the write");
        let list = json_of(list).await;
        assert_eq!(list["items"][0]["version"], budget, "the api reads its own write");
    }
    // The feed saw the last write.
    let wanted = format!("\"id\":\"{id}\"");
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(text.contains(&wanted) && text.contains("\"budget\":11")) {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, feed.chunk()).await.expect("the feed went quiet");
        text.push_str(&String::from_utf8_lossy(&chunk.expect("feed").expect("the feed ended")));
    }
    // The projector serves no API, only its health and metrics.
    let r = c.get(projector.url("/projects")).send().await.expect("projector list");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let metrics = c.get(projector.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("projects"), "the projector reports its projections: {metrics}");

    projector.kill();
    let r = c.patch(api.url(&location)).json(&json!({ "budget": 99 })).send().await.expect("patch");
    assert_eq!(r.status(), StatusCode::OK, "writes do not need the projector");
    let token = r.headers()["kes-position"].to_str().expect("position").to_owned();
    let list = c.get(api.url("/projects")).header("KES-Position", &token).send().await.expect("list");
    assert_eq!(list.headers()["kes-consistency"], "stale", "nobody projects the write");
    // A new projector catches up from the stored checkpoint once the dead
    // one's lease on the views has expired (5 s by default): until then it
    // stands by, and reads carrying the token say `stale`.
    let projector = Server::start_as(dir.path(), store, view, "projector").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let list = loop {
        let list = c
            .get(api.url(&format!("/projects?filter[id]={id}")))
            .header("KES-Position", &token)
            .send()
            .await
            .expect("list");
        if list.headers()["kes-consistency"] == "caught-up" {
            break list;
        }
        assert!(Instant::now() < deadline, "the new projector never took over from the killed one");
    };
    assert_eq!(json_of(list).await["items"][0]["row"]["budget"], 99);
    // SIGTERM with the feed still open: the feed ends, so that the
    // graceful shutdown does not wait for its client.
    api.stop();
    drop(feed);
    projector.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_roles_on_sqlite() {
    split_roles_on("sqlite://data/events.db", "sqlite://data/views.db").await;
}

/// A Tantivy index in an `api` process is opened read-only: it follows
/// what the projector commits (and its swaps), and a new projector takes
/// the index over from a killed one (the writer lock dies with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_roles_on_search_views() {
    split_roles_on("sqlite://data/events.db", "data/index").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_roles_on_postgres() {
    let Some(db) = fresh_database().await else { return };
    split_roles_on(&db, &db).await;
}

/// `projects rebuild` on a running system: the plain command refuses while
/// a live projector leads the views (and says how to do it); `--via` asks
/// that projector, which rebuilds while the api keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_systems_rebuild_goes_through_the_leading_projector() {
    let dir = tempfile::tempdir().expect("a work dir");
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "an-admin-token-for-the-e2e-test\n").expect("token file");
    let token = token.to_str().expect("utf-8 path").to_owned();
    let (store, view) = ("sqlite://data/events.db", "sqlite://data/views.db");
    let projector =
        Server::start_with(dir.path(), store, view, "projector", &[("KES_ADMIN_TOKEN_FILE", token.as_str())]).await;
    let api = Server::start_as(dir.path(), store, view, "api").await;
    let c = reqwest::Client::new();
    let mut position = String::new();
    for i in 0..20 {
        let r = c.post(api.url("/projects")).json(&json!({ "name": format!("p{i}") })).send().await.expect("create");
        assert_eq!(r.status(), StatusCode::CREATED);
        position = r.headers()["kes-position"].to_str().expect("position").to_owned();
    }
    let rebuild = |args: &[&str]| {
        Command::new(BIN)
            .current_dir(dir.path())
            .arg("rebuild")
            .args(args)
            .env("KES_STORE", store)
            .env("KES_VIEW", view)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run projects rebuild")
    };
    let plain = rebuild(&[]);
    assert!(!plain.status.success(), "a rebuild beside a live projector ran");
    let said = String::from_utf8_lossy(&plain.stderr);
    assert!(said.contains("--via"), "the refusal does not say how: {said}");

    let wrong = dir.path().join("wrong.token");
    std::fs::write(&wrong, "not-the-admin-token-at-all").expect("token file");
    let refused = rebuild(&["--via", &projector.base, "--admin-token-file", wrong.to_str().expect("path")]);
    assert!(!refused.status.success(), "a wrong token was accepted");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));

    let via = rebuild(&["--via", &projector.base, "--admin-token-file", &token]);
    let printed = String::from_utf8_lossy(&via.stdout);
    assert!(via.status.success(), "rebuild --via failed: {}", String::from_utf8_lossy(&via.stderr));
    for name in ["projects", "tasks"] {
        assert!(printed.contains(&format!("rebuilt {name} on {}", projector.base)), "{printed}");
    }
    let list = c.get(api.url("/projects?page[size]=100")).header("KES-Position", &position).send().await.expect("list");
    assert_eq!(list.headers()["kes-consistency"], "caught-up");
    assert_eq!(json_of(list).await["total"], 20, "the rebuilt view lost rows");
    api.stop();
    projector.stop();
}

/// `--auth-hs256-secret-file` and `--auth-issuer`: the API needs a bearer
/// JWT, the token's subject is the principal of the events (a forged
/// `X-Principal` is ignored), the example's rules answer 403 from the
/// token's subject and roles, and the reactions keep working behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_requires_tokens_when_asked_to() {
    use jsonwebtoken::{EncodingKey, Header, encode};
    let dir = tempfile::tempdir().expect("a work dir");
    let secret = "a-secret-for-the-e2e-test-of-at-least-32-bytes";
    std::fs::write(dir.path().join("jwt.secret"), format!("{secret}\n")).expect("secret file");
    let secret_file = dir.path().join("jwt.secret").to_str().expect("utf-8 path").to_owned();
    let env = [("KES_AUTH_HS256_SECRET_FILE", secret_file.as_str()), ("KES_AUTH_ISSUER", "https://login.example")];
    let s = Server::start_with(dir.path(), "sqlite://data/events.db", "sqlite://data/views.db", "all", &env).await;
    let token = |sub: &str, iss: &str| {
        let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() + 600;
        let claims = json!({ "sub": sub, "iss": iss, "exp": exp });
        encode(&Header::default(), &claims, &EncodingKey::from_secret(secret.as_bytes())).expect("token")
    };
    let c = reqwest::Client::new();
    let r = c.post(s.url("/projects")).json(&json!({ "name": "locked" })).send().await.expect("POST");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"kes\"");
    let wrong = token("ann", "https://elsewhere.example");
    let r = c.post(s.url("/projects")).bearer_auth(&wrong).json(&json!({ "name": "x" })).send().await.expect("POST");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "a token of another issuer");
    let ann = token("ann", "https://login.example");
    let r = c
        .post(s.url("/projects"))
        .bearer_auth(&ann)
        .header("X-Principal", "mallory")
        .json(&json!({ "name": "mine" }))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), StatusCode::CREATED);
    let location = r.headers()["location"].to_str().expect("location").to_owned();
    let history =
        json_of(c.get(s.url(&format!("{location}/events"))).bearer_auth(&ann).send().await.expect("GET")).await;
    assert_eq!(history["items"][0]["metadata"]["principal"], "ann");
    let r = c
        .post(s.url("/tasks"))
        .bearer_auth(&ann)
        .json(&json!({ "project_id": "missing", "title": "orphan" }))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), StatusCode::CREATED);
    let task = r.headers()["location"].to_str().expect("location").to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    while json_of(c.get(s.url(&task)).bearer_auth(&ann).send().await.expect("GET")).await["status"] != "cancelled" {
        assert!(Instant::now() < deadline, "the reaction did not cancel the orphan behind authentication");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The example's rules: ann owns "owned"; bob may neither change nor
    // archive it until he is a member, and then only change it; an admin may.
    let with_roles = |sub: &str, roles: &[&str]| {
        let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() + 600;
        let claims = json!({ "sub": sub, "iss": "https://login.example", "exp": exp, "roles": roles });
        encode(&Header::default(), &claims, &EncodingKey::from_secret(secret.as_bytes())).expect("token")
    };
    let bob = token("bob", "https://login.example");
    let r = c.post(s.url("/projects")).bearer_auth(&ann).json(&json!({ "name": "owned", "owner": "ann" })).send();
    let owned = r.await.expect("POST").headers()["location"].to_str().expect("location").to_owned();
    let run = |token: &str, method: reqwest::Method, path: String, body: serde_json::Value| {
        c.request(method, s.url(&path)).bearer_auth(token).json(&body).send()
    };
    let rename = |token: &str| run(token, reqwest::Method::PATCH, owned.clone(), json!({ "name": "renamed" }));
    let archive = |token: &str| run(token, reqwest::Method::POST, format!("{owned}/archive"), json!({}));
    let refused = rename(&bob).await.expect("PATCH");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert!(json_of(refused).await["detail"].as_str().expect("detail").contains("owner, its members or an admin"));
    let r = run(&ann, reqwest::Method::POST, format!("{owned}/add-member"), json!({ "member": "bob" })).await;
    assert_eq!(r.expect("POST").status(), StatusCode::OK);
    assert_eq!(rename(&bob).await.expect("PATCH").status(), StatusCode::OK, "a member may change it");
    let takeover = run(&bob, reqwest::Method::PATCH, owned.clone(), json!({ "owner": "bob" })).await.expect("PATCH");
    assert_eq!(takeover.status(), StatusCode::FORBIDDEN, "but not make himself its owner");
    assert_eq!(archive(&bob).await.expect("POST").status(), StatusCode::FORBIDDEN, "but not archive it");
    assert_eq!(archive(&with_roles("root", &["admin"])).await.expect("POST").status(), StatusCode::OK);
    let history = json_of(c.get(s.url(&format!("{owned}/events"))).bearer_auth(&ann).send().await.expect("GET")).await;
    let who: Vec<&str> = history["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|e| e["metadata"]["principal"].as_str())
        .collect();
    assert_eq!(who, ["ann", "ann", "bob", "root"], "refused commands left nothing in the history");
    let admin = c.get(s.url("/admin/reactions")).bearer_auth(with_roles("root", &["admin"])).send().await;
    assert_eq!(admin.expect("GET").status(), StatusCode::OK, "the admin role opens the admin endpoints");
    let admin = c.get(s.url("/admin/reactions")).bearer_auth(&bob).send().await;
    assert_eq!(admin.expect("GET").status(), StatusCode::FORBIDDEN);
    assert_eq!(c.get(s.url("/health")).send().await.expect("health").status(), StatusCode::OK, "health stays open");
    s.stop();
}

/// Behind a gateway (`KES_TRUST_PRINCIPAL_HEADER`, `KES_TRUST_ROLES_HEADER`):
/// the principal and roles are the headers' values, the example's rules
/// answer from them, and a malformed roles header runs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_gateway_the_caller_and_roles_come_from_trusted_headers() {
    let dir = tempfile::tempdir().expect("a work dir");
    let env = [("KES_TRUST_PRINCIPAL_HEADER", "x-principal"), ("KES_TRUST_ROLES_HEADER", "x-roles")];
    let s = Server::start_with(dir.path(), "sqlite://data/events.db", "sqlite://data/views.db", "all", &env).await;
    let c = reqwest::Client::new();
    let as_ = |who: &str, roles: Option<&str>, method: reqwest::Method, path: &str| {
        let r = c.request(method, s.url(path)).header("x-principal", who);
        match roles {
            Some(roles) => r.header("x-roles", roles),
            None => r,
        }
    };
    let r = as_("ann", None, reqwest::Method::POST, "/projects").json(&json!({ "name": "gated", "owner": "ann" }));
    let r = r.send().await.expect("POST");
    assert_eq!(r.status(), StatusCode::CREATED);
    let owned = r.headers()["location"].to_str().expect("location").to_owned();
    let archive = format!("{owned}/archive");
    let r = as_("bob", None, reqwest::Method::POST, &archive).json(&json!({})).send().await.expect("POST");
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "bob is neither its owner nor an admin");
    let r = as_("bob", Some("admin,reader"), reqwest::Method::POST, &archive).json(&json!({})).send().await;
    let r = r.expect("POST");
    assert_eq!(r.status(), StatusCode::OK, "an admin may archive it");
    let restore = format!("{owned}/restore");
    let r = as_("carol", Some("admin;reader"), reqwest::Method::POST, &restore).json(&json!({})).send().await;
    let r = r.expect("POST");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "a malformed roles header");
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let history =
        json_of(as_("ann", None, reqwest::Method::GET, &format!("{owned}/events")).send().await.expect("GET"));
    let who: Vec<String> = history.await["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|e| e["metadata"]["principal"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(who, ["ann", "bob"], "the refused and the malformed requests left nothing");
    s.stop();
}
