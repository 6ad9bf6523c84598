//! # kes-store-sql
//!
//! The event store of KES in SQL: the append-only event log and the table of
//! latest states of each aggregate type, in an embedded SQLite file (the
//! default: `sqlite://data/events.db`) or in PostgreSQL (`postgres://…`).
//! One code path serves both dialects; only how an append takes the log for
//! writing differs.
//!
//! [`SqlStore`] implements [`kes_core::EventStore`] and passes the core's
//! conformance suite on both databases.
//!
//! ## Example
//!
//! ```
//! // `Ledger` is the small aggregate of the core's conformance suite.
//! use kes_core::conformance::{Ledger, LedgerEvent};
//! use kes_core::{EventStore, ExpectedVersion, Metadata};
//! use kes_store_sql::SqlStore;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let store = SqlStore::<Ledger>::open("sqlite::memory:").await?;
//! let events = vec![LedgerEvent::Opened, LedgerEvent::Added { amount: 5 }];
//! let appended = store.append("l-1", ExpectedVersion::NoStream, events, Metadata::default()).await?;
//! assert_eq!(appended.version, 2);
//!
//! let snapshot = store.load("l-1").await?.expect("written above");
//! assert_eq!((snapshot.version, snapshot.state.total), (2, 5));
//!
//! // A stale expected version is a typed conflict and appends nothing.
//! let stale = vec![LedgerEvent::Added { amount: 1 }];
//! let err = store.append("l-1", ExpectedVersion::Exact(1), stale, Metadata::default()).await.unwrap_err();
//! assert!(matches!(err, kes_core::StoreError::Conflict { actual: 2, .. }));
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! ## Layout
//!
//! All aggregate types share two tables (migrations embedded, applied at
//! open):
//!
//! - `kes_events`: one row per event — aggregate type and id, version,
//!   event id, type, revision, payload (the codec's JSON text), metadata
//!   (JSON), recorded-at, the event's `position` in its type's log, the
//!   version that ends its command, and the idempotency key on the last
//!   event of a command that carried one. `UNIQUE (aggregate_type,
//!   aggregate_id, version)` makes a stale append fail even across
//!   processes; a partial unique index keeps retry keys durable (they are
//!   kept as long as the events: forever).
//! - `kes_aggregates`: latest state (JSON) and version per aggregate,
//!   written in the same transaction as the events. It is disposable: a
//!   missing row, or one that no longer decodes because the aggregate's
//!   shape changed, is rebuilt from the log on `load` and written back.
//!
//! ## Positions and the order of the log
//!
//! Each aggregate type is one log with one partition (0); `position`
//! numbers its events 0, 1, 2… without gaps, and `head` is the last
//! position + 1, so projection lag is exact even when several aggregate
//! types share a database. Appends of one type are serialised — on
//! PostgreSQL by a transaction-level advisory lock taken before the next
//! position is read, on SQLite by its single writer — so positions are
//! handed out in commit order: a subscriber reading "everything after my
//! checkpoint" can never skip an event that commits late (the PostgreSQL
//! pitfall of sequences, which are not commit order). Appends of different
//! types, and all reads, run in parallel.
//!
//! `subscribe` delivers one item per append (all events of one command
//! together) in log order, then polls for new appends (every 50 ms by
//! default; appends through the same store wake it at once). A transient
//! failure is reported as an item and retried; a corrupt event ends the
//! stream with [`kes_core::StoreError::Corrupt`] rather than skip it.
//!
//! ## SQLite
//!
//! WAL mode, `synchronous = FULL` (an acknowledged append is on disk),
//! `busy_timeout` 10 s, one writer connection that starts every append with
//! `BEGIN IMMEDIATE` (so concurrent appends queue instead of failing with
//! `SQLITE_BUSY`, also across processes), and a pool of readers beside it.
//! The folder of the file is created when missing. `sqlite::memory:` runs
//! everything on one connection.
//!
//! ## Errors
//!
//! Opening fails with [`SqlStoreError`]; the `EventStore` methods sort
//! failures into [`kes_core::StoreError`]: a stale expected version or a
//! unique-key violation is `Conflict`, an unreachable server, a pool timeout
//! or a busy database is `Unavailable`, a row that does not decode is
//! `Corrupt` naming aggregate, id and version.
//!
//! ## Features
//!
//! | feature | what it adds |
//! |---|---|
//! | (none) | both dialects are always built in; the URL chooses at run time |

mod error;
mod sql;
mod store;

pub use error::SqlStoreError;
pub use store::{Dialect, SqlStore, SqlStoreBuilder};
