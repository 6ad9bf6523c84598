//! Projections: durable, checkpointed, rebuildable consumers of the log.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::aggregate::{Aggregate, DomainEvent};
use crate::envelope::{Checkpoint, Envelope, Position};
use crate::store::{EventStore, Logged, StoreError};
use crate::vault::{AggregateRef, Vault, VaultError};
use crate::view::{Lease, ListView, Row, RowChange, ViewCopy, ViewError, ViewProgress, ViewStore};

/// Why a projection could not apply a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// Reading the log failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing the view failed.
    #[error(transparent)]
    View(#[from] ViewError),
    /// No projection of that name is registered.
    #[error("no projection named {0:?}")]
    Unknown(String),
    /// The runner was shut down.
    #[error("projection runner stopped")]
    Stopped,
    /// Another runner holds the lease of the projection's view, so this
    /// one may not write it (it stands by).
    #[error("projection {0:?} is led by another runner (this one stands by)")]
    Standby(String),
    /// The view's live copy was built with a newer version of the
    /// projection than this runner's: an older writer (left over from a
    /// rolling deploy) stands by instead of writing its old rows into it.
    #[error(
        "projection {name:?}: the view was built with version {stored}, this runner has version {mine} (stands by)"
    )]
    Outdated {
        /// The projection.
        name: String,
        /// The version the live copy was built with.
        stored: u32,
        /// This runner's version.
        mine: u32,
    },
    /// The projection is never rebuilt (a reaction: replaying the log
    /// would decide commands again on today's states).
    #[error("projection {0:?} is not rebuilt")]
    NotRebuildable(String),
    /// A rebuild of the projection is already running.
    #[error("a rebuild of projection {0:?} is already running")]
    Busy(String),
    /// A batch brings an event of `id` at version `next` while the view
    /// holds it at `have`, below `next - 1`: applying it would build on a
    /// stale state. The runner reads the missing events from the log and
    /// applies them first ([`ProjectionRunner`] does it by itself).
    #[error("projection gap: {id} is at version {have} in the view, the log continues it at {next}")]
    Gap {
        /// The aggregate.
        id: String,
        /// The version the view holds.
        have: u64,
        /// The version of the event that came next.
        next: u64,
    },
}

impl ProjectionError {
    /// Whether a write was refused because this runner no longer holds the
    /// view's lease ([`ViewError::Fenced`]).
    pub fn is_fenced(&self) -> bool {
        matches!(self, Self::View(ViewError::Fenced(_)))
    }
}

/// A named, versioned consumer of the log that keeps its checkpoint with
/// its data, and can be rebuilt into a shadow copy and swapped in.
#[async_trait]
pub trait Projection<E>: Send + Sync {
    /// The projection's name (unique per runner).
    fn name(&self) -> &str;

    /// Its version: when the stored copy was built with another, the runner
    /// rebuilds it from the log.
    fn version(&self) -> u32;

    /// Whether a live copy with no stored progress starts at the head of
    /// the log (the runner stores the log's head as its first checkpoint)
    /// instead of at its beginning: for a consumer that acts on what
    /// happens from now on, and must not act on the past (a new
    /// [reaction](crate::ReactionStart)). A copy that has progress goes on
    /// from it either way, and a rebuild still reads the whole log. The
    /// default is the beginning.
    fn starts_at_head(&self) -> bool {
        false
    }

    /// The stored progress of `copy`.
    async fn progress(&self, copy: ViewCopy) -> Result<Option<ViewProgress>, ProjectionError>;

    /// Applies `batch` to `copy` and stores `checkpoint` with it, atomically.
    async fn apply(
        &self,
        copy: ViewCopy,
        batch: &[Envelope<E>],
        checkpoint: &Checkpoint,
    ) -> Result<(), ProjectionError>;

    /// Starts an empty shadow copy.
    async fn begin_rebuild(&self) -> Result<(), ProjectionError>;

    /// [`Projection::begin_rebuild`] by the holder of `lease`, fenced like
    /// [`Projection::apply_fenced`]. The default starts it unconditionally.
    async fn begin_rebuild_fenced(&self, lease: &Lease) -> Result<(), ProjectionError> {
        let _ = lease;
        self.begin_rebuild().await
    }

    /// Readies the filled shadow copy for its swap before the live copy is
    /// paused (see [`ViewStore::prepare_swap`]). The default does nothing.
    async fn prepare_swap(&self) -> Result<(), ProjectionError> {
        Ok(())
    }

    /// Makes the shadow copy live.
    async fn swap(&self) -> Result<(), ProjectionError>;

    /// Takes the lease of the projection's view for `owner` (see
    /// [`ViewStore::acquire_lease`]); `None` while another runner holds it.
    /// The default always grants (fence 0): a projection without a lease
    /// lets every runner write.
    async fn acquire_lease(&self, owner: &str, ttl: Duration) -> Result<Option<Lease>, ProjectionError> {
        let _ = ttl;
        Ok(Some(Lease { owner: owner.to_owned(), fence: 0 }))
    }

    /// Extends `lease`; `false` once another runner took it over.
    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<bool, ProjectionError> {
        let _ = (lease, ttl);
        Ok(true)
    }

    /// Gives `lease` up.
    async fn release_lease(&self, lease: &Lease) -> Result<(), ProjectionError> {
        let _ = lease;
        Ok(())
    }

    /// [`Projection::apply`] by the holder of `lease`: refused (a
    /// [`ViewError::Fenced`]) when it is no longer current.
    async fn apply_fenced(
        &self,
        copy: ViewCopy,
        batch: &[Envelope<E>],
        checkpoint: &Checkpoint,
        lease: &Lease,
    ) -> Result<(), ProjectionError>
    where
        E: Sync,
    {
        let _ = lease;
        self.apply(copy, batch, checkpoint).await
    }

    /// [`Projection::swap`] by the holder of `lease`, fenced likewise.
    async fn swap_fenced(&self, lease: &Lease) -> Result<(), ProjectionError> {
        let _ = lease;
        self.swap().await
    }

    /// [`Projection::apply_fenced`] into the shadow copy, for a rebuild:
    /// it may return before `batch` is written, once the batch of the call
    /// before it is, so that the rebuild reads and folds the next batch
    /// while the view writes this one. A failed write is reported by the
    /// next call, or by [`Projection::finish_ahead`], which waits for the
    /// last write; every other call that touches the shadow waits for it
    /// too. The default writes before it returns.
    async fn apply_ahead(
        &self,
        batch: &[Envelope<E>],
        checkpoint: &Checkpoint,
        lease: &Lease,
    ) -> Result<(), ProjectionError>
    where
        E: Sync,
    {
        self.apply_fenced(ViewCopy::Shadow, batch, checkpoint, lease).await
    }

