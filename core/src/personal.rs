//! Personal data that can be forgotten: the [`Personal`] field type and
//! the `{"$p": …}` nodes it is stored as.
//!
//! An aggregate marks a field as personal data by giving it the type
//! `Personal<T>`, naming the person the value is about. The command bus
//! seals every new value with that person's key before the append (see
//! [`crate::Vault`]), so the log, the table of states and every topic hold
//! only ciphertext; erasing the person deletes the key, and from then on
//! every read shows the value as erased.
//!
//! A stored value is a self-describing node, so that code which does not
//! know the event's types (upcasters, the HTTP adapter, views) can find it:
//!
//! - sealed: `{"$p": {"s": subject, "k": key id, "f": field path, "n": nonce, "c": ciphertext}}`
//! - erased: `{"$p": {"s": subject, "x": true}}`
//!
//! Subjects are random ids that the key store maps to the person's name
//! (or whatever the aggregate named them by); the mapping is deleted with
//! the key, so the log never says whose data a node held.

use std::cell::Cell;
use std::fmt;
use std::sync::Arc;

use serde::de::{DeserializeOwned, Error as _};
use serde::ser::{Error as _, SerializeMap};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// The key of a personal-data node: `{"$p": {…}}`.
pub const PERSONAL_NODE: &str = "$p";

/// The field a rendered document (a GET body, an event of a history) lists
/// the JSON pointers of its erased values in, e.g. `["/owner"]`. The values
/// themselves are rendered as `null`.
pub const ERASED_FIELD: &str = "_erased";

/// A value that is personal data of one person: stored encrypted with that
/// person's key, shown as erased once the person is forgotten.
///
/// A `Personal<T>` is in one of four forms:
/// - **new**: made by [`Personal::new`] in a command; sealed by the command
///   bus before the events are appended (a store refuses to encode it, so
///   it can never reach a log in clear);
/// - **open**: read back with its key (what `handle`, guards and list rows
///   see): [`Personal::value`] gives the value;
/// - **sealed**: as stored (what `apply` folds, what the table holds): the
///   value is not at hand, [`Personal::subject`] is;
/// - **erased**: its person was forgotten; only the subject id is left;
/// - **plain**: written in clear, by code older than the field's marking as
///   personal data (a log is immutable: such values stay readable and
///   cannot be erased; only values written since are sealed).
///
/// Two values are equal when both values are at hand and equal, or else
/// when they belong to the same subject. `Debug` never shows the value.
/// Serde always succeeds on every form, so erasing a person never makes a
/// state or an event undecodable.
pub struct Personal<T>(Form<T>);

enum Form<T> {
    New { person: String, value: T },
    Open { value: T, node: Arc<SealedNode>, origin: Arc<str> },
    Sealed(Arc<SealedNode>),
    Erased { subject: String },
    Plain(T),
}

/// The stored form of a sealed value.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SealedNode {
    /// The subject's id.
    #[serde(rename = "s")]
    pub subject: String,
    /// Which of the subject's keys sealed it.
    #[serde(rename = "k")]
    pub key_id: String,
    /// The JSON pointer of the value in the event it was sealed in (part
    /// of the associated data, so a node cannot be moved unnoticed).
    #[serde(rename = "f")]
    pub field: String,
    /// The 192-bit nonce, base64.
    #[serde(rename = "n")]
    pub nonce: String,
    /// The ciphertext and tag, base64.
    #[serde(rename = "c")]
    pub ciphertext: String,
}

impl<T> Personal<T> {
    /// A new value about `person`: the name (or any reference) the key
    /// store files the person's key under, and the one an erasure can be
    /// asked by. It is kept in the key store only, never in the log.
    pub fn new(person: impl Into<String>, value: T) -> Self {
        Self(Form::New { person: person.into(), value })
    }

    /// The value, when it is at hand (new or opened); `None` when sealed or
    /// erased.
    pub fn value(&self) -> Option<&T> {
        match &self.0 {
            Form::New { value, .. } | Form::Open { value, .. } | Form::Plain(value) => Some(value),
            Form::Sealed(_) | Form::Erased { .. } => None,
        }
    }

    /// The value, when it is at hand.
    pub fn into_value(self) -> Option<T> {
        match self.0 {
            Form::New { value, .. } | Form::Open { value, .. } | Form::Plain(value) => Some(value),
            Form::Sealed(_) | Form::Erased { .. } => None,
        }
    }

