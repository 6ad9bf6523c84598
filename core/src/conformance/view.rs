//! The ListView conformance suite. Each function takes a fresh, empty view
//! built from [`schema`] and panics when the backend answers differently
//! from the shared semantics (see [`crate::view::ValidQuery`]).

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;

use crate::envelope::{Checkpoint, Position};
use crate::view::{
    Field, FieldType, FieldValue, FilterOp, ListQuery, QueryError, Row, RowChange, ViewCopy, ViewError, ViewSchema,
    ViewStore,
};

/// The schema every view under test is built from: one field of each type,
/// plus one that allows nothing.
pub fn schema() -> ViewSchema {
    ViewSchema::new("things", 1)
        .field(Field::text("name").filterable().sortable().searchable())
        .field(Field::keyword("tag").filterable().sortable().searchable())
        .field(Field::integer("n").filterable().sortable())
        .field(Field::float("score").filterable().sortable())
        .field(Field::bool("flag").filterable().sortable())
        .field(Field::timestamp("at").filterable().sortable())
        .field(Field::text("note"))
        .page_sizes(5, 50)
}

fn ts(text: &str) -> FieldValue {
    FieldValue::parse(FieldType::Timestamp, text).expect("fixture timestamp")
}

type Fixture = (
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    Option<i64>,
    Option<f64>,
    Option<bool>,
    Option<&'static str>,
);

const FIXTURE: [Fixture; 12] = [
    ("r01", Some("Alpha Centauri"), Some("star"), Some(5), Some(1.5), Some(true), Some("2026-01-01T00:00:00Z")),
    ("r02", Some("beta"), Some("star"), Some(3), Some(-2.0), Some(false), Some("2026-01-03T00:00:00Z")),
    ("r03", Some("Gamma ray"), Some("ray"), Some(5), Some(0.0), Some(true), Some("2025-12-31T23:59:59.999999Z")),
    ("r04", Some("delta"), None, Some(10), Some(1.5), Some(false), None),
    ("r05", Some("Épsilon"), Some("greek"), Some(-1), None, None, Some("2026-01-02T00:00:00Z")),
    ("r06", Some("alpha"), Some("Star"), None, Some(2.25), Some(true), Some("2026-01-01T00:00:00Z")),
    ("r07", None, Some("star"), Some(3), Some(3.0), Some(false), Some("2026-02-01T12:30:00.000001Z")),
    ("r08", Some("zeta"), Some("ray"), Some(0), Some(1.5), Some(true), Some("2026-01-05T00:00:00Z")),
    ("r09", Some("Alpha"), Some("star"), Some(5), Some(1.5), Some(false), Some("2026-01-01T00:00:00Z")),
    ("r10", Some("eta"), Some("ray"), Some(7), Some(9.75), Some(true), Some("2026-01-06T00:00:00Z")),
    ("r11", Some("alphabet"), Some("greek"), Some(2), Some(-0.5), Some(false), Some("2026-01-07T00:00:00Z")),
    ("r12", Some("theta_1"), Some("greek"), Some(100), Some(1e9), Some(true), Some("2026-01-08T00:00:00Z")),
];

/// The row of fixture entry `f`.
fn row_of(f: &Fixture) -> Row {
    let mut row = Row::new();
    let (_, name, tag, n, score, flag, at) = *f;
    if let Some(v) = name {
        row.insert("name".into(), v.into());
    }
    if let Some(v) = tag {
        row.insert("tag".into(), v.into());
    }
    if let Some(v) = n {
        row.insert("n".into(), v.into());
    }
    if let Some(v) = score {
        row.insert("score".into(), v.into());
    }
    if let Some(v) = flag {
        row.insert("flag".into(), v.into());
    }
    if let Some(v) = at {
        row.insert("at".into(), ts(v));
    }
    row.insert("note".into(), format!("note of {}", f.0).into());
    row
}

fn change(id: &str, version: u64, row: Option<Row>) -> RowChange {
    RowChange {
        id: id.to_owned(),
        version,
        state: RowChange::state_of(&serde_json::json!({ "id": id, "v": version })).expect("state JSON"),
        row,
    }
}

fn checkpoint(offset: u64) -> Checkpoint {
    let mut c = Checkpoint::start();
    c.advance(Position::new(0, offset));
    c
}

async fn load_fixture(view: &Arc<dyn ViewStore>) -> HashMap<String, Row> {
    let changes: Vec<RowChange> = FIXTURE.iter().map(|f| change(f.0, 1, Some(row_of(f)))).collect();
    view.write(ViewCopy::Live, &changes, &checkpoint(11)).await.expect("write the fixture");
    FIXTURE.iter().map(|f| (f.0.to_owned(), row_of(f))).collect()
}

