//! Logs written by earlier code stay readable by this code.
//!
//! `tests/fixtures/logs-r1/` holds real logs written by the `projects`
//! service as it was before `ProjectCreated` and `ProjectBudgetSet` moved to
//! revision 2 (a budget with a currency) and `Project::STATE_VERSION` to 2:
//! a SQLite file, a `pg_dump` of a PostgreSQL database, and every record of
//! the Kafka topics. Each test puts one of them in place, starts today's
//! service on it and checks that the old log loads, lists, shows its
//! history upcast, rebuilds its views and takes new commands.
//!
//! `write_log_fixtures` (ignored) made them, by running [`workload`]
//! against the service of its day; run it again before the next change of
//! an event's shape to keep a fixture of each revision:
//! `KES_WRITE_LOG_FIXTURES=DIR cargo test -p kes-examples --test old_logs -- --ignored`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

mod common;

use common::{BIN, Server, fresh_database, json_of, kafka_brokers};
use kes_core::Aggregate;
use kes_examples::domain::{Project, ProjectEvent};

/// The fixtures of the logs written before revision 2.
const R1: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/logs-r1");

/// The aggregates of the service, as they name their topics.
const AGGREGATES: [&str; 2] = ["project", "task"];

/// What the workload made: the ids the readers look up.
#[derive(Debug, Serialize, Deserialize)]
struct Made {
    /// Role in the workload → project id.
    projects: BTreeMap<String, String>,
    /// Task ids.
    tasks: Vec<String>,
}

/// Writes a little of everything through the service: created projects
/// with and without a budget, budget changes, renames, status commands,
/// members, a deletion and tasks. No task belongs to an archived or
/// deleted project, so that the archive reaction, replayed by a new
/// service over the log, has nothing to do.
async fn workload(s: &Server) -> Made {
    let c = reqwest::Client::new();
    let mut projects = BTreeMap::new();
    let create = |body: Value| {
        let c = c.clone();
        let url = s.url("/projects");
        async move {
            let r = c.post(url).json(&body).send().await.expect("create");
            assert_eq!(r.status(), StatusCode::CREATED, "create {body}");
            r.headers()["location"].to_str().expect("location").trim_start_matches("/projects/").to_owned()
        }
    };
    let ok = |r: reqwest::Response, what: &str| assert!(r.status().is_success(), "{what}: {}", r.status());

    let apollo = create(json!({ "name": "Apollo", "budget": 1200, "owner": "ann", "tags": ["space"],
        "due": "2027-01-31", "description": "to the moon" }))
    .await;
    let url = s.url(&format!("/projects/{apollo}"));
    ok(c.patch(&url).json(&json!({ "budget": 1500 })).send().await.expect("patch"), "budget");
    ok(c.patch(&url).json(&json!({ "name": "Apollo 11" })).send().await.expect("patch"), "rename");
    ok(c.post(format!("{url}/activate")).send().await.expect("activate"), "activate");
    ok(c.post(format!("{url}/add-member")).json(&json!({ "member": "bob" })).send().await.expect("member"), "member");
    projects.insert("apollo".to_owned(), apollo.clone());

    let draft = create(json!({})).await;
    let url = s.url(&format!("/projects/{draft}"));
    ok(c.post(format!("{url}/archive")).send().await.expect("archive"), "archive");
    projects.insert("archived draft".to_owned(), draft);

    let gemini = create(json!({ "name": "Gemini", "budget": 300, "owner": "cy" })).await;
    let url = s.url(&format!("/projects/{gemini}"));
    ok(c.put(&url).json(&json!({ "name": "Gemini", "budget": 0, "owner": "cy" })).send().await.expect("put"), "put");
    ok(c.patch(&url).json(&json!({ "budget": 75 })).send().await.expect("patch"), "budget");
    projects.insert("gemini".to_owned(), gemini.clone());

    let gone = create(json!({ "name": "Mercury", "budget": 40 })).await;
    ok(c.delete(s.url(&format!("/projects/{gone}"))).send().await.expect("delete"), "delete");
    projects.insert("deleted".to_owned(), gone);

    let mut tasks = Vec::new();
    for (project, title) in [(&apollo, "build the rocket"), (&apollo, "train the crew"), (&gemini, "dock")] {
        let r = c.post(s.url("/tasks")).json(&json!({ "project_id": project, "title": title })).send().await;
        let r = r.expect("task");
        assert_eq!(r.status(), StatusCode::CREATED);
        tasks.push(r.headers()["location"].to_str().expect("location").trim_start_matches("/tasks/").to_owned());
    }
    let r = c.patch(s.url(&format!("/tasks/{}", tasks[0]))).json(&json!({ "assignee": "bob" })).send().await;
    ok(r.expect("assign"), "assign");
    Made { projects, tasks }
}

