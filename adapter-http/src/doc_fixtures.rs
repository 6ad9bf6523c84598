//! The small aggregate the documentation examples of this crate use, so
//! that it is defined once (the core's `Counter` cannot describe itself as
//! a JSON Schema). Not part of the API: hidden from the docs.

use kes_core::{Aggregate, DomainEvent};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A task with a title and an owner.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Task {
    /// What is to be done.
    pub title: String,
    /// Whether it is done.
    pub done: bool,
    /// Who opened it.
    pub owner: String,
    /// Whether it was put away.
    pub archived: bool,
}

/// What can be asked of a task.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskCommand {
    /// Open it with a title.
    Open(String),
    /// Mark it done.
    Finish,
    /// Put it away.
    Archive,
}

/// What happened to a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TaskEvent {
    /// It was opened.
    Opened {
        /// Its title.
        title: String,
    },
    /// It was done.
    Done,
    /// It was put away.
    Archived,
}

impl DomainEvent for TaskEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Opened { .. } => "TaskOpened",
            Self::Done => "TaskDone",
            Self::Archived => "TaskArchived",
        }
    }
}

/// Why a task refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the task is not open")]
pub struct NotOpen;

impl Aggregate for Task {
    const NAME: &'static str = "task";
    type Command = TaskCommand;
    type Event = TaskEvent;
    type Error = NotOpen;

    fn handle(&self, command: TaskCommand) -> Result<Vec<TaskEvent>, NotOpen> {
        match command {
            TaskCommand::Open(title) => Ok(vec![TaskEvent::Opened { title }]),
            _ if self.title.is_empty() => Err(NotOpen),
            TaskCommand::Finish => Ok(vec![TaskEvent::Done]),
            TaskCommand::Archive => Ok(vec![TaskEvent::Archived]),
        }
    }

    fn apply(&mut self, event: &TaskEvent) {
        match event {
            TaskEvent::Opened { title } => self.title = title.clone(),
            TaskEvent::Done => self.done = true,
            TaskEvent::Archived => self.archived = true,
        }
    }
}
