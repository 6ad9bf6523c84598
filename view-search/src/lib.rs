//! # kes-view-search
//!
//! List views of KES in a [Tantivy](https://docs.rs/tantivy) index, with
//! full-text search. [`SearchView`] implements [`kes_core::ViewStore`] and
//! [`kes_core::ListView`] and is interchangeable with the SQL list backend:
//! the same [`ListQuery`] gives the same rows in the
//! same order (the ListView conformance suite of `kes-core` checks it),
//! plus `q`, a Tantivy full-text query over the searchable fields, sorted
//! by relevance unless the query names a sort.
//!
//! ```
//! use kes_core::{Checkpoint, Field, ListQuery, ListView, Row, RowChange, ViewCopy, ViewSchema, ViewStore};
//! use kes_view_search::SearchView;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let dir = tempfile::tempdir().unwrap();
//! let schema = ViewSchema::new("projects", 1).field(Field::text("name").filterable().sortable().searchable());
//! let view = SearchView::open(dir.path().join("index/projects"), schema).unwrap();
//!
//! let mut row = Row::new();
//! row.insert("name".into(), "Harbour Bridge Repainting".into());
//! let state = RowChange::state_of(&serde_json::json!({})).unwrap();
//! let change = RowChange { id: "p-1".into(), version: 1, state, row: Some(row) };
//! view.write(ViewCopy::Live, &[change], &Checkpoint::start()).await.unwrap();
//!
//! // A word inside the name finds the row, whatever its case or inflection.
//! let page = view.list(&ListQuery::new().search("bridges")).await.unwrap();
//! assert_eq!(page.items[0].id, "p-1");
//! # });
//! ```
//!
//! ## How it is stored
//!
//! The view's directory (by convention `{data dir}/index/{view name}`)
//! holds one Tantivy index per copy, `copy-NNNNNN/`, a file `CURRENT`
//! naming the live one, and `.kes-writer.lock`, the writer lock (below). A
//! rebuild writes a new copy beside the live one, which keeps answering;
//! [`ViewStore::swap`] rewrites `CURRENT`
//! atomically (write, fsync, rename) and deletes the old copy. When a view
//! takes the writer lock (at open, or at a takeover), copies `CURRENT` does
//! not name (an unfinished rebuild) are deleted.
//!
//! ## Several processes: one writer, any number of readers
//!
//! Only one process writes a view's directory: the one holding the OS lock
//! of `.kes-writer.lock` (`flock` on Linux and macOS, `LockFileEx` on
//! Windows; taken without waiting, released when the view lets it go or
//! drops — or by the OS when the process dies, SIGKILL included). With it,
//! the writer holds Tantivy's own index writer of the live copy (its
//! `.tantivy-writer.lock` is an OS lock too, per copy directory); a copy
//! whose index writer is busy while the directory lock is free (a process
//! of an older version of this crate, which took only that) is left to it.
//! A directory-wide lock, rather than Tantivy's per-copy one alone, keeps
//! the writer across swaps (the live copy changes directory) and makes the
//! first creation of the view and the clean-up of copies a one-writer job.
//!
//! - [`SearchView::open`] takes the lock when it is free and works as the
//!   only writer. When another process holds it, the open still succeeds,
//!   **standing by**: it answers reads like a read-only view, refuses
//!   writes with [`ViewError::Fenced`] ([`SearchViewError::Standby`]), and
//!   touches nothing on disk.
//! - **The lock is the lease** (one host). [`ViewStore::acquire_lease`]
//!   takes the lock when free (re-reading `CURRENT` and the live copy's
//!   last commit, so the new writer goes on where the last one stopped)
//!   and answers `Some(lease)`; `None` while another process (or another
//!   view of this process) holds it. On top of the lock, the view hands
//!   its lease to one owner at a time, like the SQL view's lease row:
//!   another owner of the same view gets it once it expired (`ttl`, by
//!   this process's monotonic clock), with a higher fence; the fence is a
//!   counter of this view (the lock, not the number, fences processes
//!   apart). [`ViewStore::renew_lease`] is `true` while this view holds
//!   the lock and the lease is the current one.
//!   [`ViewStore::release_lease`] drops an unfinished rebuild, stops the
//!   index writer and unlocks, so that a standby (polling `acquire_lease`)
//!   takes over at once; the view goes on answering reads, standing by.
//!   [`ViewStore::write_fenced`], [`ViewStore::swap_fenced`] and
//!   [`ViewStore::begin_rebuild_fenced`] need the lock and the current
//!   lease, the plain [`ViewStore::write`], [`ViewStore::swap`] and
//!   [`ViewStore::begin_rebuild`] only the lock; without them they are
//!   [`ViewError::Fenced`] and change nothing. Like the SQL view's, a
//!   fenced write also refuses to move the copy's checkpoint back or to
//!   write into a copy built with another schema version, and a fenced
//!   swap a new copy behind the live one on any partition. A write holds the view's
//!   write side for its whole run, so no release or takeover happens in
//!   its middle. A process that hangs (SIGSTOP) keeps its lock: there is
//!   no takeover by expiry across processes, and no two writers either.
//! - [`SearchView::open_read_only`] (for `api` processes) takes no lock
//!   and creates nothing; writes are refused with
//!   [`SearchViewError::ReadOnly`] ([`ViewError::Backend`], "opened
//!   read-only") and `acquire_lease` is `None`. Until the writer created
//!   the view, lists are empty and the position is the start.
//!
//! A view that does not hold the lock (read-only or standing by) catches
//! up with the writer before each read (`list`, `position`, `progress`,
//! `states`): it reads `CURRENT` and, when it names another copy (a swap),
//! opens that one; otherwise it reads the live copy's `meta.json` and,
//! when it changed (a commit or a merge), takes the checkpoint from its
//! commit payload *first* and reloads the reader *after*, so the position
//! never claims more than lists show. Reloads are explicit
//! (`ReloadPolicy::Manual`), not Tantivy's `OnCommitWithDelay`: that
//! policy polls `meta.json` from a thread per index every 500 ms and
//! reloads behind our back (the checkpoint could not be read before the
//! reload), only logs a failed reload, and knows nothing of `CURRENT`;
//! two small file reads per query cost less than that delay. A reload
//! whose files vanished (the writer's clean-up of merged segments, or a
//! copy deleted after a swap) is retried from `CURRENT` a few times; after
//! that the view logs a warning and keeps answering from the reader it
//! has, whose open segment files stay readable (mmap on Unix), at the
//! position that reader matches. Tantivy's `.tantivy-meta.lock` keeps the
//! writer's garbage collection from deleting files while a reader opens
//! them.
//!
//! The Tantivy schema is derived from the [`ViewSchema`]
//! ([`index_schema`] has the table). Each [`ViewStore::write`]
//! to the live copy is one Tantivy commit whose payload holds the
//! checkpoint and the schema version, so the index and its checkpoint
//! always agree after a crash; the reader is reloaded right after the
//! commit, so a write is visible to `list` when `write` returns
//! (read-your-writes by position works).
//!
//! Writes to the shadow copy of a rebuild are not committed one by one (a
//! commit flushes a segment and syncs its files): the index writer buffers
//! them, and the copy commits every
//! [`SearchViewConfig::rebuild_commit_docs`] documents and once more in
//! [`ViewStore::swap`], before `CURRENT` names
//! it. Each of these commits carries the checkpoint of the last write it
//! holds. Until a write is committed, [`ViewStore::states`]
//! answers for it from memory, so that the next batch of the rebuild
//! folds its events into the right states, and
//! [`ViewStore::progress`] of the shadow
//! reports the checkpoint of the last write. A crash loses only the
//! unfinished shadow, which the next open deletes anyway (the rebuild
//! starts over); a write that fails midway marks the shadow broken (it
//! refuses further writes and the swap) until the next rebuild begins.
//!
//! ## How a list is answered
//!
//! Filters become Tantivy term, range, set and exists queries on the
//! exact-value fields; `q` goes through Tantivy's
//! `QueryParser` (strict: a query it cannot parse is
//! [`QueryError::BadSearch`](kes_core::QueryError::BadSearch)), words
//! combined with AND, over the searchable fields only. One search then
//! counts the matches (`total`) and, in a collector that reads the sort
//! keys from fast fields, skips rows up to the keyset cursor and keeps the
//! first page in the shared order (missing values last, `id` last): a page
//! costs one pass over the matching documents. With `q` and no sort, pages are in relevance order and cursors
//! are offsets.
//!
//! Searchable text uses Tantivy's `en_stem` analyzer (words split on
//! non-alphanumerics, lower-cased, Porter-stemmed); searchable keywords are
//! one lower-cased token each (a tag is found by its whole value).
//!
//! ## Limits
//!
//! - Relevance pages use offset cursors: rows written between two pages can
//!   shift them (keyset pages, with a sort, never shift).
//! - Tantivy leaves terms longer than 65 530 bytes out of its index, so an
//!   exact filter on a longer text value does not match it.
//! - A copy built from other fields keeps serving after the schema changed,
//!   but the runner rebuilds it only when the schema version was bumped.
//! - The old copy is deleted right after a swap while searches (in this
//!   process or in readers elsewhere) may still read it: fine on Unix;
//!   elsewhere a failed deletion is logged and retried at the next
//!   takeover of the writer.
//! - The writer lock is a lock of one host's file system: processes on
//!   several hosts sharing a network file system are not fenced apart
//!   (`flock` over NFS is not to be trusted).
//! - A view that does not write reads `CURRENT` and `meta.json` before
//!   each read; a reader serving many queries per second pays two small
//!   file reads each.
//!
//! ## Features
//!
//! | feature | what it adds |
//! |---|---|
//! | (none) | everything above; the crate has no optional parts |