/// One record of a topic, as the fixture keeps it.
#[derive(Debug, Serialize, Deserialize)]
struct RecordLine {
    /// The topic without its prefix (`project.events`).
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<String>,
    value: Option<String>,
    headers: Vec<(String, Option<String>)>,
    timestamp: Option<i64>,
}

/// One topic of the fixture: its name without the prefix, partitions and
/// the configs KES created it with.
#[derive(Debug, Serialize, Deserialize)]
struct TopicLine {
    topic: String,
    partitions: i32,
    configs: BTreeMap<String, String>,
}

fn consumer(brokers: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("kes-fixtures-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()
        .expect("a consumer")
}

fn utf8(bytes: Option<&[u8]>) -> Option<String> {
    bytes.map(|b| String::from_utf8(b.to_vec()).expect("KES writes UTF-8 keys, values and headers"))
}

/// Every record of every topic of the service under `prefix`.
fn dump_topics(brokers: &str, prefix: &str) -> (Vec<TopicLine>, Vec<RecordLine>) {
    let consumer = consumer(brokers);
    let mut topics = Vec::new();
    let mut records = Vec::new();
    for aggregate in AGGREGATES {
        for (kind, configs) in [
            (
                "events",
                BTreeMap::from([
                    ("cleanup.policy".to_owned(), "delete".to_owned()),
                    ("retention.ms".to_owned(), kes_store_kafka::THOUSAND_YEARS_MS.to_string()),
                    ("retention.bytes".to_owned(), "-1".to_owned()),
                ]),
            ),
            ("table", BTreeMap::from([("cleanup.policy".to_owned(), "compact".to_owned())])),
        ] {
            let short = format!("{aggregate}.{kind}");
            let topic = format!("{prefix}.{short}");
            let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)).expect("metadata");
            let partitions = metadata.topics()[0].partitions().len() as i32;
            assert!(partitions > 0, "{topic} has no partitions");
            topics.push(TopicLine { topic: short.clone(), partitions, configs });
            for partition in 0..partitions {
                let (low, high) =
                    consumer.fetch_watermarks(&topic, partition, Duration::from_secs(10)).expect("watermarks");
                if high <= low {
                    continue;
                }
                let mut list = TopicPartitionList::new();
                list.add_partition_offset(&topic, partition, Offset::Offset(low)).expect("partition");
                consumer.assign(&list).expect("assign");
                let mut next = low;
                while next < high {
                    let m = match consumer.poll(Duration::from_secs(10)) {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => panic!("reading {topic}: {e}"),
                        None => panic!("{topic}/{partition} stopped at {next} of {high}"),
                    };
                    let headers = m
                        .headers()
                        .map(|h| h.iter().map(|h| (h.key.to_owned(), utf8(h.value))).collect())
                        .unwrap_or_default();
                    records.push(RecordLine {
                        topic: short.clone(),
                        partition,
                        offset: m.offset(),
                        key: utf8(m.key()),
                        value: utf8(m.payload()),
                        headers,
                        timestamp: m.timestamp().to_millis(),
                    });
                    next = m.offset() + 1;
                }
            }
        }
    }
    (topics, records)
}

fn write_json(path: &Path, value: &impl Serialize) {
    let mut bytes = serde_json::to_vec_pretty(value).expect("JSON");
    bytes.push(b'\n');
    std::fs::write(path, bytes).expect("write");
}

