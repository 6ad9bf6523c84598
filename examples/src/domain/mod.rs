//! The example domain: projects and their tasks.

pub mod project;
pub mod task;

pub use project::{
    DEFAULT_CURRENCY, Money, Project, ProjectCommand, ProjectError, ProjectEvent, ProjectFields, Status,
};
pub use task::{Task, TaskCommand, TaskError, TaskEvent, TaskStatus};
