//! Failures reach callers as the core's portable errors; schema changes and
//! read-your-writes waits.

mod common;

use std::time::Duration;

use kes_core::{
    Checkpoint, Field, FieldValue, ListQuery, ListView, Position, Row, RowChange, ViewCopy, ViewError, ViewSchema,
    ViewStore,
};
use kes_view_sql::{SqlView, SqlViewError};

fn schema(version: u32) -> ViewSchema {
    let s = ViewSchema::new("notes", version).field(Field::text("title").filterable().sortable().searchable());
    if version > 1 { s.field(Field::integer("stars").filterable().sortable()) } else { s }
}

fn change(id: &str, title: &str) -> RowChange {
    let mut row = Row::new();
    row.insert("title".into(), title.into());
    RowChange {
        id: id.into(),
        version: 1,
        state: kes_core::RowChange::state_of(&serde_json::json!({ "title": title })).expect("state JSON"),
        row: Some(row),
    }
}

fn at(offset: u64) -> Checkpoint {
    let mut c = Checkpoint::start();
    c.advance(Position::new(0, offset));
    c
}

#[tokio::test]
async fn an_unreachable_database_is_unavailable() {
    // Port 1 on localhost: nothing listens there.
    let err = SqlView::open("postgres://postgres@127.0.0.1:1/test", schema(1)).await.expect_err("no server");
    assert!(err.is_transient(), "{err:?}");
    assert!(matches!(ViewError::from(err), ViewError::Unavailable(_)));
}

#[tokio::test]
async fn a_closed_view_is_unavailable() {
    let view = common::sqlite(schema(1)).await.expect("view");
    view.close().await;
    assert!(matches!(view.list(&ListQuery::new()).await, Err(ViewError::Unavailable(_))));
}

#[tokio::test]
async fn bad_urls_and_schemas_are_refused() {
    assert!(matches!(SqlView::open("mysql://x", schema(1)).await, Err(SqlViewError::BadUrl(_))));
    let bad = ViewSchema::new("Notes; drop table x", 1);
    assert!(matches!(SqlView::open("sqlite::memory:", bad).await, Err(SqlViewError::Schema(_))));
    let config = kes_view_sql::SqlViewConfig::from_url(&common::pg_url()).schema("x\"; drop schema public; --");
    let opened = SqlView::open(config, schema(1)).await;
    assert!(matches!(opened, Err(SqlViewError::BadSchemaName(_))), "{opened:?}");
}

#[tokio::test]
async fn unreadable_stored_state_is_corrupt() {
    let url = common::fresh_sqlite_url();
    let view = common::sqlite_at(&url, schema(1)).await.expect("view");
    view.write(ViewCopy::Live, &[change("n1", "first")], &at(0)).await.expect("write");
    let raw = sqlx::SqlitePool::connect(&url).await.expect("raw connection");
    sqlx::query("UPDATE view_notes SET _state = '{not json'").execute(&raw).await.expect("damage");
    sqlx::query("UPDATE kes_view_checkpoints SET checkpoint = 'nope'").execute(&raw).await.expect("damage");
    let states = view.states(ViewCopy::Live, &["n1".to_owned()]).await;
    assert!(matches!(&states, Err(ViewError::Corrupt { id, .. }) if id == "n1"), "{states:?}");
    assert!(matches!(view.position().await, Err(ViewError::Corrupt { .. })));
}

#[tokio::test]
async fn shadow_writes_without_a_rebuild_are_refused() {
    let view = common::sqlite(schema(1)).await.expect("view");
    let result = view.write(ViewCopy::Shadow, &[change("n1", "x")], &at(0)).await;
    assert!(matches!(result, Err(ViewError::Backend(_))), "{result:?}");
    assert!(view.swap().await.is_err());
    assert!(view.progress(ViewCopy::Live).await.expect("progress").is_none(), "a refused write left progress");
}

#[tokio::test]
async fn postgres_refuses_nul_characters_as_typed_errors() {
    let Some(view) = common::pg(schema(1)).await else { return };
    let result = view.write(ViewCopy::Live, &[change("n1", "a\0b")], &at(0)).await;
    assert!(matches!(result, Err(ViewError::Schema(_))), "{result:?}");
    let query = ListQuery::new().filter("title", kes_core::FilterOp::Eq, "a\0b");
    assert!(matches!(view.list(&query).await, Err(ViewError::Query(_))));
}

/// A new schema version opens over the old copy, which keeps answering
/// (new fields missing) until the rebuild swaps a new copy in.
#[tokio::test]
async fn an_old_copy_answers_under_a_new_schema_until_rebuilt() {
    for place in [common::Place::fresh(false), common::Place::fresh(true)] {
        let Some(v1) = place.open(schema(1)).await else { continue };
        v1.write(ViewCopy::Live, &[change("n1", "first")], &at(0)).await.expect("write");
        v1.close().await;
        let v2 = place.open(schema(2)).await.expect("reopen with v2");
        assert_eq!(v2.progress(ViewCopy::Live).await.expect("progress").expect("stored").schema_version, 1);
        let page = v2.list(&ListQuery::new().sort_by("-stars")).await.expect("list under v2");
        assert_eq!(page.items.len(), 1);
        assert!(!page.items[0].row.contains_key("stars"));
        v2.begin_rebuild().await.expect("begin");
        let mut row = Row::new();
        row.insert("title".into(), "first".into());
        row.insert("stars".into(), FieldValue::Integer(4));
        let c = RowChange {
            id: "n1".into(),
            version: 1,
            state: kes_core::RowChange::state_of(&serde_json::json!({})).expect("state JSON"),
            row: Some(row.clone()),
        };
        v2.write(ViewCopy::Shadow, &[c], &at(0)).await.expect("write shadow");
        v2.swap().await.expect("swap");
        assert_eq!(v2.list(&ListQuery::new()).await.expect("list").items[0].row, row);
        assert_eq!(v2.progress(ViewCopy::Live).await.expect("progress").expect("stored").schema_version, 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_returns_once_the_position_is_applied() {
    let view = std::sync::Arc::new(common::sqlite(schema(1)).await.expect("view"));
    let position = Position::new(0, 5);
    assert!(!view.wait_for(position, Duration::from_millis(30)).await.expect("wait"), "nothing applied yet");
    let writer = {
        let view = view.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            view.write(ViewCopy::Live, &[change("n1", "x")], &at(5)).await.expect("write");
        })
    };
    assert!(view.wait_for(position, Duration::from_secs(5)).await.expect("wait"));
    writer.await.expect("writer");
}