    /// Waits for the write that [`Projection::apply_ahead`] left running,
    /// and reports its failure. The default has none to wait for.
    async fn finish_ahead(&self) -> Result<(), ProjectionError> {
        Ok(())
    }
}

/// Turns an aggregate's state into its list row.
pub type RowFn<A> = Arc<dyn Fn(&A) -> Row + Send + Sync>;

/// The projection behind a list view: folds each aggregate's events into
/// its state (kept in the view beside the row) and writes the row that
/// `to_row` derives from it.
pub struct ViewProjection<A: Aggregate> {
    view: Arc<dyn ViewStore>,
    to_row: RowFn<A>,
    vault: Option<Arc<Vault>>,
    shadow_ids: Mutex<ShadowIds>,
    ahead: tokio::sync::Mutex<Ahead<A>>,
}

/// The shadow write a rebuild left running ([`Projection::apply_ahead`]),
/// and the states of the aggregates it writes: the next batch folds onto
/// those, since the view may not hold them yet.
struct Ahead<A> {
    pending: Option<JoinHandle<Result<(), ViewError>>>,
    carry: HashMap<String, (u64, A)>,
}

impl<A> Default for Ahead<A> {
    fn default() -> Self {
        Self { pending: None, carry: HashMap::new() }
    }
}

/// The aggregates that a rebuild begun through this projection folded into
/// the shadow copy so far, as 64-bit hashes of their ids.
///
/// A shadow starts empty ([`ViewStore::begin_rebuild`]), so an id not in
/// the set has no state there yet: its fold starts from the default state
/// without asking the view. A rebuild reads every aggregate once, mostly
/// for the first time, and this saves the view a lookup per batch. Two ids
/// of one hash only cost a lookup; the set may hold more than the shadow
/// (a batch whose write failed), never less. Forgotten (`None`: every fold
/// asks the view) when the shadow is swapped in or a write into it fails,
/// since another runner may then fill a shadow of its own.
#[derive(Default)]
struct ShadowIds(Option<std::collections::HashSet<u64>>);

impl ShadowIds {
    fn hash(id: &str) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        id.hash(&mut hasher);
        hasher.finish()
    }
}

impl<A: Aggregate> ViewProjection<A> {
    /// A projection writing `to_row(state)` of every aggregate into `view`.
    pub fn new(view: Arc<dyn ViewStore>, to_row: impl Fn(&A) -> Row + Send + Sync + 'static) -> Self {
        Self {
            view,
            to_row: Arc::new(to_row),
            vault: None,
            shadow_ids: Mutex::default(),
            ahead: tokio::sync::Mutex::default(),
        }
    }

    /// Opens personal values with `vault` before `to_row` sees a state
    /// (see [`Aggregate::PERSONAL_DATA`]): the rows hold the plain values,
    /// or none for an erased subject; the states kept beside them stay
    /// sealed.
    pub fn with_vault(mut self, vault: Arc<Vault>) -> Self {
        self.vault = Some(vault);
        self
    }
}

#[async_trait]
impl<A: Aggregate> Projection<A::Event> for ViewProjection<A> {
    fn name(&self) -> &str {
        &self.view.schema().name
    }

    fn version(&self) -> u32 {
        self.view.schema().version
    }

    async fn progress(&self, copy: ViewCopy) -> Result<Option<ViewProgress>, ProjectionError> {
        Ok(self.view.progress(copy).await?)
    }

    async fn apply(
        &self,
        copy: ViewCopy,
        batch: &[Envelope<A::Event>],
        checkpoint: &Checkpoint,
    ) -> Result<(), ProjectionError> {
        if copy == ViewCopy::Shadow {
            self.finish_ahead().await?;
        }
        let changes = self.fold(copy, batch, None).await?.changes;
        let written = self.view.write(copy, &changes, checkpoint).await;
        self.after_write(copy, written)
    }

    async fn apply_fenced(
        &self,
        copy: ViewCopy,
        batch: &[Envelope<A::Event>],
        checkpoint: &Checkpoint,
        lease: &Lease,
    ) -> Result<(), ProjectionError> {
        if copy == ViewCopy::Shadow {
            self.finish_ahead().await?;
        }
        let changes = self.fold(copy, batch, None).await?.changes;
        let written = self.view.write_fenced(copy, &changes, checkpoint, lease).await;
        self.after_write(copy, written)
    }

    async fn apply_ahead(
        &self,
        batch: &[Envelope<A::Event>],
        checkpoint: &Checkpoint,
        lease: &Lease,
    ) -> Result<(), ProjectionError> {
        let mut ahead = self.ahead.lock().await;
        let Folded { changes, new, after } = self.fold(ViewCopy::Shadow, batch, Some(&ahead.carry)).await?;
        // Both in id order, so one pass sorts the changes out.
        let (mut fresh, mut known) = (Vec::with_capacity(new.len()), Vec::new());
        let mut new = new.iter().peekable();
        for change in changes {
            while new.next_if(|id| **id < change.id).is_some() {}
            if new.next_if(|id| **id == change.id).is_some() {
                fresh.push(change);
            } else {
                known.push(change);
            }
        }
        // One write at a time, in the order of the log.
        self.settle(&mut ahead).await?;
        let (view, checkpoint, lease) = (Arc::clone(&self.view), checkpoint.clone(), lease.clone());
        ahead.pending =
            Some(tokio::spawn(async move { view.write_shadow_fenced(fresh, known, &checkpoint, &lease).await }));
        ahead.carry = after;
        Ok(())
    }

    async fn finish_ahead(&self) -> Result<(), ProjectionError> {
        let mut ahead = self.ahead.lock().await;
        let settled = self.settle(&mut ahead).await;
        ahead.carry.clear();
        settled
    }

    async fn acquire_lease(&self, owner: &str, ttl: Duration) -> Result<Option<Lease>, ProjectionError> {
        Ok(self.view.acquire_lease(owner, ttl).await?)
    }

    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<bool, ProjectionError> {
        Ok(self.view.renew_lease(lease, ttl).await?)
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), ProjectionError> {
        Ok(self.view.release_lease(lease).await?)
    }

    async fn swap_fenced(&self, lease: &Lease) -> Result<(), ProjectionError> {
        self.finish_ahead().await?;
        self.set_shadow_ids(None);
        Ok(self.view.swap_fenced(lease).await?)
    }

