//! Several projection runners (as several projector processes would) on one
//! SQL view, in PostgreSQL and SQLite: the view's lease lets one of them
//! work while the others stand by, a standby takes over from a leader that
//! vanished without releasing it, and the fence refuses the writes of a
//! leader that stalled past its lease. Each time the view ends equal to a
//! fresh replay of the log.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::projects::{Project, ProjectEvent, Store, dump, load, replay, schema, to_row};
use common::stores::{Backend, TestStore, merge};
use common::{Place, drop_pg_schema};
use kes_core::{
    Checkpoint, Envelope, InMemoryView, Lease, ListView, Position, Projection, ProjectionError, ProjectionRunner,
    RebuildState, RunnerConfig, ViewCopy, ViewError, ViewProjection, ViewSchema, ViewStore,
};
use kes_core::{RowChange, ViewProgress};
use tokio::sync::watch;

/// The lease the runners of these tests hold: short, so that takeovers
/// come soon.
const TTL: Duration = Duration::from_millis(1500);
const RENEW: Duration = Duration::from_millis(200);

/// How long a takeover may take beyond the lease itself (a poll period, a
/// slow shared machine).
const MARGIN: Duration = Duration::from_secs(4);

/// How long anything else may take.
const PATIENCE: Duration = Duration::from_secs(60);

/// Counts what concurrent applies the probes of one test see.
#[derive(Default)]
struct Shared {
    active: AtomicUsize,
    most: AtomicUsize,
}

/// A projection around a `ViewProjection` that counts its applies and can
/// stall inside one (a SIGSTOP between reading a batch and writing it).
struct Probe {
    inner: ViewProjection<Project>,
    shared: Arc<Shared>,
    applied: AtomicUsize,
    fenced: AtomicUsize,
    pause: watch::Sender<bool>,
    stalled: AtomicBool,
    /// [`Projection::starts_at_head`].
    head: AtomicBool,
}

impl Probe {
    fn new(view: Arc<dyn ViewStore>, shared: Arc<Shared>) -> Arc<Self> {
        Arc::new(Self {
            inner: ViewProjection::new(view, to_row),
            shared,
            applied: AtomicUsize::new(0),
            fenced: AtomicUsize::new(0),
            pause: watch::channel(false).0,
            stalled: AtomicBool::new(false),
            head: AtomicBool::new(false),
        })
    }

    fn applied(&self) -> usize {
        self.applied.load(Ordering::SeqCst)
    }

