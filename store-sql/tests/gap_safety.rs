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
use sqlx::{Executor, PgConnection};
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

/// Polls `probe` (every 20 ms, on `conn`) until it gives `Some`, failing
/// with `what` after [`WAIT`].
async fn poll_until<T>(
    conn: &mut PgConnection,
    what: &str,
    mut probe: impl AsyncFnMut(&mut PgConnection) -> Option<T>,
) -> T {
    let started = tokio::time::Instant::now();
    loop {
        if let Some(found) = probe(conn).await {
            return found;
        }
        assert!(started.elapsed() < WAIT, "{what} within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sessions that `pid` holds up (PostgreSQL's own lock bookkeeping).
async fn blocked_by(conn: &mut PgConnection, pid: i32) -> Vec<i32> {
    sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))")
        .bind(pid)
        .fetch_all(conn)
        .await
        .expect("pg_blocking_pids")
}

/// How many events of aggregates named `fast-…` are committed.
async fn fast_events_committed(conn: &mut PgConnection) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM kes_events WHERE aggregate_id LIKE 'fast-%'")
        .fetch_one(conn)
        .await
        .expect("count the committed events")
}

/// Appends from other stores on the same database (other processes).
const OTHER_STORES: usize = 4;
/// Appends through the store holding the stalled one.
const SAME_STORE: usize = 4;

/// One append is stalled after it has inserted its event: its table-row
/// update waits on a row lock held by a session of the test, its position
/// drawn, its transaction open. Appends of other stores (other processes)
/// are then seen waiting in the database for the log while the stalled one
/// holds it, and more queue in the stalled store, and nothing past the
/// stalled position is committed or delivered. Once the row is released,
/// the stalled event keeps the earlier position and every event reaches
/// the subscriber, in position order, none skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_append_held_open_is_not_skipped() {
    let schema = common::fresh_schema();
    let Some(store) = common::postgres_in::<Ledger>(&schema).await else { return };
    let mut others = Vec::new();
    for _ in 0..OTHER_STORES {
        others.push(common::postgres_in::<Ledger>(&schema).await.expect("another store on the same schema"));
    }
    let (mut seen, _follower) = follow(&store);
    store.append("slow", ExpectedVersion::NoStream, vec![LedgerEvent::Opened], meta()).await.expect("open slow");
    assert_eq!(receive(&mut seen, 1).await[0].position.offset, 0);

    let mut blocker = common::postgres_connection(&schema).await;
    let blocker_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut blocker).await.expect("pid");
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
    // The slow append has inserted its event and waits for the table row:
    // its position is drawn, its transaction (and the log) held.
    let mut watcher = common::postgres_connection(&schema).await;
    let slow_pid = poll_until(&mut watcher, "the slow append reached its table-row update", async |c| {
        blocked_by(c, blocker_pid).await.first().copied()
    })
    .await;

    let fast: Vec<_> = others
        .iter()
        .cloned()
        .chain(std::iter::repeat_n(store.clone(), SAME_STORE))
        .enumerate()
        .map(|(i, store)| {
            tokio::spawn(async move {
                store.append(&format!("fast-{i}"), ExpectedVersion::NoStream, vec![LedgerEvent::Opened], meta()).await
            })
        })
        .collect();
    // Every other store's append has gone as far as it can: into the
    // database, waiting for the log the slow one holds (or committed, which
    // the store must not let happen).
    let committed = poll_until(&mut watcher, "the other stores' appends reached the database", async |c| {
        let waiting = blocked_by(c, slow_pid).await.len();
        let committed = fast_events_committed(c).await;
        (waiting + usize::try_from(committed).unwrap_or(0) >= OTHER_STORES).then_some(committed)
    })
    .await;
    assert_eq!(committed, 0, "an append committed past the open transaction");
    let visible: i64 =
        sqlx::query_scalar("SELECT count(*) FROM kes_events").fetch_one(&mut watcher).await.expect("count");
    assert_eq!(visible, 1, "the log shows an event past the open transaction");
    assert!(
        matches!(seen.try_recv(), Err(mpsc::error::TryRecvError::Empty)),
        "an event was delivered past the open transaction"
    );

    blocker.execute("ROLLBACK").await.expect("release the row");
    let slow = slow.await.expect("task").expect("slow append");
    assert_eq!(slow.position.offset, 1, "the stalled append keeps the position it drew first");
    let mut positions = vec![slow.position.offset];
    for f in fast {
        positions.push(f.await.expect("task").expect("fast append").position.offset);
    }
    positions.sort_unstable();
    let last = (OTHER_STORES + SAME_STORE + 1) as u64;
    assert_eq!(positions, (1..=last).collect::<Vec<u64>>());

    let events = receive(&mut seen, positions.len()).await;
    assert_eq!(events[0].aggregate_id, "slow");
    assert_eq!(events.iter().map(|e| e.position.offset).collect::<Vec<_>>(), (1..=last).collect::<Vec<u64>>());
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
