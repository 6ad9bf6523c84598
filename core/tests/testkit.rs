//! The given / when / then kit on the conformance ledger.

use kes_core::TestFramework;
use kes_core::conformance::{Ledger, LedgerCommand, LedgerError, LedgerEvent};

#[test]
fn expected_events() {
    TestFramework::<Ledger>::given(vec![LedgerEvent::Opened])
        .when(LedgerCommand::AddMany(vec![1, 2]))
        .then_expect_events(vec![LedgerEvent::Added { amount: 1 }, LedgerEvent::Added { amount: 2 }]);
}

#[test]
fn expected_error_and_message() {
    TestFramework::<Ledger>::given_no_previous_events()
        .when(LedgerCommand::Add(1))
        .then_expect_error(LedgerError::NotOpen);
    TestFramework::<Ledger>::given(vec![LedgerEvent::Opened])
        .when(LedgerCommand::Open)
        .then_expect_error_message("the ledger is already open");
}

#[test]
fn expected_state() {
    TestFramework::<Ledger>::given(vec![LedgerEvent::Opened, LedgerEvent::Added { amount: 4 }])
        .when(LedgerCommand::Add(6))
        .then_expect_state(|l| assert_eq!((l.total, l.entries), (10, 2)));
}

#[test]
#[should_panic(expected = "the command produced other events")]
fn wrong_events_fail_the_test() {
    TestFramework::<Ledger>::given(vec![LedgerEvent::Opened])
        .when(LedgerCommand::Add(1))
        .then_expect_events(vec![LedgerEvent::Added { amount: 2 }]);
}

#[test]
#[should_panic(expected = "but the command produced")]
fn an_unexpected_success_fails_the_test() {
    TestFramework::<Ledger>::given(vec![LedgerEvent::Opened])
        .when(LedgerCommand::Add(1))
        .then_expect_error(LedgerError::NotOpen);
}
