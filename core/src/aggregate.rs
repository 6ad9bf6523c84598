//! The domain side: aggregates decide, events record what was decided.

use std::fmt::Debug;

use serde::{Serialize, de::DeserializeOwned};

/// Something that happened to an aggregate, named in the past tense
/// (`ProjectRenamed`, not `RenameProject`).
///
/// Events are stored forever, so their shape is a contract with the future:
/// when it has to change, bump [`DomainEvent::revision`] for that event type
/// and return, from [`DomainEvent::upcasters`], a step that turns the old
/// stored JSON into the new shape. Every store's default codec
/// ([`crate::JsonCodec`]) applies them on every path that decodes an event
/// (loads, reads, subscriptions, recovery, rebuilds), so the registration
/// is one place that no path can miss.
pub trait DomainEvent: Serialize + DeserializeOwned + Clone + Debug + Send + Sync + 'static {
    /// The stable name of this event's type, e.g. `"ProjectRenamed"`.
    /// Stored next to the payload and shown in audit histories.
    fn event_type(&self) -> &'static str;

    /// The schema revision of this event's type, starting at 1.
    fn revision(&self) -> u32 {
        1
    }

    /// The steps that bring payloads of older revisions up to the current
    /// ones (none by default). Called once per codec, not per event.
    ///
    /// ```
    /// use kes_core::{DomainEvent, Upcast, Upcasters};
    /// # use serde::{Deserialize, Serialize};
    /// #[derive(Debug, Clone, Serialize, Deserialize)]
    /// enum Ev { Paid { cents: i64, currency: String } }
    /// impl DomainEvent for Ev {
    ///     fn event_type(&self) -> &'static str { "Paid" }
    ///     // Revision 1 had `cents` only, always in euros.
    ///     fn revision(&self) -> u32 { 2 }
    ///     fn upcasters() -> Upcasters {
    ///         Upcasters::new().register("Paid", 1, |mut v| {
    ///             v["Paid"]["currency"] = "EUR".into();
    ///             Ok(Upcast { event_type: "Paid".into(), payload: v })
    ///         })
    ///     }
    /// }
    /// use kes_core::{Codec, JsonCodec};
    /// let old = JsonCodec::<Ev>::default().decode("Paid", 1, br#"{"Paid":{"cents":5}}"#).unwrap();
    /// assert!(matches!(old, Ev::Paid { cents: 5, ref currency } if currency == "EUR"));
    /// ```
    fn upcasters() -> crate::codec::Upcasters {
        crate::codec::Upcasters::new()
    }

    /// The data-free event that records, in an aggregate holding personal
    /// data of `subject`, that the subject was erased (see
    /// [`crate::Personal`]): appended by [`crate::CommandBus::record_erasure`]
    /// so that the aggregate's version, table row, list rows and feeds move
    /// with the erasure. Aggregates that declare
    /// [`Aggregate::PERSONAL_DATA`] must return one; `apply` usually
    /// leaves the state as it is (its values of the subject now open as
    /// erased).
    fn subject_erased(subject: &str) -> Option<Self> {
        let _ = subject;
        None
    }

    /// The subject this event records the erasure of, when it is the
    /// event [`DomainEvent::subject_erased`] made. Readers of the log drop
    /// the subject's key from their caches when they meet it.
    fn erased_subject(&self) -> Option<&str> {
        None
    }
}

/// A consistency boundary: one thing whose rules are checked together,
/// such as a project or a task.
///
/// `handle` decides, `apply` records. `handle` is pure: it looks only at the
/// current state and the command, performs no I/O and either returns the
/// events that the command causes or a domain error. `apply` never fails: an
/// event is a fact that already happened, so the state must accept it.
///
/// ```
/// use kes_core::{Aggregate, DomainEvent};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Default, Clone, Serialize, Deserialize)]
/// struct Counter { value: i64 }
///
/// #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
/// enum CounterEvent { Added { by: i64 } }
/// impl DomainEvent for CounterEvent {
///     fn event_type(&self) -> &'static str { "Added" }
/// }
///
/// #[derive(Debug, thiserror::Error, PartialEq)]
/// #[error("a counter never goes below zero")]
/// struct BelowZero;
///
/// impl Aggregate for Counter {
///     const NAME: &'static str = "counter";
///     type Command = i64;
///     type Event = CounterEvent;
///     type Error = BelowZero;
///     fn handle(&self, by: i64) -> Result<Vec<CounterEvent>, BelowZero> {
///         if self.value + by < 0 { return Err(BelowZero) }
///         Ok(vec![CounterEvent::Added { by }])
///     }
///     fn apply(&mut self, event: &CounterEvent) {
///         match event { CounterEvent::Added { by } => self.value += by }
///     }
/// }
/// # let mut c = Counter::default();
/// # for e in c.handle(3).unwrap() { c.apply(&e) }
/// # assert_eq!(c.value, 3);
/// ```
pub trait Aggregate: Default + Serialize + DeserializeOwned + Clone + Debug + Send + Sync + 'static {
    /// The aggregate type's name, singular and lower case (`"project"`).
    /// Names topics, tables and (pluralised by the HTTP adapter) routes.
    const NAME: &'static str;

    /// The version of what a state *means*: bump it when `apply` changes,
    /// or a field is added whose value older states lack (a state written
    /// by the old code still decodes, but says something else). A store's
    /// table of latest states records the version it was built by; a table
    /// built by another one is rebuilt from the log at the next start, as
    /// list views are when their schema version changes.
    const STATE_VERSION: u32 = 1;

    /// Whether the state or the events hold [`crate::Personal`] values. The
    /// command bus then opens the state before `guard` and `handle` and
    /// seals new events before the append, with its [`crate::Vault`].
    /// Forgetting it is safe, never silent: a new personal value refuses
    /// to be encoded for a store.
    const PERSONAL_DATA: bool = false;

    /// What a caller asks the aggregate to do. `Clone`, because a command
    /// that lost a race against another writer is decided again on the
    /// fresh state (see [`crate::CommandBus::execute`]).
    type Command: Debug + Clone + Send + 'static;

    /// What the aggregate records when a command succeeds.
    type Event: DomainEvent;

    /// Why the aggregate refused a command (a broken business rule).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Decides which events `command` causes, or why it is refused.
    fn handle(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Moves the state forward by one event.
    fn apply(&mut self, event: &Self::Event);

    /// Whether this state is a deletion (tombstone). A deleted aggregate is
    /// not found by reads, its list row is removed, and the store's table
    /// of latest states drops it. Its events stay in the log.
    fn is_deleted(&self) -> bool {
        false
    }
}
