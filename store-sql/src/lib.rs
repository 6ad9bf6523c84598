//! Event store and table in SQLite (the embedded default) or PostgreSQL (work in progress).
