//! Generic REST adapter (axum) for KES aggregates (work in progress).