/// Every page of `query` (following `next`), concatenated as ids; checks
/// that `total` is the same on every page.
async fn all_ids(view: &Arc<dyn ViewStore>, query: ListQuery) -> (Vec<String>, u64) {
    let mut ids = Vec::new();
    let mut total = None;
    let mut query = query;
    for _ in 0..100 {
        let page = view.list(&query).await.unwrap_or_else(|e| panic!("list {query:?}: {e}"));
        assert!(page.items.len() <= query.page_size.unwrap_or(5) as usize, "page larger than asked");
        if let Some(t) = total {
            assert_eq!(t, page.total, "total changed between pages of {query:?}");
        }
        total = Some(page.total);
        ids.extend(page.items.into_iter().map(|i| i.id));
        match page.next {
            Some(next) => query.after = Some(next),
            None => return (ids, total.unwrap_or(0)),
        }
    }
    panic!("more than 100 pages for {query:?}");
}

/// A value of the fixture as the model below sees it.
#[derive(Debug, Clone, PartialEq)]
enum Plain {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    /// A timestamp, in microseconds since the Unix epoch.
    Micros(i64),
}

fn micros(text: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(text).expect("a fixture or probe timestamp").timestamp_micros()
}

/// The value of `field` in fixture entry `f`, `None` when it has none.
fn plain_of(f: &Fixture, field: &str) -> Option<Plain> {
    let (id, name, tag, n, score, flag, at) = *f;
    match field {
        "id" => Some(Plain::Text(id.to_owned())),
        "name" => name.map(|v| Plain::Text(v.to_owned())),
        "tag" => tag.map(|v| Plain::Text(v.to_owned())),
        "n" => n.map(Plain::Int),
        "score" => score.map(Plain::Float),
        "flag" => flag.map(Plain::Bool),
        "at" => at.map(|v| Plain::Micros(micros(v))),
        other => panic!("the model knows no field {other}"),
    }
}

/// A filter value in query-string form, read as `field`'s type.
fn plain_from_text(field: &str, text: &str) -> Plain {
    match field {
        "id" | "name" | "tag" => Plain::Text(text.to_owned()),
        "n" => Plain::Int(text.parse().expect("an integer probe")),
        "score" => Plain::Float(text.parse().expect("a float probe")),
        "flag" => match text {
            "true" => Plain::Bool(true),
            "false" => Plain::Bool(false),
            other => panic!("not a bool probe: {other}"),
        },
        "at" => Plain::Micros(micros(text)),
        other => panic!("the model knows no field {other}"),
    }
}

/// Text by Unicode code point, numbers by value, `false < true`.
fn plain_cmp(a: &Plain, b: &Plain) -> Ordering {
    match (a, b) {
        (Plain::Text(x), Plain::Text(y)) => x.chars().map(u32::from).cmp(y.chars().map(u32::from)),
        (Plain::Int(x), Plain::Int(y)) => x.cmp(y),
        (Plain::Float(x), Plain::Float(y)) => x.partial_cmp(y).expect("fixture floats are finite"),
        (Plain::Bool(x), Plain::Bool(y)) => x.cmp(y),
        (Plain::Micros(x), Plain::Micros(y)) => x.cmp(y),
        (x, y) => panic!("the model compared {x:?} with {y:?}"),
    }
}

/// Whether fixture entry `f` passes `field op text`: only entries with a
/// value for the field can.
fn model_matches(f: &Fixture, field: &str, op: FilterOp, text: &str) -> bool {
    let Some(value) = plain_of(f, field) else { return false };
    let against = |t: &str| plain_cmp(&value, &plain_from_text(field, t));
    match op {
        FilterOp::Eq => against(text) == Ordering::Equal,
        FilterOp::Ne => against(text) != Ordering::Equal,
        FilterOp::Gt => against(text) == Ordering::Greater,
        FilterOp::Gte => against(text) != Ordering::Less,
        FilterOp::Lt => against(text) == Ordering::Less,
        FilterOp::Lte => against(text) != Ordering::Greater,
        FilterOp::In => text.split(',').any(|t| against(t) == Ordering::Equal),
        FilterOp::Prefix => matches!(&value, Plain::Text(v) if v.starts_with(text)),
    }
}

