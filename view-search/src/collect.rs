//! The collector that keeps the first `limit` matching documents in the
//! order of a [`kes_core::ValidQuery`]'s sort keys, strictly after its
//! keyset cursor.
//!
//! Tantivy's own sorted collectors order by one fast field and know nothing
//! of "missing values last in both directions"; this one reads every sort
//! key from the fast fields. Within a segment it compares cheap numbers
//! (term ordinals for text, which follow byte order; order-preserving u64
//! images for numbers) and keeps a bounded candidate list; only the
//! survivors' text keys are turned into strings, to merge the segments.
//!
//! The cursor is compared in the same images: its text keys are looked up
//! in each segment's dictionary (an absent value falls between two
//! ordinals), so "after the cursor" is one comparison per document rather
//! than a nested boolean query over the whole index.
//!
//! Cost: one pass over the matching documents, reading one fast value per
//! sort key each, plus `O(n log limit)` comparisons — a page costs time
//! linear in the number of matches, not in the page size. The documents of the page are then read from the doc store.

use std::cmp::Ordering;

use tantivy::collector::{Collector, SegmentCollector};
use tantivy::columnar::{Column, StrColumn};
use tantivy::{DocAddress, DocId, Score, SegmentOrdinal, SegmentReader};

/// Where one sort key's values come from.
#[derive(Debug, Clone)]
pub(crate) enum KeySource {
    /// A raw text fast field (ids, text, keywords).
    Str(String),
    /// An i64 fast field (integers, timestamps).
    I64(String),
    /// An f64 fast field.
    F64(String),
    /// A bool fast field.
    Bool(String),
}

/// One sort key.
#[derive(Debug, Clone)]
pub(crate) struct SortSpec {
    pub source: KeySource,
    pub descending: bool,
}

/// Keeps the first `limit` documents in sort order, after the keyset
/// cursor `after` when given (one key per sort key, `None` = missing).
pub(crate) struct FirstRows {
    pub keys: Vec<SortSpec>,
    pub limit: usize,
    pub after: Option<Vec<Option<GlobalKey>>>,
}

/// A key value that means the same in every segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum GlobalKey {
    Missing,
    Num(u64),
    Str(Vec<u8>),
}

enum KeyColumn {
    Str(Option<StrColumn>),
    Num(Option<Column<u64>>),
}

/// Compares two keys of the same spec: missing values last in both
/// directions, present ones by value, reversed when descending.
fn cmp_opt(a: Option<u64>, b: Option<u64>, descending: bool) -> Ordering {
    match (a, b) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (Some(x), Some(y)) if descending => y.cmp(&x),
        (Some(x), Some(y)) => x.cmp(&y),
    }
}

