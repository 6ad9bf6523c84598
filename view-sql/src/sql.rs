//! SQL text with bound arguments, and how a validated query becomes SQL.
//!
//! Identifiers come only from a validated [`ViewSchema`] (plain lower-case
//! names, always double-quoted); every value is a bound parameter (`$n`,
//! which both PostgreSQL and SQLite accept).

use std::fmt::Write as _;

use kes_core::{Cond, Cursor, Field, ID_FIELD, ValidFilter, ValidQuery};
use kes_core::{FieldType, FieldValue, FilterOp, Row, ViewSchema};

pub use kes_sql::Dialect;
use kes_sql::Statement;

/// One bound value. NULLs carry their type because PostgreSQL types
/// parameters from what the client declares.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Arg {
    Text(Option<String>),
    Int(Option<i64>),
    Float(Option<f64>),
    Bool(Option<bool>),
}

impl Arg {
    pub(crate) fn of(value: &FieldValue) -> Self {
        match value {
            FieldValue::Text(s) => Self::Text(Some(s.clone())),
            FieldValue::Integer(i) => Self::Int(Some(*i)),
            FieldValue::Float(f) => Self::Float(Some(*f)),
            FieldValue::Bool(b) => Self::Bool(Some(*b)),
            FieldValue::Timestamp(_) => Self::Int(value.as_micros()),
        }
    }

    pub(crate) fn null(ty: FieldType) -> Self {
        match ty {
            FieldType::Text | FieldType::Keyword => Self::Text(None),
            FieldType::Integer | FieldType::Timestamp => Self::Int(None),
            FieldType::Float => Self::Float(None),
            FieldType::Bool => Self::Bool(None),
        }
    }
}

/// A statement under construction.
#[derive(Debug, Default, Clone)]
pub(crate) struct Sql {
    pub(crate) text: String,
    pub(crate) args: Vec<Arg>,
}

impl Sql {
    pub(crate) fn new(text: impl Into<String>) -> Self {
        Self { text: text.into(), args: Vec::new() }
    }

    pub(crate) fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    /// Binds `arg` and returns its placeholder, for use anywhere later.
    pub(crate) fn bind(&mut self, arg: Arg) -> String {
        self.args.push(arg);
        format!("${}", self.args.len())
    }

    /// Binds `arg` and writes its placeholder.
    pub(crate) fn arg(&mut self, arg: Arg) -> &mut Self {
        let placeholder = self.bind(arg);
        self.push(&placeholder)
    }

    /// The statement to run, borrowing this one's text and values.
    pub(crate) fn statement(&self) -> Statement<'_> {
        let mut statement = Statement::with_capacity(self.text.as_str(), self.args.len());
        for arg in &self.args {
            statement.push(match arg {
                Arg::Text(v) => kes_sql::Arg::Text(v.as_deref()),
                Arg::Int(v) => kes_sql::Arg::Int(*v),
                Arg::Float(v) => kes_sql::Arg::Float(*v),
                Arg::Bool(v) => kes_sql::Arg::Bool(*v),
            });
        }
        statement
    }
}

/// The quoted column of a field (`id` is the key column).
pub(crate) fn column(field: &Field) -> String {
    if field.name == ID_FIELD { "id".to_owned() } else { format!("\"{}\"", field.name) }
}

/// The hidden column holding the lower-cased text of a searchable field:
/// lower-cased in Rust, so that `q` folds case exactly like the core's
/// semantics (Unicode, not only ASCII) in both dialects.
pub(crate) fn search_column(field: &Field) -> String {
    format!("\"_lc_{}\"", field.name)
}

/// What a row stores in the search column of `field` (see
/// [`search_column`]): its text lower-cased, or NULL. Every writer (the
/// upserts and the rebuild's `COPY`) takes it from here.
pub(crate) fn search_value(row: Option<&Row>, field: &Field) -> Option<String> {
    match row?.get(&field.name) {
        Some(FieldValue::Text(t)) => Some(t.to_lowercase()),
        _ => None,
    }
}

