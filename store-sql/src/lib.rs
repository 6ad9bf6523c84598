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
//! ## Group commit
//!
//! Since the appends of one log are serialised anyway, a store writes them
//! in batches: an append is queued, and one writer task per store takes
//! everything queued as one batch and writes it in one transaction — one
//! lock, one read, one multi-row insert of the events, one multi-row upsert
//! of the table rows (on PostgreSQL both in one statement), one commit (one
//! disk flush). Appends that arrive
//! while a batch is being written form the next batch. A lone append is
//! written at once: no timer holds it back. Once queued, an append is
//! written even if its caller stops waiting for the answer.
//!
//! Each append of a batch is answered as if it had run alone after the
//! ones queued before it: its retry key is looked up in the log and among
//! the batch's earlier appends, its expected version is checked against the
//! database's version moved on by the batch's earlier appends to the same
//! aggregate, and positions are consecutive in request order. A conflict
//! fails that append only. If the batch's transaction fails before its
//! commit (say one append's data is refused by the database), nothing of it
//! was written and its appends are tried again one by one, so the others
//! still succeed. If the commit itself fails, every append of the batch
//! gets that error, as it would alone.
//!
//! ## One round trip per batch (PostgreSQL)
//!
//! A batch's transaction costs four round trips (`BEGIN` with the lock,
//! the batch read, the write, `COMMIT`). When a batch holds one append and
//! the store already holds the stream's state — its cache, or the empty
//! state of a stream the caller expects not to exist — the append is one
//! call of the server function `kes_append_current` (made by the
//! migration `0003_append_function`): it takes the same advisory lock,
//! checks that the stream is still at the cached version and that the
//! retry key is unused, writes the events and the table row, and commits.
//! When a check fails it writes nothing and the append is decided on the
//! general path above, which reads the stream; a stale cache therefore
//! costs one more round trip, never a wrong answer. The pools ping a
//! connection before use only when it idled for over a second
//! ([`kes_sql::pg_pool_options`]), so a lone append on a busy pool is one
//! round trip in all.
//!
//! A batch of several appends takes the same shortcut when the store
//! holds a guess at every stream's state and no stream comes twice: one
//! call of `kes_append_batch` (migration `0004_append_batch_function`)
//! checks every guess and retry key under the lock and writes every event
//! and table row, or writes nothing when any check fails, and the batch is
//! decided on the general path. The lock is then held for the call alone
//! instead of for four round trips; under many clients that lock is what
//! bounds the appends a second.
//!
//! ## Plans that hold as the log grows (PostgreSQL)
//!
//! A PostgreSQL session keeps the plans of its prepared statements and of
//! the server functions' statements once it has run them a few times. Made
//! while `kes_events` was empty, or analysed empty, such a plan scans the
//! table; made without statistics, it may join a batch's streams to every
//! event of the type. Either would then cost each append or read as much
//! as the log is long, until the table is analysed again (with autovacuum
//! off: never) or the session replaced. So every statement of the store is
//! one index lookup or range per stream, never a join (a sub-select per
//! value instead), and the latest version or position is read as
//! `ORDER BY … DESC LIMIT 1`, not `MAX`; the store's sessions and both
//! server functions run with sequential and bitmap scans off (migration
//! `0005_append_plans`), which leaves the planner those index paths
//! whatever it believes about the table's size. The key store
//! ([`SqlKeyStore`]) looks rows up only by indexed keys, and its sessions
//! run with sequential scans off for the same reason (bitmap scans stay:
//! erasure looks a key up by subject or person). `tests/plans.rs` grows
//! the log, or the keys, behind sessions that planned on them empty and
//! counts the tuples the next calls touch.
//!
//! ## State cache
//!
//! The store keeps the latest version and state of recently used aggregates
//! (10 000 by default, least recently used first out), written when this
//! store commits an append or reads the table. `load` answers from it for a
//! time-to-live (1 s by default) after the state was last known current,
//! and reads the table after that: appends made by another process sharing
//! the database — or rows changed by hand — are seen by `load` within the
//! time-to-live. Appends are exact whatever the cache holds: the expected
//! version is checked in the database inside the transaction, a cached
//! state is used only at exactly the stream's current version, and an
//! append that meets a foreign write answers `Conflict` and drops the entry
//! so that the next `load` reads the table. Size it with
//! [`SqlStoreConfig::state_cache`] (0 turns it off) and
//! [`SqlStoreConfig::state_cache_ttl`].
//!
//! The trade-off: memory grows with capacity × the size of a state; a
//! longer time-to-live spares more queries but shows foreign writes later
//! (a command checked against a stale `load` may be refused as a conflict
//! until then). A process that is the only writer of its database loses
//! nothing by a longer one, since its own appends keep the cache current;
//! processes that write the same aggregates side by side want a short one,
//! or `Duration::ZERO` to read every `load` from the table.
//!
//! ## SQLite
//!
//! WAL mode, `synchronous = FULL` (an acknowledged append is on disk),
//! `busy_timeout` 10 s, one writer connection that starts every append with
//! `BEGIN IMMEDIATE` (so concurrent appends queue instead of failing with
//! `SQLITE_BUSY`, also across processes; within a process they are batched
//! as above), and a pool of readers beside it.
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

mod batch;
mod cache;
mod config;
mod error;
mod keys;
mod sql;
mod store;
mod table;
mod tail;
mod writer;

pub use config::SqlStoreConfig;
pub use error::SqlStoreError;
pub use keys::{SqlKeyStore, SqlKeyStoreConfig};
pub use store::{Dialect, SqlStore};
