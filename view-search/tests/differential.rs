//! Random rows and random queries: every page the search view returns is
//! the page the in-memory reference view returns (same rows, order, total
//! and cursor), across several segments, updates and deletes.

mod common;

use common::TempView;
use kes_core::{
    Checkpoint, Field, FieldType, FieldValue, FilterOp, InMemoryView, ListQuery, ListView, Position, Row, RowChange,
    ViewCopy, ViewSchema, ViewStore,
};

/// A small deterministic generator (no dependency, same cases every run).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn schema() -> ViewSchema {
    ViewSchema::new("mixed", 1)
        .field(Field::text("name").filterable().sortable().searchable())
        .field(Field::keyword("tag").filterable().sortable())
        .field(Field::integer("n").filterable().sortable())
        .field(Field::float("x").filterable().sortable())
        .field(Field::bool("b").filterable().sortable())
        .field(Field::timestamp("t").filterable().sortable())
        .page_sizes(4, 50)
}

const TEXTS: [&str; 12] = ["", "a", "A", "ab", "abc", "b", "Zeta", "zeta", "é", "éa", "e\u{301}", "日本"];
const INTS: [i64; 7] = [i64::MIN, -5, -1, 0, 1, 7, i64::MAX];
const FLOATS: [f64; 7] = [-1e300, -2.5, -0.0, 0.0, 0.5, 3.0, 1e300];
const TIMES: [&str; 5] = [
    "1969-12-31T23:59:59.999999Z",
    "1970-01-01T00:00:00Z",
    "2026-01-01T00:00:00Z",
    "2026-01-01T00:00:00.000001Z",
    "2999-01-01T00:00:00Z",
];

fn value(rng: &mut Rng, ty: FieldType) -> FieldValue {
    match ty {
        FieldType::Text | FieldType::Keyword => FieldValue::Text((*rng.pick(&TEXTS)).to_owned()),
        FieldType::Integer => FieldValue::Integer(*rng.pick(&INTS)),
        FieldType::Float => FieldValue::Float(*rng.pick(&FLOATS)),
        FieldType::Bool => FieldValue::Bool(rng.below(2) == 0),
        FieldType::Timestamp => FieldValue::parse(FieldType::Timestamp, rng.pick::<&str>(&TIMES)).expect("time"),
    }
}

fn text_of(v: &FieldValue) -> String {
    match v.to_json() {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    }
}

fn random_row(rng: &mut Rng, schema: &ViewSchema) -> Row {
    let mut row = Row::new();
    for f in &schema.fields {
        // About one value in four is missing.
        if rng.below(4) != 0 {
            row.insert(f.name.clone(), value(rng, f.ty));
        }
    }
    row
}

fn random_query(rng: &mut Rng, schema: &ViewSchema) -> ListQuery {
    let mut query = ListQuery::new();
    let mut fields: Vec<Field> = schema.fields.clone();
    fields.push(schema.get("id").expect("id"));
    for _ in 0..rng.below(3) {
        let field = rng.pick(&fields).clone();
        let ops: Vec<FilterOp> = FilterOp::ALL
            .into_iter()
            .filter(|op| *op != FilterOp::Prefix || matches!(field.ty, FieldType::Text | FieldType::Keyword))
            .collect();
        let op = *rng.pick(&ops);
        let text = if field.name == "id" {
            format!("r{:03}", rng.below(70))
        } else if op == FilterOp::In {
            (0..1 + rng.below(3)).map(|_| text_of(&value(rng, field.ty))).collect::<Vec<_>>().join(",")
        } else {
            text_of(&value(rng, field.ty))
        };
        // `in` splits on commas; skip values that hold one.
        if op == FilterOp::In && text.split(',').any(|t| FieldValue::parse(field.ty, t).is_none()) {
            continue;
        }
        query = query.filter(&field.name, op, text);
    }
    let sort: Vec<String> = (0..rng.below(4))
        .map(|_| {
            let f = rng.pick(&fields);
            if rng.below(2) == 0 { format!("-{}", f.name) } else { f.name.clone() }
        })
        .collect();
    query.sort_by(&sort.join(",")).page_size(1 + rng.below(7) as u32)
}

fn at(offset: u64) -> Checkpoint {
    let mut c = Checkpoint::start();
    c.advance(Position::new(0, offset));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_equal_the_reference_view() {
    let schema = schema();
    let search = TempView::new(schema.clone());
    let reference = InMemoryView::new(schema.clone()).expect("reference");
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    // Several commits: several segments, with updates and deletes across them.
    for batch in 0..6u64 {
        let changes: Vec<RowChange> = (0..25)
            .map(|_| {
                let id = format!("r{:03}", rng.below(60));
                let row = if rng.below(8) == 0 { None } else { Some(random_row(&mut rng, &schema)) };
                RowChange {
                    id,
                    version: batch + 1,
                    state: kes_core::RowChange::state_of(&serde_json::json!({ "batch": batch })).expect("state JSON"),
                    row,
                }
            })
            .collect();
        // The in-memory view keeps the last change of an id in a batch; so does the index.
        search.write(ViewCopy::Live, &changes, &at(batch)).await.expect("write search");
        reference.write(ViewCopy::Live, &changes, &at(batch)).await.expect("write reference");
    }
    let (mut checked, mut nonempty) = (0, 0);
    for case in 0..400 {
        let query = random_query(&mut rng, &schema);
        let mut q = query.clone();
        for page_no in 0.. {
            let want = reference.list(&q).await;
            let got = search.list(&q).await;
            assert_eq!(got, want, "case {case}, page {page_no} of {query:?}");
            checked += 1;
            nonempty += usize::from(want.as_ref().is_ok_and(|p| !p.items.is_empty()));
            match want.ok().and_then(|p| p.next) {
                Some(next) => q.after = Some(next),
                None => break,
            }
        }
    }
    // The cases are not vacuous: most pages hold rows.
    assert!(checked > 400 && nonempty > checked / 2, "{nonempty} of {checked} pages hold rows");
}
