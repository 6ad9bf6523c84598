//! A crash while the projection writes: the process is killed (SIGKILL)
//! between commits; reopened, the index and its checkpoint agree, and
//! replaying the log from that checkpoint answers exactly like a rebuild
//! from scratch.
//!
//! The test runs itself a second time as a child process (selected by the
//! `KES_SEARCH_CRASH_DIR` variable) that projects a log into the index
//! until the parent kills it.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::respawn;
use kes_core::{
    Aggregate, Checkpoint, DomainEvent, EventStore, ExpectedVersion, Field, FilterOp, InMemoryStore, ListQuery,
    ListView, Metadata, Page, Position, Projection, ProjectionRunner, Row, RowChange, RunnerConfig, StoredState,
    ViewCopy, ViewError, ViewProgress, ViewProjection, ViewSchema, ViewStore,
};
use kes_view_search::SearchView;
use serde::{Deserialize, Serialize};

const CHILD_ENV: &str = "KES_SEARCH_CRASH_DIR";
const APPENDS: usize = 3000;

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

fn schema() -> ViewSchema {
    ViewSchema::new("items", 1)
        .field(Field::text("name").filterable().sortable().searchable())
        .field(Field::integer("n").filterable().sortable())
        .page_sizes(50, 100)
}

fn to_row(item: &Item) -> Row {
    let mut row = Row::new();
    row.insert("name".into(), item.name.clone().into());
    row.insert("n".into(), item.n.into());
    row
}

const WORDS: [&str; 8] = ["alpha", "Bravo", "charlie", "delta", "Echo", "foxtrot", "golf", "hotel"];

/// The same log every time: appends of one or two events over 150 items.
fn script() -> Vec<(String, Vec<ItemEvent>)> {
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    (0..APPENDS)
        .map(|_| {
            let id = format!("i{:03}", next() % 150);
            let count = 1 + (next() % 2) as usize;
            let events = (0..count)
                .map(|_| match next() % 10 {
                    0 => ItemEvent::Deleted,
                    1 => ItemEvent::Restored,
                    2..=5 => {
                        ItemEvent::Named(format!("{} {}", WORDS[(next() % 8) as usize], WORDS[(next() % 8) as usize]))
                    }
                    _ => ItemEvent::Counted((next() % 21) as i64 - 10),
                })
                .collect();
            (id, events)
        })
        .collect()
}

async fn store() -> InMemoryStore<Item> {
    let store = InMemoryStore::new();
    for (id, events) in script() {
        store.append(&id, ExpectedVersion::Any, events, Metadata::default()).await.expect("append");
    }
    store
}

async fn head_position(store: &InMemoryStore<Item>) -> Position {
    let head = store.head().await.expect("head");
    Position::new(0, head.next_offset(0) - 1)
}

fn runner(
    store: InMemoryStore<Item>,
    view: Arc<dyn ViewStore>,
    batch_size: usize,
) -> Arc<ProjectionRunner<Item, InMemoryStore<Item>>> {
    let projection: Arc<dyn Projection<ItemEvent>> = Arc::new(ViewProjection::<Item>::new(view, to_row));
    ProjectionRunner::new(
        store,
        vec![projection],
        RunnerConfig { batch_size, retry_delay: Duration::from_millis(50), ..RunnerConfig::default() },
    )
}

/// The child's view: the search view, reporting each committed
/// checkpoint on stdout, and never committing the end of the log, so that
/// the child is still projecting when the parent kills it, however late
/// that is.
struct Reporting {
    view: SearchView,
    end: u64,
}

#[async_trait::async_trait]
impl ListView for Reporting {
    fn schema(&self) -> &ViewSchema {
        self.view.schema()
    }
    async fn list(&self, query: &ListQuery) -> Result<Page, ViewError> {
        self.view.list(query).await
    }
    async fn position(&self) -> Result<Checkpoint, ViewError> {
        self.view.position().await
    }
}

#[async_trait::async_trait]
impl ViewStore for Reporting {
    async fn progress(&self, copy: ViewCopy) -> Result<Option<ViewProgress>, ViewError> {
        self.view.progress(copy).await
    }
    async fn states(&self, copy: ViewCopy, ids: &[String]) -> Result<HashMap<String, StoredState>, ViewError> {
        self.view.states(copy, ids).await
    }
    async fn write(&self, copy: ViewCopy, changes: &[RowChange], checkpoint: &Checkpoint) -> Result<(), ViewError> {
        let next = checkpoint.next_offset(0);
        if next >= self.end {
            // Waits for the kill.
            return std::future::pending().await;
        }
        self.view.write(copy, changes, checkpoint).await?;
        let mut out = std::io::stdout();
        let _ = writeln!(out, "{next}");
        let _ = out.flush();
        Ok(())
    }
    async fn begin_rebuild(&self) -> Result<(), ViewError> {
        self.view.begin_rebuild().await
    }
    async fn swap(&self) -> Result<(), ViewError> {
        self.view.swap().await
    }
}

