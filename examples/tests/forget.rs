//! Forgetting a person, end to end on every store: owners, members and
//! assignees are sealed before they reach the log, readable over REST
//! until `DELETE /subjects/{subject}`, and erased on every read path after
//! it — with the ETag moved, other people's data intact, and the names
//! absent from the raw bytes of the log, the table and the service's logs.

mod common;

use std::path::Path;

use common::{BIN, Server, fresh_database, json_of};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Names no other data contains, so that a byte search finds only them.
const OWNER: &str = "Zelda Quintessa-Harrowgate";
const MEMBER: &str = "Yorick Bellwether-Fane";
const OTHER: &str = "Ottoline Spencely-Vask";
const TOKEN: &str = "erasure-admin-token-0123456789";

struct Service {
    dir: tempfile::TempDir,
    store: String,
    view: String,
    env: Vec<(String, String)>,
}

impl Service {
    fn new(store: &str, view: &str) -> Self {
        let dir = tempfile::tempdir().expect("a work dir");
        let token = dir.path().join("admin.token");
        std::fs::write(&token, TOKEN).expect("the token file");
        let env = vec![
            ("KES_ADMIN_TOKEN_FILE".to_owned(), token.display().to_string()),
            // Everything a request logs, so that the log check sees it.
            ("RUST_LOG".to_owned(), "debug,sqlx=warn,rdkafka=warn,tantivy=warn,hyper=warn,h2=warn".to_owned()),
        ];
        Self { dir, store: store.to_owned(), view: view.to_owned(), env }
    }

    fn log(&self) -> std::path::PathBuf {
        self.dir.path().join("service.log")
    }

    async fn start(&self) -> Server {
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Server::start_logged(self.dir.path(), &self.store, &self.view, "all", &env, Some(&self.log())).await
    }

    fn rebuild(&self) {
        let out = std::process::Command::new(BIN)
            .current_dir(self.dir.path())
            .arg("rebuild")
            .env("KES_STORE", &self.store)
            .env("KES_VIEW", &self.view)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run projects rebuild");
        assert!(out.status.success(), "rebuild failed: {}", String::from_utf8_lossy(&out.stderr));
    }
}

fn position(r: &reqwest::Response) -> String {
    r.headers()["kes-position"].to_str().expect("a position").to_owned()
}

fn etag(r: &reqwest::Response) -> String {
    r.headers()["etag"].to_str().expect("an etag").to_owned()
}

/// The list of projects matching `query`, once the view has `after`.
async fn list(c: &reqwest::Client, s: &Server, query: &str, after: &str) -> Value {
    let r = c.get(s.url(&format!("/projects?{query}"))).header("KES-Position", after).send().await.expect("list");
    assert_eq!(r.headers()["kes-consistency"], "caught-up", "the view did not catch up with {after}");
    json_of(r).await
}

fn ids(page: &Value) -> Vec<String> {
    page["items"].as_array().expect("items").iter().map(|i| i["id"].as_str().expect("id").to_owned()).collect()
}

/// Where the raw log and table live, and how to read their bytes.
enum RawLog<'a> {
    SqliteFile(&'a Path),
    Postgres(&'a str),
    #[cfg(feature = "kafka")]
    Kafka {
        brokers: &'a str,
        prefix: &'a str,
    },
}

impl RawLog<'_> {
    /// Whether any byte sequence of the log, the table of states or (on
    /// Kafka) the topics holds `needle`.
    async fn holds(&self, needle: &str) -> bool {
        match self {
            RawLog::SqliteFile(dir) => std::fs::read_dir(dir).expect("the data folder").flatten().any(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                // The log's own files and the key store's (which files
                // persons under a keyed hash); only views hold names.
                (name.starts_with("events.db") || name.starts_with("events-keys.db")) && {
                    let bytes = std::fs::read(entry.path()).unwrap_or_default();
                    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
                }
            }),
            RawLog::Postgres(url) => {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(url).await.expect("PostgreSQL");
                let pattern = format!("%{needle}%");
                let events: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM kes_events \
                     WHERE payload LIKE $1 OR metadata::text LIKE $1 OR idempotency_key LIKE $1",
                )
                .bind(&pattern)
                .fetch_one(&mut conn)
                .await
                .expect("the events");
                let states: i64 = sqlx::query_scalar("SELECT count(*) FROM kes_aggregates WHERE state::text LIKE $1")
                    .bind(&pattern)
                    .fetch_one(&mut conn)
                    .await
                    .expect("the table of states");
                events + states > 0
            }
            #[cfg(feature = "kafka")]
            RawLog::Kafka { brokers, prefix } => {
                kafka_bytes(brokers, prefix).windows(needle.len()).any(|w| w == needle.as_bytes())
            }
        }
    }
}