mod collect;
mod copy;
mod error;
mod layout;
mod query;

use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kes_core::{
    Checkpoint, Lease, ListQuery, ListView, Page, RowChange, StoredState, ViewCopy, ViewError, ViewProgress,
    ViewSchema, ViewStore,
};
use tantivy::TantivyError;

use crate::copy::{Commits, IndexCopy};
pub use crate::error::SearchViewError;
pub use crate::layout::{index_document, index_schema, register_tokenizers};

/// The file naming the live copy's directory.
const CURRENT: &str = "CURRENT";
const COPY_PREFIX: &str = "copy-";
/// The file whose OS lock (`flock` on Unix) makes a process the writer of
/// the view's directory: the view's lease.
const WRITER_LOCK: &str = ".kes-writer.lock";
/// How often a view that does not write tries to catch up with the
/// writer's files before it keeps answering from what it has.
const REFRESH_ATTEMPTS: u32 = 3;

/// Where a [`SearchView`] lives and how it indexes.
/// `SearchViewConfig::in_dir(dir)` gives the defaults; a directory alone
/// converts into one (`SearchView::open(dir, schema)`).
#[derive(Debug, Clone)]
pub struct SearchViewConfig {
    dir: PathBuf,
    pub(crate) writer_memory_bytes: usize,
    pub(crate) writer_threads: usize,
    pub(crate) rebuild_commit_docs: usize,
}