/// Child: project the log into the index in small batches, reporting the
/// checkpoint after each commit, until killed.
async fn child(dir: &str) -> ! {
    let store = store().await;
    let end = store.head().await.expect("head").next_offset(0);
    let view: Arc<dyn ViewStore> = Arc::new(Reporting { view: SearchView::open(dir, schema()).expect("open"), end });
    let runner = runner(store, view, 4);
    runner.start().await.expect("start");
    let never: std::convert::Infallible = std::future::pending().await;
    match never {}
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

fn queries() -> Vec<ListQuery> {
    vec![
        ListQuery::new().page_size(37),
        ListQuery::new().sort_by("-n,name").page_size(25),
        ListQuery::new().filter("n", FilterOp::Gte, "0").sort_by("name"),
        ListQuery::new().filter("name", FilterOp::Prefix, "alpha").sort_by("-n"),
        ListQuery::new().search("alpha").sort_by("id"),
        ListQuery::new().search("bravo hotel").sort_by("-n"),
        ListQuery::new().search("echo").filter("n", FilterOp::Lt, "0").sort_by("n"),
    ]
}

async fn answers(view: &dyn ListView) -> Vec<Vec<Page>> {
    let mut all = Vec::new();
    for q in queries() {
        all.push(all_pages(view, q).await);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_commits_recovers_to_the_same_answers() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(&dir).await;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("index").join("items");
    let mut child = respawn("crash_between_commits_recovers_to_the_same_answers", CHILD_ENV, &dir);
    // The child's reports, read on their own thread so that waiting for
    // them has a deadline even if the child falls silent.
    let stdout = child.stdout.take().expect("stdout");
    let (reports, received) = std::sync::mpsc::channel::<u64>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(done) = line.trim().parse::<u64>()
                && reports.send(done).is_err()
            {
                break;
            }
        }
    });
    // Killed as soon as it has committed 400 offsets: it is projecting the
    // next batch then (it never commits the end of the log), so the kill
    // lands between a commit and the next one, or inside one.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut reached = 0;
    while reached < 400 {
        let left = deadline.saturating_duration_since(Instant::now());
        match received.recv_timeout(left) {
            Ok(done) => reached = reached.max(done),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("the child committed only {reached} offsets within 300 s");
            }
            // The child ended by itself: the assertions below say how.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    child.kill().expect("kill child");
    let status = child.wait().expect("wait child");
    assert!(!status.success(), "the child ran to its end instead of being killed");
    assert!(reached >= 400, "the child never got going (reached {reached})");

    // Reopened: the checkpoint of the last commit, and exactly the
    // documents of the log up to it.
    let store = store().await;
    let recovered = SearchView::open(&dir, schema()).expect("reopen after the crash");
    let progress = recovered.progress(ViewCopy::Live).await.expect("progress").expect("a checkpoint");
    let done = progress.checkpoint.next_offset(0);
    let events = store.head().await.expect("head").next_offset(0);
    assert!(done >= reached && done < events, "checkpoint {done} outside [{reached}, {events})");
    eprintln!("killed after a commit at {reached}; the index recovered at {done} of {events}");
    let mut expected: BTreeMap<String, (u64, Item)> = BTreeMap::new();
    let mut log = store.subscribe(Checkpoint::start()).await.expect("subscribe");
    let mut seen = 0;
    while seen < done {
        use futures::StreamExt;
        let append = log.next().await.expect("log").expect("append");
        for e in append {
            seen = e.position.offset + 1;
            let entry = expected.entry(e.aggregate_id.clone()).or_default();
            entry.0 = e.version;
            entry.1.apply(&e.payload);
        }
    }
    assert_eq!(seen, done, "the checkpoint ends inside an append");
    let ids: Vec<String> = (0..150).map(|i| format!("i{i:03}")).collect();
    let states = recovered.states(ViewCopy::Live, &ids).await.expect("states");
    assert_eq!(states.len(), expected.len(), "aggregates in the index vs in the log up to the checkpoint");
    for (id, (version, item)) in &expected {
        assert_eq!(states[id].version, *version, "version of {id}");
        assert_eq!(states[id].state, serde_json::to_value(item).expect("json"), "state of {id}");
    }
    let listed: Vec<(String, u64, Row)> = all_pages(&recovered, ListQuery::new().page_size(100))
        .await
        .into_iter()
        .flat_map(|p| p.items)
        .map(|i| (i.id, i.version, i.row))
        .collect();
    let want: Vec<(String, u64, Row)> = expected
        .iter()
        .filter(|(_, (_, item))| !item.deleted)
        .map(|(id, (version, item))| (id.clone(), *version, to_row(item)))
        .collect();
    assert_eq!(listed, want, "listed rows vs the log up to the checkpoint");

    // Replay from the checkpoint vs a fresh rebuild from the start.
    let recovered: Arc<SearchView> = Arc::new(recovered);
    let replay = runner(store.clone(), Arc::clone(&recovered) as Arc<dyn ViewStore>, 64);
    replay.start().await.expect("start replay");
    let fresh_dir = tmp.path().join("fresh");
    let fresh: Arc<SearchView> = Arc::new(SearchView::open(&fresh_dir, schema()).expect("fresh"));
    let rebuild = runner(store.clone(), Arc::clone(&fresh) as Arc<dyn ViewStore>, 64);
    rebuild.start().await.expect("start fresh");
    let last = head_position(&store).await;
    use kes_core::CatchUp;
    assert!(replay.wait_for(last, Duration::from_secs(120)).await, "replay caught up");
    assert!(rebuild.wait_for(last, Duration::from_secs(120)).await, "fresh build caught up");
    let replayed = answers(recovered.as_ref()).await;
    assert_eq!(replayed, answers(fresh.as_ref()).await, "replayed index vs fresh build");
    assert!(replayed.iter().all(|pages| !pages[0].items.is_empty()), "every query finds rows");

    // A rebuild of the recovered view (into a new copy, swapped in)
    // answers the same again and leaves a single copy on disk.
    replay.rebuild("items", &|_, _| {}).await.expect("rebuild");
    assert_eq!(answers(recovered.as_ref()).await, replayed, "rebuilt copy vs replayed one");
    let copies = std::fs::read_dir(&dir)
        .expect("dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("copy-"))
        .count();
    assert_eq!(copies, 1, "the old copy is deleted after the swap");
    replay.shutdown().await;
    rebuild.shutdown().await;
}
