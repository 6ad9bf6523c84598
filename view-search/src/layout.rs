//! How a [`ViewSchema`] maps onto a Tantivy schema, and the documents a
//! [`RowChange`] is stored as.

use std::collections::HashMap;

use kes_core::{FieldType, FieldValue, Row, RowChange, ViewSchema};
use tantivy::schema::{
    Field as IndexField, FieldEntry, IndexRecordOption, NumericOptions, Schema, TextFieldIndexing, TextOptions,
};
use tantivy::tokenizer::{LowerCaser, RawTokenizer, TextAnalyzer};
use tantivy::{Index, TantivyDocument};

use crate::error::SearchViewError;

/// The aggregate id: raw, stored, fast (the final sort key of every list).
pub(crate) const ID: &str = "_id";
/// The aggregate version the document reflects (stored).
const VERSION: &str = "_version";
/// The aggregate state as JSON text (stored only).
const STATE: &str = "_state";
/// The row as JSON text (stored only): what a page returns, exactly as written.
const ROW: &str = "_row";
/// `true` for rows that are listed; `false` for deleted aggregates, whose
/// document only keeps the state.
const LISTED: &str = "_listed";

/// Tokenizer of searchable text fields: Tantivy's built-in English analyzer
/// (simple tokenizer, long-token filter, lower-casing, Porter stemmer), so
/// that `projects` finds "Project".
pub(crate) const TEXT_TOKENIZER: &str = "en_stem";
/// Tokenizer of searchable keyword fields: the whole value as one
/// lower-cased token (keywords are never split).
pub(crate) const KEYWORD_TOKENIZER: &str = "kes_keyword";

/// The name of the exact-value copy of a view field (filters, sorts,
/// prefixes). The searchable copy carries the field's own name, so that
/// `q=name:word` reads naturally.
pub(crate) fn raw_name(field: &str) -> String {
    format!("_raw_{field}")
}

/// The Tantivy schema derived from `view` (which must be valid).
///
/// | view field | index fields |
/// |---|---|
/// | `id` | `_id`: raw string, indexed, stored, fast |
/// | text / keyword, filterable or sortable | `_raw_{name}`: raw string, indexed, fast |
/// | text, searchable | `{name}`: `en_stem` tokenized, with positions |
/// | keyword, searchable | `{name}`: one lower-cased token, with positions |
/// | integer / timestamp, filterable or sortable | `_raw_{name}`: i64 (timestamps in µs), indexed, fast |
/// | float | `_raw_{name}`: f64, indexed, fast |
/// | bool | `_raw_{name}`: bool, indexed, fast |
///
/// Beside them: `_version` (u64, stored), `_state` and `_row` (JSON text,
/// stored), `_listed` (bool, indexed). Fields neither filterable, sortable
/// nor searchable live only in `_row`.
pub fn index_schema(view: &ViewSchema) -> Schema {
    let mut builder = Schema::builder();
    let raw_text = TextOptions::default()
        .set_indexing_options(
            TextFieldIndexing::default().set_tokenizer("raw").set_index_option(IndexRecordOption::Basic),
        )
        .set_fast(Some("raw"));
    builder.add_text_field(ID, raw_text.clone().set_stored());
    builder.add_u64_field(VERSION, NumericOptions::default().set_stored());
    builder.add_text_field(STATE, TextOptions::default().set_stored());
    builder.add_text_field(ROW, TextOptions::default().set_stored());
    builder.add_bool_field(LISTED, NumericOptions::default().set_indexed());
    let numeric = NumericOptions::default().set_indexed().set_fast();
    for field in &view.fields {
        if field.filterable || field.sortable {
            let name = raw_name(&field.name);
            match field.ty {
                FieldType::Text | FieldType::Keyword => builder.add_text_field(&name, raw_text.clone()),
                FieldType::Integer | FieldType::Timestamp => builder.add_i64_field(&name, numeric.clone()),
                FieldType::Float => builder.add_f64_field(&name, numeric.clone()),
                FieldType::Bool => builder.add_bool_field(&name, numeric.clone()),
            };
        }
        if field.searchable {
            let tokenizer = if field.ty == FieldType::Keyword { KEYWORD_TOKENIZER } else { TEXT_TOKENIZER };
            let indexing = TextFieldIndexing::default()
                .set_tokenizer(tokenizer)
                .set_index_option(IndexRecordOption::WithFreqsAndPositions);
            builder.add_text_field(&field.name, TextOptions::default().set_indexing_options(indexing));
        }
    }
    builder.build()
}

