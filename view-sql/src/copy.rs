//! PostgreSQL's `COPY … FROM STDIN` in its text format: how a rebuild
//! inserts the rows a fresh shadow copy does not hold yet.
//!
//! `COPY` cannot update a row, so it carries only the rows of aggregates new
//! to the shadow ([`kes_core::ViewStore::write_shadow_fenced`]); the primary
//! key refuses one that is there after all, and the batch is then written
//! again as upserts. It skips what an `INSERT … SELECT FROM UNNEST(…) ON
//! CONFLICT` costs per row: the arrays' decoding, the set-returning
//! function, and the conflict check's speculative insertion.
//!
//! In the text format a row is one line, its values separated by tabs,
//! `\N` for NULL, and backslash escapes for a backslash, tab, newline and
//! carriage return in a value. Every value is written as PostgreSQL's
//! input function of its column reads it back exactly: integers and
//! timestamps (micros) in decimal, floats as Rust's shortest text that
//! parses back to the same bits (`NaN` and the infinities by name), booleans
//! as `t` and `f`. NUL cannot be sent, nor stored in PostgreSQL text: the
//! view refuses it before a write (`SqlView::checks`).

use std::io::Write as _;

use kes_core::{FieldType, FieldValue, RowChange, ViewSchema};

use crate::error::SqlViewError;

/// A `COPY` statement and the rows it sends.
pub(crate) struct CopyRows {
    pub(crate) statement: String,
    pub(crate) data: Vec<u8>,
}

/// The `COPY` of `changes` into `table`, whose `columns` are the id, the
/// version, the state, the live flag, the view's fields and then its
/// searchable fields' lower-cased copies, in that order (as
/// `SqlView::columns` gives them).
pub(crate) fn copy_rows(
    table: &str,
    columns: &[String],
    schema: &ViewSchema,
    changes: &[RowChange],
) -> Result<CopyRows, SqlViewError> {
    let searchable: Vec<_> = schema.fields.iter().filter(|f| f.searchable).collect();
    // About what a row of the state's size and its fields takes.
    let guess = changes.iter().map(|c| c.id.len() + 2 * c.state.get().len() + 16 * columns.len()).sum();
    let mut data = Vec::with_capacity(guess);
    for change in changes {
        let version = i64::try_from(change.version)
            .map_err(|_| SqlViewError::Corrupt { id: change.id.clone(), reason: "version too large".into() })?;
        text(&mut data, &change.id);
        data.push(b'\t');
        integer(&mut data, version);
        data.push(b'\t');
        text(&mut data, change.state.get());
        data.extend_from_slice(if change.row.is_some() { b"\tt" } else { b"\tf" });
        for field in &schema.fields {
            data.push(b'\t');
            value(&mut data, field.ty, change.row.as_ref().and_then(|r| r.get(&field.name)));
        }
        for field in &searchable {
            data.push(b'\t');
            match crate::sql::search_value(change.row.as_ref(), field) {
                Some(lowered) => text(&mut data, &lowered),
                None => data.extend_from_slice(NULL),
            }
        }
        data.push(b'\n');
    }
    Ok(CopyRows { statement: format!("COPY {table} ({}) FROM STDIN", columns.join(", ")), data })
}

const NULL: &[u8] = b"\\N";

/// `value` in a column of type `ty`: NULL when absent or of another type
/// (a row was checked against the schema, so it is the column's), as the
/// array upserts store it.
fn value(out: &mut Vec<u8>, ty: FieldType, value: Option<&FieldValue>) {
    match (ty, value) {
        (FieldType::Text | FieldType::Keyword, Some(FieldValue::Text(t))) => text(out, t),
        (FieldType::Integer, Some(FieldValue::Integer(i))) => integer(out, *i),
        (FieldType::Timestamp, Some(t @ FieldValue::Timestamp(_))) => match t.as_micros() {
            Some(micros) => integer(out, micros),
            None => out.extend_from_slice(NULL),
        },
        (FieldType::Float, Some(FieldValue::Float(f))) => float(out, *f),
        (FieldType::Bool, Some(FieldValue::Bool(b))) => out.push(if *b { b't' } else { b'f' }),
        _ => out.extend_from_slice(NULL),
    }
}

/// `t` with the text format's escapes.
fn text(out: &mut Vec<u8>, t: &str) {
    let bytes = t.as_bytes();
    let mut from = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped = match b {
            b'\\' => b'\\',
            b'\t' => b't',
            b'\n' => b'n',
            b'\r' => b'r',
            _ => continue,
        };
        out.extend_from_slice(&bytes[from..i]);
        out.extend_from_slice(&[b'\\', escaped]);
        from = i + 1;
    }
    out.extend_from_slice(&bytes[from..]);
}

fn integer(out: &mut Vec<u8>, i: i64) {
    // Writing into a `Vec` cannot fail.
    let _ = write!(out, "{i}");
}

fn float(out: &mut Vec<u8>, f: f64) {
    if f.is_nan() {
        out.extend_from_slice(b"NaN");
    } else if f.is_infinite() {
        out.extend_from_slice(if f > 0.0 { b"Infinity" } else { b"-Infinity" });
    } else {
        // Rust's shortest text that reads back as the same bits.
        let _ = write!(out, "{f}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(t: &str) -> String {
        let mut out = Vec::new();
        text(&mut out, t);
        String::from_utf8(out).expect("utf-8")
    }

    fn floated(f: f64) -> String {
        let mut out = Vec::new();
        float(&mut out, f);
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn text_escapes_the_separators_and_the_backslash_only() {
        assert_eq!(escaped("plain Grüße \"q\""), "plain Grüße \"q\"");
        assert_eq!(escaped("a\tb\nc\rd\\e"), "a\\tb\\nc\\rd\\\\e");
        assert_eq!(escaped("\\."), "\\\\.");
        assert_eq!(escaped("\\N"), "\\\\N");
        assert_eq!(escaped(""), "");
    }

    #[test]
    fn floats_read_back_as_the_same_bits() {
        for f in [0.1, -0.0, 1e300, 5e-324, f64::MAX, f64::MIN_POSITIVE, 1.0 / 3.0] {
            let text = floated(f);
            assert_eq!(text.parse::<f64>().expect("a float").to_bits(), f.to_bits(), "{text}");
        }
        assert_eq!(floated(f64::NAN), "NaN");
        assert_eq!(floated(f64::INFINITY), "Infinity");
        assert_eq!(floated(f64::NEG_INFINITY), "-Infinity");
    }
}
