//! Full-text search as a user of a search box expects it.

mod common;

use common::TempView;
use kes_core::{
    Checkpoint, Field, FilterOp, ListQuery, ListView, Position, QueryError, Row, RowChange, ViewCopy, ViewError,
    ViewSchema, ViewStore,
};
use kes_view_search::SearchView;

fn schema() -> ViewSchema {
    ViewSchema::new("projects", 1)
        .field(Field::text("name").filterable().sortable().searchable())
        .field(Field::keyword("tag").filterable().searchable())
        .field(Field::integer("budget").filterable().sortable())
        .field(Field::text("notes"))
        .page_sizes(10, 100)
}

fn change(id: &str, version: u64, name: Option<&str>, tag: &str, budget: i64) -> RowChange {
    let row = name.map(|name| {
        let mut row = Row::new();
        row.insert("name".into(), name.into());
        row.insert("tag".into(), tag.into());
        row.insert("budget".into(), budget.into());
        row.insert("notes".into(), "bridge".into());
        row
    });
    RowChange {
        id: id.into(),
        version,
        state: kes_core::RowChange::state_of(&serde_json::json!({ "v": version })).expect("state JSON"),
        row,
    }
}

fn at(offset: u64) -> Checkpoint {
    let mut c = Checkpoint::start();
    c.advance(Position::new(0, offset));
    c
}

async fn fixture() -> TempView {
    let view = TempView::new(schema());
    let changes = [
        change("p1", 1, Some("Harbour Bridge Repainting"), "Urgent", 500),
        change("p2", 1, Some("bridge inspection"), "routine", 80),
        change("p3", 1, Some("Riverside Park"), "routine", 120),
        change("p4", 1, Some("Bridgewater library"), "urgent", 300),
        change("p5", 1, Some("Inspecting the old mill"), "paused", 40),
        change("p6", 1, Some("Épée Fencing Hall"), "routine", 60),
    ];
    view.write(ViewCopy::Live, &changes, &at(5)).await.expect("write");
    view
}

async fn ids(view: &dyn ListView, query: ListQuery) -> Vec<String> {
    view.list(&query).await.unwrap_or_else(|e| panic!("{query:?}: {e}")).items.into_iter().map(|i| i.id).collect()
}