/// What the shared list semantics return over the fixture for `filters`
/// (field, operator, value as in a query string) and `sort` (as in
/// `sort=-n,name`), as ids in order. A model written from the rules
/// documented on [`crate::view::ValidQuery`], over the fixture's own data,
/// without the query code the in-memory backend runs; it is held to the
/// hand-written answers by [`model_agrees_with_the_hand_written_answers`].
fn model(filters: &[(&str, FilterOp, &str)], sort: &str) -> Vec<String> {
    let mut keys: Vec<(&str, bool)> = Vec::new();
    for part in sort.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let key = match part.strip_prefix('-') {
            Some(field) => (field, true),
            None => (part.strip_prefix('+').unwrap_or(part), false),
        };
        keys.push(key);
        if key.0 == "id" {
            // Ids are unique: nothing after them decides.
            break;
        }
    }
    if keys.last().is_none_or(|k| k.0 != "id") {
        keys.push(("id", false));
    }
    let mut hits: Vec<&Fixture> =
        FIXTURE.iter().filter(|f| filters.iter().all(|(field, op, text)| model_matches(f, field, *op, text))).collect();
    hits.sort_by(|a, b| {
        for (field, descending) in &keys {
            let ord = match (plain_of(a, field), plain_of(b, field)) {
                (None, None) => Ordering::Equal,
                // Missing values come last in both directions.
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(x), Some(y)) if *descending => plain_cmp(&y, &x),
                (Some(x), Some(y)) => plain_cmp(&x, &y),
            };
            if ord != Ordering::Equal {
                return ord;
            }
        }
        Ordering::Equal
    });
    hits.into_iter().map(|f| f.0.to_owned()).collect()
}

/// Filters with their hand-written answers (ids by default order).
fn filter_cases() -> Vec<(&'static str, FilterOp, &'static str, Vec<&'static str>)> {
    vec![
        ("tag", FilterOp::Eq, "star", vec!["r01", "r02", "r07", "r09"]),
        ("name", FilterOp::Eq, "alpha", vec!["r06"]),
        ("n", FilterOp::Gt, "4", vec!["r01", "r03", "r04", "r09", "r10", "r12"]),
        ("n", FilterOp::Ne, "5", vec!["r02", "r04", "r05", "r07", "r08", "r10", "r11", "r12"]),
        ("n", FilterOp::Lte, "0", vec!["r05", "r08"]),
        ("name", FilterOp::Prefix, "alpha", vec!["r06", "r11"]),
        ("name", FilterOp::Prefix, "Alpha ", vec!["r01"]),
        ("tag", FilterOp::In, "ray,greek", vec!["r03", "r05", "r08", "r10", "r11", "r12"]),
        ("flag", FilterOp::Eq, "true", vec!["r01", "r03", "r06", "r08", "r10", "r12"]),
        ("flag", FilterOp::Ne, "true", vec!["r02", "r04", "r07", "r09", "r11"]),
        ("at", FilterOp::Lt, "2026-01-02T00:00:00Z", vec!["r01", "r03", "r06", "r09"]),
        ("at", FilterOp::Gte, "2026-02-01T12:30:00.000001Z", vec!["r07"]),
        ("at", FilterOp::Gt, "2026-02-01T12:30:00.000001Z", vec![]),
        ("score", FilterOp::Gte, "1.5", vec!["r01", "r04", "r06", "r07", "r08", "r09", "r10", "r12"]),
        ("score", FilterOp::Lt, "0", vec!["r02", "r11"]),
        ("id", FilterOp::In, "r02,r05,nope", vec!["r02", "r05"]),
        ("id", FilterOp::Prefix, "r1", vec!["r10", "r11", "r12"]),
    ]
}

/// Sorts with their hand-written answers: code-point order, missing
/// values last in both directions, ties broken by id.
fn sort_cases() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        ("-n", vec!["r12", "r04", "r10", "r01", "r03", "r09", "r02", "r07", "r11", "r08", "r05", "r06"]),
        ("n", vec!["r05", "r08", "r11", "r02", "r07", "r01", "r03", "r09", "r10", "r04", "r12", "r06"]),
        ("name", vec!["r09", "r01", "r03", "r06", "r11", "r02", "r04", "r10", "r12", "r08", "r05", "r07"]),
        ("-flag,-id", vec!["r12", "r10", "r08", "r06", "r03", "r01", "r11", "r09", "r07", "r04", "r02", "r05"]),
        ("at,-score", vec!["r03", "r06", "r01", "r09", "r05", "r02", "r08", "r10", "r11", "r12", "r07", "r04"]),
        ("tag,-score", vec!["r06", "r12", "r11", "r05", "r10", "r08", "r03", "r07", "r01", "r09", "r02", "r04"]),
        ("-id", vec!["r12", "r11", "r10", "r09", "r08", "r07", "r06", "r05", "r04", "r03", "r02", "r01"]),
    ]
}

