//! Crypto-shredding: the keys of personal data, and the sealing and
//! opening of [`Personal`](crate::Personal) values with them.
//!
//! Every data subject has a random 256-bit key, kept in a [`KeyStore`]
//! beside the log and wrapped there by a [`MasterKey`] from configuration.
//! Values are sealed with XChaCha20-Poly1305 (random 192-bit nonces, so a
//! key may seal any number of values), bound by associated data to the
//! aggregate type and id, the field's path, the subject and the key id.
//! Erasing a subject deletes its key and leaves a durable erasure marker:
//! a key that is missing without a marker is an outage (503), never an
//! erasure.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use lru::LruCache;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use sha2::Sha256;

use crate::personal::{self, ERASED_FIELD, PERSONAL_NODE, SealedNode, for_each_node, node_inner};
use crate::store::StoreError;

/// One aggregate: its type name and id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AggregateRef {
    /// The aggregate type ([`crate::Aggregate::NAME`]).
    pub aggregate: String,
    /// The aggregate id.
    pub id: String,
}

impl AggregateRef {
    /// The aggregate `id` of type `aggregate`.
    pub fn new(aggregate: impl Into<String>, id: impl Into<String>) -> Self {
        Self { aggregate: aggregate.into(), id: id.into() }
    }
}

impl fmt::Display for AggregateRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.aggregate, self.id)
    }
}

/// A subject's key as the key store keeps it: wrapped by the master key.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// The subject's opaque id.
    pub subject: String,
    /// The key's id (a subject's keys are told apart by it).
    pub key_id: String,
    /// Nonce and ciphertext of the key under the master key.
    pub wrapped: Vec<u8>,
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappedKey").field("subject", &self.subject).field("key_id", &self.key_id).finish()
    }
}

/// A key the sealing pass needs.
#[derive(Debug, Clone)]
pub enum KeyRequest {
    /// The key of the subject filed under `person`; when there is none
    /// yet, `candidate` is stored for it (the first writer wins: a
    /// concurrent writer's candidate is dropped and both get the same key).
    Person {
        /// The person's reference as the key store files it: a keyed hash
        /// of how the aggregate named the person, never the name itself.
        person: String,
        /// A new subject and key, used when the person has none.
        candidate: WrappedKey,
    },
    /// The current key of a subject already known (a value moved from one
    /// aggregate to another).
    Subject(String),
}

/// What the key store knows of a key.
#[derive(Debug, Clone)]
pub enum KeyLookup {
    /// The key.
    Key(WrappedKey),
    /// The subject was erased: its key is gone for good.
    Erased,
    /// Neither a key nor an erasure marker: the key store is behind (or
    /// the log refers to a key store it was not written with).
    Missing,
}

/// What erasing a subject did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erasure {
    /// The subject's opaque id.
    pub subject: String,
    /// The aggregates whose events hold the subject's data and have not
    /// recorded the erasure yet (see [`KeyStore::erasure_recorded`]).
    pub aggregates: Vec<AggregateRef>,
    /// False when the subject had already been erased before this call.
    pub first: bool,
}

/// Why the key store failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum KeyStoreError {
    /// The key store cannot be reached now; retrying may work.
    #[error("key store unavailable: {0}")]
    Unavailable(String),
    /// The key store failed in a way retrying will not fix.
    #[error("key store failure: {0}")]
    Backend(String),
}

/// Where the keys of data subjects live, beside the log: a table of the
/// SQL store, a compacted topic on Kafka, or memory.
///
/// A key store keeps, for each subject: its key (wrapped), the person
/// reference it was made for (deleted with the key), an erasure marker
/// once erased (never deleted), and the aggregates that hold its data.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// The keys for sealing values in `aggregate`, one answer per request
    /// in order, each durable before it is returned, and each subject
    /// recorded as having data in `aggregate`. A [`KeyRequest::Person`]
    /// always gets a key (its own, or the candidate); a
    /// [`KeyRequest::Subject`] may be erased.
    async fn keys_for_sealing(
        &self,
        aggregate: &AggregateRef,
        wanted: &[KeyRequest],
    ) -> Result<Vec<KeyLookup>, KeyStoreError>;

    /// The keys `(subject, key id)`, one answer per request in order.
    async fn lookup(&self, wanted: &[(String, String)]) -> Result<Vec<KeyLookup>, KeyStoreError>;

    /// Erases the subject with id `reference`, or else the subject filed
    /// under the person `reference`: deletes its keys and its person
    /// reference and leaves an erasure marker, atomically. `None` when
    /// no such subject was ever known.
    async fn erase(&self, reference: &str) -> Result<Option<Erasure>, KeyStoreError>;

    /// Records that `aggregate` has appended its erasure event for
    /// `subject`, so that erasing again does not repeat it.
    async fn erasure_recorded(&self, subject: &str, aggregate: &AggregateRef) -> Result<(), KeyStoreError>;
}

