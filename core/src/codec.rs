//! How events become bytes in the log and back, including upcasting of
//! events written under an older schema revision.
//!
//! JSON is the default ([`JsonCodec`]); stores only see the [`Codec`] trait,
//! so a binary format could be plugged in later without touching them.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use serde_json::Value;

use crate::aggregate::DomainEvent;

/// An event, its payload decoded or encoded, failed to cross the codec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{event_type} r{revision}: {reason}")]
pub struct CodecError {
    /// The stored event type.
    pub event_type: String,
    /// The stored schema revision.
    pub revision: u32,
    /// What went wrong, in words.
    pub reason: String,
}

/// Turns events into payload bytes and back.
pub trait Codec<E>: Send + Sync + 'static {
    /// The media type of the payloads (`application/json`).
    fn content_type(&self) -> &'static str;

    /// Encodes one event.
    fn encode(&self, event: &E) -> Result<Vec<u8>, CodecError>;

    /// Decodes a stored payload written as `event_type` at `revision`,
    /// upcasting it first when it is older than the current schema.
    fn decode(&self, event_type: &str, revision: u32, payload: &[u8]) -> Result<E, CodecError>;
}

/// Turns the JSON of an old revision of one event type into the JSON of the
/// next revision. It may rename the type too.
pub type UpcastFn = Arc<dyn Fn(Value) -> Result<Upcast, String> + Send + Sync>;

/// What an [`UpcastFn`] returns: the payload one revision newer.
#[derive(Debug, Clone, PartialEq)]
pub struct Upcast {
    /// The event type after upcasting (usually unchanged).
    pub event_type: String,
    /// The payload in the shape of the next revision.
    pub payload: Value,
}

/// The registered upcasters, keyed by (event type, revision they upgrade from).
#[derive(Clone, Default)]
pub struct Upcasters {
    steps: HashMap<(String, u32), UpcastFn>,
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.steps.keys()).finish()
    }
}

impl Upcasters {
    /// No upcasters: every stored event must already be current.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `step`, which upgrades `event_type` payloads written at
    /// `from_revision` to `from_revision + 1`. Steps chain: r1 → r2 → r3.
    pub fn register(
        mut self,
        event_type: impl Into<String>,
        from_revision: u32,
        step: impl Fn(Value) -> Result<Upcast, String> + Send + Sync + 'static,
    ) -> Self {
        self.steps.insert((event_type.into(), from_revision), Arc::new(step));
        self
    }

    /// Whether a payload of `event_type` at `revision` needs a step.
    pub fn applies_to(&self, event_type: &str, revision: u32) -> bool {
        // No allocation on the common path: most logs hold no old payloads.
        !self.steps.is_empty() && self.steps.keys().any(|(t, r)| *r == revision && t == event_type)
    }

    /// Whether no step is registered.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Applies every registered step that matches, in order.
    pub fn upcast(
        &self,
        event_type: &str,
        revision: u32,
        mut payload: Value,
    ) -> Result<(String, u32, Value), CodecError> {
        let mut event_type = event_type.to_owned();
        let mut revision = revision;
        // Bounded so that a step registered in a loop (A→B, B→A) cannot spin.
        for _ in 0..1024 {
            let Some(step) = self.steps.get(&(event_type.clone(), revision)) else {
                return Ok((event_type, revision, payload));
            };
            let next =
                step(payload).map_err(|reason| CodecError { event_type: event_type.clone(), revision, reason })?;
            event_type = next.event_type;
            payload = next.payload;
            revision += 1;
        }
        Err(CodecError { event_type, revision, reason: "upcasters form a cycle".into() })
    }
}

/// The default codec: serde JSON, with upcasting on the JSON tree.
pub struct JsonCodec<E> {
    upcasters: Upcasters,
    _event: PhantomData<fn() -> E>,
}

impl<E> fmt::Debug for JsonCodec<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonCodec").field("upcasters", &self.upcasters).finish()
    }
}

impl<E: DomainEvent> Default for JsonCodec<E> {
    /// A JSON codec that upcasts with the event type's own
    /// [`DomainEvent::upcasters`].
    fn default() -> Self {
        Self { upcasters: E::upcasters(), _event: PhantomData }
    }
}

impl<E> JsonCodec<E> {
    /// A JSON codec that upcasts old payloads with `upcasters` instead of
    /// the event type's own.
    pub fn with_upcasters(upcasters: Upcasters) -> Self {
        Self { upcasters, _event: PhantomData }
    }
}