impl<P: AsRef<Path>> From<P> for SearchViewConfig {
    fn from(dir: P) -> Self {
        Self::in_dir(dir)
    }
}

impl SearchViewConfig {
    /// The default settings for the view stored in `dir` (created when
    /// missing by [`SearchView::open`]).
    pub fn in_dir(dir: impl AsRef<Path>) -> Self {
        Self {
            dir: dir.as_ref().to_owned(),
            writer_memory_bytes: 50_000_000,
            writer_threads: 1,
            rebuild_commit_docs: 50_000,
        }
    }

    /// Memory budget of each copy's index writer, in bytes (Tantivy needs
    /// at least 15 MB per thread). Default 50 MB.
    pub fn writer_memory_bytes(mut self, bytes: usize) -> Self {
        self.writer_memory_bytes = bytes;
        self
    }

    /// Indexing threads of each copy's writer. Default 1.
    pub fn writer_threads(mut self, threads: usize) -> Self {
        self.writer_threads = threads.max(1);
        self
    }

    /// During a rebuild, how many documents the shadow copy buffers before
    /// it commits (and at most how many states it keeps in memory for
    /// [`ViewStore::states`]); the rest is
    /// committed at the swap. Default 50 000.
    pub fn rebuild_commit_docs(mut self, docs: usize) -> Self {
        self.rebuild_commit_docs = docs.max(1);
        self
    }
}

/// A list view in a Tantivy index. See the crate docs.
pub struct SearchView {
    /// Shared with the blocking tasks that do the index work.
    inner: Arc<Inner>,
}

/// How a view was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// [`SearchView::open_read_only`]: never writes, never takes the lock.
    ReadOnly,
    /// [`SearchView::open`]: writes while it holds the directory's writer
    /// lock, stands by (reading) while another process holds it.
    Writer,
}

struct Inner {
    schema: Arc<ViewSchema>,
    root: PathBuf,
    config: SearchViewConfig,
    access: Access,
    /// `None` only in a view that does not write, while no copy exists yet.
    live: RwLock<Option<Arc<IndexCopy>>>,
    shadow: Mutex<Option<Arc<IndexCopy>>>,
    /// The number of the next copy directory.
    next_copy: AtomicU64,
    /// Whether this view holds the writer, and the lease it handed out.
    /// Writes hold it shared for their whole run, so that a release or a
    /// takeover never happens in the middle of one.
    lead: RwLock<Leadership>,
    /// Mirrors `lead.lock.is_some()`, for checks that must not wait.
    holding: AtomicBool,
    /// One catch-up with the writer's files at a time.
    refreshing: Mutex<()>,
}

/// The write side of a view in this process.
#[derive(Default)]
struct Leadership {
    /// The locked [`WRITER_LOCK`] file while this view is the writer; the
    /// live copy's (and a shadow's) Tantivy index writer exists only then.
    lock: Option<File>,
    /// The lease handed out on top of the lock (runners of this process).
    lease: Option<HeldLease>,
    /// The last fence handed out.
    fence: u64,
}

struct HeldLease {
    owner: String,
    fence: u64,
    until: Instant,
}

impl HeldLease {
    fn is(&self, lease: &Lease) -> bool {
        self.owner == lease.owner && self.fence == lease.fence
    }
}

impl std::fmt::Debug for SearchView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SearchView")
            .field("view", &self.inner.schema.name)
            .field("root", &self.inner.root)
            .field("read_only", &(self.inner.access == Access::ReadOnly))
            .field("holds_writer", &self.holds_writer())
            .finish()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SearchViewError + '_ {
    move |source| SearchViewError::Io { path: path.to_owned(), source }
}