fn cmp_global(a: &[GlobalKey], b: &[GlobalKey], keys: &[SortSpec]) -> Ordering {
    for ((x, y), spec) in a.iter().zip(b).zip(keys) {
        let ord = match (x, y) {
            (GlobalKey::Missing, GlobalKey::Missing) => Ordering::Equal,
            (GlobalKey::Missing, _) => Ordering::Greater,
            (_, GlobalKey::Missing) => Ordering::Less,
            (GlobalKey::Num(x), GlobalKey::Num(y)) => x.cmp(y),
            (GlobalKey::Str(x), GlobalKey::Str(y)) => x.cmp(y),
            (GlobalKey::Num(_), GlobalKey::Str(_)) => Ordering::Less,
            (GlobalKey::Str(_), GlobalKey::Num(_)) => Ordering::Greater,
        };
        let ord = match (x, y) {
            (GlobalKey::Missing, _) | (_, GlobalKey::Missing) => ord,
            _ if spec.descending => ord.reverse(),
            _ => ord,
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    Ordering::Equal
}

pub(crate) struct SegmentFirstRows {
    segment: SegmentOrdinal,
    /// The cursor in this segment's terms: only rows strictly after it count.
    after: Option<Vec<Option<u64>>>,
    columns: Vec<(KeyColumn, bool)>,
    limit: usize,
    /// Candidates: segment-local keys and doc ids.
    rows: Vec<(Vec<Option<u64>>, DocId)>,
    /// After a trim: the key of the `limit`-th row; nothing at or after it
    /// can make the page.
    worst: Option<Vec<Option<u64>>>,
    buffer: Vec<Option<u64>>,
}

fn cmp_local(columns: &[(KeyColumn, bool)], a: &[Option<u64>], b: &[Option<u64>]) -> Ordering {
    for ((x, y), (_, desc)) in a.iter().zip(b).zip(columns) {
        let ord = cmp_opt(*x, *y, *desc);
        if ord != Ordering::Equal {
            return ord;
        }
    }
    Ordering::Equal
}

impl SegmentFirstRows {
    fn trim(&mut self) {
        let columns = &self.columns;
        self.rows.sort_unstable_by(|a, b| cmp_local(columns, &a.0, &b.0));
        self.rows.truncate(self.limit);
        if self.rows.len() == self.limit {
            self.worst = self.rows.last().map(|r| r.0.clone());
        }
    }
}

impl SegmentCollector for SegmentFirstRows {
    type Fruit = Vec<(Vec<GlobalKey>, DocAddress)>;

    fn collect(&mut self, doc: DocId, _score: Score) {
        self.buffer.clear();
        for (column, _) in &self.columns {
            self.buffer.push(match column {
                // Odd images for the segment's terms; even ones fall between
                // them (a cursor value the segment does not hold).
                KeyColumn::Str(c) => c.as_ref().and_then(|c| c.ords().first(doc)).map(|ord| 2 * ord + 1),
                KeyColumn::Num(c) => c.as_ref().and_then(|c| c.first(doc)),
            });
        }
        if let Some(after) = &self.after
            && cmp_local(&self.columns, &self.buffer, after) != Ordering::Greater
        {
            return;
        }
        if let Some(worst) = &self.worst
            && cmp_local(&self.columns, &self.buffer, worst) != Ordering::Less
        {
            return;
        }
        self.rows.push((self.buffer.clone(), doc));
        if self.rows.len() >= self.limit.saturating_mul(2).max(64) {
            self.trim();
        }
    }

    fn harvest(mut self) -> Self::Fruit {
        self.trim();
        let mut text = String::new();
        self.rows
            .into_iter()
            .map(|(key, doc)| {
                let global = key
                    .into_iter()
                    .zip(&self.columns)
                    .map(|(value, (column, _))| match (value, column) {
                        (None, _) => GlobalKey::Missing,
                        (Some(image), KeyColumn::Str(Some(c))) => {
                            let ord = image / 2;
                            text.clear();
                            // An ordinal read from the column always names a term.
                            match c.ord_to_str(ord, &mut text) {
                                Ok(true) => GlobalKey::Str(text.as_bytes().to_vec()),
                                _ => GlobalKey::Missing,
                            }
                        }
                        (Some(_), KeyColumn::Str(None)) => GlobalKey::Missing,
                        (Some(n), KeyColumn::Num(_)) => GlobalKey::Num(n),
                    })
                    .collect();
                (global, DocAddress::new(self.segment, doc))
            })
            .collect()
    }
}

/// A cursor key as this segment compares it.
fn local_image(key: Option<&GlobalKey>, column: &KeyColumn) -> tantivy::Result<Option<u64>> {
    Ok(match (key, column) {
        (None | Some(GlobalKey::Missing), _) => None,
        (Some(GlobalKey::Num(n)), _) => Some(*n),
        // The segment holds no value of this field: every row is missing it.
        (Some(GlobalKey::Str(_)), KeyColumn::Str(None)) => Some(0),
        (Some(GlobalKey::Str(bytes)), KeyColumn::Str(Some(c))) => {
            let dictionary = c.dictionary();
            match dictionary.term_ord(bytes)? {
                Some(ord) => Some(2 * ord + 1),
                None => {
                    // Between the last term below it and the first above it.
                    let mut above = dictionary.range().ge(bytes).into_stream()?;
                    let ord = if above.advance() { above.term_ord() } else { dictionary.num_terms() as u64 };
                    Some(2 * ord)
                }
            }
        }
        (Some(GlobalKey::Str(_)), KeyColumn::Num(_)) => None,
    })
}

impl Collector for FirstRows {
    type Fruit = Vec<DocAddress>;
    type Child = SegmentFirstRows;

    fn for_segment(&self, segment: SegmentOrdinal, reader: &SegmentReader) -> tantivy::Result<SegmentFirstRows> {
        let fast = reader.fast_fields();
        let mut columns = Vec::with_capacity(self.keys.len());
        for spec in &self.keys {
            let column = match &spec.source {
                KeySource::Str(name) => KeyColumn::Str(fast.str(name)?),
                // Tantivy's monotonic u64 images: i64 with the sign bit
                // flipped, f64 in the order of `f64::total_cmp` (the order
                // of core's FieldValue), false < true.
                KeySource::I64(name) => {
                    let c: Option<Column<i64>> = fast.column_opt(name)?;
                    KeyColumn::Num(c.map(Column::to_u64_monotonic))
                }
                KeySource::F64(name) => {
                    let c: Option<Column<f64>> = fast.column_opt(name)?;
                    KeyColumn::Num(c.map(Column::to_u64_monotonic))
                }
                KeySource::Bool(name) => {
                    let c: Option<Column<bool>> = fast.column_opt(name)?;
                    KeyColumn::Num(c.map(Column::to_u64_monotonic))
                }
            };
            columns.push((column, spec.descending));
        }
        let after = match &self.after {
            None => None,
            Some(keys) => Some(
                keys.iter()
                    .zip(&columns)
                    .map(|(key, (column, _))| local_image(key.as_ref(), column))
                    .collect::<tantivy::Result<Vec<_>>>()?,
            ),
        };
        Ok(SegmentFirstRows {
            segment,
            after,
            columns,
            limit: self.limit.max(1),
            rows: Vec::new(),
            worst: None,
            buffer: Vec::with_capacity(self.keys.len()),
        })
    }

    fn requires_scoring(&self) -> bool {
        false
    }

    fn merge_fruits(&self, fruits: Vec<Vec<(Vec<GlobalKey>, DocAddress)>>) -> tantivy::Result<Vec<DocAddress>> {
        let mut all: Vec<(Vec<GlobalKey>, DocAddress)> = fruits.into_iter().flatten().collect();
        all.sort_by(|a, b| cmp_global(&a.0, &b.0, &self.keys));
        all.truncate(self.limit);
        Ok(all.into_iter().map(|(_, doc)| doc).collect())
    }
}