/// Makes the fixtures of the code it is compiled with, into
/// `$KES_WRITE_LOG_FIXTURES`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes fixtures; see the module's documentation"]
async fn write_log_fixtures() {
    let out = std::path::PathBuf::from(std::env::var("KES_WRITE_LOG_FIXTURES").expect("KES_WRITE_LOG_FIXTURES=DIR"));
    std::fs::create_dir_all(&out).expect("the fixtures folder");

    // SQLite: the file itself, made whole (no WAL beside it) by VACUUM INTO.
    let dir = tempfile::tempdir().expect("a work dir");
    let s = Server::start(dir.path(), "sqlite://data/events.db", "sqlite://data/views.db").await;
    let made = workload(&s).await;
    s.stop();
    let copy = out.join("sqlite-events.db");
    let _ = std::fs::remove_file(&copy);
    let db = dir.path().join("data/events.db");
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!("sqlite://{}", db.display()))
        .await
        .expect("open the SQLite log");
    sqlx::query(&format!("VACUUM INTO '{}'", copy.display())).execute(&mut conn).await.expect("VACUUM INTO");
    write_json(&out.join("sqlite-made.json"), &made);

    // PostgreSQL: pg_dump of the database, as INSERTs so that it restores
    // through one connection without psql.
    let url = fresh_database().await.expect("PostgreSQL");
    let dir = tempfile::tempdir().expect("a work dir");
    let s = Server::start(dir.path(), &url, "sqlite://data/views.db").await;
    let made = workload(&s).await;
    s.stop();
    let dump = std::process::Command::new("pg_dump")
        .args(["--inserts", "--no-owner", "--no-privileges", "--schema=public", &url])
        .output()
        .expect("run pg_dump");
    assert!(dump.status.success(), "pg_dump: {}", String::from_utf8_lossy(&dump.stderr));
    std::fs::write(out.join("postgres.sql"), dump.stdout).expect("write the dump");
    write_json(&out.join("postgres-made.json"), &made);

    // Kafka: every record of the four topics, with their offsets.
    let brokers = kafka_brokers().expect("a broker");
    let prefix = format!("fixture{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let dir = tempfile::tempdir().expect("a work dir");
    let s = Server::start(dir.path(), &format!("kafka://{brokers}?prefix={prefix}"), "sqlite://data/views.db").await;
    let made = workload(&s).await;
    s.stop();
    let (topics, records) = dump_topics(&brokers, &prefix);
    write_json(&out.join("kafka-topics.json"), &topics);
    let lines: Vec<String> = records.iter().map(|r| serde_json::to_string(r).expect("JSON")).collect();
    std::fs::write(out.join("kafka-records.jsonl"), lines.join("\n") + "\n").expect("write the records");
    write_json(&out.join("kafka-made.json"), &made);
}

fn read_made(store: &str) -> Made {
    let path = format!("{R1}/{store}-made.json");
    serde_json::from_slice(&std::fs::read(&path).expect("the fixture's ids")).expect("ids JSON")
}

