//! The rules that cross aggregates, kept by a reaction (a process manager):
//! a task lives only in a project that exists and is not archived.
//!
//! [`ProjectTasks`] reacts to two aggregate types:
//! - **`ProjectArchived`** → every open task of the project is cancelled
//!   (reason `project archived`). The open tasks come from the tasks list
//!   view, read once the view has caught up with every task appended before
//!   the archive was seen, so no task created before the archive is missed.
//!   A replay after the project was restored cancels nothing: the reaction
//!   looks at the project as it is now.
//! - **`TaskCreated`** → when the task's project does not exist (or was
//!   deleted) or is archived, the task is cancelled (reason `project does
//!   not exist` / `project archived`) moments after its creation. Cancelled
//!   rather than deleted, so that the task and why it ended stay visible.
//!   A task done or cancelled by the time the reaction gets to it is left
//!   alone.
//!
//! A task created just before the archive may meet both rules; cancelling
//! is idempotent, so it is cancelled once. Restoring a project reopens none
//! of its cancelled tasks (a user may reopen one).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kes_core::{
    Commands, Envelope, EventStore, FilterOp, ListQuery, ListView, Reaction, ReactionError, Snapshot, ViewError,
};

use crate::domain::{Project, ProjectEvent, Status, Task, TaskCommand, TaskEvent, TaskStatus};

/// The name of the [`ProjectTasks`] reaction (its journals are
/// `reaction_project_tasks_project` and `reaction_project_tasks_task`).
pub const PROJECT_TASKS: &str = "project_tasks";

/// Why the reaction cancels a task of an archived project.
pub const REASON_ARCHIVED: &str = "project archived";

/// Why the reaction cancels a task whose project does not exist.
pub const REASON_NO_PROJECT: &str = "project does not exist";

/// Why a task of a project in `snapshot` must not stay open.
fn verdict(snapshot: Option<Snapshot<Project>>) -> Option<&'static str> {
    match snapshot {
        None => Some(REASON_NO_PROJECT),
        Some(p) if p.state.deleted => Some(REASON_NO_PROJECT),
        Some(p) if p.state.status == Status::Archived => Some(REASON_ARCHIVED),
        Some(_) => None,
    }
}

/// Keeps tasks in projects that exist and are not archived (see the
/// module docs).
pub struct ProjectTasks {
    projects: Arc<dyn EventStore<Project>>,
    tasks: Arc<dyn EventStore<Task>>,
    task_list: Arc<dyn ListView>,
    catch_up: Duration,
}

impl ProjectTasks {
    /// The reaction over the projects store, the tasks store and the tasks
    /// list view (which must list `project_id` and `status`).
    pub fn new(
        projects: Arc<dyn EventStore<Project>>,
        tasks: Arc<dyn EventStore<Task>>,
        task_list: Arc<dyn ListView>,
    ) -> Self {
        Self { projects, tasks, task_list, catch_up: Duration::from_secs(10) }
    }

