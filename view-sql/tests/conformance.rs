//! The kes-core ListView conformance suite, on PostgreSQL and on SQLite.

mod common;

mod postgres {
    use std::sync::Arc;

    kes_core::list_view_conformance!(|schema: kes_core::ViewSchema| async move {
        crate::common::pg(schema).await.map(|v| Arc::new(v) as Arc<dyn kes_core::ViewStore>)
    });
}

mod sqlite {
    use std::sync::Arc;

    kes_core::list_view_conformance!(|schema: kes_core::ViewSchema| async move {
        crate::common::sqlite(schema).await.map(|v| Arc::new(v) as Arc<dyn kes_core::ViewStore>)
    });
}
