//! Rebuilds into a shadow copy whose commits are deferred: the result
//! equals a fresh replay however the events of an aggregate are spread over
//! batches and commits, the live copy serves unchanged until the swap, and
//! a rebuild that stops before its swap leaves consistent commits behind and
//! starts over cleanly. Rebuilds follow the subscription of every event
//! store: the in-memory reference, SQLite and PostgreSQL `SqlStore`s and a
//! `KafkaStore` on three partitions.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::copies;
use common::stores::{Backend, TestStore, caught_up};
use futures::StreamExt;
use kes_core::{
    Aggregate, Checkpoint, DomainEvent, EventStore, ExpectedVersion, Field, FilterOp, ListQuery, ListView, Metadata,
    Page, Position, Projection, ProjectionRunner, Row, RowChange, RunnerConfig, ViewCopy, ViewProjection, ViewSchema,
    ViewStore,
};
use kes_view_search::{SearchView, SearchViewConfig};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Item {
    name: String,
    n: i64,
    deleted: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
enum ItemEvent {
    Named(String),
    Counted(i64),
    Deleted,
    Restored,
}

impl DomainEvent for ItemEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Named(_) => "Named",
            Self::Counted(_) => "Counted",
            Self::Deleted => "Deleted",
            Self::Restored => "Restored",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl Aggregate for Item {
    const NAME: &'static str = "item";
    type Command = ItemEvent;
    type Event = ItemEvent;
    type Error = Never;
    fn handle(&self, command: ItemEvent) -> Result<Vec<ItemEvent>, Never> {
        Ok(vec![command])
    }
    fn apply(&mut self, event: &ItemEvent) {
        match event {
            ItemEvent::Named(name) => self.name = name.clone(),
            ItemEvent::Counted(n) => self.n += n,
            ItemEvent::Deleted => self.deleted = true,
            ItemEvent::Restored => self.deleted = false,
        }
    }
    fn is_deleted(&self) -> bool {
        self.deleted
    }
}

const ITEMS: u64 = 40;
const APPENDS: usize = 600;
const WORDS: [&str; 6] = ["alpha", "Bravo", "charlie", "delta", "Echo", "foxtrot"];

/// The event store a test follows, whichever backend it is.
type Store = Arc<dyn EventStore<Item>>;

fn schema() -> ViewSchema {
    ViewSchema::new("items", 1)
        .field(Field::text("name").filterable().sortable().searchable())
        .field(Field::integer("n").filterable().sortable())
        .page_sizes(20, 100)
}

fn to_row(item: &Item) -> Row {
    let mut row = Row::new();
    row.insert("name".into(), item.name.clone().into());
    row.insert("n".into(), item.n.into());
    row
}

/// Writes the same log every time into `store`: 600 appends of one to three
/// events over 40 items, so that every item has events in many batches.
/// Returns the number of events appended.
async fn load(store: &dyn EventStore<Item>) -> u64 {
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut appended = 0;
    for _ in 0..APPENDS {
        let id = format!("i{:02}", next() % ITEMS);
        let events: Vec<ItemEvent> = (0..1 + next() % 3)
            .map(|_| match next() % 10 {
                0 => ItemEvent::Deleted,
                1 => ItemEvent::Restored,
                2..=5 => ItemEvent::Named(format!("{} {}", WORDS[(next() % 6) as usize], WORDS[(next() % 6) as usize])),
                _ => ItemEvent::Counted((next() % 21) as i64 - 10),
            })
            .collect();
        appended += events.len() as u64;
        store.append(&id, ExpectedVersion::Any, events, Metadata::default()).await.expect("append");
    }
    appended
}

/// Every item's version and state, folded from the whole log (on every
/// partition, up to its head).
async fn folded(store: &dyn EventStore<Item>) -> BTreeMap<String, (u64, Item)> {
    let head = store.head().await.expect("head");
    let mut log = store.subscribe(Checkpoint::start()).await.expect("subscribe");
    let mut expected: BTreeMap<String, (u64, Item)> = BTreeMap::new();
    let mut seen = Checkpoint::start();
    while !seen.covers_all(&head) {
        let next = tokio::time::timeout(Duration::from_secs(120), log.next()).await.expect("the log went quiet");
        for e in next.expect("log").expect("append") {
            seen.advance(e.position);
            let entry = expected.entry(e.aggregate_id.clone()).or_default();
            entry.0 = e.version;
            entry.1.apply(&e.payload);
        }
    }
    expected
}

fn runner(store: Store, view: Arc<dyn ViewStore>, batch_size: usize) -> Arc<ProjectionRunner<Item, Store>> {
    let projection: Arc<dyn Projection<ItemEvent>> = Arc::new(ViewProjection::<Item>::new(view, to_row));
    ProjectionRunner::new(
        store,
        vec![projection],
        RunnerConfig { batch_size, retry_delay: Duration::from_millis(50), ..RunnerConfig::default() },
    )
}

fn config(dir: impl AsRef<std::path::Path>, rebuild_commit_docs: usize) -> SearchViewConfig {
    SearchViewConfig::in_dir(dir).rebuild_commit_docs(rebuild_commit_docs)
}

async fn all_pages(view: &dyn ListView, query: ListQuery) -> Vec<Page> {
    let mut pages = Vec::new();
    let mut q = query;
    loop {
        let page = view.list(&q).await.unwrap_or_else(|e| panic!("{q:?}: {e}"));
        let next = page.next.clone();
        pages.push(page);
        match next {
            Some(next) => q.after = Some(next),
            None => return pages,
        }
    }
}

async fn answers(view: &dyn ListView) -> Vec<Vec<Page>> {
    let queries = [
        ListQuery::new().page_size(7),
        ListQuery::new().sort_by("-n,name").page_size(9),
        ListQuery::new().filter("n", FilterOp::Gte, "0").sort_by("name"),
        ListQuery::new().search("alpha").sort_by("id"),
        ListQuery::new().search("bravo echo").sort_by("-n"),
    ];
    let mut all = Vec::new();
    for q in queries {
        all.push(all_pages(view, q).await);
    }
    all
}

fn ids() -> Vec<String> {
    (0..ITEMS).map(|i| format!("i{i:02}")).collect()
}

fn at(offset: u64) -> Checkpoint {
    let mut c = Checkpoint::start();
    c.advance(Position::new(0, offset));
    c
}

fn change(id: &str, version: u64, name: &str) -> RowChange {
    let mut row = Row::new();
    row.insert("name".into(), name.into());
    row.insert("n".into(), (version as i64).into());
    RowChange {
        id: id.into(),
        version,
        state: kes_core::RowChange::state_of(&serde_json::json!({ "name": name, "v": version })).expect("state JSON"),
        row: Some(row),
    }
}

async fn names(view: &dyn ListView) -> Vec<(String, String)> {
    let page = view.list(&ListQuery::new().sort_by("id").page_size(100)).await.expect("list");
    page.items.into_iter().map(|i| (i.id, i.row["name"].to_json().as_str().unwrap_or_default().to_owned())).collect()
}

async fn rebuild_over_many_batches(backend: Backend) {
    let Some(log) = TestStore::<Item>::fresh(backend).await else { return };
    let store = log.store.clone();
    let events = load(store.as_ref()).await;
    let expected = folded(store.as_ref()).await;
    let tmp = tempfile::tempdir().expect("tmp");

    // The reference: the live copy following the log.
    let fresh: Arc<SearchView> = Arc::new(SearchView::open(tmp.path().join("fresh"), schema()).expect("fresh"));
    let follow = runner(store.clone(), Arc::clone(&fresh) as Arc<dyn ViewStore>, 64);
    follow.start().await.expect("start");
    let head = store.head().await.expect("head");
    assert!(caught_up(follow.as_ref(), &head, Duration::from_secs(120)).await, "caught up");
    let want = answers(fresh.as_ref()).await;
    assert!(want.iter().all(|pages| !pages[0].items.is_empty()), "every query finds rows");
    follow.shutdown().await;

    // Rebuilds in small batches (each item's events spread over many of
    // them), committing every few documents, or only at the swap.
    for (batch, commit_every) in [(5, 7), (3, 50_000), (64, 1)] {
        let dir = tmp.path().join(format!("rebuilt-{batch}-{commit_every}"));
        let view: Arc<SearchView> = Arc::new(SearchView::open(config(&dir, commit_every), schema()).expect("open"));
        let rebuild = runner(store.clone(), Arc::clone(&view) as Arc<dyn ViewStore>, batch);
        let report = rebuild.rebuild("items", &|_, _| {}).await.expect("rebuild");
        assert_eq!(report.events, events, "batch {batch}, commit every {commit_every}: events rebuilt");
        assert_eq!(answers(view.as_ref()).await, want, "batch {batch}, commit every {commit_every}: pages");
        let states = view.states(ViewCopy::Live, &ids()).await.expect("states");
        assert_eq!(states.len(), expected.len());
        for (id, (version, item)) in &expected {
            assert_eq!(states[id].version, *version, "version of {id}");
            assert_eq!(states[id].state, serde_json::to_value(item).expect("json"), "state of {id}");
        }
        assert_eq!(view.position().await.expect("position"), head);
        assert_eq!(copies(&dir).len(), 1, "the old copy is gone");

        // Everything, the tail buffered until the swap included, is on disk.
        drop(rebuild);
        let view = Arc::into_inner(view).expect("the only handle");
        drop(view);
        let reopened = SearchView::open(config(&dir, commit_every), schema()).expect("reopen");
        assert_eq!(answers(&reopened).await, want, "batch {batch}, commit every {commit_every}: after a reopen");
        assert_eq!(reopened.position().await.expect("position"), head);
    }
}

mod a_rebuild_over_many_batches_equals_a_fresh_replay {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_store() {
        rebuild_over_many_batches(Backend::Memory).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_store() {
        rebuild_over_many_batches(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_store() {
        rebuild_over_many_batches(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kafka_store() {
        rebuild_over_many_batches(Backend::Kafka).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_copy_serves_unchanged_until_the_swap() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("items");
    let view = SearchView::open(config(&dir, 5), schema()).expect("open");
    view.write(ViewCopy::Live, &[change("a", 1, "old a"), change("b", 1, "old b")], &at(1)).await.expect("live");
    let before = names(&view).await;
    view.begin_rebuild().await.expect("begin");
    // Twelve batches of two changes over four ids: every id is written
    // again and again, across commits (every five documents) and in the
    // buffered tail.
    let mut versions: BTreeMap<String, u64> = BTreeMap::new();
    for n in 0..12u64 {
        let batch: Vec<RowChange> = [n % 4, (n + 1) % 4]
            .iter()
            .map(|k| {
                let id = format!("s{k}");
                let version = versions.entry(id.clone()).or_default();
                *version += 1;
                change(&id, *version, &format!("new {id} v{version}"))
            })
            .collect();
        view.write(ViewCopy::Shadow, &batch, &at(10 + n)).await.expect("shadow");
        assert_eq!(names(&view).await, before, "the live rows during the rebuild");
        assert_eq!(view.position().await.expect("position"), at(1), "the live position during the rebuild");
        let shadow = view.progress(ViewCopy::Shadow).await.expect("progress").expect("written");
        assert_eq!(shadow.checkpoint, at(10 + n));
        let ids: Vec<String> = versions.keys().cloned().collect();
        let states = view.states(ViewCopy::Shadow, &ids).await.expect("states");
        for (id, version) in &versions {
            assert_eq!(states[id].version, *version, "the shadow's state of {id} after batch {n}");
            assert_eq!(states[id].state["name"], format!("new {id} v{version}"));
        }
        let live = view.states(ViewCopy::Live, &ids).await.expect("live states");
        assert!(live.is_empty(), "shadow writes leaked into the live copy");
    }
    view.swap().await.expect("swap");
    let want: Vec<(String, String)> =
        versions.iter().map(|(id, version)| (id.clone(), format!("new {id} v{version}"))).collect();
    assert_eq!(names(&view).await, want);
    assert_eq!(view.position().await.expect("position"), at(21));
    // The swapped-in copy commits each write, like a live copy.
    view.write(ViewCopy::Live, &[change("s9", 1, "after")], &at(22)).await.expect("live write");
    drop(view);
    let reopened = SearchView::open(config(&dir, 5), schema()).expect("reopen");
    let mut want = want;
    want.push(("s9".into(), "after".into()));
    assert_eq!(names(&reopened).await, want);
    assert_eq!(reopened.position().await.expect("position"), at(22));
}

/// The checkpoint and number of documents of the last commit of the index
/// in `path`, read with Tantivy directly.
fn committed(path: &Path) -> (Checkpoint, u64) {
    let index = tantivy::Index::open_in_dir(path).expect("open copy");
    let payload = index.load_metas().expect("metas").payload.expect("a payload");
    let payload: serde_json::Value = serde_json::from_str(&payload).expect("payload json");
    let checkpoint = Checkpoint::from_json(&payload["checkpoint"].to_string()).expect("checkpoint");
    let docs = index.reader().expect("reader").searcher().num_docs();
    (checkpoint, docs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_stopped_before_its_swap_leaves_consistent_commits_and_starts_over() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("items");
    let view = SearchView::open(config(&dir, 10), schema()).expect("open");
    view.write(ViewCopy::Live, &[change("a", 1, "live a")], &at(0)).await.expect("live");
    view.begin_rebuild().await.expect("begin");
    let live = std::fs::read_to_string(dir.join("CURRENT")).expect("CURRENT");
    let shadow = copies(&dir).into_iter().find(|c| *c != live).expect("a shadow copy");
    // Batches of four new ids: the third brings twelve documents, past the
    // commit threshold of ten; the fourth and fifth stay buffered.
    for n in 0..5u64 {
        let batch: Vec<RowChange> = (0..4).map(|k| change(&format!("r{n}{k}"), 1, "rebuilt")).collect();
        view.write(ViewCopy::Shadow, &batch, &at(100 + n)).await.expect("shadow");
    }
    assert_eq!(committed(&dir.join(&shadow)), (at(102), 12), "the shadow's commit holds what its checkpoint says");
    let progress = view.progress(ViewCopy::Shadow).await.expect("progress").expect("written");
    assert_eq!(progress.checkpoint, at(104), "the shadow's progress includes its buffered writes");
    let states = view.states(ViewCopy::Shadow, &["r00".into(), "r40".into(), "a".into()]).await.expect("states");
    assert_eq!(states.keys().map(String::as_str).collect::<std::collections::BTreeSet<_>>(), ["r00", "r40"].into());

    // The process stops without a swap: the next open serves the live copy
    // and drops the unfinished one.
    drop(view);
    let reopened = SearchView::open(config(&dir, 10), schema()).expect("reopen");
    assert_eq!(copies(&dir), std::slice::from_ref(&live));
    assert_eq!(names(&reopened).await, [("a".to_owned(), "live a".to_owned())]);
    assert_eq!(reopened.position().await.expect("position"), at(0));
    assert!(reopened.progress(ViewCopy::Shadow).await.is_err(), "no rebuild in progress after a restart");

    // The rebuild starts over from an empty copy.
    reopened.begin_rebuild().await.expect("begin again");
    assert!(reopened.progress(ViewCopy::Shadow).await.expect("progress").is_none());
    let none = reopened.states(ViewCopy::Shadow, &["r00".into()]).await.expect("states");
    assert!(none.is_empty(), "the new shadow starts empty");
    reopened.write(ViewCopy::Shadow, &[change("b", 1, "rebuilt b")], &at(7)).await.expect("shadow");
    reopened.swap().await.expect("swap");
    assert_eq!(names(&reopened).await, [("b".to_owned(), "rebuilt b".to_owned())]);
    assert_eq!(reopened.position().await.expect("position"), at(7));
    assert_eq!(copies(&dir).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_rebuild_drops_the_buffered_writes_of_the_first() {
    let tmp = tempfile::tempdir().expect("tmp");
    let view = SearchView::open(config(tmp.path().join("items"), 1_000), schema()).expect("open");
    view.begin_rebuild().await.expect("begin");
    view.write(ViewCopy::Shadow, &[change("x", 1, "first")], &at(3)).await.expect("shadow");
    view.begin_rebuild().await.expect("begin again");
    assert!(view.states(ViewCopy::Shadow, &["x".into()]).await.expect("states").is_empty());
    view.write(ViewCopy::Shadow, &[change("y", 1, "second")], &at(4)).await.expect("shadow");
    view.swap().await.expect("swap");
    assert_eq!(names(&view).await, [("y".to_owned(), "second".to_owned())]);
    assert!(matches!(view.swap().await, Err(kes_core::ViewError::Backend(_))), "a second swap has no shadow");
}