    /// The opaque id of the subject the value belongs to; `None` for a new
    /// value not sealed yet.
    pub fn subject(&self) -> Option<&str> {
        match &self.0 {
            Form::New { .. } | Form::Plain(_) => None,
            Form::Open { node, .. } | Form::Sealed(node) => Some(&node.subject),
            Form::Erased { subject } => Some(subject),
        }
    }

    /// Whether the value's person was forgotten.
    pub fn is_erased(&self) -> bool {
        matches!(self.0, Form::Erased { .. })
    }

    /// Whether this value is `reference`: its value, when at hand, or its
    /// subject id (so that an erased member can still be removed by id).
    pub fn is(&self, reference: &str) -> bool
    where
        T: AsRef<str>,
    {
        self.value().is_some_and(|v| v.as_ref() == reference) || self.subject() == Some(reference)
    }
}

impl<T: Clone> Clone for Personal<T> {
    fn clone(&self) -> Self {
        Self(match &self.0 {
            Form::New { person, value } => Form::New { person: person.clone(), value: value.clone() },
            Form::Open { value, node, origin } => {
                Form::Open { value: value.clone(), node: Arc::clone(node), origin: Arc::clone(origin) }
            }
            Form::Sealed(node) => Form::Sealed(Arc::clone(node)),
            Form::Erased { subject } => Form::Erased { subject: subject.clone() },
            Form::Plain(value) => Form::Plain(value.clone()),
        })
    }
}

impl<T: PartialEq> PartialEq for Personal<T> {
    fn eq(&self, other: &Self) -> bool {
        match (self.value(), other.value()) {
            (Some(a), Some(b)) => a == b,
            _ => match (self.subject(), other.subject()) {
                (Some(a), Some(b)) => a == b,
                _ => false,
            },
        }
    }
}

impl<T> fmt::Debug for Personal<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Form::New { .. } => f.write_str("Personal(new, redacted)"),
            Form::Open { node, .. } => write!(f, "Personal({}, redacted)", node.subject),
            Form::Sealed(node) => write!(f, "Personal({}, sealed)", node.subject),
            Form::Erased { subject } => write!(f, "Personal({subject}, erased)"),
            Form::Plain(_) => f.write_str("Personal(plain, redacted)"),
        }
    }
}

/// How `Personal` serializes on this thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// For storage: new values are refused.
    Store,
    /// For the vault's sealing pass: new and opened values show their
    /// plaintext, for the vault to seal.
    Seal,
}

thread_local! {
    static MODE: Cell<Mode> = const { Cell::new(Mode::Store) };
}

/// Runs `f` (a synchronous serialization) with new and opened values shown
/// to the sealing pass.
pub(crate) fn sealing<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(Mode);
    impl Drop for Restore {
        fn drop(&mut self) {
            MODE.with(|m| m.set(self.0));
        }
    }
    let _restore = Restore(MODE.with(|m| m.replace(Mode::Seal)));
    f()
}

/// The message of a store refusing a value that was never sealed.
pub(crate) const UNSEALED: &str = "personal data reached a store unsealed: run the command through a CommandBus \
     with a Vault, and declare Aggregate::PERSONAL_DATA";

fn node<S: Serializer>(serializer: S, inner: &impl Serialize) -> Result<S::Ok, S::Error> {
    let mut map = serializer.serialize_map(Some(1))?;
    map.serialize_entry(PERSONAL_NODE, inner)?;
    map.end()
}

#[derive(Serialize)]
struct NewNode<'a, T> {
    person: &'a str,
    v: &'a T,
}

#[derive(Serialize)]
struct OpenNode<'a, T> {
    s: &'a str,
    v: &'a T,
    o: &'a str,
    reuse: &'a SealedNode,
}

#[derive(Serialize)]
struct ErasedNode<'a> {
    s: &'a str,
    x: bool,
}