/// The key that wraps every subject key at rest, from configuration
/// (32 bytes, e.g. 64 hex digits in an environment variable). A second key
/// derived from it hashes person references before they reach the key
/// store, so that its rows and records hold no names.
#[derive(Clone)]
pub struct MasterKey {
    wrap: XChaCha20Poly1305,
    persons: Hmac<Sha256>,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(redacted)")
    }
}

impl MasterKey {
    /// The master key from 32 raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, VaultError> {
        let config = || VaultError::Config("a master key is 32 bytes".into());
        let wrap = XChaCha20Poly1305::new_from_slice(bytes).map_err(|_| config())?;
        let mut derive = <Hmac<Sha256> as Mac>::new_from_slice(bytes).map_err(|_| config())?;
        derive.update(b"kes-person-reference/v1");
        let persons = <Hmac<Sha256> as Mac>::new_from_slice(&derive.finalize().into_bytes()).map_err(|_| config())?;
        Ok(Self { wrap, persons })
    }

    /// The master key from 64 hex digits.
    pub fn from_hex(hex: &str) -> Result<Self, VaultError> {
        let hex = hex.trim();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(VaultError::Config("a master key is 64 hex digits".into()));
        }
        let bytes: Vec<u8> = (0..32).filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()).collect();
        Self::from_bytes(&bytes)
    }

    /// A new random master key, as 64 hex digits (to be kept in
    /// configuration: losing it loses every personal value).
    pub fn generate_hex() -> String {
        XChaCha20Poly1305::generate_key(&mut OsRng).iter().map(|b| format!("{b:02x}")).collect()
    }

    fn wrap(&self, subject: &str, key_id: &str, key: &[u8]) -> Result<Vec<u8>, VaultError> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = wrap_aad(subject, key_id);
        let sealed = self
            .wrap
            .encrypt(&nonce, Payload { msg: key, aad: aad.as_bytes() })
            .map_err(|_| VaultError::Backend("wrapping a key failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn unwrap(&self, key: &WrappedKey) -> Result<XChaCha20Poly1305, VaultError> {
        let bad = || VaultError::KeyCorrupt { subject: key.subject.clone() };
        if key.wrapped.len() < 24 {
            return Err(bad());
        }
        let (nonce, sealed) = key.wrapped.split_at(24);
        let aad = wrap_aad(&key.subject, &key.key_id);
        let raw = self
            .wrap
            .decrypt(XNonce::from_slice(nonce), Payload { msg: sealed, aad: aad.as_bytes() })
            .map_err(|_| bad())?;
        XChaCha20Poly1305::new_from_slice(&raw).map_err(|_| bad())
    }
}

impl MasterKey {
    /// What the key store files `person` under: a keyed hash, `p:` and 64
    /// hex digits.
    fn person_reference(&self, person: &str) -> String {
        let mut mac = self.persons.clone();
        mac.update(person.as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut out = String::with_capacity(66);
        out.push_str("p:");
        for b in digest {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }
}

fn wrap_aad(subject: &str, key_id: &str) -> String {
    format!("kes-key/v1\0{subject}\0{key_id}")
}

fn value_aad(at: &AggregateRef, field: &str, subject: &str, key_id: &str) -> String {
    format!("kes-personal/v1\0{}\0{}\0{field}\0{subject}\0{key_id}", at.aggregate, at.id)
}

/// Why personal data could not be sealed, opened or erased. Messages name
/// subjects, aggregates and field paths, never a value.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum VaultError {
    /// The key store cannot serve now, or a key is not visible yet.
    #[error("personal data cannot be read now: {0}")]
    Unavailable(String),
    /// A sealed value does not open with its key: a wrong key, a value
    /// moved or truncated, a broken node.
    #[error("personal data of {aggregate} at {field} does not open: {reason}")]
    Corrupt {
        /// The aggregate.
        aggregate: String,
        /// The value's JSON pointer.
        field: String,
        /// What was wrong.
        reason: &'static str,
    },
    /// A subject's key does not unwrap with the master key (another
    /// master key, or a damaged key store).
    #[error("the key of subject {subject} does not unwrap with the master key")]
    KeyCorrupt {
        /// The subject.
        subject: String,
    },
    /// The vault is set up wrongly.
    #[error("vault configuration: {0}")]
    Config(String),
    /// Anything else that retrying will not fix.
    #[error("vault failure: {0}")]
    Backend(String),
}

impl VaultError {
    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

impl From<KeyStoreError> for VaultError {
    fn from(e: KeyStoreError) -> Self {
        match e {
            KeyStoreError::Unavailable(m) => Self::Unavailable(m),
            KeyStoreError::Backend(m) => Self::Backend(m),
        }
    }
}

impl From<VaultError> for StoreError {
    fn from(e: VaultError) -> Self {
        match e {
            VaultError::Unavailable(m) => StoreError::Unavailable(m),
            VaultError::Corrupt { aggregate, field, reason } => StoreError::Corrupt {
                aggregate,
                id: String::new(),
                version: 0,
                reason: format!("personal data at {field}: {reason}"),
            },
            other => StoreError::Backend(other.to_string()),
        }
    }
}

/// How many keys, erased subjects and (subject, aggregate) links a vault
/// remembers.
const CACHE_ENTRIES: usize = 16_384;

struct SubjectKey {
    subject: String,
    key_id: String,
    cipher: XChaCha20Poly1305,
    /// When the key store handed it out: a cached key older than the
    /// vault's key TTL is asked for again.
    fetched: Instant,
}

impl SubjectKey {
    fn fresh(&self, ttl: Duration) -> bool {
        self.fetched.elapsed() < ttl
    }
}

/// How long a vault trusts a cached key by default (see
/// [`Vault::with_key_ttl`]).
pub const DEFAULT_KEY_TTL: Duration = Duration::from_secs(60);

struct Caches {
    by_person: LruCache<String, Arc<SubjectKey>>,
    current: LruCache<String, Arc<SubjectKey>>,
    by_id: LruCache<(String, String), Arc<SubjectKey>>,
    erased: LruCache<String, ()>,
    linked: LruCache<(String, AggregateRef), ()>,
}

impl Caches {
    fn new(entries: NonZeroUsize) -> Self {
        Self {
            by_person: LruCache::new(entries),
            current: LruCache::new(entries),
            by_id: LruCache::new(entries),
            erased: LruCache::new(entries),
            linked: LruCache::new(entries),
        }
    }

