//! The backend conformance suites, run against the in-memory backends.

mod store {
    kes_core::event_store_conformance!(async { Some(kes_core::InMemoryStore::<kes_core::conformance::Ledger>::new()) });
}

mod view {
    use std::sync::Arc;

    use kes_core::{InMemoryView, ViewSchema, ViewStore};

    kes_core::list_view_conformance!(|schema: ViewSchema| async move {
        Some(Arc::new(InMemoryView::new(schema).expect("valid schema")) as Arc<dyn ViewStore>)
    });
}