/// The model gives every hand-written answer; a model that drifted from
/// the rules would judge backends wrongly, so the suites using it check
/// this first.
fn model_agrees_with_the_hand_written_answers() {
    for (field, op, value, expected) in filter_cases() {
        assert_eq!(model(&[(field, op, value)], ""), ids(&expected), "model: filter[{field}][{op}]={value}");
    }
    for (sort, expected) in sort_cases() {
        assert_eq!(model(&[], sort), ids(&expected), "model: sort={sort}");
    }
    let both = [("tag", FilterOp::Eq, "star"), ("n", FilterOp::Gte, "4")];
    assert_eq!(model(&both, ""), ids(&["r01", "r09"]), "model: two filters");
    assert_eq!(model(&[("tag", FilterOp::Eq, "star")], "-score"), ids(&["r07", "r01", "r09", "r02"]));
    assert_eq!(model(&[], ""), FIXTURE.iter().map(|f| f.0.to_owned()).collect::<Vec<_>>(), "model: by id");
}

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// An empty view lists nothing and has no progress.
pub async fn empty_view_lists_nothing(view: Arc<dyn ViewStore>) {
    let page = view.list(&ListQuery::new()).await.expect("list");
    assert!(page.items.is_empty() && page.next.is_none());
    assert_eq!(page.total, 0);
    assert!(view.progress(ViewCopy::Live).await.expect("progress").is_none());
    assert_eq!(view.position().await.expect("position"), Checkpoint::start());
}

/// Rows come back with their exact values (timestamps to the microsecond,
/// floats, missing values absent); the default order is by id.
pub async fn rows_round_trip(view: Arc<dyn ViewStore>) {
    let rows = load_fixture(&view).await;
    let page = view.list(&ListQuery::new().page_size(50)).await.expect("list");
    assert_eq!(page.total, 12);
    assert_eq!(page.items.iter().map(|i| i.id.clone()).collect::<Vec<_>>(), {
        let mut all: Vec<String> = rows.keys().cloned().collect();
        all.sort();
        all
    });
    for item in &page.items {
        assert_eq!(&item.row, &rows[&item.id], "row {} changed on the way", item.id);
        assert_eq!(item.version, 1);
    }
    let progress = view.progress(ViewCopy::Live).await.expect("progress").expect("written");
    assert_eq!(progress.checkpoint, checkpoint(11));
    assert_eq!(progress.schema_version, 1);
    assert_eq!(view.position().await.expect("position"), checkpoint(11));
}

/// Each operator on each field type, against hand-written answers.
pub async fn filters_match_by_hand(view: Arc<dyn ViewStore>) {
    load_fixture(&view).await;
    let cases = filter_cases();
    for (field, op, value, expected) in cases {
        let query = ListQuery::new().filter(field, op, value).page_size(50);
        let page = view.list(&query).await.unwrap_or_else(|e| panic!("filter[{field}][{op}]={value}: {e}"));
        let got: Vec<String> = page.items.iter().map(|i| i.id.clone()).collect();
        assert_eq!(got, ids(&expected), "filter[{field}][{op}]={value}");
        assert_eq!(page.total, expected.len() as u64, "total of filter[{field}][{op}]={value}");
    }
    // Several filters all hold.
    let both = ListQuery::new().filter("tag", FilterOp::Eq, "star").filter("n", FilterOp::Gte, "4").page_size(50);
    let got: Vec<String> = view.list(&both).await.expect("list").items.into_iter().map(|i| i.id).collect();
    assert_eq!(got, ids(&["r01", "r09"]));
}