    fn learn(&mut self, key: &Arc<SubjectKey>) {
        self.current.put(key.subject.clone(), Arc::clone(key));
        self.by_id.put((key.subject.clone(), key.key_id.clone()), Arc::clone(key));
    }
}

/// Seals and opens personal data with the keys of a [`KeyStore`].
///
/// One per process, shared by the command buses (which seal), the
/// projections and the HTTP adapter (which open). It caches keys, erased
/// subjects and the subject → aggregate links it has recorded, so that a
/// warm command path makes no key-store round trip. An erasure made by
/// another process reaches this cache through the erasure event where this
/// process projects (see [`Vault::forget`]), and in any process once the
/// cached key is older than the key TTL ([`Vault::with_key_ttl`]): from
/// then on its reads show the subject erased, and a value named after the
/// person again gets a new subject rather than the erased key.
pub struct Vault {
    store: Arc<dyn KeyStore>,
    master: MasterKey,
    cache: Mutex<Caches>,
    key_ttl: Duration,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vault").finish_non_exhaustive()
    }
}

/// What the sealing pass found in a node.
enum Plain {
    Person(String),
    Moved(String),
    Reuse(Map<String, Value>),
    Stored,
}

impl Vault {
    /// A vault over `store`, whose keys are wrapped by `master`.
    pub fn new(store: Arc<dyn KeyStore>, master: MasterKey) -> Self {
        let entries = NonZeroUsize::new(CACHE_ENTRIES).unwrap_or(NonZeroUsize::MIN);
        Self { store, master, cache: Mutex::new(Caches::new(entries)), key_ttl: DEFAULT_KEY_TTL }
    }

    /// How long a cached key is used before the key store is asked again
    /// ([`DEFAULT_KEY_TTL`] by default): the longest another process's
    /// erasure goes unnoticed here when this process does not project the
    /// aggregate. Zero asks every time.
    pub fn with_key_ttl(mut self, ttl: Duration) -> Self {
        self.key_ttl = ttl;
        self
    }

