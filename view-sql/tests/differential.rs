//! Random rows and random queries: every page of a SqlView (both dialects)
//! equals the page of kes-core's InMemoryView, item for item, with the same
//! `next` cursors and totals.

mod common;

use chrono::{TimeZone, Utc};
use kes_core::{
    Checkpoint, Field, FieldValue, FilterOp, InMemoryView, ListQuery, ListView, Row, RowChange, ViewCopy, ViewSchema,
    ViewStore,
};
use kes_view_sql::SqlView;

fn schema() -> ViewSchema {
    ViewSchema::new("mixed", 1)
        .field(Field::text("title").filterable().sortable().searchable())
        .field(Field::keyword("kind").filterable().sortable().searchable())
        .field(Field::integer("n").filterable().sortable())
        .field(Field::float("x").filterable().sortable())
        .field(Field::bool("on").filterable().sortable())
        .field(Field::timestamp("at").filterable().sortable())
        .page_sizes(7, 40)
}

struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.next(items.len() as u64) as usize]
    }
}

const WORDS: [&str; 12] =
    ["alpha", "Alpha", "ALPHA_1", "beta%", "b_ta", "Ärger", "ärger", "zeta", "", "a", "ab", "日本"];
const KINDS: [&str; 5] = ["x", "y", "Y", "z_", "x%"];

fn random_row(rng: &mut Lcg) -> Row {
    let mut row = Row::new();
    // Each field is missing one time in five.
    if rng.next(5) > 0 {
        let title = format!("{} {}", rng.pick(&WORDS), rng.pick(&WORDS));
        row.insert("title".into(), title.trim().to_owned().into());
    }
    if rng.next(5) > 0 {
        row.insert("kind".into(), rng.pick(&KINDS).into());
    }
    if rng.next(5) > 0 {
        row.insert("n".into(), (rng.next(21) as i64 - 10).into());
    }
    if rng.next(5) > 0 {
        row.insert("x".into(), ((rng.next(17) as f64 - 8.0) / 4.0).into());
    }
    if rng.next(5) > 0 {
        row.insert("on".into(), (rng.next(2) == 1).into());
    }
    if rng.next(5) > 0 {
        let t = Utc.timestamp_micros(1_700_000_000_000_000 + rng.next(9) as i64 * 1_000_001).single().expect("time");
        row.insert("at".into(), FieldValue::from(t));
    }
    row
}

fn random_query(rng: &mut Lcg) -> ListQuery {
    let mut q = ListQuery::new().page_size(1 + rng.next(12) as u32);
    for _ in 0..rng.next(3) {
        let (field, values): (&str, Vec<String>) = match rng.next(6) {
            0 => ("title", WORDS.iter().map(|w| (*w).to_owned()).collect()),
            1 => ("kind", KINDS.iter().map(|w| (*w).to_owned()).collect()),
            2 => ("n", (-11..=11).map(|i| i.to_string()).collect()),
            3 => ("x", ["-2", "-0.5", "0", "0.25", "1.75"].iter().map(|w| (*w).to_owned()).collect()),
            4 => ("on", vec!["true".into(), "false".into()]),
            _ => ("at", vec!["2023-11-14T22:13:20Z".into(), "2023-11-14T22:13:24.000004Z".into()]),
        };
        let text = matches!(field, "title" | "kind");
        let ops: &[FilterOp] = if text { &FilterOp::ALL } else { &FilterOp::ALL[..7] };
        let op = ops[rng.next(ops.len() as u64) as usize];
        let mut value = values[rng.next(values.len() as u64) as usize].clone();
        if op == FilterOp::In {
            value = format!("{value},{}", values[rng.next(values.len() as u64) as usize]);
        }
        q = q.filter(field, op, value);
    }
    let sortable = ["title", "kind", "n", "x", "on", "at", "id"];
    let keys: Vec<String> = (0..rng.next(4))
        .map(|_| format!("{}{}", if rng.next(2) == 1 { "-" } else { "" }, sortable[rng.next(7) as usize]))
        .collect();
    q = q.sort_by(&keys.join(","));
    if rng.next(4) == 0 {
        q = q.search(rng.pick(&["al", "ÄR", "_", "%", "a b", "t", "日"]));
    }
    q
}

async fn same_answers(view: SqlView) {
    let memory = InMemoryView::new(schema()).expect("memory");
    let mut rng = Lcg(20_261_126);
    let changes: Vec<RowChange> = (0..240)
        .map(|i| RowChange {
            id: format!("{}{i:03}", ["r", "R", "s_", "é"][i % 4]),
            version: 1 + (i as u64 % 3),
            state: kes_core::RowChange::state_of(&serde_json::json!({ "i": i })).expect("state JSON"),
            row: if i % 17 == 0 { None } else { Some(random_row(&mut rng)) },
        })
        .collect();
    for chunk in changes.chunks(50) {
        view.write(ViewCopy::Live, chunk, &Checkpoint::start()).await.expect("write sql");
        memory.write(ViewCopy::Live, chunk, &Checkpoint::start()).await.expect("write memory");
    }
    let mut pages = 0;
    for _ in 0..150 {
        let mut query = random_query(&mut rng);
        for _ in 0..60 {
            let expected = memory.list(&query).await.unwrap_or_else(|e| panic!("memory {query:?}: {e}"));
            let got = view.list(&query).await.unwrap_or_else(|e| panic!("sql {query:?}: {e}"));
            assert_eq!(got, expected, "{query:?}");
            pages += 1;
            match got.next {
                Some(next) => query = query.after(next),
                None => break,
            }
        }
    }
    assert!(pages > 300, "too few pages compared: {pages}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_answers_like_the_in_memory_view() {
    if let Some(view) = common::pg(schema()).await {
        same_answers(view).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_answers_like_the_in_memory_view() {
    if let Some(view) = common::sqlite(schema()).await {
        same_answers(view).await;
    }
}
