//! The keys of personal data on Kafka: a [`KeyStore`] in one compacted
//! topic, `{prefix}.keys`, that every instance reads whole and follows.
//!
//! Records are keyed by JSON arrays, so that compaction keeps what each
//! kind needs:
//! - `["k", subject]`: the subject's key, wrapped by the master key, and
//!   the person it was made for. Two instances making a person's first key
//!   at once write two subjects; the first in the log is the person's, for
//!   every reader. Erasure writes a tombstone, which compaction removes
//!   with the key's earlier record.
//! - `["e", subject]`: the erasure marker, never deleted.
//! - `["l", subject, aggregate type, id]`: an aggregate holds the subject's
//!   data; a tombstone once the aggregate recorded the erasure.
//!
//! Every write is answered once this instance's reader of the topic has
//! applied it, so the answer is what every reader of the log agrees on.
//!
//! Bytes left behind: until compaction runs, an erased key's record stays in
//! the topic's older segments. The topic is created with `segment.ms` and
//! `max.compaction.lag.ms` of one day, so on Apache Kafka an erased key is
//! gone from the broker's disk within about two days (plus the time the
//! cleaner needs). Brokers that do not compact keep it; so do backups and
//! mirrors of the topic. Keep the master key apart: without it the key
//! records are ciphertext.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use kes_core::{AggregateRef, Erasure, KeyLookup, KeyRequest, KeyStore, KeyStoreError, WrappedKey};
use rdkafka::TopicPartitionList;
use rdkafka::admin::{AdminClient, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::Consumer;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::client::{
    Detached, Reach, Reader, client_config, create_consumer, create_producer, follow_wait_ms, start_at,
};
use crate::config::KafkaStoreConfig;
use crate::error::KafkaStoreError;

/// `segment.ms` and `max.compaction.lag.ms` of the keys topic: how long an
/// erased key may wait for compaction at most, twice.
const COMPACTION_BOUND_MS: &str = "86400000";

/// The key of a record of the keys topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
enum RecordKey {
    /// `["k", subject]` or `["e", subject]`.
    Subject(String, String),
    /// `["l", subject, aggregate type, id]`.
    Link(String, String, String, String),
}

/// The value of a key record.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyValue {
    person: Option<String>,
    key_id: String,
    wrapped: String,
}

/// The topic as read so far.
#[derive(Debug, Default)]
struct Keys {
    keys: HashMap<String, (Option<String>, WrappedKey)>,
    persons: HashMap<String, String>,
    erased: HashSet<String>,
    links: HashMap<String, BTreeSet<AggregateRef>>,
}

impl Keys {
    /// Applies one record; records that do not parse are skipped (logged
    /// by subject only).
    fn apply(&mut self, key: &[u8], value: Option<&[u8]>) {
        let Ok(key) = serde_json::from_slice::<RecordKey>(key) else {
            tracing::warn!("a record of the keys topic has a key that is not KES's; skipped");
            return;
        };
        match key {
            RecordKey::Subject(kind, subject) if kind == "k" => match value {
                None => self.forget(&subject),
                Some(_) if self.erased.contains(&subject) => {}
                Some(value) => match serde_json::from_slice::<KeyValue>(value) {
                    Ok(v) => {
                        let Ok(wrapped) = B64.decode(v.wrapped.as_bytes()) else {
                            tracing::warn!(%subject, "a key record is not base64; skipped");
                            return;
                        };
                        if let Some(person) = &v.person {
                            // The first key made for a person is the person's.
                            self.persons.entry(person.clone()).or_insert_with(|| subject.clone());
                        }
                        let key = WrappedKey { subject: subject.clone(), key_id: v.key_id, wrapped };
                        self.keys.insert(subject, (v.person, key));
                    }
                    Err(_) => tracing::warn!(%subject, "a key record does not parse; skipped"),
                },
            },
            RecordKey::Subject(kind, subject) if kind == "e" => {
                self.forget(&subject);
                self.erased.insert(subject);
            }
            RecordKey::Subject(..) => tracing::warn!("a record of the keys topic of an unknown kind; skipped"),
            RecordKey::Link(kind, subject, aggregate, id) if kind == "l" => {
                let at = AggregateRef::new(aggregate, id);
                match value {
                    Some(_) => {
                        self.links.entry(subject).or_default().insert(at);
                    }
                    None => {
                        if let Some(links) = self.links.get_mut(&subject) {
                            links.remove(&at);
                        }
                    }
                }
            }
            RecordKey::Link(..) => tracing::warn!("a record of the keys topic of an unknown kind; skipped"),
        }
    }

