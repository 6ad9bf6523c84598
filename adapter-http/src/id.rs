//! What an aggregate id may be over HTTP: one rule for ids in paths
//! (`/{plural}/{id}`), ids in request bodies ([`AggregateId`]) and the
//! OpenAPI document's pattern.

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize};

/// Longest id, in characters.
pub(crate) const MAX_ID_CHARS: usize = 255;

/// The pattern of an id: no `/`, no control character (C0, DEL, C1), and
/// not starting with `.` (`.` and `..` are path segments clients resolve
/// away). The pattern holds the control characters themselves, which every
/// regular-expression dialect reads the same way.
pub(crate) const ID_PATTERN: &str = "^[^/.\u{0}-\u{1f}\u{7f}-\u{9f}][^/\u{0}-\u{1f}\u{7f}-\u{9f}]*$";

/// The one id the pattern admits that is not an id: `/{plural}/changes` is
/// the list's change feed, so an aggregate of that id could never be read
/// by `GET /{plural}/{id}`.
pub(crate) const RESERVED_ID: &str = "changes";

/// The id rule in words, for refusals.
pub(crate) const ID_RULE: &str =
    "an id is 1 to 255 characters without control characters or /, not starting with ., and not `changes`";

/// Whether `id` is an id: 1 to 255 characters matching [`ID_PATTERN`],
/// other than [`RESERVED_ID`].
pub(crate) fn is_valid_id(id: &str) -> bool {
    if id.is_empty() || id.starts_with('.') || id == RESERVED_ID {
        return false;
    }
    // Every read and write by id checks its id: ASCII ids (the usual kind)
    // are checked byte by byte, without decoding characters.
    if id.is_ascii() {
        // Without an early exit, so that the loop is vectorised.
        return id.len() <= MAX_ID_CHARS
            && !id.bytes().fold(false, |bad, b| bad | (b < 0x20) | (b == 0x7f) | (b == b'/'));
    }
    id.chars().count() <= MAX_ID_CHARS && !id.chars().any(|c| c.is_control() || c == '/')
}

/// The id of another aggregate in a request body (a task's `project_id`),
/// held to the same rule as ids in paths: a body naming an id that could
/// never be requested is refused with 400, and the OpenAPI document says so.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct AggregateId(String);

impl AggregateId {
    /// The id, when it is one.
    pub fn new(id: impl Into<String>) -> Option<Self> {
        let id = id.into();
        is_valid_id(&id).then_some(Self(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as an owned string.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl<'de> Deserialize<'de> for AggregateId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::new(text).ok_or_else(|| serde::de::Error::custom(ID_RULE))
    }
}

impl JsonSchema for AggregateId {
    fn schema_name() -> Cow<'static, str> {
        "AggregateId".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_ID_CHARS,
            "pattern": ID_PATTERN,
            "not": { "const": RESERVED_ID },
            "description": "An aggregate id: 1 to 255 characters, no / and no control character, not starting with a dot, \
                            and not `changes` (the path of the list's change feed)."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_and_the_schema_agree() {
        // The schema read by a JSON Schema validator (an ECMA-262 regex
        // engine), as a client generator would read it.
        let schema = AggregateId::json_schema(&mut SchemaGenerator::default());
        let validator = jsonschema::validator_for(schema.as_value()).expect("the schema compiles");
        let long = "z".repeat(255);
        // Characters are counted, not bytes: 255 two-byte characters are an id.
        let long_wide = "ü".repeat(255);
        for id in ["p-1", "01a2-…", "x y", "ünï", "a.b", "%41", long.as_str(), long_wide.as_str()] {
            assert!(is_valid_id(id), "{id:?}");
            assert!(validator.is_valid(&id.into()), "{id:?}");
        }
        let longer = "z".repeat(256);
        let longer_wide = "ü".repeat(256);
        let (longer, longer_wide) = (longer.as_str(), longer_wide.as_str());
        for id in [
            "",
            ".",
            "..",
            ".x",
            "a/b",
            "ü/b",
            "a\u{0}",
            "ü\u{1f}",
            "a\u{1f}",
            "a\u{7f}",
            "a\u{85}",
            "changes",
            longer,
            longer_wide,
        ] {
            assert!(!is_valid_id(id), "{id:?}");
            assert!(!validator.is_valid(&id.into()), "{id:?}");
        }
        assert!(serde_json::from_str::<AggregateId>("\"a/b\"").is_err());
        assert!(serde_json::from_str::<AggregateId>("\"changes\"").is_err());
        for id in ["Changes", "changes-1", "x.changes"] {
            assert!(is_valid_id(id), "{id:?}");
            assert!(validator.is_valid(&id.into()), "{id:?}");
        }
        assert!(ID_RULE.contains(&MAX_ID_CHARS.to_string()), "the words say the same length");
        assert_eq!(serde_json::from_str::<AggregateId>("\"p-1\"").unwrap().as_str(), "p-1");
    }
}
