//! The SQL key store of personal data, on SQLite and PostgreSQL: the first
//! key made for a person wins, erasure markers tell an erased key from a
//! missing one, erasure is idempotent, and an erased person's name leaves
//! no bytes in the SQLite files.

use std::sync::Arc;

use kes_core::{AggregateRef, KeyLookup, KeyRequest, KeyStore, WrappedKey};
use kes_store_sql::{SqlKeyStore, SqlKeyStoreConfig};

/// The key stores under test: a SQLite file, and a fresh PostgreSQL
/// database (its schema `kes_keys`). Each entry opens a second handle on
/// the same store, as a second process would.
async fn stores(tag: &str) -> Vec<(String, SqlKeyStoreConfig, tempfile::TempDir)> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let sqlite = format!("sqlite://{}", dir.path().join("keys.db").display());
    let mut out = vec![("sqlite".to_owned(), SqlKeyStoreConfig::from_url(&sqlite), dir)];
    if let Some(url) = kes_test_support::fresh_postgres_database(tag).await {
        let dir = tempfile::tempdir().expect("a temporary directory");
        out.push(("postgres".to_owned(), SqlKeyStoreConfig::from_url(&url).schema("kes_keys"), dir));
    }
    out
}

fn candidate(subject: &str) -> WrappedKey {
    WrappedKey { subject: subject.into(), key_id: "k1".into(), wrapped: vec![7; 56] }
}

fn person(name: &str, subject: &str) -> KeyRequest {
    KeyRequest::Person { person: name.into(), candidate: candidate(subject) }
}

fn key(answer: &KeyLookup) -> &WrappedKey {
    match answer {
        KeyLookup::Key(k) => k,
        other => panic!("expected a key, got {other:?}"),
    }
}

fn at(id: &str) -> AggregateRef {
    AggregateRef::new("project", id)
}

#[tokio::test]
async fn the_first_key_made_for_a_person_wins() {
    for (name, config, _dir) in stores("keys_first").await {
        let a = Arc::new(SqlKeyStore::open(config.clone()).await.expect(&name));
        let b = Arc::new(SqlKeyStore::open(config).await.expect(&name));
        let (p1, p2) = (at("p1"), at("p2"));
        let (ra, rb) = ([person("Ann", "s-a")], [person("Ann", "s-b")]);
        let (x, y) = tokio::join!(a.keys_for_sealing(&p1, &ra), b.keys_for_sealing(&p2, &rb));
        let (x, y) = (x.expect(&name), y.expect(&name));
        assert_eq!(key(&x[0]), key(&y[0]), "{name}: both writers use one key");
        // Later requests, by person or by subject, get the same key.
        let subject = key(&x[0]).subject.clone();
        let wanted = [person("Ann", "s-c"), KeyRequest::Subject(subject.clone())];
        let again = a.keys_for_sealing(&at("p3"), &wanted).await.expect(&name);
        assert_eq!(key(&again[0]).subject, subject, "{name}");
        assert_eq!(key(&again[1]).subject, subject, "{name}");
        let found = b.lookup(&[(subject.clone(), "k1".into())]).await.expect(&name);
        assert_eq!(key(&found[0]).wrapped, vec![7; 56], "{name}");
        a.close().await;
        b.close().await;
    }
}

