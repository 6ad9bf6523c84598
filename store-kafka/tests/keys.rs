//! The Kafka key store of personal data: the first key written for a
//! person wins for every instance, erasure markers outlive a restart and
//! tell an erased key from a missing one, and erasure is idempotent.

mod common;

use kes_core::{AggregateRef, KeyLookup, KeyRequest, KeyStore, WrappedKey};
use kes_store_kafka::KafkaKeyStore;

fn person(name: &str, subject: &str) -> KeyRequest {
    let candidate = WrappedKey { subject: subject.into(), key_id: "k1".into(), wrapped: vec![7; 56] };
    KeyRequest::Person { person: name.into(), candidate }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_agree_on_a_persons_first_key_and_on_erasures() {
    let Some(brokers) = common::brokers() else { return };
    let config = common::config(&brokers, 1);
    let a = KafkaKeyStore::open(&config).await.expect("the first instance");
    let b = KafkaKeyStore::open(&config).await.expect("the second instance");

    let (p1, p2) = (at("p1"), at("p2"));
    let (ra, rb) = ([person("Ann", "s-a")], [person("Ann", "s-b")]);
    let (x, y) = tokio::join!(a.keys_for_sealing(&p1, &ra), b.keys_for_sealing(&p2, &rb));
    let (x, y) = (x.expect("a"), y.expect("b"));
    assert_eq!(key(&x[0]), key(&y[0]), "both instances use the key first in the log");
    let subject = key(&x[0]).subject.clone();
    // A key another instance wrote is found by a lookup here.
    let wanted = [(subject.clone(), "k1".to_owned())];
    assert_eq!(key(&b.lookup(&wanted).await.expect("lookup")[0]).subject, subject);
    let wanted = [person("Bob", "s-bob")];
    a.keys_for_sealing(&p1, &wanted).await.expect("Bob's key");

    let erased = b.erase("Ann").await.expect("erase").expect("Ann is known");
    assert_eq!(erased.subject, subject);
    assert!(erased.first);
    assert_eq!(erased.aggregates, [at("p1"), at("p2")]);
    a.erasure_recorded(&subject, &at("p1")).await.expect("recorded");

    // A third instance, started after all that, reads the same.
    let c = KafkaKeyStore::open(&config).await.expect("a third instance");
    let wanted = [(subject.clone(), "k1".to_owned()), ("s-none".to_owned(), "k1".to_owned())];
    let looked = c.lookup(&wanted).await.expect("lookup");
    assert!(matches!(looked[0], KeyLookup::Erased), "{looked:?}");
    assert!(matches!(looked[1], KeyLookup::Missing), "{looked:?}");
    let again = c.erase(&subject).await.expect("erase").expect("a known erasure");
    assert!(!again.first);
    assert_eq!(again.aggregates, [at("p2")], "what is left to record");
    assert!(c.erase("Ann").await.expect("erase").is_none(), "the name is forgotten with the key");
    assert!(c.erase("nobody").await.expect("erase").is_none());
    let bob = c.lookup(&[("s-bob".to_owned(), "k1".to_owned())]).await.expect("lookup");
    assert!(matches!(bob[0], KeyLookup::Key(_)), "another person's key is intact");
    // No key for an erased subject; a person named again is a new subject.
    let wanted = [KeyRequest::Subject(subject.clone())];
    assert!(matches!(c.keys_for_sealing(&at("p3"), &wanted).await.expect("sealing")[0], KeyLookup::Erased));
    let wanted = [person("Ann", "s-ann-2")];
    assert_eq!(key(&c.keys_for_sealing(&at("p4"), &wanted).await.expect("sealing")[0]).subject, "s-ann-2");
}