/// The value of `kes_store_{name}` for `aggregate` in a `/metrics` text.
fn store_metric(metrics: &str, name: &str, aggregate: &str) -> Option<f64> {
    let prefix = format!("kes_store_{name}{{aggregate=\"{aggregate}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

/// The state a replay of `id`'s history (as the service shows it: upcast)
/// makes, by the aggregate's own `apply`.
fn replay(history: &Value) -> Project {
    let mut state = Project::default();
    for item in history["items"].as_array().expect("items") {
        let event: ProjectEvent = serde_json::from_value(item["payload"].clone()).expect("a current event");
        state.apply(&event);
    }
    state
}

/// Today's service over a log of revision 1 in place at `store`: the
/// table is rebuilt (its state version changed), states, histories and
/// lists are those of an upcast replay, views rebuild to the same lists,
/// and new commands append at the next version.
async fn read_old_log(dir: &Path, store: &str, view: &str, made: Made) {
    let c = reqwest::Client::new();
    let s = Server::start(dir, store, view).await;
    let apollo = &made.projects["apollo"];
    let get = |id: &str| c.get(s.url(&format!("/projects/{id}"))).send();

    // Before any new command: the table rebuilt for state version 2 (a
    // stale version-1 state would have no currency).
    let r = get(apollo).await.expect("get");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["etag"], "\"5\"");
    let state = json_of(r).await;
    assert_eq!(
        (&state["name"], &state["budget"], &state["currency"], &state["status"]),
        (&json!("Apollo 11"), &json!(1500), &json!("EUR"), &json!("active"))
    );
    assert_eq!(state["members"], json!(["bob"]));
    let gemini = json_of(get(&made.projects["gemini"]).await.expect("get")).await;
    assert_eq!((&gemini["budget"], &gemini["currency"]), (&json!(75), &json!("EUR")));
    let draft = json_of(get(&made.projects["archived draft"]).await.expect("get")).await;
    assert_eq!((&draft["status"], &draft["currency"]), (&json!("archived"), &json!("EUR")));
    assert_eq!(get(&made.projects["deleted"]).await.expect("get").status(), StatusCode::NOT_FOUND);
    let metrics = c.get(s.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    assert_eq!(store_metric(&metrics, "table_rebuilt_from_state_version", "project"), Some(1.0), "{metrics}");
    assert_eq!(store_metric(&metrics, "table_state_version", "project"), Some(2.0));
    assert_eq!(store_metric(&metrics, "table_rebuilt_from_state_version", "task"), Some(0.0));

    // New commands append at the next version, in revision 2.
    let r = c
        .patch(s.url(&format!("/projects/{apollo}")))
        .header("If-Match", "\"5\"")
        .json(&json!({ "currency": "USD" }))
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["etag"], "\"6\"");
    let projects_at = r.headers()["kes-position"].to_str().expect("position").to_owned();
    let r = c.patch(s.url(&format!("/tasks/{}", made.tasks[1]))).json(&json!({ "assignee": "cy" })).send().await;
    let r = r.expect("patch a task");
    assert_eq!(r.status(), StatusCode::OK);
    let tasks_at = r.headers()["kes-position"].to_str().expect("position").to_owned();
    let r = c.post(s.url(&format!("/projects/{}/restore", made.projects["archived draft"]))).send().await;
    let r = r.expect("restore");
    assert_eq!(r.status(), StatusCode::OK);
    let restored_at = r.headers()["kes-position"].to_str().expect("position").to_owned();
    // On Kafka each token speaks for its own partition: lists wait for all.
    let written = [("projects", projects_at.clone()), ("projects", restored_at), ("tasks", tasks_at)];

    // The history, upcast: revision 2 throughout, and it replays to the
    // state the service answers.
    let r = c.get(s.url(&format!("/projects/{apollo}/events"))).header("KES-Position", &projects_at).send().await;
    let history = json_of(r.expect("history")).await;
    let items = history["items"].as_array().expect("items");
    let kinds: Vec<(&str, u64)> =
        items.iter().map(|i| (i["type"].as_str().unwrap_or(""), i["revision"].as_u64().unwrap_or(0))).collect();
    assert_eq!(
        kinds,
        [
            ("ProjectCreated", 2),
            ("ProjectBudgetSet", 2),
            ("ProjectRenamed", 1),
            ("ProjectActivated", 1),
            ("ProjectMemberAdded", 1),
            ("ProjectBudgetSet", 2)
        ]
    );
    assert_eq!(items[0]["payload"]["Created"]["budget"], json!({ "amount": 1200, "currency": "EUR" }));
    assert_eq!(items[1]["payload"]["BudgetSet"]["budget"], json!({ "amount": 1500, "currency": "EUR" }));
    assert_eq!(items[5]["payload"]["BudgetSet"]["budget"], json!({ "amount": 1500, "currency": "USD" }));
    let now = json_of(get(apollo).await.expect("get")).await;
    assert_eq!(serde_json::to_value(replay(&history)).expect("JSON"), now, "the state is the upcast replay's");

    // Lists, built from the old log at start, then rebuilt: the same.
    let before = lists(&c, &s, &written).await;
    let rows = before[0]["items"].as_array().expect("items");
    let names: Vec<&str> = rows.iter().map(|i| i["row"]["name"].as_str().unwrap_or("(unnamed)")).collect();
    assert_eq!(names, ["Apollo 11", "Gemini", "(unnamed)"], "the deleted project is not listed");
    assert_eq!(rows[0]["row"]["budget"], 1500);
    assert_eq!(before[1]["items"].as_array().map(Vec::len), Some(3), "every task is listed");
    s.stop();
    let out = Command::new(BIN)
        .current_dir(dir)
        .arg("rebuild")
        .env("KES_STORE", store)
        .env("KES_VIEW", view)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run projects rebuild");
    assert!(out.status.success(), "rebuild failed: {}", String::from_utf8_lossy(&out.stderr));
    let s = Server::start(dir, store, view).await;
    assert_eq!(lists(&c, &s, &written).await, before, "lists changed across a rebuild");
    // The table was rebuilt once: this start found it current.
    let metrics = c.get(s.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    assert_eq!(store_metric(&metrics, "table_rebuilt_from_state_version", "project"), Some(0.0), "{metrics}");
    s.stop();
}

/// The project and task lists, once they reflect every write in
/// `written` (plural, position).
async fn lists(c: &reqwest::Client, s: &Server, written: &[(&str, String)]) -> Vec<Value> {
    for (plural, at) in written {
        let r = c.get(s.url(&format!("/{plural}"))).header("KES-Position", at).send().await.expect("wait");
        assert_eq!(r.headers()["kes-consistency"], "caught-up", "/{plural} did not catch up with {at}");
    }
    let mut out = Vec::new();
    for query in ["/projects?sort=-budget,name", "/tasks?sort=title"] {
        let r = c.get(s.url(query)).send().await.expect("list");
        assert_eq!(r.status(), StatusCode::OK, "{query}");
        out.push(json_of(r).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_log_of_revision_1() {
    let dir = tempfile::tempdir().expect("a work dir");
    std::fs::create_dir_all(dir.path().join("data")).expect("data folder");
    std::fs::copy(format!("{R1}/sqlite-events.db"), dir.path().join("data/events.db")).expect("the fixture");
    read_old_log(dir.path(), "sqlite://data/events.db", "sqlite://data/views.db", read_made("sqlite")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_log_of_revision_1() {
    let Some(url) = fresh_database().await else { return };
    let dump = std::fs::read_to_string(format!("{R1}/postgres.sql")).expect("the fixture");
    // psql's meta-commands (`\restrict`) are not SQL, and a new database
    // has its `public` schema already; the rest runs as is.
    let sql: String = dump
        .lines()
        .filter(|l| !l.starts_with('\\') && *l != "CREATE SCHEMA public;")
        .map(|l| format!("{l}\n"))
        .collect();
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await.expect("connect");
    sqlx::raw_sql(&sql).execute(&mut conn).await.expect("restore the dump");
    let dir = tempfile::tempdir().expect("a work dir");
    read_old_log(dir.path(), &url, &url, read_made("postgres")).await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_log_of_revision_1() {
    let Some(brokers) = kafka_brokers() else { return };
    let prefix = format!("old{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    restore_topics(&brokers, &prefix).await;
    let dir = tempfile::tempdir().expect("a work dir");
    let store = format!("kafka://{brokers}?prefix={prefix}");
    read_old_log(dir.path(), &store, "sqlite://data/views.db", read_made("kafka")).await;
}

/// Creates the fixture's topics under `prefix` and writes its records back
/// at their offsets.
#[cfg(feature = "kafka")]
async fn restore_topics(brokers: &str, prefix: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let topics: Vec<TopicLine> =
        serde_json::from_slice(&std::fs::read(format!("{R1}/kafka-topics.json")).expect("topics")).expect("JSON");
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("an admin client");
    let names: Vec<String> = topics.iter().map(|t| format!("{prefix}.{}", t.topic)).collect();
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .zip(&names)
        .map(|(t, name)| {
            t.configs
                .iter()
                .fold(NewTopic::new(name, t.partitions, TopicReplication::Fixed(1)), |n, (k, v)| n.set(k, v))
        })
        .collect();
    for result in admin.create_topics(&new, &AdminOptions::new()).await.expect("create topics") {
        result.expect("a new topic");
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.timeout.ms", "30000")
        .create()
        .expect("a producer");
    let records = std::fs::read_to_string(format!("{R1}/kafka-records.jsonl")).expect("records");
    for line in records.lines().filter(|l| !l.is_empty()) {
        let r: RecordLine = serde_json::from_str(line).expect("a record line");
        let topic = format!("{prefix}.{}", r.topic);
        let headers = r
            .headers
            .iter()
            .fold(OwnedHeaders::new(), |h, (key, value)| h.insert(Header { key, value: value.as_deref() }));
        let mut record = FutureRecord::<str, str>::to(&topic).partition(r.partition).headers(headers);
        if let Some(key) = r.key.as_deref() {
            record = record.key(key);
        }
        if let Some(value) = r.value.as_deref() {
            record = record.payload(value);
        }
        if let Some(ts) = r.timestamp {
            record = record.timestamp(ts);
        }
        let delivery = producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).expect("send");
        assert_eq!(
            (delivery.partition, delivery.offset),
            (r.partition, r.offset),
            "{topic}: the record lands where it was"
        );
    }
}
