//! Translation of a [`ValidQuery`] into Tantivy queries.
//!
//! Filters become term, range, set and exists queries on the exact-value (`_raw_*`) copies, which hold the values
//! unchanged: text terms compare as UTF-8 bytes (code point order), floats
//! through Tantivy's order-preserving u64 mapping (the order of
//! `f64::total_cmp`), timestamps as i64 microseconds. A document without a
//! value has no term and no fast value, so no operator matches it, as the
//! shared semantics require.

use std::ops::Bound;

use kes_core::{Field, FieldType, FieldValue, FilterOp};
use kes_core::{ID_FIELD, ValidFilter};
use tantivy::query::{
    BooleanQuery, ConstScoreQuery, EmptyQuery, ExistsQuery, Occur, Query, QueryParser, RangeQuery, TermQuery,
    TermSetQuery,
};
use tantivy::query_grammar::{UserInputAst, UserInputLeaf};
use tantivy::schema::IndexRecordOption;
use tantivy::{Index, Term};

use crate::error::SearchViewError;
use crate::layout::{Layout, RawField, raw_name};

/// Builds the Tantivy side of list queries for one index copy.
pub(crate) struct QueryBuilder<'a> {
    pub layout: &'a Layout,
}

impl QueryBuilder<'_> {
    fn raw(&self, field: &Field) -> Result<RawField, SearchViewError> {
        if field.name == ID_FIELD {
            return Ok(RawField { field: self.layout.id, ty: FieldType::Keyword });
        }
        self.layout.raw.get(&field.name).copied().ok_or_else(|| SearchViewError::MissingField(field.name.clone()))
    }

    /// The fast-field name holding `field`'s exact values.
    pub fn fast_name(&self, field: &Field) -> Result<String, SearchViewError> {
        self.raw(field)?;
        Ok(if field.name == ID_FIELD { crate::layout::ID.to_owned() } else { raw_name(&field.name) })
    }

    fn term(&self, raw: RawField, value: &FieldValue) -> Result<Term, SearchViewError> {
        let f = raw.field;
        Ok(match (raw.ty, value) {
            (FieldType::Text | FieldType::Keyword, FieldValue::Text(s)) => Term::from_field_text(f, s),
            (FieldType::Integer, FieldValue::Integer(i)) => Term::from_field_i64(f, *i),
            (FieldType::Float, FieldValue::Float(x)) => Term::from_field_f64(f, *x),
            (FieldType::Bool, FieldValue::Bool(b)) => Term::from_field_bool(f, *b),
            (FieldType::Timestamp, FieldValue::Timestamp(t)) => Term::from_field_i64(f, t.timestamp_micros()),
            (ty, v) => return Err(SearchViewError::BadSearch(format!("{v:?} is not a {ty}"))),
        })
    }

    fn exists(&self, field: &Field) -> Result<Box<dyn Query>, SearchViewError> {
        Ok(Box::new(ExistsQuery::new(self.fast_name(field)?, false)))
    }

    fn range(
        &self,
        raw: RawField,
        lower: Bound<&FieldValue>,
        upper: Bound<&FieldValue>,
    ) -> Result<Box<dyn Query>, SearchViewError> {
        if raw.ty == FieldType::Bool {
            // Tantivy has no range over bools; there are only two values.
            let inside = |v: &FieldValue| {
                let above = match lower {
                    Bound::Included(l) => v.cmp_same_type(l).is_ge(),
                    Bound::Excluded(l) => v.cmp_same_type(l).is_gt(),
                    Bound::Unbounded => true,
                };
                let below = match upper {
                    Bound::Included(u) => v.cmp_same_type(u).is_le(),
                    Bound::Excluded(u) => v.cmp_same_type(u).is_lt(),
                    Bound::Unbounded => true,
                };
                above && below
            };
            let terms = [FieldValue::Bool(false), FieldValue::Bool(true)]
                .iter()
                .filter(|v| inside(v))
                .map(|v| self.term(raw, v))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(match terms.len() {
                0 => Box::new(EmptyQuery),
                _ => Box::new(TermSetQuery::new(terms)),
            });
        }
        let bound = |b: Bound<&FieldValue>| -> Result<Bound<Term>, SearchViewError> {
            Ok(match b {
                Bound::Included(v) => Bound::Included(self.term(raw, v)?),
                Bound::Excluded(v) => Bound::Excluded(self.term(raw, v)?),
                Bound::Unbounded => Bound::Unbounded,
            })
        };
        Ok(Box::new(RangeQuery::new(bound(lower)?, bound(upper)?)))
    }

    /// The documents passing one filter.
    pub fn filter(&self, filter: &ValidFilter) -> Result<Box<dyn Query>, SearchViewError> {
        let raw = self.raw(&filter.field)?;
        let first = filter.values.first().ok_or_else(|| SearchViewError::BadSearch("a filter without value".into()))?;
        Ok(match filter.op {
            FilterOp::Eq => Box::new(TermQuery::new(self.term(raw, first)?, IndexRecordOption::Basic)),
            FilterOp::Ne => Box::new(BooleanQuery::new(vec![
                (Occur::Must, self.exists(&filter.field)?),
                (Occur::MustNot, Box::new(TermQuery::new(self.term(raw, first)?, IndexRecordOption::Basic))),
            ])),
            FilterOp::Gt => self.range(raw, Bound::Excluded(first), Bound::Unbounded)?,
            FilterOp::Gte => self.range(raw, Bound::Included(first), Bound::Unbounded)?,
            FilterOp::Lt => self.range(raw, Bound::Unbounded, Bound::Excluded(first))?,
            FilterOp::Lte => self.range(raw, Bound::Unbounded, Bound::Included(first))?,
            FilterOp::In => {
                let terms = filter.values.iter().map(|v| self.term(raw, v)).collect::<Result<Vec<_>, _>>()?;
                Box::new(TermSetQuery::new(terms))
            }
            FilterOp::Prefix => match first {
                FieldValue::Text(p) if p.is_empty() => self.exists(&filter.field)?,
                FieldValue::Text(p) => {
                    let upper = kes_core::prefix_upper_bound(p).map(FieldValue::Text);
                    let upper = upper.as_ref().map_or(Bound::Unbounded, Bound::Excluded);
                    self.range(raw, Bound::Included(first), upper)?
                }
                other => return Err(SearchViewError::BadSearch(format!("prefix of {other:?}"))),
            },
        })
    }

    /// Listed rows only: deleted aggregates keep a document (for their
    /// state) that no list may return.
    pub fn listed(&self) -> Box<dyn Query> {
        Box::new(TermQuery::new(Term::from_field_bool(self.layout.listed, true), IndexRecordOption::Basic))
    }

    /// Combines required parts; only `scored` contributes to the score.
    pub fn all_of(scored: Option<Box<dyn Query>>, unscored: Vec<Box<dyn Query>>) -> Box<dyn Query> {
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = unscored
            .into_iter()
            .map(|q| (Occur::Must, Box::new(ConstScoreQuery::new(q, 0.0)) as Box<dyn Query>))
            .collect();
        if let Some(q) = scored {
            clauses.push((Occur::Must, q));
        }
        Box::new(BooleanQuery::new(clauses))
    }
}

