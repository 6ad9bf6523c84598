//! List views in PostgreSQL or SQLite (work in progress).