    fn fenced(&self) -> usize {
        self.fenced.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Projection<ProjectEvent> for Probe {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn version(&self) -> u32 {
        self.inner.version()
    }

    fn starts_at_head(&self) -> bool {
        self.head.load(Ordering::SeqCst)
    }

    async fn progress(&self, copy: ViewCopy) -> Result<Option<ViewProgress>, ProjectionError> {
        self.inner.progress(copy).await
    }

    async fn apply(
        &self,
        copy: ViewCopy,
        batch: &[Envelope<ProjectEvent>],
        checkpoint: &Checkpoint,
    ) -> Result<(), ProjectionError> {
        self.inner.apply(copy, batch, checkpoint).await
    }

    async fn apply_fenced(
        &self,
        copy: ViewCopy,
        batch: &[Envelope<ProjectEvent>],
        checkpoint: &Checkpoint,
        lease: &Lease,
    ) -> Result<(), ProjectionError> {
        if *self.pause.borrow() {
            self.stalled.store(true, Ordering::SeqCst);
            let mut resumed = self.pause.subscribe();
            let _ = resumed.wait_for(|paused| !paused).await;
        }
        let now = self.shared.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.shared.most.fetch_max(now, Ordering::SeqCst);
        let result = self.inner.apply_fenced(copy, batch, checkpoint, lease).await;
        self.shared.active.fetch_sub(1, Ordering::SeqCst);
        match &result {
            Ok(()) => self.applied.fetch_add(1, Ordering::SeqCst),
            Err(e) if e.is_fenced() => self.fenced.fetch_add(1, Ordering::SeqCst),
            Err(_) => 0,
        };
        result
    }

    async fn begin_rebuild(&self) -> Result<(), ProjectionError> {
        self.inner.begin_rebuild().await
    }

    async fn swap(&self) -> Result<(), ProjectionError> {
        self.inner.swap().await
    }

    async fn acquire_lease(&self, owner: &str, ttl: Duration) -> Result<Option<Lease>, ProjectionError> {
        self.inner.acquire_lease(owner, ttl).await
    }

    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<bool, ProjectionError> {
        self.inner.renew_lease(lease, ttl).await
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), ProjectionError> {
        self.inner.release_lease(lease).await
    }

    async fn swap_fenced(&self, lease: &Lease) -> Result<(), ProjectionError> {
        self.inner.swap_fenced(lease).await
    }

    async fn begin_rebuild_fenced(&self, lease: &Lease) -> Result<(), ProjectionError> {
        self.inner.begin_rebuild_fenced(lease).await
    }

    async fn prepare_swap(&self) -> Result<(), ProjectionError> {
        self.inner.prepare_swap().await
    }
}

type Runner = Arc<ProjectionRunner<Project, Store>>;

fn runner(store: &Store, probe: &Arc<Probe>) -> Runner {
    let config =
        RunnerConfig { batch_size: 16, retry_delay: Duration::from_millis(20), lease_ttl: TTL, lease_renew: RENEW };
    ProjectionRunner::new(store.clone(), vec![probe.clone() as Arc<dyn Projection<ProjectEvent>>], config)
}

/// Polls `check` every 20 ms until it holds; fails the test after `within`.
async fn until<F, Fut>(what: &str, within: Duration, check: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

async fn covers(view: &dyn ListView, written: &Checkpoint) -> bool {
    view.position().await.is_ok_and(|p| p.covers_all(written))
}

/// Everything the view holds equals a fresh replay of the log.
async fn assert_replays(store: &Store, view: &dyn ViewStore, ids: &[String], written: &Checkpoint) {
    let fresh: Arc<dyn ViewStore> = Arc::new(InMemoryView::new(schema()).expect("memory view"));
    replay(store, fresh.clone(), written).await;
    assert_eq!(dump(view, ids).await, dump(fresh.as_ref(), ids).await, "the view differs from a fresh replay");
}

/// A fresh log, and two views on one fresh place (two processes' handles
/// on one database); `None` when PostgreSQL is missing (skipped).
async fn fixture(postgres: bool) -> Option<(TestStore<Project>, Place, Arc<dyn ViewStore>, Arc<dyn ViewStore>)> {
    let store = TestStore::<Project>::fresh(Backend::Memory).await?;
    let place = Place::fresh(postgres);
    let one: Arc<dyn ViewStore> = Arc::new(place.open(schema()).await?);
    let two: Arc<dyn ViewStore> = Arc::new(place.open(schema()).await?);
    Some((store, place, one, two))
}

async fn clean(place: Place) {
    if let Place::Postgres(name) = place {
        drop_pg_schema(&name).await;
    }
}

async fn only_one_of_two_runners_applies(postgres: bool) {
    let Some((test_store, place, view_a, view_b)) = fixture(postgres).await else { return };
    let store = test_store.store.clone();
    let shared = Arc::new(Shared::default());
    let (a, b) = (Probe::new(view_a.clone(), shared.clone()), Probe::new(view_b.clone(), shared.clone()));
    let (runner_a, runner_b) = (runner(&store, &a), runner(&store, &b));
    runner_a.start().await.expect("start a");
    runner_b.start().await.expect("start b");
    assert!(runner_a.leads("projects"), "the first runner did not take the free lease");
    assert!(!runner_b.leads("projects"), "the second runner took a lease held by the first");

    // Appends while both follow, in several bursts, across several renewals.
    let (mut ids, mut written) = load(store.as_ref(), 11, 150, 30).await;
    for seed in 12..15 {
        tokio::time::sleep(RENEW).await;
        let (more, at) = load(store.as_ref(), seed, 60, 40).await;
        ids.extend(more);
        merge(&mut written, &at);
    }
    ids.sort();
    ids.dedup();
    until("the view caught up", PATIENCE, || covers(view_b.as_ref(), &written)).await;

    assert!(a.applied() > 0, "the leader applied nothing");
    assert_eq!(b.applied(), 0, "the standby applied batches beside the leader");
    assert_eq!((a.fenced(), b.fenced()), (0, 0), "a write was fenced though nobody took over");
    assert_eq!(shared.most.load(Ordering::SeqCst), 1, "two applies ran at once");
    assert!(runner_a.leads("projects") && !runner_b.leads("projects"), "the lease changed hands");
    assert_replays(&store, view_a.as_ref(), &ids, &written).await;

    runner_b.shutdown().await;
    runner_a.shutdown().await;
    clean(place).await;
}

async fn a_standby_takes_over_from_a_leader_that_vanished(postgres: bool) {
    let Some((test_store, place, view_a, view_b)) = fixture(postgres).await else { return };
    let store = test_store.store.clone();
    let shared = Arc::new(Shared::default());
    let (a, b) = (Probe::new(view_a.clone(), shared.clone()), Probe::new(view_b.clone(), shared.clone()));
    let (runner_a, runner_b) = (runner(&store, &a), runner(&store, &b));
    runner_a.start().await.expect("start a");
    runner_b.start().await.expect("start b");

    let (mut ids, mut written) = load(store.as_ref(), 21, 120, 30).await;
    until("the leader caught up", PATIENCE, || covers(view_a.as_ref(), &written)).await;
    assert_eq!(b.applied(), 0, "the standby applied batches while the leader lived");

    // A kill -9: the leader's tasks end where they are; its lease stays
    // in the database until it expires.
    runner_a.abort();
    let killed = Instant::now();
    let (more, at) = load(store.as_ref(), 22, 120, 50).await;
    ids.extend(more);
    ids.sort();
    ids.dedup();
    merge(&mut written, &at);

    until("the standby took over", TTL + RENEW + MARGIN + PATIENCE, || async { b.applied() > 0 }).await;
    let took = killed.elapsed();
    assert!(took <= TTL + RENEW + MARGIN, "the standby took over only after {took:?} (lease {TTL:?})");
    assert!(runner_b.leads("projects"), "the standby applies without the lease");
    until("the new leader caught up", PATIENCE, || covers(view_b.as_ref(), &written)).await;
    assert_replays(&store, view_b.as_ref(), &ids, &written).await;

    runner_b.shutdown().await;
    clean(place).await;
}

async fn a_stalled_leader_is_fenced_when_it_resumes(postgres: bool) {
    let Some((test_store, place, view_a, view_b)) = fixture(postgres).await else { return };
    let store = test_store.store.clone();
    let shared = Arc::new(Shared::default());
    let (a, b) = (Probe::new(view_a.clone(), shared.clone()), Probe::new(view_b.clone(), shared.clone()));
    let (runner_a, runner_b) = (runner(&store, &a), runner(&store, &b));
    runner_a.start().await.expect("start a");
    runner_b.start().await.expect("start b");

    let (mut ids, mut written) = load(store.as_ref(), 31, 100, 30).await;
    until("the leader caught up", PATIENCE, || covers(view_a.as_ref(), &written)).await;
    assert_eq!(b.applied(), 0, "the standby applied batches while the leader worked");

    // The leader stops between reading a batch and writing it, for longer
    // than its lease (it renews nothing meanwhile, as under SIGSTOP).
    a.pause.send_replace(true);
    let (more, at) = load(store.as_ref(), 32, 40, 40).await;
    ids.extend(more);
    merge(&mut written, &at);
    until("the leader stalled in a write", PATIENCE, || async { a.stalled.load(Ordering::SeqCst) }).await;
    let applied_by_a = a.applied();

    // The standby takes over and goes further than the stalled batch.
    until("the standby took over", TTL + RENEW + MARGIN + PATIENCE, || async { b.applied() > 0 }).await;
    let (more, at) = load(store.as_ref(), 33, 60, 50).await;
    ids.extend(more);
    merge(&mut written, &at);
    until("the new leader caught up", PATIENCE, || covers(view_b.as_ref(), &written)).await;
    let before = view_b.position().await.expect("position");

    // The old leader resumes: its write is refused, nothing of it lands,
    // and it stands by.
    a.pause.send_replace(false);
    until("the resumed leader's write was fenced", PATIENCE, || async { a.fenced() > 0 }).await;
    until("the resumed leader stood by", PATIENCE, || async { !runner_a.leads("projects") }).await;
    assert_eq!(a.applied(), applied_by_a, "the stalled leader wrote after losing its lease");
    assert_eq!(view_b.position().await.expect("position"), before, "the checkpoint moved");
    assert!(runner_b.leads("projects"), "the new leader lost its lease to the old one");
    ids.sort();
    ids.dedup();
    assert_replays(&store, view_a.as_ref(), &ids, &written).await;

    // The new leader shuts down (releasing the lease): the old one takes
    // over again from the stored checkpoint and goes on.
    runner_b.shutdown().await;
    let (more, at) = load(store.as_ref(), 34, 40, 60).await;
    ids.extend(more);
    ids.sort();
    ids.dedup();
    merge(&mut written, &at);
    until("the old leader caught up again", PATIENCE, || covers(view_a.as_ref(), &written)).await;
    assert!(a.applied() > applied_by_a, "the old leader did not take the released lease");
    assert_replays(&store, view_a.as_ref(), &ids, &written).await;

    runner_a.shutdown().await;
    clean(place).await;
}

/// One row change of project `id` at `version`.
fn change(id: &str, version: u64) -> RowChange {
    let project = Project { name: format!("Project {id}"), budget: version as i64, ..Project::default() };
    RowChange {
        id: id.to_owned(),
        version,
        state: kes_core::RowChange::state_of(&project).expect("state"),
        row: Some(to_row(&project)),
    }
}

fn at(offset: u64) -> Checkpoint {
    let mut c = Checkpoint::start();
    c.advance(Position { partition: 0, offset });
    c
}

/// Pitfall: a writer that lost the lease must not start a rebuild, which
/// would drop the shadow copy its successor is filling.
async fn a_writer_that_lost_the_lease_cannot_restart_the_shadow(postgres: bool) {
    let Some((_store, place, view_a, view_b)) = fixture(postgres).await else { return };
    let a = view_a.acquire_lease("a", TTL).await.expect("lease a").expect("a free lease");
    view_a.begin_rebuild_fenced(&a).await.expect("a starts a rebuild");
    view_a.release_lease(&a).await.expect("release a");

    let b = view_b.acquire_lease("b", TTL).await.expect("lease b").expect("the released lease");
    view_b.begin_rebuild_fenced(&b).await.expect("b starts its rebuild");
    view_b.write_fenced(ViewCopy::Shadow, &[change("p1", 1)], &at(0), &b).await.expect("b fills the shadow");

    let refused = view_a.begin_rebuild_fenced(&a).await;
    assert!(matches!(refused, Err(ViewError::Fenced(_))), "a stale lease restarted the shadow: {refused:?}");
    let shadow = view_b.progress(ViewCopy::Shadow).await.expect("shadow progress");
    assert_eq!(shadow.map(|p| p.checkpoint), Some(at(0)), "the successor's shadow copy was dropped");
    assert_eq!(view_b.states(ViewCopy::Shadow, &["p1".into()]).await.expect("states").len(), 1);
    clean(place).await;
}

/// Pitfall: a swap never moves the view back: the new copy must have
/// reached the live one's checkpoint on every partition.
async fn a_copy_behind_the_live_one_is_not_swapped_in(postgres: bool) {
    let Some((_store, place, view, _)) = fixture(postgres).await else { return };
    let lease = view.acquire_lease("a", TTL).await.expect("lease").expect("a free lease");
    let mut live = at(7);
    live.advance(Position { partition: 1, offset: 3 });
    view.write_fenced(ViewCopy::Live, &[change("p1", 2)], &live, &lease).await.expect("live");
    view.begin_rebuild_fenced(&lease).await.expect("rebuild");
    // Ahead on partition 0, behind on partition 1.
    let mut shadow = at(9);
    shadow.advance(Position { partition: 1, offset: 1 });
    view.write_fenced(ViewCopy::Shadow, &[change("p1", 2)], &shadow, &lease).await.expect("shadow");
    let refused = view.swap_fenced(&lease).await;
    assert!(matches!(refused, Err(ViewError::Fenced(_))), "a copy behind the live one was swapped in: {refused:?}");
    assert_eq!(view.position().await.expect("position"), live, "the live copy changed");
    shadow.advance(Position { partition: 1, offset: 3 });
    view.write_fenced(ViewCopy::Shadow, &[], &shadow, &lease).await.expect("shadow catches up");
    view.swap_fenced(&lease).await.expect("a copy at or past the live one is swapped in");
    assert_eq!(view.position().await.expect("position"), shadow);
    clean(place).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_behind_the_live_one_is_not_swapped_in_on_sqlite() {
    a_copy_behind_the_live_one_is_not_swapped_in(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_behind_the_live_one_is_not_swapped_in_on_postgres() {
    a_copy_behind_the_live_one_is_not_swapped_in(true).await;
}

/// A projection that starts at the head of the log: its first write, to an
/// SQL view, is the head as its checkpoint with no row: nothing of the past
/// is applied. (That a restart goes on from that checkpoint is shown with a
/// reaction in kes-core's tests.)
async fn a_projection_started_at_the_head_stores_the_head_first(postgres: bool) {
    let Some((test_store, place, view, _)) = fixture(postgres).await else { return };
    let store = test_store.store.clone();
    let (past, head) = load(store.as_ref(), 61, 60, 20).await;
    let probe = Probe::new(view.clone(), Arc::new(Shared::default()));
    probe.head.store(true, Ordering::SeqCst);
    let first = runner(&store, &probe);
    first.start().await.expect("start");
    until("the head stored as the first checkpoint", PATIENCE, || covers(view.as_ref(), &head)).await;
    assert_eq!(probe.applied(), 1, "more than the head's checkpoint was written");
    let rows = view.states(ViewCopy::Live, &past).await.expect("states");
    assert!(rows.is_empty(), "events from before the start were applied: {} rows", rows.len());
    first.shutdown().await;
    clean(place).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_started_at_the_head_stores_the_head_first_on_sqlite() {
    a_projection_started_at_the_head_stores_the_head_first(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_started_at_the_head_stores_the_head_first_on_postgres() {
    a_projection_started_at_the_head_stores_the_head_first(true).await;
}

fn schema_v(version: u32) -> ViewSchema {
    let mut schema = schema();
    schema.version = version;
    schema
}

/// Pitfall: after a schema bump, one of two new runners rebuilds; an old
/// runner (a rolling deploy's leftover) neither rebuilds the view back to
/// its version nor writes its rows into the new copy, even when it could
/// take the lease; and the view refuses such a write by itself.
async fn an_old_version_writes_nothing_into_a_newer_copy(postgres: bool) {
    let Some((test_store, place, view_v1, _)) = fixture(postgres).await else { return };
    let store = test_store.store.clone();
    let shared = Arc::new(Shared::default());
    let (mut ids, mut written) = load(store.as_ref(), 41, 120, 30).await;
    let first = runner(&store, &Probe::new(view_v1.clone(), shared.clone()));
    first.start().await.expect("start v1");
    until("version 1 caught up", PATIENCE, || covers(view_v1.as_ref(), &written)).await;
    first.shutdown().await;

    // Two runners of version 2 start together: one leads and rebuilds.
    let view_x: Arc<dyn ViewStore> = Arc::new(place.open(schema_v(2)).await.expect("view v2"));
    let view_y: Arc<dyn ViewStore> = Arc::new(place.open(schema_v(2)).await.expect("view v2"));
    let (x, y) = (Probe::new(view_x.clone(), shared.clone()), Probe::new(view_y.clone(), shared.clone()));
    let (runner_x, runner_y) = (runner(&store, &x), runner(&store, &y));
    runner_x.start().await.expect("start x");
    runner_y.start().await.expect("start y");
    until("version 2 rebuilt the view", PATIENCE, || async {
        view_x.progress(ViewCopy::Live).await.is_ok_and(|p| p.is_some_and(|p| p.schema_version == 2))
    })
    .await;
    let rebuilt = |r: &Runner| {
        let r = r.clone();
        async move { last_rebuild(&r).await.is_some_and(|s| s.state == RebuildState::Done) }
    };
    until("a rebuild reported itself done", PATIENCE, || async {
        rebuilt(&runner_x).await || rebuilt(&runner_y).await
    })
    .await;
    let rebuilds = [runner_x.clone(), runner_y.clone()].iter().filter(|r| r.leads("projects")).count();
    assert_eq!(rebuilds, 1, "both new runners lead");
    assert!(!(rebuilt(&runner_x).await && rebuilt(&runner_y).await), "both new runners rebuilt the view");
    assert!(last_rebuild(&runner_x).await.is_none() || last_rebuild(&runner_y).await.is_none(), "two rebuilds ran");

    // An old runner starts while a new one leads, then the new ones stop
    // (releasing the lease): the old one still takes nothing.
    let old_view: Arc<dyn ViewStore> = Arc::new(place.open(schema_v(1)).await.expect("view v1 again"));
    let old = Probe::new(old_view.clone(), shared.clone());
    let runner_old = runner(&store, &old);
    runner_old.start().await.expect("start the old runner");
    runner_x.shutdown().await;
    runner_y.shutdown().await;
    let (more, at_more) = load(store.as_ref(), 42, 40, 40).await;
    ids.extend(more);
    ids.sort();
    ids.dedup();
    until("the old runner reported itself outdated", PATIENCE, || async {
        runner_old.status().await.is_ok_and(|s| s[0].last_error.as_deref().is_some_and(|e| e.contains("version 2")))
    })
    .await;
    assert!(!runner_old.leads("projects"), "the old runner holds the lease of a newer copy");
    assert_eq!(old.applied(), 0, "the old runner wrote into the newer copy");
    let stored = view_x.progress(ViewCopy::Live).await.expect("progress").expect("a live copy");
    assert_eq!(stored.schema_version, 2, "the view was rebuilt back to the old version");
    assert!(!stored.checkpoint.covers_all(&at_more), "someone applied the new appends");

    // The view refuses an old writer's rows by itself, lease or not.
    let lease = old_view.acquire_lease("old", TTL).await.expect("lease").expect("the free lease");
    let refused = old_view.write_fenced(ViewCopy::Live, &[change("p001", 99)], &at_more, &lease).await;
    assert!(matches!(refused, Err(ViewError::Fenced(_))), "an old-version write was accepted: {refused:?}");
    old_view.release_lease(&lease).await.expect("release");
    runner_old.shutdown().await;

    // A new runner takes over and the view equals a fresh replay.
    merge(&mut written, &at_more);
    let runner_z = runner(&store, &Probe::new(view_x.clone(), shared.clone()));
    runner_z.start().await.expect("start z");
    until("version 2 caught up", PATIENCE, || covers(view_x.as_ref(), &written)).await;
    assert_replays(&store, view_x.as_ref(), &ids, &written).await;
    runner_z.shutdown().await;
    clean(place).await;
}

/// The last rebuild a runner ran, if any.
async fn last_rebuild(runner: &Runner) -> Option<kes_core::RebuildProgress> {
    runner.status().await.ok().and_then(|s| s.into_iter().next()).and_then(|s| s.rebuild)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_lost_the_lease_cannot_restart_the_shadow_on_sqlite() {
    a_writer_that_lost_the_lease_cannot_restart_the_shadow(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_lost_the_lease_cannot_restart_the_shadow_on_postgres() {
    a_writer_that_lost_the_lease_cannot_restart_the_shadow(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_version_writes_nothing_into_a_newer_copy_on_sqlite() {
    an_old_version_writes_nothing_into_a_newer_copy(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_version_writes_nothing_into_a_newer_copy_on_postgres() {
    an_old_version_writes_nothing_into_a_newer_copy(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_of_two_runners_applies_on_sqlite() {
    only_one_of_two_runners_applies(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_of_two_runners_applies_on_postgres() {
    only_one_of_two_runners_applies(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_from_a_leader_that_vanished_on_sqlite() {
    a_standby_takes_over_from_a_leader_that_vanished(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_from_a_leader_that_vanished_on_postgres() {
    a_standby_takes_over_from_a_leader_that_vanished(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_leader_is_fenced_when_it_resumes_on_sqlite() {
    a_stalled_leader_is_fenced_when_it_resumes(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_leader_is_fenced_when_it_resumes_on_postgres() {
    a_stalled_leader_is_fenced_when_it_resumes(true).await;
}
