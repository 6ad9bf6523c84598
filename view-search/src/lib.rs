//! List views in a Tantivy search index (work in progress).
