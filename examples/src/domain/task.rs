//! A task: belongs to a project, open until done.
//!
//! The rule "the assignee is a member of the project" spans two aggregates.
//! An aggregate decides on its own state alone (that keeps commands on
//! different aggregates parallel and `handle` pure), so this rule is *not*
//! checked when a task is assigned: a project may also lose the member
//! later. An application that needs it would check it in a process manager
//! reacting to `TaskAssigned` (reading the project's list row), and flag or
//! reassign the task.
//!
//! The rule "a task's project exists and is not archived" is kept that way,
//! by the reactions in [`crate::reactions`]: archiving a project cancels
//! its open tasks, and a task created for a project that does not exist
//! (or is archived) is cancelled with that reason moments after it was
//! created. Cancelled is final for the reactions: restoring the project
//! does not reopen its cancelled tasks (a user may reopen one).

use kes_core::{Aggregate, DomainEvent, Personal};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Open, done or cancelled.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    /// To do.
    #[default]
    Open,
    /// Done.
    Done,
    /// Not to be done any more (its project was archived, or it never had
    /// one).
    Cancelled,
}

impl TaskStatus {
    /// The status as the list view stores it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Done => "done",
            Self::Cancelled => "cancelled",
        }
    }
}

/// The latest state of a task.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Task {
    /// Whether the task was created.
    #[serde(default)]
    pub created: bool,
    /// The project it belongs to.
    #[serde(default)]
    pub project_id: String,
    /// What is to be done.
    #[serde(default)]
    pub title: String,
    /// Open or done.
    #[serde(default)]
    pub status: TaskStatus,
    /// Who does it: personal data of the assignee.
    pub assignee: Option<Personal<String>>,
    /// Why it was cancelled, while it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<String>,
    /// Whether it was deleted.
    #[serde(default)]
    pub deleted: bool,
}

/// What can be asked of a task.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskCommand {
    /// Create it in a project.
    Create {
        /// The project.
        project_id: String,
        /// The title.
        title: String,
        /// Who does it.
        assignee: Option<String>,
    },
    /// Change the title and/or the assignee (an empty assignee unassigns).
    Update {
        /// The new title.
        title: Option<String>,
        /// The new assignee; `Some("")` unassigns.
        assignee: Option<String>,
    },
    /// Mark it done.
    Complete,
    /// Open it again (also a cancelled one).
    Reopen,
    /// Cancel an open task, saying why (nothing happens to a cancelled
    /// one; a done one refuses).
    Cancel {
        /// Why.
        reason: String,
    },
    /// Delete it.
    Delete,
}

/// What happened to a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TaskEvent {
    /// It was created.
    Created {
        /// The project.
        project_id: String,
        /// The title.
        title: String,
    },
    /// Its title changed.
    Retitled {
        /// The new title.
        title: String,
    },
    /// It was assigned (or unassigned).
    Assigned {
        /// Who, or nobody.
        assignee: Option<Personal<String>>,
    },
    /// It was done.
    Completed,
    /// It was opened again.
    Reopened,
    /// It was cancelled.
    Cancelled {
        /// Why.
        reason: String,
    },
    /// It was deleted.
    Deleted,
    /// A person whose data it holds was forgotten. Holds no personal data.
    SubjectErased {
        /// The erased subject's id.
        subject: String,
    },
}

impl DomainEvent for TaskEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Created { .. } => "TaskCreated",
            Self::Retitled { .. } => "TaskRetitled",
            Self::Assigned { .. } => "TaskAssigned",
            Self::Completed => "TaskCompleted",
            Self::Reopened => "TaskReopened",
            Self::Cancelled { .. } => "TaskCancelled",
            Self::Deleted => "TaskDeleted",
            Self::SubjectErased { .. } => "TaskSubjectErased",
        }
    }

    fn subject_erased(subject: &str) -> Option<Self> {
        Some(Self::SubjectErased { subject: subject.to_owned() })
    }

    fn erased_subject(&self) -> Option<&str> {
        match self {
            Self::SubjectErased { subject } => Some(subject),
            _ => None,
        }
    }
}

/// Why a task refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    /// Create on an existing task.
    #[error("the task already exists")]
    AlreadyExists,
    /// A change to a task never created (or deleted).
    #[error("the task does not exist")]
    NotCreated,
    /// A task without a project.
    #[error("a task belongs to a project: project_id cannot be blank")]
    NoProject,
    /// A blank title.
    #[error("a task title cannot be blank")]
    BlankTitle,
    /// Complete on a done (or cancelled) task, reopen on an open one,
    /// cancel on one that is not open.
    #[error("the task is already {0}")]
    AlreadyInStatus(&'static str),
}

impl Aggregate for Task {
    const NAME: &'static str = "task";
    /// Assignees are personal data.
    const PERSONAL_DATA: bool = true;
    type Command = TaskCommand;
    type Event = TaskEvent;
    type Error = TaskError;

