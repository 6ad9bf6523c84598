//! One copy of a view: a Tantivy index in its own directory, with its
//! writer (only in the process that holds the view's writer lock), its
//! reader and the progress stored in its last commit.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use kes_core::ID_FIELD;
use kes_core::{Checkpoint, FieldType, FieldValue, ListItem, Page, RowChange, StoredState, ViewProgress, ViewSchema};
use kes_core::{Cursor, ValidQuery};
use serde_json::json;
use tantivy::collector::{Count, DocSetCollector, TopDocs};
use tantivy::query::{Query, TermSetQuery};
use tantivy::schema::Value;
use tantivy::{DocAddress, Index, IndexReader, IndexWriter, ReloadPolicy, Searcher, TantivyDocument, Term};

use crate::SearchViewConfig;
use crate::collect::{FirstRows, GlobalKey, KeySource, SortSpec};
use crate::error::SearchViewError;
use crate::layout::{Layout, index_schema, read_row, register_tokenizers};
use crate::query::{QueryBuilder, full_text};

/// One index copy (the live one, or a shadow being rebuilt).
pub(crate) struct IndexCopy {
    /// Its directory.
    pub path: PathBuf,
    index: Index,
    reader: IndexReader,
    layout: Layout,
    /// `None` once the copy was retired by a swap, or its writer released,
    /// and in a copy opened without one (read-only, or standing by).
    writer: Mutex<Option<Writing>>,
    /// Where the copy stands: what the last commit's payload says, or, while
    /// writes are deferred, the checkpoint of the last write.
    progress: RwLock<Option<ViewProgress>>,
    /// For a copy another process writes: the bytes of `meta.json` the
    /// reader was last loaded from (`None`: reload at the next refresh).
    seen_meta: Mutex<Option<Vec<u8>>>,
}

/// The writer of a copy and, while the copy is a shadow being filled, what
/// it holds beyond the last commit.
struct Writing {
    writer: IndexWriter,
    /// `Some` while commits are deferred (a shadow being rebuilt).
    deferred: Option<Deferred>,
}

/// The part of a shadow copy written since its last commit: in the index
/// writer's buffers (invisible to the reader) and, for `states`, here.
#[derive(Default)]
struct Deferred {
    /// The stored state of every id written since the last commit (the
    /// last write of an id wins), as its version and JSON text: a rebuild
    /// rarely reads one back, so it is kept compact and parsed on demand.
    states: HashMap<String, (u64, Box<str>)>,
    /// Every id written to the copy: the copy starts empty, so a document
    /// whose id is not here replaces nothing and needs no delete (deletes
    /// are applied at each commit, one term lookup each).
    written: HashSet<String>,
    /// Documents added since the last commit.
    docs: usize,
    /// The payload of the last write, committed with the next commit.
    payload: Option<String>,
    /// How many buffered documents trigger a commit.
    commit_every: usize,
    /// Set when a write or commit failed midway: the writer's uncommitted
    /// part was rolled back, so the copy would miss earlier writes. It
    /// refuses further writes and the swap; the next rebuild starts over.
    broken: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How the writes of a copy reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Commits {
    /// Every write is one commit (the live copy).
    EachWrite,
    /// Writes are buffered and committed in bulk: every
    /// [`SearchViewConfig::rebuild_commit_docs`] documents and at
    /// [`IndexCopy::finish`] (a shadow being rebuilt).
    Deferred,
}

impl IndexCopy {
    /// Creates an empty index for `view` in `path` (which must not hold one).
    pub fn create(
        path: &Path,
        view: &ViewSchema,
        config: &SearchViewConfig,
        commits: Commits,
    ) -> Result<Self, SearchViewError> {
        std::fs::create_dir_all(path).map_err(|source| SearchViewError::Io { path: path.to_owned(), source })?;
        let index = Index::create_in_dir(path, index_schema(view))?;
        Self::from_index(path, index, view, config, commits)
    }

