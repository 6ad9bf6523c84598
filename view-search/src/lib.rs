//! # kes-view-search
//!
//! List views of KES in a [Tantivy](https://docs.rs/tantivy) index, with
//! full-text search. [`SearchView`] implements [`kes_core::ViewStore`] and
//! [`kes_core::ListView`] and is interchangeable with the SQL list backend:
//! the same [`ListQuery`](kes_core::ListQuery) gives the same rows in the
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
//! let change = RowChange { id: "p-1".into(), version: 1, state: serde_json::json!({}), row: Some(row) };
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
//! holds one Tantivy index per copy, `copy-NNNNNN/`, and a file `CURRENT`
//! naming the live one. A rebuild writes a new copy beside the live one,
//! which keeps answering; [`ViewStore::swap`](kes_core::ViewStore::swap)
//! rewrites `CURRENT` atomically (write, fsync, rename) and deletes the old
//! copy. At open, copies `CURRENT` does not name (an unfinished rebuild)
//! are deleted.
//!
//! The Tantivy schema is derived from the [`ViewSchema`](kes_core::ViewSchema)
//! ([`index_schema`] has the table). Each [`ViewStore::write`](kes_core::ViewStore::write)
//! to the live copy is one Tantivy commit whose payload holds the
//! checkpoint and the schema version, so the index and its checkpoint
//! always agree after a crash; the reader is reloaded right after the
//! commit, so a write is visible to `list` when `write` returns
//! (read-your-writes by position works).
//!
//! Writes to the shadow copy of a rebuild are not committed one by one (a
//! commit flushes a segment and syncs its files): the index writer buffers
//! them, and the copy commits every
//! [`SearchConfig::rebuild_commit_docs`] documents and once more in
//! [`ViewStore::swap`](kes_core::ViewStore::swap), before `CURRENT` names
//! it. Each of these commits carries the checkpoint of the last write it
//! holds. Until a write is committed, [`ViewStore::states`](kes_core::ViewStore::states)
//! answers for it from memory, so that the next batch of the rebuild
//! folds its events into the right states, and
//! [`ViewStore::progress`](kes_core::ViewStore::progress) of the shadow
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
//! - The old copy is deleted right after a swap while searches may still
//!   read it: fine on Unix; elsewhere a failed deletion is logged and
//!   retried at the next open.
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
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use kes_core::{
    Checkpoint, ListQuery, ListView, Page, RowChange, StoredState, ViewCopy, ViewError, ViewProgress, ViewSchema,
    ViewStore,
};

use crate::copy::{Commits, IndexCopy};
pub use crate::error::SearchError;
pub use crate::layout::{index_document, index_schema, register_tokenizers};

/// The file naming the live copy's directory.
const CURRENT: &str = "CURRENT";
const COPY_PREFIX: &str = "copy-";

/// Tunables of a [`SearchView`].
#[derive(Debug, Clone)]
pub struct SearchConfig {
    /// Memory budget of each copy's index writer, in bytes (Tantivy needs
    /// at least 15 MB per thread).
    pub writer_memory_bytes: usize,
    /// Indexing threads of each copy's writer.
    pub writer_threads: usize,
    /// During a rebuild, how many documents the shadow copy buffers before
    /// it commits (and at most how many states it keeps in memory for
    /// [`ViewStore::states`](kes_core::ViewStore::states)); the rest is
    /// committed at the swap.
    pub rebuild_commit_docs: usize,
}

impl Default for SearchConfig {
    fn default() -> Self {
        Self { writer_memory_bytes: 50_000_000, writer_threads: 1, rebuild_commit_docs: 50_000 }
    }
}

/// A list view in a Tantivy index. See the crate docs.
pub struct SearchView {
    /// Shared with the blocking tasks that do the index work.
    inner: Arc<Inner>,
}

struct Inner {
    schema: Arc<ViewSchema>,
    root: PathBuf,
    config: SearchConfig,
    live: RwLock<Arc<IndexCopy>>,
    shadow: Mutex<Option<Arc<IndexCopy>>>,
    /// The number of the next copy directory.
    next_copy: AtomicU64,
}

