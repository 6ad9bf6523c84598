//! `load_document` on the SQL store: a cached state's JSON document is made
//! once per version and every read of that version shares the one buffer
//! (a `GET` by id answers with it and copies nothing); a new version gets a
//! new document.

mod common;

use kes_core::conformance::{Ledger, LedgerEvent};
use kes_core::{EventStore, ExpectedVersion, Metadata};

#[tokio::test]
async fn reads_of_one_version_share_its_document() {
    let store = common::sqlite::<Ledger>().await;
    let events = vec![LedgerEvent::Opened, LedgerEvent::Added { amount: 5 }];
    store.append("l-1", ExpectedVersion::NoStream, events, Metadata::default()).await.expect("append");

    let first = store.load_document("l-1").await.expect("load").expect("l-1");
    let second = store.load_document("l-1").await.expect("load").expect("l-1");
    assert_eq!(first, second);
    assert_eq!(first.version, 2);
    let decoded: Ledger = serde_json::from_slice(&first.json).expect("the document is the state's JSON");
    assert_eq!(decoded.total, 5);
    assert_eq!(first.json.as_ptr(), second.json.as_ptr(), "the second read copied the document");

    store
        .append("l-1", ExpectedVersion::Exact(2), vec![LedgerEvent::Added { amount: 7 }], Metadata::default())
        .await
        .expect("append");
    let third = store.load_document("l-1").await.expect("load").expect("l-1");
    assert_eq!(third.version, 3);
    let decoded: Ledger = serde_json::from_slice(&third.json).expect("the document is the state's JSON");
    assert_eq!(decoded.total, 12, "a new version's document is the new state");
}