/// Every key, value and header byte of the service's topics, up to the
/// high watermarks they had when the read began.
#[cfg(feature = "kafka")]
fn kafka_bytes(brokers: &str, prefix: &str) -> Vec<u8> {
    use std::collections::HashMap;
    use std::time::Duration;

    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("kes-forget-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        // The test broker can hold a fetch for its whole wait even with
        // records to give (500 ms by default): keep the wait short.
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("a consumer");
    // Every partition with records, read side by side.
    let mut ends = HashMap::new();
    let mut list = TopicPartitionList::new();
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(10)).expect("metadata");
    for topic in metadata.topics().iter().filter(|t| t.name().starts_with(prefix)) {
        for partition in topic.partitions() {
            let (low, high) =
                consumer.fetch_watermarks(topic.name(), partition.id(), Duration::from_secs(10)).expect("watermarks");
            if high > low {
                list.add_partition_offset(topic.name(), partition.id(), Offset::Offset(low)).expect("partition");
                ends.insert((topic.name().to_owned(), partition.id()), high);
            }
        }
    }
    let mut bytes = Vec::new();
    if ends.is_empty() {
        return bytes;
    }
    consumer.assign(&list).expect("assign");
    while !ends.is_empty() {
        let m = match consumer.poll(Duration::from_secs(10)) {
            Some(Ok(m)) => m,
            Some(Err(e)) => panic!("reading the topics: {e}"),
            None => panic!("the topics ended before their high watermarks: {ends:?}"),
        };
        let at = (m.topic().to_owned(), m.partition());
        let Some(&high) = ends.get(&at) else { continue };
        if m.offset() >= high {
            continue;
        }
        bytes.extend_from_slice(m.key().unwrap_or_default());
        bytes.extend_from_slice(m.payload().unwrap_or_default());
        if let Some(headers) = m.headers() {
            for h in headers.iter() {
                bytes.extend_from_slice(h.key.as_bytes());
                bytes.extend_from_slice(h.value.unwrap_or_default());
            }
        }
        if m.offset() + 1 >= high {
            ends.remove(&at);
        }
    }
    bytes
}

