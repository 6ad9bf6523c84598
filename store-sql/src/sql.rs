//! The statements both dialects run, and how their rows become envelopes.
//!
//! Every statement uses `$n` placeholders, which PostgreSQL and SQLite both
//! understand, and only syntax the two share (`ON CONFLICT … DO UPDATE`,
//! `CAST(… AS TEXT)`, scalar subqueries, multi-row `VALUES`, `WITH … AS
//! (VALUES …)`), so that the store has one code path. What differs lives in
//! `store.rs`: how an append transaction starts (an advisory lock on
//! PostgreSQL, `BEGIN IMMEDIATE` on SQLite), whether a batch's events and
//! table rows are written by one statement (PostgreSQL, which allows an
//! `INSERT` inside `WITH`) or two, and the migrations.

use chrono::{DateTime, Utc};
use kes_core::{Metadata, Position, RawEnvelope, StoreError};
use kes_sql::DbRow;
use uuid::Uuid;

/// Columns read back for an envelope, in the order [`envelope_from_row`]
/// expects them. `CAST` turns PostgreSQL's JSONB into text so that one
/// decoder serves both dialects.
const ENVELOPE_COLUMNS: &str = "position, aggregate_id, version, command_end, event_id, event_type, revision, \
     payload, CAST(metadata AS TEXT), recorded_at";

/// Everything the appends of one batch need to decide, read in one round
/// trip once the log is held: per request (in request order, `n` = 0, 1…)
/// the stream's version, the log's next position, what an earlier append
/// with the request's retry key answered, and the table row. `$1` is the
/// aggregate type; request `n` binds its id and retry key as `$(2n+2)` and
/// `$(2n+3)`. The latest version and position are read as `ORDER BY … DESC
/// LIMIT 1` rather than `MAX`: both are one backward index step, but only
/// this form keeps it in PostgreSQL's generic plan, so the prepared
/// statement stops being planned again at every execution. Each value is
/// its own sub-select, one index lookup per request, rather than a join:
/// without statistics PostgreSQL may join the requests to every event of
/// the type (see the migration `0005_append_plans`).
pub(crate) fn append_prepare(requests: usize) -> String {
    let mut sql = String::from("WITH req(n, id, k) AS (VALUES ");
    for n in 0..requests {
        if n > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("({n}, ${}, ${})", 2 * n + 2, 2 * n + 3));
    }
    sql.push_str(
        ") SELECT CAST(req.n AS BIGINT), \
         COALESCE((SELECT e.version FROM kes_events AS e \
          WHERE e.aggregate_type = $1 AND e.aggregate_id = req.id ORDER BY e.version DESC LIMIT 1), 0), \
         COALESCE((SELECT e.position + 1 FROM kes_events AS e \
          WHERE e.aggregate_type = $1 ORDER BY e.position DESC LIMIT 1), 0), \
         (SELECT kv.version FROM kes_events AS kv WHERE kv.aggregate_type = $1 AND kv.aggregate_id = req.id \
          AND kv.idempotency_key IS NOT NULL AND kv.idempotency_key = req.k), \
         (SELECT kv.position FROM kes_events AS kv WHERE kv.aggregate_type = $1 AND kv.aggregate_id = req.id \
          AND kv.idempotency_key IS NOT NULL AND kv.idempotency_key = req.k), \
         (SELECT s.version FROM kes_aggregates AS s WHERE s.aggregate_type = $1 AND s.aggregate_id = req.id), \
         (SELECT CAST(s.state AS TEXT) FROM kes_aggregates AS s WHERE s.aggregate_type = $1 AND s.aggregate_id = req.id) \
         FROM req ORDER BY req.n",
    );
    sql
}

/// Startup parameters of every PostgreSQL session of the store: its
/// statements are planned with index paths only. Each of them is answered
/// by an index; a plan a session cached while the log was empty or
/// analysed empty (prepared statements settle on one after a few
/// executions) would otherwise scan the whole log on every append or read
/// until the table is analysed again, or the session replaced. The append
/// functions carry the same settings (the migration `0005_append_plans`).
pub(crate) const PG_INDEX_PLANS: &[(&str, &str)] = &[("enable_seqscan", "off"), ("enable_bitmapscan", "off")];