/// The SQL type of a field's column.
pub(crate) fn column_type(dialect: Dialect, ty: FieldType) -> &'static str {
    match (dialect, ty) {
        // "C" compares by byte, which for UTF-8 is code-point order.
        (Dialect::Postgres, FieldType::Text | FieldType::Keyword) => "TEXT COLLATE \"C\"",
        (Dialect::Postgres, FieldType::Integer | FieldType::Timestamp) => "BIGINT",
        (Dialect::Postgres, FieldType::Float) => "DOUBLE PRECISION",
        (Dialect::Postgres, FieldType::Bool) => "BOOLEAN",
        // SQLite's default BINARY collation is already code-point order.
        (Dialect::Sqlite, FieldType::Text | FieldType::Keyword) => "TEXT",
        (Dialect::Sqlite, FieldType::Integer | FieldType::Timestamp) => "INTEGER",
        (Dialect::Sqlite, FieldType::Float) => "REAL",
        (Dialect::Sqlite, FieldType::Bool) => "BOOLEAN",
    }
}

fn filter(sql: &mut Sql, f: &ValidFilter) {
    let col = column(&f.field);
    let first = Arg::of(&f.values[0]);
    let cmp = |sql: &mut Sql, op: &str| {
        sql.push(&col).push(op);
        sql.arg(first.clone());
    };
    match f.op {
        FilterOp::Eq => cmp(sql, " = "),
        FilterOp::Ne => cmp(sql, " <> "),
        FilterOp::Gt => cmp(sql, " > "),
        FilterOp::Gte => cmp(sql, " >= "),
        FilterOp::Lt => cmp(sql, " < "),
        FilterOp::Lte => cmp(sql, " <= "),
        FilterOp::In => {
            sql.push(&col).push(" IN (");
            for (i, v) in f.values.iter().enumerate() {
                if i > 0 {
                    sql.push(", ");
                }
                sql.arg(Arg::of(v));
            }
            sql.push(")");
        }
        // A range instead of LIKE: case-sensitive in both dialects (SQLite's
        // LIKE folds ASCII case), free of wildcards, and it can use the index.
        FilterOp::Prefix => {
            let FieldValue::Text(prefix) = &f.values[0] else {
                sql.push("1 = 0");
                return;
            };
            sql.push("(").push(&col).push(" >= ").arg(Arg::Text(Some(prefix.clone())));
            if let Some(bound) = kes_core::prefix_upper_bound(prefix) {
                sql.push(" AND ").push(&col).push(" < ").arg(Arg::Text(Some(bound)));
            }
            sql.push(")");
        }
    }
}

fn cond(sql: &mut Sql, c: &Cond) {
    match c {
        Cond::False => {
            sql.push("1 = 0");
        }
        Cond::And(all) | Cond::Or(all) if all.is_empty() => {
            sql.push(if matches!(c, Cond::And(_)) { "1 = 1" } else { "1 = 0" });
        }
        Cond::And(all) | Cond::Or(all) => {
            let join = if matches!(c, Cond::And(_)) { " AND " } else { " OR " };
            sql.push("(");
            for (i, part) in all.iter().enumerate() {
                if i > 0 {
                    sql.push(join);
                }
                cond(sql, part);
            }
            sql.push(")");
        }
        Cond::Cmp { field, op, value } => {
            let op = match op {
                FilterOp::Gt => " > ",
                FilterOp::Lt => " < ",
                _ => " = ",
            };
            sql.push(&column(field)).push(op).arg(Arg::of(value));
        }
        Cond::IsNull(field) => {
            sql.push(&column(field)).push(" IS NULL");
        }
    }
}