/// Every operator on every filterable field with each value of the fixture:
/// the same rows as the shared semantics (an independent model of them).
pub async fn filters_match_the_shared_semantics(view: Arc<dyn ViewStore>) {
    model_agrees_with_the_hand_written_answers();
    let rows = load_fixture(&view).await;
    let schema = schema();
    for field in schema.fields.iter().filter(|f| f.filterable) {
        let mut values: Vec<String> = rows
            .values()
            .filter_map(|r| r.get(&field.name))
            .map(|v| match v.to_json() {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            })
            .collect();
        values.sort();
        values.dedup();
        for value in &values {
            for op in FilterOp::ALL {
                if op == FilterOp::Prefix && !matches!(field.ty, FieldType::Text | FieldType::Keyword) {
                    continue;
                }
                let text = if op == FilterOp::Prefix { value.chars().take(2).collect() } else { value.clone() };
                let query = ListQuery::new().filter(&field.name, op, text.clone()).page_size(50);
                let got: Vec<String> = view
                    .list(&query)
                    .await
                    .unwrap_or_else(|e| panic!("filter[{}][{op}]={text}: {e}", field.name))
                    .items
                    .into_iter()
                    .map(|i| i.id)
                    .collect();
                let expected = model(&[(&field.name, op, &text)], "");
                assert_eq!(got, expected, "filter[{}][{op}]={text}", field.name);
            }
        }
    }
}

/// Sorting by each type, both directions, with ties and missing values;
/// the hand-written cases pin the rules (code-point order, missing last).
pub async fn sorts_with_ties_and_missing_values(view: Arc<dyn ViewStore>) {
    model_agrees_with_the_hand_written_answers();
    load_fixture(&view).await;
    for (sort, expected) in sort_cases() {
        let query = ListQuery::new().sort_by(sort).page_size(50);
        let got: Vec<String> = view.list(&query).await.expect("list").items.into_iter().map(|i| i.id).collect();
        assert_eq!(got, ids(&expected), "sort={sort}");
    }
    for field in schema().fields.iter().filter(|f| f.sortable) {
        for sort in [field.name.clone(), format!("-{}", field.name)] {
            let query = ListQuery::new().sort_by(&sort).page_size(50);
            let got: Vec<String> = view.list(&query).await.expect("list").items.into_iter().map(|i| i.id).collect();
            assert_eq!(got, model(&[], &sort), "sort={sort}");
        }
    }
}

/// Paging through every sort in pages of 2 yields each row exactly once,
/// in order, with the same total on every page.
pub async fn keyset_paging_walks_every_row_once(view: Arc<dyn ViewStore>) {
    model_agrees_with_the_hand_written_answers();
    load_fixture(&view).await;
    let mut sorts: Vec<String> = vec![String::new(), "-id".into(), "tag,-score".into()];
    for field in schema().fields.iter().filter(|f| f.sortable) {
        sorts.push(field.name.clone());
        sorts.push(format!("-{}", field.name));
    }
    for sort in sorts {
        let query = ListQuery::new().sort_by(&sort).page_size(2);
        let (got, total) = all_ids(&view, query.clone()).await;
        assert_eq!(got, model(&[], &sort), "pages of sort={sort}");
        assert_eq!(total, 12);
    }
    let filtered = ListQuery::new().filter("tag", FilterOp::Eq, "star").sort_by("-score").page_size(3);
    let (got, total) = all_ids(&view, filtered.clone()).await;
    assert_eq!(got, model(&[("tag", FilterOp::Eq, "star")], "-score"));
    assert_eq!(total, 4);
}

/// Rows inserted before the cursor or removed after it never shift the
/// next page: nothing repeats, nothing present throughout is skipped.
pub async fn keyset_paging_is_stable_while_rows_change(view: Arc<dyn ViewStore>) {
    load_fixture(&view).await;
    let query = ListQuery::new().sort_by("-n").page_size(3);
    let first = view.list(&query).await.expect("first page");
    let got: Vec<String> = first.items.iter().map(|i| i.id.clone()).collect();
    assert_eq!(got, ids(&["r12", "r04", "r10"]));
    let mut before = Row::new();
    before.insert("n".into(), 50.into());
    let mut after = Row::new();
    after.insert("n".into(), 4.into());
    let changes = vec![change("r13", 1, Some(before)), change("r03", 2, None), change("r14", 1, Some(after))];
    view.write(ViewCopy::Live, &changes, &checkpoint(14)).await.expect("change rows");
    let next = query.clone().after(first.next.expect("a second page"));
    let (rest, total) = all_ids(&view, next).await;
    assert_eq!(rest, ids(&["r01", "r09", "r14", "r02", "r07", "r11", "r08", "r05", "r06"]));
    assert_eq!(total, 13);
}

