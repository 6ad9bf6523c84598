//! How the domain meets HTTP and the list views: routes, bodies, view
//! schemas and rows.

use kes_core::{Field, FieldValue, Row, ViewSchema};
use kes_http::{AggregateId, Principal, Resource};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::domain::{NOT_BLANK, Project, ProjectCommand, Task, TaskCommand};

/// A command that takes no body.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoBody {}

/// Names a member.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberBody {
    /// The member's name.
    #[schemars(extend("pattern" = NOT_BLANK))]
    pub member: String,
}

/// Why a task is cancelled.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    /// Why (blank: "cancelled").
    #[serde(default)]
    pub reason: String,
}

/// Creates a task.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTask {
    /// The project it belongs to.
    // An id may be blank; a task's project may not. `allOf` keeps the id
    // rule's own pattern.
    #[schemars(extend("allOf" = [{ "pattern": NOT_BLANK }]))]
    pub project_id: AggregateId,
    /// What is to be done.
    #[schemars(extend("pattern" = NOT_BLANK))]
    pub title: String,
    /// Who does it.
    #[serde(default)]
    pub assignee: Option<String>,
}

/// Changes a task; absent fields stay, an empty assignee unassigns.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateTask {
    /// The new title.
    #[serde(default)]
    #[schemars(extend("pattern" = NOT_BLANK))]
    pub title: Option<String>,
    /// The new assignee.
    #[serde(default)]
    pub assignee: Option<String>,
}

/// The role that may do anything to any project.
pub const ADMIN_ROLE: &str = "admin";

/// Who may change a project.
pub const TEAM_RULE: &str =
    "only the project's owner, its members or an admin may change it (anyone while it has neither owner nor members)";
/// Who may edit a project's fields (PATCH, PUT): [`TEAM_RULE`], and the
/// owner is the owner's to give away.
pub const EDIT_RULE: &str = "only the project's owner, its members or an admin may change it (anyone while it has \
     neither owner nor members), and only its owner or an admin may give it another owner";
/// Who may archive, restore or delete a project.
pub const OWNER_RULE: &str = "only the project's owner or an admin may do this (anyone while it has no owner)";

/// Whether `who` may change `project`: [`TEAM_RULE`].
pub fn in_team(who: &Principal, project: &Project) -> bool {
    let unclaimed = project.owner.is_none() && project.members.is_empty();
    unclaimed || owns(who, project) || project.has_member(&who.subject)
}

/// Whether `command` would give `project` another owner.
pub fn gives_another_owner(project: &Project, command: &ProjectCommand) -> bool {
    let asked = match command {
        ProjectCommand::Replace(fields) => Some(fields.owner.clone()),
        ProjectCommand::Update(fields) => fields.owner.clone().map(Some),
        _ => None,
    };
    asked.is_some_and(|owner| {
        owner.map(|o| o.trim().to_owned()).filter(|o| !o.is_empty()).as_ref() != project.owner_name()
    })
}

/// Whether `who` may archive, restore or delete `project`: [`OWNER_RULE`].
pub fn owns(who: &Principal, project: &Project) -> bool {
    match &project.owner {
        None => true,
        // An erased owner's project is an admin's to archive or delete.
        Some(owner) => owner.value() == Some(&who.subject) || who.has_role(ADMIN_ROLE),
    }
}

/// `/projects`: CRUD plus the status and membership commands, with who
/// may run each ([`EDIT_RULE`], [`TEAM_RULE`], [`OWNER_RULE`]; creating and reading are
/// open to every caller the API lets in).
pub fn projects() -> Resource<Project> {
    let team = |who: &Principal, p: &Project| in_team(who, p) || who.has_role(ADMIN_ROLE);
    let edit = move |who: &Principal, p: &Project, c: &ProjectCommand| {
        team(who, p) && (!gives_another_owner(p, c) || owns(who, p))
    };
    Resource::new("projects")
        .create(ProjectCommand::Create)
        .replace(ProjectCommand::Replace)
        .patch(ProjectCommand::Update)
        .delete(|| ProjectCommand::Delete)
        .command("activate", |_: NoBody| ProjectCommand::Activate)
        .command("archive", |_: NoBody| ProjectCommand::Archive)
        .command("restore", |_: NoBody| ProjectCommand::Restore)
        .command("add-member", |b: MemberBody| ProjectCommand::AddMember(b.member))
        .command("remove-member", |b: MemberBody| ProjectCommand::RemoveMember(b.member))
        .allow_command("replace", EDIT_RULE, edit)
        .allow_command("patch", EDIT_RULE, edit)
        .allow("activate", TEAM_RULE, team)
        .allow("add-member", TEAM_RULE, team)
        .allow("remove-member", TEAM_RULE, team)
        .allow("archive", OWNER_RULE, owns)
        .allow("restore", OWNER_RULE, owns)
        .allow("delete", OWNER_RULE, owns)
}

