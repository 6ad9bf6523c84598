//! List queries: what the edge parses, what backends execute, and the
//! ordering and paging rules every backend shares.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use super::schema::{Field, FieldType, FieldValue, ID_FIELD, Row, ViewSchema};

/// A filter operator of the `filter[field][op]=value` syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FilterOp {
    /// Equal.
    Eq,
    /// Not equal.
    Ne,
    /// Greater than.
    Gt,
    /// Greater than or equal.
    Gte,
    /// Less than.
    Lt,
    /// Less than or equal.
    Lte,
    /// Equal to one of a comma-separated list.
    In,
    /// Text starting with (case-sensitive), text and keyword fields only.
    Prefix,
}

impl FilterOp {
    /// Every operator, in the order of the docs.
    pub const ALL: [FilterOp; 8] =
        [Self::Eq, Self::Ne, Self::Gt, Self::Gte, Self::Lt, Self::Lte, Self::In, Self::Prefix];

    /// The operator's name in query strings.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eq => "eq",
            Self::Ne => "ne",
            Self::Gt => "gt",
            Self::Gte => "gte",
            Self::Lt => "lt",
            Self::Lte => "lte",
            Self::In => "in",
            Self::Prefix => "prefix",
        }
    }
}

impl fmt::Display for FilterOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FilterOp {
    type Err = QueryError;
    fn from_str(s: &str) -> Result<Self, QueryError> {
        Self::ALL.into_iter().find(|op| op.as_str() == s).ok_or_else(|| QueryError::UnknownOperator(clip(s)))
    }
}

/// Why a list query was refused, before any backend saw it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// A query parameter KES does not know.
    #[error("unknown query parameter {0:?}")]
    UnknownParameter(String),
    /// A field the view does not have.
    #[error("unknown field {0:?}")]
    UnknownField(String),
    /// A field that may not be filtered on.
    #[error("field {0:?} cannot be filtered on")]
    NotFilterable(String),
    /// A field that may not be sorted by.
    #[error("field {0:?} cannot be sorted by")]
    NotSortable(String),
    /// An operator that does not exist.
    #[error("unknown filter operator {0:?}")]
    UnknownOperator(String),
    /// An operator that does not apply to the field's type.
    #[error("operator {op} does not apply to {field} ({ty})")]
    OperatorNotApplicable {
        /// The field.
        field: String,
        /// Its type.
        ty: FieldType,
        /// The operator.
        op: FilterOp,
    },
    /// A value that is not of the field's type.
    #[error("{value:?} is not a valid {ty} for {field}")]
    BadValue {
        /// The field.
        field: String,
        /// Its type.
        ty: FieldType,
        /// The offending value (clipped).
        value: String,
    },
    /// A page size outside 1..=max.
    #[error("page size must be between 1 and {max}")]
    BadPageSize {
        /// The largest page size.
        max: u32,
    },
    /// More filters than a query may carry: at most one per filterable
    /// field (and `id`) and operator, and never fewer than 32 (repeating a filter
    /// parameter makes a query arbitrarily long, and costly).
    #[error("at most {max} filters")]
    TooManyFilters {
        /// The most filters this view takes in one query.
        max: usize,
    },
    /// A cursor that was not issued for this query.
    #[error("invalid page cursor")]
    BadCursor,
    /// A full-text query the backend cannot parse.
    #[error("invalid search query: {0}")]
    BadSearch(String),
}

fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

/// One filter as written by the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// Field name.
    pub field: String,
    /// Operator.
    pub op: FilterOp,
    /// Value as text (comma-separated for `in`).
    pub value: String,
}

/// One sort key as written by the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortKey {
    /// Field name.
    pub field: String,
    /// Descending when true.
    pub descending: bool,
}

/// A request for one page of a list view, as the client wrote it:
/// `filter[field]=v`, `filter[field][op]=v`, `sort=-a,b`, `page[size]=n`,
/// `page[after]=cursor`, `q=words`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// All must hold.
    pub filters: Vec<Filter>,
    /// Sort keys, most significant first.
    pub sort: Vec<SortKey>,
    /// Rows per page.
    pub page_size: Option<u32>,
    /// The `next` cursor of the previous page.
    pub after: Option<String>,
    /// Full-text search over the searchable fields.
    pub q: Option<String>,
}

impl ListQuery {
    /// An empty query: the first page, sorted by id.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a filter.
    pub fn filter(mut self, field: &str, op: FilterOp, value: impl Into<String>) -> Self {
        self.filters.push(Filter { field: field.into(), op, value: value.into() });
        self
    }