#[tokio::test]
async fn erasure_is_durable_idempotent_and_tells_erased_from_missing() {
    for (name, config, _dir) in stores("keys_erase").await {
        let store = SqlKeyStore::open(config.clone()).await.expect(&name);
        let wanted = [person("Ann", "s-ann"), person("Bob", "s-bob")];
        store.keys_for_sealing(&at("p1"), &wanted).await.expect(&name);
        store.keys_for_sealing(&at("p2"), &[KeyRequest::Subject("s-ann".into())]).await.expect(&name);

        let erased = store.erase("Ann").await.expect(&name).expect("Ann is known");
        assert_eq!(erased.subject, "s-ann", "{name}");
        assert!(erased.first, "{name}");
        assert_eq!(erased.aggregates, [at("p1"), at("p2")], "{name}");
        store.erasure_recorded("s-ann", &at("p1")).await.expect(&name);

        // The marker outlives a reopen; the name leads nowhere any more.
        store.close().await;
        let store = SqlKeyStore::open(config).await.expect(&name);
        let wanted = [("s-ann".to_owned(), "k1".to_owned()), ("s-none".to_owned(), "k1".to_owned())];
        let looked = store.lookup(&wanted).await.expect(&name);
        assert!(matches!(looked[0], KeyLookup::Erased), "{name}: {looked:?}");
        assert!(matches!(looked[1], KeyLookup::Missing), "{name}: {looked:?}");
        let again = store.erase("s-ann").await.expect(&name).expect("a known erasure");
        assert!(!again.first, "{name}");
        assert_eq!(again.aggregates, [at("p2")], "{name}: what is left to record");
        assert!(store.erase("Ann").await.expect(&name).is_none(), "{name}");
        assert!(store.erase("nobody").await.expect(&name).is_none(), "{name}");
        // No key for an erased subject; Bob is intact.
        let wanted = [KeyRequest::Subject("s-ann".into())];
        let sealing = store.keys_for_sealing(&at("p3"), &wanted).await.expect(&name);
        assert!(matches!(sealing[0], KeyLookup::Erased), "{name}");
        let bob = store.lookup(&[("s-bob".into(), "k1".into())]).await.expect(&name);
        assert!(matches!(bob[0], KeyLookup::Key(_)), "{name}");
        // A person named again after an erasure is a new subject.
        let anew = store.keys_for_sealing(&at("p4"), &[person("Ann", "s-ann-2")]).await.expect(&name);
        assert_eq!(key(&anew[0]).subject, "s-ann-2", "{name}");
        store.close().await;
    }
}

#[tokio::test]
async fn an_erased_persons_name_leaves_no_bytes_in_the_sqlite_files() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("keys.db");
    let store = SqlKeyStore::open(format!("sqlite://{}", file.display())).await.expect("open");
    let name = "Quirinus Zebedee-Wolfenstein";
    store.keys_for_sealing(&at("p1"), &[person(name, "s-q")]).await.expect("a key");
    let holds = |needle: &str| {
        std::fs::read_dir(dir.path()).expect("the folder").flatten().any(|entry| {
            let bytes = std::fs::read(entry.path()).unwrap_or_default();
            bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
        })
    };
    assert!(holds(name), "the name is stored before the erasure (the check can fail)");
    store.erase(name).await.expect("erase").expect("known");
    assert!(!holds(name), "the erased name is still on disk");
    store.close().await;
}

#[tokio::test]
async fn a_key_store_that_cannot_answer_is_unavailable_not_erased() {
    use kes_core::{MasterKey, Vault, VaultError};
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = SqlKeyStore::open(format!("sqlite://{}", dir.path().join("keys.db").display())).await.expect("open");
    let vault = Vault::new(Arc::new(store.clone()), MasterKey::from_hex(&MasterKey::generate_hex()).expect("a key"));
    let sealed = vault.seal(&at("p1"), vec![kes_core::Personal::new("Ann", "Ann Secret".to_owned())]).await;
    let mut doc = serde_json::to_value(&sealed.expect("sealed")[0]).expect("json");
    store.close().await;
    // A fresh vault has nothing cached: it must ask the closed store.
    let cold = Vault::new(Arc::new(store), MasterKey::from_hex(&MasterKey::generate_hex()).expect("a key"));
    let err = cold.render(&at("p1"), &mut doc).await.expect_err("the store is closed");
    assert!(matches!(err, VaultError::Unavailable(_)), "{err:?}");
    assert!(!err.to_string().contains("Ann"), "{err}");
    assert!(doc.to_string().contains("\"$p\""), "nothing was opened");
}