    fn forget(&mut self, subject: &str) {
        if let Some((Some(person), _)) = self.keys.remove(subject)
            && self.persons.get(&person).is_some_and(|s| s == subject)
        {
            self.persons.remove(&person);
        }
    }

    fn lookup(&self, subject: &str) -> KeyLookup {
        match self.keys.get(subject) {
            Some((_, key)) => KeyLookup::Key(key.clone()),
            None if self.erased.contains(subject) => KeyLookup::Erased,
            None => KeyLookup::Missing,
        }
    }
}

/// A [`KeyStore`] in a compacted Kafka topic.
#[derive(Clone)]
pub struct KafkaKeyStore {
    inner: Arc<Inner>,
}

struct Inner {
    topic: String,
    config: KafkaStoreConfig,
    producer: FutureProducer,
    /// The topic as the reader applied it.
    state: Arc<Mutex<Keys>>,
    /// The next offset the reader will apply.
    applied: watch::Receiver<i64>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl std::fmt::Debug for KafkaKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaKeyStore").field("topic", &self.inner.topic).finish_non_exhaustive()
    }
}

impl KafkaKeyStore {
    /// The key store of the service whose topics `config` names: the topic
    /// `{prefix}.keys`, created when missing, read whole before this
    /// returns.
    pub async fn open(config: &KafkaStoreConfig) -> Result<Self, KafkaStoreError> {
        config.validate()?;
        let topic = format!("{}.keys", config.topic_prefix);
        create_topic(config, &topic).await?;
        let producer = create_producer(config)?;
        let consumer = create_consumer(config, false, follow_wait_ms(config), Reach::Within)?;
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&topic, 0, start_at(0)).map_err(|e| KafkaStoreError::from_kafka("keys topic", &e))?;
        consumer.assign(&list).map_err(|e| KafkaStoreError::from_kafka("keys topic", &e))?;
        let (applied_tx, applied) = watch::channel(0);
        let state = Arc::new(Mutex::new(Keys::default()));
        let reader = tokio::spawn(follow(consumer, Arc::clone(&state), applied_tx));
        let store = Self { inner: Arc::new(Inner { topic, config: config.clone(), producer, state, applied, reader }) };
        store.catch_up().await.map_err(|e| KafkaStoreError::Unavailable(e.to_string()))?;
        Ok(store)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Keys> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the reader applied every record up to the topic's end
    /// as the broker reports it now.
    async fn catch_up(&self) -> Result<(), KeyStoreError> {
        let end = self.high_watermark().await?;
        self.wait_applied(end).await
    }

