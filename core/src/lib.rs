//! # kes-core
//!
//! The heart of KES, an event-sourcing framework for backends of
//! single-page applications: every user action is stored as an immutable
//! event; the latest state of each aggregate is kept in a table for reads by
//! id; list views are projected from the log and can be rebuilt from it at
//! any time.
//!
//! This crate holds the contracts and everything that knows no backend:
//!
//! | module | what |
//! |---|---|
//! | `aggregate` | [`Aggregate`] (commands decide, events record) and [`DomainEvent`] |
//! | `envelope` | [`Envelope`], [`Metadata`], [`Position`], [`Checkpoint`] |
//! | `codec` | the payload [`Codec`] seam, [`JsonCodec`], upcasters |
//! | `store` | the [`EventStore`] contract, [`ExpectedVersion`], [`StoreError`] |
//! | `bus` | [`CommandBus`]: one command at a time per aggregate, idempotent retries |
//! | `locks` | [`KeyedLocks`]: one turn at a time per key (the bus's per-aggregate lock table, shared with stores) |
//! | `history` | the audit history page by page: [`StoreHistory`], or a [`HistoryProjection`] read by [`ViewHistory`] |
//! | `view` | [`ViewSchema`], [`ListQuery`], [`Page`], the [`ListView`] / [`ViewStore`] contracts |
//! | `projection` | [`Projection`], [`ViewProjection`], [`ProjectionRunner`] (batches, checkpoints, rebuild, lag) |
//! | `reaction` | [`Reaction`]s (process managers): events that send commands, exactly once in effect, with their [`ReactionProjection`], [`CommandRouter`] and [`ReactionTest`] |
//! | `memory` | [`InMemoryStore`], [`InMemoryView`]: real in-memory backends |
//! | `testkit` | given / when / then tests for aggregates |
//! | `conformance` | (feature `testing`) the suites every backend runs |
//!
//! ## Features
//!
//! | feature | what it adds |
//! |---|---|
//! | `testing` | `conformance`: the EventStore and ListView suites, as functions and macros |
//!
//! ## Example
//!
//! ```
//! use kes_core::{Aggregate, CommandBus, DomainEvent, ExpectedVersion, InMemoryStore, Metadata};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Default, Clone, Serialize, Deserialize)]
//! struct Account { open: bool, balance: i64 }
//!
//! #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
//! enum AccountEvent { Opened, Deposited { amount: i64 } }
//!
//! impl DomainEvent for AccountEvent {
//!     fn event_type(&self) -> &'static str {
//!         match self { Self::Opened => "Opened", Self::Deposited { .. } => "Deposited" }
//!     }
//! }
//!
//! #[derive(Clone)]
//! enum AccountCommand { Open, Deposit(i64) }
//! # impl std::fmt::Debug for AccountCommand {
//! #     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str("cmd") }
//! # }
//!
//! #[derive(Debug, thiserror::Error)]
//! enum AccountError {
//!     #[error("the account is already open")] AlreadyOpen,
//!     #[error("deposits must be positive")] NotPositive,
//! }
//!
//! impl Aggregate for Account {
//!     const NAME: &'static str = "account";
//!     type Command = AccountCommand;
//!     type Event = AccountEvent;
//!     type Error = AccountError;
//!
//!     fn handle(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
//!         match command {
//!             AccountCommand::Open if self.open => Err(AccountError::AlreadyOpen),
//!             AccountCommand::Open => Ok(vec![AccountEvent::Opened]),
//!             AccountCommand::Deposit(a) if a <= 0 => Err(AccountError::NotPositive),
//!             AccountCommand::Deposit(amount) => Ok(vec![AccountEvent::Deposited { amount }]),
//!         }
//!     }
//!
//!     fn apply(&mut self, event: &AccountEvent) {
//!         match event {
//!             AccountEvent::Opened => self.open = true,
//!             AccountEvent::Deposited { amount } => self.balance += amount,
//!         }
//!     }
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let bus = CommandBus::new(InMemoryStore::<Account>::new());
//! bus.execute("a-1", AccountCommand::Open, ExpectedVersion::NoStream, Metadata::default()).await.unwrap();
//! let done = bus.execute("a-1", AccountCommand::Deposit(5), ExpectedVersion::Exact(1), Metadata::default()).await.unwrap();
//! assert_eq!((done.version, done.state.balance), (2, 5));
//!
//! // A stale expected version is refused and appends nothing.
//! let stale = bus.execute("a-1", AccountCommand::Deposit(5), ExpectedVersion::Exact(1), Metadata::default()).await;
//! assert!(matches!(stale, Err(kes_core::CommandError::Conflict { actual: 2, .. })));
//! # });
//! ```

mod aggregate;
mod bus;
mod codec;
#[cfg(feature = "testing")]
pub mod conformance;
#[doc(hidden)]
pub mod doc_fixtures;
mod envelope;
mod history;
mod locks;
mod memory;
mod personal;
mod projection;
mod reaction;
mod store;
mod testkit;
mod vault;
mod view;

pub use aggregate::{Aggregate, DomainEvent};
pub use bus::{BusConfig, CommandBus, CommandError, CommandGuard, CommandOutcome};
pub use codec::{Codec, CodecError, EncodedEvent, JsonCodec, RawEnvelope, Upcast, UpcastFn, Upcasters, encode_all};
pub use envelope::{BadPosition, Checkpoint, Envelope, Metadata, Position};
pub use history::{
    HISTORY_AGGREGATE_FIELD, HISTORY_MAX_PAGE, HISTORY_RECORD_FIELD, HISTORY_VERSION_FIELD, History, HistoryError,
    HistoryPage, HistoryProjection, HistoryRecord, StoreHistory, ViewHistory, history_schema, store_page,
};
pub use locks::{KeyedGuard, KeyedLocks};
pub use memory::{InMemoryStore, InMemoryView};
pub use personal::{ERASED_FIELD, PERSONAL_NODE, Personal};
pub use projection::{
    CatchUp, Projection, ProjectionError, ProjectionRunner, ProjectionStatus, RebuildProgress, RebuildReport,
    RebuildState, RowFn, RunnerConfig, StoredCatchUp, StoredStatus, ViewProjection,
};
pub use reaction::{
    CommandRouter, CommandSink, Commands, REACTION_METADATA_KEY, Reaction, ReactionConfig, ReactionCounts,
    ReactionError, ReactionKey, ReactionOutcome, ReactionProjection, ReactionRunner, ReactionStart, ReactionStats,
    ReactionStatus, ReactionTest, Refusal, Sent, journal_schema,
};
pub use store::{
    Appended, EventStore, EventStream, ExpectedVersion, Logged, Snapshot, StateDocument, StoreError, StoreGauge,
};
pub use testkit::{TestFramework, TestOutcome};
pub use vault::{
    AggregateRef, DEFAULT_KEY_TTL, Erasure, InMemoryKeyStore, KeyLookup, KeyRequest, KeyStore, KeyStoreError,
    MasterKey, Vault, VaultError, WrappedKey,
};
pub use view::{
    Cond, Cursor, Field, FieldType, FieldValue, Filter, FilterOp, ID_FIELD, Lease, ListItem, ListQuery, ListView, Page,
    QueryError, Row, RowChange, SchemaError, SortKey, StoredState, ValidFilter, ValidQuery, ValidSort, ViewCopy,
    ViewError, ViewProgress, ViewSchema, ViewStore, is_plain_name, prefix_upper_bound,
};