    /// Opens the index in `path`, built from `view` or an older schema,
    /// with its writer (which takes the index's writer lock).
    pub fn open(path: &Path, view: &ViewSchema, config: &SearchViewConfig) -> Result<Self, SearchViewError> {
        let index = Index::open_in_dir(path)?;
        Self::from_index(path, index, view, config, Commits::EachWrite)
    }

    /// Opens the index in `path` for reading only: no writer, no lock; the
    /// reader follows the commits of the process that writes it through
    /// [`IndexCopy::refresh`].
    pub fn open_read_only(path: &Path, view: &ViewSchema) -> Result<Self, SearchViewError> {
        let index = Index::open_in_dir(path)?;
        register_tokenizers(&index);
        let layout = Layout::resolve(&index.schema(), view)?;
        // The checkpoint before the reader: the reader loads this commit or
        // a later one, so the position never claims more than lists show.
        let meta = read_meta(path)?;
        let progress = meta_progress(&meta)?;
        let reader = index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into()?;
        Ok(Self {
            path: path.to_owned(),
            index,
            reader,
            layout,
            writer: Mutex::new(None),
            progress: RwLock::new(progress),
            seen_meta: Mutex::new(Some(meta)),
        })
    }

    /// The name of the copy's directory (`copy-NNNNNN`).
    pub fn name(&self) -> String {
        self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// Catches up with the commits another process made to this copy:
    /// when `meta.json` changed since the reader was last loaded, reads the
    /// checkpoint from it, then reloads the reader (which loads that commit
    /// or a later one), then publishes the checkpoint. One attempt: a
    /// failed reload (its files cleaned up meanwhile, or the whole copy
    /// deleted after a swap) leaves the reader and the position as they
    /// were, and the caller retries.
    pub fn refresh(&self) -> Result<(), SearchViewError> {
        let mut seen = lock(&self.seen_meta);
        let meta = read_meta(&self.path)?;
        if seen.as_deref() == Some(meta.as_slice()) {
            return Ok(());
        }
        let progress = meta_progress(&meta)?;
        self.reader.reload()?;
        *self.progress.write().unwrap_or_else(|p| p.into_inner()) = progress;
        *seen = Some(meta);
        Ok(())
    }

    fn from_index(
        path: &Path,
        index: Index,
        view: &ViewSchema,
        config: &SearchViewConfig,
        commits: Commits,
    ) -> Result<Self, SearchViewError> {
        register_tokenizers(&index);
        let layout = Layout::resolve(&index.schema(), view)?;
        let progress = index.load_metas()?.payload.as_deref().map(read_payload).transpose()?;
        let writer = index.writer_with_num_threads(config.writer_threads.max(1), config.writer_memory_bytes)?;
        // Reloaded by hand right after each commit: a write is visible to
        // lists when `write` returns, so waiting for a position works.
        let reader = index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into()?;
        let deferred = (commits == Commits::Deferred)
            .then(|| Deferred { commit_every: config.rebuild_commit_docs.max(1), ..Deferred::default() });
        Ok(Self {
            path: path.to_owned(),
            index,
            reader,
            layout,
            writer: Mutex::new(Some(Writing { writer, deferred })),
            progress: RwLock::new(progress),
            seen_meta: Mutex::new(None),
        })
    }

    /// Whether the index was built from exactly the current view schema.
    pub fn is_current(&self) -> bool {
        self.layout.current
    }

    /// Where the copy stands: the progress stored with the last commit, or
    /// that of the last write while commits are deferred.
    pub fn progress(&self) -> Option<ViewProgress> {
        self.progress.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_progress(&self, progress: ViewProgress) {
        *self.progress.write().unwrap_or_else(|p| p.into_inner()) = Some(progress);
    }

    /// Replaces the documents of `changes` and moves the checkpoint.
    ///
    /// Live copies commit each write with `checkpoint` in the commit
    /// payload: one Tantivy commit, so after a crash the index holds either
    /// all of it or none. A shadow copy buffers the write in its index
    /// writer and commits only every [`SearchViewConfig::rebuild_commit_docs`]
    /// documents (and at [`IndexCopy::finish`]), each commit carrying the
    /// checkpoint of the last write it holds; `states` sees the buffered
    /// writes.
    pub fn write(
        &self,
        changes: &[RowChange],
        checkpoint: &Checkpoint,
        schema_version: u32,
    ) -> Result<(), SearchViewError> {
        let docs = changes.iter().map(|c| self.layout.document(c)).collect::<Result<Vec<_>, _>>()?;
        let checkpoint_json: serde_json::Value =
            serde_json::from_str(&checkpoint.to_json()).map_err(SearchViewError::Json)?;
        let payload = json!({ "checkpoint": checkpoint_json, "schema_version": schema_version }).to_string();
        let progress = ViewProgress { checkpoint: checkpoint.clone(), schema_version };
        let mut guard = lock(&self.writer);
        let Writing { writer, deferred } = guard.as_mut().ok_or(SearchViewError::Retired)?;
        if let Some(deferred) = deferred {
            if deferred.broken {
                return Err(SearchViewError::BrokenRebuild);
            }
            let result = (|| -> Result<(), SearchViewError> {
                let written = &mut deferred.written;
                add(writer, self.layout.id, changes, docs, |id| !written.insert(id.to_owned()))?;
                for change in changes {
                    deferred.states.insert(change.id.clone(), (change.version, Box::from(change.state.get())));
                }
                deferred.docs += changes.len();
                deferred.payload = Some(payload);
                if deferred.docs >= deferred.commit_every {
                    self.commit_deferred(writer, deferred)?;
                }
                Ok(())
            })();
            if let Err(e) = result {
                self.fail_deferred(writer, deferred);
                return Err(e);
            }
            self.set_progress(progress);
            return Ok(());
        }
        let result = (|| -> Result<(), SearchViewError> {
            add(writer, self.layout.id, changes, docs, |_| true)?;
            let mut prepared = writer.prepare_commit()?;
            prepared.set_payload(&payload);
            prepared.commit()?;
            Ok(())
        })();
        if let Err(e) = result {
            // Nothing of a failed batch may ride along with the next commit.
            if let Err(rollback) = writer.rollback() {
                tracing::error!(error = %rollback, path = %self.path.display(), "rollback after a failed write failed");
            }
            return Err(e);
        }
        drop(guard);
        // Reload first: the position must never run ahead of what lists see.
        let reloaded = self.reader.reload();
        self.set_progress(progress);
        Ok(reloaded?)
    }

    /// Commits what a shadow copy buffered, with the payload of its last
    /// write, and makes it visible to the reader. Called with the writer
    /// locked, so `states` never sees the buffer emptied before the reader
    /// holds its documents.
    fn commit_deferred(&self, writer: &mut IndexWriter, deferred: &mut Deferred) -> Result<(), SearchViewError> {
        let Some(payload) = deferred.payload.take() else { return Ok(()) };
        let mut prepared = writer.prepare_commit()?;
        prepared.set_payload(&payload);
        prepared.commit()?;
        self.reader.reload()?;
        tracing::debug!(path = %self.path.display(), docs = deferred.docs, "rebuild commit");
        deferred.states.clear();
        deferred.docs = 0;
        Ok(())
    }

    /// Drops what a shadow copy buffered after a failed write or commit and
    /// marks the copy broken.
    fn fail_deferred(&self, writer: &mut IndexWriter, deferred: &mut Deferred) {
        deferred.broken = true;
        deferred.states.clear();
        deferred.payload = None;
        if let Err(rollback) = writer.rollback() {
            tracing::error!(error = %rollback, path = %self.path.display(), "rollback after a failed write failed");
        }
    }

    /// Commits what a shadow copy buffered so far, so that the commit at
    /// [`IndexCopy::finish`] (which runs while the live copy is paused) has
    /// only the rest to do. A no-op for a copy that commits each write.
    pub fn flush(&self) -> Result<(), SearchViewError> {
        self.commit_buffered(false)
    }

    /// Ends deferred commits: commits what a shadow copy buffered (with
    /// the checkpoint of its last write), after which the copy commits
    /// each write like a live one. Called by the swap, before the copy is
    /// named live; a no-op for a copy that commits each write.
    pub fn finish(&self) -> Result<(), SearchViewError> {
        self.commit_buffered(true)
    }

    /// Commits a shadow copy's buffered writes; with `end`, it commits
    /// each write from then on.
    fn commit_buffered(&self, end: bool) -> Result<(), SearchViewError> {
        let mut guard = lock(&self.writer);
        let Writing { writer, deferred } = guard.as_mut().ok_or(SearchViewError::Retired)?;
        let Some(buffered) = deferred else { return Ok(()) };
        if buffered.broken {
            return Err(SearchViewError::BrokenRebuild);
        }
        if let Err(e) = self.commit_deferred(writer, buffered) {
            self.fail_deferred(writer, buffered);
            return Err(e);
        }
        if end {
            *deferred = None;
        }
        Ok(())
    }

    /// The stored states of `ids` (deleted aggregates included), buffered
    /// writes of a shadow copy included.
    pub fn states(&self, ids: &[String]) -> Result<HashMap<String, StoredState>, SearchViewError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let guard = lock(&self.writer);
        let Some(Writing { deferred: Some(deferred), .. }) = guard.as_ref() else {
            drop(guard);
            return self.committed_states(ids.iter());
        };
        if deferred.broken {
            return Err(SearchViewError::BrokenRebuild);
        }
        // The lock is held until the index was read: a commit in between
        // would empty the buffer before the reader saw its documents.
        let (buffered, rest): (Vec<&String>, Vec<&String>) =
            ids.iter().partition(|id| deferred.states.contains_key(*id));
        let mut states = self.committed_states(rest.into_iter())?;
        for id in buffered {
            if let Some((version, text)) = deferred.states.get(id) {
                let state = serde_json::from_str(text).map_err(SearchViewError::Json)?;
                states.insert(id.clone(), StoredState { version: *version, state });
            }
        }
        Ok(states)
    }

    /// The states of `ids` in the documents the reader sees.
    fn committed_states<'a>(
        &self,
        ids: impl Iterator<Item = &'a String>,
    ) -> Result<HashMap<String, StoredState>, SearchViewError> {
        let terms: Vec<Term> = ids.map(|id| Term::from_field_text(self.layout.id, id)).collect();
        if terms.is_empty() {
            return Ok(HashMap::new());
        }
        let searcher = self.reader.searcher();
        let found = searcher.search(&TermSetQuery::new(terms), &DocSetCollector)?;
        let mut states = HashMap::with_capacity(found.len());
        for address in found {
            let doc: TantivyDocument = searcher.doc(address)?;
            let id = self.text(&doc, self.layout.id, "?")?;
            let version = doc
                .get_first(self.layout.version)
                .and_then(|v| v.as_u64())
                .ok_or_else(|| SearchViewError::CorruptRow { id: id.clone(), reason: "no version".into() })?;
            let state = self.text(&doc, self.layout.state, &id)?;
            let state = serde_json::from_str(&state)
                .map_err(|e| SearchViewError::CorruptRow { id: id.clone(), reason: format!("stored state: {e}") })?;
            states.insert(id, StoredState { version, state });
        }
        Ok(states)
    }