/// `/tasks`: create, update, complete, reopen, cancel, delete.
pub fn tasks() -> Resource<Task> {
    Resource::new("tasks")
        .create(|b: CreateTask| TaskCommand::Create {
            project_id: b.project_id.into_string(),
            title: b.title,
            assignee: b.assignee,
        })
        .patch(|b: UpdateTask| TaskCommand::Update { title: b.title, assignee: b.assignee })
        .delete(|| TaskCommand::Delete)
        .command("complete", |_: NoBody| TaskCommand::Complete)
        .command("reopen", |_: NoBody| TaskCommand::Reopen)
        .command("cancel", |b: CancelBody| TaskCommand::Cancel { reason: b.reason })
        .command("assign", |b: UpdateTask| TaskCommand::Update {
            title: None,
            assignee: b.assignee.or(Some(String::new())),
        })
}

/// The list view of projects. Bump the version when fields or
/// [`project_row`] change: the view is rebuilt from the log at start.
pub fn project_view() -> ViewSchema {
    ViewSchema::new("projects", 1)
        .field(Field::text("name").filterable().sortable().searchable())
        .field(Field::text("description").searchable())
        .field(Field::keyword("status").filterable().sortable())
        .field(Field::integer("budget").filterable().sortable())
        .field(Field::keyword("owner").filterable().sortable().searchable())
        .field(Field::integer("members").filterable().sortable())
        .field(Field::text("tags").searchable())
        .field(Field::timestamp("due").filterable().sortable())
}

/// The list row of a project.
pub fn project_row(p: &Project) -> Row {
    let mut row = Row::new();
    if let Some(name) = &p.name {
        row.insert("name".into(), name.as_str().into());
    }
    if !p.description.is_empty() {
        row.insert("description".into(), p.description.as_str().into());
    }
    row.insert("status".into(), p.status.as_str().into());
    row.insert("budget".into(), p.budget.into());
    if let Some(owner) = p.owner_name() {
        row.insert("owner".into(), owner.as_str().into());
    }
    row.insert("members".into(), FieldValue::Integer(p.members.len() as i64));
    if !p.tags.is_empty() {
        row.insert("tags".into(), p.tags.iter().map(String::as_str).collect::<Vec<_>>().join(" ").into());
    }
    if let Some(due) = p.due.and_then(|d| d.and_hms_opt(0, 0, 0)) {
        row.insert("due".into(), due.and_utc().into());
    }
    row
}

/// The list view of tasks.
pub fn task_view() -> ViewSchema {
    ViewSchema::new("tasks", 1)
        .field(Field::text("title").filterable().sortable().searchable())
        .field(Field::keyword("project_id").filterable().sortable())
        .field(Field::keyword("status").filterable().sortable())
        .field(Field::keyword("assignee").filterable().sortable().searchable())
}