    /// The key store behind this vault.
    pub fn key_store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    fn caches(&self) -> std::sync::MutexGuard<'_, Caches> {
        self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `items` (events of `at`) with every new personal value sealed, and
    /// every opened value stored as it was read (its ciphertext reused)
    /// or sealed again when it moved to another aggregate. Items without
    /// personal data come back as they were.
    // Kept in one piece: two passes over the same documents (find what needs keys, then seal with them)
    // share their indexes; split, each half would re-walk the trees.
    pub async fn seal<E: Serialize + DeserializeOwned>(
        &self,
        at: &AggregateRef,
        items: Vec<E>,
    ) -> Result<Vec<E>, VaultError> {
        let origin = at.to_string();
        let mut docs = Vec::with_capacity(items.len());
        let mut persons = BTreeSet::new();
        let mut subjects = BTreeSet::new();
        let mut any = false;
        for item in &items {
            let mut doc = personal::sealing(|| serde_json::to_value(item))
                .map_err(|e| VaultError::Backend(format!("an event of {at} does not serialize: {e}")))?;
            for_each_node(&mut doc, &mut |_, node| {
                any = true;
                match classify(node, &origin) {
                    Plain::Person(p) => {
                        persons.insert(p);
                    }
                    Plain::Moved(s) => {
                        subjects.insert(s);
                    }
                    Plain::Reuse(_) | Plain::Stored => {}
                }
            });
            docs.push(doc);
        }
        if !any {
            return Ok(items);
        }
        drop(items);
        let (by_person, by_subject) = self.sealing_keys(at, persons, subjects).await?;
        let mut failure = None;
        for doc in &mut docs {
            for_each_node(doc, &mut |path, node| {
                let sealed = match classify(node, &origin) {
                    Plain::Stored => return,
                    Plain::Reuse(inner) => Ok(Value::Object(inner)),
                    Plain::Person(p) => match by_person.get(&p) {
                        Some(key) => seal_value(at, path, key, node),
                        None => Err(VaultError::Backend(format!("no key for a person in {at}"))),
                    },
                    Plain::Moved(s) => match by_subject.get(&s) {
                        Some(Some(key)) => seal_value(at, path, key, node),
                        Some(None) => Ok(erased_inner(&s)),
                        None => Err(VaultError::Backend(format!("no key for subject {s}"))),
                    },
                };
                match sealed {
                    Ok(inner) => *node = single(inner),
                    Err(e) => failure = Some(e),
                }
            });
        }
        if let Some(e) = failure {
            return Err(e);
        }
        docs.into_iter()
            .map(|doc| {
                serde_json::from_value(doc)
                    .map_err(|e| VaultError::Backend(format!("a sealed event of {at} does not decode: {e}")))
            })
            .collect()
    }

    /// The keys for sealing: by person, and by subject (`None`: erased).
    async fn sealing_keys(
        &self,
        at: &AggregateRef,
        persons: BTreeSet<String>,
        subjects: BTreeSet<String>,
    ) -> Result<(ByPerson, BySubject), VaultError> {
        let (mut by_person, mut by_subject, wanted) = self.cached_sealing_keys(at, persons, subjects)?;
        if wanted.is_empty() {
            return Ok((by_person, by_subject));
        }
        let requests: Vec<KeyRequest> = wanted.iter().map(|(_, r)| r.clone()).collect();
        let answers = self.store.keys_for_sealing(at, &requests).await?;
        if answers.len() != wanted.len() {
            return Err(VaultError::Backend("the key store answered a different number of keys".into()));
        }
        let mut cache = self.caches();
        for ((person, request), answer) in wanted.into_iter().zip(answers) {
            let key = match answer {
                KeyLookup::Key(wrapped) => Some(self.learn(&mut cache, &wrapped)?),
                KeyLookup::Erased => None,
                KeyLookup::Missing => {
                    return Err(VaultError::Unavailable("the key store lost a key it was asked to make".into()));
                }
            };
            if let Some(key) = &key {
                cache.linked.put((key.subject.clone(), at.clone()), ());
            }
            match (request, key) {
                (KeyRequest::Person { .. }, Some(key)) => {
                    let person = person.unwrap_or_default();
                    cache.by_person.put(person.clone(), Arc::clone(&key));
                    by_person.insert(person, key);
                }
                (KeyRequest::Person { .. }, None) => {
                    return Err(VaultError::Backend("the key store refused a new subject".into()));
                }
                (KeyRequest::Subject(subject), key) => {
                    if key.is_none() {
                        cache.erased.put(subject.clone(), ());
                    }
                    by_subject.insert(subject, key);
                }
            }
        }
        Ok((by_person, by_subject))
    }

    /// The sealing keys the cache has (known and already linked to `at`),
    /// and the requests for the others, each with the person it is for in
    /// clear (requests name persons by their keyed hash only).
    fn cached_sealing_keys(
        &self,
        at: &AggregateRef,
        persons: BTreeSet<String>,
        subjects: BTreeSet<String>,
    ) -> Result<(ByPerson, BySubject, Wanted), VaultError> {
        let mut by_person = HashMap::new();
        let mut by_subject = HashMap::new();
        let mut wanted = Vec::new();
        let mut cache = self.caches();
        for person in persons {
            let known = cache.by_person.get(&person).filter(|k| k.fresh(self.key_ttl)).cloned();
            match known {
                Some(key) if cache.linked.get(&(key.subject.clone(), at.clone())).is_some() => {
                    by_person.insert(person, key);
                }
                _ => {
                    let request = self.person_request(&person)?;
                    wanted.push((Some(person), request));
                }
            }
        }
        for subject in subjects {
            if cache.erased.get(&subject).is_some() {
                by_subject.insert(subject, None);
                continue;
            }
            let known = cache.current.get(&subject).filter(|k| k.fresh(self.key_ttl)).cloned();
            match known {
                Some(key) if cache.linked.get(&(subject.clone(), at.clone())).is_some() => {
                    by_subject.insert(subject, Some(key));
                }
                _ => wanted.push((None, KeyRequest::Subject(subject))),
            }
        }
        Ok((by_person, by_subject, wanted))
    }