    fn handle(&self, command: TaskCommand) -> Result<Vec<TaskEvent>, TaskError> {
        let title_of = |t: String| {
            let t = t.trim().to_owned();
            if t.is_empty() { Err(TaskError::BlankTitle) } else { Ok(t) }
        };
        if let TaskCommand::Create { project_id, title, assignee } = command {
            if self.created {
                return Err(TaskError::AlreadyExists);
            }
            let project_id = project_id.trim().to_owned();
            if project_id.is_empty() {
                return Err(TaskError::NoProject);
            }
            let mut events = vec![TaskEvent::Created { project_id, title: title_of(title)? }];
            if let Some(assignee) = assignee.map(|a| a.trim().to_owned()).filter(|a| !a.is_empty()) {
                events.push(TaskEvent::Assigned { assignee: Some(Personal::new(assignee.clone(), assignee)) });
            }
            return Ok(events);
        }
        if !self.created || self.deleted {
            return Err(TaskError::NotCreated);
        }
        Ok(match command {
            TaskCommand::Create { .. } => return Err(TaskError::AlreadyExists),
            TaskCommand::Update { title, assignee } => {
                let mut events = Vec::new();
                if let Some(title) = title.map(title_of).transpose()?
                    && title != self.title
                {
                    events.push(TaskEvent::Retitled { title });
                }
                if let Some(assignee) = assignee {
                    let assignee = Some(assignee.trim().to_owned()).filter(|a| !a.is_empty());
                    let current = self.assignee.as_ref();
                    if assignee.as_ref() != current.and_then(Personal::value)
                        || current.is_some_and(Personal::is_erased)
                    {
                        events.push(TaskEvent::Assigned { assignee: assignee.map(|a| Personal::new(a.clone(), a)) });
                    }
                }
                events
            }
            TaskCommand::Complete if self.status != TaskStatus::Open => {
                return Err(TaskError::AlreadyInStatus(self.status.as_str()));
            }
            TaskCommand::Complete => vec![TaskEvent::Completed],
            // Cancelling is idempotent: two reasons to cancel (the project
            // was archived, and the task was created in an archived
            // project) may meet on one task.
            TaskCommand::Cancel { .. } if self.status == TaskStatus::Cancelled => Vec::new(),
            TaskCommand::Cancel { .. } if self.status != TaskStatus::Open => {
                return Err(TaskError::AlreadyInStatus(self.status.as_str()));
            }
            TaskCommand::Cancel { reason } => {
                let reason = reason.trim().to_owned();
                vec![TaskEvent::Cancelled { reason: if reason.is_empty() { "cancelled".to_owned() } else { reason } }]
            }
            TaskCommand::Reopen if self.status == TaskStatus::Open => return Err(TaskError::AlreadyInStatus("open")),
            TaskCommand::Reopen => vec![TaskEvent::Reopened],
            TaskCommand::Delete => vec![TaskEvent::Deleted],
        })
    }

    fn apply(&mut self, event: &TaskEvent) {
        match event {
            TaskEvent::Created { project_id, title } => {
                self.created = true;
                self.project_id = project_id.clone();
                self.title = title.clone();
            }
            TaskEvent::Retitled { title } => self.title = title.clone(),
            TaskEvent::Assigned { assignee } => self.assignee = assignee.clone(),
            TaskEvent::Completed => self.status = TaskStatus::Done,
            TaskEvent::Reopened => {
                self.status = TaskStatus::Open;
                self.cancel_reason = None;
            }
            TaskEvent::Cancelled { reason } => {
                self.status = TaskStatus::Cancelled;
                self.cancel_reason = Some(reason.clone());
            }
            TaskEvent::Deleted => self.deleted = true,
            TaskEvent::SubjectErased { .. } => {}
        }
    }

    fn is_deleted(&self) -> bool {
        self.deleted
    }
}

#[cfg(test)]
mod tests {
    use kes_core::TestFramework;

    use super::*;

    fn created() -> TaskEvent {
        TaskEvent::Created { project_id: "p".into(), title: "t".into() }
    }

    #[test]
    fn a_task_needs_a_project_and_a_title() {
        let create = |p: &str, t: &str| TaskCommand::Create { project_id: p.into(), title: t.into(), assignee: None };
        TestFramework::<Task>::given_no_previous_events()
            .when(create(" ", "t"))
            .then_expect_error(TaskError::NoProject);
        TestFramework::<Task>::given_no_previous_events()
            .when(create("p", ""))
            .then_expect_error(TaskError::BlankTitle);
        TestFramework::<Task>::given_no_previous_events()
            .when(TaskCommand::Create { project_id: "p".into(), title: "t".into(), assignee: Some("ann".into()) })
            .then_expect_events(vec![
                created(),
                TaskEvent::Assigned { assignee: Some(Personal::new("ann", "ann".into())) },
            ]);
    }

    #[test]
    fn open_then_done_then_open() {
        TestFramework::<Task>::given(vec![created()])
            .when(TaskCommand::Complete)
            .then_expect_events(vec![TaskEvent::Completed]);
        TestFramework::<Task>::given(vec![created(), TaskEvent::Completed])
            .when(TaskCommand::Complete)
            .then_expect_error(TaskError::AlreadyInStatus("done"));
        TestFramework::<Task>::given(vec![created()])
            .when(TaskCommand::Reopen)
            .then_expect_error(TaskError::AlreadyInStatus("open"));
    }

    #[test]
    fn only_an_open_task_is_cancelled_and_a_cancelled_one_can_be_reopened() {
        let cancel = || TaskCommand::Cancel { reason: "project archived".into() };
        let cancelled = TaskEvent::Cancelled { reason: "project archived".into() };
        TestFramework::<Task>::given(vec![created()]).when(cancel()).then_expect_events(vec![cancelled.clone()]);
        TestFramework::<Task>::given(vec![created(), cancelled.clone()]).when(cancel()).then_expect_events(vec![]);
        TestFramework::<Task>::given(vec![created(), TaskEvent::Completed])
            .when(cancel())
            .then_expect_error(TaskError::AlreadyInStatus("done"));
        TestFramework::<Task>::given(vec![created(), cancelled.clone()])
            .when(TaskCommand::Complete)
            .then_expect_error(TaskError::AlreadyInStatus("cancelled"));
        TestFramework::<Task>::given(vec![created(), cancelled])
            .when(TaskCommand::Reopen)
            .then_expect_events(vec![TaskEvent::Reopened]);
    }
}