/// Appends ` WHERE …` for the rows a query matches, ignoring paging.
fn matching(sql: &mut Sql, dialect: Dialect, schema: &ViewSchema, query: &ValidQuery) {
    sql.push(" WHERE _live");
    for f in &query.filters {
        sql.push(" AND ");
        filter(sql, f);
    }
    if let Some(q) = &query.q {
        let searchable: Vec<&Field> = schema.fields.iter().filter(|f| f.searchable).collect();
        if searchable.is_empty() {
            sql.push(" AND 1 = 0");
        } else {
            let placeholder = sql.bind(Arg::Text(Some(q.to_lowercase())));
            // strpos/instr: a plain substring test, no wildcards to escape.
            let contains = match dialect {
                Dialect::Postgres => "strpos",
                Dialect::Sqlite => "instr",
            };
            sql.push(" AND (");
            for (i, f) in searchable.iter().enumerate() {
                if i > 0 {
                    sql.push(" OR ");
                }
                let _ = write!(sql.text, "{contains}({}, {placeholder}) > 0", search_column(f));
            }
            sql.push(")");
        }
    }
}

/// The statement counting every row `query` matches.
pub(crate) fn count(dialect: Dialect, table: &str, schema: &ViewSchema, query: &ValidQuery) -> Sql {
    let mut sql = Sql::new(format!("SELECT COUNT(*) FROM {table}"));
    matching(&mut sql, dialect, schema, query);
    sql
}

/// The statement reading one page plus one row (to know whether a next
/// page exists): `id`, `_version`, then every field in schema order.
pub(crate) fn page(dialect: Dialect, table: &str, schema: &ViewSchema, query: &ValidQuery, offset: u64) -> Sql {
    let keyset = query.keyset();
    let limit = Arg::Int(Some(i64::from(query.page_size) + 1));
    let mut sql = Sql::default();
    // The keyset condition ORs "beyond the cursor" with "missing": no index
    // range can serve it, so a deep page would scan every row before the
    // cursor. When the cursor has a value for the leading sort field, split
    // the rows in two index-friendly halves instead: those with a value from
    // the cursor's on (`field >= v`, a range on the `(field, id)` index),
    // then those missing it (`field IS NULL`), each ordered and limited.
    let leading = match (&query.after, query.sort.first()) {
        (Some(Cursor::Keys(keys)), Some(first)) if first.field.name != ID_FIELD => {
            keys.first().cloned().flatten().map(|v| (first, v))
        }
        _ => None,
    };
    match (leading, &keyset) {
        (Some((first, value)), Some(keyset)) => {
            let op = if first.descending { " <= " } else { " >= " };
            sql.push("SELECT * FROM (");
            select(&mut sql, dialect, table, schema, query);
            sql.push(" AND ").push(&column(&first.field)).push(op).arg(Arg::of(&value)).push(" AND ");
            cond(&mut sql, keyset);
            order_by(&mut sql, query);
            sql.push(" LIMIT ").arg(limit.clone());
            sql.push(") AS beyond UNION ALL SELECT * FROM (");
            select(&mut sql, dialect, table, schema, query);
            sql.push(" AND ").push(&column(&first.field)).push(" IS NULL");
            order_by(&mut sql, query);
            sql.push(" LIMIT ").arg(limit.clone());
            sql.push(") AS missing");
        }
        _ => {
            select(&mut sql, dialect, table, schema, query);
            if let Some(keyset) = &keyset {
                sql.push(" AND ");
                cond(&mut sql, keyset);
            }
        }
    }
    order_by(&mut sql, query);
    sql.push(" LIMIT ").arg(limit);
    if offset > 0 {
        sql.push(" OFFSET ").arg(Arg::Int(Some(i64::try_from(offset).unwrap_or(i64::MAX))));
    }
    sql
}

/// `SELECT id, _version, fields… FROM table WHERE <matching>`.
fn select(sql: &mut Sql, dialect: Dialect, table: &str, schema: &ViewSchema, query: &ValidQuery) {
    sql.push("SELECT id, _version");
    for f in &schema.fields {
        sql.push(", ").push(&column(f));
    }
    let _ = write!(sql.text, " FROM {table}");
    matching(sql, dialect, schema, query);
}