impl<E: DomainEvent> Codec<E> for JsonCodec<E> {
    fn content_type(&self) -> &'static str {
        "application/json"
    }

    fn encode(&self, event: &E) -> Result<Vec<u8>, CodecError> {
        serde_json::to_vec(event).map_err(|e| CodecError {
            event_type: event.event_type().to_owned(),
            revision: event.revision(),
            reason: e.to_string(),
        })
    }

    fn decode(&self, event_type: &str, revision: u32, payload: &[u8]) -> Result<E, CodecError> {
        let err = |reason: String| CodecError { event_type: event_type.to_owned(), revision, reason };
        if !self.upcasters.applies_to(event_type, revision) {
            // Current payloads decode straight from the bytes, without the
            // JSON tree an upcaster works on.
            return serde_json::from_slice(payload).map_err(|e| err(e.to_string()));
        }
        let value: Value = serde_json::from_slice(payload).map_err(|e| err(format!("not JSON: {e}")))?;
        let (event_type, revision, value) = self.upcasters.upcast(event_type, revision, value)?;
        serde_json::from_value(value).map_err(|e| CodecError { event_type, revision, reason: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};
    use serde_json::json;

    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Ev {
        Renamed { name: String, reason: String },
    }
    impl DomainEvent for Ev {
        fn event_type(&self) -> &'static str {
            "Renamed"
        }
        fn revision(&self) -> u32 {
            2
        }
    }

    #[test]
    fn json_round_trip() {
        let codec = JsonCodec::<Ev>::default();
        let e = Ev::Renamed { name: "a".into(), reason: "b".into() };
        let bytes = codec.encode(&e).unwrap();
        assert_eq!(codec.decode("Renamed", 2, &bytes).unwrap(), e);
    }

    #[test]
    fn old_revision_is_upcast_before_decoding() {
        let upcasters = Upcasters::new().register("Renamed", 1, |mut v| {
            v["Renamed"]["reason"] = json!("unknown");
            Ok(Upcast { event_type: "Renamed".into(), payload: v })
        });
        let codec = JsonCodec::<Ev>::with_upcasters(upcasters);
        let old = br#"{"Renamed":{"name":"x"}}"#;
        assert_eq!(
            codec.decode("Renamed", 1, old).unwrap(),
            Ev::Renamed { name: "x".into(), reason: "unknown".into() }
        );
        // Without the upcaster the old payload is a typed error, not a panic.
        let plain = JsonCodec::<Ev>::default();
        let err = plain.decode("Renamed", 1, old).unwrap_err();
        assert_eq!(err.revision, 1);
        assert!(plain.decode("Renamed", 2, b"{not json").is_err());
    }

    #[test]
    fn upcaster_steps_chain_until_none_matches() {
        let ups = Upcasters::new().register("A", 1, |v| Ok(Upcast { event_type: "A".into(), payload: v })).register(
            "A",
            2,
            |v| Ok(Upcast { event_type: "A".into(), payload: v }),
        );
        // Chains stop when no step matches: A r1 → r2 → r3.
        assert_eq!(ups.upcast("A", 1, json!(1)).unwrap().1, 3);
    }
}

/// An envelope whose payload is still in its stored, encoded form.
pub type RawEnvelope = crate::Envelope<Vec<u8>>;

impl RawEnvelope {
    /// Decodes the payload; an unreadable one becomes
    /// [`crate::StoreError::Corrupt`] naming aggregate, id and version.
    /// The envelope then names the event's current type and revision: an
    /// upcast payload is shown as what it now is.
    pub fn decode<E: DomainEvent>(self, codec: &dyn Codec<E>) -> Result<crate::Envelope<E>, crate::StoreError> {
        match codec.decode(&self.event_type, self.revision, &self.payload) {
            Ok(event) => {
                let mut envelope = self.map(|_| event);
                envelope.revision = envelope.payload.revision();
                if envelope.event_type != envelope.payload.event_type() {
                    envelope.event_type = envelope.payload.event_type().to_owned();
                }
                Ok(envelope)
            }
            Err(e) => Err(crate::StoreError::Corrupt {
                aggregate: self.aggregate_type,
                id: self.aggregate_id,
                version: self.version,
                reason: e.to_string(),
            }),
        }
    }
}

/// One event encoded for storage, with the names stored beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedEvent {
    /// [`DomainEvent::event_type`].
    pub event_type: &'static str,
    /// [`DomainEvent::revision`].
    pub revision: u32,
    /// The encoded payload.
    pub payload: Vec<u8>,
}

/// Encodes the events of one append, which every store does first; no
/// event at all, or one that does not encode, is
/// [`crate::StoreError::Invalid`] and nothing is appended.
pub fn encode_all<E: DomainEvent>(codec: &dyn Codec<E>, events: &[E]) -> Result<Vec<EncodedEvent>, crate::StoreError> {
    if events.is_empty() {
        return Err(crate::StoreError::Invalid("an append needs at least one event".into()));
    }
    events
        .iter()
        .map(|e| {
            Ok(EncodedEvent {
                event_type: e.event_type(),
                revision: e.revision(),
                payload: codec.encode(e).map_err(|err| crate::StoreError::Invalid(err.to_string()))?,
            })
        })
        .collect()
}