fn copy_number(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(COPY_PREFIX)?;
    (digits.len() == 6 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok())?
}

fn copy_name(n: u64) -> String {
    format!("{COPY_PREFIX}{n:06}")
}

/// The copy `CURRENT` names; `None` when there is none (yet).
fn read_current(root: &Path) -> Result<Option<String>, SearchViewError> {
    let path = root.join(CURRENT);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let name = text.trim().to_owned();
            copy_number(&name).ok_or_else(|| SearchViewError::NotAViewIndex(format!("{CURRENT} names {name:?}")))?;
            Ok(Some(name))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SearchViewError::Io { path, source }),
    }
}

/// Replaces `CURRENT` with `name`, atomically: a crash leaves either the
/// old or the new pointer, never a torn one.
fn write_current(root: &Path, name: &str) -> Result<(), SearchViewError> {
    let tmp = root.join(format!("{CURRENT}.tmp"));
    let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(name.as_bytes()).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, root.join(CURRENT)).map_err(io(root))?;
    // Make the rename itself durable.
    std::fs::File::open(root).and_then(|d| d.sync_all()).map_err(io(root))
}

/// Takes the OS lock of the view directory's [`WRITER_LOCK`] file without
/// waiting; `None` when another open file holds it (another process, or
/// another view of this process). The OS releases it when the file is
/// closed, which a dying process does too.
fn lock_root(root: &Path) -> Result<Option<File>, SearchViewError> {
    let path = root.join(WRITER_LOCK);
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(source)) => Err(SearchViewError::Io { path, source }),
    }
}

impl SearchView {
    /// Checks the rows, then writes them (fenced by `lease` when given)
    /// off the async executor.
    async fn write_with(
        &self,
        copy: ViewCopy,
        changes: Vec<RowChange>,
        checkpoint: &Checkpoint,
        lease: Option<Lease>,
    ) -> Result<(), ViewError> {
        for change in &changes {
            if let Some(row) = &change.row {
                self.inner.schema.check_row(row)?;
            }
        }
        let inner = Arc::clone(&self.inner);
        let checkpoint = checkpoint.clone();
        blocking(move || inner.write(copy, &changes, &checkpoint, lease.as_ref())).await
    }

    /// Opens (or creates) the view stored in the directory `config` names
    /// (or in a directory given alone), as its writer when it can get the
    /// directory's writer lock, or else standing by. Validates the schema
    /// first.
    ///
    /// A standby view answers reads like one from
    /// [`SearchView::open_read_only`] and takes the writer over through
    /// [`ViewStore::acquire_lease`] once the process holding it released
    /// it or died (see the crate docs).
    ///
    /// A live copy built from another schema is opened as it is and keeps
    /// answering the queries its fields allow (others get
    /// [`ViewError::Unavailable`]); its stored schema version differs, so
    /// the projection runner rebuilds it and swaps the new copy in.
    pub fn open(config: impl Into<SearchViewConfig>, schema: ViewSchema) -> Result<Self, SearchViewError> {
        schema.validate()?;
        let config = config.into();
        let root = config.dir.clone();
        std::fs::create_dir_all(&root).map_err(io(&root))?;
        let view = Self::new(root, schema, config, Access::Writer);
        let got = {
            let mut lead = view.inner.lead.write().unwrap_or_else(|p| p.into_inner());
            view.inner.take_writer(&mut lead)?
        };
        if !got {
            tracing::info!(
                view = %view.inner.schema.name,
                dir = %view.inner.root.display(),
                "another process writes the view; this one stands by (it answers reads and takes over the \
                 writer once free)"
            );
            view.inner.load_read_only()?;
        }
        Ok(view)
    }

    /// Opens the view stored in the directory `config` names for reading only, beside the process
    /// that writes it (an `api` process beside a `projector`). It takes no
    /// lock, creates nothing and never writes: writes are refused with
    /// [`SearchViewError::ReadOnly`] ([`ViewError::Backend`]) and
    /// [`ViewStore::acquire_lease`] answers `None`.
    ///
    /// Each read first catches up with the writer: it follows `CURRENT` to
    /// the live copy (a rebuild's swap), reads the checkpoint of that
    /// copy's last commit, then reloads its reader, so `list` sees every
    /// commit `position` reports. While no copy exists yet (the writer has
    /// not started), lists are empty and the position is the start of the
    /// log.
    ///
    /// Fails when `CURRENT` names no copy of a view index or the copy it
    /// names cannot be opened.
    pub fn open_read_only(config: impl Into<SearchViewConfig>, schema: ViewSchema) -> Result<Self, SearchViewError> {
        schema.validate()?;
        let config = config.into();
        let view = Self::new(config.dir.clone(), schema, config, Access::ReadOnly);
        view.inner.load_read_only()?;
        Ok(view)
    }