    /// Sets the sort from its query-string form (`-budget,name`).
    pub fn sort_by(mut self, spec: &str) -> Self {
        self.sort = parse_sort(spec);
        self
    }

    /// Sets the page size.
    pub fn page_size(mut self, n: u32) -> Self {
        self.page_size = Some(n);
        self
    }

    /// Continues after the page that returned `cursor`.
    pub fn after(mut self, cursor: impl Into<String>) -> Self {
        self.after = Some(cursor.into());
        self
    }

    /// Sets the full-text query.
    pub fn search(mut self, q: impl Into<String>) -> Self {
        self.q = Some(q.into());
        self
    }

    /// Reads a query from decoded query-string pairs.
    pub fn from_pairs<K: AsRef<str>, V: AsRef<str>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, QueryError> {
        let mut query = Self::new();
        for (key, value) in pairs {
            let (key, value) = (key.as_ref(), value.as_ref());
            match key {
                "sort" => query.sort = parse_sort_strictly(value)?,
                "q" => query.q = Some(value.to_owned()).filter(|q| !q.trim().is_empty()),
                "page[size]" => {
                    query.page_size = Some(value.parse().map_err(|_| QueryError::BadPageSize { max: u32::MAX })?)
                }
                "page[after]" => query.after = Some(value.to_owned()).filter(|c| !c.is_empty()),
                _ => {
                    let rest = key.strip_prefix("filter[").ok_or_else(|| QueryError::UnknownParameter(clip(key)))?;
                    let (field, rest) = rest.split_once(']').ok_or_else(|| QueryError::UnknownParameter(clip(key)))?;
                    let op = match rest {
                        "" => FilterOp::Eq,
                        _ => rest
                            .strip_prefix('[')
                            .and_then(|r| r.strip_suffix(']'))
                            .ok_or_else(|| QueryError::UnknownParameter(clip(key)))?
                            .parse()?,
                    };
                    query.filters.push(Filter { field: field.to_owned(), op, value: value.to_owned() });
                }
            }
        }
        Ok(query)
    }

    /// Checks the query against `schema` and types its values. Nothing a
    /// backend builds from the result names a field outside the schema.
    // Kept in one piece: A list of independent checks, one per part of the query, each a few lines.
    pub fn validate(&self, schema: &ViewSchema) -> Result<ValidQuery, QueryError> {
        let field = |name: &str| schema.get(name).ok_or_else(|| QueryError::UnknownField(clip(name)));
        // `id` is filterable too.
        let most = ((schema.fields.iter().filter(|f| f.filterable).count() + 1) * FilterOp::ALL.len()).max(32);
        if self.filters.len() > most {
            return Err(QueryError::TooManyFilters { max: most });
        }
        let mut filters = Vec::with_capacity(self.filters.len());
        for f in &self.filters {
            let field = field(&f.field)?;
            if !field.filterable {
                return Err(QueryError::NotFilterable(field.name));
            }
            if f.op == FilterOp::Prefix && !matches!(field.ty, FieldType::Text | FieldType::Keyword) {
                return Err(QueryError::OperatorNotApplicable { field: field.name, ty: field.ty, op: f.op });
            }
            let texts: Vec<&str> = if f.op == FilterOp::In { f.value.split(',').collect() } else { vec![&f.value] };
            if texts.len() > 100 {
                return Err(QueryError::BadValue {
                    field: field.name,
                    ty: field.ty,
                    value: "more than 100 values".into(),
                });
            }
            let values = texts
                .into_iter()
                .map(|t| {
                    FieldValue::parse(field.ty, t).ok_or_else(|| QueryError::BadValue {
                        field: field.name.clone(),
                        ty: field.ty,
                        value: clip(t),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            filters.push(ValidFilter { field, op: f.op, values });
        }
        let mut sort = Vec::with_capacity(self.sort.len() + 1);
        for key in &self.sort {
            let field = field(&key.field)?;
            if !field.sortable {
                return Err(QueryError::NotSortable(field.name));
            }
            let is_id = field.name == ID_FIELD;
            if sort.iter().any(|k: &ValidSort| k.field.name == field.name) {
                continue; // A repeated key could never decide anything either.
            }
            sort.push(ValidSort { field, descending: key.descending });
            if is_id {
                break; // id is unique: later keys could never decide anything.
            }
        }
        let q = self.q.as_deref().map(str::trim).filter(|q| !q.is_empty()).map(str::to_owned);
        let relevance = q.is_some() && sort.is_empty();
        if sort.last().is_none_or(|k| k.field.name != ID_FIELD) {
            sort.push(ValidSort { field: Field::keyword(ID_FIELD).sortable(), descending: false });
        }
        let page_size = self.page_size.unwrap_or(schema.default_page_size);
        if page_size == 0 || page_size > schema.max_page_size {
            return Err(QueryError::BadPageSize { max: schema.max_page_size });
        }
        let mut valid = ValidQuery { filters, sort, page_size, after: None, q, relevance };
        if let Some(cursor) = &self.after {
            valid.after = Some(valid.decode_cursor(cursor)?);
        }
        Ok(valid)
    }
}

/// `sort` as a query string writes it: comma-separated field names, each
/// with an optional `-` (descending); empty is no sort. Anything else (a
/// blank key, spaces, `+`) is refused rather than guessed at.
fn parse_sort_strictly(spec: &str) -> Result<Vec<SortKey>, QueryError> {
    if spec.is_empty() {
        return Ok(Vec::new());
    }
    spec.split(',')
        .map(|key| {
            let (field, descending) = match key.strip_prefix('-') {
                Some(f) => (f, true),
                None => (key, false),
            };
            let plain = !field.is_empty() && field.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if plain {
                Ok(SortKey { field: field.to_owned(), descending })
            } else {
                Err(QueryError::UnknownField(clip(key)))
            }
        })
        .collect()
}

fn parse_sort(spec: &str) -> Vec<SortKey> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s.strip_prefix('-') {
            Some(f) => SortKey { field: f.to_owned(), descending: true },
            None => SortKey { field: s.strip_prefix('+').unwrap_or(s).to_owned(), descending: false },
        })
        .collect()
}

/// A filter checked against the schema, its values typed.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidFilter {
    /// The field (from the schema).
    pub field: Field,
    /// The operator.
    pub op: FilterOp,
    /// One value, or several for `in`.
    pub values: Vec<FieldValue>,
}

/// A sort key checked against the schema.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidSort {
    /// The field (from the schema).
    pub field: Field,
    /// Descending when true.
    pub descending: bool,
}