/// `total` counts every match regardless of paging; `next` is absent on
/// the last page.
pub async fn total_and_next_cursor(view: Arc<dyn ViewStore>) {
    load_fixture(&view).await;
    let query = ListQuery::new().filter("tag", FilterOp::Eq, "star").page_size(2);
    let page = view.list(&query).await.expect("list");
    assert_eq!((page.items.len(), page.total), (2, 4));
    let page2 = view.list(&query.clone().after(page.next.expect("next"))).await.expect("page 2");
    assert_eq!((page2.items.len(), page2.total), (2, 4));
    assert!(page2.next.is_none(), "no cursor after the last row");
    let exact = view.list(&ListQuery::new().filter("tag", FilterOp::Eq, "star").page_size(4)).await.expect("list");
    assert!(exact.next.is_none(), "a page that ends exactly at the last row has no next cursor");
    let default = view.list(&ListQuery::new()).await.expect("list");
    assert_eq!(default.items.len(), 5, "the schema's default page size applies");
}

/// A word inside a searchable field finds the row, case-insensitively,
/// alone or with filters; rows found by no field are not returned.
pub async fn search_finds_words(view: Arc<dyn ViewStore>) {
    load_fixture(&view).await;
    let q = |text: &str| ListQuery::new().search(text).sort_by("id").page_size(50);
    let cases: Vec<(ListQuery, Vec<&str>)> = vec![
        (q("centauri"), vec!["r01"]),
        (q("CENTAURI"), vec!["r01"]),
        (q("ray"), vec!["r03", "r08", "r10"]),
        (q("ray").filter("n", FilterOp::Gte, "5"), vec!["r03", "r10"]),
        (q("greek"), vec!["r05", "r11", "r12"]),
        (q("note"), vec![]),
    ];
    for (query, expected) in cases {
        let page = view.list(&query).await.unwrap_or_else(|e| panic!("{query:?}: {e}"));
        let got: Vec<String> = page.items.into_iter().map(|i| i.id).collect();
        assert_eq!(got, ids(&expected), "{query:?}");
        assert_eq!(page.total, expected.len() as u64);
    }
    // Without a sort, every match still comes back exactly once over pages.
    let (mut got, total) = all_ids(&view, ListQuery::new().search("ray").page_size(2)).await;
    got.sort();
    assert_eq!((got, total), (ids(&["r03", "r08", "r10"]), 3));
}

/// Upserts replace a row whole; a row-less change removes it from lists
/// while its state stays; states come back as written.
pub async fn upsert_and_delete_rows(view: Arc<dyn ViewStore>) {
    load_fixture(&view).await;
    let mut renamed = Row::new();
    renamed.insert("name".into(), "Beta Prime".into());
    view.write(ViewCopy::Live, &[change("r02", 2, Some(renamed.clone())), change("r04", 2, None)], &checkpoint(13))
        .await
        .expect("write");
    let page = view.list(&ListQuery::new().filter("id", FilterOp::In, "r02,r04").page_size(50)).await.expect("list");
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].row, renamed, "an upsert replaces the whole row");
    assert_eq!(page.items[0].version, 2);
    let all = view.list(&ListQuery::new().page_size(50)).await.expect("list");
    assert_eq!(all.total, 11, "the deleted row is gone");
    assert!(all.items.iter().all(|i| i.id != "r04"));
    let by_tag = view.list(&ListQuery::new().filter("tag", FilterOp::Eq, "star").page_size(50)).await.expect("list");
    assert!(by_tag.items.iter().all(|i| i.id != "r02"), "old values of an upserted row no longer match");
    let states = view.states(ViewCopy::Live, &ids(&["r02", "r04", "missing"])).await.expect("states");
    assert_eq!(states.len(), 2);
    assert_eq!(states["r04"].version, 2);
    assert_eq!(states["r04"].state, serde_json::json!({ "id": "r04", "v": 2 }));
    // A deleted row can come back.
    view.write(ViewCopy::Live, &[change("r04", 3, Some(Row::new()))], &checkpoint(14)).await.expect("write");
    assert_eq!(view.list(&ListQuery::new().page_size(50)).await.expect("list").total, 12);
    assert_eq!(view.position().await.expect("position"), checkpoint(14));
}

/// Rows that do not fit the schema are refused and change nothing.
pub async fn rows_outside_the_schema_are_refused(view: Arc<dyn ViewStore>) {
    load_fixture(&view).await;
    let mut unknown = Row::new();
    unknown.insert("colour".into(), "red".into());
    let mut mistyped = Row::new();
    mistyped.insert("n".into(), "five".into());
    for bad in [unknown, mistyped] {
        let result = view.write(ViewCopy::Live, &[change("r01", 2, Some(bad.clone()))], &checkpoint(20)).await;
        assert!(matches!(result, Err(ViewError::Schema(_))), "{bad:?} was accepted: {result:?}");
    }
    assert_eq!(view.position().await.expect("position"), checkpoint(11), "a refused write moved the checkpoint");
    let r01 = view.list(&ListQuery::new().filter("id", FilterOp::Eq, "r01")).await.expect("list");
    assert_eq!(r01.items[0].version, 1);
}

