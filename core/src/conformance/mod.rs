//! Backend conformance suites (feature `testing`): written once here, run by
//! every backend crate against the real thing.
//!
//! ```ignore
//! // tests/conformance.rs of a store backend
//! mod sqlite {
//!     kes_core::event_store_conformance!(async { Some(my_backend::open_temp().await) });
//! }
//! // tests/conformance.rs of a list backend
//! kes_core::list_view_conformance!(|schema: kes_core::ViewSchema| async move {
//!     Some(std::sync::Arc::new(MyView::open_temp(schema).await) as std::sync::Arc<dyn kes_core::ViewStore>)
//! });
//! ```
//!
//! The `make` expression is evaluated once per test and must give a fresh,
//! empty backend; `None` skips the test (the backend prints why, e.g. no
//! database reachable outside CI). Each macro expands to one
//! `#[tokio::test]` per check, so the invoking crate needs `tokio` with the
//! `macros` and `rt-multi-thread` features among its dev-dependencies.
//! Invoke each macro at most once per module.

mod ledger;
pub mod store;
pub mod view;

pub use ledger::{Ledger, LedgerCommand, LedgerError, LedgerEvent, LedgerV2};

/// Expands to the EventStore conformance tests. See the module docs.
#[macro_export]
macro_rules! event_store_conformance {
    ($make:expr) => {
        $crate::__conformance_case!(store, $make, append_load_read_round_trip);
        $crate::__conformance_case!(store, $make, missing_stream_is_empty);
        $crate::__conformance_case!(store, $make, an_append_without_events_is_invalid);
        $crate::__conformance_case!(store, $make, stale_expected_version_is_a_conflict);
        $crate::__conformance_case!(store, $make, multi_event_append_is_atomic);
        $crate::__conformance_case!(store, $make, racing_appends_admit_exactly_one);
        $crate::__conformance_case!(store, $make, concurrent_commands_on_one_aggregate);
        $crate::__conformance_case!(store, $make, concurrent_commands_on_many_aggregates);
        $crate::__conformance_case!(store, $make, subscribe_resumes_from_checkpoint);
        $crate::__conformance_case!(store, $make, idempotency_key_appends_once);
        $crate::__conformance_case!(store, $make, deleted_stream_keeps_its_version);
        $crate::__conformance_case!(store, $make, rejected_command_appends_nothing);
        $crate::__conformance_case!(store, $make, state_documents_match_loads);
        $crate::__conformance_case!(store, $make, history_pages_walk_every_event_once);
    };
}

/// Expands to the ListView conformance tests. `$make` is a closure from a
/// [`crate::ViewSchema`] to a future of `Option<Arc<dyn ViewStore>>`.
#[macro_export]
macro_rules! list_view_conformance {
    ($make:expr) => {
        $crate::__conformance_case!(view, $make, empty_view_lists_nothing);
        $crate::__conformance_case!(view, $make, rows_round_trip);
        $crate::__conformance_case!(view, $make, filters_match_by_hand);
        $crate::__conformance_case!(view, $make, filters_match_the_shared_semantics);
        $crate::__conformance_case!(view, $make, sorts_with_ties_and_missing_values);
        $crate::__conformance_case!(view, $make, keyset_paging_walks_every_row_once);
        $crate::__conformance_case!(view, $make, keyset_paging_is_stable_while_rows_change);
        $crate::__conformance_case!(view, $make, total_and_next_cursor);
        $crate::__conformance_case!(view, $make, search_finds_words);
        $crate::__conformance_case!(view, $make, upsert_and_delete_rows);
        $crate::__conformance_case!(view, $make, rows_outside_the_schema_are_refused);
        $crate::__conformance_case!(view, $make, invalid_queries_are_typed_errors);
        $crate::__conformance_case!(view, $make, rebuild_swaps_in_a_shadow_copy);
        $crate::__conformance_case!(history, $make, history_view_pages_by_version);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_case {
    (store, $make:expr, $name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            match $make.await {
                Some(store) => $crate::conformance::store::$name(store).await,
                None => eprintln!("skipped {}: backend not available", stringify!($name)),
            }
        }
    };
    (history, $make:expr, $name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            match ($make)($crate::history_schema("ledger")).await {
                Some(view) => $crate::conformance::view::$name(view).await,
                None => eprintln!("skipped {}: backend not available", stringify!($name)),
            }
        }
    };
    (view, $make:expr, $name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            match ($make)($crate::conformance::view::schema()).await {
                Some(view) => $crate::conformance::view::$name(view).await,
                None => eprintln!("skipped {}: backend not available", stringify!($name)),
            }
        }
    };
}