/// The list row of a task.
pub fn task_row(t: &Task) -> Row {
    let mut row = Row::new();
    row.insert("title".into(), t.title.as_str().into());
    row.insert("project_id".into(), t.project_id.as_str().into());
    row.insert("status".into(), t.status.as_str().into());
    if let Some(a) = t.assignee.as_ref().and_then(|a| a.value()) {
        row.insert("assignee".into(), a.as_str().into());
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The compiled body schema of `B`.
    fn validator<B: JsonSchema>() -> jsonschema::Validator {
        jsonschema::draft202012::new(schemars::schema_for!(B).as_value()).expect("the schema compiles")
    }

    #[test]
    fn the_body_schemas_admit_exactly_the_texts_the_rules_accept() {
        use crate::domain::{ProjectError, TaskError};
        use kes_core::Aggregate;
        let (create, update) = (validator::<CreateTask>(), validator::<UpdateTask>());
        let fields = validator::<crate::domain::ProjectFields>();
        // Every character of the first planes where white space lives, and
        // the byte-order mark, which is white space to ECMA-262 only.
        let texts = (0..=0x3100u32)
            .chain([0xfeff, 0x1_0000])
            .filter_map(char::from_u32)
            .flat_map(|c| [c.to_string(), format!("{c}{c}")])
            .chain(["".to_owned(), " x ".to_owned(), "\u{3000}\t\u{85}".to_owned()]);
        for text in texts {
            let task = TaskCommand::Create { project_id: "p".into(), title: text.clone(), assignee: None };
            let accepted = !matches!(Task::default().handle(task), Err(TaskError::BlankTitle));
            let body = serde_json::json!({ "project_id": "p", "title": text });
            assert_eq!(create.is_valid(&body), accepted, "title {text:?}");
            assert_eq!(update.is_valid(&serde_json::json!({ "title": text })), accepted, "title {text:?}");
            let task = TaskCommand::Create { project_id: text.clone(), title: "t".into(), assignee: None };
            let accepted = !matches!(Task::default().handle(task), Err(TaskError::NoProject));
            // The id rule refuses more (control characters, `/`): only
            // what it admits is compared.
            if AggregateId::new(text.clone()).is_some() {
                let body = serde_json::json!({ "project_id": text, "title": "t" });
                assert_eq!(create.is_valid(&body), accepted, "project_id {text:?}");
            }
            let named =
                ProjectCommand::Create(crate::domain::ProjectFields { name: Some(text.clone()), ..Default::default() });
            let accepted = !matches!(Project::default().handle(named), Err(ProjectError::BlankName));
            let body = serde_json::json!({ "name": text });
            assert_eq!(fields.is_valid(&body), accepted, "name {text:?}");
        }
    }

    #[test]
    fn rows_fit_their_schemas() {
        let mut p = Project { name: Some("x".into()), budget: 3, ..Project::default() };
        p.tags.insert("a".into());
        p.due = chrono::NaiveDate::from_ymd_opt(2026, 12, 24);
        project_view().validate().unwrap();
        project_view().check_row(&project_row(&p)).unwrap();
        task_view().validate().unwrap();
        task_view().check_row(&task_row(&Task::default())).unwrap();
    }

    use kes_core::Personal;

    #[test]
    fn owners_members_and_admins_may_change_a_project() {
        let who = |name: &str, roles: &[&str]| Principal {
            subject: name.into(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        };
        let unclaimed = Project::default();
        assert!(in_team(&who("zoe", &[]), &unclaimed) && owns(&who("zoe", &[]), &unclaimed));
        let mut p = Project { owner: Some(Personal::new("ann", "ann".into())), ..Project::default() };
        p.members.push(Personal::new("bob", "bob".into()));
        assert!(in_team(&who("ann", &[]), &p) && owns(&who("ann", &[]), &p));
        assert!(in_team(&who("bob", &[]), &p), "members may change it");
        assert!(!owns(&who("bob", &[]), &p), "members may not archive it");
        assert!(!in_team(&who("zoe", &[]), &p) && !owns(&who("zoe", &[]), &p));
        assert!(owns(&who("zoe", &[ADMIN_ROLE]), &p), "admins may");
    }

    #[test]
    fn only_a_change_of_owner_counts_as_giving_it_away() {
        use crate::domain::ProjectFields;
        let p = Project { owner: Some(Personal::new("ann", "ann".into())), ..Project::default() };
        let update = |owner: Option<&str>| {
            ProjectCommand::Update(ProjectFields { owner: owner.map(str::to_owned), ..ProjectFields::default() })
        };
        assert!(!gives_another_owner(&p, &update(None)), "a PATCH without owner keeps it");
        assert!(!gives_another_owner(&p, &update(Some(" ann "))), "the same owner, spaced");
        assert!(gives_another_owner(&p, &update(Some("bob"))));
        assert!(gives_another_owner(&p, &update(Some(""))), "clearing it is giving it away");
        let replace = ProjectCommand::Replace(ProjectFields { name: Some("x".into()), ..ProjectFields::default() });
        assert!(gives_another_owner(&p, &replace), "a PUT without owner clears it");
        assert!(!gives_another_owner(&p, &ProjectCommand::Archive));
    }
}