/// Where the next page starts.
#[derive(Debug, Clone, PartialEq)]
pub enum Cursor {
    /// Keyset paging: the sort-key values of the last row of the previous
    /// page, one per key of [`ValidQuery::sort`] (`None` = missing value).
    Keys(Vec<Option<FieldValue>>),
    /// Relevance paging: how many rows came before.
    Offset(u64),
}

/// A query that passed [`ListQuery::validate`]: what backends execute.
///
/// The shared semantics, which the ListView conformance suite checks on
/// every backend:
/// - every filter operator matches only rows where the field has a value;
///   text compares by Unicode code point, case-sensitively (`prefix` too);
/// - sort keys compare the same way; rows missing a sort value come last in
///   both directions; `id` ascending breaks ties and always ends the sort;
/// - paging is by keyset: the next page holds the rows strictly after the
///   cursor's keys, so rows inserted or removed elsewhere never shift it;
/// - `total` counts every row matching the filters and `q`, ignoring paging;
/// - `q` (SQL and in-memory backends): each searchable field is checked for
///   containing `q`, case-insensitively; the search backend runs a
///   full-text query instead. With `q` and no explicit sort, backends with a
///   relevance score sort by it ([`ValidQuery::relevance`]), others by id.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidQuery {
    /// All must hold.
    pub filters: Vec<ValidFilter>,
    /// Sort keys; the last one is always `id`.
    pub sort: Vec<ValidSort>,
    /// Rows per page.
    pub page_size: u32,
    /// Where the page starts.
    pub after: Option<Cursor>,
    /// The full-text query, trimmed and non-empty.
    pub q: Option<String>,
    /// True when `q` is given and no sort: relevance order where supported.
    pub relevance: bool,
}

/// A condition on one row, built from a [`ValidQuery`]'s cursor: backends
/// render it (SQL) or evaluate it ([`Cond::eval`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Cond {
    /// Always false.
    False,
    /// All must hold.
    And(Vec<Cond>),
    /// One must hold.
    Or(Vec<Cond>),
    /// `field op value`, where `op` is `Eq`, `Gt` or `Lt`.
    Cmp {
        /// The field.
        field: Field,
        /// `Eq`, `Gt` or `Lt`.
        op: FilterOp,
        /// The value.
        value: FieldValue,
    },
    /// The field has no value.
    IsNull(Field),
}