    fn new(root: PathBuf, schema: ViewSchema, config: SearchViewConfig, access: Access) -> Self {
        Self {
            inner: Arc::new(Inner {
                schema: Arc::new(schema),
                root,
                config,
                access,
                live: RwLock::new(None),
                shadow: Mutex::new(None),
                next_copy: AtomicU64::new(1),
                lead: RwLock::new(Leadership::default()),
                holding: AtomicBool::new(false),
                refreshing: Mutex::new(()),
            }),
        }
    }

    /// The directory of the view (holding `CURRENT` and the copies).
    pub fn dir(&self) -> &Path {
        &self.inner.root
    }

    /// The directory of the live copy's Tantivy index this view reads;
    /// `None` in a view that does not write while no copy exists yet.
    pub fn live_index_dir(&self) -> Option<PathBuf> {
        self.inner.live().map(|copy| copy.path.clone())
    }

    /// Whether the view was opened with [`SearchView::open_read_only`].
    pub fn is_read_only(&self) -> bool {
        self.inner.access == Access::ReadOnly
    }

    /// Whether this view holds the writer lock of its directory now (it
    /// may write); `false` while it stands by or was opened read-only.
    pub fn holds_writer(&self) -> bool {
        self.inner.holding.load(Ordering::SeqCst)
    }
}

