//! Views shared between processes (CQRS roles): read-only opens beside the
//! writing process, and the directory's writer lock as the lease between
//! writer-capable opens — within one process (two views of one directory)
//! and across processes (a writer killed with SIGKILL).
//!
//! Waits poll a condition against a deadline; they never sleep in place of
//! a condition.
//!
//! The last test runs itself a second time as a child process (selected by
//! the `KES_SEARCH_LEASE_CHILD_DIR` variable) that takes the writer and
//! holds it until the parent kills it.

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{copies, respawn};
use kes_core::{
    Checkpoint, Field, Lease, ListQuery, ListView, Position, Row, RowChange, ViewCopy, ViewError, ViewSchema, ViewStore,
};
use kes_view_search::SearchView;

const CHILD_ENV: &str = "KES_SEARCH_LEASE_CHILD_DIR";
const TTL: Duration = Duration::from_secs(5);

fn schema() -> ViewSchema {
    ViewSchema::new("things", 1)
        .field(Field::text("name").filterable().sortable().searchable())
        .field(Field::integer("n").filterable().sortable())
}

fn change(id: &str, version: u64, name: &str) -> RowChange {
    let mut row = Row::new();
    row.insert("name".into(), name.into());
    row.insert("n".into(), (version as i64).into());
    RowChange {
        id: id.into(),
        version,
        state: kes_core::RowChange::state_of(&serde_json::json!({ "name": name })).expect("state JSON"),
        row: Some(row),
    }
}

/// The checkpoint after the record at `offset` (partition 0).
fn at(offset: u64) -> Checkpoint {
    let mut c = Checkpoint::start();
    c.advance(Position::new(0, offset));
    c
}

/// `(id, name)` of every listed row, by id.
async fn rows(view: &dyn ListView) -> Vec<(String, String)> {
    let mut all = Vec::new();
    let mut query = ListQuery::new().sort_by("id").page_size(100);
    loop {
        let page = view.list(&query).await.expect("list");
        all.extend(
            page.items.into_iter().map(|i| (i.id, i.row["name"].to_json().as_str().unwrap_or_default().to_owned())),
        );
        match page.next {
            Some(next) => query.after = Some(next),
            None => return all,
        }
    }
}

async fn names(view: &dyn ListView) -> Vec<String> {
    rows(view).await.into_iter().map(|(_, name)| name).collect()
}

/// Polls `condition` until it holds; fails the test after `within`.
async fn eventually<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One read of `view`: its position, then a list. Every offset the
/// position covers was one committed row (`r{offset}`), so the list must
/// hold at least that many: the position never runs ahead of the rows.
/// Returns the offsets covered.
async fn consistent_read(view: &SearchView) -> Result<u64, String> {
    let position = view.position().await.map_err(|e| format!("position: {e}"))?;
    let covered = position.next_offset(0);
    let page = view
        .list(&ListQuery::new().filter("name", kes_core::FilterOp::Prefix, "row ").page_size(1))
        .await
        .map_err(|e| format!("list: {e}"))?;
    if page.total < covered {
        return Err(format!("position covers {covered} rows, the list shows {}", page.total));
    }
    Ok(covered)
}