impl<T: Serialize> Serialize for Personal<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mode = MODE.with(Cell::get);
        match (&self.0, mode) {
            (Form::New { person, value }, Mode::Seal) => node(serializer, &NewNode { person, v: value }),
            (Form::New { .. }, Mode::Store) => Err(S::Error::custom(UNSEALED)),
            (Form::Open { value, node: sealed, origin }, Mode::Seal) => {
                node(serializer, &OpenNode { s: &sealed.subject, v: value, o: origin, reuse: sealed })
            }
            (Form::Open { node: sealed, .. }, Mode::Store) | (Form::Sealed(sealed), _) => node(serializer, &**sealed),
            (Form::Erased { subject }, _) => node(serializer, &ErasedNode { s: subject, x: true }),
            (Form::Plain(value), _) => value.serialize(serializer),
        }
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Personal<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        match value {
            Value::Object(mut outer) if outer.len() == 1 && outer.contains_key(PERSONAL_NODE) => {
                match outer.remove(PERSONAL_NODE) {
                    Some(Value::Object(inner)) => Form::from_node(inner).map(Self).map_err(D::Error::custom),
                    _ => Err(D::Error::custom("a personal-data node {\"$p\": …} holds no object")),
                }
            }
            // Written in clear before the field was marked personal.
            plain => T::deserialize(plain)
                .map(|value| Self(Form::Plain(value)))
                .map_err(|_| D::Error::custom("neither a personal-data node nor a value of the field's type")),
        }
    }
}

impl<T: DeserializeOwned> Form<T> {
    fn from_node(mut inner: Map<String, Value>) -> Result<Self, &'static str> {
        let text = |inner: &mut Map<String, Value>, key: &str| match inner.remove(key) {
            Some(Value::String(s)) => Ok(s),
            _ => Err("a personal-data node lacks one of its fields"),
        };
        if inner.get("x") == Some(&Value::Bool(true)) {
            return Ok(Form::Erased { subject: text(&mut inner, "s")? });
        }
        // Never let a decode error quote the value: serde's messages do.
        let value = match inner.remove("v") {
            Some(v) => Some(T::deserialize(v).map_err(|_| "a personal value does not fit its field's type")?),
            None => None,
        };
        if let Some(Value::String(person)) = inner.remove("person") {
            let value = value.ok_or("a new personal value lacks its value")?;
            return Ok(Form::New { person, value });
        }
        let origin = inner.remove("o");
        let sealed = Arc::new(SealedNode {
            subject: text(&mut inner, "s")?,
            key_id: text(&mut inner, "k")?,
            field: text(&mut inner, "f")?,
            nonce: text(&mut inner, "n")?,
            ciphertext: text(&mut inner, "c")?,
        });
        match (value, origin) {
            (Some(value), Some(Value::String(origin))) => Ok(Form::Open { value, node: sealed, origin: origin.into() }),
            (None, _) => Ok(Form::Sealed(sealed)),
            (Some(_), _) => Err("an opened personal value lacks its origin"),
        }
    }
}

#[cfg(feature = "schemars")]
impl<T: schemars::JsonSchema> schemars::JsonSchema for Personal<T> {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        <Option<T> as schemars::JsonSchema>::schema_name()
    }

    /// As readers see it: the value, or `null` once erased.
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        <Option<T> as schemars::JsonSchema>::json_schema(generator)
    }
}

/// Calls `f` with the JSON pointer and the inner object of every
/// personal-data node in `value`, depth first, in document order.
/// Whether `value` holds a personal node anywhere (the nodes
/// [`for_each_node`] visits).
pub(crate) fn holds_node(value: &Value) -> bool {
    match value {
        Value::Object(map) => match map.get(PERSONAL_NODE) {
            Some(inner) if map.len() == 1 => inner.is_object(),
            _ => map.values().any(holds_node),
        },
        Value::Array(items) => items.iter().any(holds_node),
        _ => false,
    }
}

pub(crate) fn for_each_node(value: &mut Value, f: &mut impl FnMut(&str, &mut Value)) {
    let mut path = String::new();
    walk(value, &mut path, f);
}

