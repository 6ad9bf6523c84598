//! The small aggregate the documentation examples of every crate use, so
//! that it is defined once. Not part of the API: hidden from the docs and
//! free to change with them.

use serde::{Deserialize, Serialize};

use crate::{Aggregate, DomainEvent};

/// A counter that never goes below zero (the `Aggregate` docs show it in
/// full).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Counter {
    /// The count.
    pub value: i64,
}

/// What happened to a counter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CounterEvent {
    /// `by` was added.
    Added {
        /// How much (may be negative).
        by: i64,
    },
}

impl DomainEvent for CounterEvent {
    fn event_type(&self) -> &'static str {
        "Added"
    }
}

/// Why a counter refused an addition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a counter never goes below zero")]
pub struct BelowZero;

impl Aggregate for Counter {
    const NAME: &'static str = "counter";
    type Command = i64;
    type Event = CounterEvent;
    type Error = BelowZero;

    fn handle(&self, by: i64) -> Result<Vec<CounterEvent>, BelowZero> {
        if self.value + by < 0 {
            return Err(BelowZero);
        }
        Ok(vec![CounterEvent::Added { by }])
    }

    fn apply(&mut self, event: &CounterEvent) {
        match event {
            CounterEvent::Added { by } => self.value += by,
        }
    }
}