/// Queries naming what the schema lacks, bad values, bad cursors and bad
/// page sizes are typed query errors.
pub async fn invalid_queries_are_typed_errors(view: Arc<dyn ViewStore>) {
    load_fixture(&view).await;
    type Expect = fn(&QueryError) -> bool;
    let cases: Vec<(ListQuery, Expect)> = vec![
        (ListQuery::new().filter("colour", FilterOp::Eq, "red"), |e| matches!(e, QueryError::UnknownField(_))),
        (ListQuery::new().filter("note", FilterOp::Eq, "x"), |e| matches!(e, QueryError::NotFilterable(_))),
        (ListQuery::new().sort_by("note"), |e| matches!(e, QueryError::NotSortable(_))),
        (ListQuery::new().sort_by("-colour"), |e| matches!(e, QueryError::UnknownField(_))),
        (ListQuery::new().filter("n", FilterOp::Eq, "five"), |e| matches!(e, QueryError::BadValue { .. })),
        (ListQuery::new().filter("n", FilterOp::Prefix, "1"), |e| {
            matches!(e, QueryError::OperatorNotApplicable { .. })
        }),
        (ListQuery::new().filter("at", FilterOp::Gt, "yesterday"), |e| matches!(e, QueryError::BadValue { .. })),
        (ListQuery::new().after("bm90IGEgY3Vyc29y"), |e| matches!(e, QueryError::BadCursor)),
        (ListQuery::new().page_size(51), |e| matches!(e, QueryError::BadPageSize { .. })),
        (ListQuery::new().page_size(0), |e| matches!(e, QueryError::BadPageSize { .. })),
    ];
    for (query, expected) in cases {
        match view.list(&query).await {
            Err(ViewError::Query(e)) if expected(&e) => {}
            other => panic!("{query:?} gave {other:?}"),
        }
    }
    // A cursor of one sort is refused by another.
    let page = view.list(&ListQuery::new().sort_by("n").page_size(2)).await.expect("list");
    let cursor = page.next.expect("next");
    assert!(matches!(
        view.list(&ListQuery::new().sort_by("-n").after(cursor)).await,
        Err(ViewError::Query(QueryError::BadCursor))
    ));
}

/// A rebuild writes a shadow copy that serves nothing until the swap; the
/// swap replaces the live rows and checkpoint at once.
pub async fn rebuild_swaps_in_a_shadow_copy(view: Arc<dyn ViewStore>) {
    load_fixture(&view).await;
    view.begin_rebuild().await.expect("begin");
    assert!(view.progress(ViewCopy::Shadow).await.expect("progress").is_none(), "a new shadow starts empty");
    let rows: Vec<RowChange> = FIXTURE[..3].iter().map(|f| change(f.0, 5, Some(row_of(f)))).collect();
    view.write(ViewCopy::Shadow, &rows, &checkpoint(40)).await.expect("write shadow");
    let states = view.states(ViewCopy::Shadow, &ids(&["r01", "r05"])).await.expect("states");
    assert_eq!(states.keys().collect::<Vec<_>>(), vec!["r01"]);
    assert_eq!(view.list(&ListQuery::new()).await.expect("list").total, 12, "the shadow served a query");
    assert_eq!(view.position().await.expect("position"), checkpoint(11));
    view.swap().await.expect("swap");
    let page = view.list(&ListQuery::new().page_size(50)).await.expect("list");
    assert_eq!(page.items.iter().map(|i| i.id.clone()).collect::<Vec<_>>(), ids(&["r01", "r02", "r03"]));
    assert!(page.items.iter().all(|i| i.version == 5));
    assert_eq!(view.position().await.expect("position"), checkpoint(40));
    assert_eq!(view.progress(ViewCopy::Live).await.expect("progress").expect("live").checkpoint, checkpoint(40));
    // The swapped-in copy takes writes as the live one.
    view.write(ViewCopy::Live, &[change("r09", 1, Some(row_of(&FIXTURE[8])))], &checkpoint(41)).await.expect("write");
    assert_eq!(view.list(&ListQuery::new()).await.expect("list").total, 4);
    // A second rebuild works too.
    view.begin_rebuild().await.expect("begin again");
    view.write(ViewCopy::Shadow, &[], &checkpoint(41)).await.expect("write");
    view.swap().await.expect("swap again");
    assert_eq!(view.list(&ListQuery::new()).await.expect("list").total, 0);
}