fn walk(value: &mut Value, path: &mut String, f: &mut impl FnMut(&str, &mut Value)) {
    match value {
        Value::Object(map) => {
            if map.len() == 1
                && let Some(inner) = map.get_mut(PERSONAL_NODE)
            {
                if inner.is_object() {
                    f(path, value);
                }
                return;
            }
            for (key, child) in map.iter_mut() {
                let len = path.len();
                path.push('/');
                push_pointer_token(path, key);
                walk(child, path, f);
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push('/');
                path.push_str(&i.to_string());
                walk(child, path, f);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// Appends `key` escaped as a JSON Pointer token (RFC 6901).
fn push_pointer_token(path: &mut String, key: &str) {
    for c in key.chars() {
        match c {
            '~' => path.push_str("~0"),
            '/' => path.push_str("~1"),
            c => path.push(c),
        }
    }
}

/// The inner object of a node found by [`for_each_node`].
pub(crate) fn node_inner(node: &mut Value) -> Option<&mut Map<String, Value>> {
    node.get_mut(PERSONAL_NODE).and_then(Value::as_object_mut)
}

/// Whether `bytes` (a stored document) may hold a personal-data node:
/// a cheap test that lets documents without one skip the tree walk.
pub(crate) fn may_hold_nodes(bytes: &[u8]) -> bool {
    bytes.windows(5).any(|w| w == b"\"$p\":")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn sealed() -> Value {
        json!({"$p": {"s": "s1", "k": "k1", "f": "/owner", "n": "bm9uY2U=", "c": "Y2lwaGVy"}})
    }

    #[test]
    fn a_new_value_never_serializes_for_storage() {
        let p = Personal::new("alice", "Alice".to_owned());
        let err = serde_json::to_string(&p).unwrap_err().to_string();
        assert!(err.contains("unsealed"), "{err}");
        assert!(!err.contains("Alice") && !err.contains("alice"), "{err}");
        let shown = sealing(|| serde_json::to_value(&p)).unwrap();
        assert_eq!(shown, json!({"$p": {"person": "alice", "v": "Alice"}}));
    }

    #[test]
    fn every_stored_form_decodes() {
        let s: Personal<String> = serde_json::from_value(sealed()).unwrap();
        assert_eq!(s.subject(), Some("s1"));
        assert_eq!(s.value(), None);
        assert_eq!(serde_json::to_value(&s).unwrap(), sealed(), "a sealed value is stored as it came");
        let e: Personal<u32> = serde_json::from_value(json!({"$p": {"s": "s1", "x": true}})).unwrap();
        assert!(e.is_erased());
        assert_eq!(serde_json::to_value(&e).unwrap(), json!({"$p": {"s": "s1", "x": true}}));
        assert_eq!(s, Personal::<String>(Form::Erased { subject: "s1".into() }), "equal by subject");
    }

    #[test]
    fn decode_errors_never_quote_the_value() {
        let mut open = sealed();
        open["$p"]["v"] = json!("Alice Secret");
        open["$p"]["o"] = json!("project/p1");
        let err = serde_json::from_value::<Personal<u32>>(open).unwrap_err().to_string();
        assert!(!err.contains("Alice"), "{err}");
        let err = serde_json::from_value::<Personal<u32>>(json!("Alice Secret")).unwrap_err().to_string();
        assert!(!err.contains("Alice"), "{err}");
        assert!(serde_json::from_value::<Personal<String>>(json!({"$p": {"s": 1}})).is_err());
    }

    #[test]
    fn an_opened_value_is_stored_sealed_and_shown_to_the_sealer() {
        let mut open = sealed();
        open["$p"]["v"] = json!("Alice");
        open["$p"]["o"] = json!("project/p1");
        let p: Personal<String> = serde_json::from_value(open).unwrap();
        assert_eq!(p.value().map(String::as_str), Some("Alice"));
        assert!(p.is("Alice") && p.is("s1") && !p.is("Bob"));
        assert_eq!(serde_json::to_value(&p).unwrap(), sealed());
        let shown = sealing(|| serde_json::to_value(&p)).unwrap();
        assert_eq!(shown["$p"]["reuse"], sealed()["$p"]);
        assert_eq!(format!("{p:?}"), "Personal(s1, redacted)");
    }

    #[test]
    fn values_written_before_the_marking_stay_plain() {
        let p: Personal<String> = serde_json::from_value(json!("Alice")).unwrap();
        assert_eq!(p.value().map(String::as_str), Some("Alice"));
        assert_eq!(p.subject(), None);
        assert_eq!(serde_json::to_value(&p).unwrap(), json!("Alice"), "stored as it was");
    }

    #[test]
    fn nodes_are_found_with_their_pointers() {
        let mut doc = json!({"owner": sealed(), "members": [1, sealed()], "a/b": {"x~": sealed()}, "n": 3});
        let mut seen = Vec::new();
        for_each_node(&mut doc, &mut |path, node| {
            assert!(node_inner(node).is_some());
            seen.push(path.to_owned());
        });
        seen.sort();
        assert_eq!(seen, ["/a~1b/x~0", "/members/1", "/owner"]);
        assert!(may_hold_nodes(doc.to_string().as_bytes()));
        assert!(!may_hold_nodes(br#"{"owner":"$p"}"#));
    }
}