    fn text(&self, doc: &TantivyDocument, field: tantivy::schema::Field, id: &str) -> Result<String, SearchViewError> {
        doc.get_first(field).and_then(|v| v.as_str().map(str::to_owned)).ok_or_else(|| SearchViewError::CorruptRow {
            id: id.to_owned(),
            reason: format!("no {}", self.index.schema().get_field_name(field)),
        })
    }

    fn item(&self, view: &ViewSchema, searcher: &Searcher, address: DocAddress) -> Result<ListItem, SearchViewError> {
        let doc: TantivyDocument = searcher.doc(address)?;
        let id = self.text(&doc, self.layout.id, "?")?;
        let version = doc
            .get_first(self.layout.version)
            .and_then(|v| v.as_u64())
            .ok_or_else(|| SearchViewError::CorruptRow { id: id.clone(), reason: "no version".into() })?;
        let row = read_row(view, &id, &self.text(&doc, self.layout.row, &id)?)?;
        Ok(ListItem { id, version, row })
    }

    /// One page of `query`.
    // Kept in one piece: The two orders a page can have (relevance, or sort keys with a cursor) share the query
    // built at the top; each branch is short.
    pub fn list(&self, view: &ViewSchema, query: &ValidQuery) -> Result<Page, SearchViewError> {
        let searcher = self.reader.searcher();
        let builder = QueryBuilder { layout: &self.layout };
        let mut required: Vec<Box<dyn Query>> = vec![builder.listed()];
        for filter in &query.filters {
            required.push(builder.filter(filter)?);
        }
        let scored = match &query.q {
            Some(q) => match full_text(&self.index, &self.layout, q)? {
                Some(q) => Some(q),
                None => return Ok(Page { items: Vec::new(), next: None, total: 0 }),
            },
            None => None,
        };
        let size = query.page_size as usize;
        if query.relevance {
            let base = QueryBuilder::all_of(scored, required);
            let total = searcher.search(&base, &Count)? as u64;
            let offset = match query.after {
                Some(Cursor::Offset(n)) => n,
                _ => 0,
            };
            if offset >= total {
                return Ok(Page { items: Vec::new(), next: None, total });
            }
            // offset < total, which fits in memory: a usize.
            let offset_usize = usize::try_from(offset).unwrap_or(usize::MAX);
            let top = searcher.search(&base, &TopDocs::with_limit(size + 1).and_offset(offset_usize))?;
            let more = top.len() > size;
            let items = top
                .into_iter()
                .take(size)
                .map(|(_, address)| self.item(view, &searcher, address))
                .collect::<Result<Vec<_>, _>>()?;
            let next = more.then(|| query.cursor_at_offset(offset + items.len() as u64));
            return Ok(Page { items, next, total });
        }
        let keys = query
            .sort
            .iter()
            .map(|key| {
                let name = builder.fast_name(&key.field)?;
                let source = match key.field.ty {
                    _ if key.field.name == ID_FIELD => KeySource::Str(name),
                    FieldType::Text | FieldType::Keyword => KeySource::Str(name),
                    FieldType::Integer | FieldType::Timestamp => KeySource::I64(name),
                    FieldType::Float => KeySource::F64(name),
                    FieldType::Bool => KeySource::Bool(name),
                };
                Ok(SortSpec { source, descending: key.descending })
            })
            .collect::<Result<Vec<_>, SearchViewError>>()?;
        // The keyset cursor is applied inside the collector (comparing sort
        // keys), so one pass counts every match and finds the page.
        let after = match &query.after {
            Some(Cursor::Keys(values)) => Some(
                values
                    .iter()
                    .zip(&query.sort)
                    .map(|(value, key)| global_key(value.as_ref(), key.field.ty))
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        };
        let first_rows = FirstRows { keys, limit: size + 1, after };
        let base = QueryBuilder::all_of(scored, required);
        let (total, found) = searcher.search(&base, &(Count, first_rows))?;
        let total = total as u64;
        let more = found.len() > size;
        let items = found
            .into_iter()
            .take(size)
            .map(|address| self.item(view, &searcher, address))
            .collect::<Result<Vec<_>, _>>()?;
        let next = match items.last() {
            Some(last) if more => Some(query.cursor_after(&last.id, &last.row)),
            _ => None,
        };
        Ok(Page { items, next, total })
    }

    /// Stops the writer, once its merges ended, releasing the index's
    /// writer lock; the copy keeps answering reads, and follows another
    /// process's commits through [`IndexCopy::refresh`] from now on.
    /// Buffered writes of a shadow are dropped with its writer.
    pub fn release_writer(&self) -> Result<(), SearchViewError> {
        let writing = lock(&self.writer).take();
        *lock(&self.seen_meta) = None;
        if let Some(Writing { writer, .. }) = writing {
            writer.wait_merging_threads()?;
        }
        Ok(())
    }

    /// Stops the writer (releasing the index lock) and deletes the
    /// directory. Searches already running keep their open segment files.
    pub fn retire(&self) -> Result<(), SearchViewError> {
        if let Some(Writing { writer, .. }) = lock(&self.writer).take() {
            // A shadow's buffered writes are dropped with its writer.
            writer.wait_merging_threads()?;
        }
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(SearchViewError::Io { path: self.path.clone(), source }),
        }
    }
}

/// Queues the documents of `changes`, each replacing the stored one of its
/// id where `may_exist` says there can be one.
fn add(
    writer: &mut IndexWriter,
    id: tantivy::schema::Field,
    changes: &[RowChange],
    docs: Vec<TantivyDocument>,
    mut may_exist: impl FnMut(&str) -> bool,
) -> Result<(), SearchViewError> {
    for (change, doc) in changes.iter().zip(docs) {
        // Deletes apply to documents added before them, so the new
        // document of the same id survives its own delete.
        if may_exist(&change.id) {
            writer.delete_term(Term::from_field_text(id, &change.id));
        }
        writer.add_document(doc)?;
    }
    Ok(())
}

/// A cursor value in the images the collector compares.
fn global_key(value: Option<&FieldValue>, ty: FieldType) -> Option<GlobalKey> {
    Some(match value? {
        FieldValue::Text(s) => GlobalKey::Str(s.as_bytes().to_vec()),
        FieldValue::Integer(i) => GlobalKey::Num(tantivy::i64_to_u64(*i)),
        FieldValue::Float(f) => GlobalKey::Num(tantivy::f64_to_u64(*f)),
        FieldValue::Bool(b) => GlobalKey::Num(u64::from(*b)),
        FieldValue::Timestamp(t) if ty == FieldType::Timestamp => {
            GlobalKey::Num(tantivy::i64_to_u64(t.timestamp_micros()))
        }
        FieldValue::Timestamp(_) => return None,
    })
}

/// The bytes of a copy's `meta.json` (replaced atomically by each commit
/// and merge, so never torn).
fn read_meta(path: &Path) -> Result<Vec<u8>, SearchViewError> {
    let file = path.join("meta.json");
    std::fs::read(&file).map_err(|source| SearchViewError::Io { path: file, source })
}

/// The progress in the commit payload of `meta.json`; `None` when the copy
/// was never written.
fn meta_progress(meta: &[u8]) -> Result<Option<ViewProgress>, SearchViewError> {
    let value: serde_json::Value =
        serde_json::from_slice(meta).map_err(|e| SearchViewError::NotAViewIndex(format!("meta.json: {e}")))?;
    match value.get("payload") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(text)) => read_payload(text).map(Some),
        Some(other) => Err(SearchViewError::Payload(format!("not a text: {other}"))),
    }
}

fn read_payload(text: &str) -> Result<ViewProgress, SearchViewError> {
    let bad = |reason: String| SearchViewError::Payload(reason);
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let checkpoint = value.get("checkpoint").ok_or_else(|| bad("no checkpoint".into()))?;
    let checkpoint = Checkpoint::from_json(&checkpoint.to_string()).map_err(|e| bad(e.to_string()))?;
    let schema_version = value
        .get("schema_version")
        .and_then(serde_json::Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| bad("no schema version".into()))?;
    Ok(ViewProgress { checkpoint, schema_version })
}