/// Registers on `index` the tokenizers [`index_schema`] names that Tantivy
/// does not ship (tokenizers are not persisted with an index). Needed only
/// by tools that open a view's index with Tantivy directly.
pub fn register_tokenizers(index: &Index) {
    index
        .tokenizers()
        .register(KEYWORD_TOKENIZER, TextAnalyzer::builder(RawTokenizer::default()).filter(LowerCaser).build());
}

/// The exact-value copy of one view field in one index.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawField {
    pub field: IndexField,
    pub ty: FieldType,
}

/// The fields of one index copy, resolved against the current view schema.
///
/// A copy built from an older schema is still opened (it serves while the
/// new one is rebuilt): a view field whose index field is missing or
/// differs is left out here, and a query that needs it is answered with
/// [`kes_core::ViewError::Unavailable`] until the rebuild swaps in.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub id: IndexField,
    pub version: IndexField,
    pub state: IndexField,
    pub row: IndexField,
    pub listed: IndexField,
    /// Exact-value copies by view field name.
    pub raw: HashMap<String, RawField>,
    /// Searchable copies by view field name (the names `q` may use).
    pub search: HashMap<String, IndexField>,
    /// Whether the index schema is exactly the one the view derives.
    pub current: bool,
}

impl Layout {
    /// Resolves `view` against the schema of an existing index.
    pub fn resolve(actual: &Schema, view: &ViewSchema) -> Result<Self, SearchViewError> {
        let wanted = index_schema(view);
        let internal = |name: &str| -> Result<IndexField, SearchViewError> {
            let field =
                actual.get_field(name).map_err(|_| SearchViewError::NotAViewIndex(format!("no field {name}")))?;
            let expected = wanted.get_field(name).map(|f| wanted.get_field_entry(f)).ok();
            if expected != Some(actual.get_field_entry(field)) {
                return Err(SearchViewError::NotAViewIndex(format!("field {name} has another type")));
            }
            Ok(field)
        };
        let same = |name: &str| -> Option<IndexField> {
            let field = actual.get_field(name).ok()?;
            let expected: &FieldEntry = wanted.get_field_entry(wanted.get_field(name).ok()?);
            (actual.get_field_entry(field) == expected).then_some(field)
        };
        let mut layout = Self {
            id: internal(ID)?,
            version: internal(VERSION)?,
            state: internal(STATE)?,
            row: internal(ROW)?,
            listed: internal(LISTED)?,
            raw: HashMap::new(),
            search: HashMap::new(),
            current: actual.fields().count() == wanted.fields().count(),
        };
        for f in &view.fields {
            if f.filterable || f.sortable {
                match same(&raw_name(&f.name)) {
                    Some(field) => {
                        layout.raw.insert(f.name.clone(), RawField { field, ty: f.ty });
                    }
                    None => layout.current = false,
                }
            }
            if f.searchable {
                match same(&f.name) {
                    Some(field) => {
                        layout.search.insert(f.name.clone(), field);
                    }
                    None => layout.current = false,
                }
            }
        }
        Ok(layout)
    }

