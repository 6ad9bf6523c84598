//! What a list view holds: its fields, their types and what each allows.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// The type of a list field. Every backend stores and compares each type
/// the same way, so that the same query gives the same rows everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    /// Prose: compared as a whole for filters and sorts, split into words
    /// for full-text search when the field is searchable.
    Text,
    /// An exact token (status, tag, e-mail): never split.
    Keyword,
    /// A signed 64-bit integer.
    Integer,
    /// A finite 64-bit float (NaN and infinities are refused).
    Float,
    /// `true` / `false`; `false` sorts first.
    Bool,
    /// A UTC instant with microsecond precision (RFC 3339 in queries).
    Timestamp,
}

impl fmt::Display for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Keyword => "keyword",
            Self::Integer => "integer",
            Self::Float => "float",
            Self::Bool => "bool",
            Self::Timestamp => "timestamp",
        })
    }
}

/// One field of a list view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Field {
    /// Lower-case ASCII letters, digits and `_`, starting with a letter.
    pub name: String,
    /// Its type.
    pub ty: FieldType,
    /// Whether `filter[name]…` may name it.
    pub filterable: bool,
    /// Whether `sort=name` may name it.
    pub sortable: bool,
    /// Whether `q` searches it (text and keyword fields only).
    pub searchable: bool,
}

impl Field {
    /// A field of type `ty` that allows nothing yet; chain the flags.
    pub fn new(name: impl Into<String>, ty: FieldType) -> Self {
        Self { name: name.into(), ty, filterable: false, sortable: false, searchable: false }
    }
    /// A text field.
    pub fn text(name: impl Into<String>) -> Self {
        Self::new(name, FieldType::Text)
    }
    /// A keyword field.
    pub fn keyword(name: impl Into<String>) -> Self {
        Self::new(name, FieldType::Keyword)
    }
    /// An integer field.
    pub fn integer(name: impl Into<String>) -> Self {
        Self::new(name, FieldType::Integer)
    }
    /// A float field.
    pub fn float(name: impl Into<String>) -> Self {
        Self::new(name, FieldType::Float)
    }
    /// A bool field.
    pub fn bool(name: impl Into<String>) -> Self {
        Self::new(name, FieldType::Bool)
    }
    /// A timestamp field.
    pub fn timestamp(name: impl Into<String>) -> Self {
        Self::new(name, FieldType::Timestamp)
    }
    /// Allows filtering on this field.
    pub fn filterable(mut self) -> Self {
        self.filterable = true;
        self
    }
    /// Allows sorting by this field.
    pub fn sortable(mut self) -> Self {
        self.sortable = true;
        self
    }
    /// Lets `q` search this field.
    pub fn searchable(mut self) -> Self {
        self.searchable = true;
        self
    }
}

/// A list view's schema was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid view schema {view}: {reason}")]
pub struct SchemaError {
    /// The view's name.
    pub view: String,
    /// What is wrong.
    pub reason: String,
}

/// The fields of one list view. Every list backend derives its storage
/// (columns and indexes, or index fields) from this one description.
///
/// Every view also has the built-in keyword field `id` (the aggregate id),
/// filterable and sortable, which is the final tie-breaker of every sort.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewSchema {
    /// The view's name: table or index name (`projects`). Same rules as
    /// field names.
    pub name: String,
    /// Bump it when fields or the row mapping change: the view is then
    /// rebuilt from the log.
    pub version: u32,
    /// The fields, in display order.
    pub fields: Vec<Field>,
    /// Page size when the query names none.
    pub default_page_size: u32,
    /// Largest page size a query may ask for.
    pub max_page_size: u32,
}

/// The name of the built-in id field.
pub const ID_FIELD: &str = "id";

/// Whether `name` is fit to become part of an SQL identifier, a topic name
/// or a key, which is what KES does with the names of views, fields,
/// reactions and PostgreSQL schemas: a lower-case ASCII letter, then
/// lower-case letters, digits and `_`, at most 48 characters (room for the
/// prefixes KES adds within PostgreSQL's 63-byte identifiers). Such a name
/// needs no quoting and means the same to every database.
pub fn is_plain_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
        && name.len() <= 48
}