fn field_value<'a>(id: &'a FieldValue, row: &'a Row, field: &str) -> Option<&'a FieldValue> {
    if field == ID_FIELD { Some(id) } else { row.get(field) }
}

impl Cond {
    /// Evaluates the condition on a row whose id is `id`.
    pub fn eval(&self, id: &str, row: &Row) -> bool {
        let id = FieldValue::Text(id.to_owned());
        self.eval_with(&id, row)
    }

    fn eval_with(&self, id: &FieldValue, row: &Row) -> bool {
        match self {
            Self::False => false,
            Self::And(all) => all.iter().all(|c| c.eval_with(id, row)),
            Self::Or(any) => any.iter().any(|c| c.eval_with(id, row)),
            Self::IsNull(f) => field_value(id, row, &f.name).is_none(),
            Self::Cmp { field, op, value } => field_value(id, row, &field.name).is_some_and(|v| {
                let ord = v.cmp_same_type(value);
                match op {
                    FilterOp::Gt => ord == Ordering::Greater,
                    FilterOp::Lt => ord == Ordering::Less,
                    _ => ord == Ordering::Equal,
                }
            }),
        }
    }
}

impl ValidFilter {
    /// Whether the row with `id` passes this filter.
    pub fn matches(&self, id: &str, row: &Row) -> bool {
        let id = FieldValue::Text(id.to_owned());
        let Some(v) = field_value(&id, row, &self.field.name) else { return false };
        let first = &self.values[0];
        match self.op {
            FilterOp::Eq => v.cmp_same_type(first) == Ordering::Equal,
            FilterOp::Ne => v.cmp_same_type(first) != Ordering::Equal,
            FilterOp::Gt => v.cmp_same_type(first) == Ordering::Greater,
            FilterOp::Gte => v.cmp_same_type(first) != Ordering::Less,
            FilterOp::Lt => v.cmp_same_type(first) == Ordering::Less,
            FilterOp::Lte => v.cmp_same_type(first) != Ordering::Greater,
            FilterOp::In => self.values.iter().any(|x| v.cmp_same_type(x) == Ordering::Equal),
            FilterOp::Prefix => match (v, first) {
                (FieldValue::Text(s), FieldValue::Text(p)) => s.starts_with(p.as_str()),
                _ => false,
            },
        }
    }
}

impl ValidQuery {
    /// The signature of the sort order, bound into cursors so that a cursor
    /// of one order is refused by another.
    fn signature(&self) -> String {
        if self.relevance {
            return "_score".to_owned();
        }
        let keys: Vec<String> =
            self.sort.iter().map(|k| format!("{}{}", if k.descending { "-" } else { "" }, k.field.name)).collect();
        keys.join(",")
    }

    fn decode_cursor(&self, text: &str) -> Result<Cursor, QueryError> {
        let bytes = URL_SAFE_NO_PAD.decode(text.as_bytes()).map_err(|_| QueryError::BadCursor)?;
        let value: Value = serde_json::from_slice(&bytes).map_err(|_| QueryError::BadCursor)?;
        if value.get("s").and_then(Value::as_str) != Some(self.signature().as_str()) {
            return Err(QueryError::BadCursor);
        }
        if self.relevance {
            return value.get("o").and_then(Value::as_u64).map(Cursor::Offset).ok_or(QueryError::BadCursor);
        }
        let keys = value.get("k").and_then(Value::as_array).ok_or(QueryError::BadCursor)?;
        if keys.len() != self.sort.len() {
            return Err(QueryError::BadCursor);
        }
        let mut out = Vec::with_capacity(keys.len());
        for (key, sort) in keys.iter().zip(&self.sort) {
            if key.is_null() && sort.field.name != ID_FIELD {
                out.push(None);
            } else {
                out.push(Some(FieldValue::from_json(sort.field.ty, key).ok_or(QueryError::BadCursor)?));
            }
        }
        Ok(Cursor::Keys(out))
    }

    /// The cursor that continues after the row `id`/`row` in keyset order.
    pub fn cursor_after(&self, id: &str, row: &Row) -> String {
        let id_value = FieldValue::Text(id.to_owned());
        let keys: Vec<Value> = self
            .sort
            .iter()
            .map(|k| field_value(&id_value, row, &k.field.name).map(FieldValue::to_json).unwrap_or(Value::Null))
            .collect();
        URL_SAFE_NO_PAD.encode(json!({ "s": self.signature(), "k": keys }).to_string())
    }