    async fn begin_rebuild(&self) -> Result<(), ProjectionError> {
        self.drop_ahead().await;
        self.view.begin_rebuild().await?;
        self.set_shadow_ids(Some(Default::default()));
        Ok(())
    }

    async fn begin_rebuild_fenced(&self, lease: &Lease) -> Result<(), ProjectionError> {
        self.drop_ahead().await;
        self.view.begin_rebuild_fenced(lease).await?;
        self.set_shadow_ids(Some(Default::default()));
        Ok(())
    }

    async fn prepare_swap(&self) -> Result<(), ProjectionError> {
        self.finish_ahead().await?;
        Ok(self.view.prepare_swap().await?)
    }

    async fn swap(&self) -> Result<(), ProjectionError> {
        self.finish_ahead().await?;
        self.set_shadow_ids(None);
        Ok(self.view.swap().await?)
    }
}

impl<A: Aggregate> ViewProjection<A> {
    fn set_shadow_ids(&self, ids: Option<std::collections::HashSet<u64>>) {
        self.shadow_ids.lock().unwrap_or_else(|p| p.into_inner()).0 = ids;
    }

    /// Waits for the shadow write left running, if any; its failure
    /// forgets the states it carried (and, like any failed shadow write,
    /// the shadow's ids).
    async fn settle(&self, ahead: &mut Ahead<A>) -> Result<(), ProjectionError> {
        let Some(pending) = ahead.pending.as_mut() else { return Ok(()) };
        // Awaited in place: a caller cancelled meanwhile leaves the handle
        // for the next call (a new shadow waits for it), not a write
        // running loose.
        let written = pending
            .await
            .unwrap_or_else(|e| Err(ViewError::Backend(format!("a rebuild's write of the shadow copy stopped: {e}"))));
        ahead.pending = None;
        if written.is_err() {
            ahead.carry.clear();
        }
        self.after_write(ViewCopy::Shadow, written)
    }

    /// Before a new shadow: waits out the old one's last write (so that it
    /// cannot land in the new copy), whatever its outcome, and forgets
    /// what the old shadow held.
    async fn drop_ahead(&self) {
        let mut ahead = self.ahead.lock().await;
        let _ = self.settle(&mut ahead).await;
        ahead.carry.clear();
        self.set_shadow_ids(None);
    }

    /// A failed write into the shadow forgets its ids (see [`ShadowIds`]).
    fn after_write(&self, copy: ViewCopy, written: Result<(), ViewError>) -> Result<(), ProjectionError> {
        if written.is_err() && copy == ViewCopy::Shadow {
            self.set_shadow_ids(None);
        }
        Ok(written?)
    }

    /// Splits `ids` into those whose stored state in `copy` must be read
    /// and those the copy holds no row of. All must be read, except in a
    /// shadow this projection began, where only those folded into it
    /// before are; the others are new to it, and noted as folded now.
    /// Both keep the order of `ids`.
    fn stored_ids(&self, copy: ViewCopy, ids: Vec<String>) -> (Vec<String>, Vec<String>) {
        if copy != ViewCopy::Shadow {
            return (ids, Vec::new());
        }
        let mut shadow = self.shadow_ids.lock().unwrap_or_else(|p| p.into_inner());
        let Some(seen) = shadow.0.as_mut() else { return (ids, Vec::new()) };
        // `insert` is false for an id seen before (or one sharing its hash).
        ids.into_iter().partition(|id| !seen.insert(ShadowIds::hash(id)))
    }

    /// The row changes `batch` makes to `copy`, folded onto the stored
    /// states, or onto those of `carry` (a write still running) where it
    /// has them; with a `carry`, also the states after the batch.
    async fn fold(
        &self,
        copy: ViewCopy,
        batch: &[Envelope<A::Event>],
        carry: Option<&HashMap<String, (u64, A)>>,
    ) -> Result<Folded<A>, ProjectionError> {
        let mut ids: Vec<String> = batch.iter().map(|e| e.aggregate_id.clone()).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut states: HashMap<&str, (u64, A)> = HashMap::with_capacity(ids.len());
        if let Some(carry) = carry {
            for e in batch {
                if let Some((version, state)) = carry.get(e.aggregate_id.as_str()) {
                    states.entry(e.aggregate_id.as_str()).or_insert_with(|| (*version, state.clone()));
                }
            }
            ids.retain(|id| !states.contains_key(id.as_str()));
        }
        let (ids, new) = self.stored_ids(copy, ids);
        let stored = if ids.is_empty() { HashMap::new() } else { self.view.states(copy, &ids).await? };
        for (id, s) in &stored {
            let state = <A as serde::Deserialize>::deserialize(&s.state)
                .map_err(|e| ViewError::Corrupt { id: id.clone(), reason: format!("stored state: {e}") })?;
            states.insert(id.as_str(), (s.version, state));
        }
        let mut touched: Vec<&str> = Vec::new();
        for envelope in batch {
            // Drop an erased subject's key before any state is opened.
            if let (Some(vault), Some(subject)) = (&self.vault, envelope.payload.erased_subject()) {
                vault.forget(subject);
            }
            let (version, state) = states.entry(envelope.aggregate_id.as_str()).or_insert_with(|| (0, A::default()));
            // Replays after a crash may repeat events the view already has.
            if envelope.version <= *version {
                continue;
            }
            if envelope.version > *version + 1 {
                return Err(ProjectionError::Gap {
                    id: envelope.aggregate_id.clone(),
                    have: *version,
                    next: envelope.version,
                });
            }
            state.apply(&envelope.payload);
            *version = envelope.version;
            touched.push(envelope.aggregate_id.as_str());
        }
        touched.sort_unstable();
        touched.dedup();
        // Each state's JSON text is made once, straight from the typed
        // state: it is what the view stores, and what the vault opens where
        // it holds personal values.
        let mut jsons = Vec::with_capacity(touched.len());
        for id in &touched {
            let json =
                RowChange::state_of(&states[id].1).map_err(|e| ViewError::Backend(format!("state of {id}: {e}")))?;
            jsons.push(json);
        }
        let opened = self.open(&touched, &states).await?;
        let mut changes = Vec::with_capacity(touched.len());
        for ((i, id), json) in touched.iter().enumerate().zip(jsons) {
            let (version, state) = &states[id];
            let opened = opened.get(i).and_then(Option::as_ref);
            let row = if state.is_deleted() { None } else { Some((self.to_row)(opened.unwrap_or(state))) };
            changes.push(RowChange { id: (*id).to_owned(), version: *version, state: json, row });
        }
        let mut after = HashMap::new();
        if carry.is_some() {
            after.reserve(touched.len());
            for id in touched {
                if let Some(s) = states.remove(id) {
                    after.insert(id.to_owned(), s);
                }
            }
        }
        Ok(Folded { changes, new, after })
    }
}

