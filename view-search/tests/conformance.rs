//! The kes-core ListView conformance suite, run against a Tantivy index in
//! a temporary directory.

mod common;

kes_core::list_view_conformance!(|schema: kes_core::ViewSchema| async move { Some(common::TempView::shared(schema)) });