impl Inner {
    fn lead(&self) -> RwLockReadGuard<'_, Leadership> {
        self.lead.read().unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self) -> Option<Arc<IndexCopy>> {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_live(&self, copy: Option<Arc<IndexCopy>>) -> Option<Arc<IndexCopy>> {
        std::mem::replace(&mut *self.live.write().unwrap_or_else(|p| p.into_inner()), copy)
    }

    fn shadow(&self) -> Result<Arc<IndexCopy>, SearchViewError> {
        self.shadow.lock().unwrap_or_else(|p| p.into_inner()).clone().ok_or(SearchViewError::NoRebuild)
    }

    /// A copy to write to: only while this view holds the writer (`lead`
    /// is held for the whole write).
    fn writable(&self, lead: &Leadership, copy: ViewCopy) -> Result<Arc<IndexCopy>, SearchViewError> {
        if self.access == Access::ReadOnly {
            return Err(SearchViewError::ReadOnly(self.schema.name.clone()));
        }
        if lead.lock.is_none() {
            return Err(SearchViewError::Standby(self.schema.name.clone()));
        }
        match copy {
            ViewCopy::Live => self.live().ok_or_else(|| SearchViewError::Standby(self.schema.name.clone())),
            ViewCopy::Shadow => self.shadow(),
        }
    }

    /// Checks that `lease` is the one this view handed out last, while it
    /// holds the writer.
    fn check_lease(&self, lead: &Leadership, lease: &Lease) -> Result<(), SearchViewError> {
        if self.access == Access::ReadOnly {
            return Err(SearchViewError::ReadOnly(self.schema.name.clone()));
        }
        if lead.lock.is_none() {
            return Err(SearchViewError::Standby(self.schema.name.clone()));
        }
        match &lead.lease {
            Some(held) if held.is(lease) => Ok(()),
            Some(held) => Err(SearchViewError::Fenced(format!(
                "the lease of view {} is held by {} with fence {}, not by {} with fence {}",
                self.schema.name, held.owner, held.fence, lease.owner, lease.fence
            ))),
            None => Err(SearchViewError::Fenced(format!(
                "the lease of view {} ({} with fence {}) was released",
                self.schema.name, lease.owner, lease.fence
            ))),
        }
    }

    /// Before a read: a view that does not write catches up with the
    /// process that does.
    fn follow_writer(&self) {
        let lead = self.lead();
        if lead.lock.is_some() {
            return;
        }
        if let Err(e) = self.refresh() {
            tracing::warn!(
                view = %self.schema.name,
                dir = %self.root.display(),
                error = %e,
                "cannot catch up with the index's writer; answering from the copy as last loaded"
            );
        }
        drop(lead);
    }

    /// Follows `CURRENT` to the live copy and reloads its reader when the
    /// writer committed (or merged) since. A failure (a copy deleted after
    /// a swap, segment files cleaned up) is retried after reading
    /// `CURRENT` again; after the last attempt the view keeps its reader,
    /// whose open files stay readable (mmap), and its position.
    fn refresh(&self) -> Result<(), SearchViewError> {
        let _one = self.refreshing.lock().unwrap_or_else(|p| p.into_inner());
        let mut attempt = 0;
        loop {
            let result = match read_current(&self.root) {
                Ok(None) => return Ok(()),
                Ok(Some(name)) => match self.live() {
                    Some(copy) if copy.name() == name => copy.refresh(),
                    _ => IndexCopy::open_read_only(&self.root.join(&name), &self.schema).map(|copy| {
                        self.set_live(Some(Arc::new(copy)));
                    }),
                },
                Err(e) => Err(e),
            };
            attempt += 1;
            match result {
                Ok(()) => return Ok(()),
                Err(e) if attempt >= REFRESH_ATTEMPTS => return Err(e),
                Err(e) => {
                    tracing::debug!(view = %self.schema.name, error = %e, attempt, "catching up failed; retrying");
                    std::thread::sleep(Duration::from_millis(5u64 << attempt));
                }
            }
        }
    }

    /// The first load of a view that does not write: like
    /// [`Inner::refresh`], but an error is the caller's.
    fn load_read_only(&self) -> Result<(), SearchViewError> {
        let lead = self.lead();
        let result = self.refresh();
        drop(lead);
        result
    }

    /// Takes the directory's writer lock and, with it, the live copy's
    /// index writer (creating the first copy when there is none); `false`
    /// when another process (or view) holds the lock. Copies `CURRENT`
    /// does not name (unfinished rebuilds, or leftovers of a crash) are
    /// deleted, now that nobody else writes.
    // Kept in one piece: Each step holds the lock the next one needs (directory lock, then writer, then the
    // cleanup only the lock holder may do); split, the steps would pass the lock around.
    fn take_writer(&self, lead: &mut Leadership) -> Result<bool, SearchViewError> {
        if lead.lock.is_some() {
            return Ok(true);
        }
        let Some(lock) = lock_root(&self.root)? else { return Ok(false) };
        let current = read_current(&self.root)?;
        let mut highest = 0;
        let mut others = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(io(&self.root))? {
            let entry = entry.map_err(io(&self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(n) = copy_number(&name) else { continue };
            highest = highest.max(n);
            if current.as_deref() != Some(name.as_str()) {
                others.push(entry.path());
            }
        }
        let live = match current {
            Some(name) => match IndexCopy::open(&self.root.join(&name), &self.schema, &self.config) {
                Ok(copy) => copy,
                Err(SearchViewError::Tantivy(TantivyError::LockFailure(..))) => {
                    // Free directory lock, busy index lock: a process that
                    // writes without the directory lock (an older version
                    // of this crate). It keeps writing; this view waits.
                    tracing::warn!(
                        view = %self.schema.name,
                        copy = %name,
                        "the live copy's index writer is held by a process that does not hold the view's lock \
                         (an older version?); standing by"
                    );
                    return Ok(false);
                }
                Err(e) => return Err(e),
            },
            None => {
                highest += 1;
                let name = copy_name(highest);
                let path = self.root.join(&name);
                others.retain(|p| p != &path);
                if path.exists() {
                    // Created by an open that crashed before writing CURRENT.
                    std::fs::remove_dir_all(&path).map_err(io(&path))?;
                }
                let copy = IndexCopy::create(&path, &self.schema, &self.config, Commits::EachWrite)?;
                write_current(&self.root, &name)?;
                copy
            }
        };
        for path in others {
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::warn!(view = %self.schema.name, path = %path.display(), error = %e, "cannot delete an unused copy");
            }
        }
        if !live.is_current() {
            let stored = live.progress().map(|p| p.schema_version);
            tracing::warn!(
                view = %self.schema.name,
                stored_version = ?stored,
                version = self.schema.version,
                "the index was built from other fields; it serves what it can until rebuilt \
                 (a rebuild starts only when the schema version differs from the stored one)"
            );
        }
        // The copy opened for reading until now (if any) is dropped once
        // the searches using it end.
        self.set_live(Some(Arc::new(live)));
        *self.shadow.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.next_copy.store(highest + 1, Ordering::SeqCst);
        lead.lock = Some(lock);
        self.holding.store(true, Ordering::SeqCst);
        Ok(true)
    }

    /// Gives the writer up: drops an unfinished rebuild, stops the live
    /// copy's index writer (its lock released), then the directory lock.
    /// The view goes on answering reads, following the next writer.
    fn drop_writer(&self, lead: &mut Leadership) {
        if let Some(shadow) = self.shadow.lock().unwrap_or_else(|p| p.into_inner()).take()
            && let Err(e) = shadow.retire()
        {
            tracing::warn!(view = %self.schema.name, error = %e, "the unfinished rebuild could not be deleted");
        }
        if let Some(live) = self.live()
            && let Err(e) = live.release_writer()
        {
            tracing::warn!(view = %self.schema.name, error = %e, "stopping the index writer failed");
        }
        lead.lease = None;
        lead.lock = None;
        self.holding.store(false, Ordering::SeqCst);
    }

    fn acquire_lease(&self, owner: &str, ttl: Duration) -> Result<Option<Lease>, SearchViewError> {
        if self.access == Access::ReadOnly {
            return Ok(None);
        }
        let mut lead = self.lead.write().unwrap_or_else(|p| p.into_inner());
        if !self.take_writer(&mut lead)? {
            return Ok(None);
        }
        let now = Instant::now();
        if lead.lease.as_ref().is_some_and(|held| held.owner != owner && held.until > now) {
            return Ok(None);
        }
        lead.fence += 1;
        let fence = lead.fence;
        lead.lease = Some(HeldLease { owner: owner.to_owned(), fence, until: now + ttl });
        Ok(Some(Lease { owner: owner.to_owned(), fence }))
    }

    fn renew_lease(&self, lease: &Lease, ttl: Duration) -> bool {
        let mut lead = self.lead.write().unwrap_or_else(|p| p.into_inner());
        if lead.lock.is_none() {
            return false;
        }
        match &mut lead.lease {
            Some(held) if held.is(lease) => {
                held.until = Instant::now() + ttl;
                true
            }
            _ => false,
        }
    }

    fn release_lease(&self, lease: &Lease) {
        let mut lead = self.lead.write().unwrap_or_else(|p| p.into_inner());
        if lead.lock.is_some() && lead.lease.as_ref().is_some_and(|held| held.is(lease)) {
            self.drop_writer(&mut lead);
        }
    }

    fn begin_rebuild(&self) -> Result<(), SearchViewError> {
        let mut shadow = self.shadow.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = shadow.take() {
            old.retire()?;
        }
        let name = copy_name(self.next_copy.fetch_add(1, Ordering::SeqCst));
        let path = self.root.join(name);
        *shadow = Some(Arc::new(IndexCopy::create(&path, &self.schema, &self.config, Commits::Deferred)?));
        Ok(())
    }

    fn swap(&self) -> Result<(), SearchViewError> {
        let mut shadow = self.shadow.lock().unwrap_or_else(|p| p.into_inner());
        let new = shadow.take().ok_or(SearchViewError::NoRebuild)?;
        // The buffered tail of the rebuild is committed before the copy is
        // named live, so that `CURRENT` never names a copy missing writes.
        if let Err(e) = new.finish() {
            *shadow = Some(new);
            return Err(e);
        }
        if let Err(e) = write_current(&self.root, &new.name()) {
            *shadow = Some(new);
            return Err(e);
        }
        let old = self.set_live(Some(new));
        drop(shadow);
        // The swap has happened; a copy left on disk is deleted at the next
        // takeover of the writer. Processes reading it keep their open files.
        if let Some(old) = old
            && let Err(e) = old.retire()
        {
            tracing::warn!(view = %self.schema.name, error = %e, "the old copy could not be deleted");
        }
        Ok(())
    }

    /// Runs `op` on the write side: with the writer held (and, with a
    /// lease, that lease current) for the whole of it.
    fn on_write_side<T>(
        &self,
        lease: Option<&Lease>,
        op: impl FnOnce(&Self) -> Result<T, SearchViewError>,
    ) -> Result<T, SearchViewError> {
        let lead = self.lead();
        match lease {
            Some(lease) => self.check_lease(&lead, lease)?,
            None => {
                self.writable(&lead, ViewCopy::Live)?;
            }
        }
        let result = op(self);
        drop(lead);
        result
    }

    fn write(
        &self,
        copy: ViewCopy,
        changes: &[RowChange],
        checkpoint: &Checkpoint,
        lease: Option<&Lease>,
    ) -> Result<(), SearchViewError> {
        let lead = self.lead();
        if let Some(lease) = lease {
            self.check_lease(&lead, lease)?;
        }
        let target = self.writable(&lead, copy)?;
        if lease.is_some() {
            self.check_forward(&target, checkpoint)?;
        }
        let result = target.write(changes, checkpoint, self.schema.version);
        drop(lead);
        result
    }

    /// A fenced write refuses, like the SQL view's, to move the copy's
    /// checkpoint back and to write into a copy built with another schema
    /// version (a runner of an older version left over from a rolling
    /// deploy, or a newer one that has not rebuilt yet).
    fn check_forward(&self, copy: &IndexCopy, next: &Checkpoint) -> Result<(), SearchViewError> {
        let Some(stored) = copy.progress() else { return Ok(()) };
        if stored.schema_version != self.schema.version {
            return Err(SearchViewError::Fenced(format!(
                "view {}: the copy was built with schema version {}, this writer has version {}",
                self.schema.name, stored.schema_version, self.schema.version
            )));
        }
        if !next.covers_all(&stored.checkpoint) {
            return Err(SearchViewError::Fenced(format!(
                "view {}: checkpoint {} would move back from {}",
                self.schema.name,
                next.to_json(),
                stored.checkpoint.to_json()
            )));
        }
        Ok(())
    }

    /// A fenced swap refuses, like the SQL view's, a new copy that has not
    /// reached the live one on every partition: a swap never moves the
    /// view back.
    fn check_swap(&self) -> Result<(), SearchViewError> {
        let checkpoint = |copy: Option<Arc<IndexCopy>>| copy.and_then(|c| c.progress()).map(|p| p.checkpoint);
        let live = checkpoint(self.live()).unwrap_or_default();
        let new = checkpoint(Some(self.shadow()?)).unwrap_or_default();
        if new.covers_all(&live) {
            return Ok(());
        }
        Err(SearchViewError::Fenced(format!(
            "view {}: the new copy ({}) is behind the live one ({}); not swapped",
            self.schema.name,
            new.to_json(),
            live.to_json()
        )))
    }

    fn progress(&self, copy: ViewCopy) -> Result<Option<ViewProgress>, SearchViewError> {
        match copy {
            ViewCopy::Live => {
                self.follow_writer();
                Ok(self.live().and_then(|c| c.progress()))
            }
            ViewCopy::Shadow => Ok(self.shadow()?.progress()),
        }
    }
}

/// Runs blocking index work off the async executor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SearchViewError> + Send + 'static,
) -> Result<T, ViewError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(ViewError::from),
        Err(e) => Err(SearchViewError::Task(e.to_string()).into()),
    }
}