fn order_by(sql: &mut Sql, query: &ValidQuery) {
    sql.push(" ORDER BY ");
    for (i, key) in query.sort.iter().enumerate() {
        if i > 0 {
            sql.push(", ");
        }
        sql.push(&column(&key.field));
        // Missing values last in both directions, as the core orders them.
        sql.push(if key.descending { " DESC NULLS LAST" } else { " ASC NULLS LAST" });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kes_core::{Field, ListQuery, Row};

    fn schema() -> ViewSchema {
        ViewSchema::new("items", 1)
            .field(Field::text("name").filterable().sortable().searchable())
            .field(Field::integer("n").filterable().sortable())
            .field(Field::text("note").searchable())
    }

    #[test]
    fn values_are_bound_never_spliced() {
        let evil = "x'; DROP TABLE items; --";
        let q = ListQuery::new()
            .filter("name", FilterOp::Eq, evil)
            .filter("name", FilterOp::Prefix, evil)
            .search(evil)
            .validate(&schema())
            .unwrap();
        for dialect in [Dialect::Postgres, Dialect::Sqlite] {
            let sql = page(dialect, "view_items", &schema(), &q, 0);
            assert!(!sql.text.contains("DROP"), "{}", sql.text);
            assert!(sql.args.contains(&Arg::Text(Some(evil.to_owned()))));
            assert!(sql.args.contains(&Arg::Text(Some(evil.to_lowercase()))));
        }
    }

    #[test]
    fn search_reuses_one_parameter_across_fields() {
        let q = ListQuery::new().search("Ab").validate(&schema()).unwrap();
        let sql = count(Dialect::Sqlite, "t", &schema(), &q);
        assert_eq!(
            sql.text,
            "SELECT COUNT(*) FROM t WHERE _live AND (instr(\"_lc_name\", $1) > 0 OR instr(\"_lc_note\", $1) > 0)"
        );
        assert_eq!(sql.args, vec![Arg::Text(Some("ab".into()))]);
    }

    #[test]
    fn keyset_pages_render_the_cursor_condition_and_nulls_last() {
        let s = schema();
        let first = ListQuery::new().sort_by("-n").page_size(2).validate(&s).unwrap();
        let after = |row: &Row| {
            ListQuery::new().sort_by("-n").page_size(2).after(first.cursor_after("b", row)).validate(&s).unwrap()
        };
        // After a row missing `n`: only rows missing it too, by id.
        let sql = page(Dialect::Postgres, "t", &s, &after(&Row::new()), 0);
        assert_eq!(
            sql.text,
            "SELECT id, _version, \"name\", \"n\", \"note\" FROM t WHERE _live AND ((\"n\" IS NULL AND id > $1)) \
             ORDER BY \"n\" DESC NULLS LAST, id ASC NULLS LAST LIMIT $2"
        );
        assert_eq!(sql.args[1], Arg::Int(Some(3)));
        // After a value: the rows from it on, then the rows missing it.
        let mut row = Row::new();
        row.insert("n".into(), 7.into());
        let sql = page(Dialect::Sqlite, "t", &s, &after(&row), 0);
        assert!(sql.text.starts_with("SELECT * FROM (SELECT id, _version"), "{}", sql.text);
        assert!(sql.text.contains(" AND \"n\" <= $1 AND ((\"n\" < $2 OR \"n\" IS NULL) OR (\"n\" = $3 AND id > $4))"));
        assert!(sql.text.contains(") AS beyond UNION ALL SELECT * FROM ("));
        assert!(
            sql.text
                .contains(" AND \"n\" IS NULL ORDER BY \"n\" DESC NULLS LAST, id ASC NULLS LAST LIMIT $6) AS missing")
        );
        assert!(sql.text.ends_with(") AS missing ORDER BY \"n\" DESC NULLS LAST, id ASC NULLS LAST LIMIT $7"));
    }
}