/// Run right after `BEGIN` of an append transaction on PostgreSQL, in the
/// same round trip (a simple-query batch, hence the name as a quoted
/// literal rather than a parameter): serialises appends of aggregate type
/// `name` until the transaction ends. The
/// lock is taken before the next position is read, so positions are handed
/// out in commit order and a reader never sees position n+1 without n. The
/// key includes the schema so that stores in different schemas do not wait
/// on each other.
pub(crate) fn pg_append_lock(name: &str) -> String {
    format!(
        "SELECT pg_advisory_xact_lock(hashtextextended('kes_events/' || current_schema() || '/' || '{}', 0))",
        name.replace('\'', "''")
    )
}

/// PostgreSQL only: one append whose state the writer already holds, in one
/// call (the function is made by the migration `0003_append_function`).
/// Returns the first position written, or -1 when the stream was not at the
/// version given or the retry key was used.
pub(crate) const APPEND_CURRENT: &str = "SELECT kes_append_current($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

/// Several appends in one round trip: the batch form of
/// [`APPEND_CURRENT`] (see the migration `0004_append_batch_function`).
/// Returns the first position written, or -1 when any stream was not at
/// the version given or any retry key was used.
pub(crate) const APPEND_BATCH: &str =
    "SELECT kes_append_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)";

/// Columns of one inserted event (see [`insert_events`]).
pub(crate) const INSERT_COLUMNS: usize = 12;

/// Events inserted per statement: below both dialects' limits on bound
/// parameters (32766 for SQLite, 65535 for PostgreSQL).
pub(crate) const EVENTS_PER_INSERT: usize = 1000;

/// Appends `rows` rows of `columns` placeholders each, numbered from
/// `$(after + 1)`.
fn push_rows(sql: &mut String, rows: usize, columns: usize, after: usize) {
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for col in 0..columns {
            if col > 0 {
                sql.push_str(", ");
            }
            sql.push('$');
            sql.push_str(&(after + row * columns + col + 1).to_string());
        }
        sql.push(')');
    }
}

/// PostgreSQL only: [`insert_events`] and [`upsert_states`] in one
/// statement (a data-modifying `WITH`), so one round trip writes a batch.
/// The events' parameters come first, then the table rows'.
pub(crate) fn insert_events_and_states(events: usize, states: usize) -> String {
    format!("WITH ev AS ({}) {}", insert_events(events), upsert_states_after(states, events * INSERT_COLUMNS))
}

/// A multi-row insert of `rows` events.
pub(crate) fn insert_events(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO kes_events (aggregate_type, position, aggregate_id, version, command_end, event_id, \
         event_type, revision, payload, metadata, recorded_at, idempotency_key) VALUES ",
    );
    push_rows(&mut sql, rows, INSERT_COLUMNS, 0);
    sql
}

/// Columns of one table row written by [`upsert_states`].
pub(crate) const STATE_COLUMNS: usize = 5;

/// Writes the table rows of `rows` aggregates (distinct ids) after their
/// appends: aggregate type, id, version, state, updated-at per row.
pub(crate) fn upsert_states(rows: usize) -> String {
    upsert_states_after(rows, 0)
}

fn upsert_states_after(rows: usize, after: usize) -> String {
    let mut sql =
        String::from("INSERT INTO kes_aggregates (aggregate_type, aggregate_id, version, state, updated_at) VALUES ");
    push_rows(&mut sql, rows, STATE_COLUMNS, after);
    sql.push_str(
        " ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET \
         version = excluded.version, state = excluded.state, updated_at = excluded.updated_at",
    );
    sql
}

/// Writes back a table row rebuilt by replay, unless an append moved it on
/// meanwhile.
pub(crate) const REPAIR_STATE: &str = "INSERT INTO kes_aggregates (aggregate_type, aggregate_id, version, state, \
    updated_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET \
    version = excluded.version, state = excluded.state, updated_at = excluded.updated_at \
    WHERE kes_aggregates.version <= excluded.version";