/// The row committed at `offset` in the tests that check positions.
fn numbered(offset: u64) -> RowChange {
    change(&format!("r{offset:04}"), 1, &format!("row {offset}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_view_sees_what_the_writer_commits_and_never_runs_ahead() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("things");
    // Opened before the writer ever ran: empty, at the start, and nothing
    // created on disk.
    let early = SearchView::open_read_only(&dir, schema()).expect("read-only open of a view not created yet");
    assert!(early.is_read_only() && !early.holds_writer());
    assert!(rows(&early).await.is_empty());
    assert_eq!(early.position().await.expect("position"), Checkpoint::start());
    assert!(!dir.exists(), "a read-only open creates nothing");

    let writer = Arc::new(SearchView::open(&dir, schema()).expect("open"));
    assert!(writer.holds_writer());
    let reader = SearchView::open_read_only(&dir, schema()).expect("read-only open");
    assert_eq!(reader.position().await.expect("position"), Checkpoint::start());

    const WRITES: u64 = 200;
    let writing = {
        let writer = Arc::clone(&writer);
        tokio::spawn(async move {
            for offset in 0..WRITES {
                writer.write(ViewCopy::Live, &[numbered(offset)], &at(offset)).await.expect("write");
            }
        })
    };
    // Both readers catch up with every commit, and no read ever shows a
    // position ahead of its rows.
    let seen = std::cell::Cell::new((0, 0));
    eventually("the read-only views caught up", Duration::from_secs(120), || {
        let (early, reader, seen) = (&early, &reader, &seen);
        async move {
            let a = consistent_read(early).await.unwrap_or_else(|e| panic!("early reader: {e}"));
            let b = consistent_read(reader).await.unwrap_or_else(|e| panic!("reader: {e}"));
            let (was_a, was_b) = seen.get();
            assert!(a >= was_a && b >= was_b, "a position moved back");
            seen.set((a, b));
            a == WRITES && b == WRITES
        }
    })
    .await;
    writing.await.expect("writer task");
    let want = rows(writer.as_ref()).await;
    assert_eq!(want.len() as u64, WRITES);
    assert_eq!(rows(&reader).await, want);
    assert_eq!(rows(&early).await, want);
    assert_eq!(reader.progress(ViewCopy::Live).await.expect("progress").expect("stored").checkpoint, at(WRITES - 1));
    let states = reader.states(ViewCopy::Live, &["r0007".to_owned()]).await.expect("states");
    assert_eq!(states["r0007"].state, serde_json::json!({ "name": "row 7" }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_view_follows_the_writers_rebuild_and_swap() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("things");
    let writer = SearchView::open(&dir, schema()).expect("open");
    writer.write(ViewCopy::Live, &[change("a", 1, "old a"), change("b", 1, "old b")], &at(1)).await.expect("write");
    let reader = SearchView::open_read_only(&dir, schema()).expect("read-only open");
    assert_eq!(names(&reader).await, ["old a", "old b"]);
    assert_eq!(reader.position().await.expect("position"), at(1));
    let first = reader.live_index_dir().expect("a live copy");

    for round in 1..=2u64 {
        let offset = 10 * round;
        writer.begin_rebuild().await.expect("begin");
        let rebuilt: Vec<RowChange> =
            ["a", "b", "c"].iter().map(|id| change(id, round + 1, &format!("{id} of rebuild {round}"))).collect();
        writer.write(ViewCopy::Shadow, &rebuilt, &at(offset)).await.expect("write shadow");
        // The shadow answers nothing until the swap.
        let live_before = if round == 1 { at(1) } else { at(offset - 9) };
        assert_eq!(reader.position().await.expect("position"), live_before);
        writer.swap().await.expect("swap");
        eventually("the reader follows the swap", Duration::from_secs(30), || async {
            reader.position().await.expect("position") == at(offset)
        })
        .await;
        assert_eq!(
            names(&reader).await,
            rebuilt.iter().map(|c| format!("{} of rebuild {round}", c.id)).collect::<Vec<_>>()
        );
        assert_eq!(reader.live_index_dir(), writer.live_index_dir(), "the reader reads the new live copy");
        assert_eq!(copies(&dir).len(), 1, "the old copy was deleted");
        // The writer goes on writing the new copy; the reader sees it.
        writer
            .write(ViewCopy::Live, &[change("d", round, &format!("d {round}"))], &at(offset + 1))
            .await
            .expect("write");
        eventually("the reader sees a write to the new copy", Duration::from_secs(30), || async {
            reader.position().await.expect("position") == at(offset + 1)
        })
        .await;
        assert!(names(&reader).await.contains(&format!("d {round}")));
    }
    assert_ne!(reader.live_index_dir(), Some(first));
}

/// The segment files of a copy (not `meta.json`, `.managed.json` or locks).
fn segment_files(copy: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(copy)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    !name.starts_with('.') && name != "meta.json"
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_view_keeps_answering_while_the_writer_merges_collects_and_swaps() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("things");
    let writer = SearchView::open(&dir, schema()).expect("open");
    let reader = Arc::new(SearchView::open_read_only(&dir, schema()).expect("read-only open"));

    // A reader that never stops querying while the writer works.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let querying = {
        let (reader, stop, reads) = (Arc::clone(&reader), Arc::clone(&stop), Arc::clone(&reads));
        tokio::spawn(async move {
            let mut errors = Vec::new();
            let mut last = 0;
            while !stop.load(Ordering::SeqCst) {
                match consistent_read(&reader).await {
                    Ok(covered) if covered < last => errors.push(format!("position moved back to {covered}")),
                    Ok(covered) => last = covered,
                    Err(e) => errors.push(e),
                }
                let search = reader.list(&ListQuery::new().search("row").page_size(5)).await;
                if let Err(e) = search {
                    errors.push(format!("search: {e}"));
                }
                reads.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
            }
            errors
        })
    };

    // Many small commits, each adding a row and replacing a "hot" one:
    // segments pile up and merge, and deletes rewrite delete files; the
    // writer collects the files no commit needs any more.
    let mut offset = 0;
    let mut all: Vec<RowChange> = Vec::new();
    let commit = |offset: u64| vec![numbered(offset), change("hot", offset + 1, &format!("hot {offset}"))];
    for _ in 0..3 {
        let batch = commit(offset);
        writer.write(ViewCopy::Live, &batch, &at(offset)).await.expect("write");
        all.extend(batch);
        offset += 1;
    }
    let live = writer.live_index_dir().expect("live copy");
    let early_files = segment_files(&live);
    assert!(!early_files.is_empty());
    eventually("the reader loaded the first commits", Duration::from_secs(30), || async {
        reader.position().await.expect("position") == at(offset - 1)
    })
    .await;
    for _ in 0..60 {
        let batch = commit(offset);
        writer.write(ViewCopy::Live, &batch, &at(offset)).await.expect("write");
        all.extend(batch);
        offset += 1;
    }
    eventually("the writer collected files the reader had loaded", Duration::from_secs(60), || async {
        early_files.iter().any(|f| !f.exists())
    })
    .await;

    // Rebuilds swapped in while the reader queries: each deletes the copy
    // the reader was reading.
    for _ in 0..3 {
        writer.begin_rebuild().await.expect("begin");
        let mut latest: std::collections::BTreeMap<String, RowChange> = std::collections::BTreeMap::new();
        for c in &all {
            latest.insert(c.id.clone(), c.clone());
        }
        let rebuilt: Vec<RowChange> = latest.into_values().collect();
        writer.write(ViewCopy::Shadow, &rebuilt, &at(offset - 1)).await.expect("write shadow");
        let old = writer.live_index_dir().expect("live copy");
        writer.swap().await.expect("swap");
        assert!(!old.exists(), "the swap deleted the old copy");
        for _ in 0..5 {
            let batch = commit(offset);
            writer.write(ViewCopy::Live, &batch, &at(offset)).await.expect("write");
            all.extend(batch);
            offset += 1;
        }
    }
    eventually("the reader caught up after the swaps", Duration::from_secs(60), || async {
        reader.position().await.expect("position") == at(offset - 1)
    })
    .await;
    let before = reads.load(Ordering::SeqCst);
    eventually("the reader queried after the last swap", Duration::from_secs(60), || async {
        reads.load(Ordering::SeqCst) > before + 3
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let errors = querying.await.expect("reader task");
    assert!(errors.is_empty(), "reads failed while the writer worked: {errors:?}");
    assert_eq!(rows(reader.as_ref()).await, rows(&writer).await);
    assert_eq!(rows(reader.as_ref()).await.len() as u64, offset + 1, "every row and the hot one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_searcher_keeps_answering_when_its_files_are_deleted() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("things");
    let writer = SearchView::open(&dir, schema()).expect("open");
    let changes = [change("a", 1, "alpha"), change("b", 1, "bravo"), change("c", 1, "charlie")];
    writer.write(ViewCopy::Live, &changes, &at(2)).await.expect("write");
    drop(writer);
    let reader = SearchView::open_read_only(&dir, schema()).expect("read-only open");
    let want = rows(&reader).await;
    assert_eq!(want.len(), 3);
    // The copy the reader holds disappears under it (as after a swap it
    // has not followed yet), CURRENT still naming it: reloads fail, are
    // retried, and the reader answers from the segments it has open.
    let live = reader.live_index_dir().expect("live copy");
    std::fs::remove_dir_all(&live).expect("delete the live copy");
    assert_eq!(rows(&reader).await, want);
    let found = reader.list(&ListQuery::new().search("bravo")).await.expect("search");
    assert_eq!(found.items.len(), 1);
    assert_eq!(reader.position().await.expect("position"), at(2));
    let states = reader.states(ViewCopy::Live, &["c".to_owned()]).await.expect("states");
    assert_eq!(states["c"].version, 1);
    // A pointer to nothing is an error for a new open, not a panic.
    assert!(SearchView::open_read_only(&dir, schema()).is_err());
    std::fs::write(dir.join("CURRENT"), "not a copy").expect("garble CURRENT");
    assert_eq!(rows(&reader).await, want, "a garbled pointer leaves the reader as it was");
    assert!(matches!(
        SearchView::open_read_only(&dir, schema()).map_err(ViewError::from),
        Err(ViewError::Corrupt { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_a_read_only_view_are_refused_and_change_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("things");
    let writer = SearchView::open(&dir, schema()).expect("open");
    writer.write(ViewCopy::Live, &[change("a", 1, "alpha")], &at(0)).await.expect("write");
    let reader = SearchView::open_read_only(&dir, schema()).expect("read-only open");
    let before = (copies(&dir), segment_files(&writer.live_index_dir().expect("live")));

    fn read_only(result: Result<(), ViewError>, what: &str) {
        match result {
            Err(ViewError::Backend(message)) => assert!(message.contains("read-only"), "{what}: {message}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    let lease = Lease { owner: "me".into(), fence: 1 };
    let sneaky = [change("b", 1, "sneaky")];
    read_only(reader.write(ViewCopy::Live, &sneaky, &at(1)).await, "write");
    read_only(reader.write(ViewCopy::Shadow, &sneaky, &at(1)).await, "write to a shadow");
    read_only(reader.write_fenced(ViewCopy::Live, &sneaky, &at(1), &lease).await, "fenced write");
    read_only(reader.begin_rebuild().await, "begin a rebuild");
    read_only(reader.begin_rebuild_fenced(&lease).await, "begin a fenced rebuild");
    read_only(reader.swap().await, "swap");
    read_only(reader.swap_fenced(&lease).await, "fenced swap");
    assert_eq!(reader.acquire_lease("me", TTL).await.expect("acquire"), None, "a read-only view never leads");
    assert!(!reader.renew_lease(&lease, TTL).await.expect("renew"));
    reader.release_lease(&lease).await.expect("release");

    assert_eq!(
        (copies(&dir), segment_files(&writer.live_index_dir().expect("live"))),
        before,
        "nothing on disk changed"
    );
    assert_eq!(names(&writer).await, ["alpha"]);
    assert_eq!(names(&reader).await, ["alpha"]);
    assert_eq!(reader.position().await.expect("position"), at(0));
    assert!(writer.holds_writer(), "the writer kept its lock");
    writer.write(ViewCopy::Live, &[change("b", 1, "bravo")], &at(1)).await.expect("the writer still writes");
}

fn fenced<T: std::fmt::Debug>(result: Result<T, ViewError>, what: &str) {
    assert!(matches!(result, Err(ViewError::Fenced(_))), "{what}: {result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writer_opens_share_one_lease_through_the_lock() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("things");
    let first = SearchView::open(&dir, schema()).expect("open");
    let second = SearchView::open(&dir, schema()).expect("a second open stands by instead of failing");
    assert!(first.holds_writer() && !second.holds_writer() && !second.is_read_only());

    let a = first.acquire_lease("a", TTL).await.expect("acquire").expect("the holder of the lock leads");
    assert_eq!(second.acquire_lease("b", TTL).await.expect("acquire"), None, "the lock is taken");
    first.write_fenced(ViewCopy::Live, &[change("x", 1, "by a")], &at(0), &a).await.expect("fenced write");
    eventually("the standby sees the leader's write", Duration::from_secs(30), || async {
        second.position().await.expect("position") == at(0)
    })
    .await;
    assert_eq!(names(&second).await, ["by a"]);

    // The standby writes nothing, whatever it claims.
    let claimed = Lease { owner: "b".into(), fence: a.fence };
    let sneaky = [change("y", 1, "by b")];
    fenced(second.write(ViewCopy::Live, &sneaky, &at(1)).await, "standby write");
    fenced(second.write_fenced(ViewCopy::Live, &sneaky, &at(1), &claimed).await, "standby fenced write");
    fenced(second.write_fenced(ViewCopy::Live, &sneaky, &at(1), &a).await, "standby write with the leader's lease");
    fenced(
        second.write_fenced_owned(ViewCopy::Live, sneaky.to_vec(), &at(1), &a).await,
        "standby write of owned changes with the leader's lease",
    );
    fenced(second.begin_rebuild().await, "standby rebuild");
    fenced(second.begin_rebuild_fenced(&claimed).await, "standby fenced rebuild");
    fenced(second.swap_fenced(&claimed).await, "standby swap");
    assert!(!second.renew_lease(&claimed, TTL).await.expect("renew"));
    assert_eq!(copies(&dir).len(), 1, "the standby created no copy");
    assert_eq!(names(&first).await, ["by a"]);
    assert_eq!(first.position().await.expect("position"), at(0));

    // Within one view, one owner at a time: another gets the lease only
    // once it expired, with a higher fence; the old holder is fenced.
    assert!(first.renew_lease(&a, TTL).await.expect("renew"));
    assert_eq!(first.acquire_lease("c", TTL).await.expect("acquire"), None, "a is still current");
    assert!(first.renew_lease(&a, Duration::ZERO).await.expect("renew to expire at once"));
    let c = first.acquire_lease("c", TTL).await.expect("acquire").expect("an expired lease is taken over");
    assert!(c.fence > a.fence);
    fenced(first.write_fenced(ViewCopy::Live, &sneaky, &at(1), &a).await, "write with a lease taken over");
    fenced(
        first.write_fenced_owned(ViewCopy::Live, sneaky.to_vec(), &at(1), &a).await,
        "write of owned changes with a lease taken over",
    );
    assert!(!first.renew_lease(&a, TTL).await.expect("renew"));
    first.release_lease(&a).await.expect("releasing a lease taken over does nothing");
    assert!(first.holds_writer());

    // Released: the lock goes, the standby takes over where the leader
    // stopped, and the old leader stands by.
    first.release_lease(&c).await.expect("release");
    assert!(!first.holds_writer());
    fenced(first.write_fenced(ViewCopy::Live, &sneaky, &at(1), &c).await, "write after the release");
    let b = second.acquire_lease("b", TTL).await.expect("acquire").expect("the released lock is free");
    assert!(second.holds_writer());
    assert_eq!(second.progress(ViewCopy::Live).await.expect("progress").expect("stored").checkpoint, at(0));
    assert_eq!(first.acquire_lease("a", TTL).await.expect("acquire"), None);
    second.write_fenced(ViewCopy::Live, &[change("y", 1, "by b")], &at(1), &b).await.expect("the new leader writes");
    // A fenced swap never moves the view back to a copy behind the live one.
    second.begin_rebuild_fenced(&b).await.expect("begin");
    second.write_fenced(ViewCopy::Shadow, &[change("x", 2, "behind")], &at(0), &b).await.expect("write shadow");
    fenced(second.swap_fenced(&b).await, "a swap to a copy behind the live one");
    assert_eq!(names(&second).await, ["by a", "by b"]);
    // A rebuild by the new leader works, fenced.
    second.begin_rebuild_fenced(&b).await.expect("begin");
    second
        .write_fenced(ViewCopy::Shadow, &[change("x", 2, "x again"), change("y", 1, "by b")], &at(1), &b)
        .await
        .expect("write shadow");
    second.prepare_swap().await.expect("prepare");
    second.swap_fenced(&b).await.expect("swap");
    eventually("the old leader follows as a reader", Duration::from_secs(30), || async {
        names(&first).await == ["x again", "by b"]
    })
    .await;

    // A view dropped lets go of the lock too.
    drop(second);
    let a2 = first.acquire_lease("a", TTL).await.expect("acquire").expect("the dropped view's lock is free");
    assert_eq!(first.progress(ViewCopy::Live).await.expect("progress").expect("stored").checkpoint, at(1));
    first.write_fenced(ViewCopy::Live, &[change("z", 1, "by a again")], &at(2), &a2).await.expect("write");
    assert_eq!(names(&first).await, ["x again", "by b", "by a again"]);
    // A fenced write never moves the checkpoint back, nor writes into a
    // copy built with another schema version.
    fenced(first.write_fenced(ViewCopy::Live, &sneaky, &at(1), &a2).await, "a checkpoint moving back");
    drop(first);
    let newer = SearchView::open(&dir, ViewSchema { version: 2, ..schema() }).expect("open with version 2");
    let v2 = newer.acquire_lease("v2", TTL).await.expect("acquire").expect("free");
    fenced(newer.write_fenced(ViewCopy::Live, &sneaky, &at(3), &v2).await, "a copy built with version 1");
    assert_eq!(names(&newer).await, ["x again", "by b", "by a again"]);
}

/// A minimal aggregate for the runner test: a thing with a name.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct Thing {
    name: String,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Named(String);

impl kes_core::DomainEvent for Named {
    fn event_type(&self) -> &'static str {
        "Named"
    }
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl kes_core::Aggregate for Thing {
    const NAME: &'static str = "thing";
    type Command = Named;
    type Event = Named;
    type Error = Never;
    fn handle(&self, command: Named) -> Result<Vec<Named>, Never> {
        Ok(vec![command])
    }
    fn apply(&mut self, event: &Named) {
        self.name = event.0.clone();
    }
}

fn thing_runner(
    store: kes_core::InMemoryStore<Thing>,
    view: Arc<SearchView>,
) -> Arc<kes_core::ProjectionRunner<Thing, kes_core::InMemoryStore<Thing>>> {
    let projection: Arc<dyn kes_core::Projection<Named>> =
        Arc::new(kes_core::ViewProjection::<Thing>::new(view, |thing: &Thing| {
            let mut row = Row::new();
            row.insert("name".into(), thing.name.clone().into());
            row
        }));
    let config = kes_core::RunnerConfig {
        batch_size: 4,
        retry_delay: Duration::from_millis(20),
        lease_renew: Duration::from_millis(20),
        ..kes_core::RunnerConfig::default()
    };
    kes_core::ProjectionRunner::new(store, vec![projection], config)
}

async fn append_things(store: &kes_core::InMemoryStore<Thing>, from: usize, to: usize) -> Position {
    use kes_core::EventStore;
    for n in from..to {
        let named = Named(format!("thing {n}"));
        store
            .append(&format!("t{n:03}"), kes_core::ExpectedVersion::Any, vec![named], kes_core::Metadata::default())
            .await
            .expect("append");
    }
    let head = store.head().await.expect("head");
    Position::new(0, head.next_offset(0) - 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_runner_takes_over_when_the_leader_releases_the_lock() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("things");
    let store = kes_core::InMemoryStore::<Thing>::new();
    let first = Arc::new(SearchView::open(&dir, schema()).expect("open"));
    let second = Arc::new(SearchView::open(&dir, schema()).expect("open beside"));
    let leader = thing_runner(store.clone(), Arc::clone(&first));
    let standby = thing_runner(store.clone(), Arc::clone(&second));
    leader.start().await.expect("start the leader");
    standby.start().await.expect("start the standby");
    assert!(leader.leads("things") && !standby.leads("things"));

    let last = append_things(&store, 0, 10).await;
    eventually("the standby's view shows the leader's projection", Duration::from_secs(60), || async {
        second.position().await.expect("position").covers(last)
    })
    .await;
    assert_eq!(rows(second.as_ref()).await.len(), 10);
    assert!(!standby.leads("things"), "the standby never wrote");

    // A planned shutdown releases the lock; the standby, polling, takes
    // over and goes on from the stored checkpoint.
    leader.shutdown().await;
    assert!(!first.holds_writer());
    eventually("the standby leads", Duration::from_secs(60), || async { standby.leads("things") }).await;
    assert!(second.holds_writer());
    let last = append_things(&store, 10, 15).await;
    eventually("the old leader's view follows the new leader", Duration::from_secs(60), || async {
        first.position().await.expect("position").covers(last)
    })
    .await;
    let all = rows(first.as_ref()).await;
    assert_eq!(all.len(), 15);
    assert_eq!(all.last().map(|(_, name)| name.as_str()), Some("thing 14"));
    standby.shutdown().await;
}

/// Child: takes the writer and the lease, writes one row, says "ready",
/// and holds on until killed.
async fn child(dir: &str) -> ! {
    let view = SearchView::open(dir, schema()).expect("child open");
    let lease = view.acquire_lease("child", TTL).await.expect("acquire").expect("the child leads");
    view.write_fenced(ViewCopy::Live, &[change("c", 1, "by the child")], &at(0), &lease).await.expect("write");
    let mut out = std::io::stdout();
    writeln!(out, "ready").expect("stdout");
    out.flush().expect("stdout");
    let never: std::convert::Infallible = std::future::pending().await;
    match never {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_of_a_killed_writer_process_is_taken_over() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(&dir).await;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("things");
    let mut child = respawn("the_lock_of_a_killed_writer_process_is_taken_over", CHILD_ENV, &dir);
    let stdout = child.stdout.take().expect("stdout");
    let (ready, is_ready) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // The harness prints "test … … " before it on the same line.
            if line.trim_end().ends_with("ready") {
                let _ = ready.send(());
            }
        }
    });
    if is_ready.recv_timeout(Duration::from_secs(120)).is_err() {
        let _ = child.kill();
        panic!("the child did not take the writer within 120 s");
    }

    // The child process leads; this one stands by and reads its writes.
    let standby = SearchView::open(&dir, schema()).expect("open beside the child");
    let reader = SearchView::open_read_only(&dir, schema()).expect("read-only open");
    assert!(!standby.holds_writer());
    assert_eq!(standby.acquire_lease("parent", TTL).await.expect("acquire"), None, "the child holds the lock");
    assert_eq!(names(&standby).await, ["by the child"]);
    assert_eq!(names(&reader).await, ["by the child"]);
    fenced(standby.write(ViewCopy::Live, &[change("p", 1, "too early")], &at(1)).await, "write beside the child");

    // SIGKILL: no cleanup runs in the child; the OS drops its locks.
    child.kill().expect("kill the child");
    let status = child.wait().expect("wait for the child");
    assert!(!status.success());
    let taken = std::sync::Mutex::new(None);
    eventually("the standby takes the dead writer's lock", Duration::from_secs(30), || {
        let (standby, taken) = (&standby, &taken);
        async move {
            let lease = standby.acquire_lease("parent", TTL).await.expect("acquire");
            let got = lease.is_some();
            *taken.lock().expect("lease slot") = lease;
            got
        }
    })
    .await;
    let lease = taken.into_inner().expect("lease slot").expect("lease");
    assert!(standby.holds_writer());
    assert_eq!(standby.progress(ViewCopy::Live).await.expect("progress").expect("stored").checkpoint, at(0));
    standby
        .write_fenced(ViewCopy::Live, &[change("p", 1, "by the parent")], &at(1), &lease)
        .await
        .expect("the new leader writes");
    eventually("the reader sees the new leader's write", Duration::from_secs(30), || async {
        reader.position().await.expect("position") == at(1)
    })
    .await;
    assert_eq!(names(&reader).await, ["by the child", "by the parent"]);
}
