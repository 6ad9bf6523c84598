//! Given / when / then tests for aggregates, without any store.
//!
//! ```
//! # use kes_core::doc_fixtures::{BelowZero, Counter, CounterEvent};
//! use kes_core::TestFramework;
//!
//! TestFramework::<Counter>::given(vec![CounterEvent::Added { by: 2 }])
//!     .when(-1)
//!     .then_expect_events(vec![CounterEvent::Added { by: -1 }]);
//! TestFramework::<Counter>::given_no_previous_events().when(-1).then_expect_error(BelowZero);
//! ```

use std::fmt::Debug;

use crate::aggregate::Aggregate;

/// Entry point of a given / when / then test.
pub struct TestFramework<A: Aggregate> {
    state: A,
}

impl<A: Aggregate> TestFramework<A> {
    /// The aggregate after `events`.
    pub fn given(events: Vec<A::Event>) -> Self {
        let mut state = A::default();
        for e in &events {
            state.apply(e);
        }
        Self { state }
    }

    /// A new aggregate with no history.
    pub fn given_no_previous_events() -> Self {
        Self::given(Vec::new())
    }

    /// Runs `command` against the given history.
    pub fn when(self, command: A::Command) -> TestOutcome<A> {
        let result = self.state.handle(command);
        TestOutcome { before: self.state, result }
    }
}

/// What a command did in a test; assert on it with the `then_*` methods.
#[must_use = "an outcome asserts nothing until a then_* method is called"]
pub struct TestOutcome<A: Aggregate> {
    before: A,
    result: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate> TestOutcome<A> {
    /// Asserts that the command produced exactly `expected`.
    #[track_caller]
    pub fn then_expect_events(self, expected: Vec<A::Event>)
    where
        A::Event: PartialEq,
    {
        match self.result {
            Ok(events) => assert_eq!(events, expected, "the command produced other events"),
            Err(e) => panic!("expected events {expected:?}, but the command was rejected: {e}"),
        }
    }

    /// Asserts that the command was rejected with `expected`.
    #[track_caller]
    pub fn then_expect_error(self, expected: A::Error)
    where
        A::Error: PartialEq,
    {
        match self.result {
            Ok(events) => panic!("expected error {expected:?}, but the command produced {events:?}"),
            Err(e) => assert_eq!(e, expected, "the command was rejected for another reason"),
        }
    }

    /// Asserts that the command was rejected with an error whose message is
    /// `expected` (for error types without `PartialEq`).
    #[track_caller]
    pub fn then_expect_error_message(self, expected: &str) {
        match self.result {
            Ok(events) => panic!("expected error {expected:?}, but the command produced {events:?}"),
            Err(e) => assert_eq!(e.to_string(), expected),
        }
    }

    /// Asserts on the state after the command's events were applied.
    #[track_caller]
    pub fn then_expect_state(self, check: impl FnOnce(&A)) {
        match self.result {
            Ok(events) => {
                let mut state = self.before;
                for e in &events {
                    state.apply(e);
                }
                check(&state);
            }
            Err(e) => panic!("expected a new state, but the command was rejected: {e}"),
        }
    }

    /// The raw result, for assertions the methods above do not cover.
    pub fn inspect_result(self) -> Result<Vec<A::Event>, A::Error>
    where
        A::Error: Debug,
    {
        self.result
    }
}
