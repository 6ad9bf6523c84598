//! A rebuild's rows new to the shadow copy go in by `COPY` on PostgreSQL
//! (`ViewStore::write_shadow_fenced`): they must be stored exactly as the
//! upserts of a live copy store them, and a row named new that the shadow
//! holds after all must be upserted, never doubled or refused.

mod common;

use std::time::Duration;

use chrono::TimeZone;
use kes_core::{
    Checkpoint, Field, FieldValue, ListQuery, ListView, Position, Row, RowChange, ViewCopy, ViewSchema, ViewStore,
};
use kes_view_sql::SqlView;

fn schema() -> ViewSchema {
    ViewSchema::new("items", 1)
        .field(Field::text("name").filterable().sortable().searchable())
        .field(Field::keyword("kind").filterable().searchable())
        .field(Field::integer("count").filterable().sortable())
        .field(Field::float("ratio").sortable())
        .field(Field::bool("done").filterable())
        .field(Field::timestamp("due").filterable().sortable())
}

/// Values that the text format must escape, or write in a form of its own.
fn awkward() -> Vec<RowChange> {
    let names = [
        "plain",
        "tab\there",
        "line\nbreak and\r\nCRLF",
        "back\\slash \\N \\. \\t",
        "quotes \" and ' and `",
        "Grüße ĞÜŞ İstanbul ΣΊΣΥΦΟΣ 日本語 🚀",
        "",
        "trailing backslash \\",
    ];
    // Schemas refuse non-finite floats.
    let ratios = [0.1, -0.0, 1e300, 5e-324, f64::MAX, -123.456, 1e-7, 2.5e-308];
    let mut changes = Vec::new();
    for (i, (name, ratio)) in names.iter().zip(ratios).enumerate() {
        let mut row = Row::new();
        row.insert("name".into(), (*name).into());
        row.insert("kind".into(), FieldValue::Text(format!("Kind\t{}", i % 3)));
        row.insert("count".into(), FieldValue::Integer(if i % 2 == 0 { i64::MIN + i as i64 } else { i64::MAX }));
        row.insert("ratio".into(), FieldValue::Float(ratio));
        row.insert("done".into(), FieldValue::Bool(i % 2 == 1));
        let due = chrono::Utc.timestamp_opt(1_767_225_600 + i as i64 * 86_400, 123_456_000).single().expect("a time");
        row.insert("due".into(), FieldValue::timestamp(due));
        let state = serde_json::json!({ "name": name, "n": i, "nested": { "text": "a\\b\n\"c\"" } });
        changes.push(RowChange {
            id: format!("id {i}\t\\ é"),
            version: 3 + i as u64,
            state: RowChange::state_of(&state).expect("state JSON"),
            row: Some(row),
        });
    }
    // A row with fields left out, and a deleted aggregate (no row, state kept).
    let mut sparse = Row::new();
    sparse.insert("name".into(), "Sparse".into());
    changes.push(RowChange {
        id: "sparse".into(),
        version: 1,
        state: RowChange::state_of(&serde_json::json!({})).expect("state JSON"),
        row: Some(sparse),
    });
    changes.push(RowChange {
        id: "gone".into(),
        version: 2,
        state: RowChange::state_of(&serde_json::json!({ "deleted": true })).expect("state JSON"),
        row: None,
    });
    changes
}

fn at(offset: u64) -> Checkpoint {
    let mut c = Checkpoint::start();
    c.advance(Position::new(0, offset));
    c
}

/// Every column of every row of `view`'s live table, as text, in id order.
async fn table_text(namespace: &str, view: &SqlView) -> Vec<String> {
    let pool = sqlx::PgPool::connect(&common::pg_url()).await.expect("connect");
    let rows: Vec<(String,)> = sqlx::query_as(&format!(
        "SELECT to_jsonb(t)::text FROM \"{namespace}\".{} t ORDER BY id COLLATE \"C\"",
        view.table()
    ))
    .fetch_all(&pool)
    .await
    .expect("read the table");
    pool.close().await;
    rows.into_iter().map(|(text,)| text).collect()
}

async fn list_text(view: &SqlView, query: ListQuery) -> String {
    let page = view.list(&query).await.expect("list");
    format!("{} {:?}", page.total, page.items)
}

#[tokio::test]
async fn rows_copied_into_a_shadow_are_stored_as_upserts_store_them() {
    let (upserted_at, copied_at) = (common::fresh_pg_schema(), common::fresh_pg_schema());
    let Some(upserted) = common::pg_in(&upserted_at, schema()).await else { return };
    let Some(copied) = common::pg_in(&copied_at, schema()).await else { return };
    let changes = awkward();

    upserted.write(ViewCopy::Live, &changes, &at(1)).await.expect("upsert the rows");
    let lease = copied.acquire_lease("rebuilder", Duration::from_secs(30)).await.expect("lease").expect("free");
    copied.begin_rebuild_fenced(&lease).await.expect("begin");
    copied.write_shadow_fenced(changes.clone(), Vec::new(), &at(1), &lease).await.expect("copy the rows");
    copied.prepare_swap().await.expect("index");
    copied.swap_fenced(&lease).await.expect("swap");

    let (expected, got) = (table_text(&upserted_at, &upserted).await, table_text(&copied_at, &copied).await);
    assert_eq!(got.len(), changes.len());
    assert_eq!(got, expected);
    for query in [
        ListQuery::new().page_size(100),
        ListQuery::new().search("grüße"),
        ListQuery::new().search("\\"),
        ListQuery::new().search("kind\t1"),
        ListQuery::new().sort_by("-ratio"),
        ListQuery::new().sort_by("due").page_size(3),
    ] {
        assert_eq!(list_text(&copied, query.clone()).await, list_text(&upserted, query).await);
    }
    let ids: Vec<String> = changes.iter().map(|c| c.id.clone()).collect();
    let (a, b) = (
        upserted.states(ViewCopy::Live, &ids).await.expect("states"),
        copied.states(ViewCopy::Live, &ids).await.expect("states"),
    );
    assert_eq!(a.len(), ids.len());
    for id in &ids {
        assert_eq!((a[id].version, &a[id].state), (b[id].version, &b[id].state), "{id}");
    }
    common::drop_pg_schema(&upserted_at).await;
    common::drop_pg_schema(&copied_at).await;
}

