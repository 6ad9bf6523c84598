//! A writer process is killed with SIGKILL while appending; reopened, the
//! store holds every append the writer was told succeeded, and no command
//! is half-written.
//!
//! The writer is this test binary run again with `crash_child` selected and
//! the store's URL in the environment.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kes_core::conformance::{Ledger, LedgerEvent};
use kes_core::{Checkpoint, EventStore, ExpectedVersion, Metadata};
use kes_store_sql::SqlStore;

const URL_VAR: &str = "KES_STORE_SQL_CRASH_URL";
const SCHEMA_VAR: &str = "KES_STORE_SQL_CRASH_SCHEMA";
const ACK: &str = "KES-ACK";
const WRITERS: usize = 4;

async fn open(url: &str, schema: Option<&str>) -> SqlStore<Ledger> {
    let mut config = kes_store_sql::SqlStoreConfig::from_url(url);
    if let Some(schema) = schema {
        config = config.schema(schema);
    }
    SqlStore::<Ledger>::open(config).await.expect("open store")
}

/// The writer: four tasks, each appending to its own ledger — an open, then
/// commands of three events — and printing every acknowledged version.
/// Does nothing unless started by a crash test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the writer process of the crash tests; they start it themselves"]
async fn crash_child() {
    let Ok(url) = std::env::var(URL_VAR) else { return };
    let schema = std::env::var(SCHEMA_VAR).ok();
    let store = open(&url, schema.as_deref()).await;
    let tasks: Vec<_> = (0..WRITERS)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                let id = format!("c-{t}");
                let mut version = store.load(&id).await.expect("load").map_or(0, |s| s.version);
                // Bounded so that a forgotten child cannot run forever.
                let deadline = Instant::now() + Duration::from_secs(120);
                while Instant::now() < deadline {
                    let events = if version == 0 {
                        vec![LedgerEvent::Opened]
                    } else {
                        (1..=3).map(|amount| LedgerEvent::Added { amount }).collect()
                    };
                    let done = store
                        .append(&id, ExpectedVersion::Exact(version), events, Metadata::default())
                        .await
                        .expect("append");
                    version = done.version;
                    println!("{ACK} {id} {version}");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("writer task");
    }
}

/// Runs the writer until it has printed `acks` acknowledgements, kills it
/// with SIGKILL, and returns the highest acknowledged version per ledger.
fn run_and_kill(url: &str, schema: Option<&str>, acks: usize) -> BTreeMap<String, u64> {
    let exe = std::env::current_exe().expect("test binary");
    let mut command = Command::new(exe);
    command
        .args(["crash_child", "--exact", "--ignored", "--nocapture"])
        .env(URL_VAR, url)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(schema) = schema {
        command.env(SCHEMA_VAR, schema);
    }
    let mut child = command.spawn().expect("start the writer");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut acked = BTreeMap::new();
    let mut count = 0;
    let record = |line: &str, acked: &mut BTreeMap<String, u64>| {
        let Some(rest) = line.split_once(ACK).map(|(_, r)| r.trim()) else { return false };
        let (id, version) = rest.split_once(' ').expect("ack line");
        let version: u64 = version.trim().parse().expect("acked version");
        let entry = acked.entry(id.to_owned()).or_insert(0);
        *entry = (*entry).max(version);
        true
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while count < acks {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => count += usize::from(record(&line, &mut acked)),
            Err(_) => {
                let _ = child.kill();
                panic!("the writer acknowledged only {count} appends within 60 s");
            }
        }
    }
    child.kill().expect("SIGKILL the writer");
    let status = child.wait().expect("reap the writer");
    assert!(!status.success(), "the writer was killed, not finished");
    // Acknowledgements printed before the kill are still in the pipe.
    reader.join().expect("reader thread");
    for line in rx.try_iter() {
        record(&line, &mut acked);
    }
    acked
}

/// Reopens the store and checks it against what the writer was told.
async fn check_after_crash(store: &SqlStore<Ledger>, acked: &BTreeMap<String, u64>) {
    assert_eq!(acked.len(), WRITERS, "every writer task acknowledged something: {acked:?}");
    let mut total = 0;
    for (id, &acked_version) in acked {
        let history = store.read(id).await.expect("read");
        let versions: Vec<u64> = history.iter().map(|e| e.version).collect();
        let last = versions.len() as u64;
        assert_eq!(versions, (1..=last).collect::<Vec<_>>(), "{id}: versions are not contiguous");
        assert!(last >= acked_version, "{id}: acknowledged version {acked_version} lost, the log ends at {last}");
        assert_eq!((last - 1) % 3, 0, "{id}: a three-event command is half-written (log ends at version {last})");
        let snapshot = store.load(id).await.expect("load").expect("exists");
        assert_eq!(snapshot.version, last, "{id}: the table disagrees with the log");
        assert_eq!(snapshot.state.entries, last - 1, "{id}: the table state disagrees with the log");
        total += last;
    }
    // The log as a subscriber sees it: whole commands only.
    let head = store.head().await.expect("head");
    assert_eq!(head.next_offset(0), total, "positions have gaps or the head is wrong");
    let mut stream = store.subscribe(Checkpoint::start()).await.expect("subscribe");
    let mut checkpoint = Checkpoint::start();
    while !checkpoint.covers_all(&head) {
        let item = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("in time")
            .expect("endless")
            .expect("item");
        let first = item[0].version;
        let expected_len = if first == 1 { 1 } else { 3 };
        assert_eq!(item.len(), expected_len, "a command arrived split: {item:?}");
        for e in item {
            checkpoint.advance(e.position);
        }
    }
}

async fn crash_rounds(url: &str, schema: Option<&str>) {
    // Each round kills the writer at a different point and the next one
    // continues on the reopened store.
    for acks in [40, 75, 120] {
        let acked = run_and_kill(url, schema, acks);
        let store = open(url, schema).await;
        check_after_crash(&store, &acked).await;
        store.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_survives_sigkill_of_a_writer() {
    let dir = tempfile::tempdir().expect("temp dir");
    crash_rounds(&common::sqlite_url(&dir), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_survives_sigkill_of_a_writer() {
    if !common::postgres_available().await {
        return;
    }
    let schema = common::fresh_schema();
    crash_rounds(&common::database_url(), Some(&schema)).await;
}
