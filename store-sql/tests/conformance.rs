//! The core's EventStore conformance suite, on a SQLite file and on
//! PostgreSQL (a schema per test).

mod common;

mod sqlite {
    use super::common;
    kes_core::event_store_conformance!(async { Some(common::sqlite::<kes_core::conformance::Ledger>().await) });
}

mod postgres {
    use super::common;
    kes_core::event_store_conformance!(common::postgres::<kes_core::conformance::Ledger>());
}