fn named(id: &str, version: u64) -> RowChange {
    let mut row = Row::new();
    row.insert("name".into(), format!("{id} v{version}").into());
    RowChange {
        id: id.into(),
        version,
        state: RowChange::state_of(&serde_json::json!({ "v": version })).expect("state JSON"),
        row: Some(row),
    }
}

/// A row named new that the shadow holds (a caller's mistake, or a shadow
/// another writer touched) is upserted with the batch: the newer version
/// wins, an older one is ignored, and nothing is doubled.
async fn a_row_wrongly_named_new_is_upserted(view: SqlView) {
    let lease = view.acquire_lease("rebuilder", Duration::from_secs(30)).await.expect("lease").expect("free");
    view.begin_rebuild_fenced(&lease).await.expect("begin");
    view.write_shadow_fenced(vec![named("a", 1), named("b", 1)], Vec::new(), &at(1), &lease).await.expect("first");
    view.write_shadow_fenced(vec![named("a", 2), named("c", 1)], vec![named("b", 2)], &at(2), &lease)
        .await
        .expect("a row there already, named new");
    view.write_shadow_fenced(vec![named("a", 1)], Vec::new(), &at(3), &lease).await.expect("an older version");
    view.swap_fenced(&lease).await.expect("swap");
    let page = view.list(&ListQuery::new()).await.expect("list");
    let rows: Vec<(String, u64, Option<String>)> = page
        .items
        .iter()
        .map(|item| {
            let name = match item.row.get("name") {
                Some(FieldValue::Text(t)) => Some(t.clone()),
                _ => None,
            };
            (item.id.clone(), item.version, name)
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("a".into(), 2, Some("a v2".into())),
            ("b".into(), 2, Some("b v2".into())),
            ("c".into(), 1, Some("c v1".into())),
        ]
    );
    assert_eq!(view.progress(ViewCopy::Live).await.expect("progress").expect("written").checkpoint, at(3));
}

#[tokio::test]
async fn a_row_wrongly_named_new_is_upserted_on_postgres() {
    let namespace = common::fresh_pg_schema();
    let Some(view) = common::pg_in(&namespace, schema()).await else { return };
    a_row_wrongly_named_new_is_upserted(view).await;
    common::drop_pg_schema(&namespace).await;
}

#[tokio::test]
async fn a_row_wrongly_named_new_is_upserted_on_sqlite() {
    let Some(view) = common::sqlite(schema()).await else { return };
    a_row_wrongly_named_new_is_upserted(view).await;
}

/// The shadow's secondary indexes, by name.
async fn shadow_indexes(namespace: &str) -> Vec<String> {
    let pool = sqlx::PgPool::connect(&common::pg_url()).await.expect("connect");
    let names: Vec<(String,)> = sqlx::query_as(
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = $1 AND tablename = 'shadow_items' \
         AND indexname NOT LIKE '%pkey' ORDER BY indexname",
    )
    .bind(namespace)
    .fetch_all(&pool)
    .await
    .expect("read the indexes");
    pool.close().await;
    names.into_iter().map(|(name,)| name).collect()
}

#[tokio::test]
async fn indexing_a_shadow_again_completes_its_indexes_and_adds_none() {
    let namespace = common::fresh_pg_schema();
    let Some(view) = common::pg_in(&namespace, schema()).await else { return };
    let lease = view.acquire_lease("rebuilder", Duration::from_secs(30)).await.expect("lease").expect("free");
    view.begin_rebuild_fenced(&lease).await.expect("begin");
    view.write_shadow_fenced(awkward(), Vec::new(), &at(1), &lease).await.expect("copy the rows");
    view.prepare_swap().await.expect("index");
    let built = shadow_indexes(&namespace).await;
    // One per filterable or sortable field: all six.
    assert_eq!(built.len(), 6, "{built:?}");
    // A preparation cut short between its transactions left some out.
    let pool = sqlx::PgPool::connect(&common::pg_url()).await.expect("connect");
    for name in &built[..2] {
        sqlx::query(&format!("DROP INDEX \"{namespace}\".\"{name}\"")).execute(&pool).await.expect("drop an index");
    }
    pool.close().await;
    view.prepare_swap().await.expect("index again");
    assert_eq!(shadow_indexes(&namespace).await, built);
    view.swap_fenced(&lease).await.expect("swap");
    assert_eq!(view.list(&ListQuery::new().sort_by("-count")).await.expect("list").total, awkward().len() as u64 - 1);
    common::drop_pg_schema(&namespace).await;
}