/// A [`crate::HistoryProjection`] over this backend, read by
/// [`crate::ViewHistory`]: pages of one aggregate hold its events exactly
/// once in version order (versions 9 → 10 → 100 sort as numbers), never
/// another aggregate's; a replayed batch changes nothing; a rebuild holds
/// the same pages. `view` is built from `history_schema("ledger")`.
// Kept in one piece: A conformance check reads as one scenario: what it writes, then every property asserted on
// it.
pub async fn history_view_pages_by_version(view: Arc<dyn ViewStore>) {
    use super::ledger::{Ledger, LedgerEvent};
    use crate::envelope::{Envelope, Metadata};
    use crate::history::{History, HistoryProjection, ViewHistory};
    use crate::projection::Projection;

    let projection = HistoryProjection::<Ledger>::new(Arc::clone(&view)).expect("the history schema");
    let envelope = |id: &str, version: u64, offset: u64| Envelope {
        event_id: uuid::Uuid::new_v4(),
        aggregate_type: "ledger".into(),
        aggregate_id: id.into(),
        version,
        event_type: "EntryAdded".into(),
        revision: 1,
        recorded_at: chrono::Utc::now(),
        metadata: Metadata { principal: Some(format!("p{version}")), ..Metadata::default() },
        position: Position::new(0, offset),
        payload: LedgerEvent::Added { amount: version as i64 },
    };
    // Two aggregates interleaved in the log; `a` has 120 events.
    let mut log = Vec::new();
    let mut offset = 0;
    for v in 1..=120 {
        log.push(envelope("a", v, offset));
        offset += 1;
        if v % 4 == 0 {
            log.push(envelope("a-b", v / 4, offset));
            offset += 1;
        }
    }
    for (i, batch) in log.chunks(25).enumerate() {
        let checkpoint = checkpoint_after(batch.last().map_or(0, |e| e.position.offset));
        projection.apply(ViewCopy::Live, batch, &checkpoint).await.expect("apply a batch");
        if i == 1 {
            // A replay after a crash writes the same rows again.
            projection.apply(ViewCopy::Live, batch, &checkpoint).await.expect("replay a batch");
        }
    }
    let history = ViewHistory::new::<Ledger>(view.clone());
    let walk = |size: u32| {
        let history = &history;
        async move {
            let mut seen = Vec::new();
            let mut after = 0;
            loop {
                let page = history.page("a", after, size).await.expect("a history page");
                assert!(page.items.len() <= size as usize);
                seen.extend(page.items.iter().map(|r| (r.version, r.event_id, r.metadata.principal.clone())));
                match page.next {
                    Some(next) => after = next,
                    None => return seen,
                }
            }
        }
    };
    let expected: Vec<_> = log
        .iter()
        .filter(|e| e.aggregate_id == "a")
        .map(|e| (e.version, e.event_id, e.metadata.principal.clone()))
        .collect();
    assert_eq!(walk(7).await, expected, "pages of 7 walk every event once, in version order");
    assert_eq!(walk(1000).await, expected, "one page holds the whole history");
    let tail = history.page("a", 118, 10).await.expect("the last page");
    assert_eq!(tail.items.iter().map(|r| r.version).collect::<Vec<_>>(), [119, 120]);
    assert_eq!(tail.next, None);
    let other = history.page("a-b", 0, 100).await.expect("the other aggregate");
    assert_eq!(other.items.iter().map(|r| r.version).collect::<Vec<_>>(), (1..=30).collect::<Vec<_>>());
    assert!(history.page("missing", 0, 10).await.expect("no history").items.is_empty());
    let first = history.page("a", 0, 1).await.expect("first record");
    assert_eq!(first.items[0].payload, serde_json::json!({ "Added": { "amount": 1 } }), "the payload as JSON");

    projection.begin_rebuild().await.expect("begin a rebuild");
    for batch in log.chunks(40) {
        let checkpoint = checkpoint_after(batch.last().map_or(0, |e| e.position.offset));
        projection.apply(ViewCopy::Shadow, batch, &checkpoint).await.expect("rebuild a batch");
    }
    projection.swap().await.expect("swap");
    assert_eq!(walk(50).await, expected, "the rebuilt copy holds the same history");
}

fn checkpoint_after(offset: u64) -> Checkpoint {
    let mut checkpoint = Checkpoint::start();
    checkpoint.set_next(0, offset + 1);
    checkpoint
}