/// Table rows rebuilt from the log at start ([`REPAIR_STATE`] for `rows`
/// aggregates): an append that moved a row on meanwhile keeps its row.
pub(crate) fn repair_states(rows: usize) -> String {
    let mut sql = upsert_states(rows);
    sql.push_str(" WHERE kes_aggregates.version <= excluded.version");
    sql
}

/// The state version an aggregate type's table rows were built by.
pub(crate) const RECORDED_STATE_VERSION: &str =
    "SELECT state_version FROM kes_state_versions WHERE aggregate_type = $1";

/// Whether an aggregate type has any table row.
pub(crate) const ANY_STATE: &str = "SELECT version FROM kes_aggregates WHERE aggregate_type = $1 LIMIT 1";

/// Drops an aggregate type's table rows (they are rebuilt from the log).
pub(crate) const DROP_STATES: &str = "DELETE FROM kes_aggregates WHERE aggregate_type = $1";

/// Records the state version an aggregate type's table rows are built by.
pub(crate) const RECORD_STATE_VERSION: &str = "INSERT INTO kes_state_versions (aggregate_type, state_version) \
    VALUES ($1, $2) ON CONFLICT (aggregate_type) DO UPDATE SET state_version = excluded.state_version";

/// The table row of one aggregate.
pub(crate) const LOAD_STATE: &str =
    "SELECT version, CAST(state AS TEXT) FROM kes_aggregates WHERE aggregate_type = $1 AND aggregate_id = $2";

/// What the append with a retry key answered.
pub(crate) const RECALL: &str = "SELECT version, position FROM kes_events \
    WHERE aggregate_type = $1 AND aggregate_id = $2 AND idempotency_key = $3";

/// The current version of one stream (0 when it does not exist).
pub(crate) const STREAM_VERSION: &str =
    "SELECT COALESCE(MAX(version), 0) FROM kes_events WHERE aggregate_type = $1 AND aggregate_id = $2";

/// The latest version (and last position) of every aggregate written in a
/// stretch of the log (`$2 <= position <= $3`).
pub(crate) const WRITTEN_BETWEEN: &str = "SELECT aggregate_id, MAX(version), MAX(position) FROM kes_events \
     WHERE aggregate_type = $1 AND position >= $2 AND position <= $3 GROUP BY aggregate_id";

/// The last position of the log (NULL when it is empty). One backward
/// step of the primary key, written as `ORDER BY … LIMIT 1` for the reason
/// [`append_prepare`] gives: a generic plan of `MAX` reads every event of
/// the type.
pub(crate) const HEAD: &str =
    "SELECT (SELECT position FROM kes_events WHERE aggregate_type = $1 ORDER BY position DESC LIMIT 1)";

/// One stream, oldest first.
pub(crate) fn read_stream() -> String {
    format!(
        "SELECT {ENVELOPE_COLUMNS} FROM kes_events WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY version"
    )
}

/// A page of one stream: at most `$4` events after version `$3`, oldest
/// first (served by the `(aggregate_type, aggregate_id, version)` key).
pub(crate) fn read_stream_page() -> String {
    format!(
        "SELECT {ENVELOPE_COLUMNS} FROM kes_events WHERE aggregate_type = $1 AND aggregate_id = $2 AND version > $3 \
         ORDER BY version LIMIT $4"
    )
}

/// A page of the log from a position on.
pub(crate) fn read_log() -> String {
    format!(
        "SELECT {ENVELOPE_COLUMNS} FROM kes_events WHERE aggregate_type = $1 AND position >= $2 \
         ORDER BY position LIMIT $3"
    )
}

/// The events of one command after `version` (when a page ended inside it).
pub(crate) fn read_command_rest() -> String {
    format!(
        "SELECT {ENVELOPE_COLUMNS} FROM kes_events WHERE aggregate_type = $1 AND aggregate_id = $2 \
         AND version > $3 AND version <= $4 ORDER BY version"
    )
}

/// One stored event before its payload is decoded, with the boundary of the
/// command it belongs to.
#[derive(Debug)]
pub(crate) struct StoredEvent {
    pub(crate) raw: RawEnvelope,
    /// Version of the last event of the same append.
    pub(crate) command_end: u64,
}