/// The smallest string above every string that starts with `prefix`, in
/// code point order (surrogates skipped); `None` when there is none (the
/// prefix is empty or all U+10FFFF). A backend that can only compare serves
/// the `prefix` filter as `>= prefix AND < bound`.
pub fn prefix_upper_bound(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match last {
            '\u{D7FF}' => Some('\u{E000}'),
            c => char::from_u32(c as u32 + 1),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

impl ViewSchema {
    /// A schema without fields; add them with [`ViewSchema::field`].
    pub fn new(name: impl Into<String>, version: u32) -> Self {
        Self { name: name.into(), version, fields: Vec::new(), default_page_size: 20, max_page_size: 100 }
    }

    /// Adds a field.
    pub fn field(mut self, field: Field) -> Self {
        self.fields.push(field);
        self
    }

    /// Sets the default and largest page sizes.
    pub fn page_sizes(mut self, default: u32, max: u32) -> Self {
        self.default_page_size = default;
        self.max_page_size = max;
        self
    }

    /// Checks names, duplicates and flags. Backends call it before they
    /// build anything from the schema, so that identifiers they put into SQL
    /// or index names are known to be plain.
    pub fn validate(&self) -> Result<(), SchemaError> {
        let err = |reason: String| SchemaError { view: self.name.clone(), reason };
        if !is_plain_name(&self.name) {
            return Err(err("the view name must be lower-case ASCII letters, digits and _".into()));
        }
        if self.default_page_size == 0 || self.default_page_size > self.max_page_size {
            return Err(err("page sizes must satisfy 1 <= default <= max".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for f in &self.fields {
            if !is_plain_name(&f.name) {
                return Err(err(format!("field name {:?} must be lower-case ASCII letters, digits and _", f.name)));
            }
            if f.name == ID_FIELD {
                return Err(err("`id` is built in".into()));
            }
            if !seen.insert(&f.name) {
                return Err(err(format!("field {} is declared twice", f.name)));
            }
            if f.searchable && !matches!(f.ty, FieldType::Text | FieldType::Keyword) {
                return Err(err(format!("field {} is {} and cannot be searchable", f.name, f.ty)));
            }
        }
        Ok(())
    }

    /// The field called `name`, the built-in `id` included.
    pub fn get(&self, name: &str) -> Option<Field> {
        if name == ID_FIELD {
            return Some(Field::keyword(ID_FIELD).filterable().sortable());
        }
        self.fields.iter().find(|f| f.name == name).cloned()
    }

    /// Checks that `row` names only fields of this schema, with values of
    /// their types.
    pub fn check_row(&self, row: &Row) -> Result<(), SchemaError> {
        for (name, value) in row {
            let field = self.fields.iter().find(|f| &f.name == name).ok_or_else(|| SchemaError {
                view: self.name.clone(),
                reason: format!("row has unknown field {name}"),
            })?;
            if !value.fits(field.ty) {
                return Err(SchemaError {
                    view: self.name.clone(),
                    reason: format!("field {name} is {} but the row holds {value:?}", field.ty),
                });
            }
        }
        Ok(())
    }
}

/// A value of a list field. A missing value is the field's absence from the
/// [`Row`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum FieldValue {
    /// A bool.
    Bool(bool),
    /// An integer.
    Integer(i64),
    /// A float.
    Float(f64),
    /// A timestamp (serialised as RFC 3339).
    Timestamp(DateTime<Utc>),
    /// Text or a keyword.
    Text(String),
}

impl FieldValue {
    /// Whether this value can be stored in a field of type `ty`.
    pub fn fits(&self, ty: FieldType) -> bool {
        match (self, ty) {
            (Self::Text(_), FieldType::Text | FieldType::Keyword) => true,
            (Self::Integer(_), FieldType::Integer) => true,
            (Self::Float(f), FieldType::Float) => f.is_finite(),
            (Self::Bool(_), FieldType::Bool) => true,
            (Self::Timestamp(_), FieldType::Timestamp) => true,
            _ => false,
        }
    }

    /// Reads a value of type `ty` from query-string text.
    pub fn parse(ty: FieldType, text: &str) -> Option<Self> {
        match ty {
            FieldType::Text | FieldType::Keyword => Some(Self::Text(text.to_owned())),
            FieldType::Integer => text.parse().ok().map(Self::Integer),
            FieldType::Float => text.parse::<f64>().ok().filter(|f| f.is_finite()).map(Self::Float),
            FieldType::Bool => match text {
                "true" => Some(Self::Bool(true)),
                "false" => Some(Self::Bool(false)),
                _ => None,
            },
            FieldType::Timestamp => {
                DateTime::parse_from_rfc3339(text).ok().map(|t| Self::timestamp(t.with_timezone(&Utc)))
            }
        }
    }

    /// A timestamp value, cut to the microsecond like every backend stores it.
    pub fn timestamp(t: DateTime<Utc>) -> Self {
        Self::Timestamp(Utc.timestamp_micros(t.timestamp_micros()).single().unwrap_or(t))
    }

    /// Microseconds since the Unix epoch, for timestamps.
    pub fn as_micros(&self) -> Option<i64> {
        match self {
            Self::Timestamp(t) => Some(t.timestamp_micros()),
            _ => None,
        }
    }

    /// Converts a JSON value of type `ty` (as in a cursor) back to a value.
    pub fn from_json(ty: FieldType, json: &serde_json::Value) -> Option<Self> {
        use serde_json::Value as J;
        match (ty, json) {
            (FieldType::Text | FieldType::Keyword, J::String(s)) => Some(Self::Text(s.clone())),
            (FieldType::Integer, J::Number(n)) => n.as_i64().map(Self::Integer),
            (FieldType::Float, J::Number(n)) => n.as_f64().filter(|f| f.is_finite()).map(Self::Float),
            (FieldType::Bool, J::Bool(b)) => Some(Self::Bool(*b)),
            (FieldType::Timestamp, J::String(s)) => Self::parse(FieldType::Timestamp, s),
            _ => None,
        }
    }

    /// The JSON form of this value (timestamps as RFC 3339, microseconds).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Self::Bool(b) => (*b).into(),
            Self::Integer(i) => (*i).into(),
            Self::Float(f) => serde_json::Number::from_f64(*f).map(serde_json::Value::Number).unwrap_or_default(),
            Self::Timestamp(t) => t.to_rfc3339_opts(SecondsFormat::Micros, true).into(),
            Self::Text(s) => s.clone().into(),
        }
    }

    /// Total order between two values of the same type: numbers by value,
    /// text by Unicode code point (byte order of UTF-8), `false < true`.
    /// Values of different types compare by type (never happens for one
    /// field of a checked row).
    pub fn cmp_same_type(&self, other: &Self) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        match (self, other) {
            (Self::Bool(a), Self::Bool(b)) => a.cmp(b),
            (Self::Integer(a), Self::Integer(b)) => a.cmp(b),
            (Self::Float(a), Self::Float(b)) => a.total_cmp(b),
            (Self::Timestamp(a), Self::Timestamp(b)) => a.cmp(b),
            (Self::Text(a), Self::Text(b)) => a.as_bytes().cmp(b.as_bytes()),
            (a, b) => a.rank().cmp(&b.rank()).then(Ordering::Equal),
        }
    }

    fn rank(&self) -> u8 {
        match self {
            Self::Bool(_) => 0,
            Self::Integer(_) => 1,
            Self::Float(_) => 2,
            Self::Timestamp(_) => 3,
            Self::Text(_) => 4,
        }
    }
}

impl From<&str> for FieldValue {
    fn from(v: &str) -> Self {
        Self::Text(v.to_owned())
    }
}
impl From<String> for FieldValue {
    fn from(v: String) -> Self {
        Self::Text(v)
    }
}
impl From<i64> for FieldValue {
    fn from(v: i64) -> Self {
        Self::Integer(v)
    }
}
impl From<f64> for FieldValue {
    fn from(v: f64) -> Self {
        Self::Float(v)
    }
}
impl From<bool> for FieldValue {
    fn from(v: bool) -> Self {
        Self::Bool(v)
    }
}
impl From<DateTime<Utc>> for FieldValue {
    fn from(v: DateTime<Utc>) -> Self {
        Self::timestamp(v)
    }
}

/// One row of a list view: field name → value; an absent field is missing
/// (SQL `NULL`).
pub type Row = BTreeMap<String, FieldValue>;

#[cfg(test)]
mod tests {
    #[test]
    fn plain_names_are_lower_case_identifiers_of_at_most_48() {
        use super::is_plain_name;
        for ok in ["a", "projects", "view_2", &"x".repeat(48)] {
            assert!(is_plain_name(ok), "{ok}");
        }
        for bad in ["", "2a", "_a", "Projects", "a-b", "a b", "a;drop", "é", &"x".repeat(49)] {
            assert!(!is_plain_name(bad), "{bad}");
        }
    }

    #[test]
    fn prefix_upper_bound_is_the_next_string_in_code_point_order() {
        use super::prefix_upper_bound;
        assert_eq!(prefix_upper_bound("ab").as_deref(), Some("ac"));
        assert_eq!(prefix_upper_bound("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_upper_bound("a\u{D7FF}").as_deref(), Some("a\u{E000}"));
        assert_eq!(prefix_upper_bound("\u{10FFFF}"), None);
        assert_eq!(prefix_upper_bound(""), None);
        for p in ["ab", "z", "é", "a\u{10FFFF}"] {
            let upper = prefix_upper_bound(p).unwrap();
            for s in [p.to_string(), format!("{p}\u{10FFFF}zz"), format!("{p}\0")] {
                assert!(s.as_bytes() < upper.as_bytes(), "{s:?} < {upper:?}");
            }
        }
    }

    use super::*;

    #[test]
    fn schema_validation_rejects_bad_names_and_flags() {
        let ok = ViewSchema::new("projects", 1).field(Field::text("name").searchable());
        assert!(ok.validate().is_ok());
        for bad in [
            ViewSchema::new("Projects", 1),
            ViewSchema::new("p", 1).field(Field::text("na me")),
            ViewSchema::new("p", 1).field(Field::text("id")),
            ViewSchema::new("p", 1).field(Field::text("a")).field(Field::integer("a")),
            ViewSchema::new("p", 1).field(Field::integer("n").searchable()),
            ViewSchema::new("p", 1).page_sizes(10, 5),
            ViewSchema::new("p\"; drop table x", 1),
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn values_parse_by_type() {
        assert_eq!(FieldValue::parse(FieldType::Integer, "-4"), Some(FieldValue::Integer(-4)));
        assert_eq!(FieldValue::parse(FieldType::Integer, "4.5"), None);
        assert_eq!(FieldValue::parse(FieldType::Float, "NaN"), None);
        assert_eq!(FieldValue::parse(FieldType::Bool, "yes"), None);
        let t = FieldValue::parse(FieldType::Timestamp, "2026-01-02T03:04:05.1234567Z").unwrap();
        assert_eq!(t.to_json(), serde_json::json!("2026-01-02T03:04:05.123456Z"));
        assert!(FieldValue::parse(FieldType::Timestamp, "yesterday").is_none());
    }

    #[test]
    fn rows_are_checked_against_the_schema() {
        let s = ViewSchema::new("p", 1).field(Field::integer("n"));
        let mut row = Row::new();
        row.insert("n".into(), 3.into());
        assert!(s.check_row(&row).is_ok());
        row.insert("n".into(), "three".into());
        assert!(s.check_row(&row).is_err());
        let mut other = Row::new();
        other.insert("m".into(), 3.into());
        assert!(s.check_row(&other).is_err());
    }
}