fn sorted(q: &str) -> ListQuery {
    ListQuery::new().search(q).sort_by("id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_word_inside_a_name_finds_the_row_whatever_its_case() {
    let view = fixture().await;
    assert_eq!(
        ids(&view, sorted("bridge")).await,
        ["p1", "p2"],
        "a word, not a substring: Bridgewater is another word"
    );
    assert_eq!(ids(&view, sorted("BRIDGE")).await, ["p1", "p2"]);
    assert_eq!(ids(&view, sorted("repainting")).await, ["p1"]);
    assert_eq!(ids(&view, sorted("épée")).await, ["p6"]);
    assert_eq!(ids(&view, sorted("ÉPÉE")).await, ["p6"]);
    assert_eq!(ids(&view, sorted("library")).await, ["p4"]);
    // `notes` says "bridge" on every row, but it is not searchable.
    assert_eq!(ids(&view, sorted("bridge")).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inflected_words_find_their_stem() {
    let view = fixture().await;
    assert_eq!(ids(&view, sorted("bridges")).await, ["p1", "p2"]);
    assert_eq!(ids(&view, sorted("repaint")).await, ["p1"]);
    assert_eq!(ids(&view, sorted("inspect")).await, ["p2", "p5"]);
    assert_eq!(ids(&view, sorted("parks")).await, ["p3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keywords_match_whole_values_without_case() {
    let view = fixture().await;
    assert_eq!(ids(&view, sorted("urgent")).await, ["p1", "p4"]);
    assert_eq!(ids(&view, sorted("tag:ROUTINE")).await, ["p2", "p3", "p6"]);
    assert_eq!(ids(&view, sorted("urg")).await, Vec::<String>::new(), "a keyword is never split");
    // The exact filter stays case-sensitive, as in every backend.
    let exact = ListQuery::new().filter("tag", FilterOp::Eq, "urgent");
    assert_eq!(ids(&view, exact).await, ["p4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_words_must_match_and_syntax_works() {
    let view = fixture().await;
    assert_eq!(ids(&view, sorted("bridge inspection")).await, ["p2"]);
    assert_eq!(ids(&view, sorted("bridge OR park")).await, ["p1", "p2", "p3"]);
    assert_eq!(ids(&view, sorted("bridge -harbour")).await, ["p2"]);
    assert_eq!(ids(&view, sorted("\"harbour bridge\"")).await, ["p1"]);
    assert_eq!(ids(&view, sorted("\"bridge harbour\"")).await, Vec::<String>::new());
    assert_eq!(ids(&view, sorted("name:bridge")).await, ["p1", "p2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_combines_with_filters_sorts_and_paging() {
    let view = fixture().await;
    let q = ListQuery::new()
        .search("bridge OR inspecting OR park")
        .filter("budget", FilterOp::Gte, "50")
        .sort_by("-budget");
    assert_eq!(ids(&view, q.clone()).await, ["p1", "p3", "p2"]);
    let page = view.list(&q.clone().page_size(2)).await.expect("page 1");
    assert_eq!((page.items.len(), page.total), (2, 3));
    let rest = view.list(&q.page_size(2).after(page.next.expect("next"))).await.expect("page 2");
    assert_eq!(rest.items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["p2"]);
    assert!(rest.next.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_sort_the_best_match_comes_first() {
    let view = fixture().await;
    // BM25: the shorter name that holds the word ranks first.
    let page = view.list(&ListQuery::new().search("bridge")).await.expect("list");
    assert_eq!(page.items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["p2", "p1"]);
    // Offset cursors walk every match exactly once.
    let query = ListQuery::new().search("bridge OR routine OR urgent").page_size(2);
    let (mut seen, mut next) = (Vec::new(), None::<String>);
    loop {
        let q = match &next {
            Some(c) => query.clone().after(c.clone()),
            None => query.clone(),
        };
        let page = view.list(&q).await.expect("page");
        assert_eq!(page.total, 5);
        seen.extend(page.items.into_iter().map(|i| i.id));
        next = page.next;
        if next.is_none() {
            break;
        }
    }
    seen.sort();
    assert_eq!(seen, ["p1", "p2", "p3", "p4", "p6"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_row_is_never_found_again() {
    let view = fixture().await;
    view.write(ViewCopy::Live, &[change("p1", 2, None, "", 0)], &at(6)).await.expect("delete");
    assert_eq!(ids(&view, sorted("harbour")).await, Vec::<String>::new());
    assert_eq!(ids(&view, sorted("bridge")).await, ["p2"]);
    assert_eq!(ids(&view, ListQuery::new().filter("budget", FilterOp::Eq, "500")).await, Vec::<String>::new());
    assert_eq!(ids(&view, ListQuery::new().filter("id", FilterOp::Eq, "p1")).await, Vec::<String>::new());
    assert_eq!(view.list(&ListQuery::new()).await.expect("list").total, 5);
    // Its state stays, for the next event of the aggregate.
    let states = view.states(ViewCopy::Live, &["p1".to_owned()]).await.expect("states");
    assert_eq!(states["p1"].version, 2);
    // Still gone after more writes and after the index is opened again.
    view.write(ViewCopy::Live, &[change("p7", 1, Some("Harbour lights"), "routine", 1)], &at(7)).await.expect("write");
    assert_eq!(ids(&view, sorted("harbour")).await, ["p7"]);
    let TempView { view, dir } = view;
    drop(view);
    let reopened = SearchView::open(dir.path().join("index").join("projects"), schema()).expect("reopen");
    assert_eq!(ids(&reopened, sorted("harbour")).await, ["p7"]);
    assert_eq!(ids(&reopened, sorted("bridge")).await, ["p2"]);
    assert_eq!(reopened.position().await.expect("position"), at(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_that_cannot_be_parsed_is_a_typed_error() {
    let view = fixture().await;
    for bad in ["name:(bridge", "budget:500", "notes:bridge", "_raw_name:x", "_listed:false", "nosuch:word", "\"open"] {
        match view.list(&ListQuery::new().search(bad)).await {
            Err(ViewError::Query(QueryError::BadSearch(_))) => {}
            other => panic!("{bad:?} gave {other:?}"),
        }
    }
    // Odd input never panics: it is answered or refused with a typed error.
    for odd in [
        "(",
        ")",
        "[",
        "]",
        "{",
        "}",
        "\\",
        "^",
        "~",
        ":",
        "*",
        "AND",
        "OR NOT",
        "a^",
        "a~x",
        "name:[a TO",
        "name:{* TO *}",
        "+-+",
        "\"",
        "''",
        "name:IN [a b",
        "\u{0}",
        "a AND (b OR",
        "---",
        "name:",
    ] {
        match view.list(&ListQuery::new().search(odd)).await {
            Ok(_) | Err(ViewError::Query(QueryError::BadSearch(_))) => {}
            other => panic!("{odd:?} gave {other:?}"),
        }
    }
}
