//! # kes-examples
//!
//! The `projects` service: the seed's scenario built on KES, end to end.
//! Two aggregates with real rules — [`domain::Project`] (draft → active →
//! archived and back, budget, owner, members, tags, due date) and
//! [`domain::Task`] — mounted on one REST router, stored in SQLite (the
//! default), PostgreSQL or Kafka, listed from SQL views or a Tantivy index.
//!
//! | module | what |
//! |---|---|
//! | [`domain`] | the aggregates: commands, events, rules |
//! | [`reactions`] | the rules across aggregates, kept by a reaction: archiving a project cancels its open tasks |
//! | [`resources`] | how they meet HTTP and the list views |
//! | [`service`] | stores and views chosen by URL, runners, router, rebuild |
//!
//! ## Features
//!
//! | feature | default | list views in |
//! |---|---|---|
//! | `view-sql` | yes | SQLite (`sqlite://data/views.db`) or PostgreSQL |
//! | `view-search` | no | a Tantivy index directory (`data/index`) |
//!
//! ## Example
//!
//! ```
//! use kes_core::TestFramework;
//! use kes_examples::domain::{Project, ProjectCommand, ProjectError, ProjectFields};
//!
//! let negative = ProjectFields { budget: Some(-5), ..ProjectFields::default() };
//! TestFramework::<Project>::given_no_previous_events()
//!     .when(ProjectCommand::Create(negative))
//!     .then_expect_error(ProjectError::NegativeBudget(-5));
//! ```

pub mod domain;
pub mod reactions;
pub mod resources;
pub mod service;
pub mod web;