    /// The keys topic's high watermark, asked through the store's producer:
    /// a client made for the question would cost its start, and its
    /// destroy (which joins its threads) up to about 100 ms more.
    async fn high_watermark(&self) -> Result<i64, KeyStoreError> {
        let (topic, producer) = (self.inner.topic.clone(), self.inner.producer.clone());
        let timeout = self.inner.config.request_timeout;
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_watermarks(&topic, 0, timeout)
                .map(|(_, high)| high)
                .map_err(|e| KeyStoreError::Unavailable(format!("keys topic watermarks: {e}")))
        })
        .await
        .map_err(|e| KeyStoreError::Backend(e.to_string()))?
    }

    /// Waits until the reader applied every offset below `end`.
    async fn wait_applied(&self, end: i64) -> Result<(), KeyStoreError> {
        let mut applied = self.inner.applied.clone();
        let bound = self.inner.config.request_timeout + Duration::from_secs(5);
        let reached = tokio::time::timeout(bound, applied.wait_for(|next| *next >= end)).await;
        match reached {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(KeyStoreError::Unavailable("the keys topic reader stopped".into())),
            Err(_) => Err(KeyStoreError::Unavailable(format!("the keys topic was not read to {end} in time"))),
        }
    }

    /// Writes `records` and waits until the reader applied them.
    async fn write(&self, records: Vec<Write>) -> Result<(), KeyStoreError> {
        let mut last = -1;
        let timeout = Timeout::After(self.inner.config.request_timeout);
        for (key, value) in records {
            let key = serde_json::to_vec(&key).map_err(|e| KeyStoreError::Backend(e.to_string()))?;
            let mut record = FutureRecord::<Vec<u8>, Vec<u8>>::to(&self.inner.topic).key(&key).partition(0);
            if let Some(value) = &value {
                record = record.payload(value);
            }
            let delivered = self.inner.producer.send(record, timeout).await;
            match delivered {
                Ok(delivery) => last = last.max(delivery.offset),
                Err((e, _)) => {
                    let e = KafkaStoreError::from_kafka("keys topic", &e);
                    return Err(match e {
                        KafkaStoreError::Unavailable(m) => KeyStoreError::Unavailable(m),
                        other => KeyStoreError::Backend(other.to_string()),
                    });
                }
            }
        }
        if last < 0 {
            // A resend the broker had already stored answers without an
            // offset: read to the end instead.
            return self.catch_up().await;
        }
        self.wait_applied(last + 1).await
    }

    /// The answers to `wanted` from what the reader applied, and the links
    /// to `aggregate` still to be written.
    fn answers(&self, aggregate: &AggregateRef, wanted: &[KeyRequest]) -> (Vec<KeyLookup>, Vec<Write>) {
        let state = self.state();
        let mut answers = Vec::with_capacity(wanted.len());
        let mut links = Vec::new();
        for request in wanted {
            let answer = match request {
                KeyRequest::Person { person, .. } => {
                    state.persons.get(person).map_or(KeyLookup::Missing, |subject| state.lookup(subject))
                }
                KeyRequest::Subject(subject) => state.lookup(subject),
            };
            if let KeyLookup::Key(key) = &answer
                && !state.links.get(&key.subject).is_some_and(|l| l.contains(aggregate))
            {
                let link =
                    RecordKey::Link("l".into(), key.subject.clone(), aggregate.aggregate.clone(), aggregate.id.clone());
                links.push((link, Some(b"{}".to_vec())));
            }
            answers.push(answer);
        }
        (answers, links)
    }
}

/// One record to write: its key, and its value (`None`: a tombstone).
type Write = (RecordKey, Option<Vec<u8>>);

#[async_trait]
impl KeyStore for KafkaKeyStore {
    async fn keys_for_sealing(
        &self,
        aggregate: &AggregateRef,
        wanted: &[KeyRequest],
    ) -> Result<Vec<KeyLookup>, KeyStoreError> {
        let mut candidates = Vec::new();
        {
            let state = self.state();
            for request in wanted {
                if let KeyRequest::Person { person, candidate } = request
                    && !state.persons.contains_key(person)
                {
                    let value = KeyValue {
                        person: Some(person.clone()),
                        key_id: candidate.key_id.clone(),
                        wrapped: B64.encode(&candidate.wrapped),
                    };
                    let value = serde_json::to_vec(&value).map_err(|e| KeyStoreError::Backend(e.to_string()))?;
                    candidates.push((RecordKey::Subject("k".into(), candidate.subject.clone()), Some(value)));
                }
            }
        }
        if !candidates.is_empty() {
            // Once applied, the first key in the log is the person's,
            // ours or a concurrent writer's.
            self.write(candidates).await?;
        }
        let (mut answers, mut links) = self.answers(aggregate, wanted);
        if answers.iter().any(|a| matches!(a, KeyLookup::Missing)) {
            self.catch_up().await?;
            (answers, links) = self.answers(aggregate, wanted);
        }
        if !links.is_empty() {
            self.write(links).await?;
        }
        Ok(answers)
    }

