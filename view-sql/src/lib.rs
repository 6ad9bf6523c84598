//! # kes-view-sql
//!
//! List views of KES in PostgreSQL or SQLite: [`SqlView`] stores the rows a
//! [`kes_core::ViewProjection`] derives from the log in a table built from a
//! [`kes_core::ViewSchema`], and answers [`kes_core::ListQuery`]s (filters,
//! multi-key sorts, keyset paging, totals, case-insensitive `q`) with exactly
//! the rows and order of the core's reference [`kes_core::InMemoryView`].
//!
//! - **Storage**: a table per view copy, `view_{name}` (live) and
//!   `shadow_{name}` (while rebuilding), with `id` (primary key),
//!   `_version`, `_state` (the aggregate state as JSON text), `_live`
//!   (false once the aggregate is deleted: its state stays, its row leaves
//!   the lists) and one typed column per field (text/keyword `TEXT`,
//!   integer `BIGINT`, float `DOUBLE PRECISION`/`REAL`, bool `BOOLEAN`,
//!   timestamp `BIGINT` microseconds since the epoch), plus a lower-cased
//!   copy of each searchable field for `q`. Filterable and sortable fields
//!   get an index on `(field, id)`. Each copy's checkpoint lives in
//!   `kes_view_checkpoints`.
//! - **Writes**: rows and checkpoint in one transaction, so a crash can
//!   neither lose nor double-apply a batch. PostgreSQL upserts a batch with
//!   one `INSERT … SELECT FROM UNNEST(…)` (a bound array per column: the
//!   statement text stays the same whatever the batch size); SQLite with
//!   multi-row `VALUES`.
//! - **Several writers**: a view's lease lives in `kes_view_leases` (one row
//!   per view: `lease_owner`, `lease_until` in seconds since the epoch by the
//!   database clock — PostgreSQL `clock_timestamp()`, SQLite
//!   `julianday('now')` — and `fence`, bumped by every
//!   [`kes_core::ViewStore::acquire_lease`]). A free, expired or own lease
//!   is taken by one `INSERT … ON CONFLICT DO UPDATE … WHERE … RETURNING`.
//!   [`kes_core::ViewStore::write_fenced`] and
//!   [`kes_core::ViewStore::swap_fenced`] start their transaction with
//!   `UPDATE kes_view_leases SET fence = fence WHERE view_name = … AND
//!   lease_owner = … AND fence = …`, which locks the row until the commit
//!   (a takeover waits for it, or it waits for the takeover and then
//!   matches nothing); 0 rows is [`SqlViewError::Fenced`] and nothing is
//!   written. A fenced write also refuses to move the copy's checkpoint
//!   back. A lease read at the start of a transaction would not fence: the
//!   update is the fence. PostgreSQL connections set
//!   `idle_in_transaction_session_timeout` (default 2 s,
//!   [`SqlViewConfig::idle_in_transaction_timeout`]) below the lease, so
//!   that a stalled writer's transaction does not hold the row for long.
//!   Plain [`kes_core::ViewStore::write`] stays unfenced (one writer).
//! - **Rebuilds**: a fresh shadow table is filled while the live one keeps
//!   answering. It has only its primary key while it is filled, and, in
//!   PostgreSQL, its transactions (the one that makes it, its batches, its
//!   indexes and statistics) commit without waiting for the WAL flush
//!   (`synchronous_commit = off`: a crash may lose the last batches, whole,
//!   rows and checkpoint together, and the next rebuild drops the shadow
//!   anyway). On PostgreSQL the rows of aggregates new to the shadow, most
//!   of a rebuild, go in by `COPY … FROM STDIN`
//!   ([`kes_core::ViewStore::write_shadow_fenced`]), the others by the
//!   upsert, in the batch's one transaction; a row the shadow holds after
//!   all fails the `COPY` on the primary key, and the batch is written
//!   again as upserts. [`kes_core::ViewStore::prepare_swap`] then creates
//!   the `(field, id)` indexes over the full table (cheaper than keeping
//!   them up to date row by row; on PostgreSQL two at a time, on two
//!   connections, named after the table's OID and made `IF NOT EXISTS` so
//!   that a second call completes what a first one cut short) and analyses
//!   it (PostgreSQL). [`kes_core::ViewStore::swap`] (which makes the
//!   indexes itself when none were) drops the live table and renames the
//!   shadow, in one transaction whose synchronous commit also makes the
//!   shadow's earlier transactions durable.
//! - **Queries**: identifiers come only from the validated schema, every
//!   value is a bound parameter; text compares by code point (`COLLATE "C"`
//!   in PostgreSQL, `BINARY` in SQLite), missing values sort last in both
//!   directions, `id` breaks ties.
//!
//! ## Decisions
//!
//! - **Search** (`q`) tests each searchable field with `strpos` (PostgreSQL)
//!   or `instr` (SQLite) against a column lower-cased in Rust: the same
//!   Unicode case folding as the core's semantics in both dialects, and no
//!   `LIKE` wildcards to escape. It scans; full-text search is the job of
//!   `kes-view-search`.
//! - **`prefix`** is a range (`>= p AND < p'`, `p'` = `p` with its last code
//!   point stepped): case-sensitive in both dialects (SQLite's `LIKE` folds
//!   ASCII case) and served by the `(field, id)` index.
//! - **Keyset pages** whose cursor has a value for the leading sort field
//!   read two index ranges (from the cursor's value on, then the rows
//!   missing it) joined by `UNION ALL`, so a deep page costs what the first
//!   one does; `total` is a separate `COUNT(*)` in the same snapshot
//!   (PostgreSQL `REPEATABLE READ`), and is what large pages spend most of
//!   their time on.
//! - **Swaps while queries run**: PostgreSQL's `DROP TABLE` waits for
//!   readers of the old copy and re-resolves waiting queries' table names
//!   after the commit, and it re-analyses cached prepared statements whose
//!   table changed; SQLite readers keep their WAL snapshot and re-prepare
//!   on a schema change. A page that still meets a missing table is retried
//!   once.
//! - **Schema versions**: opening a view whose stored copy was built with
//!   another schema adds the missing columns to it, so that the old copy
//!   keeps answering (new fields missing) until the projection runner's
//!   rebuild swaps in a copy built from the new schema.
//! - **SQLite** runs in WAL mode with one writer connection and a pool of
//!   readers.
//!
//! ## Example
//!
//! ```
//! use kes_core::{Checkpoint, Field, FilterOp, ListQuery, ListView, Row, RowChange, ViewCopy, ViewSchema, ViewStore};
//! use kes_view_sql::SqlView;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let schema = ViewSchema::new("projects", 1)
//!     .field(Field::text("name").filterable().sortable().searchable())
//!     .field(Field::integer("budget").filterable().sortable());
//! let view = SqlView::open("sqlite::memory:", schema).await?;
//!
//! let mut row = Row::new();
//! row.insert("name".into(), "Apollo".into());
//! row.insert("budget".into(), 250.into());
//! let state = RowChange::state_of(&serde_json::json!({}))?;
//! let change = RowChange { id: "p-1".into(), version: 1, state, row: Some(row) };
//! view.write(ViewCopy::Live, &[change], &Checkpoint::start()).await?;
//!
//! let page = view.list(&ListQuery::new().filter("budget", FilterOp::Gte, "100").sort_by("-budget")).await?;
//! assert_eq!((page.total, page.items[0].id.as_str()), (1, "p-1"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! ## Features
//!
//! | feature | what it adds |
//! |---|---|
//! | (none) | both dialects are always built: the workspace's sqlx carries the `postgres` and `sqlite` drivers |

mod copy;
mod error;
mod sql;
mod view;

pub use error::SqlViewError;
pub use sql::Dialect;
pub use view::{DEFAULT_URL, SqlView, SqlViewConfig};
