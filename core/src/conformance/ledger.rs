//! The aggregate the EventStore suite runs on.

use serde::{Deserialize, Serialize, Serializer};

use crate::aggregate::{Aggregate, DomainEvent};

/// A small ledger: opened once, takes entries, can be closed (deleted).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// Whether it was opened.
    pub open: bool,
    /// Whether it was closed (a tombstone).
    pub closed: bool,
    /// Sum of all entries.
    pub total: i64,
    /// How many entries it took.
    pub entries: u64,
}

/// Commands of [`Ledger`].
#[derive(Debug, Clone, PartialEq)]
pub enum LedgerCommand {
    /// Open it.
    Open,
    /// Add one entry.
    Add(i64),
    /// Add several entries in one command (several events).
    AddMany(Vec<i64>),
    /// Close it.
    Close,
}

/// Events of [`Ledger`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LedgerEvent {
    /// It was opened.
    Opened,
    /// An entry was added.
    Added {
        /// The amount.
        amount: i64,
    },
    /// It was closed.
    Closed,
    /// An event whose encoding always fails, to check that a failed append
    /// writes nothing.
    #[serde(serialize_with = "refuse", skip_deserializing)]
    Unencodable,
}

fn refuse<S: Serializer>(_: S) -> Result<S::Ok, S::Error> {
    Err(serde::ser::Error::custom("this event cannot be encoded"))
}

impl DomainEvent for LedgerEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Opened => "LedgerOpened",
            Self::Added { .. } => "EntryAdded",
            Self::Closed => "LedgerClosed",
            Self::Unencodable => "Unencodable",
        }
    }
}

/// Why a [`Ledger`] refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// Open on an open ledger.
    #[error("the ledger is already open")]
    AlreadyOpen,
    /// Anything on a ledger that is not open.
    #[error("the ledger is not open")]
    NotOpen,
}

impl Aggregate for Ledger {
    const NAME: &'static str = "ledger";
    type Command = LedgerCommand;
    type Event = LedgerEvent;
    type Error = LedgerError;

    fn handle(&self, command: LedgerCommand) -> Result<Vec<LedgerEvent>, LedgerError> {
        match command {
            LedgerCommand::Open if self.open => Err(LedgerError::AlreadyOpen),
            LedgerCommand::Open => Ok(vec![LedgerEvent::Opened]),
            _ if !self.open || self.closed => Err(LedgerError::NotOpen),
            LedgerCommand::Add(amount) => Ok(vec![LedgerEvent::Added { amount }]),
            LedgerCommand::AddMany(amounts) => {
                Ok(amounts.into_iter().map(|amount| LedgerEvent::Added { amount }).collect())
            }
            LedgerCommand::Close => Ok(vec![LedgerEvent::Closed]),
        }
    }

    fn apply(&mut self, event: &LedgerEvent) {
        match event {
            LedgerEvent::Opened => self.open = true,
            LedgerEvent::Added { amount } => {
                self.total += amount;
                self.entries += 1;
            }
            LedgerEvent::Closed => self.closed = true,
            LedgerEvent::Unencodable => {}
        }
    }

    fn is_deleted(&self) -> bool {
        self.closed
    }
}

/// [`Ledger`] after a change of what its state means: it also keeps the
/// largest entry, which states written by [`Ledger`] lack (they still
/// decode, with `largest` 0), so its [`Aggregate::STATE_VERSION`] is 2. A
/// store opened for it over a table built by [`Ledger`] must rebuild the
/// table from the log, or `load` answers a stale `largest`.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerV2 {
    /// As in [`Ledger`].
    pub open: bool,
    /// As in [`Ledger`].
    pub closed: bool,
    /// As in [`Ledger`].
    pub total: i64,
    /// As in [`Ledger`].
    pub entries: u64,
    /// The largest amount added (new in state version 2).
    #[serde(default)]
    pub largest: i64,
}

impl Aggregate for LedgerV2 {
    const NAME: &'static str = "ledger";
    const STATE_VERSION: u32 = 2;
    type Command = LedgerCommand;
    type Event = LedgerEvent;
    type Error = LedgerError;

    fn handle(&self, command: LedgerCommand) -> Result<Vec<LedgerEvent>, LedgerError> {
        let Self { open, closed, total, entries, .. } = self.clone();
        Ledger { open, closed, total, entries }.handle(command)
    }

    fn apply(&mut self, event: &LedgerEvent) {
        if let LedgerEvent::Added { amount } = event {
            self.largest = self.largest.max(*amount);
        }
        let mut before = Ledger { open: self.open, closed: self.closed, total: self.total, entries: self.entries };
        before.apply(event);
        (self.open, self.closed, self.total, self.entries) = (before.open, before.closed, before.total, before.entries);
    }

    fn is_deleted(&self) -> bool {
        self.closed
    }
}
