//! Test helpers: a search view in a temporary directory that lives as long
//! as the view; fresh event stores in [`stores`].

#![allow(dead_code)]

#[path = "../../../view-sql/tests/common/stores.rs"]
pub mod stores;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use async_trait::async_trait;
use kes_core::{
    Checkpoint, ListQuery, ListView, Page, RowChange, StoredState, ViewCopy, ViewError, ViewProgress, ViewSchema,
    ViewStore,
};
use kes_view_search::SearchView;

/// The copy directories of the view in `dir`, sorted.
pub fn copies(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("copy-"))
        .collect();
    names.sort();
    names
}

/// Runs `test` of this test binary again as a child process, with `var`
/// set to `value` (the child's cue), its stdout piped to the caller.
pub fn respawn(test: &str, var: &str, value: &Path) -> Child {
    let exe = std::env::current_exe().expect("test binary");
    Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(var, value)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child")
}

/// A [`SearchView`] and the temporary directory it lives in (deleted when
/// this is dropped).
pub struct TempView {
    pub view: SearchView,
    pub dir: tempfile::TempDir,
}

impl TempView {
    pub fn new(schema: ViewSchema) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let view = SearchView::open(dir.path().join("index").join(&schema.name), schema).expect("open view");
        Self { view, dir }
    }

    pub fn shared(schema: ViewSchema) -> Arc<dyn ViewStore> {
        Arc::new(Self::new(schema))
    }
}

#[async_trait]
impl ListView for TempView {
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

#[async_trait]
impl ViewStore for TempView {
    async fn progress(&self, copy: ViewCopy) -> Result<Option<ViewProgress>, ViewError> {
        self.view.progress(copy).await
    }
    async fn states(&self, copy: ViewCopy, ids: &[String]) -> Result<HashMap<String, StoredState>, ViewError> {
        self.view.states(copy, ids).await
    }
    async fn write(&self, copy: ViewCopy, changes: &[RowChange], checkpoint: &Checkpoint) -> Result<(), ViewError> {
        self.view.write(copy, changes, checkpoint).await
    }
    async fn begin_rebuild(&self) -> Result<(), ViewError> {
        self.view.begin_rebuild().await
    }
    async fn swap(&self) -> Result<(), ViewError> {
        self.view.swap().await
    }
}