    /// The cursor that continues after `offset` rows in relevance order.
    pub fn cursor_at_offset(&self, offset: u64) -> String {
        URL_SAFE_NO_PAD.encode(json!({ "s": self.signature(), "o": offset }).to_string())
    }

    /// The condition "strictly after the cursor" in keyset order, `None`
    /// on the first page (or for offset cursors).
    pub fn keyset(&self) -> Option<Cond> {
        let Some(Cursor::Keys(keys)) = &self.after else { return None };
        let mut any = Vec::new();
        let mut equal_so_far: Vec<Cond> = Vec::new();
        for (sort, key) in self.sort.iter().zip(keys) {
            let field = sort.field.clone();
            let (after, equal) = match key {
                // Missing values come last: after a missing one, only rows
                // missing it too (decided by later keys) remain.
                None => (Cond::False, Cond::IsNull(field)),
                Some(v) => {
                    let op = if sort.descending { FilterOp::Lt } else { FilterOp::Gt };
                    let beyond = Cond::Cmp { field: field.clone(), op, value: v.clone() };
                    let after = if field.name == ID_FIELD {
                        beyond
                    } else {
                        Cond::Or(vec![beyond, Cond::IsNull(field.clone())])
                    };
                    (after, Cond::Cmp { field, op: FilterOp::Eq, value: v.clone() })
                }
            };
            if after != Cond::False {
                let mut branch = equal_so_far.clone();
                branch.push(after);
                any.push(if branch.len() == 1 { branch.remove(0) } else { Cond::And(branch) });
            }
            equal_so_far.push(equal);
        }
        Some(if any.is_empty() { Cond::False } else { Cond::Or(any) })
    }