    fn person_request(&self, person: &str) -> Result<KeyRequest, VaultError> {
        let subject = uuid::Uuid::new_v4().simple().to_string();
        let key_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let key = XChaCha20Poly1305::generate_key(&mut OsRng);
        let wrapped = self.master.wrap(&subject, &key_id, &key)?;
        Ok(KeyRequest::Person {
            person: self.master.person_reference(person),
            candidate: WrappedKey { subject, key_id, wrapped },
        })
    }

    fn learn(&self, cache: &mut Caches, wrapped: &WrappedKey) -> Result<Arc<SubjectKey>, VaultError> {
        let cipher = self.master.unwrap(wrapped)?;
        let key = Arc::new(SubjectKey {
            subject: wrapped.subject.clone(),
            key_id: wrapped.key_id.clone(),
            cipher,
            fetched: Instant::now(),
        });
        cache.learn(&key);
        Ok(key)
    }

    /// `item` (a state or an event of `at`) with every sealed value opened
    /// (and every value of an erased subject erased): what `handle`,
    /// guards and list rows see.
    pub async fn open<T: Serialize + DeserializeOwned + Clone>(
        &self,
        at: &AggregateRef,
        item: &T,
    ) -> Result<T, VaultError> {
        let mut opened = self.open_all(std::slice::from_ref(&(at.clone(), item))).await?;
        opened.pop().ok_or_else(|| VaultError::Backend("opening lost an item".into()))
    }

    /// Like [`Vault::open`], for many items at once, with one key-store
    /// round trip for every key not cached (rebuilds, projection batches).
    pub async fn open_all<T: Serialize + DeserializeOwned + Clone>(
        &self,
        items: &[(AggregateRef, &T)],
    ) -> Result<Vec<T>, VaultError> {
        let mut docs = Vec::with_capacity(items.len());
        for (at, item) in items {
            let doc = serde_json::to_value(item)
                .map_err(|e| VaultError::Backend(format!("a document of {at} does not serialize: {e}")))?;
            docs.push((at.clone(), doc));
        }
        let opened = self.open_documents(docs).await?;
        Ok(items.iter().zip(opened).map(|((_, item), opened)| opened.unwrap_or_else(|| (*item).clone())).collect())
    }

    /// [`Vault::open_all`] for values already serialized: `docs` are their
    /// JSON trees (the stored form), each opened in place and decoded into
    /// a `T`, with one key lookup for the whole batch; `None` for a
    /// document that holds no personal value (the caller's typed value is
    /// already the opened one), so that a batch without personal data
    /// decodes nothing.
    pub async fn open_documents<T: DeserializeOwned>(
        &self,
        docs: Vec<(AggregateRef, Value)>,
    ) -> Result<Vec<Option<T>>, VaultError> {
        let mut sealed: Vec<(AggregateRef, Option<Value>)> = docs
            .into_iter()
            .map(|(at, doc)| {
                let holds = crate::personal::holds_node(&doc);
                (at, holds.then_some(doc))
            })
            .collect();
        let keys = self.keys_of(sealed.iter_mut().filter_map(|(_, doc)| doc.as_mut())).await?;
        let mut out = Vec::with_capacity(sealed.len());
        for (at, doc) in sealed {
            let Some(mut doc) = doc else {
                out.push(None);
                continue;
            };
            let origin = Value::String(at.to_string());
            let mut failure = None;
            for_each_node(&mut doc, &mut |path, node| match open_node(&at, path, node, &keys) {
                Ok(Opened::Value(value)) => {
                    // The node keeps its sealed fields (a `Personal` stores
                    // them as they came) beside the plain value.
                    if let Some(inner) = node_inner(node) {
                        inner.insert("v".into(), value);
                        inner.insert("o".into(), origin.clone());
                    }
                }
                Ok(Opened::Erased(subject)) => *node = single(erased_inner(&subject)),
                Err(e) => failure = Some(e),
            });
            if let Some(e) = failure {
                return Err(e);
            }
            let opened = serde_json::from_value(doc)
                .map_err(|e| VaultError::Backend(format!("an opened document of {at} does not decode: {e}")))?;
            out.push(Some(opened));
        }
        Ok(out)
    }