    async fn lookup(&self, wanted: &[(String, String)]) -> Result<Vec<KeyLookup>, KeyStoreError> {
        let answer = |store: &Self| {
            let state = store.state();
            wanted
                .iter()
                .map(|(subject, key_id)| match state.lookup(subject) {
                    KeyLookup::Key(k) if &k.key_id != key_id => KeyLookup::Missing,
                    other => other,
                })
                .collect::<Vec<_>>()
        };
        let answers = answer(self);
        if !answers.iter().any(|a| matches!(a, KeyLookup::Missing)) {
            return Ok(answers);
        }
        // A key written by another instance may not be read here yet.
        self.catch_up().await?;
        Ok(answer(self))
    }

    async fn erase(&self, reference: &str) -> Result<Option<Erasure>, KeyStoreError> {
        self.catch_up().await?;
        let (subject, first) = {
            let state = self.state();
            if state.keys.contains_key(reference) {
                (reference.to_owned(), true)
            } else if let Some(subject) = state.persons.get(reference) {
                (subject.clone(), true)
            } else if state.erased.contains(reference) {
                (reference.to_owned(), false)
            } else {
                return Ok(None);
            }
        };
        // The marker first: from then on the subject reads as erased, even
        // if the tombstone of its key never gets written. The tombstone is
        // written again by every erasure, so a repeat finishes the job.
        let mut writes = Vec::with_capacity(2);
        if first {
            writes.push((RecordKey::Subject("e".into(), subject.clone()), Some(b"{}".to_vec())));
        }
        writes.push((RecordKey::Subject("k".into(), subject.clone()), None));
        self.write(writes).await?;
        let aggregates = self.state().links.get(&subject).map(|l| l.iter().cloned().collect()).unwrap_or_default();
        Ok(Some(Erasure { subject, aggregates, first }))
    }

    async fn erasure_recorded(&self, subject: &str, aggregate: &AggregateRef) -> Result<(), KeyStoreError> {
        let link = RecordKey::Link("l".into(), subject.to_owned(), aggregate.aggregate.clone(), aggregate.id.clone());
        self.write(vec![(link, None)]).await
    }
}

/// Reads the keys topic from its start, forever, into `state`, moving
/// `applied` past each record.
async fn follow(consumer: Reader, state: Arc<Mutex<Keys>>, applied: watch::Sender<i64>) {
    loop {
        match consumer.recv().await {
            Ok(m) => {
                if let Some(key) = m.key() {
                    let mut keys = state.lock().unwrap_or_else(|p| p.into_inner());
                    keys.apply(key, m.payload());
                }
                applied.send_replace(m.offset() + 1);
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the keys topic; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn create_topic(config: &KafkaStoreConfig, topic: &str) -> Result<(), KafkaStoreError> {
    let admin: AdminClient<DefaultClientContext> =
        client_config(config).create().map_err(|e| KafkaStoreError::from_kafka("admin client", &e))?;
    let admin = Detached::new(admin);
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(config.replication_factor))
        .set("cleanup.policy", "compact")
        .set("segment.ms", COMPACTION_BOUND_MS)
        .set("max.compaction.lag.ms", COMPACTION_BOUND_MS);
    let options = rdkafka::admin::AdminOptions::new().request_timeout(Some(config.request_timeout));
    let results = admin
        .create_topics(&[new], &options)
        .await
        .map_err(|e| KafkaStoreError::from_kafka(&format!("create topic {topic}"), &e))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                let e = rdkafka::error::KafkaError::AdminOp(code);
                return Err(KafkaStoreError::from_kafka(&format!("create topic {topic}"), &e));
            }
        }
    }
    Ok(())
}