impl std::fmt::Debug for SearchView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SearchView").field("view", &self.inner.schema.name).field("root", &self.inner.root).finish()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SearchError + '_ {
    move |source| SearchError::Io { path: path.to_owned(), source }
}

fn copy_number(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(COPY_PREFIX)?;
    (digits.len() == 6 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok())?
}

fn copy_name(n: u64) -> String {
    format!("{COPY_PREFIX}{n:06}")
}

/// Replaces `CURRENT` with `name`, atomically: a crash leaves either the
/// old or the new pointer, never a torn one.
fn write_current(root: &Path, name: &str) -> Result<(), SearchError> {
    let tmp = root.join(format!("{CURRENT}.tmp"));
    let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(name.as_bytes()).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, root.join(CURRENT)).map_err(io(root))?;
    // Make the rename itself durable.
    std::fs::File::open(root).and_then(|d| d.sync_all()).map_err(io(root))
}

impl SearchView {
    /// Opens (or creates) the view stored in `dir` with the default
    /// [`SearchConfig`]. Validates the schema first.
    pub fn open(dir: impl AsRef<Path>, schema: ViewSchema) -> Result<Self, SearchError> {
        Self::open_with(dir, schema, SearchConfig::default())
    }

    /// Opens (or creates) the view stored in `dir`.
    ///
    /// A live copy built from another schema is opened as it is and keeps
    /// answering the queries its fields allow (others get
    /// [`ViewError::Unavailable`]); its stored schema version differs, so
    /// the projection runner rebuilds it and swaps the new copy in.
    pub fn open_with(dir: impl AsRef<Path>, schema: ViewSchema, config: SearchConfig) -> Result<Self, SearchError> {
        schema.validate()?;
        let root = dir.as_ref().to_owned();
        std::fs::create_dir_all(&root).map_err(io(&root))?;
        let current_path = root.join(CURRENT);
        let current = match std::fs::read_to_string(&current_path) {
            Ok(text) => {
                let name = text.trim().to_owned();
                copy_number(&name).ok_or_else(|| SearchError::NotAViewIndex(format!("{CURRENT} names {:?}", name)))?;
                Some(name)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(SearchError::Io { path: current_path, source }),
        };
        let mut highest = 0;
        let mut others = Vec::new();
        for entry in std::fs::read_dir(&root).map_err(io(&root))? {
            let entry = entry.map_err(io(&root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(n) = copy_number(&name) else { continue };
            highest = highest.max(n);
            if current.as_deref() != Some(name.as_str()) {
                others.push(entry.path());
            }
        }
        let live = match current {
            Some(name) => IndexCopy::open(&root.join(&name), &schema, &config)?,
            None => {
                highest += 1;
                let name = copy_name(highest);
                let path = root.join(&name);
                others.retain(|p| p != &path);
                if path.exists() {
                    // Created by an open that crashed before writing CURRENT.
                    std::fs::remove_dir_all(&path).map_err(io(&path))?;
                }
                let copy = IndexCopy::create(&path, &schema, &config, Commits::EachWrite)?;
                write_current(&root, &name)?;
                copy
            }
        };
        // Copies CURRENT does not name are unfinished rebuilds, or copies
        // whose deletion a crash interrupted. Deleted only now that this
        // process holds the live copy's writer lock, so that a second open
        // of a directory in use fails before it touches anything.
        for path in others {
            std::fs::remove_dir_all(&path).map_err(io(&path))?;
        }
        if !live.is_current() {
            let stored = live.progress().map(|p| p.schema_version);
            tracing::warn!(
                view = %schema.name,
                stored_version = ?stored,
                version = schema.version,
                "the index was built from other fields; it serves what it can until rebuilt \
                 (a rebuild starts only when the schema version differs from the stored one)"
            );
        }
        Ok(Self {
            inner: Arc::new(Inner {
                schema: Arc::new(schema),
                root,
                config,
                live: RwLock::new(Arc::new(live)),
                shadow: Mutex::new(None),
                next_copy: AtomicU64::new(highest + 1),
            }),
        })
    }

    /// The directory of the view (holding `CURRENT` and the copies).
    pub fn dir(&self) -> &Path {
        &self.inner.root
    }

    /// The directory of the live copy's Tantivy index.
    pub fn live_index_dir(&self) -> PathBuf {
        self.inner.live().path.clone()
    }
}

impl Inner {
    fn live(&self) -> Arc<IndexCopy> {
        Arc::clone(&self.live.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn shadow(&self) -> Result<Arc<IndexCopy>, SearchError> {
        self.shadow.lock().unwrap_or_else(|p| p.into_inner()).clone().ok_or(SearchError::NoRebuild)
    }

    fn copy(&self, copy: ViewCopy) -> Result<Arc<IndexCopy>, SearchError> {
        match copy {
            ViewCopy::Live => Ok(self.live()),
            ViewCopy::Shadow => self.shadow(),
        }
    }

    fn begin_rebuild(&self) -> Result<(), SearchError> {
        let mut shadow = self.shadow.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = shadow.take() {
            old.retire()?;
        }
        let name = copy_name(self.next_copy.fetch_add(1, Ordering::SeqCst));
        let path = self.root.join(name);
        *shadow = Some(Arc::new(IndexCopy::create(&path, &self.schema, &self.config, Commits::Deferred)?));
        Ok(())
    }

    fn swap(&self) -> Result<(), SearchError> {
        let mut shadow = self.shadow.lock().unwrap_or_else(|p| p.into_inner());
        let new = shadow.take().ok_or(SearchError::NoRebuild)?;
        // The buffered tail of the rebuild is committed before the copy is
        // named live, so that `CURRENT` never names a copy missing writes.
        if let Err(e) = new.finish() {
            *shadow = Some(new);
            return Err(e);
        }
        let name = new.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Err(e) = write_current(&self.root, &name) {
            *shadow = Some(new);
            return Err(e);
        }
        let old = std::mem::replace(&mut *self.live.write().unwrap_or_else(|p| p.into_inner()), new);
        drop(shadow);
        // The swap has happened; a copy left on disk is deleted at the next open.
        if let Err(e) = old.retire() {
            tracing::warn!(view = %self.schema.name, error = %e, "the old copy could not be deleted");
        }
        Ok(())
    }
}

/// Runs blocking index work off the async executor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SearchError> + Send + 'static,
) -> Result<T, ViewError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(ViewError::from),
        Err(e) => Err(SearchError::Task(e.to_string()).into()),
    }
}

#[async_trait]
impl ListView for SearchView {
    fn schema(&self) -> &ViewSchema {
        &self.inner.schema
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, ViewError> {
        let query = query.validate(&self.inner.schema)?;
        let (copy, schema) = (self.inner.live(), Arc::clone(&self.inner.schema));
        blocking(move || copy.list(&schema, &query)).await
    }

    async fn position(&self) -> Result<Checkpoint, ViewError> {
        Ok(self.inner.live().progress().map(|p| p.checkpoint).unwrap_or_default())
    }
}

/// Leases: the trait's defaults (every runner is granted at once, fenced
/// writes are plain writes). The index writer's file lock already makes a
/// Tantivy view single-writer: a second process cannot open it for writing.
#[async_trait]
impl ViewStore for SearchView {
    async fn progress(&self, copy: ViewCopy) -> Result<Option<ViewProgress>, ViewError> {
        Ok(self.inner.copy(copy)?.progress())
    }

    async fn states(&self, copy: ViewCopy, ids: &[String]) -> Result<HashMap<String, StoredState>, ViewError> {
        let copy = self.inner.copy(copy)?;
        let ids = ids.to_vec();
        blocking(move || copy.states(&ids)).await
    }

    async fn write(&self, copy: ViewCopy, changes: &[RowChange], checkpoint: &Checkpoint) -> Result<(), ViewError> {
        for change in changes {
            if let Some(row) = &change.row {
                self.inner.schema.check_row(row)?;
            }
        }
        let copy = self.inner.copy(copy)?;
        let (changes, checkpoint, version) = (changes.to_vec(), checkpoint.clone(), self.inner.schema.version);
        blocking(move || copy.write(&changes, &checkpoint, version)).await
    }

    async fn begin_rebuild(&self) -> Result<(), ViewError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.begin_rebuild()).await
    }

    async fn swap(&self) -> Result<(), ViewError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.swap()).await
    }
}