    /// Orders two rows by this query's sort keys (missing values last).
    pub fn compare(&self, a: (&str, &Row), b: (&str, &Row)) -> Ordering {
        let (ia, ib) = (FieldValue::Text(a.0.to_owned()), FieldValue::Text(b.0.to_owned()));
        for key in &self.sort {
            let va = field_value(&ia, a.1, &key.field.name);
            let vb = field_value(&ib, b.1, &key.field.name);
            let ord = match (va, vb) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(x), Some(y)) => {
                    let o = x.cmp_same_type(y);
                    if key.descending { o.reverse() } else { o }
                }
            };
            if ord != Ordering::Equal {
                return ord;
            }
        }
        Ordering::Equal
    }

    /// Whether `row` passes every filter and, with `q`, contains it
    /// case-insensitively in a searchable field (the SQL semantics).
    pub fn matches(&self, schema: &ViewSchema, id: &str, row: &Row) -> bool {
        self.filters.iter().all(|f| f.matches(id, row))
            && self.q.as_ref().is_none_or(|q| {
                let q = q.to_lowercase();
                schema
                    .fields
                    .iter()
                    .filter(|f| f.searchable)
                    .any(|f| matches!(row.get(&f.name), Some(FieldValue::Text(t)) if t.to_lowercase().contains(&q)))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> ViewSchema {
        ViewSchema::new("items", 1)
            .field(Field::text("name").filterable().sortable().searchable())
            .field(Field::integer("n").filterable().sortable())
            .field(Field::bool("flag").filterable())
    }

    #[test]
    fn parses_the_query_string_syntax() {
        let q = ListQuery::from_pairs([
            ("filter[name]", "a"),
            ("filter[n][gte]", "3"),
            ("sort", "-n,name"),
            ("page[size]", "5"),
            ("q", "x"),
        ])
        .unwrap();
        assert_eq!(q.filters[0].op, FilterOp::Eq);
        assert_eq!(q.filters[1], Filter { field: "n".into(), op: FilterOp::Gte, value: "3".into() });
        assert_eq!(q.sort[0], SortKey { field: "n".into(), descending: true });
        assert_eq!(q.page_size, Some(5));
        assert!(matches!(ListQuery::from_pairs([("filter[n][near]", "1")]), Err(QueryError::UnknownOperator(_))));
        assert!(matches!(ListQuery::from_pairs([("limit", "1")]), Err(QueryError::UnknownParameter(_))));
        assert!(matches!(ListQuery::from_pairs([("filter[n", "1")]), Err(QueryError::UnknownParameter(_))));
        assert!(ListQuery::from_pairs([("page[size]", "-1")]).is_err());
        assert!(ListQuery::from_pairs([("sort", "")]).unwrap().sort.is_empty());
        for loose in ["a,,b", " a", "+a", "a,", "-"] {
            assert!(ListQuery::from_pairs([("sort", loose)]).is_err(), "{loose:?}");
        }
    }

    #[test]
    fn validation_types_values_and_refuses_what_the_schema_lacks() {
        let s = schema();
        let v = ListQuery::new().filter("n", FilterOp::In, "1,2").validate(&s).unwrap();
        assert_eq!(v.filters[0].values, vec![FieldValue::Integer(1), FieldValue::Integer(2)]);
        assert_eq!(v.sort.last().unwrap().field.name, "id");
        let err = |q: ListQuery| q.validate(&s).unwrap_err();
        assert!(matches!(err(ListQuery::new().filter("nope", FilterOp::Eq, "1")), QueryError::UnknownField(_)));
        assert!(matches!(err(ListQuery::new().filter("n", FilterOp::Eq, "x")), QueryError::BadValue { .. }));
        assert!(matches!(
            err(ListQuery::new().filter("n", FilterOp::Prefix, "1")),
            QueryError::OperatorNotApplicable { .. }
        ));
        assert!(matches!(err(ListQuery::new().sort_by("flag")), QueryError::NotSortable(_)));
        assert!(matches!(err(ListQuery::new().page_size(0)), QueryError::BadPageSize { .. }));
        assert!(matches!(err(ListQuery::new().page_size(101)), QueryError::BadPageSize { .. }));
        assert!(matches!(err(ListQuery::new().after("garbage!")), QueryError::BadCursor));
    }

    #[test]
    fn a_query_is_bounded_in_filters_and_sort_keys() {
        let s = schema();
        // 3 filterable fields and id × 8 operators: exactly the floor of 32.
        let most = (4 * FilterOp::ALL.len()).max(32);
        let repeated = |n: usize| (0..n).fold(ListQuery::new(), |q, i| q.filter("n", FilterOp::Ne, i.to_string()));
        assert!(repeated(most).validate(&s).is_ok());
        assert_eq!(repeated(most + 1).validate(&s).unwrap_err(), QueryError::TooManyFilters { max: most });
        let v = ListQuery::from_pairs([("sort", "n,-n,n,name,n")]).unwrap().validate(&s).unwrap();
        let keys: Vec<_> = v.sort.iter().map(|k| (k.field.name.as_str(), k.descending)).collect();
        assert_eq!(keys, [("n", false), ("name", false), ("id", false)], "repeated keys are dropped");
    }

    #[test]
    fn cursors_round_trip_and_are_bound_to_their_sort() {
        let s = schema();
        let v = ListQuery::new().sort_by("-n").validate(&s).unwrap();
        let mut row = Row::new();
        row.insert("n".into(), 7.into());
        let c = v.cursor_after("b", &row);
        let next = ListQuery::new().sort_by("-n").after(c.clone()).validate(&s).unwrap();
        assert_eq!(next.after, Some(Cursor::Keys(vec![Some(FieldValue::Integer(7)), Some("b".into())])));
        assert!(ListQuery::new().sort_by("n").after(c).validate(&s).is_err());
    }

    #[test]
    fn keyset_condition_puts_missing_values_last() {
        let s = schema();
        let v = ListQuery::new().sort_by("n").validate(&s).unwrap();
        let row = |n: Option<i64>| {
            let mut r = Row::new();
            if let Some(n) = n {
                r.insert("n".into(), n.into());
            }
            r
        };
        let after_5b = ListQuery::new().sort_by("n").after(v.cursor_after("b", &row(Some(5)))).validate(&s).unwrap();
        let cond = after_5b.keyset().unwrap();
        assert!(!cond.eval("a", &row(Some(5))));
        assert!(cond.eval("c", &row(Some(5))));
        assert!(cond.eval("a", &row(Some(6))));
        assert!(!cond.eval("z", &row(Some(4))));
        assert!(cond.eval("a", &row(None)));
        let after_null = ListQuery::new().sort_by("n").after(v.cursor_after("b", &row(None))).validate(&s).unwrap();
        let cond = after_null.keyset().unwrap();
        assert!(!cond.eval("z", &row(Some(9))));
        assert!(cond.eval("c", &row(None)));
        assert!(!cond.eval("a", &row(None)));
    }
}
