//! The copies of a view on disk: the `CURRENT` pointer, rebuilds beside the
//! live copy, leftovers of a crash, a second open of a directory in use (which
//! stands by), and a schema change served by the old copy until the
//! rebuild swaps in.

mod common;

use common::copies;
use kes_core::{
    Checkpoint, Field, FilterOp, ListQuery, ListView, Position, Row, RowChange, ViewCopy, ViewError, ViewSchema,
    ViewStore,
};
use kes_view_search::SearchView;

fn schema(version: u32) -> ViewSchema {
    ViewSchema::new("things", version).field(Field::text("name").filterable().sortable().searchable())
}

fn change(id: &str, name: &str) -> RowChange {
    let mut row = Row::new();
    row.insert("name".into(), name.into());
    RowChange {
        id: id.into(),
        version: 1,
        state: kes_core::RowChange::state_of(&serde_json::json!({ "name": name })).expect("state JSON"),
        row: Some(row),
    }
}

fn at(offset: u64) -> Checkpoint {
    let mut c = Checkpoint::start();
    c.advance(Position::new(0, offset));
    c
}

fn current(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("CURRENT")).expect("CURRENT")
}

async fn names(view: &dyn ListView) -> Vec<String> {
    let page = view.list(&ListQuery::new().sort_by("name")).await.expect("list");
    page.items.into_iter().map(|i| i.row["name"].to_json().as_str().unwrap_or_default().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_moves_the_pointer_and_survives_a_reopen() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("things");
    let view = SearchView::open(&dir, schema(1)).expect("open");
    assert_eq!((copies(&dir), current(&dir)), (vec!["copy-000001".to_owned()], "copy-000001".to_owned()));
    view.write(ViewCopy::Live, &[change("a", "old")], &at(0)).await.expect("write");
    view.begin_rebuild().await.expect("begin");
    view.write(ViewCopy::Shadow, &[change("a", "new")], &at(3)).await.expect("write shadow");
    assert_eq!(copies(&dir).len(), 2, "the rebuild writes beside the live copy");
    assert_eq!(names(&view).await, ["old"], "the live copy answers during the rebuild");
    view.swap().await.expect("swap");
    assert_eq!(names(&view).await, ["new"]);
    assert_eq!((copies(&dir), current(&dir)), (vec!["copy-000002".to_owned()], "copy-000002".to_owned()));
    drop(view);
    let reopened = SearchView::open(&dir, schema(1)).expect("reopen");
    assert_eq!(names(&reopened).await, ["new"]);
    assert_eq!(reopened.position().await.expect("position"), at(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_rebuild_is_dropped_at_open_and_a_directory_in_use_is_opened_standing_by() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("things");
    let view = SearchView::open(&dir, schema(1)).expect("open");
    view.write(ViewCopy::Live, &[change("a", "live")], &at(0)).await.expect("write");
    view.begin_rebuild().await.expect("begin");
    view.write(ViewCopy::Shadow, &[change("a", "half")], &at(0)).await.expect("write shadow");
    // A second open of the same directory stands by: it reads, refuses
    // writes, and leaves the first instance's rebuild alone.
    let second = SearchView::open(&dir, schema(1)).expect("a second open stands by");
    assert!(view.holds_writer() && !second.holds_writer());
    assert_eq!(names(&second).await, ["live"]);
    let refused = second.write(ViewCopy::Live, &[change("b", "sneaky")], &at(1)).await;
    assert!(matches!(refused, Err(ViewError::Fenced(_))), "{refused:?}");
    assert_eq!(copies(&dir).len(), 2);
    drop(second);
    // The process ends without swapping: the next open drops the shadow.
    drop(view);
    let reopened = SearchView::open(&dir, schema(1)).expect("reopen");
    assert_eq!(copies(&dir), ["copy-000001"]);
    assert_eq!(names(&reopened).await, ["live"]);
    assert!(reopened.progress(ViewCopy::Shadow).await.is_err(), "no rebuild in progress after a restart");
    // The next rebuild does not reuse the dropped copy's name.
    reopened.begin_rebuild().await.expect("begin");
    assert_eq!(copies(&dir), ["copy-000001", "copy-000003"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_copy_serves_what_it_can_until_the_rebuild_swaps_in() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("things");
    let view = SearchView::open(&dir, schema(1)).expect("open");
    view.write(ViewCopy::Live, &[change("a", "alpha"), change("b", "beta")], &at(1)).await.expect("write");
    drop(view);
    // Version 2 adds a filterable field.
    let v2 = schema(2).field(Field::integer("n").filterable().sortable());
    let view = SearchView::open(&dir, v2).expect("open with the new schema");
    let progress = view.progress(ViewCopy::Live).await.expect("progress").expect("stored");
    assert_eq!(progress.schema_version, 1, "the stored version tells the runner to rebuild");
    assert_eq!(names(&view).await, ["alpha", "beta"], "the old copy keeps answering");
    let needs_n = ListQuery::new().filter("n", FilterOp::Gt, "1");
    assert!(matches!(view.list(&needs_n).await, Err(ViewError::Unavailable(_))));
    view.begin_rebuild().await.expect("begin");
    let mut row = Row::new();
    row.insert("name".into(), "alpha".into());
    row.insert("n".into(), 5.into());
    let rebuilt = RowChange {
        id: "a".into(),
        version: 1,
        state: kes_core::RowChange::state_of(&serde_json::json!({})).expect("state JSON"),
        row: Some(row),
    };
    view.write(ViewCopy::Shadow, &[rebuilt], &at(1)).await.expect("write shadow");
    view.swap().await.expect("swap");
    let page = view.list(&needs_n).await.expect("list after the rebuild");
    assert_eq!(page.items.len(), 1);
    assert_eq!(view.progress(ViewCopy::Live).await.expect("progress").expect("stored").schema_version, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_schema_or_a_foreign_pointer_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    assert!(SearchView::open(tmp.path().join("x"), ViewSchema::new("Bad Name", 1)).is_err());
    let dir = tmp.path().join("y");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("CURRENT"), "../../etc").expect("write");
    match SearchView::open(&dir, schema(1)) {
        Err(e) => assert!(matches!(ViewError::from(e), ViewError::Corrupt { .. })),
        Ok(_) => panic!("a foreign pointer was followed"),
    }
}
