//! A subscriber never skips an event that commits after a later-numbered
//! one would have: on PostgreSQL, one append is held open mid-transaction
//! while others try to commit past it; on both dialects, 16 writers race
//! while a subscriber tails the log.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use kes_core::conformance::{Ledger, LedgerEvent};
use kes_core::{Checkpoint, Envelope, EventStore, ExpectedVersion, Metadata};
use sqlx::Executor;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(30);

/// Tails `store` from the start and forwards every event, checking on the
/// way that positions arrive contiguous (0, 1, 2…): a gap means an event
/// was skipped or will arrive out of order.
fn follow<S: EventStore<Ledger> + Clone>(
    store: &S,
) -> (mpsc::UnboundedReceiver<Envelope<LedgerEvent>>, impl Send + 'static) {
    let (tx, rx) = mpsc::unbounded_channel();
    let store = store.clone();
    let task = tokio::spawn(async move {
        let mut stream = store.subscribe(Checkpoint::start()).await.expect("subscribe");
        let mut expected_next = 0;
        while let Some(item) = stream.next().await {
            let item = item.expect("subscription item");
            for e in item {
                assert_eq!(
                    e.position.offset, expected_next,
                    "the subscriber saw position {} while {} was still missing",
                    e.position.offset, expected_next
                );
                expected_next += 1;
                if tx.send(e).is_err() {
                    return;
                }
            }
        }
    });
    (rx, AbortOnDrop(task))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn receive(rx: &mut mpsc::UnboundedReceiver<Envelope<LedgerEvent>>, n: usize) -> Vec<Envelope<LedgerEvent>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(e)) => out.push(e),
            Ok(None) => panic!("the subscriber stopped after {} of {n} events", out.len()),
            Err(_) => panic!("the subscriber delivered {} of {n} events within {WAIT:?}", out.len()),
        }
    }
    out
}

fn meta() -> Metadata {
    Metadata::default()
}

/// One append is stalled after it has inserted its event (its table-row
/// update waits on a row lock held by another session) while eight more
/// appends are started. The stalled event must take the earlier position
/// and every event must reach the subscriber, in position order, none
/// skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_append_held_open_is_not_skipped() {
    let schema = common::fresh_schema();
    let Some(store) = common::postgres_in::<Ledger>(&schema).await else { return };
    let (mut seen, _follower) = follow(&store);
    store.append("slow", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], meta()).await.expect("open slow");
    assert_eq!(receive(&mut seen, 1).await[0].position.offset, 0);

    let mut blocker = common::postgres_connection(&schema).await;
    blocker.execute("BEGIN").await.expect("begin");
    sqlx::query("SELECT version FROM kes_aggregates WHERE aggregate_id = 'slow' FOR UPDATE")
        .fetch_one(&mut blocker)
        .await
        .expect("lock the table row of slow");

    let slow = {
        let store = store.clone();
        tokio::spawn(async move {
            store.append("slow", ExpectedVersion::Exact(1), vec![LedgerEvent::Added { amount: 1 }], meta()).await
        })
    };
    // Wait until the slow append has inserted its event and is stuck on the
    // table row: its position is drawn, its transaction open.
    let mut watcher = common::postgres_connection(&schema).await;
    let started = tokio::time::Instant::now();
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND query LIKE '%INSERT INTO kes_aggregates%'",
        )
        .fetch_one(&mut watcher)
        .await
        .expect("pg_stat_activity");
        if waiting > 0 {
            break;
        }
        assert!(started.elapsed() < WAIT, "the slow append never reached its table-row update");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let fast: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store.append(&format!("fast-{i}"), ExpectedVersion::NoStream, vec![LedgerEvent::Opened], meta()).await
            })
        })
        .collect();
    // Give the fast writers and the subscriber (polling every 50 ms) ample
    // time to overtake the stalled append if they could.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(100), seen.recv()).await.is_err(),
        "an event became visible past the open transaction"
    );

    blocker.execute("ROLLBACK").await.expect("release the row");
    let slow = slow.await.expect("task").expect("slow append");
    assert_eq!(slow.position.offset, 1, "the stalled append keeps the position it drew first");
    let mut positions = vec![slow.position.offset];
    for f in fast {
        positions.push(f.await.expect("task").expect("fast append").position.offset);
    }
    positions.sort_unstable();
    assert_eq!(positions, (1..=9).collect::<Vec<u64>>());

    let events = receive(&mut seen, 9).await;
    assert_eq!(events[0].aggregate_id, "slow");
    assert_eq!(events.iter().map(|e| e.position.offset).collect::<Vec<_>>(), (1..=9).collect::<Vec<u64>>());
}

/// 16 writers append 1–3 events per command to 8 aggregates while a
/// subscriber tails the log: it receives every event exactly once, with
/// contiguous positions and per-aggregate versions.
async fn racing_writers_never_outrun_the_subscriber<S: EventStore<Ledger> + Clone>(store: S) {
    let (mut seen, _follower) = follow(&store);
    let writers: Vec<_> = (0..16u64)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut events = 0;
                for i in 0..25u64 {
                    let id = format!("agg-{}", (w + i) % 8);
                    let batch = (w + i) % 3 + 1;
                    let payload = (0..batch).map(|n| LedgerEvent::Added { amount: n as i64 }).collect();
                    store.append(&id, ExpectedVersion::Any, payload, meta()).await.expect("append");
                    events += batch as usize;
                }
                events
            })
        })
        .collect();
    let mut total = 0;
    for w in writers {
        total += w.await.expect("writer");
    }
    let events = receive(&mut seen, total).await;
    let ids: HashSet<_> = events.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), total, "an event arrived twice");
    let mut versions: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for e in &events {
        versions.entry(&e.aggregate_id).or_default().push(e.version);
    }
    for (id, v) in versions {
        assert_eq!(v, (1..=v.len() as u64).collect::<Vec<_>>(), "versions of {id} arrived out of order");
    }
    let head = store.head().await.expect("head");
    assert_eq!(head.next_offset(0), total as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_racing_writers_never_outrun_the_subscriber() {
    let Some(store) = common::postgres::<Ledger>().await else { return };
    racing_writers_never_outrun_the_subscriber(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_racing_writers_never_outrun_the_subscriber() {
    racing_writers_never_outrun_the_subscriber(common::sqlite::<Ledger>().await).await;
}