/// Parses `q` strictly: a syntax error, or a field `q` may not search, is
/// [`SearchViewError::BadSearch`]. Words without a field search every
/// searchable field; all words must match (conjunction), as users of a
/// search box expect. `None` when the view has no searchable field (then
/// nothing matches, as with the other backends).
pub(crate) fn full_text(index: &Index, layout: &Layout, q: &str) -> Result<Option<Box<dyn Query>>, SearchViewError> {
    // The grammar is a hand-written parser fed with client input: a panic
    // in it must become a client error, not take the request down.
    let parsed = std::panic::catch_unwind(|| tantivy::query_grammar::parse_query(q))
        .map_err(|_| SearchViewError::BadSearch("the search query cannot be parsed".into()))?;
    let ast = parsed.map_err(|_| SearchViewError::BadSearch(format!("cannot parse search query {:?}", clip(q))))?;
    check_fields(&ast, layout)?;
    if layout.search.is_empty() {
        return Ok(None);
    }
    let mut fields: Vec<(&String, &tantivy::schema::Field)> = layout.search.iter().collect();
    fields.sort();
    let mut parser = QueryParser::for_index(index, fields.into_iter().map(|(_, f)| *f).collect());
    parser.set_conjunction_by_default();
    let built = std::panic::catch_unwind(|| parser.build_query_from_user_input_ast(ast))
        .map_err(|_| SearchViewError::BadSearch("the search query cannot be parsed".into()))?;
    built.map(Some).map_err(|e| SearchViewError::BadSearch(format!("{e}")))
}

fn check_fields(ast: &UserInputAst, layout: &Layout) -> Result<(), SearchViewError> {
    let check = |name: &Option<String>| match name {
        Some(n) if !layout.search.contains_key(n) => {
            Err(SearchViewError::BadSearch(format!("{:?} is not a searchable field", clip(n))))
        }
        _ => Ok(()),
    };
    match ast {
        UserInputAst::Clause(clauses) => clauses.iter().try_for_each(|(_, c)| check_fields(c, layout)),
        UserInputAst::Boost(inner, _) => check_fields(inner, layout),
        UserInputAst::Leaf(leaf) => match leaf.as_ref() {
            UserInputLeaf::Literal(lit) => check(&lit.field_name),
            UserInputLeaf::All => Ok(()),
            UserInputLeaf::Range { field, .. } | UserInputLeaf::Set { field, .. } => check(field),
            UserInputLeaf::Exists { field } => check(&Some(field.clone())),
        },
    }
}

fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}