    /// Renders `doc` (the stored JSON of a state or an event of `at`) for a
    /// reader: every personal value as its plain value, or `null` when its
    /// subject was erased, with the JSON pointers of the erased ones listed
    /// in [`ERASED_FIELD`] when `doc` is an object.
    pub async fn render(&self, at: &AggregateRef, doc: &mut Value) -> Result<(), VaultError> {
        self.render_all(&mut [(at.clone(), doc)]).await
    }

    /// `bytes` (the stored JSON of a document of `at`) rendered as
    /// [`Vault::render`] does; `None`, without parsing, when it holds no
    /// personal data.
    pub async fn render_bytes(&self, at: &AggregateRef, bytes: &[u8]) -> Result<Option<Vec<u8>>, VaultError> {
        if !personal::may_hold_nodes(bytes) {
            return Ok(None);
        }
        let mut doc: Value = serde_json::from_slice(bytes)
            .map_err(|e| VaultError::Backend(format!("a stored document of {at} is not JSON: {e}")))?;
        self.render(at, &mut doc).await?;
        serde_json::to_vec(&doc).map(Some).map_err(|e| VaultError::Backend(e.to_string()))
    }

    /// Like [`Vault::render`], for many documents with one key-store round
    /// trip.
    pub async fn render_all(&self, docs: &mut [(AggregateRef, &mut Value)]) -> Result<(), VaultError> {
        let keys = self.keys_of(docs.iter_mut().map(|(_, d)| &mut **d)).await?;
        for (at, doc) in docs.iter_mut() {
            let mut erased = Vec::new();
            let mut failure = None;
            for_each_node(doc, &mut |path, node| match open_node(at, path, node, &keys) {
                Ok(Opened::Value(value)) => *node = value,
                Ok(Opened::Erased(_)) => {
                    *node = Value::Null;
                    erased.push(Value::String(path.to_owned()));
                }
                Err(e) => failure = Some(e),
            });
            if let Some(e) = failure {
                return Err(e);
            }
            if !erased.is_empty()
                && let Value::Object(map) = doc
            {
                map.insert(ERASED_FIELD.into(), Value::Array(erased));
            }
        }
        Ok(())
    }

    /// The keys of every sealed node in `docs`, from the cache or, for the
    /// rest, from one key-store lookup.
    async fn keys_of<'a>(&self, docs: impl Iterator<Item = &'a mut Value>) -> Result<KeyRing, VaultError> {
        let mut ring = KeyRing::default();
        let mut wanted = BTreeSet::new();
        {
            let mut cache = self.caches();
            for doc in docs {
                for_each_node(doc, &mut |_, node| {
                    let Some(inner) = node_inner(node) else { return };
                    let text = |key: &str| inner.get(key).and_then(Value::as_str);
                    // Erased nodes name no key; a node lacking a field of a
                    // sealed one fails as corrupt when it is opened.
                    let (Some(subject), Some(key_id)) = (text("s"), text("k")) else { return };
                    let id = (subject.to_owned(), key_id.to_owned());
                    if ring.keys.contains_key(&id) || ring.erased.contains(&id.0) {
                        return;
                    }
                    if cache.erased.get(&id.0).is_some() {
                        ring.erased.insert(id.0);
                    } else if let Some(key) = cache.by_id.get(&id).filter(|k| k.fresh(self.key_ttl)) {
                        ring.keys.insert(id, Arc::clone(key));
                    } else {
                        wanted.insert(id);
                    }
                });
            }
        }
        if wanted.is_empty() {
            return Ok(ring);
        }
        let wanted: Vec<(String, String)> = wanted.into_iter().collect();
        let answers = self.store.lookup(&wanted).await?;
        if answers.len() != wanted.len() {
            return Err(VaultError::Backend("the key store answered a different number of keys".into()));
        }
        let mut cache = self.caches();
        for (id, answer) in wanted.into_iter().zip(answers) {
            match answer {
                KeyLookup::Key(wrapped) => {
                    let key = self.learn(&mut cache, &wrapped)?;
                    ring.keys.insert(id, key);
                }
                KeyLookup::Erased => {
                    cache.erased.put(id.0.clone(), ());
                    ring.erased.insert(id.0);
                }
                KeyLookup::Missing => {
                    return Err(VaultError::Unavailable(format!(
                        "the key {} of subject {} is not in the key store yet",
                        id.1, id.0
                    )));
                }
            }
        }
        Ok(ring)
    }

    /// Erases the subject filed under the person `reference`, or else the
    /// subject with id `reference` (see [`KeyStore::erase`]), and forgets
    /// its key here. The aggregates in the answer still have to record the
    /// erasure in their logs ([`crate::CommandBus::record_erasure`]).
    pub async fn erase(&self, reference: &str) -> Result<Option<Erasure>, VaultError> {
        let erasure = match self.store.erase(&self.master.person_reference(reference)).await? {
            Some(erasure) => Some(erasure),
            None => self.store.erase(reference).await?,
        };
        if let Some(e) = &erasure {
            self.forget(&e.subject);
        }
        Ok(erasure)
    }