    /// Why a task of project `id` must not stay open, as the log has the
    /// project now; `None` when it may.
    async fn refusal(&self, project_id: &str) -> Result<Option<&'static str>, ReactionError> {
        Ok(verdict(self.projects.load_current(project_id).await?))
    }

    /// [`ProjectTasks::refusal`], asking the log only when this process's
    /// table (which may lag another process's writes) says the project is
    /// not live: a project the table shows live needs no round trip. A
    /// table that has not seen an archive yet is covered by the archive's
    /// own rule, which cancels every open task created before it.
    async fn refusal_for_new_task(&self, project_id: &str) -> Result<Option<&'static str>, ReactionError> {
        if verdict(self.projects.load(project_id).await?).is_none() {
            return Ok(None);
        }
        self.refusal(project_id).await
    }

    /// Waits until the tasks list reflects every task appended so far.
    async fn tasks_listed(&self) -> Result<(), ReactionError> {
        let head = self.tasks.head().await?;
        let deadline = tokio::time::Instant::now() + self.catch_up;
        loop {
            if self.task_list.position().await?.covers_all(&head) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ReactionError::Unavailable(format!(
                    "the tasks list did not catch up with the tasks log within {:?}",
                    self.catch_up
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The ids of the open tasks of project `id`, in id order.
    async fn open_tasks(&self, project_id: &str) -> Result<Vec<String>, ReactionError> {
        let mut ids = Vec::new();
        let mut query = ListQuery::new()
            .filter("project_id", FilterOp::Eq, project_id)
            .filter("status", FilterOp::Eq, "open")
            .page_size(self.task_list.schema().max_page_size);
        loop {
            let page = self.task_list.list(&query).await.map_err(|e| match e {
                ViewError::Unavailable(m) => ReactionError::Unavailable(m),
                other => ReactionError::Failed(other.to_string()),
            })?;
            ids.extend(page.items.into_iter().map(|i| i.id));
            match page.next {
                Some(next) => query = query.after(next),
                None => return Ok(ids),
            }
        }
    }
}

#[async_trait]
impl Reaction<Project> for ProjectTasks {
    fn name(&self) -> &str {
        PROJECT_TASKS
    }

    async fn react(&self, event: &Envelope<ProjectEvent>, commands: &mut Commands) -> Result<(), ReactionError> {
        if event.payload != ProjectEvent::Archived {
            return Ok(());
        }
        // Replayed after a restore: the project is live again, its tasks stay.
        if self.refusal(&event.aggregate_id).await? != Some(REASON_ARCHIVED) {
            return Ok(());
        }
        self.tasks_listed().await?;
        for task in self.open_tasks(&event.aggregate_id).await? {
            commands.send::<Task>(task, TaskCommand::Cancel { reason: REASON_ARCHIVED.into() });
        }
        Ok(())
    }
}

#[async_trait]
impl Reaction<Task> for ProjectTasks {
    fn name(&self) -> &str {
        PROJECT_TASKS
    }

    async fn react(&self, event: &Envelope<TaskEvent>, commands: &mut Commands) -> Result<(), ReactionError> {
        let TaskEvent::Created { project_id, .. } = &event.payload else { return Ok(()) };
        // Reached late (the reaction lagged): a task done or cancelled
        // meanwhile needs nothing. (A deleted one is still asked to cancel,
        // and refuses: the journal shows it.)
        let task = self.tasks.load(&event.aggregate_id).await?;
        if task.is_some_and(|t| t.state.status != TaskStatus::Open) {
            return Ok(());
        }
        if let Some(reason) = self.refusal_for_new_task(project_id).await? {
            commands.send::<Task>(event.aggregate_id.clone(), TaskCommand::Cancel { reason: reason.into() });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use kes_core::{
        CommandBus, ExpectedVersion, InMemoryStore, InMemoryView, Metadata, ProjectionRunner, ReactionTest,
        RunnerConfig, ViewProjection, ViewStore,
    };

    use super::*;
    use crate::domain::{ProjectCommand, ProjectFields};
    use crate::resources::{task_row, task_view};

    /// Real in-memory stores and a tasks view kept by a running projection.
    struct World {
        projects: CommandBus<Project, Arc<InMemoryStore<Project>>>,
        tasks: CommandBus<Task, Arc<InMemoryStore<Task>>>,
        reaction: ReactionTest<ProjectTasks>,
        _runner: Arc<ProjectionRunner<Task, Arc<InMemoryStore<Task>>>>,
    }

    async fn world() -> World {
        let project_store = Arc::new(InMemoryStore::<Project>::new());
        let task_store = Arc::new(InMemoryStore::<Task>::new());
        let view: Arc<dyn ViewStore> = Arc::new(InMemoryView::new(task_view()).unwrap());
        let runner = ProjectionRunner::new(
            Arc::clone(&task_store),
            vec![Arc::new(ViewProjection::<Task>::new(Arc::clone(&view), task_row))],
            RunnerConfig::default(),
        );
        runner.start().await.unwrap();
        let reaction = ProjectTasks::new(project_store.clone(), task_store.clone(), view);
        World {
            projects: CommandBus::new(project_store),
            tasks: CommandBus::new(task_store),
            reaction: ReactionTest::new(reaction),
            _runner: runner,
        }
    }

    impl World {
        async fn project(&self, id: &str, commands: Vec<ProjectCommand>) {
            let create = ProjectCommand::Create(ProjectFields { name: Some(id.into()), ..ProjectFields::default() });
            for c in std::iter::once(create).chain(commands) {
                self.projects.execute(id, c, ExpectedVersion::Any, Metadata::default()).await.unwrap();
            }
        }

        async fn task(&self, id: &str, project: &str, then: Option<TaskCommand>) {
            let create = TaskCommand::Create { project_id: project.into(), title: id.into(), assignee: None };
            for c in std::iter::once(create).chain(then) {
                self.tasks.execute(id, c, ExpectedVersion::Any, Metadata::default()).await.unwrap();
            }
        }
    }

    fn cancel(id: &str, reason: &str) -> (String, TaskCommand) {
        (id.into(), TaskCommand::Cancel { reason: reason.into() })
    }

    #[tokio::test]
    async fn archiving_a_project_cancels_its_open_tasks_only() {
        let w = world().await;
        w.project("p1", vec![ProjectCommand::Activate, ProjectCommand::Archive]).await;
        w.project("p2", vec![]).await;
        w.task("t1", "p1", None).await;
        w.task("t2", "p1", Some(TaskCommand::Complete)).await;
        w.task("t3", "p1", None).await;
        w.task("t4", "p2", None).await;
        w.reaction
            .when::<Project>("p1", 3, ProjectEvent::Archived)
            .await
            .then_expect::<Task>(vec![cancel("t1", REASON_ARCHIVED), cancel("t3", REASON_ARCHIVED)]);
    }

    #[tokio::test]
    async fn an_archive_replayed_after_a_restore_cancels_nothing() {
        let w = world().await;
        w.project("p1", vec![ProjectCommand::Activate, ProjectCommand::Archive, ProjectCommand::Restore]).await;
        w.task("t1", "p1", None).await;
        w.reaction.when::<Project>("p1", 3, ProjectEvent::Archived).await.then_expect_nothing();
        w.reaction.when::<Project>("p1", 4, ProjectEvent::Restored).await.then_expect_nothing();
    }

    #[tokio::test]
    async fn a_task_created_outside_a_live_project_is_cancelled() {
        let w = world().await;
        w.project("live", vec![ProjectCommand::Activate]).await;
        w.project("old", vec![ProjectCommand::Activate, ProjectCommand::Archive]).await;
        w.project("gone", vec![ProjectCommand::Delete]).await;
        for (task, project) in [("t1", "live"), ("t2", "old"), ("t3", "gone"), ("t4", "never")] {
            w.task(task, project, None).await;
        }
        w.task("t5", "never", Some(TaskCommand::Complete)).await;
        let created = |p: &str| TaskEvent::Created { project_id: p.into(), title: "t".into() };
        w.reaction.when::<Task>("t1", 1, created("live")).await.then_expect_nothing();
        w.reaction.when::<Task>("t2", 1, created("old")).await.then_expect::<Task>(vec![cancel("t2", REASON_ARCHIVED)]);
        w.reaction
            .when::<Task>("t3", 1, created("gone"))
            .await
            .then_expect::<Task>(vec![cancel("t3", REASON_NO_PROJECT)]);
        w.reaction
            .when::<Task>("t4", 1, created("never"))
            .await
            .then_expect::<Task>(vec![cancel("t4", REASON_NO_PROJECT)]);
        w.reaction.when::<Task>("t1", 2, TaskEvent::Completed).await.then_expect_nothing();
        // Done before the reaction got to its creation: left alone.
        w.reaction.when::<Task>("t5", 1, created("never")).await.then_expect_nothing();
    }
}