/// What [`ViewProjection::fold`] makes of a batch.
struct Folded<A> {
    /// One change per aggregate the batch touched, in id order.
    changes: Vec<RowChange>,
    /// The ids, in order, of those changes that the copy holds no row of
    /// (known only in a shadow the projection began; empty otherwise).
    new: Vec<String>,
    /// With a carry, the states after the batch.
    after: HashMap<String, (u64, A)>,
}

impl<A: Aggregate> ViewProjection<A> {
    /// The states of `ids` (kept in `states`) opened, in that order,
    /// with one key lookup: `None` for a state without personal values
    /// (and for all of them without a vault).
    async fn open(&self, ids: &[&str], states: &HashMap<&str, (u64, A)>) -> Result<Vec<Option<A>>, ProjectionError> {
        let Some(vault) = self.vault.as_ref().filter(|_| A::PERSONAL_DATA) else { return Ok(Vec::new()) };
        // The vault reads the sealed values out of JSON trees, opened in
        // place.
        let docs = ids
            .iter()
            .map(|id| {
                let tree = serde_json::to_value(&states[id].1)
                    .map_err(|e| ViewError::Backend(format!("state of {id}: {e}")))?;
                Ok((AggregateRef::new(A::NAME, *id), tree))
            })
            .collect::<Result<Vec<(AggregateRef, Value)>, ViewError>>()?;
        Ok(vault.open_documents(docs).await.map_err(|e| match e {
            VaultError::Unavailable(m) => ViewError::Unavailable(m),
            other => ViewError::Backend(other.to_string()),
        })?)
    }
}

/// Where [`ProjectionRunner`] writes a batch.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// Into this copy, written before the call returns.
    Now(ViewCopy),
    /// Into the shadow copy, written while the next batch is folded
    /// ([`Projection::apply_ahead`]).
    ShadowAhead,
}

/// Tunables of a [`ProjectionRunner`].
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Most appends applied in one batch (one view transaction).
    pub batch_size: usize,
    /// Pause before retrying after a failure.
    pub retry_delay: Duration,
    /// How long a view's lease lasts unless renewed (by the view's
    /// database clock): a leader that stops for longer is taken over.
    pub lease_ttl: Duration,
    /// How often the leader renews its lease, and a standby polls for an
    /// expired one; well below `lease_ttl`.
    pub lease_renew: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            batch_size: 512,
            retry_delay: Duration::from_millis(500),
            lease_ttl: Duration::from_secs(5),
            lease_renew: Duration::from_secs(1),
        }
    }
}

/// What the runner knows of one projection.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectionStatus {
    /// The projection's name.
    pub name: String,
    /// How far its live copy has consumed the log.
    pub checkpoint: Checkpoint,
    /// Records in the log it has not applied yet.
    pub lag: u64,
    /// The last failure, cleared by the next successful batch.
    pub last_error: Option<String>,
    /// Whether this process leads the projection (holds its view's lease);
    /// `None` where the status comes from stored checkpoints of views that
    /// other processes write ([`StoredStatus`]).
    pub leads: Option<bool>,
    /// The last rebuild this process ran (or runs) of the projection.
    pub rebuild: Option<RebuildProgress>,
}

/// Where a rebuild is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebuildState {
    /// Filling the shadow copy.
    Running,
    /// Swapped in.
    Done,
    /// Stopped by an error; the live copy is untouched.
    Failed,
}

impl RebuildState {
    /// `running`, `done` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }
}

/// The progress of a rebuild, for operators.
#[derive(Debug, Clone, PartialEq)]
pub struct RebuildProgress {
    /// Where it is.
    pub state: RebuildState,
    /// Records of the log applied to the new copy so far.
    pub done: u64,
    /// Records the log held when it started.
    pub total: u64,
    /// Events applied to the new copy so far.
    pub events: u64,
    /// When it started (wall clock).
    pub started: SystemTime,
    /// Time spent so far, or in all once finished.
    pub elapsed: Duration,
    /// Why it failed.
    pub error: Option<String>,
}

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq)]
pub struct RebuildReport {
    /// The projection rebuilt.
    pub name: String,
    /// Events applied to the new copy.
    pub events: u64,
    /// Wall time from start to swap.
    pub elapsed: Duration,
}

/// Waits until the reads of a view reflect a given write.
#[async_trait]
pub trait CatchUp: Send + Sync {
    /// Returns once every projection has applied the record at `position`,
    /// or `false` when `timeout` passed first.
    async fn wait_for(&self, position: Position, timeout: Duration) -> bool;
}

/// [`CatchUp`] for a process that runs no projections itself (an `api`
/// process beside `projector` ones): it polls the checkpoints the views
/// store with their data ([`ListView::position`]) until every one covers
/// the position, so a client reads its own writes whichever process
/// projected them.
pub struct StoredCatchUp {
    views: Vec<Arc<dyn ListView>>,
    poll: Duration,
}

impl StoredCatchUp {
    /// Waits on the stored checkpoints of `views`, reading them every
    /// `poll` while someone waits (nothing is read while nobody does).
    pub fn new(views: Vec<Arc<dyn ListView>>, poll: Duration) -> Self {
        Self { views, poll: poll.max(Duration::from_millis(1)) }
    }
}

#[async_trait]
impl CatchUp for StoredCatchUp {
    async fn wait_for(&self, position: Position, timeout: Duration) -> bool {
        // Nothing projects here: never claim to have caught up.
        if self.views.is_empty() {
            return false;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut all = true;
            for view in &self.views {
                match view.position().await {
                    Ok(checkpoint) if checkpoint.covers(position) => {}
                    Ok(_) => all = false,
                    Err(e) => {
                        tracing::debug!(error = %e, "stored checkpoint unreadable while waiting for a position");
                        all = false;
                    }
                }
                if !all {
                    break;
                }
            }
            if all {
                return true;
            }
            if tokio::time::Instant::now() + self.poll > deadline {
                return false;
            }
            tokio::time::sleep(self.poll).await;
        }
    }
}