    /// Drops every cached key of `subject` and remembers it as erased:
    /// called on an erasure, and by readers of the log when they meet an
    /// erasure event (which may come from another process).
    pub fn forget(&self, subject: &str) {
        let mut cache = self.caches();
        cache.current.pop(subject);
        let ids: Vec<(String, String)> =
            cache.by_id.iter().filter(|(k, _)| k.0 == subject).map(|(k, _)| k.clone()).collect();
        for id in ids {
            cache.by_id.pop(&id);
        }
        let persons: Vec<String> =
            cache.by_person.iter().filter(|(_, k)| k.subject == subject).map(|(p, _)| p.clone()).collect();
        for person in persons {
            cache.by_person.pop(&person);
        }
        cache.erased.put(subject.to_owned(), ());
    }
}

/// Sealing keys by person (in clear, in memory only).
type ByPerson = HashMap<String, Arc<SubjectKey>>;

/// Sealing keys by subject; `None`: erased.
type BySubject = HashMap<String, Option<Arc<SubjectKey>>>;

/// Requests for the key store, each with the person it is for in clear.
type Wanted = Vec<(Option<String>, KeyRequest)>;

/// Keys gathered for one opening pass.
#[derive(Default)]
struct KeyRing {
    keys: HashMap<(String, String), Arc<SubjectKey>>,
    erased: HashSet<String>,
}

enum Opened {
    /// The plain value; the node is left as it was.
    Value(Value),
    Erased(String),
}

fn classify(node: &mut Value, origin: &str) -> Plain {
    let Some(inner) = node_inner(node) else { return Plain::Stored };
    if let Some(Value::String(person)) = inner.get("person") {
        return Plain::Person(person.clone());
    }
    if !inner.contains_key("v") {
        return Plain::Stored;
    }
    match (inner.get("o"), inner.get("reuse"), inner.get("s")) {
        (Some(Value::String(o)), Some(Value::Object(reuse)), _) if o == origin => Plain::Reuse(reuse.clone()),
        (_, _, Some(Value::String(s))) => Plain::Moved(s.clone()),
        _ => Plain::Stored,
    }
}

fn single(inner: impl Into<Value>) -> Value {
    let mut outer = Map::with_capacity(1);
    outer.insert(PERSONAL_NODE.into(), inner.into());
    Value::Object(outer)
}

fn erased_inner(subject: &str) -> Value {
    let mut inner = Map::with_capacity(2);
    inner.insert("s".into(), Value::String(subject.to_owned()));
    inner.insert("x".into(), Value::Bool(true));
    Value::Object(inner)
}

/// Seals the plain value of `node` at `path` with `key`.
fn seal_value(at: &AggregateRef, path: &str, key: &SubjectKey, node: &mut Value) -> Result<Value, VaultError> {
    let plain = node_inner(node).and_then(|inner| inner.remove("v")).unwrap_or(Value::Null);
    let bytes = serde_json::to_vec(&plain).map_err(|e| VaultError::Backend(e.to_string()))?;
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let aad = value_aad(at, path, &key.subject, &key.key_id);
    let ciphertext = key
        .cipher
        .encrypt(&nonce, Payload { msg: &bytes, aad: aad.as_bytes() })
        .map_err(|_| VaultError::Backend(format!("sealing {path} of {at} failed")))?;
    let sealed = SealedNode {
        subject: key.subject.clone(),
        key_id: key.key_id.clone(),
        field: path.to_owned(),
        nonce: B64.encode(nonce),
        ciphertext: B64.encode(ciphertext),
    };
    serde_json::to_value(sealed).map_err(|e| VaultError::Backend(e.to_string()))
}

