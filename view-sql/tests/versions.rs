//! A row never moves back to an older version: a projector that lags
//! behind another on the same view (two processes, a rolling deploy)
//! cannot undo what the faster one wrote. An equal version is written
//! again, as a replay after a crash does.

mod common;

use std::sync::Arc;

use kes_core::{
    Checkpoint, Field, FieldValue, InMemoryView, ListQuery, Row, RowChange, ViewCopy, ViewSchema, ViewStore,
};

fn schema() -> ViewSchema {
    ViewSchema::new("versioned", 1).field(Field::text("name").filterable())
}

fn change(version: u64, name: &str) -> RowChange {
    let mut row = Row::new();
    row.insert("name".into(), FieldValue::Text(name.into()));
    RowChange {
        id: "r-1".into(),
        version,
        state: kes_core::RowChange::state_of(&serde_json::json!({ "name": name })).expect("state JSON"),
        row: Some(row),
    }
}

fn at(offset: u64) -> Checkpoint {
    let mut checkpoint = Checkpoint::start();
    checkpoint.set_next(0, offset);
    checkpoint
}

async fn row_of(view: &dyn ViewStore, copy: ViewCopy) -> (u64, String) {
    let states = view.states(copy, &["r-1".to_owned()]).await.expect("states");
    let state = states.get("r-1").expect("the row's state");
    (state.version, state.state["name"].as_str().unwrap_or_default().to_owned())
}

async fn never_older(view: Arc<dyn ViewStore>) {
    for copy in [ViewCopy::Live, ViewCopy::Shadow] {
        if copy == ViewCopy::Shadow {
            view.begin_rebuild().await.expect("a shadow copy");
        }
        view.write(copy, &[change(5, "five")], &at(10)).await.expect("write v5");
        view.write(copy, &[change(3, "three")], &at(11)).await.expect("a lagging writer's v3");
        assert_eq!(row_of(&*view, copy).await, (5, "five".into()), "{copy:?}: v3 did not replace v5");
        view.write(copy, &[change(5, "five again")], &at(12)).await.expect("a replay of v5");
        assert_eq!(row_of(&*view, copy).await, (5, "five again".into()), "{copy:?}: an equal version is rewritten");
        view.write(copy, &[change(6, "six"), change(4, "four")], &at(13)).await.expect("a mixed batch");
        assert_eq!(row_of(&*view, copy).await, (4, "four".into()).max((6, "six".into())), "{copy:?}");
        if copy == ViewCopy::Shadow {
            view.swap().await.expect("swap");
        }
    }
    let page = view.list(&ListQuery::new()).await.expect("list");
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].version, 6);
    assert_eq!(page.items[0].row.get("name"), Some(&FieldValue::Text("six".into())));
}

#[tokio::test]
async fn rows_never_move_back_in_memory() {
    never_older(Arc::new(InMemoryView::new(schema()).expect("a view"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_never_move_back_on_sqlite() {
    let Some(view) = common::sqlite(schema()).await else { return };
    never_older(Arc::new(view)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_never_move_back_on_postgres() {
    let Some(view) = common::pg(schema()).await else { return };
    never_older(Arc::new(view)).await;
}