/// Projection status read from the checkpoints views store with their data,
/// for a process that runs no projections (an `api` process): any process
/// can report how far the views are behind the log.
pub struct StoredStatus<A: Aggregate, S> {
    store: S,
    views: Vec<Arc<dyn ListView>>,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A: Aggregate, S: EventStore<A>> StoredStatus<A, S> {
    /// The status of `views`, which follow the log of `store`.
    pub fn new(store: S, views: Vec<Arc<dyn ListView>>) -> Self {
        Self { store, views, _aggregate: PhantomData }
    }

    /// Each view's stored checkpoint and its lag behind the log's head; a
    /// view that cannot be read reports the error (and no progress).
    pub async fn status(&self) -> Result<Vec<ProjectionStatus>, StoreError> {
        let head = self.store.head().await?;
        let mut out = Vec::with_capacity(self.views.len());
        for view in &self.views {
            let (checkpoint, last_error) = match view.position().await {
                Ok(c) => (c, None),
                Err(e) => (Checkpoint::start(), Some(e.to_string())),
            };
            out.push(ProjectionStatus {
                name: view.schema().name.clone(),
                lag: checkpoint.lag_behind(&head),
                checkpoint,
                last_error,
                leads: None,
                rebuild: None,
            });
        }
        Ok(out)
    }
}

struct Slot<E> {
    projection: Arc<dyn Projection<E>>,
    progress: watch::Sender<Checkpoint>,
    /// Held while a batch is applied to the live copy, and by a rebuild
    /// while it swaps; counts swaps so that the live loop resubscribes.
    gate: tokio::sync::Mutex<u64>,
    rebuilding: tokio::sync::Mutex<()>,
    last_error: Mutex<Option<String>>,
    /// The view's lease while this runner leads the projection.
    lease: Mutex<Option<Lease>>,
    /// The last rebuild's progress.
    rebuild: Mutex<Option<RebuildProgress>>,
}

impl<E> Slot<E> {
    fn lease(&self) -> Option<Lease> {
        self.lease.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_lease(&self, lease: Option<Lease>) {
        *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = lease;
    }

    fn set_error(&self, e: Option<String>) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = e;
        }
    }

    fn rebuild_progress(&self) -> Option<RebuildProgress> {
        self.rebuild.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Marks a rebuild as running; `false` when one already is.
    fn claim_rebuild(&self) -> bool {
        let mut rebuild = self.rebuild.lock().unwrap_or_else(|p| p.into_inner());
        if rebuild.as_ref().is_some_and(|r| r.state == RebuildState::Running) {
            return false;
        }
        *rebuild = Some(RebuildProgress {
            state: RebuildState::Running,
            done: 0,
            total: 0,
            events: 0,
            started: SystemTime::now(),
            elapsed: Duration::ZERO,
            error: None,
        });
        true
    }

    fn update_rebuild(&self, f: impl FnOnce(&mut RebuildProgress)) {
        if let Some(r) = self.rebuild.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            f(r);
        }
    }
}

/// Feeds projections from the log, each from its own checkpoint, in
/// batches; rebuilds them on demand or when their version changed.
///
/// Several runners (processes) may run one projection: per projection,
/// only the holder of its view's lease ([`ViewStore::acquire_lease`])
/// works; the others stand by, polling every
/// [`RunnerConfig::lease_renew`], and take over once the lease expired
/// ([`RunnerConfig::lease_ttl`] without renewal). Every write is fenced by
/// the lease ([`Projection::apply_fenced`]): a refused one sends the runner
/// back to standby, and it reloads its checkpoint when it leads again.
pub struct ProjectionRunner<A: Aggregate, S> {
    store: S,
    config: RunnerConfig,
    /// This runner's lease owner id (random).
    owner: String,
    /// The runner itself, for the background work it starts on request.
    me: std::sync::Weak<Self>,
    slots: Vec<Arc<Slot<A::Event>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    stop: watch::Sender<bool>,
    _aggregate: PhantomData<fn() -> A>,
}

enum Interrupt {
    Stopped,
    Swapped,
}