#[async_trait]
impl ListView for SearchView {
    fn schema(&self) -> &ViewSchema {
        &self.inner.schema
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, ViewError> {
        let query = query.validate(&self.inner.schema)?;
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            inner.follow_writer();
            match inner.live() {
                Some(copy) => copy.list(&inner.schema, &query),
                None => Ok(Page { items: Vec::new(), next: None, total: 0 }),
            }
        })
        .await
    }

    async fn position(&self) -> Result<Checkpoint, ViewError> {
        self.live_checkpoint().await
    }
}

/// Leases: the directory's writer lock is the lease. `acquire_lease` takes
/// the lock (when free) and hands out a lease on top of it to one owner at
/// a time (another owner of this process gets it once it expired, with a
/// higher fence); `renew_lease` holds while this view holds the lock and
/// the lease is current; `release_lease` gives the lock up. Writes need
/// the lock, fenced ones also the current lease. See the crate docs.
#[async_trait]
impl ViewStore for SearchView {
    async fn progress(&self, copy: ViewCopy) -> Result<Option<ViewProgress>, ViewError> {
        if self.holds_writer() {
            // The only writer: nothing to catch up with.
            return Ok(match copy {
                ViewCopy::Live => self.inner.live().and_then(|c| c.progress()),
                ViewCopy::Shadow => self.inner.shadow()?.progress(),
            });
        }
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.progress(copy)).await
    }

    async fn states(&self, copy: ViewCopy, ids: &[String]) -> Result<HashMap<String, StoredState>, ViewError> {
        let inner = Arc::clone(&self.inner);
        let ids = ids.to_vec();
        blocking(move || match copy {
            ViewCopy::Live => {
                inner.follow_writer();
                match inner.live() {
                    Some(live) => live.states(&ids),
                    None => Ok(HashMap::new()),
                }
            }
            ViewCopy::Shadow => inner.shadow()?.states(&ids),
        })
        .await
    }

    async fn write(&self, copy: ViewCopy, changes: &[RowChange], checkpoint: &Checkpoint) -> Result<(), ViewError> {
        self.write_with(copy, changes.to_vec(), checkpoint, None).await
    }

    async fn write_fenced(
        &self,
        copy: ViewCopy,
        changes: &[RowChange],
        checkpoint: &Checkpoint,
        lease: &Lease,
    ) -> Result<(), ViewError> {
        self.write_with(copy, changes.to_vec(), checkpoint, Some(lease.clone())).await
    }

    async fn write_fenced_owned(
        &self,
        copy: ViewCopy,
        changes: Vec<RowChange>,
        checkpoint: &Checkpoint,
        lease: &Lease,
    ) -> Result<(), ViewError> {
        self.write_with(copy, changes, checkpoint, Some(lease.clone())).await
    }

    async fn begin_rebuild(&self) -> Result<(), ViewError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.on_write_side(None, Inner::begin_rebuild)).await
    }

    async fn begin_rebuild_fenced(&self, lease: &Lease) -> Result<(), ViewError> {
        let (inner, lease) = (Arc::clone(&self.inner), lease.clone());
        blocking(move || inner.on_write_side(Some(&lease), Inner::begin_rebuild)).await
    }

    async fn prepare_swap(&self) -> Result<(), ViewError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.on_write_side(None, |inner| inner.shadow()?.flush())).await
    }

    async fn swap(&self) -> Result<(), ViewError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.on_write_side(None, Inner::swap)).await
    }

    async fn swap_fenced(&self, lease: &Lease) -> Result<(), ViewError> {
        let (inner, lease) = (Arc::clone(&self.inner), lease.clone());
        blocking(move || {
            inner.on_write_side(Some(&lease), |inner| {
                inner.check_swap()?;
                inner.swap()
            })
        })
        .await
    }

    async fn acquire_lease(&self, owner: &str, ttl: Duration) -> Result<Option<Lease>, ViewError> {
        if self.inner.access == Access::ReadOnly {
            return Ok(None);
        }
        let (inner, owner) = (Arc::clone(&self.inner), owner.to_owned());
        blocking(move || inner.acquire_lease(&owner, ttl)).await
    }

    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<bool, ViewError> {
        let (inner, lease) = (Arc::clone(&self.inner), lease.clone());
        blocking(move || Ok(inner.renew_lease(&lease, ttl))).await
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), ViewError> {
        let (inner, lease) = (Arc::clone(&self.inner), lease.clone());
        blocking(move || {
            inner.release_lease(&lease);
            Ok(())
        })
        .await
    }
}