impl StoredEvent {
    /// Whether this is the last event of its command.
    pub(crate) fn ends_command(&self) -> bool {
        self.raw.version >= self.command_end
    }
}

/// Reads one row selected with the envelope columns. Any column that does
/// not decode is [`StoreError::Corrupt`], naming as much of the row as could
/// be read; never a panic.
pub(crate) fn envelope_from_row(row: &DbRow, aggregate: &str) -> Result<StoredEvent, StoreError> {
    let id: String = row.get(1).unwrap_or_default();
    let version: i64 = row.get(2).unwrap_or_default();
    let corrupt = |reason: String| StoreError::Corrupt {
        aggregate: aggregate.to_owned(),
        id: id.clone(),
        version: u64::try_from(version).unwrap_or(0),
        reason,
    };
    let column = |name: &str, e: sqlx::Error| corrupt(format!("column {name}: {e}"));
    let position: i64 = row.get(0).map_err(|e| column("position", e))?;
    let _: String = row.get(1).map_err(|e| column("aggregate_id", e))?;
    let version: u64 = row
        .get::<i64>(2)
        .map_err(|e| column("version", e))
        .and_then(|v| u64::try_from(v).map_err(|_| corrupt(format!("negative version {v}"))))?;
    let command_end: i64 = row.get(3).map_err(|e| column("command_end", e))?;
    let event_id: Uuid = row.get(4).map_err(|e| column("event_id", e))?;
    let event_type: String = row.get(5).map_err(|e| column("event_type", e))?;
    let revision: i64 = row.get(6).map_err(|e| column("revision", e))?;
    let payload: String = row.get(7).map_err(|e| column("payload", e))?;
    let metadata: String = row.get(8).map_err(|e| column("metadata", e))?;
    let recorded_at: DateTime<Utc> = row.get(9).map_err(|e| column("recorded_at", e))?;
    let metadata: Metadata =
        serde_json::from_str(&metadata).map_err(|e| corrupt(format!("metadata is not valid: {e}")))?;
    Ok(StoredEvent {
        raw: RawEnvelope {
            event_id,
            aggregate_type: aggregate.to_owned(),
            aggregate_id: id.clone(),
            version,
            event_type,
            revision: u32::try_from(revision).map_err(|_| corrupt(format!("revision {revision} out of range")))?,
            recorded_at,
            metadata,
            position: Position::new(
                0,
                u64::try_from(position).map_err(|_| corrupt(format!("negative position {position}")))?,
            ),
            payload: payload.into_bytes(),
        },
        command_end: u64::try_from(command_end).map_err(|_| corrupt(format!("negative command end {command_end}")))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregate_names_are_quoted_in_the_lock_statement() {
        assert!(pg_append_lock("it's").ends_with("'it''s', 0))"));
    }

    #[test]
    fn multi_row_insert_numbers_every_parameter_once() {
        let sql = insert_events(2);
        assert!(sql.ends_with("($13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24)"));
        assert_eq!(sql.matches('$').count(), 2 * INSERT_COLUMNS);
        const { assert!(EVENTS_PER_INSERT * INSERT_COLUMNS < 32_766) };
    }

    #[test]
    fn batch_statements_number_their_parameters() {
        let sql = append_prepare(3);
        assert!(sql.starts_with("WITH req(n, id, k) AS (VALUES (0, $2, $3), (1, $4, $5), (2, $6, $7)) SELECT"));
        let sql = upsert_states(2);
        assert!(sql.starts_with("INSERT INTO kes_aggregates"), "the gap-safety test looks for this prefix");
        assert!(sql.contains("VALUES ($1, $2, $3, $4, $5), ($6, $7, $8, $9, $10) ON CONFLICT"));
        let sql = insert_events_and_states(2, 1);
        assert!(sql.starts_with("WITH ev AS (INSERT INTO kes_events"));
        assert!(sql.contains("$24)) INSERT INTO kes_aggregates"));
        assert!(sql.contains("VALUES ($25, $26, $27, $28, $29) ON CONFLICT"));
    }
}