impl<A: Aggregate, S: EventStore<A> + Clone> ProjectionRunner<A, S> {
    /// A runner over `store` for `projections`; nothing runs until
    /// [`ProjectionRunner::start`].
    pub fn new(store: S, projections: Vec<Arc<dyn Projection<A::Event>>>, config: RunnerConfig) -> Arc<Self> {
        let slots = projections
            .into_iter()
            .map(|projection| {
                Arc::new(Slot {
                    projection,
                    progress: watch::channel(Checkpoint::start()).0,
                    gate: tokio::sync::Mutex::new(0),
                    rebuilding: tokio::sync::Mutex::new(()),
                    last_error: Mutex::new(None),
                    lease: Mutex::new(None),
                    rebuild: Mutex::new(None),
                })
            })
            .collect();
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            store,
            config,
            owner: uuid::Uuid::new_v4().to_string(),
            slots,
            tasks: Mutex::new(Vec::new()),
            stop: watch::channel(false).0,
            _aggregate: PhantomData,
        })
    }

    /// Loads each projection's stored checkpoint and takes its lease when
    /// free; then, in the background, leads it (rebuilding a copy built
    /// with another version first, while the old copy serves) or stands by
    /// until the lease is free.
    pub async fn start(self: &Arc<Self>) -> Result<(), ProjectionError> {
        for slot in &self.slots {
            let stored = slot.projection.progress(ViewCopy::Live).await?;
            if let Some(p) = &stored {
                slot.progress.send_replace(p.checkpoint.clone());
            }
            if slot.lease().is_none() {
                slot.set_lease(slot.projection.acquire_lease(&self.owner, self.config.lease_ttl).await?);
            }
            let runner = Arc::clone(self);
            let slot = Arc::clone(slot);
            let task = tokio::spawn(async move { runner.follow(&slot).await });
            self.tasks.lock().unwrap_or_else(|p| p.into_inner()).push(task);
        }
        Ok(())
    }

    /// Stops the background work at once, as a crash would: batches in
    /// flight are cut and leases are not released (a standby takes over
    /// once they expire). For tests of failover.
    pub fn abort(&self) {
        for task in std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner())) {
            task.abort();
        }
    }

    /// Whether this runner holds the lease of projection `name` now.
    pub fn leads(&self, name: &str) -> bool {
        self.slot(name).is_ok_and(|s| s.lease().is_some())
    }

    /// Stops following the log; batches in progress finish first; leases
    /// are released, so that a standby takes over at once.
    pub async fn shutdown(&self) {
        self.stop.send_replace(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
    }

    /// The names of the registered projections.
    pub fn names(&self) -> Vec<String> {
        self.slots.iter().map(|s| s.projection.name().to_owned()).collect()
    }

    /// Status of every projection, with lag against the log's head.
    pub async fn status(&self) -> Result<Vec<ProjectionStatus>, StoreError> {
        let head = self.store.head().await?;
        Ok(self
            .slots
            .iter()
            .map(|s| {
                let checkpoint = s.progress.borrow().clone();
                ProjectionStatus {
                    name: s.projection.name().to_owned(),
                    lag: checkpoint.lag_behind(&head),
                    checkpoint,
                    last_error: s.last_error.lock().map(|e| e.clone()).unwrap_or(None),
                    leads: Some(s.lease().is_some()),
                    rebuild: s.rebuild_progress(),
                }
            })
            .collect())
    }

    fn slot(&self, name: &str) -> Result<&Arc<Slot<A::Event>>, ProjectionError> {
        self.slots.iter().find(|s| s.projection.name() == name).ok_or_else(|| ProjectionError::Unknown(name.to_owned()))
    }

    /// Rebuilds projection `name` from the start of the log into a shadow
    /// copy while the live copy keeps serving and following the log, then
    /// swaps the copies. `progress(done, total)` is called after each batch
    /// with the records applied and the log size at the start.
    ///
    /// Only the holder of the view's lease rebuilds: a runner that stands
    /// by fails with [`ProjectionError::Standby`]; a runner not started
    /// takes the lease for the rebuild and releases it after.
    pub async fn rebuild(
        &self,
        name: &str,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<RebuildReport, ProjectionError> {
        let slot = self.slot(name)?;
        if let Some(lease) = slot.lease() {
            return self.rebuild_with(slot, &lease, progress).await;
        }
        let lease = slot
            .projection
            .acquire_lease(&self.owner, self.config.lease_ttl)
            .await?
            .ok_or_else(|| ProjectionError::Standby(name.to_owned()))?;
        let started = !self.tasks.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
        if started {
            // The follow task takes it up instead of taking it again.
            slot.set_lease(Some(lease.clone()));
        }
        let result = self.rebuild_with(slot, &lease, progress).await;
        if !started && let Err(e) = slot.projection.release_lease(&lease).await {
            tracing::warn!(projection = name, error = %e, "could not release the lease after a rebuild");
        }
        result
    }

    /// Starts rebuilding projection `name` in the background, where this
    /// runner leads it; [`ProjectionRunner::status`] shows the progress.
    /// Refused with [`ProjectionError::Standby`] when this runner does not
    /// lead the projection (another process does: ask that one), and with
    /// [`ProjectionError::Busy`] while a rebuild of it runs.
    pub fn start_rebuild(&self, name: &str) -> Result<(), ProjectionError> {
        let runner = self.me.upgrade().ok_or(ProjectionError::Stopped)?;
        let slot = Arc::clone(self.slot(name)?);
        if slot.lease().is_none() || self.tasks.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
            return Err(ProjectionError::Standby(name.to_owned()));
        }
        if !slot.claim_rebuild() {
            return Err(ProjectionError::Busy(name.to_owned()));
        }
        let name = name.to_owned();
        tokio::spawn(async move {
            let Some(lease) = slot.lease() else {
                let e = ProjectionError::Standby(name.clone());
                slot.update_rebuild(|r| {
                    r.state = RebuildState::Failed;
                    r.error = Some(e.to_string());
                });
                return;
            };
            match runner.rebuild_with(&slot, &lease, &|_, _| {}).await {
                Ok(r) => tracing::info!(projection = %name, events = r.events, "rebuilt on request"),
                Err(e) => tracing::warn!(projection = %name, error = %e, "rebuild on request failed"),
            }
        });
        Ok(())
    }

    /// Applies `batch` to `copy` of `slot`; where the view misses events
    /// before the batch's (a [`ProjectionError::Gap`]), reads them from the
    /// log and applies them first, instead of folding onto a stale state.
    async fn apply(
        &self,
        slot: &Slot<A::Event>,
        target: Target,
        batch: Vec<Envelope<A::Event>>,
        checkpoint: &Checkpoint,
        lease: &Lease,
    ) -> Result<(), ProjectionError> {
        let mut batch = batch;
        // Each round fills one aggregate's gap; a batch holds at most
        // `batch_size` records, so this ends.
        for _ in 0..=batch.len() {
            let applied = match target {
                Target::Now(copy) => slot.projection.apply_fenced(copy, &batch, checkpoint, lease).await,
                Target::ShadowAhead => slot.projection.apply_ahead(&batch, checkpoint, lease).await,
            };
            let (id, have, next) = match applied {
                Err(ProjectionError::Gap { id, have, next }) => (id, have, next),
                other => return other,
            };
            let wanted = usize::try_from(next - have - 1).unwrap_or(usize::MAX);
            let missing = self.store.read_page(&id, have, wanted).await?;
            if missing.len() != wanted || missing.iter().zip(have + 1..).any(|(e, v)| e.version != v) {
                return Err(ProjectionError::Gap { id, have, next });
            }
            tracing::warn!(
                projection = slot.projection.name(),
                id = %id,
                have,
                next,
                "the view missed events of an aggregate; refolding them from the log"
            );
            let at = batch.iter().position(|e| e.aggregate_id == id && e.version == next).unwrap_or(0);
            batch.splice(at..at, missing);
        }
        Err(ProjectionError::View(ViewError::Backend("gaps kept coming back while refolding a batch".into())))
    }

    /// Renews `lease` when its renewal is due; a lease taken over is a
    /// [`ViewError::Fenced`].
    async fn keep_lease(
        &self,
        slot: &Slot<A::Event>,
        lease: &Lease,
        renew_at: &mut tokio::time::Instant,
    ) -> Result<(), ProjectionError> {
        if tokio::time::Instant::now() < *renew_at {
            return Ok(());
        }
        if !slot.projection.renew_lease(lease, self.config.lease_ttl).await? {
            return Err(ViewError::Fenced(format!("the lease of {} was taken over", slot.projection.name())).into());
        }
        *renew_at = tokio::time::Instant::now() + self.config.lease_renew;
        Ok(())
    }

    /// Rebuilds `slot` with `lease`, one rebuild at a time, recording its
    /// progress for [`ProjectionRunner::status`].
    async fn rebuild_with(
        &self,
        slot: &Slot<A::Event>,
        lease: &Lease,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<RebuildReport, ProjectionError> {
        let _only_one = slot.rebuilding.lock().await;
        // Already claimed when started on request; claimed here otherwise.
        slot.claim_rebuild();
        let started = Instant::now();
        // Never rebuild a view back to an older version of its projection.
        let result = match slot.projection.progress(ViewCopy::Live).await {
            Ok(stored) => match stored.and_then(|p| self.outdated(slot, p.schema_version)) {
                Some(outdated) => Err(outdated),
                None => self.rebuild_copy(slot, lease, progress).await,
            },
            Err(e) => Err(e),
        };
        slot.update_rebuild(|r| {
            r.elapsed = started.elapsed();
            match &result {
                Ok(report) => {
                    r.state = RebuildState::Done;
                    r.events = report.events;
                    r.done = r.total.max(r.done);
                }
                Err(e) => {
                    r.state = RebuildState::Failed;
                    r.error = Some(e.to_string());
                }
            }
        });
        result
    }

    async fn rebuild_copy(
        &self,
        slot: &Slot<A::Event>,
        lease: &Lease,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<RebuildReport, ProjectionError> {
        let name = slot.projection.name();
        let mut renew_at = tokio::time::Instant::now() + self.config.lease_renew;
        let started = Instant::now();
        let projection = &slot.projection;
        // The log is read by a task of its own, a few batches ahead, so that
        // reading and decoding it overlaps writing the copy. It starts while
        // the view makes the fresh copy: the first batches are ready when
        // the copy is.
        let read = async {
            let head = self.store.head().await?;
            let stream = self.store.subscribe(Checkpoint::start()).await?;
            Ok::<_, ProjectionError>((head, ReadAhead::spawn(stream, self.config.batch_size, READ_AHEAD)))
        };
        let (begun, read) = tokio::join!(projection.begin_rebuild_fenced(lease), read);
        begun?;
        let (head, mut stream) = read?;
        let total = Checkpoint::start().lag_behind(&head);
        let mut checkpoint = Checkpoint::start();
        let mut events = 0u64;
        while !checkpoint.covers_all(&head) {
            let (batch, next) = self.next_batch(&mut stream, &checkpoint).await?;
            self.keep_lease(slot, lease, &mut renew_at).await?;
            events += batch.len() as u64;
            // Written while the next batch is folded; the progress shown
            // may run one batch ahead of the shadow, which no reader sees.
            self.apply(slot, Target::ShadowAhead, batch, &next, lease).await?;
            checkpoint = next;
            let done = total - checkpoint.lag_behind(&head).min(total);
            slot.update_rebuild(|r| {
                r.done = done;
                r.total = total;
                r.events = events;
                r.elapsed = started.elapsed();
            });
            progress(done, total);
        }
        projection.finish_ahead().await?;
        // Indexes and the like before the pause, so the pause stays short.
        projection.prepare_swap().await?;
        self.keep_lease(slot, lease, &mut renew_at).await?;
        // The rest arrived while we rebuilt: take it with the live copy
        // paused, so that the swap loses nothing.
        let mut generation = slot.gate.lock().await;
        let head = self.store.head().await?;
        while !checkpoint.covers_all(&head) {
            let (batch, next) = self.next_batch(&mut stream, &checkpoint).await?;
            self.keep_lease(slot, lease, &mut renew_at).await?;
            events += batch.len() as u64;
            self.apply(slot, Target::Now(ViewCopy::Shadow), batch, &next, lease).await?;
            checkpoint = next;
        }
        projection.swap_fenced(lease).await?;
        *generation += 1;
        slot.progress.send_replace(checkpoint);
        Ok(RebuildReport { name: name.to_owned(), events, elapsed: started.elapsed() })
    }

    /// The next records of the subscription (as many as are ready, up to
    /// the batch size): their events, and the checkpoint past them. Void
    /// records bring no events but still move the checkpoint.
    async fn next_batch(
        &self,
        stream: &mut (impl futures::Stream<Item = Vec<Result<Logged<A::Event>, StoreError>>> + Unpin),
        checkpoint: &Checkpoint,
    ) -> Result<(Vec<Envelope<A::Event>>, Checkpoint), ProjectionError> {
        let chunk = stream.next().await.ok_or_else(|| StoreError::Unavailable("the log subscription ended".into()))?;
        let mut batch = Vec::new();
        let mut next = checkpoint.clone();
        for item in chunk {
            let record = item?;
            next.advance(record.position);
            batch.extend(record.events);
        }
        Ok((batch, next))
    }

    /// Leads `slot` while this runner holds its lease, stands by while
    /// another does, until the runner stops; then releases the lease.
    async fn follow(&self, slot: &Slot<A::Event>) {
        let mut stop = self.stop.subscribe();
        while let Some(lease) = self.stand_by(slot, &mut stop).await {
            match self.lead(slot, &lease, &mut stop).await {
                Ok(Interrupt::Stopped) => break,
                Ok(Interrupt::Swapped) => {}
                Err(e) if e.is_fenced() => {
                    tracing::warn!(projection = slot.projection.name(), error = %e, "lost the lease; standing by");
                    slot.set_lease(None);
                }
                Err(e @ ProjectionError::Outdated { .. }) => {
                    // Give the lease back at once, so that a runner of the
                    // current version takes over.
                    tracing::warn!(projection = slot.projection.name(), error = %e, "standing by");
                    slot.set_error(Some(e.to_string()));
                    slot.set_lease(None);
                    if let Err(e) = slot.projection.release_lease(&lease).await {
                        tracing::warn!(projection = slot.projection.name(), error = %e, "could not release the lease");
                    }
                    tokio::select! {
                        _ = stop.changed() => break,
                        _ = tokio::time::sleep(self.config.lease_renew) => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(projection = slot.projection.name(), error = %e, "projection failed; retrying");
                    slot.set_error(Some(e.to_string()));
                    tokio::select! {
                        _ = stop.changed() => break,
                        _ = tokio::time::sleep(self.config.retry_delay) => {}
                    }
                }
            }
        }
        if let Some(lease) = slot.lease() {
            slot.set_lease(None);
            if let Err(e) = slot.projection.release_lease(&lease).await {
                tracing::warn!(projection = slot.projection.name(), error = %e, "could not release the lease");
            }
        }
    }

    /// Waits until this runner holds the lease of `slot` (renewing the one
    /// it holds, or taking a free or expired one every `lease_renew`);
    /// `None` once the runner stops. While it waits, the slot's progress
    /// follows the checkpoint the leader stores.
    async fn stand_by(&self, slot: &Slot<A::Event>, stop: &mut watch::Receiver<bool>) -> Option<Lease> {
        let ttl = self.config.lease_ttl;
        loop {
            if *stop.borrow() {
                return None;
            }
            if slot.lease().is_none() {
                // Follow the leader's progress; a view built by a newer
                // version is not this runner's to take.
                if let Ok(Some(p)) = slot.projection.progress(ViewCopy::Live).await {
                    slot.progress.send_replace(p.checkpoint);
                    if let Some(e) = self.outdated(slot, p.schema_version) {
                        slot.set_error(Some(e.to_string()));
                        tokio::select! {
                            _ = stop.changed() => {}
                            _ = tokio::time::sleep(self.config.lease_renew) => {}
                        }
                        continue;
                    }
                }
            }
            let attempt = match slot.lease() {
                Some(lease) => match slot.projection.renew_lease(&lease, ttl).await {
                    Ok(true) => Ok(Some(lease)),
                    Ok(false) => {
                        slot.set_lease(None);
                        slot.projection.acquire_lease(&self.owner, ttl).await
                    }
                    Err(e) => Err(e),
                },
                None => slot.projection.acquire_lease(&self.owner, ttl).await,
            };
            match attempt {
                Ok(Some(lease)) => {
                    slot.set_lease(Some(lease.clone()));
                    return Some(lease);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(projection = slot.projection.name(), error = %e, "cannot take the lease; retrying");
                    slot.set_error(Some(e.to_string()));
                }
            }
            tokio::select! {
                _ = stop.changed() => {}
                _ = tokio::time::sleep(self.config.lease_renew) => {}
            }
        }
    }

    /// [`ProjectionError::Outdated`] when a copy built with `stored` is
    /// newer than this runner's projection.
    fn outdated(&self, slot: &Slot<A::Event>, stored: u32) -> Option<ProjectionError> {
        let mine = slot.projection.version();
        (stored > mine).then(|| ProjectionError::Outdated { name: slot.projection.name().to_owned(), stored, mine })
    }

    /// Works `slot` with `lease`: refuses a copy built by a newer version,
    /// rebuilds one built with an older version, then follows the log
    /// until stopped or refused.
    async fn lead(
        &self,
        slot: &Slot<A::Event>,
        lease: &Lease,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Interrupt, ProjectionError> {
        match slot.projection.progress(ViewCopy::Live).await? {
            Some(p) => {
                if let Some(e) = self.outdated(slot, p.schema_version) {
                    return Err(e);
                }
                if p.schema_version != slot.projection.version() {
                    let name = slot.projection.name().to_owned();
                    let r = self.rebuild_with(slot, lease, &|_, _| {}).await?;
                    tracing::info!(projection = %name, events = r.events, "rebuilt for the new version");
                }
            }
            None if slot.projection.starts_at_head() => {
                // Its first checkpoint is the log's head, stored (fenced)
                // before anything is applied: a restart goes on from there,
                // never from the beginning.
                let head = self.store.head().await?;
                self.apply(slot, Target::Now(ViewCopy::Live), Vec::new(), &head, lease).await?;
                tracing::info!(projection = slot.projection.name(), checkpoint = ?head,
                    "started at the head of the log: earlier events are not applied");
            }
            None => {}
        }
        loop {
            match self.follow_once(slot, lease, stop).await? {
                Interrupt::Swapped => continue,
                other => return Ok(other),
            }
        }
    }

    async fn follow_once(
        &self,
        slot: &Slot<A::Event>,
        lease: &Lease,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Interrupt, ProjectionError> {
        let generation = *slot.gate.lock().await;
        let mut checkpoint = slot.projection.progress(ViewCopy::Live).await?.map(|p| p.checkpoint).unwrap_or_default();
        slot.progress.send_replace(checkpoint.clone());
        let mut stream = self.store.subscribe(checkpoint.clone()).await?.ready_chunks(self.config.batch_size);
        let mut renew_at = tokio::time::Instant::now() + self.config.lease_renew;
        loop {
            let batch = tokio::select! {
                _ = stop.changed() => return Ok(Interrupt::Stopped),
                _ = tokio::time::sleep_until(renew_at) => {
                    self.keep_lease(slot, lease, &mut renew_at).await?;
                    continue;
                }
                batch = self.next_batch(&mut stream, &checkpoint) => batch?,
            };
            let (batch, next) = batch;
            self.keep_lease(slot, lease, &mut renew_at).await?;
            let gate = slot.gate.lock().await;
            if *gate != generation {
                return Ok(Interrupt::Swapped);
            }
            self.apply(slot, Target::Now(ViewCopy::Live), batch, &next, lease).await?;
            drop(gate);
            checkpoint = next;
            slot.progress.send_replace(checkpoint.clone());
            slot.set_error(None);
        }
    }
}

#[async_trait]
impl<A: Aggregate, S: EventStore<A> + Clone> CatchUp for ProjectionRunner<A, S> {
    async fn wait_for(&self, position: Position, timeout: Duration) -> bool {
        if self.slots.is_empty() {
            return false;
        }
        let waits = self.slots.iter().map(|slot| {
            let mut rx = slot.progress.subscribe();
            async move { rx.wait_for(|c| c.covers(position)).await.is_ok() }
        });
        tokio::time::timeout(timeout, futures::future::join_all(waits))
            .await
            .is_ok_and(|all| all.into_iter().all(|ok| ok))
    }
}

/// Batches a rebuild reads ahead of the batch it writes.
const READ_AHEAD: usize = 4;

/// A subscription read by a task of its own, in chunks of up to `batch`
/// records (as many as are ready), at most `depth` chunks ahead of the
/// reader of this stream: a rebuild writes one batch while the next ones
/// are read and decoded. The task stops when the stream is dropped.
struct ReadAhead<E> {
    chunks: tokio::sync::mpsc::Receiver<Vec<Result<Logged<E>, StoreError>>>,
    reader: JoinHandle<()>,
}

impl<E: Send + 'static> ReadAhead<E> {
    fn spawn(stream: crate::store::EventStream<E>, batch: usize, depth: usize) -> Self {
        let (sender, chunks) = tokio::sync::mpsc::channel(depth.max(1));
        let reader = tokio::spawn(async move {
            let mut stream = stream.ready_chunks(batch.max(1));
            while let Some(chunk) = stream.next().await {
                if sender.send(chunk).await.is_err() {
                    break;
                }
            }
        });
        Self { chunks, reader }
    }
}

impl<E> futures::Stream for ReadAhead<E> {
    type Item = Vec<Result<Logged<E>, StoreError>>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.get_mut().chunks.poll_recv(cx)
    }
}

impl<E> Drop for ReadAhead<E> {
    fn drop(&mut self) {
        self.reader.abort();
    }
}