/// Opens the node at `path` of a document of `at`: its plain value, or
/// the subject it was erased for.
fn open_node(at: &AggregateRef, path: &str, node: &Value, keys: &KeyRing) -> Result<Opened, VaultError> {
    let corrupt = |reason| VaultError::Corrupt { aggregate: at.to_string(), field: path.to_owned(), reason };
    let inner =
        node.get(PERSONAL_NODE).and_then(Value::as_object).ok_or_else(|| corrupt("not a personal-data node"))?;
    let text = |key: &str| inner.get(key).and_then(Value::as_str);
    if inner.get("x") == Some(&Value::Bool(true)) {
        return Ok(Opened::Erased(text("s").unwrap_or_default().to_owned()));
    }
    let (Some(subject), Some(key_id), Some(field), Some(nonce), Some(ciphertext)) =
        (text("s"), text("k"), text("f"), text("n"), text("c"))
    else {
        return Err(corrupt("a sealed node lacks one of its fields"));
    };
    if keys.erased.contains(subject) {
        return Ok(Opened::Erased(subject.to_owned()));
    }
    let key = keys
        .keys
        .get(&(subject.to_owned(), key_id.to_owned()))
        .ok_or_else(|| VaultError::Unavailable(format!("no key {key_id} for subject {subject}")))?;
    let mut nonce_bytes = [0u8; 24];
    match B64.decode_slice(nonce, &mut nonce_bytes) {
        Ok(24) => {}
        Ok(_) | Err(base64::DecodeSliceError::OutputSliceTooSmall) => return Err(corrupt("the nonce is not 192 bits")),
        Err(base64::DecodeSliceError::DecodeError(_)) => return Err(corrupt("the nonce is not base64")),
    }
    let ciphertext = B64.decode(ciphertext).map_err(|_| corrupt("the ciphertext is not base64"))?;
    let aad = value_aad(at, field, subject, key_id);
    let plain = key
        .cipher
        .decrypt(XNonce::from_slice(&nonce_bytes), Payload { msg: &ciphertext, aad: aad.as_bytes() })
        .map_err(|_| corrupt("the ciphertext does not authenticate (wrong key, moved or truncated)"))?;
    let value = serde_json::from_slice(&plain).map_err(|_| corrupt("the plaintext is not JSON"))?;
    Ok(Opened::Value(value))
}

/// A key store in memory: for tests and the in-memory store. Everything
/// is lost with the process.
#[derive(Debug, Default)]
pub struct InMemoryKeyStore {
    state: Mutex<MemoryKeys>,
}

#[derive(Debug, Default)]
struct MemoryKeys {
    keys: HashMap<String, (Option<String>, WrappedKey)>,
    persons: HashMap<String, String>,
    erased: HashSet<String>,
    links: HashMap<String, BTreeSet<AggregateRef>>,
}

impl InMemoryKeyStore {
    /// An empty key store.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemoryKeys> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl KeyStore for InMemoryKeyStore {
    async fn keys_for_sealing(
        &self,
        aggregate: &AggregateRef,
        wanted: &[KeyRequest],
    ) -> Result<Vec<KeyLookup>, KeyStoreError> {
        let mut state = self.state();
        let mut out = Vec::with_capacity(wanted.len());
        for request in wanted {
            let answer = match request {
                KeyRequest::Person { person, candidate } => {
                    let subject = match state.persons.get(person) {
                        Some(subject) => subject.clone(),
                        None => {
                            state.persons.insert(person.clone(), candidate.subject.clone());
                            state.keys.insert(candidate.subject.clone(), (Some(person.clone()), candidate.clone()));
                            candidate.subject.clone()
                        }
                    };
                    state.keys.get(&subject).map(|(_, k)| KeyLookup::Key(k.clone())).unwrap_or(KeyLookup::Missing)
                }
                KeyRequest::Subject(subject) => match state.keys.get(subject) {
                    Some((_, k)) => KeyLookup::Key(k.clone()),
                    None if state.erased.contains(subject) => KeyLookup::Erased,
                    None => KeyLookup::Missing,
                },
            };
            if let KeyLookup::Key(k) = &answer {
                let subject = k.subject.clone();
                state.links.entry(subject).or_default().insert(aggregate.clone());
            }
            out.push(answer);
        }
        Ok(out)
    }

    async fn lookup(&self, wanted: &[(String, String)]) -> Result<Vec<KeyLookup>, KeyStoreError> {
        let state = self.state();
        Ok(wanted
            .iter()
            .map(|(subject, key_id)| match state.keys.get(subject) {
                Some((_, k)) if &k.key_id == key_id => KeyLookup::Key(k.clone()),
                _ if state.erased.contains(subject) => KeyLookup::Erased,
                _ => KeyLookup::Missing,
            })
            .collect())
    }

    async fn erase(&self, reference: &str) -> Result<Option<Erasure>, KeyStoreError> {
        let mut state = self.state();
        let subject = if state.keys.contains_key(reference) || state.erased.contains(reference) {
            reference.to_owned()
        } else if let Some(subject) = state.persons.get(reference) {
            subject.clone()
        } else {
            return Ok(None);
        };
        let first = !state.erased.contains(&subject);
        if let Some((Some(person), _)) = state.keys.remove(&subject) {
            state.persons.remove(&person);
        }
        state.erased.insert(subject.clone());
        let aggregates = state.links.get(&subject).map(|l| l.iter().cloned().collect()).unwrap_or_default();
        Ok(Some(Erasure { subject, aggregates, first }))
    }

    async fn erasure_recorded(&self, subject: &str, aggregate: &AggregateRef) -> Result<(), KeyStoreError> {
        let mut state = self.state();
        if let Some(links) = state.links.get_mut(subject) {
            links.remove(aggregate);
        }
        Ok(())
    }
}