    /// The document `change` is stored as.
    pub fn document(&self, change: &RowChange) -> Result<TantivyDocument, SearchViewError> {
        let mut doc = TantivyDocument::new();
        doc.add_text(self.id, &change.id);
        doc.add_u64(self.version, change.version);
        doc.add_text(self.state, change.state.get());
        let Some(row) = &change.row else {
            doc.add_bool(self.listed, false);
            return Ok(doc);
        };
        doc.add_bool(self.listed, true);
        doc.add_text(self.row, serde_json::to_string(&RowJson(row)).map_err(SearchViewError::Json)?);
        for (name, value) in row {
            if let Some(raw) = self.raw.get(name) {
                match value {
                    FieldValue::Text(s) => doc.add_text(raw.field, s),
                    FieldValue::Integer(i) => doc.add_i64(raw.field, *i),
                    FieldValue::Float(f) => doc.add_f64(raw.field, *f),
                    FieldValue::Bool(b) => doc.add_bool(raw.field, *b),
                    FieldValue::Timestamp(t) => doc.add_i64(raw.field, t.timestamp_micros()),
                }
            }
            if let (Some(field), FieldValue::Text(s)) = (self.search.get(name), value) {
                doc.add_text(*field, s);
            }
        }
        Ok(doc)
    }
}

/// A row as the JSON object [`read_row`] reads (each value as
/// [`FieldValue::to_json`] makes it), written straight to text: no
/// `serde_json::Value` tree, no copy of the names and texts.
struct RowJson<'a>(&'a Row);

impl serde::Serialize for RowJson<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in self.0 {
            match value {
                FieldValue::Bool(b) => map.serialize_entry(name, b)?,
                FieldValue::Integer(i) => map.serialize_entry(name, i)?,
                FieldValue::Text(t) => map.serialize_entry(name, t)?,
                // RFC 3339 with microseconds, and `null` for a float JSON
                // cannot hold: as `to_json` has them.
                FieldValue::Float(_) | FieldValue::Timestamp(_) => map.serialize_entry(name, &value.to_json())?,
            }
        }
        map.end()
    }
}

/// The Tantivy document `change` is stored as in an index built from
/// `view` (for tools and benchmarks that write such an index directly).
pub fn index_document(view: &ViewSchema, change: &RowChange) -> Result<TantivyDocument, SearchViewError> {
    Layout::resolve(&index_schema(view), view)?.document(change)
}

/// Reads a row stored by [`Layout::document`]: values of fields the view
/// no longer has, or whose type changed, are left out (an older copy
/// serving during a rebuild).
pub(crate) fn read_row(view: &ViewSchema, id: &str, text: &str) -> Result<Row, SearchViewError> {
    let corrupt = |reason: String| SearchViewError::CorruptRow { id: id.to_owned(), reason };
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).map_err(|e| corrupt(format!("stored row: {e}")))?;
    let mut row = Row::new();
    for (name, value) in json {
        let Some(field) = view.fields.iter().find(|f| f.name == name) else { continue };
        if let Some(value) = FieldValue::from_json(field.ty, &value) {
            row.insert(name, value);
        }
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use kes_core::{FieldValue, Row};

    use super::RowJson;

    #[test]
    fn a_row_is_written_as_the_json_object_of_its_values() {
        let mut row = Row::new();
        row.insert("done".into(), FieldValue::Bool(true));
        row.insert("budget".into(), FieldValue::Integer(-42));
        row.insert("ratio".into(), FieldValue::Float(0.1));
        row.insert("nan".into(), FieldValue::Float(f64::NAN));
        row.insert("name".into(), FieldValue::Text("Grüße \"quoted\"\n\u{1}".into()));
        let due = chrono::Utc.timestamp_opt(1_767_225_600, 123_456_789).single().expect("a time");
        row.insert("due".into(), FieldValue::Timestamp(due));
        let through_values: serde_json::Map<String, serde_json::Value> =
            row.iter().map(|(name, value)| (name.clone(), value.to_json())).collect();
        let expected = serde_json::Value::Object(through_values).to_string();
        assert_eq!(serde_json::to_string(&RowJson(&row)).expect("serialise"), expected);
        assert!(expected.contains(r#""due":"2026-01-01T00:00:00.123456Z""#), "{expected}");
        assert!(expected.contains(r#""nan":null"#), "{expected}");
    }
}