/// The whole story on one store.
// Kept in one piece: one story whose steps depend on what the previous ones did (ids, ETags, positions),
// told in order so that a failure says which step of forgetting a person broke.
async fn forget_a_person(store: &str, view: &str, raw: RawLog<'_>) {
    let service = Service::new(store, view);
    let c = reqwest::Client::new();
    let s = service.start().await;
    let admin = format!("Bearer {TOKEN}");

    // Before: the owner, a member and an assignee are readable.
    let r = c.post(s.url("/projects")).json(&json!({ "name": "Lighthouse", "owner": OWNER })).send().await;
    let r = r.expect("create");
    assert_eq!(r.status(), StatusCode::CREATED);
    let project = r.headers()["location"].to_str().expect("location").to_owned();
    let project_id = project.trim_start_matches("/projects/").to_owned();
    let r = c.post(s.url(&format!("{project}/add-member"))).json(&json!({ "member": MEMBER })).send().await;
    assert_eq!(r.expect("add member").status(), StatusCode::OK);
    let task = json!({ "project_id": project_id, "title": "check the lamp", "assignee": OWNER });
    let r = c.post(s.url("/tasks")).json(&task).send().await.expect("task");
    assert_eq!(r.status(), StatusCode::CREATED);
    let task_url = s.url(r.headers()["location"].to_str().expect("location"));
    let r = c.post(s.url("/projects")).json(&json!({ "name": "Harbour", "owner": OTHER })).send().await;
    let other = r.expect("create").headers()["location"].to_str().expect("location").to_owned();
    let r = c.get(s.url(&project)).send().await.expect("get");
    let cached_etag = etag(&r);
    let cached = json_of(r).await;
    assert_eq!((&cached["owner"], &cached["members"]), (&json!(OWNER), &json!([MEMBER])));
    assert_eq!(json_of(c.get(&task_url).send().await.expect("task")).await["assignee"], json!(OWNER));
    // A retry key with the owner's name in it (clients put names, dates
    // and order numbers in keys): a retry is answered once, and the key is
    // kept only as its digest (the raw checks below).
    let keyed = || {
        c.patch(s.url(&project))
            .header("Idempotency-Key", format!("{OWNER} 2026-12-06 #1"))
            .json(&json!({ "description": "the north one" }))
    };
    let r = keyed().send().await.expect("patch");
    assert_eq!(r.status(), StatusCode::OK);
    let before = position(&r);
    let r = keyed().send().await.expect("the retry");
    assert_eq!(r.headers()["idempotent-replayed"], "true", "the retry is answered from the first write");
    assert_eq!(position(&r), before);
    let found = list(&c, &s, &format!("q={}", OWNER.split(' ').next().unwrap_or(OWNER)), &before).await;
    assert_eq!(ids(&found), std::slice::from_ref(&project_id), "search finds the owner's name");

    // The log and the table never held the names.
    for name in [OWNER, MEMBER, OTHER] {
        assert!(!raw.holds(name).await, "{name} is in the raw log");
    }
    assert!(raw.holds("Lighthouse").await, "the raw check can find what is there");

    // Erasure: admin only, by name here; the answer names the subject.
    let r = c.delete(s.url(&format!("/subjects/{OWNER}"))).send().await.expect("erase");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = c.delete(s.url(&format!("/subjects/{OWNER}"))).header("Authorization", &admin).send().await;
    let r = r.expect("erase");
    assert_eq!(r.status(), StatusCode::OK);
    let erased = json_of(r).await;
    assert_eq!(erased["already_erased"], false);
    let subject = erased["subject"].as_str().expect("a subject id").to_owned();
    assert!(!subject.contains("Zelda"), "the subject id is opaque");
    let touched = erased["aggregates"].as_array().expect("aggregates");
    assert_eq!(touched.len(), 2, "the project and the task: {erased}");
    assert!(touched.iter().all(|a| a["recorded"] == true), "{erased}");
    // The project's erasure event: what the project list must have seen.
    let erased_at = touched
        .iter()
        .find(|a| a["aggregate"] == "project")
        .and_then(|a| a["position"].as_str())
        .expect("the project's position")
        .to_owned();

    // After: every read path shows the owner erased, and only the owner.
    let r = c.get(s.url(&project)).header("If-None-Match", &cached_etag).send().await.expect("get");
    assert_eq!(r.status(), StatusCode::OK, "the ETag moved with the erasure");
    assert_ne!(etag(&r), cached_etag);
    let now = json_of(r).await;
    assert_eq!((&now["owner"], &now["_erased"]), (&Value::Null, &json!(["/owner"])));
    assert_eq!(now["members"], json!([MEMBER]), "the member is another subject");
    let t = json_of(c.get(&task_url).send().await.expect("task")).await;
    assert_eq!((&t["assignee"], &t["_erased"]), (&Value::Null, &json!(["/assignee"])));
    let r = c.get(s.url(&format!("{project}/events"))).header("KES-Position", &erased_at).send().await;
    let history = json_of(r.expect("history")).await;
    let created = &history["items"][0]["payload"];
    assert_eq!(created["Created"]["owner"], Value::Null, "{created}");
    assert_eq!(created["_erased"], json!(["/Created/owner"]));
    let last = history["items"].as_array().and_then(|i| i.last()).expect("events");
    assert_eq!(last["type"], "ProjectSubjectErased");
    let found = list(&c, &s, "q=Zelda", &erased_at).await;
    assert!(ids(&found).is_empty(), "search still finds the erased owner: {found}");
    let rows = list(&c, &s, "filter[name]=Lighthouse", &erased_at).await;
    assert_eq!(rows["items"][0]["row"].get("owner"), None, "{rows}");
    let o = json_of(c.get(s.url(&other)).send().await.expect("other")).await;
    assert_eq!(o["owner"], json!(OTHER), "another person's data is intact");

    // A client with the old body cannot bring it back unknowingly; new
    // commands keep working.
    let mut old_body = cached.clone();
    old_body.as_object_mut().expect("an object").retain(|k, _| ["name", "owner", "description"].contains(&k.as_str()));
    let r = c.put(s.url(&project)).header("If-Match", &cached_etag).json(&old_body).send().await.expect("put");
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    let r = c.post(s.url(&format!("{project}/activate"))).send().await.expect("activate");
    assert_eq!(r.status(), StatusCode::OK);

    // The member: erased, then removed by subject id.
    let r = c.delete(s.url(&format!("/subjects/{MEMBER}"))).header("Authorization", &admin).send().await;
    let member_subject = json_of(r.expect("erase")).await["subject"].as_str().expect("subject").to_owned();
    let p = json_of(c.get(s.url(&project)).send().await.expect("get")).await;
    assert_eq!((&p["members"], &p["_erased"]), (&json!([null]), &json!(["/members/0", "/owner"])));
    let r = c.post(s.url(&format!("{project}/remove-member"))).json(&json!({ "member": member_subject })).send().await;
    assert_eq!(r.expect("remove").status(), StatusCode::OK);
    let p = json_of(c.get(s.url(&project)).send().await.expect("get")).await;
    assert_eq!(p["members"], json!([]));

    // Erasing again: by subject id it is known and idempotent; by name,
    // or for someone never seen, there is no such subject.
    let r = c.delete(s.url(&format!("/subjects/{subject}"))).header("Authorization", &admin).send().await;
    let again = json_of(r.expect("erase")).await;
    assert_eq!((&again["already_erased"], &again["aggregates"]), (&json!(true), &json!([])));
    for unknown in [OWNER, "nobody-at-all"] {
        let r = c.delete(s.url(&format!("/subjects/{unknown}"))).header("Authorization", &admin).send().await;
        assert_eq!(r.expect("erase").status(), StatusCode::NOT_FOUND);
    }
    let r = c.patch(s.url(&other)).json(&json!({ "description": "south" })).send().await.expect("patch");
    let settled = position(&r);
    let rows_before = list(&c, &s, "sort=name", &settled).await;
    s.stop();

    // A rebuild shows the same erased rows as the live view.
    service.rebuild();
    let s = service.start().await;
    let rows_after = list(&c, &s, "sort=name", &settled).await;
    assert_eq!(rows_after["items"], rows_before["items"]);
    s.stop();

    for name in [OWNER, MEMBER, OTHER] {
        assert!(!raw.holds(name).await, "{name} is in the raw log");
    }
    let log = std::fs::read_to_string(service.log()).expect("the service log");
    assert!(log.contains("subject erased"), "the log check sees the service's log");
    for name in ["Zelda", "Yorick", "Ottoline"] {
        assert!(!log.contains(name), "{name} is in the service log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgetting_a_person_on_sqlite() {
    let dir = tempfile::tempdir().expect("a dir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("the data folder");
    let store = format!("sqlite://{}/events.db", data.display());
    let view = format!("sqlite://{}/views.db", data.display());
    forget_a_person(&store, &view, RawLog::SqliteFile(&data)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgetting_a_person_on_postgres() {
    let Some(db) = fresh_database().await else { return };
    forget_a_person(&db, &db, RawLog::Postgres(&db)).await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgetting_a_person_on_kafka() {
    let (Some(brokers), Some(db)) = (common::kafka_brokers(), fresh_database().await) else { return };
    let prefix = format!("forget{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let store = format!("kafka://{brokers}?prefix={prefix}");
    forget_a_person(&store, &db, RawLog::Kafka { brokers: &brokers, prefix: &prefix }).await;
}
