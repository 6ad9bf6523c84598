//! Crypto-shredding over the in-memory store: sealing before the append,
//! opening for `handle` and readers, erasure through the log, and the
//! typed errors of wrong keys, damaged values and missing keys.

use std::sync::Arc;
use std::time::Duration;

use kes_core::{
    Aggregate, AggregateRef, CatchUp, CommandBus, CommandError, DomainEvent, EventStore, ExpectedVersion, Field,
    FieldValue, InMemoryKeyStore, InMemoryStore, InMemoryView, KeyStore, ListQuery, ListView, MasterKey, Metadata,
    Personal, Projection, ProjectionRunner, Row, RunnerConfig, Vault, VaultError, ViewProjection, ViewSchema,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

const ADA: &str = "Ada Quillfeather";
const BOB: &str = "Bob Marchbanks";

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Member {
    name: Option<Personal<String>>,
    mentor: Option<Personal<String>>,
    visits: u32,
}

#[derive(Debug, Clone)]
enum Cmd {
    Register {
        name: String,
        mentor: String,
    },
    Rename(String),
    /// Records a visit, copying the name as it is into the event.
    Visit,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Ev {
    Registered { name: Personal<String>, mentor: Personal<String> },
    Renamed { name: Personal<String> },
    Visited { name: Option<Personal<String>> },
    Erased { subject: String },
}

impl DomainEvent for Ev {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Registered { .. } => "Registered",
            Self::Renamed { .. } => "Renamed",
            Self::Visited { .. } => "Visited",
            Self::Erased { .. } => "Erased",
        }
    }

    fn subject_erased(subject: &str) -> Option<Self> {
        Some(Self::Erased { subject: subject.to_owned() })
    }

    fn erased_subject(&self) -> Option<&str> {
        match self {
            Self::Erased { subject } => Some(subject),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the name is already that")]
struct SameName;

fn person(name: &str) -> Personal<String> {
    Personal::new(name, name.to_owned())
}

impl Aggregate for Member {
    const NAME: &'static str = "member";
    const PERSONAL_DATA: bool = true;
    type Command = Cmd;
    type Event = Ev;
    type Error = SameName;

    fn handle(&self, command: Cmd) -> Result<Vec<Ev>, SameName> {
        match command {
            Cmd::Register { name, mentor } => Ok(vec![Ev::Registered { name: person(&name), mentor: person(&mentor) }]),
            // Needs the plaintext: `handle` sees the state opened.
            Cmd::Rename(name) if self.name.as_ref().and_then(Personal::value) == Some(&name) => Err(SameName),
            Cmd::Rename(name) => Ok(vec![Ev::Renamed { name: person(&name) }]),
            Cmd::Visit => Ok(vec![Ev::Visited { name: self.name.clone() }]),
        }
    }

    fn apply(&mut self, event: &Ev) {
        match event {
            Ev::Registered { name, mentor } => {
                self.name = Some(name.clone());
                self.mentor = Some(mentor.clone());
            }
            Ev::Renamed { name } => self.name = Some(name.clone()),
            Ev::Visited { .. } => self.visits += 1,
            Ev::Erased { .. } => {}
        }
    }
}

fn master() -> MasterKey {
    MasterKey::from_hex(&MasterKey::generate_hex()).unwrap()
}

struct Setup {
    store: InMemoryStore<Member>,
    keys: Arc<InMemoryKeyStore>,
    master: MasterKey,
    vault: Arc<Vault>,
    bus: CommandBus<Member, InMemoryStore<Member>>,
}

fn setup() -> Setup {
    let store = InMemoryStore::new();
    let keys = Arc::new(InMemoryKeyStore::new());
    let master = master();
    let vault = Arc::new(Vault::new(keys.clone(), master.clone()));
    let bus = CommandBus::new(store.clone()).with_vault(vault.clone());
    Setup { store, keys, master, vault, bus }
}

fn register(name: &str, mentor: &str) -> Cmd {
    Cmd::Register { name: name.into(), mentor: mentor.into() }
}

/// Everything the store holds of `id`, as it would be written out.
async fn stored_text(store: &InMemoryStore<Member>, id: &str) -> String {
    let events = store.read(id).await.unwrap();
    let state = store.load(id).await.unwrap().map(|s| s.state);
    format!(
        "{}{}",
        serde_json::to_string(&events.iter().map(|e| &e.payload).collect::<Vec<_>>()).unwrap(),
        serde_json::to_string(&state).unwrap()
    )
}

async fn rendered_state(s: &Setup, id: &str) -> Value {
    let state = s.store.load(id).await.unwrap().unwrap().state;
    let mut doc = serde_json::to_value(&state).unwrap();
    s.vault.render(&AggregateRef::new("member", id), &mut doc).await.unwrap();
    doc
}

#[tokio::test]
async fn personal_values_are_sealed_in_the_log_and_opened_for_readers() {
    let s = setup();
    s.bus.execute("m1", register(ADA, BOB), ExpectedVersion::NoStream, Metadata::default()).await.unwrap();
    let stored = stored_text(&s.store, "m1").await;
    assert!(!stored.contains("Ada") && !stored.contains("Bob"), "plaintext stored: {stored}");
    assert!(stored.contains("\"$p\""), "{stored}");
    let doc = rendered_state(&s, "m1").await;
    assert_eq!(doc["name"], json!(ADA));
    assert_eq!(doc["mentor"], json!(BOB));
    assert!(doc.get("_erased").is_none());
    // Two values of one person share a subject; two persons do not.
    let state = s.store.load("m1").await.unwrap().unwrap().state;
    let (name, mentor) = (state.name.unwrap(), state.mentor.unwrap());
    assert_ne!(name.subject(), mentor.subject());
    assert!(name.value().is_none(), "the stored state stays sealed");
}

#[tokio::test]
async fn handle_decides_on_the_opened_state() {
    let s = setup();
    s.bus.execute("m1", register(ADA, BOB), ExpectedVersion::NoStream, Metadata::default()).await.unwrap();
    let again = s.bus.execute("m1", Cmd::Rename(ADA.into()), ExpectedVersion::Any, Metadata::default()).await;
    assert!(matches!(again, Err(CommandError::Rejected(SameName))), "{again:?}");
    s.bus.execute("m1", Cmd::Rename("Ada Q.".into()), ExpectedVersion::Any, Metadata::default()).await.unwrap();
    assert_eq!(rendered_state(&s, "m1").await["name"], json!("Ada Q."));
}

#[tokio::test]
async fn a_value_copied_within_its_aggregate_keeps_its_ciphertext() {
    let s = setup();
    s.bus.execute("m1", register(ADA, BOB), ExpectedVersion::NoStream, Metadata::default()).await.unwrap();
    s.bus.execute("m1", Cmd::Visit, ExpectedVersion::Any, Metadata::default()).await.unwrap();
    let events = s.store.read("m1").await.unwrap();
    let node = |e: &Ev| match e {
        Ev::Registered { name, .. } | Ev::Visited { name: Some(name) } => serde_json::to_value(name).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(node(&events[0].payload), node(&events[1].payload), "re-sealed instead of reused");
}

#[tokio::test]
async fn erasure_travels_through_the_log_and_every_read_shows_it() {
    let s = setup();
    s.bus.execute("m1", register(ADA, BOB), ExpectedVersion::NoStream, Metadata::default()).await.unwrap();
    s.bus.execute("m2", register(BOB, ADA), ExpectedVersion::NoStream, Metadata::default()).await.unwrap();
    let erasure = s.vault.erase(ADA).await.unwrap().expect("Ada is known");
    assert!(erasure.first);
    let mut touched: Vec<String> = erasure.aggregates.iter().map(|a| a.id.clone()).collect();
    touched.sort();
    assert_eq!(touched, ["m1", "m2"]);
    for at in &erasure.aggregates {
        let appended = s.bus.record_erasure(&at.id, &erasure.subject).await.unwrap();
        assert!(appended.is_some(), "{at} moved");
    }
    assert_eq!(s.store.load("m1").await.unwrap().unwrap().version, 2, "the erasure is an event");
    let m1 = rendered_state(&s, "m1").await;
    assert_eq!(m1["name"], Value::Null);
    assert_eq!(m1["mentor"], json!(BOB), "other subjects' data is intact");
    assert_eq!(m1["_erased"], json!(["/name"]));
    let m2 = rendered_state(&s, "m2").await;
    assert_eq!((&m2["name"], &m2["mentor"], &m2["_erased"]), (&json!(BOB), &Value::Null, &json!(["/mentor"])));
    // The history shows it erased too.
    let events = s.store.read("m1").await.unwrap();
    let mut first = serde_json::to_value(&events[0].payload).unwrap();
    s.vault.render(&AggregateRef::new("member", "m1"), &mut first).await.unwrap();
    assert_eq!(first["Registered"]["name"], Value::Null);
    assert_eq!(first["_erased"], json!(["/Registered/name"]));
    // Commands keep working on the aggregate.
    s.bus.execute("m1", Cmd::Rename("Someone".into()), ExpectedVersion::Any, Metadata::default()).await.unwrap();
    assert_eq!(rendered_state(&s, "m1").await["name"], json!("Someone"));
    // Erasing again is a no-op by subject id: nothing left to record.
    let again = s.vault.erase(&erasure.subject).await.unwrap().expect("a known erasure");
    assert!(!again.first);
    assert!(again.aggregates.is_empty(), "{again:?}");
    // The name no longer leads anywhere; unknown references are None.
    assert!(s.vault.erase(ADA).await.unwrap().is_none());
    assert!(s.vault.erase("nobody").await.unwrap().is_none());
}

#[tokio::test]
async fn recording_an_erasure_twice_appends_once() {
    let s = setup();
    s.bus.execute("m1", register(ADA, BOB), ExpectedVersion::NoStream, Metadata::default()).await.unwrap();
    let erasure = s.vault.erase(ADA).await.unwrap().unwrap();
    let first = s.bus.record_erasure("m1", &erasure.subject).await.unwrap().unwrap();
    let second = s.bus.record_erasure("m1", &erasure.subject).await.unwrap().unwrap();
    assert_eq!(first.version, second.version, "the retry replays the first append");
    assert_eq!(s.store.read("m1").await.unwrap().len(), 2);
    assert!(s.bus.record_erasure("absent", &erasure.subject).await.unwrap().is_none());
}

#[tokio::test]
async fn a_bus_without_a_vault_refuses_to_store_plaintext() {
    let store = InMemoryStore::<Member>::new();
    let bus = CommandBus::new(store.clone());
    let err = bus.execute("m1", register(ADA, BOB), ExpectedVersion::NoStream, Metadata::default()).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("unsealed"), "{text}");
    assert!(!text.contains("Ada"), "{text}");
    assert!(store.read("m1").await.unwrap().is_empty(), "nothing appended");
}

#[tokio::test]
async fn wrong_keys_damaged_values_and_missing_keys_are_typed_errors() {
    let s = setup();
    s.bus.execute("m1", register(ADA, BOB), ExpectedVersion::NoStream, Metadata::default()).await.unwrap();
    let state = s.store.load("m1").await.unwrap().unwrap().state;
    let doc = serde_json::to_value(&state).unwrap();
    let at = AggregateRef::new("member", "m1");

    // Another master key: the subject keys do not unwrap.
    let other = Vault::new(s.keys.clone(), master());
    let err = other.render(&at, &mut doc.clone()).await.unwrap_err();
    assert!(matches!(err, VaultError::KeyCorrupt { .. }), "{err}");

    // A truncated ciphertext, or a node moved to another aggregate, does
    // not authenticate.
    let mut truncated = doc.clone();
    let c = truncated["name"]["$p"]["c"].as_str().unwrap().to_owned();
    truncated["name"]["$p"]["c"] = json!(c[..c.len() - 4]);
    let err = s.vault.render(&at, &mut truncated).await.unwrap_err();
    assert!(matches!(&err, VaultError::Corrupt { field, .. } if field == "/name"), "{err}");
    let err = s.vault.render(&AggregateRef::new("member", "m9"), &mut doc.clone()).await.unwrap_err();
    assert!(matches!(err, VaultError::Corrupt { .. }), "{err}");
    let mut broken = doc.clone();
    broken["name"]["$p"]["n"] = json!("not base64!");
    assert!(matches!(s.vault.render(&at, &mut broken).await, Err(VaultError::Corrupt { .. })));
    // Nonces of 16 and 32 bytes, valid base64 both, and a node without its
    // field path: corrupt, whether rendered or opened into the typed state
    // (which a node without its field path is not even decoded into).
    let short = "A".repeat(22);
    let long = "A".repeat(43);
    for (field, value) in [("n", Some(short.as_str())), ("n", Some(long.as_str())), ("f", None)] {
        let mut broken = doc.clone();
        let inner = broken["name"]["$p"].as_object_mut().unwrap();
        match value {
            Some(v) => inner.insert(field.into(), json!(v)),
            None => inner.remove(field),
        };
        let err = s.vault.render(&at, &mut broken.clone()).await.unwrap_err();
        assert!(matches!(&err, VaultError::Corrupt { field, .. } if field == "/name"), "{err}");
        let Ok(damaged) = serde_json::from_value::<Member>(broken) else {
            assert_eq!(field, "f");
            continue;
        };
        let err = s.vault.open(&at, &damaged).await.unwrap_err();
        assert!(matches!(&err, VaultError::Corrupt { field, .. } if field == "/name"), "{err}");
    }

    // A key store that never had the key: unavailable, not erased.
    let empty = Vault::new(Arc::new(InMemoryKeyStore::new()), master());
    let err = empty.render(&at, &mut doc.clone()).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    let text = err.to_string();
    assert!(!text.contains("Ada") && !text.contains("Bob"), "{text}");
}

#[tokio::test]
async fn two_vaults_making_a_persons_first_key_at_once_agree() {
    let store = InMemoryStore::<Member>::new();
    let keys = Arc::new(InMemoryKeyStore::new());
    let key = master();
    let a = CommandBus::new(store.clone()).with_vault(Arc::new(Vault::new(keys.clone(), key.clone())));
    let b = CommandBus::new(store.clone()).with_vault(Arc::new(Vault::new(keys.clone(), key.clone())));
    let (x, y) = tokio::join!(
        a.execute("m1", register(ADA, BOB), ExpectedVersion::NoStream, Metadata::default()),
        b.execute("m2", register(ADA, BOB), ExpectedVersion::NoStream, Metadata::default()),
    );
    x.unwrap();
    y.unwrap();
    let reader = Vault::new(keys, key);
    for id in ["m1", "m2"] {
        let state = store.load(id).await.unwrap().unwrap().state;
        let mut doc = serde_json::to_value(&state).unwrap();
        reader.render(&AggregateRef::new("member", id), &mut doc).await.unwrap();
        assert_eq!(doc["name"], json!(ADA));
    }
    let s1 = store.load("m1").await.unwrap().unwrap().state.name.unwrap();
    let s2 = store.load("m2").await.unwrap().unwrap().state.name.unwrap();
    assert_eq!(s1.subject(), s2.subject(), "one subject per person");
}

#[tokio::test]
async fn list_rows_hold_the_opened_values_and_lose_them_on_erasure() {
    let s = setup();
    let schema = ViewSchema::new("members", 1).field(Field::keyword("name").filterable());
    let view = Arc::new(InMemoryView::new(schema).unwrap());
    let to_row = |m: &Member| {
        let mut row = Row::new();
        if let Some(name) = m.name.as_ref().and_then(Personal::value) {
            row.insert("name".into(), FieldValue::Text(name.clone()));
        }
        row
    };
    let projection: Arc<dyn Projection<Ev>> =
        Arc::new(ViewProjection::<Member>::new(view.clone(), to_row).with_vault(s.vault.clone()));
    let config = RunnerConfig { retry_delay: Duration::from_millis(20), ..RunnerConfig::default() };
    let runner = ProjectionRunner::new(s.store.clone(), vec![projection], config);
    runner.start().await.unwrap();
    let done = s.bus.execute("m1", register(ADA, BOB), ExpectedVersion::NoStream, Metadata::default()).await.unwrap();
    let names = || async {
        let page = view.list(&ListQuery::new()).await.unwrap();
        page.items.into_iter().map(|i| i.row.get("name").cloned()).collect::<Vec<_>>()
    };
    assert!(runner.wait_for(done.position.unwrap(), Duration::from_secs(5)).await);
    assert_eq!(names().await, [Some(FieldValue::Text(ADA.into()))]);
    let erasure = s.vault.erase(ADA).await.unwrap().unwrap();
    let erased = s.bus.record_erasure("m1", &erasure.subject).await.unwrap().unwrap();
    assert!(runner.wait_for(erased.position, Duration::from_secs(5)).await);
    assert_eq!(names().await, [None]);
    runner.shutdown().await;
    // The key store forgot the link once the erasure was recorded.
    let again = s.keys.erase(&erasure.subject).await.unwrap().unwrap();
    assert!(again.aggregates.is_empty());
}

#[tokio::test]
async fn another_processs_erasure_reaches_a_vault_once_its_cached_keys_expire() {
    let s = setup();
    // Another process: its own vault and bus on the same log and key store,
    // trusting cached keys for no time at all.
    let other_vault = Arc::new(Vault::new(s.keys.clone(), s.master.clone()).with_key_ttl(Duration::ZERO));
    let other = CommandBus::new(s.store.clone()).with_vault(other_vault.clone());
    other.execute("m1", register(ADA, BOB), ExpectedVersion::NoStream, Metadata::default()).await.unwrap();
    let at = AggregateRef::new("member", "m1");
    let state = |store: InMemoryStore<Member>| async move { store.load("m1").await.unwrap().unwrap().state };
    let mut doc = serde_json::to_value(state(s.store.clone()).await).unwrap();
    other_vault.render(&at, &mut doc).await.unwrap();
    assert_eq!(doc["name"], json!(ADA), "its cache holds Ada's key");

    // This process erases Ada; the other one projects nothing.
    s.vault.erase(ADA).await.unwrap().unwrap();
    let mut doc = serde_json::to_value(state(s.store.clone()).await).unwrap();
    other_vault.render(&at, &mut doc).await.unwrap();
    assert_eq!(doc["name"], Value::Null, "a stale cached key is not used");
    // Naming Ada again there makes a new subject, readable everywhere.
    other.execute("m1", Cmd::Rename(ADA.into()), ExpectedVersion::Any, Metadata::default()).await.unwrap();
    assert_eq!(rendered_state(&s, "m1").await["name"], json!(ADA));
}
